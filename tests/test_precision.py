"""16-bit serving stays as close to the float32 model as peft does.

peft upcasts a 16-bit model's adapters to float32 and adds their output to the base layer's in
float32, rounding once; loramux's LoRA path does the same by default (Settings.lora_dtype).
Measured against the float32 peft oracle over the suite's adapters and prompts, one request at
a time as peft runs them: loramux in bfloat16 and float16 agrees with it at least as well as
peft in the same dtype. (In 16 bits, a row's rounding also depends on the batch it runs in:
padding and GEMM shapes change the order of sums. That is measured in docs/benchmarks.md.)
"""

import concurrent.futures as cf
import os
import statistics

import pytest
import torch

from conftest import ADAPTERS, PROMPTS, TEXTS
from loramux.server.engine.engine import Engine
from loramux.server.engine.inputs import GenerateInput
from loramux.server.model.base_model import load_base_model

N = 12
# The suite's prompts and cuts of the training sentences: 80 adapter cases per dtype.
CASES = PROMPTS + [t[: int(len(t) * f)] for t, f in zip(TEXTS[5:300:25], [0.3, 0.5, 0.7] * 10)]
JOBS = [(a, p) for a in ADAPTERS for p in CASES]


def prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(outputs: dict, oracle: dict) -> tuple[float, int]:
    """Mean share of the oracle's tokens matched before the first difference, and exact cases."""
    shares = [prefix(outputs[k], oracle[k]) / len(oracle[k]) for k in oracle]
    return statistics.mean(shares), sum(outputs[k] == oracle[k] for k in oracle)


def peft_outputs(assets, dtype: torch.dtype) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = {}
    for adapter in ADAPTERS:
        model = AutoModelForCausalLM.from_pretrained(str(assets.base), dtype=dtype).eval()
        model = PeftModel.from_pretrained(model, str(assets.adapters / adapter)).eval()
        for prompt in CASES:
            ids = assets.tokenizer(prompt, return_tensors="pt")["input_ids"]
            with torch.inference_mode():
                tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False,
                                        pad_token_id=assets.tokenizer.pad_token_id)
            out[(adapter, prompt)] = tokens[0, ids.shape[1]:].tolist()
    return out


def loramux_outputs(assets, dtype: str, concurrency: int = 1, **overrides) -> tuple[dict, Engine]:
    settings = assets.settings(device="cpu", dtype=dtype, adapter_slots=len(ADAPTERS), max_batch_size=16, **overrides)
    engine = Engine(settings, load_base_model(settings)).start()
    try:
        for name in ADAPTERS:
            engine.load_adapter("default", name, name)
        with cf.ThreadPoolExecutor(concurrency) as pool:
            futures = {job: pool.submit(engine.generate, "default",
                                        GenerateInput(adapter_id=job[0], prompt=job[1], max_new_tokens=N), 120)
                       for job in JOBS}
            return {job: f.result()["token_ids"] for job, f in futures.items()}, engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def oracle(assets):
    return peft_outputs(assets, torch.float32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_is_as_close_to_float32_as_peft(assets, oracle, dtype):
    theirs = agreement(peft_outputs(assets, getattr(torch, dtype)), oracle)
    ours, engine = loramux_outputs(assets, dtype)
    mine = agreement(ours, oracle)
    assert mine[0] >= theirs[0] and mine[1] >= theirs[1], (dtype, "loramux", mine, "peft", theirs)
    assert engine.base.lora_dtype is torch.float32
    assert {layer.element_size for layer in engine.base.bank.layers.values()} == {4}


def test_serving_lora_dtype_holds_adapters_at_half_the_bytes(assets):
    half = load_base_model(assets.settings(device="cpu", dtype="bfloat16", lora_dtype="serving"))
    full = load_base_model(assets.settings(device="cpu", dtype="bfloat16"))
    assert half.lora_dtype is torch.bfloat16 and full.lora_dtype is torch.float32
    assert 2 * half.bank.bytes_at_rank(8) == full.bank.bytes_at_rank(8)
    view = half.view(assets.settings(dtype="bfloat16", lora_dtype="serving"))
    assert view.lora_dtype is torch.bfloat16


@pytest.mark.skipif(not os.environ.get("LORAMUX_PRECISION_REPORT"), reason="a measurement: LORAMUX_PRECISION_REPORT=1")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_report_agreement(assets, oracle, dtype):
    """Prints the agreement table of docs/benchmarks.md (not an assertion)."""
    rows = {"peft": agreement(peft_outputs(assets, getattr(torch, dtype)), oracle)}
    for lora_dtype in ("float32", "serving"):
        for concurrency in (1, 16):
            outputs, _ = loramux_outputs(assets, dtype, concurrency, lora_dtype=lora_dtype)
            rows[f"loramux lora_dtype={lora_dtype} concurrency={concurrency}"] = agreement(outputs, oracle)
    for name, (mean, exact) in rows.items():
        print(f"{dtype} | {name} | {mean:.3f} | {exact}/{len(oracle)}")
