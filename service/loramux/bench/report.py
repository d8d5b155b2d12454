"""Ratios, target checks, and the JSON, PNG and Markdown outputs of a run."""

from __future__ import annotations

import json
from pathlib import Path

SYSTEMS = {
    "a_loramux_mixed": "(a) loramux engine, mixed adapters",
    "b_loramux_base_only": "(b) same engine, base model only",
    "c_peft_adapter_names": "(c) peft adapter_names mixed batches",
    "d_peft_naive": "(d) peft set_adapter + generate, one at a time",
    "e_loramux_grpc": "(e) loramux through gRPC, concurrent clients",
}


def ratios(results: dict) -> dict:
    tps = {k: v["output_tokens_per_s"] for k, v in results["systems"].items()}
    a = tps["a_loramux_mixed"]
    out = {
        "a_over_b": round(a / tps["b_loramux_base_only"], 3),
        "a_over_c": round(a / tps["c_peft_adapter_names"], 3),
        "a_over_d": round(a / tps["d_peft_naive"], 3),
        "e_over_a": round(tps["e_loramux_grpc"] / a, 3),
    }
    p = results["poisson"]
    out["poisson_ttft_p99_static_over_continuous"] = round(p["static"]["ttft_p99_ms"] / p["continuous"]["ttft_p99_ms"], 3)
    out["poisson_throughput_continuous_over_static"] = round(
        p["continuous"]["output_tokens_per_s"] / p["static"]["output_tokens_per_s"], 3
    )
    return out


def targets(results: dict) -> list[dict]:
    r, m = results["ratios"], results["micro"]
    rows = [
        ("decode step, 16 distinct adapters / base step", m["decode_step"]["ratio"], "<=", 1.2),
        ("(a) / (b) throughput", r["a_over_b"], ">=", 0.85),
        ("(a) / (c) throughput", r["a_over_c"], ">=", 1.2),
        ("(a) / (d) throughput", r["a_over_d"], ">=", 6.0),
        ("Poisson TTFT p99, static / continuous", r["poisson_ttft_p99_static_over_continuous"], ">=", 2.0),
        ("promotion from host / decode step", m["promotion"]["ratio_to_step"], "<=", 1.0),
        ("disk read, many registered / few", m["disk"]["read_ratio"], "<=", 1.2),
        ("1-token Generate, gRPC / in process (p50)", m["rpc"]["ratio"], "<=", 1.5),
        ("tracing overhead on gRPC throughput", results["tracing"]["overhead"], "<=", 0.05),
    ]
    return [
        {"what": what, "measured": value, "target": f"{op} {bound}", "met": value <= bound if op == "<=" else value >= bound}
        for what, value, op, bound in rows
    ]


def markdown(results: dict) -> str:
    lines = ["| system | output tok/s | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |", "|---|---|---|---|---|"]
    for key, label in SYSTEMS.items():
        s = results["systems"][key]
        lines.append(
            f"| {label} | {s['output_tokens_per_s']} | {s['requests_per_s']} | {s['ttft_p50_ms']} / {s['ttft_p99_ms']} "
            f"| {s['itl_p50_ms']} / {s['itl_p99_ms']} |"
        )
    for key in ("continuous", "static"):
        s = results["poisson"][key]
        lines.append(
            f"| Poisson {results['poisson']['rate_per_s']:.2f} req/s, {key} | {s['output_tokens_per_s']} | {s['requests_per_s']} "
            f"| {s['ttft_p50_ms']} / {s['ttft_p99_ms']} | {s['itl_p50_ms']} / {s['itl_p99_ms']} |"
        )
    lines += ["", "| target | measured | target | met |", "|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['what']} | {t['measured']} | {t['target']} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def write(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown(results))
    plot(results, out_dir / "results.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(SYSTEMS)
    labels = [SYSTEMS[k].split(" ", 1)[0] for k in keys]
    systems = results["systems"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(labels, [systems[k]["output_tokens_per_s"] for k in keys], color="tab:blue")
    ax1.set_title("output tokens/s (closed loop)")
    x = range(len(keys))
    ax2.bar([i - 0.2 for i in x], [systems[k]["ttft_p50_ms"] for k in keys], width=0.4, label="TTFT p50")
    ax2.bar([i + 0.2 for i in x], [systems[k]["ttft_p99_ms"] for k in keys], width=0.4, label="TTFT p99")
    ax2.set_xticks(list(x), labels)
    ax2.set_yscale("log")
    ax2.set_title("time to first token, ms")
    ax2.legend()
    c = results["config"]
    fig.suptitle(f"hidden {c['hidden']}, {c['layers']} layers, {c['adapters']} adapters (Zipf), {c['slots']} slots, "
                 f"{c['requests']} requests, concurrency {c['concurrency']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_named(out: Path, name: str, results: dict, text: str) -> None:
    """`<name>.json` and `<name>.md` in `out`, and the table printed (the merge and
    quantization benchmarks)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{name}.md").write_text(text)
    print(text)


def model_benchmark_main(argv: list[str] | None, prog: str, doc: str, name: str, run, markdown, cases, quick,
                         rounds: int) -> int:
    """The command line of a benchmark over model shapes (quantization, inference options):
    `--quick` runs one small model once, with 16 requests; otherwise `cases`, `--rounds`
    rounds of 48 requests. Writes `<name>.json` and `<name>.md` under `--out`."""
    import argparse
    import sys
    import tempfile

    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument("--quick", action="store_true", help="one small model, one round")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = run(quick, 1, 16, Path(tmp)) if args.quick else run(cases, args.rounds, 48, Path(tmp))
    write_named(Path(args.out), name, results, markdown(results))
    return 0
