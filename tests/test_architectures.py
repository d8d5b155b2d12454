"""Bases other than Llama, served at the default `--target-modules all-linear`: GPT-2 (its
projections are transformers' Conv1D, weights stored [in, out], adapters saved by peft with
fan_in_fan_out) and GPT-NeoX (fused query_key_value, other Linear names). For each: the
layers that get slots are exactly peft's all-linear set, greedy tokens equal peft's in a
mixed batch (a DoRA adapter among them), and merges equal peft's merge_and_unload."""

from __future__ import annotations

import threading

import pytest
import torch

import loramux.client as lc
from conftest import PROMPTS
from loramux.demo.assets import make_adapter
from loramux.server.app import BackgroundServer

N = 8


def _gpt2(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=4,
                                      initializer_range=0.1, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id))


def _neox(tokenizer):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=128, max_position_embeddings=256,
                                            initializer_range=0.1, bos_token_id=tokenizer.bos_token_id,
                                            eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False))


# model -> (builder, the all-linear modules per block, adapters: name -> make_adapter kwargs)
MODELS = {
    "gpt2": (_gpt2, ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], {
        "attn": dict(r=4, alpha=8, target_modules=("c_attn",), seed=31),
        "all": dict(r=8, alpha=16, target_modules=("c_attn", "c_proj", "c_fc"), seed=32, std=0.1),
        "dora": dict(r=4, alpha=8, target_modules=("c_attn", "c_fc"), use_dora=True, seed=33, std=0.1),
    }),
    "neox": (_neox, ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"], {
        "attn": dict(r=4, alpha=8, target_modules=("query_key_value",), seed=41),
        "all": dict(r=8, alpha=16, target_modules=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
                    seed=42, std=0.1),
        "dora": dict(r=4, alpha=8, target_modules=("query_key_value", "dense_4h_to_h"), use_dora=True, seed=43, std=0.1),
    }),
}


class Family:
    def __init__(self, assets, root, kind):
        build, self.blocks, adapters = MODELS[kind]
        torch.manual_seed(0)
        self.base, self.adapters, self.tokenizer = root / kind, root / f"{kind}-adapters", assets.tokenizer
        build(assets.tokenizer).save_pretrained(str(self.base))
        assets.tokenizer.save_pretrained(str(self.base))
        for name, kwargs in adapters.items():
            make_adapter(self.base, self.adapters / name, **kwargs)
        self.names = list(adapters)
        self.server = BackgroundServer(assets.settings(model=str(self.base), adapter_roots=(self.adapters,),
                                                       merge_root=root / f"{kind}-merged", batch_window_ms=50))

    def peft(self, adapter):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(self.base), dtype=torch.float32).eval()
        return PeftModel.from_pretrained(model, str(self.adapters / adapter)).eval() if adapter else model

    def oracle(self, adapter, prompt):
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = self.peft(adapter).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N,
                                              do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module", params=list(MODELS))
def family(assets, tmp_path_factory, request):
    family = Family(assets, tmp_path_factory.mktemp(request.param), request.param)
    yield family
    family.server.stop()


def test_all_linear_wraps_what_peft_would_and_the_output_layer_is_left_alone(family):
    from peft import LoraConfig, get_peft_model

    layers = set(family.server.engine.base.bank.layers)
    assert {n.split(".", 3)[3] for n in layers} == set(family.blocks) and len(layers) == 2 * len(family.blocks)
    model = get_peft_model(family.peft(None), LoraConfig(target_modules="all-linear", r=2))
    wrapped = {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in model.named_modules()
               if n.endswith(".lora_A")}
    assert wrapped == layers


def test_greedy_tokens_equal_peft_in_a_mixed_batch(family):
    jobs = [(a, p) for a in [*family.names, ""] for p in PROMPTS[:2]]
    got, barrier = {}, threading.Barrier(len(jobs))
    with lc.Client(family.server.target, timeout=120) as client:
        for name in family.names:
            client.load_adapter(name, source=name)

        def run(adapter, prompt):
            barrier.wait()
            got[(adapter, prompt)] = client.generate(prompt=prompt, adapter_id=adapter, max_new_tokens=N).token_ids

        threads = [threading.Thread(target=run, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    for adapter, prompt in jobs:
        assert got[(adapter, prompt)] == family.oracle(adapter or None, prompt), (adapter, prompt)
    assert family.server.engine.stats().steps > 0


@pytest.mark.parametrize("adapter", ["all", "dora"])
def test_merges_equal_peft_merge_and_unload(family, adapter):
    from safetensors.torch import load_file

    with lc.Client(family.server.target, timeout=120) as client:
        client.load_adapter(adapter, source=adapter)
        result = client.merge(adapter, f"merged-{adapter}").result(timeout=120)
    got = load_file(f"{result.output_path}/model.safetensors")
    want = family.peft(adapter).merge_and_unload().state_dict()
    assert result.merged_tensors == sum(1 for n in family.server.engine.base.bank.layers
                                        if any(n.endswith(f".{t}") for t in MODELS_TARGETS[family.base.name][adapter]))
    renamed = {"embed_out.weight": "lm_head.weight"}  # GPT-NeoX's files name its output layer as transformers 4 did
    assert {renamed.get(n, n) for n in got} | {"lm_head.weight"} == set(want) | {"lm_head.weight"}  # GPT-2's is tied
    for name, tensor in got.items():
        if adapter == "dora":  # norms in float32: within rounding
            assert torch.allclose(tensor, want[renamed.get(name, name)], rtol=1e-6, atol=1e-7), name
        else:  # float32: bit for bit
            assert torch.equal(tensor, want[renamed.get(name, name)]), name


MODELS_TARGETS = {kind: {name: kwargs["target_modules"] for name, kwargs in adapters.items()}
                  for kind, (_, _, adapters) in MODELS.items()}


def test_the_static_cache_and_the_compiled_step_serve_them_too(assets, family):
    """The compiled decode step traces the slot layers over Conv1D and the fused projections."""
    settings = assets.settings(model=str(family.base), adapter_roots=(family.adapters,), kv_cache="static", compile=True)
    with BackgroundServer(settings) as server, lc.Client(server.target, timeout=120) as client:
        for name in family.names:
            client.load_adapter(name, source=name)
        for adapter in [*family.names, ""]:
            assert client.generate(prompt=PROMPTS[3], adapter_id=adapter, max_new_tokens=N).token_ids == \
                family.oracle(adapter or None, PROMPTS[3]), adapter
        assert server.engine.compiled_decode.graphs_compiled == 2
