"""What loramux emits: the spans inside a request and a merge, and every metric instrument.

One `Telemetry` is built at start-up and handed to the engine; the gRPC layer reaches it
through the engine. With no providers it is all no-ops (the OpenTelemetry API's own), so
nothing else needs to check whether telemetry is on.

Telemetry stands beside the engine, not in its chain: it imports nothing of it, and the
engine feeds it plain data. The spans inside a Generate call (`loramux.queue`,
`loramux.adapter.resolve`, `loramux.prefill`, `loramux.decode`) are made by the engine
(`engine/request_telemetry.py`) with this tracer, as children of the RPC's server span.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from opentelemetry import metrics, trace

from loramux.server.tiers import Tier

SCOPE = "loramux.server"
# Seconds; latency histograms from a millisecond to two minutes.
LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
TIERS = (Tier.ACCELERATOR, Tier.HOST, Tier.DISK)


# Seconds; per-token latency, from 0.1 ms to 2.5 s.
TOKEN_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                 0.75, 1.0, 2.5]
TOKEN_COUNT_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576]
MODEL_LABELS_PER_TENANT = 16  # each tenant's adapters with series of their own (first come); later ones: other
LORA_INFO_MAX = 32  # adapters listed per label of lora_requests_info at most
ADAPTER_REQUESTS_TOP = 16  # adapters with series of their own in loramux_adapter_requests


class Telemetry:
    def __init__(
        self,
        tracer_provider=None,
        meter_provider=None,
        closers: tuple[Callable[[], None], ...] = (),
        metrics_port: int | None = None,
    ):
        self.metrics_port = metrics_port  # the Prometheus endpoint's port, when it runs
        # An engine process's Prometheus series as exposition text (its front doors' process serves them).
        self.scrape: Callable[[], str] | None = None
        # Serve an engine process's series (its exposition text, read at each scrape) with this
        # process's, until the function it returns is called; a no-op where this telemetry runs
        # no Prometheus endpoint.
        self.serve_engine_series: Callable[[Callable[[], str]], Callable[[], None]] = lambda read: lambda: None
        self.tracer_provider = tracer_provider or trace.NoOpTracerProvider()
        self.meter_provider = meter_provider or metrics.NoOpMeterProvider()
        self.tracing = tracer_provider is not None
        self._closers = closers
        # The `tenant` label of request metrics: the server sets it so that only tenants the
        # keys file knows become label values (others are "other"), bounding the series.
        self.tenant_label: Callable[[str], str] = lambda tenant: tenant
        self.tracer = self.tracer_provider.get_tracer(SCOPE)
        m = self.meter_provider.get_meter(SCOPE)

        def histogram(name: str, description: str):
            return m.create_histogram(name, unit="s", description=description, explicit_bucket_boundaries_advisory=LATENCY_BUCKETS)

        self.rpc_requests = m.create_counter("loramux.rpc.requests", unit="{request}", description="RPCs handled, by method and status code")
        self.rpc_duration = histogram("loramux.rpc.duration", "RPC latency, by method and status code")
        self.http_requests = m.create_counter("loramux.http.requests", unit="{request}",
                                              description="HTTP requests handled (--http-port), by route and status code")
        self.http_duration = histogram("loramux.http.duration", "HTTP request latency, by route and status code "
                                       "(a stream: until its last event)")
        self.ttft = histogram("loramux.generate.time_to_first_token", "From arrival to the first output token")
        self.tokens = m.create_counter("loramux.generate.tokens", unit="{token}", description="Output tokens generated")
        self.cache_hits = m.create_counter("loramux.adapter.cache.hits", unit="{lookup}", description="Adapter found in this tier when a request arrived")
        self.cache_misses = m.create_counter("loramux.adapter.cache.misses", unit="{lookup}", description="Adapter not in this tier when a request arrived")
        self.evictions = m.create_counter("loramux.adapter.evictions", unit="{adapter}", description="Adapters evicted from this tier")
        self.load_duration = histogram("loramux.adapter.load.duration", "Bringing an adapter up one tier (source: host or disk)")
        self.read_duration = histogram("loramux.adapter.read.duration",
                                       "Resolving, fetching and validating a registration's files (source: local, hub or object)")
        self.merge_duration = histogram("loramux.merge.duration", "Merging an adapter into a checkpoint")
        self.prompt_tokens = m.create_counter("loramux.generate.prompt_tokens", unit="{token}",
                                              description="Prompt tokens of finished requests (chargeback, by tenant)")
        self.requests = m.create_counter("loramux.generate.requests", unit="{request}",
                                         description="Generations finished, by model and finish reason (stop, length)")
        # OpenTelemetry's GenAI semantic conventions (gen_ai.*), by operation, requested model
        # (an adapter's id, or the base model's name) and tenant.
        self.gen_ttft = histogram("gen_ai.server.time_to_first_token", "Time to generate the first token")
        self.gen_tpot = m.create_histogram("gen_ai.server.time_per_output_token", unit="s",
                                           description="Time per output token after the first (decode)",
                                           explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self.gen_duration = histogram("gen_ai.server.request.duration", "Generation request duration, end to end")
        self.token_usage = m.create_histogram("gen_ai.client.token.usage", unit="{token}",
                                              description="Tokens per request, by gen_ai.token.type (input, output)",
                                              explicit_bucket_boundaries_advisory=TOKEN_COUNT_BUCKETS)
        self._models: dict[str, set[str]] = {}  # tenant label -> its models with series of their own
        self._meter = m

    # -- set-up -------------------------------------------------------------------------

    def observe(self, stats: Callable[[], object], usage: Callable[[], dict], pinned: Callable[[], int],
                kv_usage: Callable[[], float] = lambda: 0.0) -> None:
        """Gauges read when metrics are collected: engine stats (queue, rows), the KV cache's
        use and cache usage per tier."""
        m = self._meter

        def gauge(name: str, unit: str, description: str, read: Callable[[], list]) -> None:
            m.create_observable_gauge(name, callbacks=[lambda options: read()], unit=unit, description=description)

        gauge("loramux.queue.depth", "{request}", "Requests waiting to be admitted",
              lambda: [metrics.Observation(stats().waiting)])
        gauge("loramux.batch.size", "{request}", "Rows in the running batch",
              lambda: [metrics.Observation(stats().running)])
        gauge("loramux.adapter.resident", "{adapter}", "Registered adapters per tier",
              lambda: [metrics.Observation(n, {"tier": t.value}) for t, (n, _) in usage().items()])
        gauge("loramux.adapter.resident.bytes", "By", "Bytes of adapter weights per tier",
              lambda: [metrics.Observation(b, {"tier": t.value}) for t, (_, b) in usage().items()])
        gauge("loramux.adapter.pinned", "{adapter}", "Adapters pinned in slots",
              lambda: [metrics.Observation(pinned())])
        gauge("loramux.kv_cache.usage", "1", "The KV cache's share in use, 0 to 1 (static: rows taken; dynamic: "
              "the running batch's padded positions over --max-batch-tokens)", lambda: [metrics.Observation(kv_usage())])

    def observe_lora(self, in_use: Callable[[], tuple[Counter[str], Counter[str]]], slots: int, memory_bytes: int) -> None:
        """Signals for routers: capacity; running and waiting requests of the busiest adapters
        (ADAPTER_REQUESTS_TOP of them, the rest as `other`); and the `lora_requests_info` form
        Kubernetes inference routers read (vLLM's convention): one series whose labels list the
        running and waiting adapters and the most adapters served at once, valued with the time
        it was read."""
        m = self._meter
        m.create_observable_gauge("loramux.adapter.slots", callbacks=[lambda o: [metrics.Observation(slots)]],
                                  unit="{adapter}", description="Adapters the accelerator may hold at once (--adapter-slots)")
        m.create_observable_gauge("loramux.adapter.memory.capacity", callbacks=[lambda o: [metrics.Observation(memory_bytes)]],
                                  unit="By", description="Accelerator bytes for resident adapters (--adapter-memory-mib)")

        def info(options):
            running, waiting = in_use()
            labels = {"running_lora_adapters": ",".join(list(running)[:LORA_INFO_MAX]),
                      "waiting_lora_adapters": ",".join(list(waiting)[:LORA_INFO_MAX]), "max_lora": str(slots)}
            return [metrics.Observation(time.time(), labels)]

        def per_adapter(options):
            running, waiting = in_use()
            busiest = {name for name, _ in (running + waiting).most_common(ADAPTER_REQUESTS_TOP)}
            out = []
            for state, counts in (("running", running), ("waiting", waiting)):
                rest = sum(n for name, n in counts.items() if name not in busiest)
                out += [metrics.Observation(n, {"adapter": name, "state": state}) for name, n in counts.items() if name in busiest]
                out.append(metrics.Observation(rest, {"adapter": "other", "state": state}))
            return out

        m.create_observable_gauge("loramux.adapter.requests", callbacks=[per_adapter], unit="{request}",
                                  description="Running rows and waiting requests of the busiest adapters (tenant/adapter; the rest: other)")

        m.create_observable_gauge("lora_requests_info", callbacks=[info],
                                  description="Running and waiting adapters (tenant/adapter), and max_lora, as labels")

    def shutdown(self) -> None:
        """Flush and stop exporters (and the metrics endpoint)."""
        for close in self._closers:
            close()

    # -- events from the engine ---------------------------------------------------------

    def model_label(self, tenant: str, name: str) -> str:
        """`name` as a metric label: each tenant's first MODEL_LABELS_PER_TENANT distinct names
        keep their own series, its later ones share `other` (adapters are unbounded; series must
        not be, and no tenant can use up another's). `tenant` is the tenant's label."""
        mine = self._models.setdefault(tenant, set())
        if name in mine:
            return name
        if len(mine) < MODEL_LABELS_PER_TENANT:
            mine.add(name)
            return name
        return "other"

    def generation_finished(self, tenant: str, model: str, operation: str, finish_reason: str, prompt_tokens: int,
                            output_tokens: int, ttft_s: float, total_s: float) -> None:
        """A generation's metrics: loramux's, and the GenAI conventions' (vLLM's names are
        made from these at the Prometheus endpoint: providers.py)."""
        tenant = self.tenant_label(tenant)
        model = self.model_label(tenant, model)
        self.tokens.add(output_tokens, {"tenant": tenant})
        self.prompt_tokens.add(prompt_tokens, {"tenant": tenant})
        self.ttft.record(ttft_s, {"tenant": tenant})
        self.requests.add(1, {"gen_ai.request.model": model, "finish_reason": finish_reason})
        attrs = {"gen_ai.operation.name": operation, "gen_ai.request.model": model, "tenant": tenant}
        self.gen_ttft.record(ttft_s, attrs)
        if output_tokens > 1:
            self.gen_tpot.record((total_s - ttft_s) / (output_tokens - 1), attrs)
        self.gen_duration.record(total_s, attrs)
        if prompt_tokens:  # (one of a request's n completions counts its shared prompt)
            self.token_usage.record(prompt_tokens, {**attrs, "gen_ai.token.type": "input"})
        self.token_usage.record(output_tokens, {**attrs, "gen_ai.token.type": "output"})

    def generation_failed(self, tenant: str, model: str, operation: str, error_type: str, total_s: float) -> None:
        tenant = self.tenant_label(tenant)
        self.gen_duration.record(total_s, {"gen_ai.operation.name": operation, "gen_ai.request.model": self.model_label(tenant, model),
                                           "tenant": tenant, "error.type": error_type})

    def adapter_lookup(self, found: Tier) -> None:
        """A request's adapter was found in `found`: a miss in every faster tier, a hit there."""
        for tier in TIERS[: TIERS.index(found)]:
            self.cache_misses.add(1, {"tier": tier.value})
        self.cache_hits.add(1, {"tier": found.value})

    def adapter_read(self, source: str, seconds: float) -> None:
        self.read_duration.record(seconds, {"source": source})

    def cache_event(self, kind: str, uid: int, tier: Tier, seconds: float | None) -> None:
        if kind == "evict":
            self.evictions.add(1, {"tier": tier.value})
        elif kind == "load" and seconds is not None:
            self.load_duration.record(seconds, {"source": tier.value})

