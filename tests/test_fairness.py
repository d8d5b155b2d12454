"""Two tenants through gRPC at the server's default flags, one flooding: the other is never
refused, and its latency stays within a small factor of its latency alone.

The flood opens FLOOD concurrent calls (more than the default queue of 256 plus the batch's 16
rows can hold, so that some are refused QUEUE_FULL); the calm tenant then sends CALM calls one after another. Both latencies
(alone, and during the flood) are printed and kept in docs/security.md."""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import time

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import loramux.client as lc
from conftest import PROMPTS, eventually
from loramux.server.app import BackgroundServer
from loramux.server.tenancy.keys import append_key
from loramux.server.telemetry.providers import build_telemetry

FLOOD = 500
CALM = 12
TOKENS = 8
WORST_RATIO = 4.0  # calm's p99 during the flood over its p99 alone, at most (1.6x measured here)


def _latencies(client: lc.Client, n: int) -> list[float]:
    out = []
    for i in range(n):
        started = time.perf_counter()
        result = client.generate(prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=TOKENS, ignore_eos=True)
        out.append(time.perf_counter() - started)
        assert len(result.token_ids) == TOKENS
    return out


def _flood(target: str, key: str, results) -> None:
    """FLOOD calls at once from one asyncio client; puts {outcome: count} on `results`."""
    async def flood() -> dict[str, int]:
        async with lc.AsyncClient(target, api_key=key, timeout=300) as client:
            async def one(i: int) -> str:
                try:
                    await client.generate(prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=TOKENS * 8, ignore_eos=True)
                    return "ok"
                except lc.ResourceExhausted as e:
                    return e.reason

            outcomes: dict[str, int] = {}
            for outcome in await asyncio.gather(*(one(i) for i in range(FLOOD))):
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            return outcomes

    results.put(asyncio.run(flood()))


def _calls_answered(reader) -> int:
    """Generate calls the server has answered so far (any status), from its own counter."""
    total = 0
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == "loramux.rpc.requests":
                    total += sum(p.value for p in metric.data.data_points if p.attributes["rpc.method"] == "Generate")
    return total


def _p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.99 * len(values)))]


@pytest.mark.timeout(600)
def test_a_flooding_tenant_leaves_another_served_at_the_defaults(assets, tmp_path):
    keys_file = tmp_path / "keys.yaml"
    flood_key, calm_key = append_key(keys_file, "flood", "user"), append_key(keys_file, "calm", "user")
    # The server's defaults, but for the test model's size (rank and slots) and its keys.
    settings = assets.settings(auth="keys", auth_keys_file=keys_file)
    assert settings.max_queue == 256 and settings.max_queue_per_tenant is None and settings.max_batch_size == 16
    reader = InMemoryMetricReader()
    telemetry = build_telemetry(settings, metric_readers=[reader])
    with BackgroundServer(settings, telemetry=telemetry) as server, \
            lc.Client(server.target, api_key=calm_key, timeout=120) as calm:
        _latencies(calm, 2)  # warm-up
        alone = _latencies(calm, CALM)
        answered_before = _calls_answered(reader)

        # The flood is another service: its own process, so that its client's work is not
        # charged to the server's interpreter.
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        flooder = context.Process(target=_flood, args=(server.target, flood_key, results))
        flooder.start()
        # Every flood call has arrived (answered, or holding a place) and the flood holds the batch and most
        # of the queue: the steady state of a flood. (A call sent while the 500 arrive waits for the event
        # loop to take them in arrival order: about 0.7 s here, recorded in docs/security.md.)
        def flood_in_place() -> bool:
            if not flooder.is_alive():
                raise RuntimeError("the flooding process ended early")
            return (server.engine.stats().waiting >= 200
                    and _calls_answered(reader) - answered_before + server.engine.usage.in_flight("flood") >= FLOOD)

        eventually(flood_in_place, within=120)
        during = _latencies(calm, CALM)  # not one refused: it raises if any is
        busy = server.engine.stats().waiting
        outcomes = results.get(timeout=300)
        flooder.join(60)
    ratio = _p99(during) / _p99(alone)
    print(f"\ncalm alone: p50 {1000 * statistics.median(alone):.0f} ms, p99 {1000 * _p99(alone):.0f} ms; "
          f"during the flood: p50 {1000 * statistics.median(during):.0f} ms, p99 {1000 * _p99(during):.0f} ms "
          f"({ratio:.1f}x); flood outcomes {outcomes}; waiting at the end of calm's calls {busy}")
    assert sum(outcomes.values()) == FLOOD and outcomes.get("QUEUE_FULL", 0) > 0  # the flood did fill the queue
    assert ratio <= WORST_RATIO
