"""python -m loramux.bench.merge [--quick] [--out DIR]: the streaming merge against peft's
merge_and_unload + save_pretrained on the same sharded models, side by side.

Each run is a fresh process (so that one run's memory cannot hide in another's), which
resets its peak-RSS mark (/proc/self/clear_refs) just before the work and reads VmHWM
after: the peak the work itself added. loramux's run covers reading the adapter and the
merge; peft's covers loading the base, the adapter, merging and saving (what a user of
peft does). Throughput is the base's bytes over the wall time of that work. Every cell
runs `rounds` times; the report gives the worst (largest peak, lowest throughput) first
and the spread.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loramux.bench.assets import ModelShape
from loramux.bench.report import write_named

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


MODELS = (
    ModelShape("h1024-l8", 1024, 8, 2816, shard="50MB"),
    ModelShape("h512-l8", 512, 8, 1536, shard="12MB"),
)
QUICK = (ModelShape("h256-l4", 256, 4, 768, heads=4, shard="2MB"),)
ADAPTER_RANKS = (64, 8)


def _vm(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")
    return _vm("VmRSS")


def child(system: str, base: str, adapter: str, out: str) -> None:
    """One merge in this (fresh) process; prints {"peak_bytes", "seconds"} as JSON."""
    import torch

    if system == "loramux":
        from loramux.server.adapters.checkpoint import read_checkpoint
        from loramux.server.merging.base_files import read_base_checkpoint
        from loramux.server.model.base_model import load_base_model
        from loramux.server.merging.merge import merge_to_checkpoint
        from loramux.server.settings import Settings

        # The adapter is validated against the base as the server would (the served model is
        # loaded first, as it is in a server, and is not counted).
        settings = Settings(model=base, adapter_roots=(Path(adapter).parent,), max_lora_rank=64, auth="none")
        view = load_base_model(settings).view(settings)
        checkpoint = read_base_checkpoint(Path(base))
        rss = _reset_peak()
        started = time.perf_counter()
        _, weights = read_checkpoint(Path(adapter), view, dtype=torch.float32, root=Path(adapter))
        merge_to_checkpoint(checkpoint, weights, Path(out), {}, lambda p: None)
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        rss = _reset_peak()
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.save_pretrained(out)
    seconds = time.perf_counter() - started
    print(json.dumps({"peak_bytes": _vm("VmHWM") - rss, "seconds": seconds}))


def _run_child(system: str, base: Path, adapter: Path, out: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "loramux.bench.merge", "--child", system, str(base), str(adapter), str(out)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(models: tuple[ModelShape, ...], ranks: tuple[int, ...], rounds: int, work: Path) -> dict:
    import shutil

    from loramux.demo.assets import build_tokenizer, make_adapter
    from loramux.server.merging.base_files import read_base_checkpoint

    texts = [f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)]
    tokenizer = build_tokenizer(work / "tok", texts, vocab_size=300)
    cells = []
    for model in models:
        base = model.build(work / model.name, tokenizer)
        checkpoint = read_base_checkpoint(base)
        for rank in ranks:
            adapter = work / f"{model.name}-r{rank}"
            make_adapter(base, adapter, r=rank, alpha=2 * rank, target_modules=ALL, std=0.02)
            adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
            cell = {"model": model.name, "model_bytes": checkpoint.total_bytes, "shards": len(checkpoint.shards),
                    "largest_shard_bytes": checkpoint.largest_shard_bytes, "rank": rank, "adapter_bytes": adapter_bytes}
            for system in ("loramux", "peft"):
                runs = []
                for _ in range(rounds):
                    out = work / f"out-{system}"
                    runs.append(_run_child(system, base, adapter, out))
                    shutil.rmtree(out, ignore_errors=True)
                peaks = [r["peak_bytes"] for r in runs]
                speeds = [checkpoint.total_bytes / r["seconds"] / 2**20 for r in runs]
                cell[system] = {"peak_bytes": max(peaks), "peak_bytes_min": min(peaks),
                                "mb_per_s": round(min(speeds), 1), "mb_per_s_max": round(max(speeds), 1)}
            cell["target_bytes"] = 2 * checkpoint.largest_shard_bytes + adapter_bytes
            cell["met"] = cell["loramux"]["peak_bytes"] <= cell["target_bytes"]
            cells.append(cell)
    # The worst case first: the highest loramux peak relative to its target.
    cells.sort(key=lambda c: c["loramux"]["peak_bytes"] / c["target_bytes"], reverse=True)
    return {"rounds": rounds, "cells": cells}


def markdown(results: dict) -> str:
    mib = 2**20
    lines = [
        f"# Streaming merge against peft merge_and_unload + save_pretrained ({results['rounds']} runs per cell, "
        "worst first; peak = RSS the work added)",
        "",
        "| model | shards (largest) | rank | loramux peak | target (2 shards + adapter) | met | peft peak | "
        "loramux MB/s | peft MB/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in results["cells"]:
        lo, pe = c["loramux"], c["peft"]
        lines.append(
            f"| {c['model']} ({c['model_bytes'] / mib:.0f} MiB) | {c['shards']} ({c['largest_shard_bytes'] / mib:.1f} MiB) | "
            f"{c['rank']} | {lo['peak_bytes'] / mib:.1f} MiB ({lo['peak_bytes_min'] / mib:.1f}-) | "
            f"{c['target_bytes'] / mib:.1f} MiB | {'yes' if c['met'] else 'NO'} | {pe['peak_bytes'] / mib:.1f} MiB | "
            f"{lo['mb_per_s']}-{lo['mb_per_s_max']} | {pe['mb_per_s']}-{pe['mb_per_s_max']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(*argv[1:5])
        return 0
    parser = argparse.ArgumentParser(prog="python -m loramux.bench.merge", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one small model, one rank, one round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            results = run(QUICK, (8,), 1, Path(tmp))
        else:
            results = run(MODELS, ADAPTER_RANKS, args.rounds, Path(tmp))
    write_named(Path(args.out), "merge", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
