"""The decode step on a GPU, every way loramux can run it, beside its floors (issue 22).

One random Llama (hidden 4096, intermediate 11008, 32 heads, 4 layers, small vocabulary by
default), saved in bfloat16 and served as the server loads it (`load_base_model`, the default
`--lora-dtype float32`). Over a static KV pool of `--kv` tokens per row, for each row count:

- plain transformers (no slot layers): eager, and replayed as one CUDA graph (the floor a
  graph-captured engine can reach);
- loramux base-only: eager, and through GraphDecode (`--cuda-graphs`);
- loramux with every row its own rank-16 adapter on all seven projections: the torch kernel
  eager (the default), the Triton kernels eager (`--lora-kernel triton`; also with q/k/v and
  gate/up shrinking alone, what their shared launch saves), and the Triton kernels through
  GraphDecode;

medians over interleaved steps, the spread over rounds, CUDA kernels per step (torch.profiler),
and the bytes each step must read (weights; adapters once each) over the device's bandwidth.
The graph-replayed mixed step is checked against the eager one (largest logit difference).
Then a prefill (`--prefill-rows` prompts of `--prefill-tokens` tokens, what a time to first
token is made of): plain, base, and every row its own adapter through the torch kernel (one
pair of GEMMs per adapter per layer) and through the Triton kernels (tiles per row, q/k/v and
gate/up shrinks in one launch each), with its largest logit difference from the torch path.

    python scripts/gpu/step.py --out step.json                 # on the GPU
    TRITON_INTERPRET=1 python scripts/gpu/step.py --device cpu --hidden 64 --intermediate 172 \\
        --heads 4 --layers 2 --rows 4 --reps 3 --out /tmp/step.json   # a dry run of the eager parts here

Writes the JSON after every measurement, so a later failure keeps what came before.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "service"), str(ROOT / "client")]

from loramux.bench.step_floor import ALL, StepFloorConfig, build, random_adapter  # noqa: E402
from loramux.server.engine.graph_step import Capture, GraphDecode  # noqa: E402
from loramux.server.engine.kv_cache import RowCache, StaticKvPool, new_dynamic_cache  # noqa: E402

BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # bytes/s, the vendors' figures


def log(msg: str) -> None:
    print(f"[step {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Rows:
    """`rows` rows prefilled with `kv` random tokens in a static pool: a repeatable decode step
    (each step writes the same position again)."""

    def __init__(self, model, rows: int, kv: int, device, pad: int):
        self.pool = StaticKvPool(model, rows, kv + 8, pad, device)
        gen = torch.Generator().manual_seed(rows)
        ids = torch.randint(3, model.config.vocab_size, (rows, kv), generator=gen).to(device)
        prefill = new_dynamic_cache(model.config)
        with torch.inference_mode():
            model(input_ids=ids, cache=prefill, use_cache=True, logits_to_keep=1)
        self.pool.load(0, prefill, [kv] * rows)
        self.token = ids[:, -1:].contiguous()
        self.positions = torch.full((rows, 1), kv, dtype=torch.long, device=device)
        self.cache = RowCache(self.pool)
        self.cache.lengths = self.positions[:, 0]
        seen = torch.arange(kv + 1, device=device)[None, :] <= self.positions
        self.cache.mask = self.pool.step_mask(seen)

    def inputs(self) -> dict:
        return {"attention_mask": self.cache.mask, "cache": self.cache}

    def eager(self, model):
        return model(input_ids=self.token, position_ids=self.positions, use_cache=True, logits_to_keep=1,
                     **self.inputs()).logits


def graph_of(fn, device):
    """`fn` captured as one CUDA graph: returns replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def cuda_kernels(fn, device) -> int | None:
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def timed(kinds: dict, reps: int, rounds: int, device) -> dict:
    """Interleaved medians (ms) per round for every kind; the median of the rounds and their spread."""
    per_round = {k: [] for k in kinds}
    for r in range(rounds):
        times = {k: [] for k in kinds}
        order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
        for _ in range(reps):
            for kind in order:
                sync(device)
                t0 = time.perf_counter()
                kinds[kind]()
                sync(device)
                times[kind].append(time.perf_counter() - t0)
        for k in kinds:
            per_round[k].append(statistics.median(times[k]) * 1000)
    return {k: {"ms": round(statistics.median(v), 4), "spread": [round(min(v), 4), round(max(v), 4)]}
            for k, v in per_round.items()}


def alone(bank, fn):
    """`fn` with every layer shrinking on its own (q/k/v and gate/up not sharing a launch)."""
    def run():
        for group in bank.siblings:
            group.enabled = False
        try:
            return fn()
        finally:
            for group in bank.siblings:
                group.enabled = True
    return run


def set_kernel(bank, kernel: str) -> None:
    for layer in bank.layers.values():
        layer.kernel = kernel
        layer._view = None  # views are made for one kernel


@torch.inference_mode()
def measure(args, model_dir: Path, result: dict, write) -> None:
    from transformers import AutoModelForCausalLM

    from loramux.server.model.base_model import load_base_model
    from loramux.server.settings import Settings

    device = torch.device(args.device)
    slots = max(args.rows)
    base = load_base_model(Settings(model=str(model_dir), device=args.device, dtype=args.dtype, adapter_slots=slots,
                                    max_lora_rank=16, auth="none"))
    plain = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=base.dtype).to(device).eval()
    bank = base.bank
    for uid in range(slots):
        bank.place(uid, random_adapter(bank, 16, seed=uid))
    weights = sum(p.numel() * p.element_size() for n, p in plain.named_parameters() if "embed" not in n)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bandwidth = next((bw for key, bw in BANDWIDTH.items() if key in name), None)
    result.update(device_name=name, weight_bytes=weights, bandwidth_bytes_per_s=bandwidth,
                  lora_dtype=str(base.lora_dtype), dtype=str(base.dtype))
    for rows in args.rows:
        log(f"{rows} rows")
        cell: dict = {"rows": rows}
        result["cells"].append(cell)
        ours, theirs = Rows(base.model, rows, args.kv, device, base.pad_token_id), Rows(plain, rows, args.kv, device,
                                                                                        base.pad_token_id)
        plan = bank.plan(list(range(rows)), device)
        adapter_bytes = plan.adapter_bytes
        cell["bytes"] = {"base": weights, "adapters": adapter_bytes}
        if bandwidth:
            cell["floor_ms"] = {"base": round(weights / bandwidth * 1000, 4),
                                "mixed": round((weights + adapter_bytes) / bandwidth * 1000, 4)}

        def loramux_eager(p):
            def run():
                bank.route(p, 1)
                try:
                    return ours.eager(base.model)
                finally:
                    bank.route(None)
            return run

        # Groups timed one after another, each interleaved step by step (a layer keeps one
        # view per kernel, so the two kernels are not interleaved with each other).
        groups = {"torch": {"plain eager": lambda: theirs.eager(plain), "base eager": loramux_eager(None),
                            "mixed torch eager": loramux_eager(plan)}}
        if args.triton:
            groups["triton"] = {"plain eager": groups["torch"]["plain eager"], "base eager": loramux_eager(None),
                                "mixed triton eager": loramux_eager(plan),
                                "mixed triton eager, no shared shrinks": alone(bank, loramux_eager(plan))}
        if device.type == "cuda":
            graphs = GraphDecode(base, ours.pool, Capture.CUDA)
            groups["graphs"] = {"plain graph": graph_of(lambda: theirs.eager(plain), device),
                                "base graph": lambda: graphs(ours.token, ours.positions, ours.inputs(), None)}
            if args.triton:
                groups["graphs"]["mixed triton graph"] = lambda: graphs(ours.token, ours.positions, ours.inputs(), plan)
        cell["steps"], cell["kernels"] = {}, {}
        for kernel, kinds in groups.items():
            set_kernel(bank, "triton" if kernel != "torch" else "torch")
            for fn in kinds.values():  # warm-up: Triton compiles, graphs are captured, views are made
                for _ in range(3):
                    fn()
            sync(device)
            if kernel == "graphs" and "mixed triton graph" in kinds:
                want = loramux_eager(plan)().float()
                got = kinds["mixed triton graph"]().float()
                cell["graph_vs_eager_max_logit_diff"] = float((got - want).abs().max())
            cell["kernels"].update({kind: cuda_kernels(fn, device) for kind, fn in kinds.items()})
            for kind, value in timed(kinds, args.reps, args.rounds, device).items():
                cell["steps"][f"{kind} ({kernel} group)" if kind in cell["steps"] else kind] = value
            write()
        ms = {k: v["ms"] for k, v in cell["steps"].items()}
        ratios = {"base eager / plain eager": ms["base eager"] / ms["plain eager"],
                  "mixed torch eager / base eager": ms["mixed torch eager"] / ms["base eager"]}
        if "mixed triton eager" in ms:
            ratios["mixed triton eager / base eager"] = ms["mixed triton eager"] / ms["base eager"]
            ratios["shared shrinks / alone"] = ms["mixed triton eager"] / ms["mixed triton eager, no shared shrinks"]
        if "base graph" in ms:
            ratios["base graph / plain graph"] = ms["base graph"] / ms["plain graph"]
        if "mixed triton graph" in ms:
            ratios["mixed triton graph / base graph"] = ms["mixed triton graph"] / ms["base graph"]
        if bandwidth and "base graph" in ms:
            ratios["base graph / its floor"] = ms["base graph"] / cell["floor_ms"]["base"]
        cell["ratios"] = {k: round(v, 3) for k, v in ratios.items()}
        if "graphs" in groups:
            cell["graphs_captured"] = graphs.captured
        log(json.dumps({k: cell[k] for k in ("steps", "ratios")}))
        write()
        bank.route(None)
    measure_prefill(args, base, plain, device, result, write)


def measure_prefill(args, base, plain, device, result: dict, write) -> None:
    """A batch of prompts prefilled at once: plain, base, and mixed through each kernel."""
    bank, rows, tokens = base.bank, args.prefill_rows, args.prefill_tokens
    log(f"prefill: {rows} rows x {tokens} tokens")
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, plain.config.vocab_size, (rows, tokens), generator=gen).to(device)
    plan = bank.plan([uid % bank.num_slots for uid in range(rows)], device)
    cell: dict = {"rows": rows, "tokens": tokens, "steps": {}, "kernels": {}}
    result["prefill"] = cell

    def run(model, p=None):
        def go():
            bank.route(p, tokens)
            try:
                return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
            finally:
                bank.route(None)
        return go

    groups = {"torch": {"plain prefill": run(plain), "base prefill": run(base.model),
                        "mixed torch prefill": run(base.model, plan)}}
    if args.triton:
        groups["triton"] = {"base prefill": run(base.model), "mixed triton prefill": run(base.model, plan)}
    logits = {}
    for kernel, kinds in groups.items():
        set_kernel(bank, kernel)
        for fn in kinds.values():
            fn()
        sync(device)
        logits[kernel] = list(kinds.values())[-1]().float()
        cell["kernels"].update({kind: cuda_kernels(fn, device) for kind, fn in kinds.items()})
        for kind, value in timed(kinds, max(3, args.reps // 3), args.rounds, device).items():
            cell["steps"][f"{kind} ({kernel} group)" if kind in cell["steps"] else kind] = value
        write()
    set_kernel(bank, "torch")
    ms = {k: v["ms"] for k, v in cell["steps"].items()}
    cell["ratios"] = {"mixed torch / base": round(ms["mixed torch prefill"] / ms["base prefill"], 3),
                      "base / plain": round(ms["base prefill"] / ms["plain prefill"], 3)}
    if "triton" in logits:
        cell["ratios"]["mixed triton / base"] = round(ms["mixed triton prefill"] / ms["base prefill"], 3)
        cell["triton_vs_torch_max_logit_diff"] = float((logits["triton"] - logits["torch"]).abs().max())
    log(json.dumps({k: cell[k] for k in ("steps", "ratios")}))
    write()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--kv", type=int, default=64)
    p.add_argument("--rows", default="16,64")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prefill-rows", type=int, default=16)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--no-triton", dest="triton", action="store_false")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    args.rows = [int(r) for r in args.rows.split(",")]
    out = Path(args.out)
    result: dict = {"args": {k: v for k, v in vars(args).items()}, "cells": [], "errors": [], "torch": torch.__version__}

    def write() -> None:
        out.write_text(json.dumps(result, indent=2) + "\n")

    cfg = dataclasses.replace(StepFloorConfig(), hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                              kv_heads=args.heads, layers=args.layers, dtype=args.dtype)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model_dir = build(cfg, Path(tmp), save_dtype=getattr(torch, args.dtype), device=args.device)
            measure(args, model_dir, result, write)
        except Exception as e:  # noqa: BLE001 - what was measured is written
            result["errors"].append(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            log(result["errors"][-1])
    result["wall_s"] = round(time.monotonic() - started, 1)
    result["targets_modules"] = list(ALL)
    write()
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
