"""A request's metrics and engine spans, recorded with the telemetry's instruments when its
last event is about to be sent: `loramux.queue`, `loramux.adapter.resolve` (when an adapter
is used), `loramux.prefill` and `loramux.decode`, children of the RPC's server span (the
front door hands the engine its context), with their real start and end times."""

from __future__ import annotations

import time

from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode

from loramux.server.engine.request import ErrorEvent, Event, FinishEvent, GenerationRequest
from loramux.server.telemetry.signals import Telemetry


def request_ended(telemetry: Telemetry, request: GenerationRequest, event: Event) -> None:
    """Metrics and the request's engine spans, when its last event is about to be sent."""
    now_ns = time.time_ns()
    if isinstance(event, FinishEvent):
        telemetry.generation_finished(request.tenant, request.model, request.operation, event.finish_reason.openai,
                                      event.prompt_tokens if request.counts_prompt else 0, event.completion_tokens,
                                      event.timings.time_to_first_token_s, event.timings.total_s)
    elif isinstance(event, ErrorEvent):
        telemetry.generation_failed(request.tenant, request.model, request.operation, event.error.reason,
                                    time.monotonic() - request.arrival)
    if not telemetry.tracing:
        return
    t = request.timeline
    ctx: Context | None = request.trace_context
    common = {"loramux.tenant": request.tenant}
    admitted = t.admitted_ns or now_ns
    spans = [("loramux.queue", t.arrival_ns, admitted, common)]
    if request.adapter_uid is not None:
        attrs = {**common, "loramux.adapter.id": request.adapter_id, "loramux.adapter.tier": t.tier_found.value}
        if t.load_s is not None:
            attrs["loramux.adapter.load_ms"] = round(1000 * t.load_s, 3)
        spans.append(("loramux.adapter.resolve", t.arrival_ns, admitted, attrs))
    if t.prefill_start_ns:
        spans.append(("loramux.prefill", t.prefill_start_ns, t.prefill_end_ns or now_ns, {
            "loramux.batch.rows": t.prefill_rows, "gen_ai.usage.input_tokens": request.prompt_tokens,
        }))
    if t.prefill_end_ns:
        attrs = {"gen_ai.usage.output_tokens": t.generated}
        if isinstance(event, FinishEvent):
            attrs["gen_ai.response.finish_reasons"] = (event.finish_reason.openai,)
        spans.append(("loramux.decode", t.prefill_end_ns, now_ns, attrs))
    for i, (name, start_ns, end_ns, attrs) in enumerate(spans):
        span = telemetry.tracer.start_span(name, context=ctx, start_time=start_ns, attributes=attrs)
        if isinstance(event, ErrorEvent) and i == len(spans) - 1:  # the stage it failed in
            span.set_status(Status(StatusCode.ERROR, event.error.message))
            span.set_attribute("error.type", event.error.reason)
        span.end(end_time=end_ns)
