"""The requests every system serves: Zipf adapter popularity, uniform prompt and output lengths."""

from __future__ import annotations

import dataclasses
import random
import threading
import time

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


def closed_loop_tokens_per_s(target: str, adapters: list[str], prompts: list[str], clients: int, tokens: int) -> float:
    """Output tokens/s of `clients` gRPC clients, each sending its share of `prompts` one after
    another (greedy, `ignore_eos`: every system does the same tokens), adapters in turn."""
    import loramux.client as lc

    done = []

    def one(i: int) -> None:
        with lc.Client(target, timeout=600) as c:
            for j in range(i, len(prompts), clients):
                r = c.generate(prompt=prompts[j], adapter_id=adapters[j % len(adapters)], max_new_tokens=tokens,
                               ignore_eos=True)
                done.append(len(r.token_ids))

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - started)
