"""python -m loramux.bench.inference_options [--quick] [--out DIR]: the decode step eager,
compiled, with the static KV cache, and both, side by side on the same model, adapters and
requests.

For each model: one server per configuration, all started before any is measured, at the
server's default flags otherwise (`eager` is the defaults: `--kv-cache dynamic`, no
`--compile`). Each serves the same mixed-adapter workload (4 adapters of rank 8 and 16 on all
seven projections) through gRPC from 16 concurrent clients, greedy with `ignore_eos`: output
tokens/s and the mean decode step (the engine's time in decode steps over their number) for
`rounds` rounds, after one untimed pass (the first pass over a fresh server ran
up to 2x slower in every configuration, eager too, so not compilation). Rounds alternate
between the servers, one serving at a time, and each configuration's ratio to eager is taken
round by round (paired): run to run, the same configuration's tokens/s moved by up to 2x on
this 2-CPU machine, and configurations measured one after another drifted apart. Start-up
time is the server's construction (loading the model, allocating the static cache, compiling
and warming the graphs). Then fixed prompts, greedy, base and every adapter: how many whole
sequences equal the eager server's.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from loramux.bench.assets import ModelShape, build_with_adapters, text_workload
from loramux.bench.report import model_benchmark_main
from loramux.bench.workload import closed_loop_tokens_per_s

CASES = (ModelShape("h1024-l8", 1024, 8, 2816), ModelShape("h512-l6", 512, 6, 1536, max_positions=1024))
QUICK = (ModelShape("h128-l2", 128, 2, 384, heads=4, max_positions=512),)
LONG_PROMPT = 900  # tokens, for the long-context decode step (or the context less 40, in models of 512 or more)
CONFIGS = {
    "eager": {},
    "static": {"kv_cache": "static"},
    "compile": {"compile": True},
    "compile+static": {"compile": True, "kv_cache": "static"},
}
# --quick (the suite's run): one compiled configuration (compiling is most of its time; the
# compiled step with the dynamic cache is checked against peft in tests/test_static_kv_and_compile.py).
QUICK_CONFIGS = ("eager", "static", "compile+static")


def run(cases: tuple[ModelShape, ...], rounds: int, requests: int, work: Path) -> dict:
    import loramux.client as lc
    from loramux.server.app import BackgroundServer
    from loramux.server.settings import Settings

    tokenizer, workload, probes = text_workload(work, requests, probes=6)
    configs = {name: CONFIGS[name] for name in (QUICK_CONFIGS if cases == QUICK else CONFIGS)}
    out = []
    for case in cases:
        base, names = build_with_adapters(case, tokenizer, work)
        cell: dict = {"model": case.name}
        with contextlib.ExitStack() as stack:
            servers = {}
            for config, flags in configs.items():  # all up at once, so rounds can alternate
                settings = Settings(model=str(base), adapter_roots=(work / "adapters",), auth="none", port=0, **flags)
                started = time.perf_counter()
                server = stack.enter_context(BackgroundServer(settings))
                start_s = time.perf_counter() - started
                client = stack.enter_context(lc.Client(server.target, timeout=600))
                for name in names:
                    client.load_adapter(name, source=name)
                closed_loop_tokens_per_s(server.target, names, workload[:16], 16, 8)  # untimed: first-pass effects
                servers[config] = (server, client)
                decode = server.engine.compiled_decode
                info = client.server_info()
                cell[config] = {
                    "start_s": round(start_s, 1),
                    "compile_warm_s": round(decode.warm_seconds, 1) if decode is not None else 0.0,
                    "graphs": info.compiled_graphs,
                    "kv_cache_bytes": info.kv_cache_bytes,
                    "tokens_per_s": [],
                    "step_ms": [],
                }
            # Rounds alternate between the servers (only one serves at a time): the machine's
            # drift between rounds hits every configuration alike, and each round's ratio to
            # eager is a paired one.
            for _ in range(rounds):
                for config, (server, _) in servers.items():
                    before = server.engine.stats()
                    speed = closed_loop_tokens_per_s(server.target, names, workload, 16, 24)
                    after = server.engine.stats()
                    cell[config]["tokens_per_s"].append(round(speed, 1))
                    cell[config]["step_ms"].append(  # the mean decode step (forward and sampling)
                        round(1000 * (after.decode_seconds - before.decode_seconds) / max(after.steps - before.steps, 1), 2))
            if case.max_positions >= 512:
                for config, (server, _) in servers.items():
                    cell[config]["long_step_ms"] = _long_context_step_ms(server, names, case.max_positions)
            sequences = {config: {(a, p): client.generate(prompt=p, adapter_id=a, max_new_tokens=16).token_ids
                                  for a in ["", *names] for p in probes}
                         for config, (_, client) in servers.items()}
        eager = cell["eager"]
        for config in configs:
            if config == "eager":
                continue
            row = cell[config]
            ratios = [s / e for s, e in zip(row["tokens_per_s"], eager["tokens_per_s"], strict=True)]
            step_ratios = [e / s for s, e in zip(row["step_ms"], eager["step_ms"], strict=True)]
            same = sum(sequences[config][k] == sequences["eager"][k] for k in sequences["eager"])
            if "long_step_ms" in row:
                row["long_step_speedup"] = round(eager["long_step_ms"] / row["long_step_ms"], 3)
            row.update(sequences_equal=f"{same}/{len(sequences['eager'])}",
                       speed_ratio=round(min(ratios), 3), median_ratio=round(_median(ratios), 3),
                       step_speedup=round(_median(step_ratios), 3))
        out.append(cell)
    return {"rounds": rounds, "requests": requests, "cells": out}


def _long_context_step_ms(server, names: list[str], context: int) -> float:
    """The mean decode step of 16 rows holding long prompts (LONG_PROMPT tokens, or the context
    less 40, less one token per row so the rows differ): 16 concurrent requests, adapters
    mixed, 32 new tokens each."""
    import random
    import threading

    import loramux.client as lc

    rng = random.Random(0)
    prompts = [[rng.randrange(4, 500) for _ in range(min(LONG_PROMPT, context - 40) - i)] for i in range(16)]
    before = server.engine.stats()

    def one(i: int) -> None:
        with lc.Client(server.target, timeout=600) as c:
            c.generate(prompt_token_ids=prompts[i], adapter_id=names[i % len(names)], max_new_tokens=32, ignore_eos=True)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = server.engine.stats()
    return round(1000 * (after.decode_seconds - before.decode_seconds) / max(after.steps - before.steps, 1), 2)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def markdown(results: dict) -> str:
    lines = [
        f"# Eager, compiled and static-cache decode ({results['rounds']} rounds of {results['requests']} requests, "
        f"16 gRPC clients, 4 adapters mixed, the server's defaults otherwise; long prompts: {LONG_PROMPT} tokens, or "
        "the model's context less 40)",
        "",
        "| model | configuration | start-up s (compile warm-up s, graphs) | static KV cache | tokens/s (rounds) | "
        "vs eager (worst round) | vs eager (median round) | decode step ms (rounds) | step speed-up (median) | "
        "decode step ms, 16 rows of long prompts (vs eager) | sequences equal to eager |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in results["cells"]:
        for config in (name for name in CONFIGS if name in c):
            r = c[config]
            warm = f" ({r['compile_warm_s']}, {r['graphs']})" if r["graphs"] else ""
            kv = f"{r['kv_cache_bytes'] / 2**20:.0f} MiB" if r["kv_cache_bytes"] else ""
            lines.append(
                f"| {c['model']} | {config} | {r['start_s']}{warm} | {kv} | {r['tokens_per_s']} | "
                f"{r.get('speed_ratio', '')} | {r.get('median_ratio', '')} | {r['step_ms']} | {r.get('step_speedup', '')} | "
                f"{_long(r)} | {r.get('sequences_equal', '')} |"
            )
    return "\n".join(lines) + "\n"


def _long(row: dict) -> str:
    if "long_step_ms" not in row:
        return ""
    speedup = row.get("long_step_speedup")
    return f"{row['long_step_ms']}" + (f" ({speedup}x)" if speedup else "")


def main(argv: list[str] | None = None) -> int:
    return model_benchmark_main(argv, "python -m loramux.bench.inference_options", __doc__, "inference_options", run, markdown, CASES, QUICK,
                                rounds=4)


if __name__ == "__main__":
    sys.exit(main())

