"""loramux.v1.Loramux over the engine's facade (engine/facade.py). Each RPC converts, calls
the facade, converts back: it decides nothing.

Blocking engine calls run in bounded pools, one per kind of work (`Pools`): tokenizing and
queueing generate calls, and adapter administration (Hub, files, waiting for slots), so a
burst of slow adapter loads cannot delay a Generate. The event loop only awaits. Errors go
through `api.status.abort`, the one mapping.

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

from loramux.server.grpc_api import convert
from loramux.server.tenancy.auth import Authenticator, caller
from loramux.server.front_door.generation import merged as merged_events
from loramux.server.front_door.generation import request_attributes
from loramux.server.front_door.pools import Pools, blocking as _blocking
from loramux.server.grpc_api.status import abort, code_of
from loramux.server.engine.facade import MAX_COMPLETIONS, Event, Facade, FinishEvent, Mailbox, PromptEvent, TokenEvent
from loramux.server.errors import InternalError, InvalidRequest, LoramuxError, ShuttingDown
from loramux.v1 import adapter_pb2, generation_pb2, loramux_service_pb2_grpc


def tenant_of(context: grpc.aio.ServicerContext) -> str:
    """The tenant a call runs for: its API key's (`tenancy/auth.py`, checked before the method ran)."""
    return caller.get().tenant


access_log = logging.getLogger("loramux.access")


def _finished(servicer, name: str, started: float, code: grpc.StatusCode, error: LoramuxError | None = None) -> None:
    seconds = time.perf_counter() - started
    attributes = {"rpc.method": name, "rpc.grpc.status_code": code.name}
    telemetry = servicer.facade.telemetry
    telemetry.rpc_requests.add(1, attributes)
    telemetry.rpc_duration.record(seconds, attributes)
    extra = {"rpc_method": name, "grpc_code": code.name, "duration_ms": round(1000 * seconds, 3)}
    if error is not None:
        extra["reason"] = error.reason
        if "correlation_id" in error.metadata:
            extra["correlation_id"] = error.metadata["correlation_id"]
        # The gRPC instrumentation leaves client-side codes (NOT_FOUND, INVALID_ARGUMENT...)
        # unset on server spans; loramux marks every failed call as an error, with its reason.
        span = trace.get_current_span()
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{code.name}: {error.reason}"))
        span.set_attribute("error.type", error.reason)
    access_log.info("%s %s %.1fms", name, code.name, 1000 * seconds, extra=extra)


class Malformed:
    """What the lenient deserializer (app.py) hands over when a request body does not parse."""

    def __init__(self, message_type: str, detail: str):
        self.message_type = message_type
        self.detail = detail


def _domain_error(error: BaseException) -> LoramuxError:
    return error if isinstance(error, LoramuxError) else InternalError.logged(error)


def _peer_common_name(context) -> str | None:
    """The common name of the client certificate TLS verified (mutual TLS only)."""
    names = (context.auth_context() or {}).get("x509_common_name")
    return names[0].decode("utf-8", "replace") if names else None


def _admit(servicer, name: str, request, context) -> None:
    """Refusals that come before any work: no or wrong credentials, a body that did not
    parse, a server that is draining. Sets the caller's identity for the method."""
    caller.set(servicer.auth.identify(name, context.invocation_metadata(), _peer_common_name(context)))
    if isinstance(request, Malformed):
        raise InvalidRequest(
            f"the request body is not a valid {request.message_type} message ({request.detail[:200]})",
            reason="MALFORMED_REQUEST",
        )
    if servicer.draining:
        raise ShuttingDown("the server is shutting down; send the call to another replica")


def maps_errors(method):
    """Turn any exception raised by an RPC method into its gRPC status (unary and streaming);
    count, time and log every call. Unexpected exceptions become INTERNAL with a correlation id."""
    name = method.__name__
    streaming = inspect.isasyncgenfunction(method)

    async def fail(self, context, started: float, e: BaseException) -> None:
        error = _domain_error(e)
        _finished(self, name, started, code_of(error), error)
        await abort(context, error)

    if streaming:

        @functools.wraps(method)
        async def stream(self, request, context):
            started = time.perf_counter()
            try:
                _admit(self, name, request, context)
                async for item in method(self, request, context):
                    yield item
            except (asyncio.CancelledError, GeneratorExit):  # the caller went away mid-stream
                _finished(self, name, started, grpc.StatusCode.CANCELLED)
                raise
            except Exception as e:
                await fail(self, context, started, e)
            else:
                _finished(self, name, started, grpc.StatusCode.OK)

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        started = time.perf_counter()
        try:
            _admit(self, name, request, context)
            response = await method(self, request, context)
        except asyncio.CancelledError:
            _finished(self, name, started, grpc.StatusCode.CANCELLED)
            raise
        except Exception as e:
            await fail(self, context, started, e)
        else:
            _finished(self, name, started, grpc.StatusCode.OK)
            return response

    return unary


def _deadline(context) -> float | None:
    """When the caller stops waiting, in time.monotonic(), taken as the call arrives (time spent
    waiting for a worker thread counts against it), or None."""
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None else None


def _completions(request: generation_pb2.GenerateRequest) -> int:
    """The request's n (0: one), checked before anything is made for it."""
    n = request.n or 1
    if not 1 <= n <= MAX_COMPLETIONS:
        raise InvalidRequest(f"n must be in 0..{MAX_COMPLETIONS} (0 or 1: one completion), got {n}", field="n",
                             reason="INVALID_SAMPLING_PARAMETER")
    return n


def _add_event(message, event: TokenEvent | FinishEvent) -> None:
    """Add an engine event to a GenerateResponse, Completion or GenerateStreamResponse (the
    same field names; a Completion has no timings)."""
    if isinstance(event, PromptEvent):
        if isinstance(message, generation_pb2.Completion):
            return  # the prompt's scores are the response's, once
        message.prompt_token_ids.extend(event.token_ids)
        message.prompt_logprobs.extend(event.logprobs)
        message.prompt_ranks.extend(event.ranks)
        for alternatives in event.top_logprobs:
            message.prompt_top_logprobs.add(token_ids=[t for t, _ in alternatives], logprobs=[v for _, v in alternatives])
    elif isinstance(event, TokenEvent):
        message.token_ids.extend(event.token_ids)
        message.logprobs.extend(event.logprobs)
        for alternatives in event.top_logprobs:
            message.top_logprobs.add(token_ids=[t for t, _ in alternatives], logprobs=[v for _, v in alternatives])
    else:
        message.finish_reason = convert.finish_reason(event.finish_reason)
        message.usage.CopyFrom(convert.usage(event.prompt_tokens, event.completion_tokens))
        if not isinstance(message, generation_pb2.Completion):
            message.timings.CopyFrom(convert.timings(event.timings))


class LoramuxServicer(loramux_service_pb2_grpc.LoramuxServicer):
    def __init__(self, facade: Facade, pools: Pools, auth: Authenticator):
        self.facade = facade
        self._pools = pools
        self.auth = auth
        self._mailbox: Mailbox | None = None  # made on the event loop's first call
        self.draining = False  # set at shutdown: new calls get UNAVAILABLE / SHUTTING_DOWN

    async def _events(self, request: generation_pb2.GenerateRequest, context) -> AsyncIterator[tuple[int, Event]]:
        """Submit to the engine and yield its events, tagged with their completion's index (n);
        a caller that goes away cancels the rows."""
        if self._mailbox is None:
            self._mailbox = Mailbox(asyncio.get_running_loop())
        post = self._mailbox.post
        n = _completions(request)
        queues: list[asyncio.Queue[Event]] = [asyncio.Queue() for _ in range(n)]
        deadline = _deadline(context)
        inp = convert.generate_input(request)
        tenant = tenant_of(context)
        span = trace.get_current_span()
        span.set_attributes(request_attributes(self.facade, inp, tenant, n))
        if self.facade.must_read(tenant, inp.adapter_id):  # a slow read: on the adapter pool, not admission's
            await _blocking(self._pools.adapters, self.facade.resolve, tenant, inp.adapter_id)
        emits = [functools.partial(post, queue) for queue in queues]  # called on the engine thread
        generations = await _blocking(self._pools.admission, self.facade.generate_many, tenant, inp, emits,
                                      deadline, trace_context=otel_context.get_current())
        span.set_attribute("gen_ai.request.max_tokens", generations[0].max_new_tokens)
        async for tagged in merged_events(self.facade, list(zip(generations, queues)), span):
            yield tagged

    @maps_errors
    async def Generate(self, request, context):
        if _completions(request) == 1:
            response = generation_pb2.GenerateResponse()
            text = []
            async for _, event in self._events(request, context):
                if not isinstance(event, PromptEvent):
                    text.append(event.text)
                _add_event(response, event)
            response.text = "".join(text)
            return response
        completions = [generation_pb2.Completion(index=i) for i in range(request.n)]
        texts: list[list[str]] = [[] for _ in completions]
        first_timings = None
        for_usage = []
        prompt = None
        async for index, event in self._events(request, context):
            if isinstance(event, PromptEvent):
                prompt = event  # the same for every completion
                continue
            texts[index].append(event.text)
            _add_event(completions[index], event)
            if isinstance(event, FinishEvent):
                for_usage.append(event)
                if index == 0:
                    first_timings = convert.timings(event.timings)
        for completion, text in zip(completions, texts):
            completion.text = "".join(text)
        first = completions[0]
        response = generation_pb2.GenerateResponse(
            text=first.text, token_ids=first.token_ids, logprobs=first.logprobs, finish_reason=first.finish_reason,
            top_logprobs=first.top_logprobs, timings=first_timings, completions=completions,
            usage=convert.usage(for_usage[0].prompt_tokens, sum(f.completion_tokens for f in for_usage)))
        if prompt is not None:
            _add_event(response, prompt)
        return response

    @maps_errors
    async def GenerateStream(self, request, context):
        async for index, event in self._events(request, context):
            chunk = generation_pb2.GenerateStreamResponse(text=getattr(event, "text", ""), index=index)
            _add_event(chunk, event)
            yield chunk

    @maps_errors
    async def LoadAdapter(self, request, context):
        info = await _blocking(
            self._pools.adapters, self.facade.load_adapter, tenant_of(context), request.adapter_id, request.source,
            revision=request.revision, pin=request.pin, warm=request.warm, replace=request.replace,
            deadline=_deadline(context),
        )
        return convert.adapter(info)

    @maps_errors
    async def UnloadAdapter(self, request, context):
        await _blocking(self._pools.adapters, self.facade.unload_adapter, tenant_of(context), request.adapter_id)
        return empty_pb2.Empty()

    @maps_errors
    async def GetAdapter(self, request, context):
        return convert.adapter(await _blocking(self._pools.adapters, self.facade.get_adapter, tenant_of(context),
                                               request.adapter_id))

    @maps_errors
    async def ListAdapters(self, request, context):
        infos = await _blocking(self._pools.adapters, self.facade.list_adapters, tenant_of(context))
        chosen, token = convert.page(infos, request.page_size, request.page_token, key=lambda a: a.adapter_id)
        return adapter_pb2.ListAdaptersResponse(adapters=[convert.adapter(a) for a in chosen], next_page_token=token)

    @maps_errors
    async def Merge(self, request, context):
        op = await _blocking(self._pools.adapters, self.facade.merge, tenant_of(context), convert.merge_job(request),
                             trace_context=otel_context.get_current())
        return convert.operation(op)

    @maps_errors
    async def Tokenize(self, request, context):
        ids, context_tokens = await _blocking(self._pools.admission, self.facade.tokenize, tenant_of(context),
                                              convert.tokenize_input(request))
        return generation_pb2.TokenizeResponse(token_ids=ids, max_context=context_tokens)

    @maps_errors
    async def GetServerInfo(self, request, context):
        return convert.server_info(await _blocking(self._pools.adapters, self.facade.server_info))
