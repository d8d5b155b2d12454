"""Tracing, metrics and logs with the real OpenTelemetry SDK: span trees of every RPC (client
and server in one trace), spans reaching a real OTLP receiver, a Prometheus scrape whose
numbers move as requests run and adapters are evicted, and JSON logs carrying trace ids."""

import asyncio
import io
import json
import logging
import threading
import time
import urllib.request
from pathlib import Path
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from google.longrunning import operations_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import loramux.client as lc
from loramux.client.errors import from_rpc_error
from loramux.v1 import adapter_pb2
from conftest import PROMPTS, eventually, scrape
from loramux.server.app import BackgroundServer
from loramux.server.telemetry.logs import JsonFormatter
from loramux.server.telemetry.providers import build_telemetry

ROOT = Path(__file__).resolve().parents[1]
N = 6
SERVICE = "/loramux.v1.Loramux/"


@pytest.fixture(scope="module")
def traced(assets, tmp_path_factory):
    exporter = InMemorySpanExporter()
    settings = assets.settings(adapter_slots=2, merge_root=tmp_path_factory.mktemp("merged"), batch_window_ms=0)
    reader = InMemoryMetricReader()
    telemetry = build_telemetry(settings, span_processors=[SimpleSpanProcessor(exporter)], metric_readers=[reader])
    telemetry.test_reader = reader
    server = BackgroundServer(settings, telemetry=telemetry)
    client_provider = TracerProvider()
    client_provider.add_span_processor(SimpleSpanProcessor(exporter))
    client = lc.Client(server.target, timeout=60, tracer_provider=client_provider)
    yield server, client, exporter
    client.close()
    server.stop()
    telemetry.shutdown()


def spans_after(exporter, call, expect: set[str], timeout=10.0):
    """Run `call`; return (its result or error, the spans it produced once all `expect` names are in)."""
    exporter.clear()
    try:
        result = call()
    except lc.LoramuxError as e:
        result = e
    # An RPC's name is expected twice: its client span and its server span.
    wanted = {(n, k) for n in expect for k in ((SpanKind.CLIENT, SpanKind.SERVER) if n.startswith("/") else (None,))}
    def spans_wanted():
        spans = exporter.get_finished_spans()
        have = {(s.name, s.kind) for s in spans} | {(s.name, None) for s in spans}
        assert wanted <= have, sorted(n for n, _ in have)
        return list(spans)

    return result, eventually(spans_wanted, within=timeout)


def rpc_pair(spans, method, service=SERVICE):
    client = next(s for s in spans if s.name == service + method and s.kind is SpanKind.CLIENT)
    server = next(s for s in spans if s.name == service + method and s.kind is SpanKind.SERVER)
    assert server.context.trace_id == client.context.trace_id
    assert server.parent.span_id == client.context.span_id
    return client, server


ENGINE_SPANS = {"loramux.queue", "loramux.adapter.resolve", "loramux.prefill", "loramux.decode"}


def check_generate_tree(assets, spans, method, token_ids, tier):
    _, server = rpc_pair(spans, method)
    children = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == server.context.span_id}
    assert set(children) == ENGINE_SPANS
    a = server.attributes
    assert a["gen_ai.request.model"] == "pattern" and a["gen_ai.request.max_tokens"] == N  # the model the caller named
    assert a["loramux.base_model"] == assets.base.name  # a name, never the server's path
    assert a["gen_ai.request.temperature"] == 0.0 and a["loramux.adapter.id"] == "pattern"
    assert a["loramux.tenant"] == "default" and a["rpc.grpc.status_code"] == 0
    assert a["gen_ai.usage.input_tokens"] == len(assets.tokenizer(PROMPTS[0])["input_ids"])
    assert a["gen_ai.usage.output_tokens"] == len(token_ids)
    expected = "stop" if token_ids[-1] == assets.tokenizer.eos_token_id else "length"  # the standard values
    assert a["gen_ai.response.finish_reasons"] == (expected,)
    resolve = children["loramux.adapter.resolve"]
    assert resolve.attributes["loramux.adapter.tier"] == tier
    assert ("loramux.adapter.load_ms" in resolve.attributes) == (tier != "accelerator")
    decode, prefill, queue = children["loramux.decode"], children["loramux.prefill"], children["loramux.queue"]
    assert decode.attributes["gen_ai.usage.output_tokens"] == len(token_ids)
    assert prefill.attributes["gen_ai.usage.input_tokens"] == a["gen_ai.usage.input_tokens"]
    assert queue.start_time <= queue.end_time <= prefill.start_time <= prefill.end_time <= decode.end_time <= server.end_time
    assert all(s.status.status_code is StatusCode.UNSET for s in children.values())


def test_generate_unary_and_stream_span_trees(assets, traced):
    server, client, exporter = traced
    client.load_adapter("pattern", source="pattern")
    result, spans = spans_after(exporter, lambda: client.generate(prompt=PROMPTS[0], adapter_id="pattern", max_new_tokens=N),
                                ENGINE_SPANS | {SERVICE + "Generate"})
    assert result.token_ids == assets.oracle("pattern", PROMPTS[0], N)
    check_generate_tree(assets, spans, "Generate", result.token_ids, "host")  # first use: promoted from host memory
    chunks, spans = spans_after(
        exporter, lambda: list(client.generate_stream(prompt=PROMPTS[0], adapter_id="pattern", max_new_tokens=N)),
        ENGINE_SPANS | {SERVICE + "GenerateStream"},
    )
    check_generate_tree(assets, spans, "GenerateStream", sum((c.token_ids for c in chunks), []), "accelerator")


def test_async_client_calls_join_the_server_trace(traced):
    server, _, exporter = traced
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def call():
        async with lc.AsyncClient(server.target, timeout=60, tracer_provider=provider) as client:
            return await client.generate(prompt=PROMPTS[2], max_new_tokens=2)

    result, spans = spans_after(exporter, lambda: asyncio.run(call()), {SERVICE + "Generate", "loramux.decode"})
    _, server_span = rpc_pair(spans, "Generate")  # the pair shares one trace, server under client
    assert server_span.attributes["gen_ai.usage.output_tokens"] == len(result.token_ids) == 2


def test_failing_call_records_the_real_status_code(traced):
    _, client, exporter = traced
    error, spans = spans_after(exporter, lambda: client.generate(prompt="x", adapter_id="nope"), {SERVICE + "Generate"})
    assert isinstance(error, lc.NotFound)
    client_span, server_span = rpc_pair(spans, "Generate")
    for span in (client_span, server_span):
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert not [s for s in spans if s.name.startswith("loramux.")]  # refused before reaching the engine


def raw(stub_method, request):
    """A call through the client's own (traced) stub, for requests its methods never send."""
    try:
        return stub_method(request, timeout=60)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None


def test_every_rpc_is_traced_but_health_checks(assets, traced, tmp_path):
    server, client, exporter = traced
    calls = [
        ("LoadAdapter", lambda: client.load_adapter("qv-r4", source="qv-r4")),
        ("GetAdapter", lambda: client.get_adapter("qv-r4")),
        ("ListAdapters", lambda: client.list_adapters()),
        ("GetServerInfo", lambda: client.server_info()),
        ("UnloadAdapter", lambda: client.unload_adapter("qv-r4")),
    ]
    for method, call in calls:
        _, spans = spans_after(exporter, call, {SERVICE + method})
        rpc_pair(spans, method)
    failing = [
        ("LoadAdapter", lambda: client.load_adapter("x", source="../../etc"), grpc.StatusCode.INVALID_ARGUMENT, "SOURCE_OUTSIDE_ROOT"),
        ("GetAdapter", lambda: client.get_adapter("nope"), grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND"),
        ("ListAdapters", lambda: raw(client._stub.ListAdapters, adapter_pb2.ListAdaptersRequest(page_token="garbage")),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN"),
        ("UnloadAdapter", lambda: client.unload_adapter("nope"), grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND"),
        ("Merge", lambda: client.merge("nope", "out"), grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND"),
        ("GenerateStream", lambda: list(client.generate_stream(prompt="x", adapter_id="nope")), grpc.StatusCode.NOT_FOUND,
         "ADAPTER_NOT_FOUND"),
    ]
    for method, call, code, reason in failing:
        error, spans = spans_after(exporter, call, {SERVICE + method})
        assert error.code is code and error.reason == reason, (method, error)
        client_span, server_span = rpc_pair(spans, method)
        assert server_span.status.status_code is StatusCode.ERROR and server_span.attributes["error.type"] == reason
        assert server_span.attributes["rpc.grpc.status_code"] == client_span.attributes["rpc.grpc.status_code"] == code.value[0]
    channel = grpc.insecure_channel(server.target)
    _, spans = spans_after(exporter, lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()),
                           set(), timeout=0)
    time.sleep(0.2)
    assert not exporter.get_finished_spans()
    channel.close()


def test_merge_phases_are_spans_under_the_merge_call(traced):
    _, client, exporter = traced
    client.load_adapter("mlp-r2", source="mlp-r2")
    phases = {"loramux.merge.read_adapter", "loramux.merge.merge_tensors", "loramux.merge.write_checkpoint"}
    handle, spans = spans_after(exporter, lambda: client.merge("mlp-r2", "traced-merge"),
                                {SERVICE + "Merge", "loramux.merge", *phases})
    # Asked directly: the handle's result() skips WaitOperation when the merge was done in time.
    wait = operations_pb2.WaitOperationRequest(name=handle.name)
    done, wait_spans = spans_after(exporter, lambda: client._operations.WaitOperation(wait, timeout=60),
                                   {"/google.longrunning.Operations/WaitOperation"})
    assert done.done and handle.result(timeout=60).merged_tensors > 0
    rpc_pair(wait_spans, "WaitOperation", service="/google.longrunning.Operations/")
    _, server_span = rpc_pair(spans, "Merge")
    merge = next(s for s in spans if s.name == "loramux.merge")
    assert merge.parent.span_id == server_span.context.span_id and merge.attributes["loramux.adapter.id"] == "mlp-r2"
    for name in phases:
        assert next(s for s in spans if s.name == name).parent.span_id == merge.context.span_id
    tensors = next(s for s in spans if s.name == "loramux.merge.merge_tensors").attributes["loramux.merge.tensors"]
    assert tensors > 0


class _TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.requests = []
        self.metrics = []

    def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsReceiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, into: list):
        self.into = into

    def Export(self, request, context):
        self.into.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


def _metric_names(requests):
    return {m.name for r in requests for rm in r.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


def _received(requests):
    out = {}
    for request in requests:
        for resource_spans in request.resource_spans:
            attrs = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    out.setdefault(attrs.get("service.name"), set()).add(span.name)
    return out


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_spans_and_metrics_reach_a_real_otlp_receiver(assets, protocol):
    receiver = _TraceReceiver()
    if protocol == "grpc":
        collector = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, collector)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsReceiver(receiver.metrics), collector)
        port = collector.add_insecure_port("127.0.0.1:0")
        collector.start()
        stop = lambda: collector.stop(0)  # noqa: E731
    else:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    receiver.requests.append(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                    reply = trace_service_pb2.ExportTraceServiceResponse()
                else:
                    assert self.path == "/v1/metrics", self.path
                    receiver.metrics.append(metrics_service_pb2.ExportMetricsServiceRequest.FromString(body))
                    reply = metrics_service_pb2.ExportMetricsServiceResponse()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()
                self.wfile.write(reply.SerializeToString())

            def log_message(self, *args):
                pass

        collector = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        port = collector.server_port
        threading.Thread(target=collector.serve_forever, daemon=True).start()
        stop = collector.shutdown
    try:
        settings = assets.settings(traces_exporters=("otlp",), metrics_exporters=("otlp",), otlp_protocol=protocol,
                                   otlp_endpoint=f"http://127.0.0.1:{port}", service_name="loramux-otlp-test")
        with BackgroundServer(settings) as server:
            with lc.Client(server.target, timeout=60) as client:
                client.generate(prompt=PROMPTS[1], max_new_tokens=3)
        # Stopping the server shut its telemetry down, which flushed the batch processor.
        names = _received(receiver.requests)["loramux-otlp-test"]
        assert {SERVICE + "Generate", "loramux.queue", "loramux.prefill", "loramux.decode"} <= names
        # Metrics too: the periodic reader exports once more when it shuts down.
        assert {"loramux.rpc.requests", "loramux.generate.tokens", "loramux.queue.depth"} <= _metric_names(receiver.metrics)
    finally:
        stop()


def test_prometheus_endpoint_moves_with_requests_and_evictions(assets, tmp_path):
    settings = assets.settings(adapter_slots=1, metrics_port=0, batch_window_ms=0, merge_root=tmp_path / "merged")
    with BackgroundServer(settings) as server, lc.Client(server.target, timeout=60) as client:
        port = server.telemetry.metrics_port
        for name in ("qv-r4", "mlp-r2"):
            client.load_adapter(name, source=name)
        before = scrape(port)
        assert before[("loramux_adapter_resident", (("tier", "host"),))] == 2
        assert before[("loramux_adapter_resident", (("tier", "accelerator"),))] == 0
        tokens = 0
        for adapter in ("qv-r4", "mlp-r2", "qv-r4"):  # one slot: each switch evicts the other
            tokens += len(client.generate(prompt=PROMPTS[0], adapter_id=adapter, max_new_tokens=N).token_ids)
        after = scrape(port)  # everything below is recorded before the reply is sent
        ok = (("rpc_grpc_status_code", "OK"), ("rpc_method", "Generate"))
        assert after[("loramux_rpc_requests_total", ok)] == 3
        assert after[("loramux_rpc_duration_seconds_count", ok)] == 3
        tenant = (("tenant", "default"),)  # auth=none: every call is the default tenant
        assert after[("loramux_generate_tokens_total", tenant)] == tokens
        assert after[("loramux_generate_time_to_first_token_seconds_count", tenant)] == 3
        assert after[("loramux_adapter_evictions_total", (("tier", "accelerator"),))] == 2
        assert after[("loramux_adapter_cache_misses_total", (("tier", "accelerator"),))] == 3
        assert after[("loramux_adapter_cache_hits_total", (("tier", "host"),))] == 3
        assert after[("loramux_adapter_load_duration_seconds_count", (("source", "host"),))] == 3
        assert after[("loramux_adapter_resident", (("tier", "accelerator"),))] == 1
        assert after[("loramux_adapter_resident", (("tier", "host"),))] == 1
        assert after[("loramux_adapter_resident_bytes", (("tier", "host"),))] > 0
        assert after[("loramux_queue_depth", ())] == 0 and after[("loramux_batch_size", ())] == 0
        assert after[("loramux_adapter_pinned", ())] == 0
        with pytest.raises(lc.NotFound):
            client.generate(prompt="x", adapter_id="nope")
        failed = scrape(port)[("loramux_rpc_requests_total", (("rpc_grpc_status_code", "NOT_FOUND"), ("rpc_method", "Generate")))]
        assert failed == 1
        stream = client.generate_stream(prompt=PROMPTS[0], max_new_tokens=40)
        next(stream)
        stream.close()  # the caller goes away mid-stream
        cancelled = ("loramux_rpc_requests_total", (("rpc_grpc_status_code", "CANCELLED"), ("rpc_method", "GenerateStream")))
        eventually(lambda: scrape(port).get(cancelled) == 1, within=10)
        client.merge("qv-r4", "m1").result(timeout=60)
        merged = scrape(port)
        assert merged[("loramux_merge_duration_seconds_count", (("outcome", "ok"),))] == 1



def test_json_logs_carry_the_request_trace(assets, traced):
    _, client, exporter = traced
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("loramux.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        _, spans = spans_after(exporter, lambda: client.generate(prompt="x", max_new_tokens=2), {SERVICE + "Generate"})
    finally:
        access.removeHandler(handler)
    _, server_span = rpc_pair(spans, "Generate")
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    record = next(r for r in records if r["rpc_method"] == "Generate")
    assert record["trace_id"] == format(server_span.context.trace_id, "032x")
    assert record["span_id"] == format(server_span.context.span_id, "016x")
    assert record["grpc_code"] == "OK" and record["level"] == "INFO" and record["logger"] == "loramux.access"


def test_a_request_that_dies_in_the_queue_marks_its_queue_span(traced):
    server, client, exporter = traced
    gate, entered = threading.Event(), threading.Event()

    def hold():
        entered.set()
        gate.wait(30)

    server.engine.call_on_engine(hold)
    assert entered.wait(10)
    try:
        error, spans = spans_after(exporter, lambda: client.generate(prompt="x", max_new_tokens=2, timeout=0.3),
                                   {SERVICE + "Generate"})
    finally:
        gate.set()
    assert isinstance(error, lc.DeadlineExceeded)
    queue = eventually(lambda: next((s for s in exporter.get_finished_spans() if s.name == "loramux.queue"), False),
                       within=10)
    assert queue.status.status_code is StatusCode.ERROR
    # The caller's deadline both expires the request and cancels the call: whichever the
    # engine sees first names the error.
    assert queue.attributes["error.type"] in ("DEADLINE_EXCEEDED", "CANCELLED")
    assert not [s for s in exporter.get_finished_spans() if s.name in ("loramux.prefill", "loramux.decode")]


def gauge(reader, name):
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    return {tuple(sorted(p.attributes.items())): p.value for p in metric.data.data_points}
    raise KeyError(name)


def test_pinned_gauge_follows_pins(traced):
    server, client, _ = traced
    reader = server.telemetry.test_reader
    assert gauge(reader, "loramux.adapter.pinned") == {(): 0}
    client.load_adapter("rslora-r8", source="rslora-r8", pin=True)
    assert gauge(reader, "loramux.adapter.pinned") == {(): 1}
    resident = gauge(reader, "loramux.adapter.resident")
    assert resident[(("tier", "accelerator"),)] >= 1
    client.unload_adapter("rslora-r8")
    assert gauge(reader, "loramux.adapter.pinned") == {(): 0}


def test_console_exporter_prints_spans_at_shutdown(assets, capsys):
    telemetry = build_telemetry(assets.settings(traces_exporters=("console",)))
    with telemetry.tracer.start_as_current_span("loramux.console-check"):
        pass
    telemetry.shutdown()  # flushes the batch processor
    printed = json.loads(capsys.readouterr().out)
    assert printed["name"] == "loramux.console-check"
    assert printed["resource"]["attributes"]["service.name"] == "loramux"


def test_router_signals_lora_requests_info_and_capacity(assets, tmp_path):
    """The running and waiting adapters in vLLM's `lora_requests_info` form (what Kubernetes
    inference routers read), and the adapter capacity."""
    settings = assets.settings(adapter_slots=3, metrics_port=0, batch_window_ms=0)
    with BackgroundServer(settings) as server, lc.Client(server.target, timeout=60) as client:
        for name in ("qv-r4", "mlp-r2"):
            client.load_adapter(name, source=name)
        port, engine = server.telemetry.metrics_port, server.engine
        gate, entered = threading.Event(), threading.Event()
        engine.call_on_engine(lambda: (entered.set(), gate.wait(60)))
        assert entered.wait(10)
        calls = [threading.Thread(target=client.generate, kwargs=dict(adapter_id=a, prompt=PROMPTS[0], max_new_tokens=2))
                 for a in ("qv-r4", "mlp-r2", "qv-r4")]
        try:
            for t in calls:
                t.start()
            eventually(lambda: engine.stats().waiting >= 3)
            scraped = scrape(port)
            info = {labels: value for (name, labels), value in scraped.items() if name == "lora_requests_info"}
            per_adapter = {labels: value for (name, labels), value in scraped.items() if name == "loramux_adapter_requests"}
        finally:
            gate.set()
            for t in calls:
                t.join(60)
        (labels,) = info  # one series; the waiting adapters in the order their requests arrived (three threads race)
        assert dict(labels)["max_lora"] == "3" and dict(labels)["running_lora_adapters"] == ""
        assert sorted(dict(labels)["waiting_lora_adapters"].split(",")) == ["default/mlp-r2", "default/qv-r4"]
        assert abs(next(iter(info.values())) - time.time()) < 60
        assert per_adapter == {
            (("adapter", "default/qv-r4"), ("state", "waiting")): 2, (("adapter", "default/mlp-r2"), ("state", "waiting")): 1,
            (("adapter", "other"), ("state", "waiting")): 0, (("adapter", "other"), ("state", "running")): 0,
        }
        samples = scrape(port)
        assert samples[("loramux_adapter_read_duration_seconds_count", (("source", "local"),))] == 2
        assert samples[("loramux_adapter_slots", ())] == 3
        assert samples[("loramux_adapter_memory_capacity_bytes", ())] == engine.adapter_memory_bytes


def test_per_adapter_requests_keep_the_busiest_and_fold_the_rest_into_other():
    """However many adapters a replica serves, loramux_adapter_requests has at most
    ADAPTER_REQUESTS_TOP adapters with series of their own (by running plus waiting)."""
    from collections import Counter

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from loramux.server.telemetry.signals import ADAPTER_REQUESTS_TOP, Telemetry

    reader = InMemoryMetricReader()
    telemetry = Telemetry(meter_provider=MeterProvider(metric_readers=[reader]))
    running = Counter({f"t/a{i:02d}": 1 for i in range(40)})
    waiting = Counter({f"t/a{i:02d}": 5 for i in range(3)} | {"t/solo": 9})
    telemetry.observe_lora(lambda: (running, waiting), slots=8, memory_bytes=1)
    points = gauge(reader, "loramux.adapter.requests")
    own = {dict(k)["adapter"] for k in points} - {"other"}
    assert len(own) == ADAPTER_REQUESTS_TOP and {"t/solo", "t/a00", "t/a01", "t/a02"} <= own
    assert sum(v for k, v in points.items() if dict(k)["state"] == "running") == 40
    assert sum(v for k, v in points.items() if dict(k)["state"] == "waiting") == 24
    assert points[(("adapter", "other"), ("state", "running"))] == 40 - (ADAPTER_REQUESTS_TOP - 1)


def test_genai_and_vllm_series_and_the_dashboard_reads_only_series_the_server_exports(assets, tmp_path):
    """GenAI semantic-convention histograms by operation, model (the adapter) and tenant; the
    prompt-token counter for chargeback; the KV cache gauge; vLLM's names as sums of them; and
    every series the chart's Grafana dashboard queries is one this server exports."""
    import json
    import re

    settings = assets.settings(metrics_port=0, http_port=0, adapter_slots=1)
    with BackgroundServer(settings) as server, lc.Client(server.target, timeout=60) as client:
        client.load_adapter("qv", source="qv-r4")
        client.load_adapter("mlp", source="mlp-r2")
        answers = [client.generate(prompt=PROMPTS[0], adapter_id="qv", max_new_tokens=N),
                   client.generate(prompt=PROMPTS[1], adapter_id="qv", max_new_tokens=N),
                   client.generate(messages=[("user", "hi")], max_new_tokens=N)]
        client.tokenize(prompt="x")
        with pytest.raises(lc.InvalidArgument):
            client.generate(prompt="x", temperature=-1)
        with pytest.raises(lc.InvalidArgument):  # one slot: the other adapter evicts qv (it is refused after)
            client.generate(prompt="x", adapter_id="mlp", max_new_tokens=1, top_p=2)
        client.generate(prompt="x", adapter_id="mlp", max_new_tokens=1)
        urllib.request.urlopen(f"http://127.0.0.1:{server.running.http_port}/v1/models", timeout=10).read()
        got = scrape(server.telemetry.metrics_port)
        # Asked for OpenMetrics first (as Prometheus asks): the text format, whose samples keep vLLM's colons.
        asked = urllib.request.Request(f"http://127.0.0.1:{server.telemetry.metrics_port}/metrics", headers={
            "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"})
        with urllib.request.urlopen(asked, timeout=10) as reply:
            assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = reply.read().decode()
        assert "vllm:time_to_first_token_seconds_count{" in text and "vllm_" not in text
    qv = (("gen_ai_operation_name", "text_completion"), ("gen_ai_request_model", "qv"), ("tenant", "default"))
    base = (("gen_ai_operation_name", "chat"), ("gen_ai_request_model", assets.base.name), ("tenant", "default"))
    assert got[("gen_ai_server_time_to_first_token_seconds_count", qv)] == 2
    assert got[("gen_ai_server_time_to_first_token_seconds_count", base)] == 1
    assert got[("gen_ai_server_time_per_output_token_seconds_count", qv)] == 2
    assert got[("gen_ai_server_request_duration_seconds_count", qv)] == 2
    out = sum(len(a.token_ids) for a in answers[:2])
    assert got[("gen_ai_client_token_usage_sum", (*qv[:2], ("gen_ai_token_type", "output"), qv[2]))] == out
    prompts = sum(a.usage.prompt_tokens for a in answers) + len(assets.tokenizer("x")["input_ids"])
    assert got[("loramux_generate_prompt_tokens_total", (("tenant", "default"),))] == prompts
    assert got[("vllm:prompt_tokens_total", ())] == prompts
    assert got[("vllm:generation_tokens_total", ())] == sum(len(a.token_ids) for a in answers) + 1
    assert got[("vllm:time_to_first_token_seconds_count", (("model_name", "qv"),))] == 2
    assert got[("vllm:e2e_request_latency_seconds_count", (("model_name", assets.base.name),))] == 1
    reasons = {a.finish_reason for a in answers[:2]}
    assert sum(v for (name, labels), v in got.items() if name == "vllm:request_success_total"
               and ("model_name", "qv") in labels) == 2 and reasons <= {"length", "stop_token"}
    assert got[("loramux_kv_cache_usage", ())] == 0.0 == got[("vllm:kv_cache_usage_perc", ())]
    assert got[("vllm:num_requests_running", ())] == got[("loramux_batch_size", ())] == 0

    exported = {name for name, _ in got} | {re.sub(r"_(bucket|count|sum)$", "", name) for name, _ in got}
    dashboard = json.loads((ROOT / "helm" / "loramux" / "dashboards" / "loramux.json").read_text())
    assert dashboard["uid"] == "loramux-overview" and isinstance(dashboard["schemaVersion"], int)
    queried = set()
    for panel in dashboard["panels"]:
        assert {"type", "title", "gridPos", "id"} <= set(panel) and set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            queried |= set(re.findall(r"\b((?:loramux|gen_ai|vllm:)[a-z_:]*)\{", target["expr"]))
    assert len(queried) >= 12 and queried <= exported, queried - exported
