"""python -m loramux.bench.front_doors [--quick] [--out DIR]: the HTTP front door against the
gRPC one, on the same server, model, adapters and requests.

One server at its default flags plus `--http-port 0` (auth none), the model-shape benchmarks'
mixed-adapter workload (adapters of rank 8 and 16 on all seven projections), 16 concurrent
streaming clients, greedy with `ignore_eos`, in a load-generator process of its own (the
official `openai` client for HTTP, loramux's client for gRPC). Rounds alternate between the
two doors after an untimed pass through each; the ratios are taken round by round (paired):
output tokens/s HTTP / gRPC, and p99 time to first token HTTP / gRPC. The load generator's
CPU seconds are reported beside (both doors share this machine's cores with it).
"""

from __future__ import annotations

import multiprocessing
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from loramux.bench import runners
from loramux.bench.assets import ModelShape, build_with_adapters, text_workload
from loramux.bench.metrics import summarize
from loramux.bench.report import model_benchmark_main
from loramux.bench.workload import Req

CASES = (ModelShape("h512-l6", 512, 6, 1536, max_positions=1024),)
QUICK = (ModelShape("h128-l2", 128, 2, 384, heads=4, max_positions=512),)
OUTPUT_TOKENS = 24
CLIENTS = 16


def run(cases: tuple[ModelShape, ...], rounds: int, requests: int, work: Path) -> dict:
    import loramux.client as lc
    from loramux.server.app import BackgroundServer
    from loramux.server.settings import Settings

    tokenizer, prompts, _ = text_workload(work, requests, probes=0)
    load = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    cells = []
    try:
        for case in cases:
            base, names = build_with_adapters(case, tokenizer, work)
            reqs = [Req(names[i % len(names)], tokenizer(p)["input_ids"], OUTPUT_TOKENS) for i, p in enumerate(prompts)]
            text_reqs = [Req(names[i % len(names)], p, OUTPUT_TOKENS) for i, p in enumerate(prompts)]
            settings = Settings(model=str(base), adapter_roots=(work / "adapters",), auth="none", port=0, http_port=0)
            with BackgroundServer(settings) as server, lc.Client(server.target, timeout=600) as client:
                for name in names:
                    client.load_adapter(name, source=name)
                url = f"http://127.0.0.1:{server.running.http_port}/v1"
                doors = {
                    "grpc": lambda rs: load.submit(runners.grpc_load, server.target, rs, CLIENTS).result(),
                    # the same prompts as text: the server tokenizes them (as it does the ids' prompt once)
                    "http": lambda rs: load.submit(runners.http_load, url, rs, CLIENTS).result(),
                }
                workloads = {"grpc": reqs, "http": text_reqs}
                for door, call in doors.items():  # untimed: first-pass effects
                    call(workloads[door][:CLIENTS])
                cell: dict = {"model": case.name, **{door: {"tokens_per_s": [], "ttft_p99_ms": [], "ttft_p50_ms": [],
                                                            "load_cpu_s": []} for door in doors}}
                for r in range(rounds):
                    order = list(doors) if r % 2 == 0 else list(reversed(doors))
                    for door in order:
                        records, cpu_s = doors[door](workloads[door])
                        s = summarize(records)
                        cell[door]["tokens_per_s"].append(s["output_tokens_per_s"])
                        cell[door]["ttft_p99_ms"].append(s["ttft_p99_ms"])
                        cell[door]["ttft_p50_ms"].append(s["ttft_p50_ms"])
                        cell[door]["load_cpu_s"].append(cpu_s)
                speed = [h / g for h, g in zip(cell["http"]["tokens_per_s"], cell["grpc"]["tokens_per_s"])]
                ttft = [h / g for h, g in zip(cell["http"]["ttft_p99_ms"], cell["grpc"]["ttft_p99_ms"])]
                cell["http_over_grpc_tokens_per_s"] = {"median": round(statistics.median(speed), 3),
                                                       "worst": round(min(speed), 3)}
                cell["http_over_grpc_ttft_p99"] = {"median": round(statistics.median(ttft), 3), "worst": round(max(ttft), 3)}
                cells.append(cell)
    finally:
        load.shutdown()
    return {"rounds": rounds, "requests": requests, "clients": CLIENTS, "output_tokens": OUTPUT_TOKENS, "cells": cells}


def markdown(results: dict) -> str:
    lines = [
        f"# HTTP (OpenAI API, SSE) against gRPC streaming: {results['rounds']} rounds of {results['requests']} requests, "
        f"{results['clients']} clients, {results['output_tokens']} tokens each, greedy, adapters mixed, default flags",
        "",
        "| model | door | tokens/s (rounds) | p50 TTFT ms | p99 TTFT ms (rounds) | load generator CPU s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in results["cells"]:
        for door in ("grpc", "http"):
            r = c[door]
            lines.append(f"| {c['model']} | {door} | {r['tokens_per_s']} | {r['ttft_p50_ms']} | {r['ttft_p99_ms']} | "
                         f"{r['load_cpu_s']} |")
    lines.append("")
    for c in results["cells"]:
        s, t = c["http_over_grpc_tokens_per_s"], c["http_over_grpc_ttft_p99"]
        lines.append(f"- {c['model']}: HTTP / gRPC tokens/s median {s['median']} (worst {s['worst']}); "
                     f"p99 TTFT HTTP / gRPC median {t['median']} (worst {t['worst']})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return model_benchmark_main(argv, "python -m loramux.bench.front_doors", __doc__, "front_doors", run, markdown,
                                CASES, QUICK, rounds=4)


if __name__ == "__main__":
    sys.exit(main())
