"""Build the OpenTelemetry SDK providers and exporters the settings ask for.

Exporters read the standard `OTEL_EXPORTER_OTLP_*` variables themselves (endpoint,
headers, certificates, timeouts) when the settings leave them unset; the resource picks up
`OTEL_RESOURCE_ATTRIBUTES`, and the tracer provider `OTEL_TRACES_SAMPLER`. Nothing is read
at import.
"""

from __future__ import annotations

import sys
from importlib import metadata

from loramux.server.errors import InvalidSettings
from loramux.server.settings import Settings
from loramux.server.telemetry.signals import Telemetry


def build_telemetry(settings: Settings, span_processors=(), metric_readers=()) -> Telemetry:
    """Providers for the settings' exporters, plus any processors/readers given (tests)."""
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
    if settings.metrics_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        from loramux.server.telemetry.vllm_names import VllmNames

        own = CollectorRegistry(auto_describe=True)  # this server's series alone (not the process-wide registry)
        from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

        for collector in (ProcessCollector, PlatformCollector, GCCollector):  # process_*, python_* as before
            collector(registry=own)
        readers.append(PrometheusMetricReader(registry=own))
        served = CollectorRegistry(auto_describe=False)
        served.register(VllmNames(own))  # loramux's series, then vLLM's names for the ones dashboards read
        address = settings.metrics_host
        try:
            http_server, thread = start_http_server(settings.metrics_port, addr=address, registry=served)
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
    return Telemetry(tracer_provider, meter_provider, tuple(closers), metrics_port)


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
