"""Greedy output equals peft's PeftModel.generate, token for token (fp32), also when one
batch mixes adapters and the base model, and with more adapters than slots."""

import concurrent.futures as cf

import pytest

from conftest import ADAPTERS, PROMPTS
from loramux.server.adapters.cache import Tier
from loramux.server.model.base_model import load_base_model
from loramux.server.engine.engine import Engine
from loramux.server.engine.inputs import GenerateInput
from loramux.server.engine.request import FinishReason
from loramux.server.errors import AdapterNotFound

N = 10


def run_all(engine, jobs, tenant="default"):
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [
            pool.submit(engine.generate, tenant, GenerateInput(adapter_id=a, prompt=p, max_new_tokens=N), 60) for a, p in jobs
        ]
        return [f.result() for f in futures]


@pytest.fixture(scope="module")
def engine(assets):
    # 2 slots for 5 adapters: batches are split, adapters are evicted and promoted again.
    settings = assets.settings(adapter_slots=2, max_batch_size=8, batch_window_ms=30, host_cache_mib=1)
    eng = Engine(settings, load_base_model(settings)).start()
    for name in ADAPTERS:
        eng.load_adapter("default", name, name)
    yield eng
    eng.stop()


def test_mixed_batches_equal_peft(assets, engine):
    jobs = [(a, p) for p in PROMPTS for a in ["", *ADAPTERS]]
    results = run_all(engine, jobs)
    for (adapter, prompt), result in zip(jobs, results):
        expected = assets.oracle(adapter or None, prompt, N)
        assert result["token_ids"] == expected, (adapter, prompt)
        reason = result["finish"].finish_reason
        assert reason is (FinishReason.STOP_TOKEN if expected[-1] == assets.tokenizer.eos_token_id else FinishReason.LENGTH)
    # Adapters really change the output (so equality above is not the base model's).
    base_out = {p: assets.oracle(None, p, N) for p in PROMPTS}
    for adapter in ADAPTERS:
        assert any(assets.oracle(adapter, p, N) != base_out[p] for p in PROMPTS), adapter


def test_eviction_and_reload_keep_outputs_equal(assets, engine):
    snap = engine.cache.snapshot()
    assert sum(s is not None for s in snap.slot_table) == 2
    order = list(ADAPTERS) * 2
    for adapter in order:
        result = engine.generate("default", GenerateInput(adapter_id=adapter, prompt=PROMPTS[0], max_new_tokens=N), 60)
        assert result["token_ids"] == assets.oracle(adapter, PROMPTS[0], N)
        assert engine.cache.tier(engine.registry.get("default", adapter).uid) is Tier.ACCELERATOR
    assert engine.registry.get("default", "qv-r4").use_count >= 2


def test_tenants_have_separate_namespaces(assets, engine):
    engine.load_adapter("tenant-b", "qv-r4", "mlp-r2")  # same id, another tenant, other weights
    a = engine.generate("default", GenerateInput(adapter_id="qv-r4", prompt=PROMPTS[1], max_new_tokens=N), 60)
    b = engine.generate("tenant-b", GenerateInput(adapter_id="qv-r4", prompt=PROMPTS[1], max_new_tokens=N), 60)
    assert a["token_ids"] == assets.oracle("qv-r4", PROMPTS[1], N)
    assert b["token_ids"] == assets.oracle("mlp-r2", PROMPTS[1], N)
    assert [r.adapter_id for r in engine.registry.list("tenant-b")] == ["qv-r4"]
    with pytest.raises(AdapterNotFound):
        engine.generate("tenant-c", GenerateInput(adapter_id="qv-r4", prompt="x"), 60)
    engine.unload_adapter("tenant-b", "qv-r4")


def test_sampling_is_repeatable_with_a_seed(engine):
    def sample(seed):
        inp = GenerateInput(prompt="the quick", max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=seed)
        return engine.generate("default", inp, 60)["token_ids"]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stop_sequences_and_stop_tokens(assets, engine):
    full = engine.generate("default", GenerateInput(prompt=PROMPTS[0], adapter_id="all-r16", max_new_tokens=N), 60)
    ids = full["token_ids"]
    stop_id = ids[3]
    first = ids.index(stop_id)
    stopped = engine.generate(
        "default", GenerateInput(prompt=PROMPTS[0], adapter_id="all-r16", max_new_tokens=N, stop_token_ids=[stop_id]), 60
    )
    assert stopped["token_ids"] == ids[: first + 1] and stopped["finish"].finish_reason is FinishReason.STOP_TOKEN
    text = full["text"]
    start = next(i for i in range(2, len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2].isprintable())
    needle = text[start : start + 2]
    cut = engine.generate("default", GenerateInput(prompt=PROMPTS[0], adapter_id="all-r16", max_new_tokens=N, stop=[needle]), 60)
    assert cut["text"] == text[: text.index(needle)] and cut["finish"].finish_reason is FinishReason.STOP_SEQUENCE


def test_repetition_penalty_in_mixed_batches_equals_transformers(assets, engine):
    """Greedy with a repetition penalty, rows with and without one joined into one batch: each
    equals transformers' generate with the same penalty (the seen-token mask follows joins and
    departures)."""
    import torch

    jobs = [(a, p, pen) for p, a, pen in zip(PROMPTS, ["", "qv-r4", "", "all-r16"], [1.5, 1.0, 0.7, 2.0])]
    jobs += [("mlp-r2", PROMPTS[0], 1.2), ("", PROMPTS[1], 1.0)]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [
            pool.submit(engine.generate, "default",
                        GenerateInput(adapter_id=a, prompt=p, max_new_tokens=N - i, repetition_penalty=pen), 60)
            for i, (a, p, pen) in enumerate(jobs)
        ]
        results = [f.result() for f in futures]
    for i, ((adapter, prompt, penalty), result) in enumerate(zip(jobs, results)):
        ids = assets.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = assets.peft_model(adapter or None).generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=N - i, do_sample=False, repetition_penalty=penalty
            )
        assert result["token_ids"] == out[0, ids.shape[1]:].tolist(), (adapter, penalty)


def test_residency_by_bytes_evicts_by_size_and_outputs_still_equal_peft(assets, base_model):
    """A budget that holds the rank-16 adapter and a little more, with slots to spare: adapters
    are evicted because of their bytes, not their count, and every output still equals peft's."""
    from loramux.server.errors import InvalidSettings

    largest = base_model.bank.max_adapter_bytes
    settings = assets.settings(adapter_slots=16, adapter_memory_mib=1.2 * largest / 2**20, max_batch_size=8,
                               batch_window_ms=30)
    eng = Engine(settings, load_base_model(settings)).start()
    try:
        for name in ADAPTERS:
            eng.load_adapter("default", name, name)
        jobs = [(a, p) for p in PROMPTS[:2] for a in ADAPTERS]
        for (adapter, prompt), result in zip(jobs, run_all(eng, jobs)):
            assert result["token_ids"] == assets.oracle(adapter, prompt, N), adapter
        assert eng.cache.audit() == []
        assert eng.cache.accelerator_bytes() <= eng.adapter_memory_bytes == int(1.2 * largest)
        assert len([u for u in eng.cache.snapshot().slot_table if u is not None]) < len(ADAPTERS)
    finally:
        eng.stop()
    with pytest.raises(InvalidSettings) as e:
        Engine(assets.settings(adapter_memory_mib=0.5 * largest / 2**20), base_model)
    assert e.value.field == "adapter_memory_mib"


def test_ignore_eos_generates_to_max_new_tokens(assets, engine):
    plain = engine.generate("default", GenerateInput(prompt=PROMPTS[1], max_new_tokens=N), 60)["token_ids"]
    assert len(plain) == N
    saved = engine.base.eos_token_ids
    engine.base.eos_token_ids = frozenset([plain[2]])  # as if the model's EOS were the third token it writes
    try:
        stopped = engine.generate("default", GenerateInput(prompt=PROMPTS[1], max_new_tokens=N), 60)
        assert stopped["token_ids"] == plain[: plain.index(plain[2]) + 1]
        assert stopped["finish"].finish_reason is FinishReason.STOP_TOKEN
        full = engine.generate("default", GenerateInput(prompt=PROMPTS[1], max_new_tokens=N, ignore_eos=True), 60)
        assert full["token_ids"] == plain and full["finish"].finish_reason is FinishReason.LENGTH
    finally:
        engine.base.eos_token_ids = saved


def test_a_config_naming_all_linear_targets_what_peft_expands_it_to(assets, engine):
    """peft saves all-linear expanded, but loads a config that still says it (hand-written, or
    from other tools) by expanding it then: every linear layer but the output one. Such an
    adapter serves as peft runs it, and combinations of it target all-linear too."""
    import json

    from loramux.server.merging.combine import combined_config

    path = assets.copy_adapter("all-r16", "all-linear-cfg")
    config = json.loads((path / "adapter_config.json").read_text())
    config["target_modules"] = "all-linear"
    (path / "adapter_config.json").write_text(json.dumps(config))
    assets.peft_model.cache_clear()
    assets.oracle.cache_clear()
    engine.load_adapter("default", "all-linear-cfg", "all-linear-cfg")
    try:
        out = engine.generate("default", GenerateInput(adapter_id="all-linear-cfg", prompt=PROMPTS[1], max_new_tokens=N), 60)
        assert out["token_ids"] == assets.oracle("all-linear-cfg", PROMPTS[1], N) == assets.oracle("all-r16", PROMPTS[1], N)
    finally:
        engine.unload_adapter("default", "all-linear-cfg")
    assert combined_config([config, {**config, "target_modules": ["q_proj"]}], "cat", None)["target_modules"] == "all-linear"
