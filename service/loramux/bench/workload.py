"""The requests every system serves: Zipf adapter popularity, uniform prompt and output lengths."""

from __future__ import annotations

import dataclasses
import random

from loramux.bench.config import BenchConfig


@dataclasses.dataclass(frozen=True)
class Req:
    adapter: str
    prompt: list[int]
    output_tokens: int


def adapter_names(cfg: BenchConfig) -> list[str]:
    return [f"a{i:02d}" for i in range(cfg.adapters)]


def make_requests(cfg: BenchConfig, n: int, vocab: tuple[int, int], seed: int) -> list[Req]:
    """`n` requests; adapter k (0-based popularity rank) is drawn with weight 1/(k+1)^s."""
    rng = random.Random(seed)
    names = adapter_names(cfg)
    weights = [1 / (k + 1) ** cfg.zipf_s for k in range(len(names))]
    out = []
    for _ in range(n):
        adapter = rng.choices(names, weights)[0]
        prompt = [rng.randrange(*vocab) for _ in range(rng.randint(*cfg.prompt_tokens))]
        out.append(Req(adapter, prompt, rng.randint(*cfg.output_tokens)))
    return out


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Arrival offsets (seconds from the start) of a Poisson process of `rate` per second."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out
