"""Bases other than Llama, served at the default `--target-modules all-linear`: GPT-2 (its
projections are transformers' Conv1D, weights stored [in, out], adapters saved by peft with
fan_in_fan_out), GPT-NeoX (fused query_key_value, other Linear names) and Mistral with a
sliding window (contexts capped at the window). For each: the layers that get slots are
exactly peft's all-linear set, greedy tokens equal peft's in a mixed batch (a DoRA adapter
among them), merges equal peft's merge_and_unload, and the static cache and the compiled
step serve them."""

from __future__ import annotations

import re
import threading

import pytest
import torch

import loramux.client as lc
from conftest import PROMPTS, merged_path
from loramux.demo.assets import make_adapter
from loramux.server.app import BackgroundServer
from loramux.server.errors import InvalidSettings

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


def _mistral(tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                            max_position_embeddings=256, sliding_window=WINDOW, initializer_range=0.1,
                                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))


def _opt(tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    ffn_dim=128, max_position_embeddings=256, word_embed_proj_dim=64,
                                    init_std=0.1, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id))


def _falcon(tokenizer):
    from transformers import FalconConfig, FalconForCausalLM

    return FalconForCausalLM(FalconConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, initializer_range=0.1,
                                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))


def _bloom(tokenizer):
    from transformers import BloomConfig, BloomForCausalLM

    return BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=64, n_layer=2, n_head=4,
                                        initializer_range=0.1, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id))


def _gptneo(tokenizer):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    return GPTNeoForCausalLM(GPTNeoConfig(vocab_size=len(tokenizer), hidden_size=64, num_layers=2, num_heads=4,
                                          max_position_embeddings=256, attention_types=[[["global", "local"], 1]],
                                          window_size=WINDOW, initializer_range=0.1,
                                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))


WINDOW = 24  # Mistral's sliding window here: longer than every prompt plus N tokens, shorter than its 256 positions
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
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
    # learned positions, and a model that asks the cache for its length
    "opt": (_opt, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"], {
        "attn": dict(r=4, alpha=8, target_modules=("q_proj", "v_proj"), seed=61),
        "all": dict(r=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), seed=62, std=0.1),
        "dora": dict(r=4, alpha=8, target_modules=("out_proj", "fc2"), use_dora=True, seed=63, std=0.1),
    }),
    # its projections are FalconLinear, an nn.Linear subclass
    "falcon": (_falcon, ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                         "mlp.dense_4h_to_h"], {
        "attn": dict(r=4, alpha=8, target_modules=("query_key_value",), seed=71),
        "all": dict(r=8, alpha=16, target_modules=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
                    seed=72, std=0.1),
        "dora": dict(r=4, alpha=8, target_modules=("dense", "dense_h_to_4h"), use_dora=True, seed=73, std=0.1),
    }),
    # ALiBi (no position ids), and an output layer tied to the embeddings
    "bloom": (_bloom, ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                       "mlp.dense_4h_to_h"], {
        "attn": dict(r=4, alpha=8, target_modules=("query_key_value",), seed=81),
        "all": dict(r=8, alpha=16, target_modules=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
                    seed=82, std=0.1),
        "dora": dict(r=4, alpha=8, target_modules=("dense_4h_to_h",), use_dora=True, seed=83, std=0.1),
    }),
    # eager attention only: a 4D mask is added to its scores; a local (sliding) layer
    "gptneo": (_gptneo, ["attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj",
                         "attn.attention.out_proj", "mlp.c_fc", "mlp.c_proj"], {
        "attn": dict(r=4, alpha=8, target_modules=("q_proj", "v_proj"), seed=91),
        "all": dict(r=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"),
                    seed=92, std=0.1),
        "dora": dict(r=4, alpha=8, target_modules=("out_proj", "c_fc"), use_dora=True, seed=93, std=0.1),
    }),
    "mistral": (_mistral, [f"{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}" for p in PROJECTIONS], {
        "attn": dict(r=4, alpha=8, target_modules=("q_proj", "v_proj"), seed=51),
        "all": dict(r=8, alpha=16, target_modules=PROJECTIONS, seed=52, std=0.1),
        "dora": dict(r=4, alpha=8, target_modules=("k_proj", "down_proj"), use_dora=True, seed=53, std=0.1),
    }),
}


class Family:
    def __init__(self, assets, root, kind):
        build, self.blocks, adapters = MODELS[kind]
        torch.manual_seed(0)
        from transformers import AutoTokenizer

        self.base, self.adapters = root / kind, root / f"{kind}-adapters"
        build(assets.tokenizer).save_pretrained(str(self.base))
        assets.tokenizer.save_pretrained(str(self.base))
        # What the server reads back: transformers may pick the architecture's own tokenizer class.
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.base))
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

    def oracle(self, adapter, prompt, tokens=N):
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = self.peft(adapter).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
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
    assert {re.search(r"\.\d+\.(.+)$", n)[1] for n in layers} == set(family.blocks)
    assert len(layers) == 2 * len(family.blocks)
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
    got = load_file(merged_path(family.server, result) / "model.safetensors")
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
    """The static cache for each base; compiled too on GPT-2, where the graph traces the slot
    layers over Conv1D (a compile costs 15-50 s here; the Llama suite compiles the rest).
    Bloom builds ALiBi biases from a 2D mask, which the static cache's 4D mask is not: its
    start-up check refuses it, with the option named."""
    compiled = family.base.name == "gpt2"
    settings = assets.settings(model=str(family.base), adapter_roots=(family.adapters,), kv_cache="static",
                               compile=compiled)
    if family.base.name == "bloom":
        with pytest.raises(InvalidSettings) as e:
            BackgroundServer(settings)
        assert e.value.field == "kv_cache" and "serve it with the dynamic cache" in str(e.value)
        return
    with BackgroundServer(settings) as server, lc.Client(server.target, timeout=120) as client:
        for name in family.names:
            client.load_adapter(name, source=name)
        for adapter in [*family.names, ""]:
            assert client.generate(prompt=PROMPTS[3], adapter_id=adapter, max_new_tokens=N).token_ids == \
                family.oracle(adapter or None, PROMPTS[3]), adapter
        assert server.engine.kv_pool is not None
        assert server.engine.compiled_decode.graphs_compiled == 2 if compiled else server.engine.compiled_decode is None


@pytest.mark.parametrize("family", ["mistral"], indirect=True)
def test_a_sliding_window_caps_the_context_where_it_equals_full_attention(family):
    """Mistral's window of WINDOW tokens: the served context is the window (GetServerInfo), a
    request runs up to exactly the window with peft's tokens (peft keeps a real sliding cache),
    and a prompt that fills the window is refused."""
    prompt = PROMPTS[3]
    length = len(family.tokenizer(prompt)["input_ids"])
    with lc.Client(family.server.target, timeout=120) as client:
        assert client.server_info().max_sequence_length == WINDOW
        client.load_adapter("all", source="all")
        out = client.generate(prompt=prompt, adapter_id="all", max_new_tokens=100)
        assert out.token_ids == family.oracle("all", prompt, WINDOW - length) and out.finish_reason == "length"
        with pytest.raises(lc.InvalidArgument) as e:
            client.generate(prompt=" ".join([prompt] * 3), adapter_id="all", max_new_tokens=1)
        assert e.value.reason == "PROMPT_TOO_LONG"


@pytest.mark.parametrize("family", ["gptneo"], indirect=True)
def test_the_static_cache_refuses_a_model_whose_scores_it_would_change(family, monkeypatch):
    """The start-up check runs a decode step of rows of different lengths through the pool and
    through a DynamicCache. GPT-Neo's eager attention adds a 4D mask to its scores, so the pool
    hands it an additive one; handed the boolean form SDPA takes, it would attend to hidden
    positions (silently wrong tokens), and the check refuses to start."""
    from loramux.server.engine.kv_cache import StaticKvPool

    base = family.server.engine.base
    StaticKvPool(base.model, 2, 32, base.pad_token_id, base.device)  # the additive mask passes
    monkeypatch.setattr(StaticKvPool, "step_mask", lambda self, seen: seen.view(seen.shape[0], 1, 1, -1))
    with pytest.raises(InvalidSettings) as e:
        StaticKvPool(base.model, 2, 32, base.pad_token_id, base.device)
    assert e.value.field == "kv_cache" and "computes other scores than the dynamic cache" in str(e.value)


@pytest.mark.parametrize("family", ["gpt2"], indirect=True)
def test_a_conv1d_base_quantized_by_bitsandbytes_merges_from_its_transposed_files(assets, family, tmp_path):
    """bitsandbytes turns GPT-2's Conv1D layers into Linear8bitLt ([out, in]) while the files
    keep [in, out]: slots see Linears, merges still add (s B A)^T to the files' weights."""
    from safetensors.torch import load_file

    settings = assets.settings(model=str(family.base), adapter_roots=(family.adapters,), quantization="bnb-8bit",
                               merge_root=tmp_path / "merged")
    with BackgroundServer(settings) as server, lc.Client(server.target, timeout=120) as client:
        bank = server.engine.base.bank
        assert {type(layer.base_layer).__name__ for layer in bank.layers.values()} == {"Linear8bitLt"}
        assert bank.transposed() == frozenset() and bank.stored_transposed() == frozenset(bank.layers)
        client.load_adapter("all", source="all")
        result = client.merge("all", "merged-all").result(timeout=120)
    got = load_file(merged_path(server, result) / "model.safetensors")
    want = family.peft("all").merge_and_unload().state_dict()
    assert result.merged_tensors == 8 and all(torch.equal(tensor, want[name]) for name, tensor in got.items())


def test_the_attention_window_is_read_from_the_config_and_other_attention_is_refused():
    """Full attention: no cap; sliding layers: the smallest window; linear attention (Qwen3-Next's
    hybrid layers) or any other kind: refused before the model would be served."""
    from transformers import LlamaConfig, MistralConfig, Qwen3NextConfig

    from loramux.server.model.base_model import attention_window

    assert attention_window(LlamaConfig()) is None and attention_window(MistralConfig(sliding_window=WINDOW)) == WINDOW
    with pytest.raises(InvalidSettings) as e:
        attention_window(Qwen3NextConfig())
    assert e.value.field == "model" and "['linear_attention'] are not supported" in e.value.message
