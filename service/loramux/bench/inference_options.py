"""python -m loramux.bench.inference_options [--quick] [--out DIR]: the decode step eager,
compiled, with the static KV cache, and both, side by side on the same model, adapters and
requests.

For each model: one server per configuration in turn, at the server's default flags
otherwise (`eager` is the defaults: `--kv-cache dynamic`, no `--compile`). Each serves the same
mixed-adapter workload (4 adapters of rank 8 and 16 on all seven projections) through gRPC from
16 concurrent clients, greedy with `ignore_eos`: output tokens/s for `rounds` rounds. Start-up
time is the server's construction (loading the model, allocating the static cache, compiling
and warming the graphs). Then fixed prompts, greedy, base and every adapter: how many whole
sequences equal the eager server's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from loramux.bench.assets import ModelShape
from loramux.bench.report import write_named
from loramux.bench.workload import closed_loop_tokens_per_s

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CASES = (ModelShape("h1024-l8", 1024, 8, 2816), ModelShape("h512-l6", 512, 6, 1536))
QUICK = (ModelShape("h128-l2", 128, 2, 384, heads=4),)
CONFIGS = {
    "eager": {},
    "static": {"kv_cache": "static"},
    "compile": {"compile": True},
    "compile+static": {"compile": True, "kv_cache": "static"},
}


def run(cases: tuple[ModelShape, ...], rounds: int, requests: int, work: Path) -> dict:
    import loramux.client as lc
    from loramux.demo.assets import build_tokenizer, make_adapter
    from loramux.server.app import BackgroundServer
    from loramux.server.settings import Settings

    texts = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(300)]
    tokenizer = build_tokenizer(work / "tok", texts, vocab_size=512)
    probes = [f"the lazy dog number {i} jumps" for i in range(6)]
    workload = [texts[i % len(texts)][: 20 + (i * 7) % 40] for i in range(requests)]
    out = []
    for case in cases:
        base = case.build(work / case.name, tokenizer)
        names = []
        for i, rank in enumerate((8, 16, 8, 16)):
            make_adapter(base, work / "adapters" / f"{case.name}-a{i}", r=rank, alpha=2 * rank, target_modules=ALL,
                         std=0.02, seed=i)
            names.append(f"{case.name}-a{i}")
        cell: dict = {"model": case.name}
        reference = None
        for config, flags in CONFIGS.items():
            settings = Settings(model=str(base), adapter_roots=(work / "adapters",), auth="none", port=0, **flags)
            started = time.perf_counter()
            with BackgroundServer(settings) as server, lc.Client(server.target, timeout=600) as client:
                start_s = time.perf_counter() - started
                for name in names:
                    client.load_adapter(name, source=name)
                speeds = [closed_loop_tokens_per_s(server.target, names, workload, 16, 24) for _ in range(rounds)]
                sequences = {(a, p): client.generate(prompt=p, adapter_id=a, max_new_tokens=16).token_ids
                             for a in ["", *names] for p in probes}
                info = client.server_info()
                decode = server.engine.compiled_decode
            row = {
                "start_s": round(start_s, 1),
                "compile_warm_s": round(decode.warm_seconds, 1) if decode is not None else 0.0,
                "graphs": info.compiled_graphs,
                "kv_cache_bytes": info.kv_cache_bytes,
                "tokens_per_s": [round(s, 1) for s in speeds],
            }
            if reference is None:
                reference = {"sequences": sequences, "row": row}
            else:
                same = sum(sequences[k] == reference["sequences"][k] for k in sequences)
                row.update(sequences_equal=f"{same}/{len(sequences)}",
                           speed_ratio=round(min(row["tokens_per_s"]) / max(reference["row"]["tokens_per_s"]), 3),
                           median_ratio=round(_median(row["tokens_per_s"]) / _median(reference["row"]["tokens_per_s"]), 3))
            cell[config] = row
        out.append(cell)
    return {"rounds": rounds, "requests": requests, "cells": out}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def markdown(results: dict) -> str:
    lines = [
        f"# Eager, compiled and static-cache decode ({results['rounds']} rounds of {results['requests']} requests, "
        "16 gRPC clients, 4 adapters mixed, the server's defaults otherwise)",
        "",
        "| model | configuration | start-up s (compile warm-up s, graphs) | static KV cache | tokens/s | "
        "vs eager (worst pair) | vs eager (medians) | sequences equal to eager |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in results["cells"]:
        for config in CONFIGS:
            r = c[config]
            warm = f" ({r['compile_warm_s']}, {r['graphs']})" if r["graphs"] else ""
            kv = f"{r['kv_cache_bytes'] / 2**20:.0f} MiB" if r["kv_cache_bytes"] else ""
            lines.append(
                f"| {c['model']} | {config} | {r['start_s']}{warm} | {kv} | {r['tokens_per_s']} | "
                f"{r.get('speed_ratio', '')} | {r.get('median_ratio', '')} | {r.get('sequences_equal', '')} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loramux.bench.inference_options", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one small model, one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = run(QUICK, 1, 16, Path(tmp)) if args.quick else run(CASES, args.rounds, 48, Path(tmp))
    write_named(Path(args.out), "inference_options", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
