"""Build the OpenTelemetry SDK providers and exporters the settings ask for.

Exporters read the standard `OTEL_EXPORTER_OTLP_*` variables themselves (endpoint,
headers, certificates, timeouts) when the settings leave them unset; the resource picks up
`OTEL_RESOURCE_ATTRIBUTES`, and the tracer provider `OTEL_TRACES_SAMPLER`. Nothing is read
at import.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from importlib import metadata

from loramux.server.errors import InvalidSettings
from loramux.server.settings import Settings
from loramux.server.telemetry.signals import Telemetry

log = logging.getLogger(__name__)
ENGINE_SERIES_WARN_S = 60.0  # an engine whose series cannot be read is reported at most this often


def build_telemetry(settings: Settings, span_processors=(), metric_readers=(), role: str = "server") -> Telemetry:
    """Providers for the settings' exporters, plus any processors/readers given (tests).

    `role`: "server" (the whole server in one process, or the front doors' process of a server
    whose engine runs in its own) or "engine" (that engine process). An engine process serves
    no metrics endpoint: its Prometheus series are read through `Telemetry.scrape` and served
    with the front doors' process's own (`Telemetry.serve_engine_series`: the engine's
    exposition text, read at each scrape)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": settings.service_name, "service.version": _version()})
    closers = []
    tracer_provider = None
    processors = [BatchSpanProcessor(_span_exporter(name, settings)) for name in settings.traces_exporters]
    processors += list(span_processors)
    if processors:
        tracer_provider = TracerProvider(resource=resource)
        for processor in processors:
            tracer_provider.add_span_processor(processor)
        closers.append(tracer_provider.shutdown)

    readers = list(metric_readers)
    scrape = None
    if settings.metrics_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

        own = CollectorRegistry(auto_describe=True)  # this server's series alone (not the process-wide registry)
        if role == "engine":  # its process's memory and CPU, named apart from the front doors' process's
            ProcessCollector(namespace="loramux_engine", registry=own)
            readers.append(PrometheusMetricReader(registry=own, disable_target_info=True))  # the front doors' says it
            scrape = _exposition(own)
        else:
            for collector in (ProcessCollector, PlatformCollector, GCCollector):  # process_*, python_* as before
                collector(registry=own)
            readers.append(PrometheusMetricReader(registry=own))
    if settings.metrics_port is not None and role != "engine":
        from loramux.server.telemetry.vllm_names import VllmNames

        served = CollectorRegistry(auto_describe=False)
        served.register(VllmNames(own))  # loramux's series, then vLLM's names for the ones dashboards read
        address = settings.metrics_host
        try:
            http_server, thread = _serve_metrics(served, address, settings.metrics_port)
        except OSError as e:
            raise InvalidSettings(f"cannot listen on {address}:{settings.metrics_port} ({e.strerror or e}): the port is in "
                                  "use by another process, or the address is not this host's", field="metrics_port") from None
        metrics_port = http_server.server_port

        def stop_http() -> None:
            http_server.shutdown()
            http_server.server_close()
            thread.join(5)

        closers.append(stop_http)
    else:
        metrics_port = None
    for name in settings.metrics_exporters:
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(_metric_exporter(name, settings)))
    meter_provider = None
    if readers:
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        closers.insert(0, meter_provider.shutdown)
    telemetry = Telemetry(tracer_provider, meter_provider, tuple(closers), metrics_port)
    telemetry.scrape = scrape
    if metrics_port is not None:
        def serve_engine_series(read: Callable[[], str]) -> Callable[[], None]:
            collector = EngineSeries(read)
            own.register(collector)
            return lambda: own.unregister(collector)

        telemetry.serve_engine_series = serve_engine_series
    return telemetry


def _serve_metrics(registry, host: str, port: int):
    """The Prometheus endpoint on its own threads, always in the classic text format.

    prometheus_client (0.26) writes OpenMetrics, which Prometheus asks for first, with sample
    names escaped as label names are, so a `vllm:` family's samples come out as `vllm_...`
    under a `vllm:` TYPE line (a parser then sees other families, which clash). The text
    format keeps the colons, and every Prometheus reads it."""
    import socket
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import make_wsgi_app

    metrics_app = make_wsgi_app(registry)

    def text_format(environ, start_response):
        environ = {k: v for k, v in environ.items() if k != "HTTP_ACCEPT"}  # the default: text 0.0.4
        return metrics_app(environ, start_response)

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args) -> None:  # no line per scrape on stderr
            pass

    http_server = make_server(host, port, text_format, Server, handler_class=Quiet)
    thread = threading.Thread(target=http_server.serve_forever, name="loramux-metrics", daemon=True)
    thread.start()
    return http_server, thread


def _exposition(registry) -> Callable[[], str]:
    from prometheus_client import generate_latest

    return lambda: generate_latest(registry).decode()


class EngineSeries:
    """A collector: the engine process's series, read from its exposition text at each scrape.
    An engine that does not answer (it exited, or is stuck past the read's time limit) leaves
    them out of that scrape; the front doors' own series are still served."""

    def __init__(self, read: Callable[[], str]):
        self._read = read
        self._warned = 0.0

    def describe(self):
        return []  # nothing is read when it is registered (the engine may not run yet)

    def collect(self):
        from prometheus_client.parser import text_string_to_metric_families

        try:
            families = list(text_string_to_metric_families(self._read()))
        except Exception as e:  # noqa: BLE001 - the scrape goes on without them
            now = time.monotonic()
            if now - self._warned > ENGINE_SERIES_WARN_S:  # a dead or stuck engine: not a traceback per scrape
                self._warned = now
                log.warning("the engine process's metrics could not be read for this scrape (%s: %s)",
                            type(e).__name__, e)
            return
        yield from families


def _span_exporter(name: str, settings: Settings):
    endpoint = settings.otlp_endpoint
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(out=sys.stdout)  # the stream of now, not of import time
    if settings.otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint, insecure=_insecure(endpoint))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

    return HttpSpanExporter(endpoint=_http_path(endpoint, "traces"))


def _metric_exporter(name: str, settings: Settings):
    endpoint = settings.otlp_endpoint
    if name == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter(out=sys.stdout)
    if settings.otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter(endpoint=endpoint, insecure=_insecure(endpoint))
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter

    return HttpMetricExporter(endpoint=_http_path(endpoint, "metrics"))


def _insecure(endpoint: str | None) -> bool | None:
    """http:// endpoints are plaintext; otherwise the exporter decides (OTEL_EXPORTER_OTLP_INSECURE)."""
    return True if endpoint and endpoint.startswith("http://") else None


def _http_path(endpoint: str | None, signal: str) -> str | None:
    """OTLP/HTTP posts to <base>/v1/<signal>; a base endpoint from the settings gets that path."""
    if endpoint is None:
        return None
    return endpoint if endpoint.rstrip("/").endswith(f"/v1/{signal}") else endpoint.rstrip("/") + f"/v1/{signal}"


def _version() -> str:
    try:
        return metadata.version("loramux")
    except metadata.PackageNotFoundError:
        return "0"
