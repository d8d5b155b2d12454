"""Build the demo's assets once: tokenizer, a small Llama trained on plain text, and two
LoRA adapters trained with peft on pirate and robot text. Cached in a directory; a
marker file records a complete build."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from loramux.demo import corpus
from loramux.demo.assets import build_model, build_tokenizer, train_causal_lm

MARKER = "demo-assets.json"
VERSION = 1
ADAPTERS = {"pirate": corpus.pirate, "robot": corpus.robot}


def build_demo_assets(root: Path, rebuild: bool = False, log=print) -> Path:
    """Returns `root`, holding base/ and adapters/<name>/."""
    marker = root / MARKER
    if not rebuild and marker.is_file() and json.loads(marker.read_text()).get("version") == VERSION:
        return root
    if root.exists():
        shutil.rmtree(root)
    started = time.monotonic()
    torch.manual_seed(0)
    texts = corpus.plain() + corpus.pirate() + corpus.robot()
    tokenizer = build_tokenizer(root / "base", texts, vocab_size=512)
    model = build_model(root / "base", tokenizer, hidden=96, layers=2, heads=4, kv_heads=2, intermediate=192, init_std=0.02)
    losses = train_causal_lm(model, tokenizer, corpus.plain(), steps=200, lr=3e-3, seq_len=48)
    model.save_pretrained(str(root / "base"))
    log(f"  base model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, loss {losses[0]:.2f} -> {losses[-1]:.2f}")
    for name, texts_of in ADAPTERS.items():
        _train_adapter(root, name, tokenizer, texts_of(), log)
    marker.write_text(json.dumps({"version": VERSION, "seconds": round(time.monotonic() - started, 1)}))
    return root


def _train_adapter(root: Path, name: str, tokenizer, texts: list[str], log) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(root / "base"), dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    model = get_peft_model(base, config)
    losses = train_causal_lm(model, tokenizer, texts, steps=200, lr=5e-3, seq_len=48, seed=len(name))
    model.save_pretrained(str(root / "adapters" / name))
    log(f"  adapter {name!r}: loss {losses[0]:.2f} -> {losses[-1]:.2f}")
