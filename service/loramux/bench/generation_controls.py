"""python -m loramux.bench.generation_controls [--quick] [--out DIR]: what structured output,
top_logprobs and the penalties cost per decode step, against free decoding of the same
mixed-adapter batch, in one run.

One engine at its default flags, the model-shape benchmarks' four adapters (ranks 8 and 16 on
all seven projections) and the base, a 32,000-token vocabulary (the masks' cost grows with
it), 16 rows decoding together, greedy with `ignore_eos`. Each round runs every variant once,
in an order that rotates by round; a variant's cost is the engine's decode seconds over its
decode steps (prefills excluded), and its ratio to `free` is taken round by round.

- `free`: no controls;
- `schema, 8 of 16 rows` and `schema, every row`: a JSON schema (an array of at least 40
  objects with an integer, a bounded string and an enum list: an answer that cannot end
  within the tokens asked for, so every step is masked);
- `regex, every row`: a regex of the same reach;
- `top_logprobs 20, every row`; `penalties, every row` (presence 0.5, frequency 0.5,
  repetition 1.1).

The masks' floor: llguidance's time to fill one row's mask on one thread, replaying a
constrained row's tokens through a fresh matcher; the engine computes the rows' masks on
a helper thread while the forward pass runs, so a step can hide them entirely.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loramux.bench.assets import ModelShape, build_with_adapters, code_tokenizer
from loramux.bench.report import model_benchmark_main

CASES = (ModelShape("h512-l6", 512, 6, 1536, max_positions=1024),)
QUICK = (ModelShape("h128-l2", 128, 2, 384, heads=4, max_positions=512),)
ROWS = 16
OUTPUT_TOKENS = 48
SCHEMA = {"type": "array", "minItems": 40, "items": {
    "type": "object", "additionalProperties": False, "required": ["id", "name", "tags"],
    "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 12},
                   "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}}}}
REGEX = r"([a-z]{2,8}=[0-9]{1,4};){40,}"
PROMPTS = ["def main():", "import os", "class Config:", "for item in items:", "return {", "# Copyright",
           "if __name__ ==", "with open("]


def variants(schema, regex) -> dict[str, list[dict]]:
    """Per variant, each row's extra GenerateInput fields."""
    free: dict = {}
    structured = {"constraint": schema}
    return {
        "free": [free] * ROWS,
        "schema, 8 of 16 rows": [structured if i % 2 else free for i in range(ROWS)],
        "schema, every row": [structured] * ROWS,
        "regex, every row": [{"constraint": regex}] * ROWS,
        "top_logprobs 20, every row": [{"return_logprobs": True, "top_logprobs": 20}] * ROWS,
        "penalties, every row": [{"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1}] * ROWS,
    }


def run(cases: tuple[ModelShape, ...], rounds: int, requests: int, work: Path) -> dict:
    del requests  # the batch is ROWS rows, as the per-step cost is what is measured
    from loramux.server.engine.engine import Engine
    from loramux.server.engine.inputs import GenerateInput
    from loramux.server.engine.constraints import Constraint
    from loramux.server.model.base_model import load_base_model
    from loramux.server.settings import Settings

    tokenizer = code_tokenizer(work / "tok", 32_000)
    schema, regex = Constraint("json_schema", json.dumps(SCHEMA)), Constraint("regex", REGEX)
    table = variants(schema, regex)
    cells = []
    for case in cases:
        base, names = build_with_adapters(case, tokenizer, work)
        settings = Settings(model=str(base), adapter_roots=(work / "adapters",), auth="none")
        engine = Engine(settings, load_base_model(settings)).start()
        try:
            for name in names:
                engine.load_adapter("default", name, name)
            models = ["", *names]

            def once(rows: list[dict]) -> tuple[float, int, list[dict]]:
                before = engine.stats()
                with ThreadPoolExecutor(ROWS) as pool:
                    results = list(pool.map(lambda i: engine.generate("default", GenerateInput(
                        adapter_id=models[i % len(models)], prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=OUTPUT_TOKENS,
                        ignore_eos=True, **rows[i]), 600), range(ROWS)))
                after = engine.stats()
                return after.decode_seconds - before.decode_seconds, after.steps - before.steps, results

            for rows in table.values():  # untimed: compiles, first-pass effects
                once(rows)
            cell: dict = {"model": case.name, "ms_per_step": {v: [] for v in table}}
            for r in range(rounds):
                order = list(table)[r % len(table):] + list(table)[: r % len(table)]
                for variant in order:
                    seconds, steps, results = once(table[variant])
                    assert all(len(x["token_ids"]) == OUTPUT_TOKENS for x in results), variant  # the same work
                    cell["ms_per_step"][variant].append(round(1000 * seconds / steps, 3))
            free = cell["ms_per_step"]["free"]
            cell["over_free"] = {v: {"median": round(statistics.median(c / f for c, f in zip(costs, free)), 3),
                                     "worst": round(max(c / f for c, f in zip(costs, free)), 3)}
                                 for v, costs in cell["ms_per_step"].items() if v != "free"}
            cell["mask_us_per_row"] = {kind: _mask_floor(engine, c, results_of(engine, c, models))
                                       for kind, c in (("schema", schema), ("regex", regex))}
            cells.append(cell)
        finally:
            engine.stop()
    return {"rounds": rounds, "rows": ROWS, "output_tokens": OUTPUT_TOKENS, "vocab": len(tokenizer), "cells": cells,
            "schema": SCHEMA, "regex": REGEX}


def results_of(engine, constraint, models) -> list[int]:
    from loramux.server.engine.inputs import GenerateInput

    return engine.generate("default", GenerateInput(adapter_id=models[1], prompt=PROMPTS[0], max_new_tokens=OUTPUT_TOKENS,
                                                    ignore_eos=True, constraint=constraint), 600)["token_ids"]


def _mask_floor(engine, constraint, tokens: list[int]) -> float:
    """µs to fill one row's mask, on one thread, over a constrained answer's tokens (median of 5 replays)."""
    import llguidance.torch as lt

    grammars = engine.grammars()
    bitmask = lt.allocate_token_bitmask(1, grammars.vocab_size)
    replays = []
    for _ in range(5):
        matcher = grammars.matcher(constraint).matcher
        started = time.perf_counter()
        for token in tokens:
            lt.fill_next_token_bitmask(matcher, bitmask, 0)
            matcher.consume_token(token)
        replays.append(1e6 * (time.perf_counter() - started) / len(tokens))
    return round(statistics.median(replays), 1)


def markdown(results: dict) -> str:
    lines = [
        f"# Generation controls' cost per decode step: {results['rows']} rows (base and 4 adapters mixed), "
        f"{results['output_tokens']} tokens each, {results['vocab']}-token vocabulary, {results['rounds']} rounds, "
        "default flags",
        "",
        "| model | variant | ms per decode step (rounds) | / free (median, worst) |",
        "| --- | --- | --- | --- |",
    ]
    for c in results["cells"]:
        for variant, costs in c["ms_per_step"].items():
            ratio = c["over_free"].get(variant)
            shown = f"{ratio['median']} ({ratio['worst']})" if ratio else "1"
            lines.append(f"| {c['model']} | {variant} | {costs} | {shown} |")
    lines.append("")
    for c in results["cells"]:
        floor = c["mask_us_per_row"]
        lines.append(f"- {c['model']}: one row's mask, alone on one thread: schema {floor['schema']} µs, regex "
                     f"{floor['regex']} µs per token (x {results['rows']} rows = the masks' serial floor per step)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return model_benchmark_main(argv, "python -m loramux.bench.generation_controls", __doc__, "generation_controls", run,
                                markdown, CASES, QUICK, rounds=4)


if __name__ == "__main__":
    sys.exit(main())
