"""loramux.v1.Loramux over the engine. Each RPC converts, calls the engine, converts back.

Blocking engine calls (file reads, validation, tokenization) run in the default executor;
the event loop only awaits. Errors go through `api.status.abort`, the one mapping.

The tracing interceptor (see app.py) makes each call's server span current here; Generate
calls add the GenAI attributes to it and hand its context to the engine, whose spans become
its children. `maps_errors` also counts and times every call and logs one access line.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator

import grpc
from google.protobuf import empty_pb2
from opentelemetry import context as otel_context
from opentelemetry import trace

from loramux.server.api import convert
from loramux.server.api.status import abort, to_status
from loramux.server.engine.engine import Engine
from loramux.server.engine.request import ErrorEvent, Event, FinishEvent, TokenEvent
from loramux.v1 import adapter_pb2, generation_pb2, loramux_service_pb2, loramux_service_pb2_grpc


def tenant_of(context: grpc.aio.ServicerContext, engine: Engine) -> str:
    """The tenant a call runs for. Until authentication lands, everyone is the default tenant."""
    return engine.settings.default_tenant


access_log = logging.getLogger("loramux.access")


def _finished(servicer, name: str, started: float, code: grpc.StatusCode, error: BaseException | None = None) -> None:
    seconds = time.perf_counter() - started
    attributes = {"rpc.method": name, "rpc.grpc.status_code": code.name}
    telemetry = servicer._engine.telemetry
    telemetry.rpc_requests.add(1, attributes)
    telemetry.rpc_duration.record(seconds, attributes)
    extra = {"rpc_method": name, "grpc_code": code.name, "duration_ms": round(1000 * seconds, 3)}
    if error is not None:
        extra["reason"] = getattr(error, "reason", "INTERNAL")
        # The gRPC instrumentation leaves client-side codes (NOT_FOUND, INVALID_ARGUMENT...)
        # unset on server spans; loramux marks every failed call as an error, with its reason.
        span = trace.get_current_span()
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{code.name}: {extra['reason']}"))
        span.set_attribute("error.type", extra["reason"])
    access_log.info("%s %s %.1fms", name, code.name, 1000 * seconds, extra=extra)


def _code_of(error: BaseException) -> grpc.StatusCode:
    code = to_status(error, log_unexpected=False).code
    return next(c for c in grpc.StatusCode if c.value[0] == code)


def maps_errors(method):
    """Turn any exception raised by an RPC method into its gRPC status (unary and streaming);
    count, time and log every call."""
    name = method.__name__
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            started = time.perf_counter()
            try:
                async for item in method(self, request, context):
                    yield item
            except (asyncio.CancelledError, GeneratorExit):  # the caller went away mid-stream
                _finished(self, name, started, grpc.StatusCode.CANCELLED)
                raise
            except Exception as e:
                _finished(self, name, started, _code_of(e), e)
                await abort(context, e)
            else:
                _finished(self, name, started, grpc.StatusCode.OK)

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        started = time.perf_counter()
        try:
            response = await method(self, request, context)
        except asyncio.CancelledError:
            _finished(self, name, started, grpc.StatusCode.CANCELLED)
            raise
        except Exception as e:
            _finished(self, name, started, _code_of(e), e)
            await abort(context, e)
        else:
            _finished(self, name, started, grpc.StatusCode.OK)
            return response

    return unary


async def _blocking(fn, *args, **kwargs):
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kwargs))


def _add_event(message, event: TokenEvent | FinishEvent) -> None:
    """Add an engine event to a GenerateResponse or GenerateStreamResponse (same field names)."""
    if isinstance(event, TokenEvent):
        message.token_ids.extend(event.token_ids)
        message.logprobs.extend(event.logprobs)
    else:
        message.finish_reason = convert.finish_reason(event.finish_reason)
        message.usage.CopyFrom(convert.usage(event.prompt_tokens, event.completion_tokens))
        message.timings.CopyFrom(convert.timings(event.timings))


class LoramuxServicer(loramux_service_pb2_grpc.LoramuxServicer):
    def __init__(self, engine: Engine):
        self._engine = engine

    async def _events(self, request: generation_pb2.GenerateRequest, context) -> AsyncIterator[Event]:
        """Submit to the engine and yield its events; a caller that goes away cancels the row."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:  # engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass

        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        inp = convert.generate_input(request)
        tenant = tenant_of(context, self._engine)
        span = trace.get_current_span()
        span.set_attributes({
            "gen_ai.operation.name": "text_completion",
            "gen_ai.request.model": self._engine.settings.served_model_name,
            "gen_ai.request.max_tokens": inp.max_new_tokens or self._engine.settings.default_max_new_tokens,
            "gen_ai.request.temperature": inp.temperature,
            "loramux.adapter.id": inp.adapter_id,
            "loramux.tenant": tenant,
        })
        submitted = await _blocking(
            self._engine.submit, tenant, inp, emit, deadline, trace_context=otel_context.get_current()
        )
        finished = False
        try:
            while True:
                event = await events.get()
                if isinstance(event, ErrorEvent):
                    finished = True
                    raise event.error
                finished = isinstance(event, FinishEvent)
                if finished:
                    span.set_attributes({
                        "gen_ai.usage.input_tokens": event.prompt_tokens,
                        "gen_ai.usage.output_tokens": event.completion_tokens,
                        "gen_ai.response.finish_reasons": (event.finish_reason.value,),
                    })
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self._engine.cancel(submitted)

    @maps_errors
    async def Generate(self, request, context):
        response = generation_pb2.GenerateResponse()
        text = []
        async for event in self._events(request, context):
            text.append(event.text)
            _add_event(response, event)
        response.text = "".join(text)
        return response

    @maps_errors
    async def GenerateStream(self, request, context):
        async for event in self._events(request, context):
            chunk = generation_pb2.GenerateStreamResponse(text=event.text)
            _add_event(chunk, event)
            yield chunk

    @maps_errors
    async def LoadAdapter(self, request, context):
        record = await _blocking(
            self._engine.load_adapter,
            tenant_of(context, self._engine),
            request.adapter_id,
            request.source,
            revision=request.revision,
            pin=request.pin,
            warm=request.warm,
            replace=request.replace,
        )
        return convert.adapter(record, self._engine.tier(record))

    @maps_errors
    async def UnloadAdapter(self, request, context):
        await _blocking(self._engine.unload_adapter, tenant_of(context, self._engine), request.adapter_id)
        return empty_pb2.Empty()

    @maps_errors
    async def GetAdapter(self, request, context):
        record = self._engine.registry.get(tenant_of(context, self._engine), request.adapter_id)
        return convert.adapter(record, self._engine.tier(record))

    @maps_errors
    async def ListAdapters(self, request, context):
        records = self._engine.registry.list(tenant_of(context, self._engine))
        chosen, token = convert.page(records, request.page_size, request.page_token, key=lambda r: r.adapter_id)
        return adapter_pb2.ListAdaptersResponse(
            adapters=[convert.adapter(r, self._engine.tier(r)) for r in chosen], next_page_token=token
        )

    @maps_errors
    async def Merge(self, request, context):
        op = await _blocking(
            self._engine.start_merge,
            tenant_of(context, self._engine),
            request.adapter_id,
            request.output_dir,
            request.overwrite,
            trace_context=otel_context.get_current(),
        )
        return convert.operation(op)

    @maps_errors
    async def GetServerInfo(self, request, context):
        base, settings = self._engine.base, self._engine.settings
        return loramux_service_pb2.ServerInfo(
            model_id=settings.served_model_name,
            model_revision=base.revision,
            dtype=str(base.dtype).removeprefix("torch."),
            device=str(base.device),
            adapter_slots=settings.adapter_slots,
            host_cache_bytes=settings.host_cache_bytes,
            max_lora_rank=settings.max_lora_rank,
            max_batch_size=settings.max_batch_size,
            max_sequence_length=base.max_sequence_length,
            target_modules=sorted({name.rsplit(".", 1)[-1] for name in base.bank.layers}),
            versions=convert.versions(),
        )
