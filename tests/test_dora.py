"""DoRA adapters in the batched path: the magnitude per output feature, with its norm over
W + scale B A computed at load; greedy tokens equal to peft's, alone and in batches mixed
with plain LoRA adapters and the base; merges equal to peft's merge_and_unload; and what is
refused."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch

import loramux.client as lc
from conftest import PROMPTS, merged_path
from loramux.demo.assets import make_adapter
from loramux.server.app import BackgroundServer

N = 10
DORA = {
    "dora-qv": dict(r=8, alpha=16, target_modules=("q_proj", "v_proj"), seed=21),
    "dora-all": dict(r=4, alpha=8, use_rslora=True, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                      "up_proj", "down_proj"), seed=22, std=0.15),
}


@pytest.fixture(scope="module")
def dora(assets, tmp_path_factory):
    for name, kwargs in DORA.items():
        if not (assets.adapters / name).exists():
            make_adapter(assets.base, assets.adapters / name, use_dora=True, **kwargs)
    server = BackgroundServer(assets.settings(merge_root=tmp_path_factory.mktemp("dora-merged"), batch_window_ms=50))
    client = lc.Client(server.target, timeout=120)
    for name in [*DORA, "qv-r4", "mlp-r2"]:
        client.load_adapter(name, source=name)
    yield server, client
    client.close()
    server.stop()


def test_dora_adapters_generate_as_peft_alone_and_in_mixed_batches(assets, dora):
    server, client = dora
    for name in DORA:
        for prompt in PROMPTS:
            assert client.generate(prompt=prompt, adapter_id=name, max_new_tokens=N).token_ids == \
                assets.oracle(name, prompt, N), (name, prompt)
    # One batch: DoRA rows beside plain LoRA rows and base rows (the batch window gathers them).
    jobs = [(a, p) for a in [*DORA, "qv-r4", "mlp-r2", ""] for p in PROMPTS[:2]]
    got = {}
    barrier = threading.Barrier(len(jobs))

    def run(adapter, prompt):
        barrier.wait()
        got[(adapter, prompt)] = client.generate(prompt=prompt, adapter_id=adapter, max_new_tokens=N).token_ids

    steps = server.engine.stats().steps
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for (adapter, prompt), tokens in got.items():
        assert tokens == assets.oracle(adapter or None, prompt, N), (adapter, prompt)
    assert len(got) == len(jobs)
    # They shared decode steps (12 requests alone would take 12 x 9 steps).
    assert server.engine.stats().steps - steps <= 3 * N


def test_a_dora_merge_equals_peft_merge_and_unload(assets, dora):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    server, client = dora
    result = client.merge("dora-all", "dora-merged").result(timeout=120)
    got = load_file(merged_path(server, result) / "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(str(assets.base), dtype=torch.float32)
    want = PeftModel.from_pretrained(base, str(assets.adapters / "dora-all")).merge_and_unload().state_dict()
    for name, tensor in got.items():
        assert torch.allclose(tensor, want[name], rtol=1e-6, atol=1e-7), name
    assert result.merged_tensors == 2 * 7


def test_dora_files_that_do_not_add_up_are_refused(assets, dora, tmp_path):
    from safetensors.torch import load_file, save_file

    _, client = dora
    with pytest.raises(lc.InvalidArgument) as e:
        client.combine([("dora-qv", 0.5), ("qv-r4", 0.5)], "mix", method="cat")
    assert e.value.reason == "COMBINATION_INVALID"
    source = assets.adapters / "dora-qv"
    cases = {}
    tensors = load_file(str(source / "adapter_model.safetensors"))
    magnitude = next(k for k in tensors if "lora_magnitude_vector" in k)
    cases["dora-missing"] = ({k: v for k, v in tensors.items() if k != magnitude}, None, "ADAPTER_WEIGHTS_MISSING")
    cases["dora-wrong-shape"] = ({**tensors, magnitude: tensors[magnitude][:-1]}, None, "ADAPTER_INCOMPATIBLE")
    cases["dora-not-set"] = (tensors, {"use_dora": False}, "ADAPTER_CONFIG_INVALID")
    for name, (weights, config_change, reason) in cases.items():
        target = assets.adapters / name
        shutil.copytree(source, target, dirs_exist_ok=True)
        save_file(weights, str(target / "adapter_model.safetensors"))
        if config_change:
            config = json.loads((target / "adapter_config.json").read_text())
            config.update(config_change)
            (target / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(lc.LoramuxError) as e:
            client.load_adapter(name, source=name)
        assert e.value.reason == reason, name
    assert [a.adapter_id for a in client.list_adapters()] == sorted([*DORA, "qv-r4", "mlp-r2"])


def test_a_dora_adapter_evicted_to_host_and_placed_again_equals_peft(assets, dora):
    """One slot: each adapter evicts the one before to host memory; the DoRA adapter placed
    again from there keeps its scales per output row (they were once lost on the way back,
    serving it as a plain LoRA)."""
    from loramux.server.adapters.cache import Tier
    from loramux.server.model.base_model import load_base_model
    from loramux.server.engine.engine import Engine
    from loramux.server.engine.inputs import GenerateInput

    settings = assets.settings(adapter_slots=1)
    engine = Engine(settings, load_base_model(settings)).start()
    try:
        for name in ("dora-qv", "qv-r4"):
            engine.load_adapter("default", name, name)
        for name in ("dora-qv", "qv-r4", "dora-qv", "qv-r4", "dora-qv"):
            out = engine.generate("default", GenerateInput(adapter_id=name, prompt=PROMPTS[3], max_new_tokens=N), 60)
            assert out["token_ids"] == assets.oracle(name, PROMPTS[3], N), name
        assert engine.cache.tier(engine.registry.get("default", "qv-r4").uid) is Tier.HOST
    finally:
        engine.stop()
