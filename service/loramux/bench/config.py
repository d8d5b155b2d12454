"""What one benchmark run measures: model size, adapters, workload. `--quick` shrinks it all."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    hidden: int = 1024
    layers: int = 8
    heads: int = 16
    kv_heads: int = 8
    intermediate: int = 2816
    rank: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    adapters: int = 32
    slots: int = 8
    requests: int = 64
    concurrency: int = 16
    zipf_s: float = 1.1
    prompt_tokens: tuple[int, int] = (16, 64)  # uniform, inclusive
    output_tokens: tuple[int, int] = (16, 48)
    poisson_requests: int = 48
    poisson_load: float = 0.5  # arrival rate as a fraction of (a)'s measured requests/s
    registered_small: int = 10
    registered_large: int = 1000
    step_rows: int = 16  # decode-step microbenchmark: rows, each with its own adapter
    step_kv: int = 64
    step_reps: int = 20
    rpc_calls: int = 40
    rounds: int = 2  # (a), (b), (c) are each run this many times, in alternating order
    tracing_rounds: int = 3  # gRPC with tracing off and on, in turn, this many times each
    seed: int = 0
    device: str = "cpu"  # cuda: scripts/gpu_check.sh
    dtype: str = "float32"

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(
            hidden=256, layers=2, heads=4, kv_heads=2, intermediate=704, adapters=8, slots=4, requests=24,
            concurrency=8, output_tokens=(8, 16), prompt_tokens=(8, 24), poisson_requests=16,
            registered_small=10, registered_large=40, step_rows=8, step_reps=10, rpc_calls=15, rounds=1,
            tracing_rounds=2,
        )
