"""The decode step for CUDA graphs (engine/graph_step.py), replayed on the CPU by calling the
same step (no CUDA here): a step that reads only its buffers gives peft's tokens through joins,
leaves and changing compositions, with padding rows and positions, and a bucket is captured
once whatever adapters its rows use."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the LoRA kernels run on the CPU

import concurrent.futures as cf  # noqa: E402

import pytest  # noqa: E402

from conftest import ADAPTERS, PROMPTS  # noqa: E402
from host_syncs import HostSyncs  # noqa: E402
from loramux.server.engine.engine import Engine  # noqa: E402
from loramux.server.engine.facade import Facade  # noqa: E402
from loramux.server.engine.graph_step import Capture, GraphDecode, row_buckets, width_buckets  # noqa: E402
from loramux.server.engine.inputs import GenerateInput  # noqa: E402
from loramux.server.errors import InvalidSettings  # noqa: E402
from loramux.server.lora import triton_kernels  # noqa: E402
from loramux.server.model.base_model import load_base_model  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_kernels.triton.knobs.runtime.interpret,
                                reason="Triton's interpreter was not on when Triton loaded")
ROWS, TOKENS = 6, 40


def test_buckets():
    assert row_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert row_buckets(6) == [1, 2, 4, 6]
    assert row_buckets(1) == [1]
    assert width_buckets(40) == [40]
    assert width_buckets(300) == [64, 128, 256, 300]


@pytest.fixture(scope="module")
def graph_engine(assets):
    settings = assets.settings(kv_cache="static", kv_cache_tokens=TOKENS, max_batch_size=ROWS, adapter_slots=5,
                               lora_kernel="triton", batch_window_ms=20)
    engine = Engine(settings, load_base_model(settings))
    engine.worker.decode = GraphDecode(engine.base, engine.kv_pool, Capture.CALL)  # as --cuda-graphs would on CUDA
    engine.start()
    for name in ADAPTERS:
        engine.load_adapter("default", name, name)
    yield engine
    engine.stop()


def run_all(engine, jobs):
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(engine.generate, "default", GenerateInput(adapter_id=a, prompt=p, max_new_tokens=n), 120)
                   for a, p, n in jobs]
        return [f.result()["token_ids"] for f in futures]


def test_replayed_steps_equal_peft_through_joins_leaves_and_compositions(assets, graph_engine):
    decode = graph_engine.worker.decode
    # Different lengths: rows leave at different steps and waiting requests join (more
    # requests than rows), so compositions and row counts change under the same buckets.
    jobs = [(a, p, 6 - i % 3) for i, (a, p) in enumerate((a, p) for p in PROMPTS[:3] for a in ["", *ADAPTERS])]
    results = run_all(graph_engine, jobs)
    for (adapter, prompt, n), tokens in zip(jobs, results):
        assert tokens == assets.oracle(adapter or None, prompt, n), (adapter, prompt, n)
    assert decode.replays > 0 and decode.eager_steps == 0
    groups = graph_engine.base.bank.siblings  # q/k/v and gate/up share one shrink launch in the step too
    assert groups and all(g.enabled and g.shared > 0 for g in groups)
    captured = list(decode.capture_log)
    assert len(captured) == decode.captured
    assert len(set(captured)) == len(captured), captured  # each bucket captured once, whatever its rows' adapters
    info = Facade(graph_engine).server_info()
    assert (info.cuda_graphs, info.cuda_graphs_captured, info.lora_kernel, info.lora_dtype) == (
        True, decode.captured, "triton", "float32")


def test_a_second_round_of_other_compositions_captures_nothing_new(assets, graph_engine):
    decode = graph_engine.worker.decode
    jobs = [(a, PROMPTS[0], 5) for a in ["", *ADAPTERS]]
    run_all(graph_engine, jobs)  # every bucket these shapes meet is captured now
    before = decode.captured
    jobs = [(a, PROMPTS[0], 5) for a in reversed(["", *ADAPTERS])]  # other rows, other adapters
    results = run_all(graph_engine, jobs)
    for (adapter, prompt, n), tokens in zip(jobs, results):
        assert tokens == assets.oracle(adapter or None, prompt, n), (adapter, prompt, n)
    assert decode.captured == before


def test_cuda_graphs_need_their_settings(assets):
    for overrides, field in ((dict(kv_cache="dynamic", lora_kernel="triton"), "kv_cache"),
                             (dict(kv_cache="static", lora_kernel="torch"), "lora_kernel")):
        with pytest.raises(InvalidSettings) as e:
            assets.settings(cuda_graphs=True, **overrides)
        assert e.value.field == "cuda_graphs" and field in str(e.value)
    settings = assets.settings(cuda_graphs=True, kv_cache="static", lora_kernel="triton", device="cpu")
    with pytest.raises(InvalidSettings) as e:
        Engine(settings, load_base_model(settings))
    assert e.value.field == "cuda_graphs" and "CUDA" in str(e.value)


def test_a_replayed_step_makes_no_host_synchronisation(assets, graph_engine):
    """What a capture records must not read a value back: checked on the CPU by watching every
    operator of each captured bucket's step (with and without LoRA) through the dispatcher.
    (`Tensor.tolist()` reads memory without a dispatched operator, so it escapes this watch;
    the step's code has none.)"""
    decode = graph_engine.worker.decode
    run_all(graph_engine, [("", PROMPTS[1], 4)])  # a batch without adapters
    run_all(graph_engine, [(a, PROMPTS[1], 4) for a in ["", *ADAPTERS]])
    groups = graph_engine.base.bank.siblings
    assert all(g.checks_left == 0 for g in groups)  # (their first parts were checked, with a read-back, long ago)
    buckets = sorted({key[:3] for key in decode._graphs})
    assert any(lora for _, _, lora in buckets) and any(not lora for _, _, lora in buckets)

    def watch():
        seen = {}
        for rows, width, lora in buckets:
            with HostSyncs() as mode:
                decode._step(rows, width, lora)()
            seen[(rows, width, lora)] = mode.seen
        return seen

    seen = graph_engine.call_on_engine(watch).result(60)
    assert seen == {bucket: [] for bucket in buckets}


def test_loading_evicting_and_replacing_adapters_captures_nothing_new(assets):
    """Three slots for five adapters: rounds of requests evict and load adapters, and one is
    replaced by other weights; once the buckets are captured, none of that captures again
    (each row's slot is data in a buffer; the slot tables change in place), and every row still
    gets peft's tokens, the replaced adapter its new weights' tokens."""
    settings = assets.settings(kv_cache="static", kv_cache_tokens=TOKENS, max_batch_size=ROWS, adapter_slots=3,
                               lora_kernel="triton", batch_window_ms=20)
    engine = Engine(settings, load_base_model(settings))
    engine.worker.decode = decode = GraphDecode(engine.base, engine.kv_pool, Capture.CALL)
    engine.start()
    try:
        for name in ADAPTERS:
            engine.load_adapter("default", name, name)
        names = ["", *ADAPTERS]
        jobs = [(a, p, 4) for p in PROMPTS[:2] for a in names]
        run_all(engine, jobs)  # every bucket these shapes meet
        run_all(engine, jobs)
        captured = decode.captured
        for order in (list(reversed(names)), names[1::2] + names[0::2]):  # other compositions: evictions and loads
            jobs = [(a, p, 4) for p in PROMPTS[:2] for a in order]
            for (adapter, prompt, n), tokens in zip(jobs, run_all(engine, jobs)):
                assert tokens == assets.oracle(adapter or None, prompt, n), (adapter, prompt)
        engine.load_adapter("default", "qv-r4", "pattern", replace=True)  # other weights in the same name
        jobs = [(a, p, 4) for p in PROMPTS[:2] for a in ("qv-r4", "all-r16", "")]
        for (adapter, prompt, n), tokens in zip(jobs, run_all(engine, jobs)):
            want = "pattern" if adapter == "qv-r4" else adapter or None
            assert tokens == assets.oracle(want, prompt, n), (adapter, prompt)
        assert decode.captured == captured, decode.capture_log
        assert decode.eager_steps == 0
    finally:
        engine.stop()
