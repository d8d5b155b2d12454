"""A random Llama big enough that matrix work dominates on CPU, and real peft adapters for it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from loramux.bench.config import BenchConfig
from loramux.bench.workload import adapter_names
from loramux.demo import corpus
from loramux.demo.assets import build_model, build_tokenizer


def build(cfg: BenchConfig, root: Path) -> tuple[Path, Path]:
    """Writes the model (with a tokenizer) and cfg.adapters peft adapters; returns (model_dir, adapters_dir)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir, adapters_dir = root / "model", root / "adapters"
    tokenizer = build_tokenizer(root / "tokenizer", corpus.plain(300), max_length=4096)
    model = build_model(
        model_dir, tokenizer, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.kv_heads,
        intermediate=cfg.intermediate, max_positions=4096, seed=cfg.seed, init_std=0.02,
    )
    # EOS gets a zero logit, below the maximum of the others: every system then generates exactly
    # the requested number of tokens, so all of them do the same work.
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    model.save_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, target_modules=list(cfg.target_modules), lora_dropout=0.0)
    peft_model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for name in adapter_names(cfg):
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_A" in pname or "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        peft_model.save_pretrained(str(adapters_dir / name))
    return model_dir, adapters_dir


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A random Llama of the merge and quantization benchmarks, saved in shards of at most
    `shard` (transformers' max_shard_size) when given."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int = 8
    kv_heads: int = 2
    shard: str | None = None
    max_positions: int = 256

    def build(self, directory: Path, tokenizer) -> Path:
        build_model(directory, tokenizer, hidden=self.hidden, layers=self.layers, heads=self.heads,
                    kv_heads=self.kv_heads, intermediate=self.intermediate, init_std=0.02, max_shard_size=self.shard,
                    max_positions=self.max_positions)
        return directory


MIXED_RANKS = (8, 16, 8, 16)  # the model-shape benchmarks' adapters, on all seven projections
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def text_workload(work: Path, requests: int, probes: int) -> tuple[object, list[str], list[str]]:
    """The model-shape benchmarks' tokenizer, request prompts (`requests` of them, 20-59
    characters) and fixed probe prompts."""
    texts = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(300)]
    tokenizer = build_tokenizer(work / "tok", texts, vocab_size=512)
    prompts = [texts[i % len(texts)][: 20 + (i * 7) % 40] for i in range(requests)]
    return tokenizer, prompts, [f"the lazy dog number {i} jumps" for i in range(probes)]


def code_tokenizer(directory: Path, vocab_size: int = 32_000):
    """A byte-level BPE tokenizer of `vocab_size` tokens trained on this Python's standard
    library sources (about 40 MB; seconds): a vocabulary of a real model's size, for costs
    that grow with it (structured output's masks)."""
    import sysconfig

    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if size > 40_000_000:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        size += len(text)
    return build_tokenizer(directory, texts, vocab_size=vocab_size, max_length=4096)


def build_with_adapters(case: ModelShape, tokenizer, work: Path) -> tuple[Path, list[str]]:
    """`case` built under `work`, with one adapter per MIXED_RANKS under work/adapters; returns
    the model's directory and the adapters' names (their sources too)."""
    from loramux.demo.assets import make_adapter

    base = case.build(work / case.name, tokenizer)
    names = []
    for i, rank in enumerate(MIXED_RANKS):
        make_adapter(base, work / "adapters" / f"{case.name}-a{i}", r=rank, alpha=2 * rank,
                     target_modules=ALL_PROJECTIONS, std=0.02, seed=i)
        names.append(f"{case.name}-a{i}")
    return base, names
