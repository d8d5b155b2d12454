"""The static KV cache (`--kv-cache static`) and the compiled decode step (`--compile`):
greedy tokens equal to peft's through joins, leaves, waiting rows and evictions; the static
cache's memory counted at start-up and left clean; the compiled step never recompiling across
adapter loads, evictions, replacements and batch compositions (dynamo's error-on-recompile
setting on), with exactly the two graphs start-up compiled."""

from __future__ import annotations

import concurrent.futures as cf
import queue
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramux.client as lc
from conftest import ADAPTERS, PROMPTS
from loramux.demo.assets import make_adapter
from loramux.server.app import BackgroundServer
from loramux.server.model.base_model import load_base_model
from loramux.server.engine.engine import Engine
from loramux.server.engine.inputs import GenerateInput
from loramux.server.engine.kv_cache import StaticKvPool
from loramux.server.engine.request import ErrorEvent, FinishEvent, FinishReason
from loramux.server.errors import PromptTooLong

N = 10
ROWS, TOKENS = 3, 40


def run_all(engine, jobs):
    """jobs: (adapter, prompt, max_new_tokens); all submitted at once."""
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(engine.generate, "default", GenerateInput(adapter_id=a, prompt=p, max_new_tokens=n), 120)
                   for a, p, n in jobs]
        return [f.result() for f in futures]


def assert_equal_peft(assets, jobs, results):
    for (adapter, prompt, n), result in zip(jobs, results, strict=True):
        assert result["token_ids"] == assets.oracle(adapter or None, prompt, n), (adapter, prompt, n)


def pool_is_clean(engine) -> bool:
    """Every static row zeroed. Checked between passes: a request's last token reaches its
    caller inside the pass that then drops and zeroes its row."""
    engine.call_on_engine(lambda: None).result(60)
    return all(not t.any() for t in (*engine.kv_pool.keys, *engine.kv_pool.values))


@pytest.fixture(scope="module")
def static_engine(assets):
    # 3 rows for up to 24 requests (they wait for rows), 2 slots for 6 adapters (evictions).
    settings = assets.settings(kv_cache="static", kv_cache_tokens=TOKENS, max_batch_size=ROWS, adapter_slots=2,
                               batch_window_ms=30)
    engine = Engine(settings, load_base_model(settings)).start()
    for name in ADAPTERS:
        engine.load_adapter("default", name, name)
    overflow = assets.copy_adapter("qv-r4", "kv-overflow")
    tensors = load_file(str(overflow / "adapter_model.safetensors"))
    save_file({k: v * 1e20 for k, v in tensors.items()}, str(overflow / "adapter_model.safetensors"))
    engine.load_adapter("default", "overflow", "kv-overflow")
    yield engine
    engine.stop()


def test_static_rows_equal_peft_through_joins_leaves_and_waits(assets, static_engine):
    engine = static_engine
    pool = engine.kv_pool
    config = engine.base.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    # Counted up front: rows x positions x KV heads x head dim, keys and values, every layer.
    assert pool.nbytes == config.num_hidden_layers * 2 * ROWS * TOKENS * config.num_key_value_heads * head_dim * 4
    # Rows leave at different steps (different lengths), so rows move into the holes; more
    # requests than rows, so most join a running batch.
    jobs = [(a, p, N - i % 5) for i, (a, p) in enumerate((a, p) for p in PROMPTS for a in ["", *ADAPTERS])]
    results = run_all(engine, jobs)
    assert_equal_peft(assets, jobs, results)
    assert engine.stats().prefills > 1
    assert pool_is_clean(engine)  # every row that left was zeroed


def test_a_static_row_with_non_finite_scores_leaves_nothing_behind(assets, static_engine):
    engine = static_engine
    jobs = [("overflow", PROMPTS[1], N), ("", PROMPTS[0], N), ("all-r16", PROMPTS[3], N)]
    with cf.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(engine.generate, "default", GenerateInput(adapter_id=a, prompt=p, max_new_tokens=n), 120)
                   for a, p, n in jobs]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result())
            except Exception as e:  # noqa: BLE001 - the overflowing row's error is the expected outcome
                outcomes.append(e)
    assert getattr(outcomes[0], "reason", None) == "NON_FINITE_LOGITS"
    assert_equal_peft(assets, jobs[1:], outcomes[1:])
    assert pool_is_clean(engine)
    # The rows it used serve the next requests exactly.
    again = [(a, p, N) for a in ("qv-r4", "", "pattern") for p in PROMPTS[:2]]
    assert_equal_peft(assets, again, run_all(engine, again))


def test_a_join_that_fails_mid_copy_fails_only_the_joiners_and_leaves_their_rows_zeroed(assets, static_engine,
                                                                                          monkeypatch):
    engine = static_engine
    running: queue.Queue = queue.Queue()
    engine.submit("default", GenerateInput(prompt=PROMPTS[3], max_new_tokens=20), running.put)
    # Its second token comes from a decode step, so by then its own join (prefill tokens are
    # sent before the join) is done.
    tokens = running.get(timeout=30).token_ids + running.get(timeout=30).token_ids
    original = StaticKvPool.load

    def half_then_fail(self, first_row, cache, lengths):
        self.keys[0][first_row, :, :1] = 7.0  # something copied before the failure
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    monkeypatch.setattr(StaticKvPool, "load", half_then_fail)
    joiners = [queue.Queue() for _ in range(2)]
    for q, adapter in zip(joiners, ("qv-r4", "all-r16")):
        engine.submit("default", GenerateInput(adapter_id=adapter, prompt=PROMPTS[0], max_new_tokens=N), q.put)
    for q in joiners:
        event = q.get(timeout=30)
        while not isinstance(event, (ErrorEvent, FinishEvent)):
            event = q.get(timeout=30)
        assert isinstance(event, ErrorEvent) and event.error.reason == "OUT_OF_MEMORY"
    monkeypatch.setattr(StaticKvPool, "load", original)
    while not isinstance(event := running.get(timeout=30), FinishEvent):
        assert not isinstance(event, ErrorEvent)
        tokens += event.token_ids
    assert tokens == assets.oracle(None, PROMPTS[3], 20)
    assert pool_is_clean(engine)


def test_a_static_row_is_each_requests_context(assets, static_engine):
    engine = static_engine
    with pytest.raises(PromptTooLong) as e:
        engine.generate("default", GenerateInput(prompt_token_ids=[5] * TOKENS, max_new_tokens=1), 60)
    assert e.value.metadata["max_sequence_length"] == str(TOKENS) and "kv_cache_tokens" in e.value.message
    # Output is capped at the row's room, as at the model's context.
    prompt = [5] * 30
    result = engine.generate("default", GenerateInput(prompt_token_ids=prompt, max_new_tokens=100, ignore_eos=True), 60)
    assert len(result["token_ids"]) == TOKENS - len(prompt)
    assert result["finish"].finish_reason is FinishReason.LENGTH
    assert pool_is_clean(engine)


def test_server_info_reports_the_static_cache_and_compilation(assets, static_engine):
    settings = assets.settings(kv_cache="static", kv_cache_tokens=32, max_batch_size=2)
    server = BackgroundServer(settings)
    try:
        with lc.Client(server.target) as client:
            info = client.server_info()
        assert (info.kv_cache, info.kv_cache_tokens, info.compiled, info.compiled_graphs) == ("static", 32, False, 0)
        assert info.kv_cache_bytes == server.engine.kv_pool.nbytes > 0
    finally:
        server.stop()


# -- compile ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["static", "dynamic"])
def compiled(assets, request):
    if not (assets.adapters / "dora-c").exists():
        make_adapter(assets.base, assets.adapters / "dora-c", r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"),
                     use_dora=True, seed=31)
    settings = assets.settings(compile=True, kv_cache=request.param, kv_cache_tokens=64, max_batch_size=6,
                               adapter_slots=3, batch_window_ms=20)
    engine = Engine(settings, load_base_model(settings)).start()
    # Any recompilation from here on raises in the step (the setting is per thread: the engine's).
    engine.call_on_engine(lambda: setattr(torch._dynamo.config, "error_on_recompile", True))
    yield engine
    engine.call_on_engine(lambda: setattr(torch._dynamo.config, "error_on_recompile", False))
    engine.stop()


def test_compiled_steps_never_recompile_and_equal_peft(assets, compiled):
    engine = compiled
    decode = engine.compiled_decode
    assert decode.graphs_compiled == 2  # one row, and two or more
    source = {name: name for name in [*ADAPTERS, "dora-c"]}
    for name in source:
        engine.load_adapter("default", name, name)
    rng = random.Random(0)
    # Many compositions: 1-6 rows, adapters of different ranks and targets mixed with base
    # rows and a DoRA adapter, 3 slots for 6-7 adapters (evictions), lengths that make rows
    # leave at different steps; an adapter loaded, then replaced, mid-run.
    for round_ in range(8):
        if round_ == 3:
            engine.load_adapter("default", "late", "qv-r4", warm=True)
            source["late"] = "qv-r4"
        if round_ == 5:
            engine.load_adapter("default", "late", "pattern", replace=True)
            source["late"] = "pattern"
        size = rng.randint(1, 6)
        jobs = [(rng.choice(["", *source]), rng.choice(PROMPTS), rng.randint(2, N)) for _ in range(size)]
        results = run_all(engine, jobs)
        for (adapter, prompt, n), result in zip(jobs, results, strict=True):
            assert result["token_ids"] == assets.oracle(source.get(adapter), prompt, n), (round_, adapter, prompt, n)
    assert decode.graphs_compiled == 2
    assert engine.stats().steps > 30
    if engine.kv_pool is not None:
        assert pool_is_clean(engine)
    engine.unload_adapter("default", "late")


def test_a_compiled_int8_base_gives_the_eager_int8_servers_tokens(assets):
    """torchao's int8 weights trace into the graph: the compiled server's greedy tokens equal
    the eager server's on the same quantized base (peft's are not the reference here)."""
    outputs = {}
    for compile_ in (False, True):
        settings = assets.settings(quantization="int8", compile=compile_, kv_cache="static", kv_cache_tokens=48,
                                   max_batch_size=4, batch_window_ms=20)
        engine = Engine(settings, load_base_model(settings)).start()
        try:
            for name in ("qv-r4", "all-r16"):
                engine.load_adapter("default", name, name)
            jobs = [(a, p, N) for a in ("", "qv-r4", "all-r16") for p in PROMPTS]
            outputs[compile_] = [r["token_ids"] for r in run_all(engine, jobs)]
            if compile_:
                assert engine.compiled_decode.graphs_compiled == 2
        finally:
            engine.stop()
    assert outputs[True] == outputs[False]
