"""Tracing for the overhead measurement: the SDK with batch processors and an exporter that
encodes every span to OTLP protobuf, as a real exporter does, then drops the bytes (no
collector competes for the same CPUs)."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult


class EncodingExporter(SpanExporter):
    def __init__(self):
        self.spans = 0
        self.bytes = 0

    def export(self, spans):
        self.bytes += len(encode_spans(spans).SerializeToString())
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass


def traced_provider() -> tuple[TracerProvider, BatchSpanProcessor, EncodingExporter]:
    exporter = EncodingExporter()
    processor = BatchSpanProcessor(exporter)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    return provider, processor, exporter
