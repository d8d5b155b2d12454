"""The decode step where compute vanishes: what loramux adds to a step that is all overhead.

On a GPU the decode step of a real model is launch- and Python-bound (docs/benchmarks.md, "On
a GPU"); on the CPU, a model of tiny widths and many layers (hidden 64 x 32 layers by default)
is the same: its arithmetic costs next to nothing, so what a step costs is its operator calls
and Python. Measured side by side, on one thread, interleaved, on the same weights:

- `plain`: transformers' own model (no slot layers), the engine's KV cache;
- `base`: loramux's model with no adapter in the batch;
- `mixed`: every row with its own rank-`rank` adapter on all seven projections;
- `shared`: every row with the same adapter (what `mixed` costs beyond one adapter);

(each LoRA kind measured while its composition lasts, as between rows joining and leaving),
and, for each, the operators a step launches (torch.profiler, leaf aten operators that compute:
views and allocations left out), which on a GPU are its kernel launches. The targets (issue
22): base within 3% of plain; mixed within 1.3x base; LoRA adding a fixed few operators per
targeted layer, whatever the number of distinct adapters.

    python -m loramux.bench.step_floor --out bench-results   [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from loramux.server.lora.weights import AdapterWeights, ModuleLora

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Operators that launch no kernel: views, metadata and allocation.
NO_KERNEL = frozenset({
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::slice", "aten::select",
    "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::transpose", "aten::t", "aten::permute",
    "aten::alias", "aten::detach", "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::resize_",
    "aten::split", "aten::unbind", "aten::narrow", "aten::chunk", "aten::lift_fresh", "aten::_unsafe_view",
    "aten::view_as", "aten::expand_as", "aten::split_with_sizes", "aten::unflatten", "aten::flatten",
    "aten::contiguous", "aten::to", "aten::_to_copy", "aten::type_as", "aten::result_type", "aten::is_nonzero",
    "aten::item", "aten::_local_scalar_dense", "aten::size", "aten::stride", "aten::dim", "aten::movedim",
    "aten::numpy_T", "aten::matrix_H", "aten::mT", "aten::lift", "aten::_nested_tensor_from_mask",
    "aten::resolve_conj", "aten::resolve_neg",
})


@dataclasses.dataclass(frozen=True)
class StepFloorConfig:
    hidden: int = 64
    intermediate: int = 172
    heads: int = 4
    kv_heads: int = 4
    layers: int = 32
    vocab: int = 512
    rows: int = 16
    rank: int = 16
    kv: int = 64  # tokens already in the cache
    reps: int = 40  # steps per round and kind
    rounds: int = 3  # the kinds are interleaved step by step; rounds give the spread
    dtype: str = "float32"
    device: str = "cpu"

    @classmethod
    def quick(cls) -> StepFloorConfig:
        return cls(layers=8, reps=15, rounds=2)


def build(cfg: StepFloorConfig, root: Path, save_dtype: torch.dtype = torch.float32, device: str = "cpu") -> Path:
    """A random Llama of the configured widths, saved with a tokenizer in `save_dtype`
    (initialised on `device` in that dtype: a large one never needs a float32 copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loramux.demo import corpus
    from loramux.demo.assets import build_tokenizer

    tok = build_tokenizer(root / "tokenizer", corpus.plain(200), vocab_size=cfg.vocab, max_length=1024)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    out = root / "model"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(save_dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(str(out))
    del model
    tok.save_pretrained(str(out))
    return out


def random_adapter(bank, rank: int, seed: int) -> AdapterWeights:
    gen = torch.Generator().manual_seed(seed)
    return AdapterWeights({
        name: ModuleLora(a=torch.randn(rank, layer.in_features, generator=gen) * 0.02,
                         b=torch.randn(layer.out_features, rank, generator=gen) * 0.02, scale=2.0)
        for name, layer in bank.layers.items() if name.rsplit(".", 1)[-1] in ALL
    })


def kernels(fn) -> dict[str, int]:
    """Operators `fn` launches that compute (on a GPU, its kernel launches), by name: the aten
    operators with no aten operator under them, views and allocations left out."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: dict[str, int] = {}
    for event in prof.events():
        if not event.name.startswith("aten::") or event.name in NO_KERNEL:
            continue
        if any(child.name.startswith("aten::") and child.name not in NO_KERNEL for child in event.cpu_children):
            continue
        counts[event.name] = counts.get(event.name, 0) + 1
    return counts


class StepHarness:
    """One decode step of `rows` rows over a `kv`-token cache, repeatable: the cache is put
    back before each step."""

    def __init__(self, model, cfg: StepFloorConfig, device: torch.device):
        from loramux.server.engine.kv_cache import new_dynamic_cache

        gen = torch.Generator().manual_seed(1)
        vocab = model.config.vocab_size
        ids = torch.randint(3, vocab, (cfg.rows, cfg.kv), generator=gen).to(device)
        self.model = model
        self.cache = new_dynamic_cache(model.config)
        with torch.inference_mode():
            model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.saved = [(layer.keys, layer.values) for layer in self.cache.layers]
        self.token = ids[:, -1:]
        self.mask = torch.ones(cfg.rows, cfg.kv + 1, dtype=torch.long, device=device)
        self.positions = torch.full((cfg.rows, 1), cfg.kv, device=device)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        for layer, (k, v) in zip(self.cache.layers, self.saved):
            layer.keys, layer.values = k, v
        return self.model(input_ids=self.token, attention_mask=self.mask, position_ids=self.positions,
                          cache=self.cache, use_cache=True, logits_to_keep=1).logits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg: StepFloorConfig, model_dir: Path) -> dict:
    """Every kind's step time (median per round, in ms) and its operators; run it on a thread
    of its own (`cpu_threads.in_own_thread`), as the engine runs steps."""
    from transformers import AutoModelForCausalLM

    from loramux.server.model.base_model import load_base_model
    from loramux.server.settings import Settings

    settings = Settings(model=str(model_dir), device=cfg.device, dtype=cfg.dtype, adapter_slots=cfg.rows,
                        max_lora_rank=cfg.rank, auth="none")
    base = load_base_model(settings)
    device = base.device
    plain_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=base.dtype).to(device).eval()
    plain = StepHarness(plain_model, cfg, device)
    ours = StepHarness(base.model, cfg, device)
    bank = base.bank
    uids = list(range(cfg.rows))
    for uid in uids:
        bank.place(uid, random_adapter(bank, cfg.rank, seed=uid))
    plans = {"base": None, "mixed": bank.plan(uids, device), "shared": bank.plan([0] * cfg.rows, device)}

    def run(kind: str):
        if kind == "plain":
            return plain.step()
        bank.route(plans[kind], 1)
        try:
            return ours.step()
        finally:
            bank.route(None)

    kinds = ("plain", "base", "mixed", "shared")
    ops = {}
    for kind in kinds:  # warm-up (the decode buffer filled), then its operators
        for _ in range(3):
            run(kind)
        ops[kind] = kernels(lambda: run(kind))
    rounds: dict[str, list[float]] = {kind: [] for kind in kinds}
    for r in range(cfg.rounds):
        # One LoRA kind at a time (a composition lasts while its rows run), interleaved
        # step by step with plain and base.
        for lora in ("mixed", "shared"):
            group = ("plain", "base", lora) if r % 2 == 0 else (lora, "base", "plain")
            for _ in range(3):
                run(lora)
            times: dict[str, list[float]] = {kind: [] for kind in group}
            for _ in range(cfg.reps):
                for kind in group:
                    _sync(device)
                    t0 = time.perf_counter()
                    run(kind)
                    _sync(device)
                    times[kind].append(time.perf_counter() - t0)
            for kind in group:
                rounds[kind].append(statistics.median(times[kind]) * 1000)
    lora_layers = sum(1 for name in bank.layers if name.rsplit(".", 1)[-1] in ALL)
    total = {kind: sum(counts.values()) for kind, counts in ops.items()}
    ms = {kind: round(statistics.median(values), 3) for kind, values in rounds.items()}
    spread = {kind: [round(min(values), 3), round(max(values), 3)] for kind, values in rounds.items()}
    return {
        "config": dataclasses.asdict(cfg),
        "torch_threads": torch.get_num_threads(),
        "step_ms": ms,
        "step_ms_spread": spread,
        "base_over_plain_throughput": round(ms["plain"] / ms["base"], 3),
        "mixed_over_base": round(ms["mixed"] / ms["base"], 3),
        "shared_over_base": round(ms["shared"] / ms["base"], 3),
        "operators": total,
        "lora_layers": lora_layers,
        "lora_operators_per_layer": {kind: round((total[kind] - total["base"]) / lora_layers, 2)
                                     for kind in ("mixed", "shared")},
        "operators_by_name": {kind: dict(sorted(counts.items())) for kind, counts in ops.items()},
    }


def markdown(result: dict) -> str:
    cfg = result["config"]
    ms, spread = result["step_ms"], result["step_ms_spread"]
    lines = [
        f"Decode step, hidden {cfg['hidden']} x {cfg['layers']} layers, {cfg['rows']} rows, KV {cfg['kv']}, "
        f"{cfg['dtype']} on {cfg['device']} ({result['torch_threads']} torch threads); medians of {cfg['reps']} steps "
        f"per round, {cfg['rounds']} rounds (spread: min-max of the rounds' medians)",
        "",
        "| step | ms | spread | operators |",
        "|---|---|---|---|",
    ]
    for kind in ms:
        lines.append(f"| {kind} | {ms[kind]} | {spread[kind][0]}-{spread[kind][1]} | {result['operators'][kind]} |")
    lines += [
        "",
        f"- base / plain throughput: {result['base_over_plain_throughput']} (target >= 0.97)",
        f"- mixed ({cfg['rows']} distinct adapters) / base: {result['mixed_over_base']} (target <= 1.3); "
        f"shared (one adapter) / base: {result['shared_over_base']}",
        f"- LoRA operators per targeted layer: mixed {result['lora_operators_per_layer']['mixed']}, "
        f"shared {result['lora_operators_per_layer']['shared']} ({result['lora_layers']} layers)",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from loramux.server.cpu_threads import in_own_thread

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--rows", type=int)
    args = p.parse_args(argv)
    cfg = StepFloorConfig.quick() if args.quick else StepFloorConfig()
    overrides = {k: v for k, v in (("hidden", args.hidden), ("layers", args.layers), ("rows", args.rows)) if v}
    cfg = dataclasses.replace(cfg, device=args.device, dtype=args.dtype, **overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build(cfg, Path(tmp))
        result = in_own_thread(measure, cfg, model_dir, name="loramux-bench")
    (args.out / "step_floor.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "step_floor.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
