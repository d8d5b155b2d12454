"""Per-request timings and the figures computed from them."""

from __future__ import annotations

import dataclasses
import statistics


@dataclasses.dataclass
class Record:
    arrival: float  # time.monotonic() when the request was sent (or, for a serial server, its client was free)
    token_times: list[float]  # time.monotonic() of each output token

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(records: list[Record]) -> dict:
    start = min(r.arrival for r in records)
    end = max(r.token_times[-1] for r in records)
    tokens = sum(len(r.token_times) for r in records)
    ttfts = [r.ttft for r in records]
    itls = [x for r in records for x in r.itls]
    return {
        "requests": len(records),
        "output_tokens": tokens,
        "seconds": round(end - start, 4),
        "output_tokens_per_s": round(tokens / (end - start), 3),
        "requests_per_s": round(len(records) / (end - start), 4),
        "ttft_p50_ms": round(1000 * percentile(ttfts, 0.5), 2),
        "ttft_p99_ms": round(1000 * percentile(ttfts, 0.99), 2),
        "itl_p50_ms": round(1000 * percentile(itls, 0.5), 2),
        "itl_p99_ms": round(1000 * percentile(itls, 0.99), 2),
    }


def summarize_rounds(rounds: list[list[Record]]) -> dict:
    """Repeated runs of one system: throughput is the mean over rounds (each listed), latency
    percentiles are over the requests of all rounds."""
    each = [summarize(records) for records in rounds]
    pooled = summarize([r for records in rounds for r in records])
    out = {k: v for k, v in pooled.items() if k.startswith(("ttft", "itl"))}
    out["requests"] = each[0]["requests"]
    out["output_tokens"] = each[0]["output_tokens"]
    for key in ("output_tokens_per_s", "requests_per_s"):
        out[key] = round(sum(e[key] for e in each) / len(each), 4)
    out["rounds_output_tokens_per_s"] = [e["output_tokens_per_s"] for e in each]
    return out


def median_ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 3)
