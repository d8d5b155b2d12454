"""python -m loramux.bench.join_policy [--quick] [--out DIR]: when waiting requests join the
running batch, measured (`--join-max-steps`).

While rows decode, waiting requests are prefilled once they number `--join-ratio` of the
running rows, or once the oldest has waited `--join-max-steps` decode steps. A prefill pass
stalls the running rows (prefill is neither chunked nor mixed into decode steps), so joining
sooner trades the running rows' inter-token latency, and the batching of prefills, for the
newcomers' time to first token.

One server per candidate value, everything else at the server's defaults, the same model and
adapters (rank 8 and 16 on all seven projections, mixed); 16 streaming gRPC clients in a
closed loop in a load-generator process of their own, greedy with `ignore_eos`. Outputs of
8-40 tokens, so that clients come back at different times and newcomers arrive one or two at
a time while rows decode (a workload whose requests all end together joins in waves and never
waits on the bound). Two workloads: short prompts (8-24 tokens) and long ones (128-384, where a
prefill pass costs the running rows the most). Rounds alternate the servers' order; each
value's ratios to the default value's are paired by round: tokens/s, p50 and p99 time to first
token, p99 inter-token latency.
"""

from __future__ import annotations

import multiprocessing
import random
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from loramux.bench import runners
from loramux.bench.assets import ModelShape, build_with_adapters, text_workload
from loramux.bench.metrics import summarize
from loramux.bench.report import model_benchmark_main
from loramux.bench.workload import Req

CASES = (ModelShape("h512-l6", 512, 6, 1536, max_positions=1024),)
QUICK = (ModelShape("h128-l2", 128, 2, 384, heads=4, max_positions=512),)
CANDIDATES = (0, 1, 2, 4, 8)  # --join-max-steps; 0: waiting requests join at the next step
QUICK_CANDIDATES = (0, 8)
CLIENTS = 16
OUTPUT_TOKENS = (8, 40)
WORKLOADS = {"short prompts": (8, 24), "long prompts": (128, 384)}
KEYS = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")


def _requests(names: list[str], vocab: int, n: int, prompt: tuple[int, int], seed: int) -> list[Req]:
    rng = random.Random(seed)
    return [Req(names[i % len(names)], [rng.randrange(3, vocab) for _ in range(rng.randint(*prompt))],
                rng.randint(*OUTPUT_TOKENS)) for i in range(n)]


def run(cases: tuple[ModelShape, ...], rounds: int, requests: int, work: Path) -> dict:
    import loramux.client as lc
    from loramux.server.app import BackgroundServer
    from loramux.server.settings import Settings

    candidates = QUICK_CANDIDATES if cases == QUICK else CANDIDATES
    default = Settings.join_max_steps  # (the dataclass field's default)
    if default not in candidates:
        raise ValueError(f"the default --join-max-steps ({default}) must be among the candidates")
    tokenizer, _, _ = text_workload(work, 1, probes=0)
    load = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    cells = []
    try:
        for case in cases:
            base, names = build_with_adapters(case, tokenizer, work)
            workloads = {name: _requests(names, len(tokenizer), requests, prompt, seed)
                         for seed, (name, prompt) in enumerate(WORKLOADS.items())}
            with ExitStack() as stack:
                servers = {}
                for value in candidates:
                    settings = Settings(model=str(base), adapter_roots=(work / "adapters",), auth="none", port=0,
                                        join_max_steps=value)
                    server = servers[value] = stack.enter_context(BackgroundServer(settings))
                    with lc.Client(server.target, timeout=600) as client:
                        for name in names:
                            client.load_adapter(name, source=name)
                    # untimed: first-pass effects
                    load.submit(runners.grpc_load, server.target, workloads["short prompts"][:CLIENTS], CLIENTS).result()
                for workload, reqs in workloads.items():
                    measured = {value: {key: [] for key in KEYS} for value in candidates}
                    for r in range(rounds):
                        for value in (candidates if r % 2 == 0 else candidates[::-1]):
                            records, _ = load.submit(runners.grpc_load, servers[value].target, reqs, CLIENTS).result()
                            s = summarize(records)
                            for key in KEYS:
                                measured[value][key].append(s["output_tokens_per_s" if key == "tokens_per_s" else key])
                    for value in candidates:  # paired by round, against the default value
                        for key in KEYS:
                            ratio = [x / d for x, d in zip(measured[value][key], measured[default][key])]
                            measured[value][f"{key}_over_default"] = round(statistics.median(ratio), 3)
                    cells.append({"model": case.name, "workload": workload, "default": default,
                                  "values": {str(value): measured[value] for value in candidates}})
    finally:
        load.shutdown()
    return {"rounds": rounds, "requests": requests, "clients": CLIENTS, "output_tokens": list(OUTPUT_TOKENS),
            "cells": cells}


def markdown(results: dict) -> str:
    lines = [
        f"# --join-max-steps: {results['rounds']} rounds of {results['requests']} requests, {results['clients']} "
        f"closed-loop gRPC clients, outputs of {results['output_tokens'][0]}-{results['output_tokens'][1]} tokens, "
        "greedy, adapters mixed, other flags at their defaults",
        "",
        "| model | workload | join-max-steps | tokens/s (rounds) | p50 TTFT ms | p99 TTFT ms (rounds) | p50 ITL ms | "
        "p99 ITL ms | tokens/s, p50 TTFT, p99 TTFT, p99 ITL / the default's (paired medians) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in results["cells"]:
        for value, m in c["values"].items():
            mark = " (default)" if int(value) == c["default"] else ""
            med = {key: round(statistics.median(m[key]), 1) for key in KEYS}
            lines.append(
                f"| {c['model']} | {c['workload']} | {value}{mark} | {m['tokens_per_s']} | {med['ttft_p50_ms']} | "
                f"{m['ttft_p99_ms']} | {med['itl_p50_ms']} | {med['itl_p99_ms']} | {m['tokens_per_s_over_default']}, "
                f"{m['ttft_p50_ms_over_default']}, {m['ttft_p99_ms_over_default']}, {m['itl_p99_ms_over_default']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return model_benchmark_main(argv, "python -m loramux.bench.join_policy", __doc__, "join_policy", run, markdown,
                                CASES, QUICK, rounds=4)


if __name__ == "__main__":
    sys.exit(main())
