"""Serve tiny random models of many transformers architectures and compare with peft.

For each architecture: a random two-layer model and a byte-level BPE tokenizer are built, a
peft LoRA adapter on `all-linear` (or on the attention projections for mixture-of-experts
bases, whose experts peft reaches only through `target_parameters`) gets random weights, and
a loramux server at default flags (plus `--kv-cache static`, and with `--compile` both
ways) generates greedily for four prompts at once. Every case must either give exactly
peft's tokens or be refused cleanly at start-up or load (an InvalidSettings, or a client
error with a reason); a different token, or an INTERNAL error, fails the sweep.

    make architectures                          # every architecture, eager and static
    .venv/bin/python scripts/architecture_sweep.py --compile opt mistral   # some, compiled too

The suite's `tests/test_architectures.py` is the small, asserted version of this sweep.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

import torch

PROMPTS = ["the quick brown", "lazy dog number 21, said", "fox", "over the lazy dog number 14 jumps the quick brown fox"]
TEXTS = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}, said Ada." for i in range(300)]
LLAMAISH = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                max_position_embeddings=256)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def architectures() -> dict:
    """name -> (config class name, config keywords, adapter targets: "all-linear" or names)."""
    return {
        "llama": ("LlamaConfig", LLAMAISH, "all-linear"),
        "mistral (sliding window 24)": ("MistralConfig", dict(LLAMAISH, sliding_window=24), "all-linear"),
        "qwen2": ("Qwen2Config", LLAMAISH, "all-linear"),
        "qwen3": ("Qwen3Config", dict(LLAMAISH, head_dim=16), "all-linear"),
        "phi3": ("Phi3Config", dict(LLAMAISH, pad_token_id=0, sliding_window=None), "all-linear"),
        "phi3 (sliding window 24)": ("Phi3Config", dict(LLAMAISH, pad_token_id=0, sliding_window=24), "all-linear"),
        "phi": ("PhiConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  max_position_embeddings=256), "all-linear"),
        "gemma": ("GemmaConfig", dict(LLAMAISH, head_dim=16), "all-linear"),
        "gemma2 (sliding window 24)": ("Gemma2Config", dict(LLAMAISH, head_dim=16, sliding_window=24), "all-linear"),
        "gemma3 (sliding window 24)": ("Gemma3TextConfig", dict(LLAMAISH, head_dim=16, sliding_window=24), "all-linear"),
        "olmo": ("OlmoConfig", LLAMAISH, "all-linear"),
        "olmo2": ("Olmo2Config", LLAMAISH, "all-linear"),
        "cohere": ("CohereConfig", LLAMAISH, "all-linear"),
        "granite": ("GraniteConfig", LLAMAISH, "all-linear"),
        "stablelm": ("StableLmConfig", LLAMAISH, "all-linear"),
        "starcoder2": ("Starcoder2Config", dict(LLAMAISH, sliding_window=None), "all-linear"),
        "mixtral (attention adapters)": ("MixtralConfig", dict(LLAMAISH, num_local_experts=4, num_experts_per_tok=2,
                                                               sliding_window=None), ATTENTION),
        "qwen3-moe (attention adapters)": ("Qwen3MoeConfig", dict(LLAMAISH, head_dim=16, num_experts=4,
                                                                  num_experts_per_tok=2, moe_intermediate_size=32),
                                           ATTENTION),
        "gpt2 (Conv1D)": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256), "all-linear"),
        "gpt-bigcode": ("GPTBigCodeConfig", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256), "all-linear"),
        "gpt-neox": ("GPTNeoXConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128, max_position_embeddings=256), "all-linear"),
        "gpt-neo (local window 24)": ("GPTNeoConfig", dict(hidden_size=64, num_layers=2, num_heads=4,
                                                           max_position_embeddings=256, window_size=24,
                                                           attention_types=[[["global", "local"], 1]]), "all-linear"),
        "gpt-j": ("GPTJConfig", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, rotary_dim=8), "all-linear"),
        "codegen": ("CodeGenConfig", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, rotary_dim=8), "all-linear"),
        "opt": ("OPTConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                  max_position_embeddings=256, word_embed_proj_dim=64), "all-linear"),
        "falcon": ("FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4), "all-linear"),
        "bloom": ("BloomConfig", dict(hidden_size=64, n_layer=2, n_head=4), "all-linear"),
    }


def build(name: str, root: Path, tokenizer) -> tuple[Path, Path]:
    """A random model of the architecture and a peft adapter with random weights on it."""
    import transformers
    from peft import LoraConfig, get_peft_model

    config_class, keywords, targets = architectures()[name]
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                 eos_token_id=tokenizer.eos_token_id, initializer_range=0.1, **keywords)
    torch.manual_seed(0)
    base_dir, adapter_dir = root / "base", root / "adapters" / "x"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(base_dir))
    tokenizer.save_pretrained(str(base_dir))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_" in parameter_name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model.save_pretrained(str(adapter_dir))
    return base_dir, adapter_dir


def peft_tokens(base_dir: Path, adapter_dir: Path, tokens: int) -> dict[str, list[int]]:
    """peft's greedy tokens per prompt, with the tokenizer the server will load (AutoTokenizer
    may pick the architecture's own tokenizer class)."""
    import transformers
    from peft import PeftModel

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base_dir))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    out = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
        out[prompt] = generated[0, ids.shape[1]:].tolist()
    return out


def serve(base_dir: Path, adapter_dir: Path, options: dict, tokens: int, want: dict) -> tuple[str, bool]:
    """(what happened, whether that is acceptable) for one server configuration."""
    import loramux.client as lc
    from loramux.server.app import BackgroundServer
    from loramux.server.errors import InvalidSettings
    from loramux.server.settings import Settings

    settings = Settings(model=str(base_dir), adapter_roots=(adapter_dir.parent,), auth="none", port=0,
                        batch_window_ms=50, **options)
    try:
        server = BackgroundServer(settings)
    except InvalidSettings as e:
        return f"refused at start-up ({e.field}: {e.message[:90]})", True
    try:
        with lc.Client(server.target, timeout=300) as client:
            try:
                client.load_adapter("x", source="x")
            except lc.LoramuxError as e:
                return f"adapter refused ({e.reason})", e.reason != "INTERNAL"
            got: dict[str, object] = {}

            def run(prompt):
                try:
                    got[prompt] = client.generate(prompt=prompt, adapter_id="x", max_new_tokens=tokens).token_ids
                except lc.LoramuxError as e:
                    got[prompt] = e.reason

            threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
        if got == want:
            return f"equal to peft ({len(server.engine.base.bank.layers)} slot layers)", True
        return f"DIFFERENT: {got} against peft's {want}", False
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    from loramux.demo.assets import build_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="architectures to run (default: all); a prefix of the name is enough")
    parser.add_argument("--compile", action="store_true", help="also serve each with --compile (slow: a compile each)")
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args(argv)
    names = [n for n in architectures() if not args.names or any(n.startswith(p) for p in args.names)]
    configurations = [{}, {"kv_cache": "static"}]
    if args.compile:
        configurations += [{"compile": True}, {"kv_cache": "static", "compile": True}]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = build_tokenizer(root / "tokenizer", TEXTS, vocab_size=400)
        print(f"| architecture | {' | '.join(str(c or 'defaults') for c in configurations)} |")
        print(f"|---|{'---|' * len(configurations)}")
        for name in names:
            try:
                base_dir, adapter_dir = build(name, root / name.split()[0], tokenizer)
                want = peft_tokens(base_dir, adapter_dir, args.tokens)
            except Exception as e:  # this transformers or peft cannot build it: not loramux's outcome
                print(f"| {name} | could not be built here ({type(e).__name__}: {str(e)[:80]}) |" + " |" * (len(configurations) - 1))
                continue
            cells = []
            for options in configurations:
                outcome, fine = serve(base_dir, adapter_dir, options, args.tokens, want)
                failures += not fine
                cells.append(outcome if fine else f"**{outcome}**")
            print(f"| {name} | {' | '.join(cells)} |", flush=True)
            # torch.compile caches graphs per function for the process, with a recompile limit: a
            # server compiles one model, this sweep one after another; each starts from none.
            torch._dynamo.reset()
    print(f"\n{failures} unacceptable outcome(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
