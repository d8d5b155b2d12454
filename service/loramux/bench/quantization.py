"""python -m loramux.bench.quantization [--quick] [--out DIR]: quantized bases (int8,
bnb-8bit, bnb-4bit) against the full-precision one, side by side on the same model,
adapters and requests.

For each model: one server per method in turn (`--quantization none` first), at the
server's default flags otherwise. Each serves the same mixed-adapter workload through gRPC from 16
concurrent clients (greedy, `ignore_eos`, so both do the same tokens): output tokens/s, for
`rounds` rounds. Then fixed prompts, greedy, against the full-precision server's tokens:
how many whole sequences and first tokens agree, and the largest logit error of the base
model relative to the largest logit. Memory is the base's parameter bytes as served.
"""

from __future__ import annotations

import sys
from pathlib import Path

from loramux.bench.assets import ModelShape, build_with_adapters, text_workload
from loramux.bench.report import model_benchmark_main
from loramux.bench.workload import closed_loop_tokens_per_s



CASES = (ModelShape("h1024-l8", 1024, 8, 2816), ModelShape("h512-l6", 512, 6, 1536))
METHODS = ("none", "int8", "bnb-8bit", "bnb-4bit")
QUICK = (ModelShape("h128-l2", 128, 2, 384, heads=4),)  # widths bitsandbytes' 4-bit CPU kernel takes (multiples of 64)


def run(cases: tuple[ModelShape, ...], rounds: int, requests: int, work: Path) -> dict:
    import torch

    import loramux.client as lc
    from loramux.server.app import BackgroundServer
    from loramux.server.settings import Settings

    tokenizer, workload, probes = text_workload(work, requests, probes=8)
    out = []
    for case in cases:
        base, names = build_with_adapters(case, tokenizer, work)
        cell = {"model": case.name}
        reference: dict = {}
        for quantization in METHODS:
            settings = Settings(model=str(base), adapter_roots=(work / "adapters",), auth="none", port=0,
                                quantization=quantization)
            with BackgroundServer(settings) as server, lc.Client(server.target, timeout=600) as client:
                for name in names:
                    client.load_adapter(name, source=name)
                speeds = [closed_loop_tokens_per_s(server.target, names, workload, 16, 24) for _ in range(rounds)]
                sequences = {(a, p): client.generate(prompt=p, adapter_id=a, max_new_tokens=16).token_ids
                             for a in ["", *names] for p in probes}
                ids = tokenizer(probes[0], return_tensors="pt")["input_ids"]
                engine = server.engine
                with torch.no_grad():
                    logits = engine.call_on_engine(lambda: engine.base.model(input_ids=ids).logits).result(600)
                row = {"model_bytes": engine.base.model_bytes, "tokens_per_s": [round(s, 1) for s in speeds]}
                cell[quantization] = row
                if quantization == "none":
                    reference = {"sequences": sequences, "logits": logits, "row": row}
                    continue
                same = sum(sequences[k] == reference["sequences"][k] for k in sequences)
                first = sum(sequences[k][0] == reference["sequences"][k][0] for k in sequences)
                error = (logits.float() - reference["logits"]).abs().max() / reference["logits"].abs().max()
                row.update(
                    sequences_equal=f"{same}/{len(sequences)}", first_tokens_equal=f"{first}/{len(sequences)}",
                    max_logit_error=round(float(error), 5),
                    memory_saved=round(1 - row["model_bytes"] / reference["row"]["model_bytes"], 3),
                    speed_ratio=round(min(row["tokens_per_s"]) / max(reference["row"]["tokens_per_s"]), 3),
                )
        out.append(cell)
    return {"rounds": rounds, "requests": requests, "cells": out}


def markdown(results: dict) -> str:
    lines = [
        f"# Quantized bases against full precision ({results['rounds']} rounds of {results['requests']} requests, "
        "16 gRPC clients, 4 adapters mixed)",
        "",
        "| model | method | model bytes | saved | tokens/s | vs fp32 (worst pair) | sequences equal | "
        "first tokens equal | max logit error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in results["cells"]:
        for method in METHODS:
            r = c[method]
            if method == "none":
                lines.append(f"| {c['model']} | none | {r['model_bytes'] / 2**20:.1f} MiB | | {r['tokens_per_s']} | | | | |")
                continue
            lines.append(
                f"| {c['model']} | {method} | {r['model_bytes'] / 2**20:.1f} MiB | {r['memory_saved']:.0%} | "
                f"{r['tokens_per_s']} | {r['speed_ratio']} | {r['sequences_equal']} | {r['first_tokens_equal']} | "
                f"{r['max_logit_error']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return model_benchmark_main(argv, "python -m loramux.bench.quantization", __doc__, "quantization", run, markdown, CASES, QUICK,
                                rounds=2)


if __name__ == "__main__":
    sys.exit(main())
