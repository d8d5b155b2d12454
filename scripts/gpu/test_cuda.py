"""CUDA checks, run by scripts/gpu_check.sh on a GPU machine (not collected by `make test`).

bf16 on the GPU cannot be token-exact against peft (both round differently), so the checks
use tolerances: the first token and its log-probability, and the share of positions that
agree before the two runs' outputs first diverge. Also: the host tier holds pinned memory,
and promotion with non-blocking copies gives the same outputs as a resident adapter."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from conftest import ADAPTERS, PROMPTS, Assets  # noqa: E402

from loramux.server.model.base_model import load_base_model  # noqa: E402
from loramux.server.engine.engine import Engine  # noqa: E402
from loramux.server.engine.inputs import GenerateInput  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
N = 16


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return Assets(tmp_path_factory.mktemp("gpu-assets"))


@pytest.fixture(scope="module")
def engine(assets):
    settings = assets.settings(device="cuda", dtype="bfloat16", adapter_slots=2, host_cache_mib=64)
    eng = Engine(settings, load_base_model(settings)).start()
    for name in ADAPTERS:
        eng.load_adapter("default", name, name)
    yield eng
    eng.stop()


def peft_reference(assets, adapter, prompt, dtype=torch.bfloat16):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(assets.base), dtype=dtype).cuda().eval()
    model = PeftModel.from_pretrained(model, str(assets.adapters / adapter)).eval()
    ids = torch.tensor([assets.tokenizer(prompt)["input_ids"]], device="cuda")
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=assets.tokenizer.pad_token_id)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    first_logprob = torch.log_softmax(out.scores[0][0].float(), -1)[tokens[0]].item()
    return tokens, first_logprob


def prefix_share(a: list[int], b: list[int]) -> float:
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same / max(len(b), 1)


def agreement(outputs: dict, oracle: dict) -> tuple[float, int]:
    shares = [prefix_share(outputs[k], oracle[k]) for k in oracle]
    return sum(shares) / len(shares), sum(outputs[k] == oracle[k] for k in oracle)


def loramux_outputs(engine) -> dict:
    return {(a, p): engine.generate("default", GenerateInput(adapter_id=a, prompt=p, max_new_tokens=N), 120)["token_ids"]
            for a in ADAPTERS for p in PROMPTS}


def test_bf16_is_as_close_to_float32_as_peft_on_cuda(assets, engine):
    """The fidelity triangle on the GPU: loramux bf16 (the default --lora-dtype float32) and peft
    bf16, each against peft in float32, one request at a time."""
    oracle = {(a, p): peft_reference(assets, a, p, torch.float32)[0] for a in ADAPTERS for p in PROMPTS}
    theirs = agreement({(a, p): peft_reference(assets, a, p)[0] for a in ADAPTERS for p in PROMPTS}, oracle)
    ours = agreement(loramux_outputs(engine), oracle)
    print(f"bf16 against float32 peft on CUDA (mean prefix, exact of {len(oracle)}): loramux {ours[0]:.3f} {ours[1]}, "
          f"peft {theirs[0]:.3f} {theirs[1]}")
    for adapter in ADAPTERS:  # the first token and its log-probability, as before
        ours_first = engine.generate("default", GenerateInput(adapter_id=adapter, prompt=PROMPTS[0], max_new_tokens=1,
                                                              return_logprobs=True), 120)
        tokens, first_logprob = peft_reference(assets, adapter, PROMPTS[0])
        assert ours_first["token_ids"][0] == tokens[0] and abs(ours_first["logprobs"][0] - first_logprob) < 0.1, adapter
    assert ours[0] >= theirs[0] and ours[1] >= theirs[1]


def test_triton_kernels_and_cuda_graphs_serve_what_the_eager_server_serves(assets, engine):
    """--lora-kernel triton eagerly, then with --cuda-graphs (static KV): greedy tokens against
    the eager torch-kernel server, mixed batches; graphs captured per bucket, not per composition."""
    import concurrent.futures as cf

    jobs = [(a, p) for a in ["", *ADAPTERS] for p in PROMPTS]
    eager = {(a, p): engine.generate("default", GenerateInput(adapter_id=a, prompt=p, max_new_tokens=N), 120)["token_ids"]
             for a, p in jobs}
    for overrides in (dict(lora_kernel="triton"), dict(lora_kernel="triton", kv_cache="static", kv_cache_tokens=128,
                                                      cuda_graphs=True)):
        settings = assets.settings(device="cuda", dtype="bfloat16", adapter_slots=6, max_batch_size=16, **overrides)
        eng = Engine(settings, load_base_model(settings)).start()
        try:
            for name in ADAPTERS:
                eng.load_adapter("default", name, name)
            ours, captured = {}, []
            for order in (jobs, jobs[::-1]):  # a second round: other compositions over the same buckets
                captured.append(eng.compiled_decode.captured if eng.compiled_decode is not None else 0)
                with cf.ThreadPoolExecutor(len(order)) as pool:
                    tokens = pool.map(lambda j: eng.generate("default", GenerateInput(adapter_id=j[0], prompt=j[1],
                                                                                      max_new_tokens=N), 120)["token_ids"], order)
                    ours.update(zip(order, tokens))
            share = sum(prefix_share(ours[j], eager[j]) for j in jobs) / len(jobs)
            first = sum(ours[j][0] == eager[j][0] for j in jobs)
            decode = eng.compiled_decode
            print(f"{overrides}: first tokens {first}/{len(jobs)} equal the eager torch-kernel server's, prefix "
                  f"agreement {share:.3f}" + (f", graphs captured {decode.captured}, replays {decode.replays}, eager "
                                              f"steps {decode.eager_steps}" if decode is not None else ""))
            assert first >= 0.95 * len(jobs)  # bf16: the kernels sum in another order (float32 LoRA path)
            if decode is not None:
                assert decode.replays > 0 and decode.eager_steps == 0
                # The second round's compositions differ, its buckets are the first round's:
                # nothing new is captured (the rows' slots are data, the slot tables change in place).
                print(f"captured before round 1: {captured[0]}, before round 2: {captured[1]}, after: {decode.captured}; "
                      f"keys {decode.capture_log}")
                assert decode.captured == captured[1]
        finally:
            eng.stop()


def test_an_engine_in_its_own_process_serves_on_cuda_what_the_in_process_engine_serves(assets, engine):
    """--engine-process on CUDA: the spawned engine initialises CUDA itself, and greedy tokens
    through the gRPC door equal the in-process engine's (same settings, same bf16 arithmetic)."""
    import loramux.client as lc
    from loramux.server.app import BackgroundServer

    jobs = [(a, p) for a in ["", *ADAPTERS] for p in PROMPTS]
    here = {(a, p): engine.generate("default", GenerateInput(adapter_id=a, prompt=p, max_new_tokens=N), 120)["token_ids"]
            for a, p in jobs}
    settings = assets.settings(device="cuda", dtype="bfloat16", adapter_slots=2, host_cache_mib=64, engine_process=True)
    with BackgroundServer(settings) as server, lc.Client(server.target, timeout=120) as client:
        for name in ADAPTERS:
            client.load_adapter(name, source=name)
        split = {(a, p): client.generate(prompt=p, adapter_id=a, max_new_tokens=N).token_ids for a, p in jobs}
        info = client.server_info()
    same = sum(split[j] == here[j] for j in jobs)
    print(f"engine process on {info.device}: {same}/{len(jobs)} sequences equal the in-process engine's")
    assert info.engine_process and info.device.startswith("cuda") and same == len(jobs)


def test_host_tier_is_pinned_and_promotion_is_consistent(assets, engine):
    cache = engine.cache
    host = [w for w in cache._host.values()]
    assert host and all(m.a.is_pinned() and m.b.is_pinned() for w in host for m in w.modules.values())
    # Two slots, five adapters: each round evicts and promotes again; outputs must not change.
    first = {a: engine.generate("default", GenerateInput(adapter_id=a, prompt=PROMPTS[0], max_new_tokens=N), 120)["token_ids"]
             for a in ADAPTERS}
    again = {a: engine.generate("default", GenerateInput(adapter_id=a, prompt=PROMPTS[0], max_new_tokens=N), 120)["token_ids"]
             for a in ADAPTERS}
    assert first == again


def test_dora_bf16_tracks_peft_on_cuda(assets, engine):
    from loramux.demo.assets import make_adapter

    make_adapter(assets.base, assets.adapters / "dora-gpu", r=8, alpha=16, use_dora=True,
                 target_modules=("q_proj", "v_proj", "up_proj"), seed=31)
    engine.load_adapter("default", "dora-gpu", "dora-gpu")
    for prompt in PROMPTS:
        ours = engine.generate("default", GenerateInput(adapter_id="dora-gpu", prompt=prompt, max_new_tokens=N,
                                                        return_logprobs=True), 120)
        tokens, first_logprob = peft_reference(assets, "dora-gpu", prompt)
        assert ours["token_ids"][0] == tokens[0] and abs(ours["logprobs"][0] - first_logprob) < 0.1, prompt


@pytest.mark.parametrize("method, share", [("int8", 0.8), ("bnb-8bit", 0.8), ("bnb-4bit", 0.5)])
def test_a_quantized_base_on_cuda_serves_adapters(assets, method, share):
    """torchao int8 and bitsandbytes 8/4-bit on CUDA: first tokens against bf16 peft on the
    full-precision base (4-bit changes more of them on these flat-logit random models)."""
    settings = assets.settings(device="cuda", dtype="bfloat16", quantization=method)
    base = load_base_model(settings)
    eng = Engine(settings, base).start()
    try:
        for name in ADAPTERS:
            eng.load_adapter("default", name, name)
        first = sum(
            eng.generate("default", GenerateInput(adapter_id=a, prompt=p, max_new_tokens=4), 120)["token_ids"][0]
            == peft_reference(assets, a, p)[0][0]
            for a in ADAPTERS for p in PROMPTS
        )
        print(f"{method} on CUDA: {first}/{len(ADAPTERS) * len(PROMPTS)} first tokens equal bf16 peft; "
              f"model bytes {base.model_bytes}")
        assert first >= share * len(ADAPTERS) * len(PROMPTS)
    finally:
        eng.stop()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_split_over_two_gpus_serves_adapters(assets):
    settings = assets.settings(device="cuda", dtype="bfloat16", device_map="balanced")
    base = load_base_model(settings)
    slots = [m for m in base.model.modules() if type(m).__name__ == "SlotLinear"]
    assert len({m._device for m in slots}) >= 2  # slot tensors follow their layers onto both GPUs
    eng = Engine(settings, base).start()
    try:
        for name in ADAPTERS:
            eng.load_adapter("default", name, name)
        for a in ADAPTERS:
            got = eng.generate("default", GenerateInput(adapter_id=a, prompt=PROMPTS[0], max_new_tokens=4), 120)
            assert got["token_ids"][0] == peft_reference(assets, a, PROMPTS[0])[0][0], a
    finally:
        eng.stop()


@pytest.mark.parametrize("kv_cache", ["static", "dynamic"])
def test_compiled_decode_on_cuda_tracks_the_eager_server_and_never_recompiles(assets, engine, kv_cache):
    """--compile on CUDA in bf16 (with both KV caches): the same first tokens as the eager
    server, and no recompilation across adapters, evictions and compositions."""
    import concurrent.futures as cf

    settings = assets.settings(device="cuda", dtype="bfloat16", adapter_slots=2, compile=True, kv_cache=kv_cache,
                               kv_cache_tokens=256)
    eng = Engine(settings, load_base_model(settings)).start()
    before = torch._dynamo.config.error_on_recompile  # a process-wide setting: put back for the next case
    try:
        eng.call_on_engine(lambda: setattr(torch._dynamo.config, "error_on_recompile", True)).result(60)
        for name in ADAPTERS:
            eng.load_adapter("default", name, name)
        jobs = [(a, p) for a in ["", *ADAPTERS] for p in PROMPTS]
        with cf.ThreadPoolExecutor(len(jobs)) as pool:
            ours = list(pool.map(lambda j: eng.generate("default", GenerateInput(adapter_id=j[0], prompt=j[1],
                                                                                 max_new_tokens=N), 120)["token_ids"], jobs))
        eager = [engine.generate("default", GenerateInput(adapter_id=a, prompt=p, max_new_tokens=N), 120)["token_ids"]
                 for a, p in jobs]
        first = sum(o[0] == e[0] for o, e in zip(ours, eager))
        print(f"compile ({kv_cache} KV) on CUDA: {first}/{len(jobs)} first tokens equal the eager server's; "
              f"{eng.compiled_decode.graphs_compiled} graphs, warm-up {eng.compiled_decode.warm_seconds:.1f} s")
        assert first == len(jobs) and eng.compiled_decode.graphs_compiled == 2
    finally:
        torch._dynamo.config.error_on_recompile = before
        torch._dynamo.reset()  # the next case compiles its own model's step from nothing
        eng.stop()
