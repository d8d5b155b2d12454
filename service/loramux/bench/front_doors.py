"""python -m loramux.bench.front_doors [--quick] [--out DIR]: the HTTP front door against the
gRPC one, on the same server, model, adapters and requests.

One server at its default flags plus `--http-port 0` (auth none), the model-shape benchmarks'
mixed-adapter workload (adapters of rank 8 and 16 on all seven projections), 16 concurrent
streaming clients, greedy with `ignore_eos`, in a load-generator process of its own (the
official `openai` client for HTTP, loramux's client for gRPC). Rounds alternate between the
two doors after an untimed pass through each; the ratios are taken round by round (paired):
output tokens/s HTTP / gRPC, and p99 time to first token HTTP / gRPC. The load generator's
CPU seconds are reported beside (both doors share this machine's cores with it).

A third "door" is the engine called in the server's own process with no front door at all
(`runners.engine_closed_loop`: the same requests, 16 clients woken once per request). Beside
each door, the engine thread's time per decode step (forward pass, sampling and emitting the
step's events: `EngineStats.decode_seconds` over `steps`, during that door's rounds): what a
front door's work in the engine's process (its event loop, protobuf or JSON, sockets, all
under one GIL) takes from the step, and so what running the engine in a process of its own
could give back at most. What such an engine would pay instead is measured beside it: the
engine thread's time to hand one step's events (`CLIENTS` token events) to another process,
pickled as one message on a pipe that a reader process drains (`shipping_us_per_step`).

The same two doors are measured on a second server whose engine runs in its own process
(`--engine-process`: "grpc_split", "http_split"), with its engine's step time read from that
process; its ratios to the doors of the engine in the doors' process are paired by round.
"""

from __future__ import annotations

import dataclasses
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
            split = dataclasses.replace(settings, engine_process=True)
            with (BackgroundServer(settings) as server, BackgroundServer(split) as split_server,
                  lc.Client(server.target, timeout=600) as client, lc.Client(split_server.target, timeout=600) as other):
                engine = server.engine
                for name in names:
                    client.load_adapter(name, source=name)
                    other.load_adapter(name, source=name)
                url = f"http://127.0.0.1:{server.running.http_port}/v1"
                split_url = f"http://127.0.0.1:{split_server.running.http_port}/v1"
                doors = {
                    "grpc": lambda rs: load.submit(runners.grpc_load, server.target, rs, CLIENTS).result(),
                    # the same prompts as text: the server tokenizes them (as it does the ids' prompt once)
                    "http": lambda rs: load.submit(runners.http_load, url, rs, CLIENTS).result(),
                    # the same tenant's adapters (resident across rounds whichever door runs)
                    "engine": lambda rs: (runners.engine_closed_loop(engine, rs, CLIENTS, True,
                                                                     settings.default_tenant), 0.0),
                    # the same doors of a server whose engine runs in its own process (--engine-process)
                    "grpc_split": lambda rs: load.submit(runners.grpc_load, split_server.target, rs, CLIENTS).result(),
                    "http_split": lambda rs: load.submit(runners.http_load, split_url, rs, CLIENTS).result(),
                }
                engines = {"grpc_split": split_server.engine, "http_split": split_server.engine}
                workloads = {"grpc": reqs, "http": text_reqs, "engine": reqs, "grpc_split": reqs, "http_split": text_reqs}
                for door, call in doors.items():  # untimed: first-pass effects
                    call(workloads[door][:CLIENTS])
                cell: dict = {"model": case.name, **{door: {"tokens_per_s": [], "ttft_p99_ms": [], "ttft_p50_ms": [],
                                                            "load_cpu_s": [], "step_ms": []} for door in doors}}
                for r in range(rounds):
                    order = list(doors) if r % 2 == 0 else list(reversed(doors))
                    for door in order:
                        stats = engines.get(door, engine).stats
                        before = stats()
                        records, cpu_s = doors[door](workloads[door])
                        after = stats()
                        cell[door]["step_ms"].append(round(1000 * (after.decode_seconds - before.decode_seconds)
                                                           / max(1, after.steps - before.steps), 3))
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
                for door in ("grpc", "http", "grpc_split", "http_split"):  # what the door's work costs the engine's step
                    steps = [d / e for d, e in zip(cell[door]["step_ms"], cell["engine"]["step_ms"])]
                    cell[f"{door}_over_engine_step_ms"] = {"median": round(statistics.median(steps), 3),
                                                           "worst": round(max(steps), 3)}
                for door in ("grpc", "http"):  # the engine in its own process against in the doors' process, paired
                    speed = [x / y for x, y in zip(cell[f"{door}_split"]["tokens_per_s"], cell[door]["tokens_per_s"])]
                    ttft = [x / y for x, y in zip(cell[f"{door}_split"]["ttft_p99_ms"], cell[door]["ttft_p99_ms"])]
                    cell[f"{door}_split_over_in_process_tokens_per_s"] = {"median": round(statistics.median(speed), 3),
                                                                          "worst": round(min(speed), 3)}
                    cell[f"{door}_split_over_in_process_ttft_p99"] = {"median": round(statistics.median(ttft), 3),
                                                                      "worst": round(max(ttft), 3)}
                cells.append(cell)
    finally:
        load.shutdown()
    return {"rounds": rounds, "requests": requests, "clients": CLIENTS, "output_tokens": OUTPUT_TOKENS, "cells": cells,
            "shipping_us_per_step": shipping_us_per_step(CLIENTS)}


def _drain(conn) -> None:
    while conn.recv() is not None:
        pass


def shipping_us_per_step(rows: int, steps: int = 3000) -> float:
    """The sender's median time (us) to pickle one step's `rows` token events and write them to
    a pipe whose other end another process reads: what an engine in a process of its own
    would pay per step to reach the front doors."""
    import pickle
    import time

    from loramux.server.engine.request import TokenEvent

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    reader = ctx.Process(target=_drain, args=(theirs,), daemon=True)
    reader.start()
    try:
        times = []
        for step in range(steps):
            events = [(row, TokenEvent([1000 + step % 7000], [], " word")) for row in range(rows)]
            started = time.perf_counter()
            ours.send_bytes(pickle.dumps(events, protocol=pickle.HIGHEST_PROTOCOL))
            times.append(time.perf_counter() - started)
        ours.send(None)
    finally:
        reader.join(10)
    return round(statistics.median(times) * 1e6, 1)


def markdown(results: dict) -> str:
    lines = [
        f"# HTTP (OpenAI API, SSE) against gRPC streaming: {results['rounds']} rounds of {results['requests']} requests, "
        f"{results['clients']} clients, {results['output_tokens']} tokens each, greedy, adapters mixed, default flags",
        "",
        "| model | door | tokens/s (rounds) | p50 TTFT ms | p99 TTFT ms (rounds) | engine ms per step (rounds) | "
        "load generator CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in results["cells"]:
        for door in ("engine", "grpc", "http", "grpc_split", "http_split"):
            r = c[door]
            lines.append(f"| {c['model']} | {door} | {r['tokens_per_s']} | {r['ttft_p50_ms']} | {r['ttft_p99_ms']} | "
                         f"{r['step_ms']} | {r['load_cpu_s']} |")
    lines.append("")
    for c in results["cells"]:
        s, t = c["http_over_grpc_tokens_per_s"], c["http_over_grpc_ttft_p99"]
        g, h = c["grpc_over_engine_step_ms"], c["http_over_engine_step_ms"]
        lines.append(f"- {c['model']}: HTTP / gRPC tokens/s median {s['median']} (worst {s['worst']}); "
                     f"p99 TTFT HTTP / gRPC median {t['median']} (worst {t['worst']}); engine step with the "
                     f"gRPC door / alone median {g['median']} (worst {g['worst']}), HTTP / alone {h['median']} "
                     f"(worst {h['worst']})")
    for c in results["cells"]:
        for door in ("grpc", "http"):
            t, p = c[f"{door}_split_over_in_process_tokens_per_s"], c[f"{door}_split_over_in_process_ttft_p99"]
            g = c[f"{door}_split_over_engine_step_ms"]
            lines.append(f"- {c['model']}, {door} with the engine in its own process / in the doors' process: tokens/s "
                         f"median {t['median']} (worst {t['worst']}); p99 TTFT median {p['median']} (worst {p['worst']}); "
                         f"its engine step / the engine alone median {g['median']} (worst {g['worst']})")
    lines.append(f"- handing one step's {results['clients']} token events to another process (pickle, pipe): "
                 f"{results['shipping_us_per_step']} us on the engine thread")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return model_benchmark_main(argv, "python -m loramux.bench.front_doors", __doc__, "front_doors", run, markdown,
                                CASES, QUICK, rounds=4)


if __name__ == "__main__":
    sys.exit(main())
