"""The OpenAI-compatible routes (Starlette): each converts, authenticates, calls the facade
and converts back; errors leave through `errors.error_response`, the one mapping.

- `POST /v1/completions`, `POST /v1/chat/completions`: `model` names one of the caller's
  adapters, or the served base model; `stream: true` answers as server-sent events ending
  with `data: [DONE]` (`stream_options.include_usage` adds a last chunk with the usage);
- `GET /v1/models`, `GET /v1/models/{id}`: the base model and the caller's adapters;
- `POST /tokenize` (vLLM's): the token ids a prompt or chat messages become, and the context;
- `GET /health` (liveness: the process answers), `GET /ready` (the engine makes progress and
  the server is not draining): for probes and routers.

Keys, tenants, roles, quotas and limits are the gRPC front door's (`tenancy/auth.py`,
`Authorization: Bearer <key>`, `x-loramux-tenant` for operators). Blocking engine calls run
in the same bounded per-tenant pools as gRPC's. A client that disconnects ends its request:
its row is freed at the next step, as a gRPC cancel does.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from loramux.server.engine.facade import Event, Facade, FinishEvent, Generation, Mailbox, PromptEvent, TokenEvent
from loramux.server.errors import Cancelled, InternalError, InvalidRequest, LoramuxError, ShuttingDown
from loramux.server.front_door.generation import merged as merged_events
from loramux.server.front_door.generation import request_attributes
from loramux.server.http_api.errors import error_response, routing_error, status_of
from loramux.server.http_api.schemas import ChatCompletionRequest, CompletionRequest, TokenizeRequest, constraint_param, parse
from loramux.server.tenancy.auth import Authenticator, caller

access_log = logging.getLogger("loramux.access")
PARSE_ON_LOOP_BYTES = 64 * 1024  # larger bodies are parsed on a worker thread, not the event loop
BODY_TIMEOUT_S = 30.0  # a request's whole body must arrive within this (a slow sender holds a connection, not the server)


class HttpFrontDoor:
    """The routes over one facade; `blocking(pool, fn, ...)` runs engine calls off the loop."""

    def __init__(self, facade: Facade, auth: Authenticator, blocking: Callable, pools, max_body_bytes: int,
                 default_max_tokens: int):
        self.facade = facade
        self.auth = auth
        self._blocking = blocking
        self._pools = pools
        self.max_body_bytes = max_body_bytes
        self.default_max_tokens = default_max_tokens
        self.draining = False
        self._mailbox: Mailbox | None = None
        self.app = Starlette(routes=[
            Route("/v1/completions", self._endpoint("Generate", self.completions), methods=["POST"]),
            Route("/v1/chat/completions", self._endpoint("Generate", self.chat_completions), methods=["POST"]),
            Route("/v1/models", self._endpoint("ListAdapters", self.models), methods=["GET"]),
            Route("/tokenize", self._endpoint("Tokenize", self.tokenize), methods=["POST"]),
            Route("/v1/models/{model:path}", self._endpoint("ListAdapters", self.model), methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
        ], exception_handlers={HTTPException: routing_error})

    # -- plumbing -------------------------------------------------------------------------

    def _endpoint(self, method: str, handler):
        """Authenticate, run `handler`, map its errors; one server span (joining the caller's
        W3C `traceparent`), one access log line and the request metrics per request, a
        stream's at its last event."""
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            route = request.scope["route"].path if "route" in request.scope else request.url.path
            name = f"{request.method} {route}"
            span = self.facade.telemetry.tracer.start_span(
                name, context=propagate.extract(dict(request.headers)), kind=SpanKind.SERVER,
                attributes={"http.request.method": request.method, "http.route": route})
            token = otel_context.attach(trace.set_span_in_context(span))
            try:
                try:
                    caller.set(self.auth.identify(method, request.headers.items()))
                    if self.draining:
                        raise ShuttingDown("the server is shutting down; send the request to another replica")
                    response = await handler(request)
                except Exception as e:  # noqa: BLE001 - every failure leaves as an OpenAI error object
                    response = error_response(e)
                    if isinstance(e, LoramuxError):
                        span.set_attribute("error.type", e.reason)
            finally:
                otel_context.detach(token)
            status = response.status_code

            def done(status: int = status) -> None:
                seconds = time.perf_counter() - started
                span.set_attribute("http.response.status_code", status)
                if status >= 400:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, f"HTTP {status}"))
                span.end()
                attributes = {"http.route": route, "http.response.status_code": status}
                self.facade.telemetry.http_requests.add(1, attributes)
                self.facade.telemetry.http_duration.record(seconds, attributes)
                access_log.info("%s %s %d %.1fms", request.method, request.url.path, status, 1000 * seconds,
                                extra={"http_method": request.method, "http_route": route, "http_status": status,
                                       "duration_ms": round(1000 * seconds, 3)})

            if isinstance(response, StreamingResponse):
                response.body_iterator = _ending(response.body_iterator, done)
            else:
                done()
            return response
        return functools.wraps(handler)(endpoint)

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isascii() and declared.isdecimal() and int(declared) > self.max_body_bytes:
            raise InvalidRequest(f"the request body is {declared} bytes, more than {self.max_body_bytes}",
                                 reason="REQUEST_TOO_LARGE")
        chunks, size = [], 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise InvalidRequest(f"the request body is more than {self.max_body_bytes} bytes",
                                         reason="REQUEST_TOO_LARGE")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), BODY_TIMEOUT_S)
        except ClientDisconnect:
            raise Cancelled("the client went away while sending its request") from None
        except asyncio.TimeoutError:
            raise InvalidRequest(f"the request body did not arrive within {BODY_TIMEOUT_S:g} s", reason="REQUEST_TIMEOUT") from None
        return b"".join(chunks)

    async def _input(self, request: Request, model, *args):
        """The body as `model`, and the engine's input it asks for (`to_input(adapter, *args)`);
        a large body is parsed and converted off the event loop, in the caller's turn (its
        conversion walks and writes out what it holds: tools' schemas, messages)."""
        body = await self._body(request)

        def convert():
            parsed = parse(model, body)
            return parsed, parsed.to_input(self._adapter_of(parsed.model or ""), *args)

        if len(body) <= PARSE_ON_LOOP_BYTES:
            return convert()
        return await self._blocking(self._pools.admission, convert)

    def _adapter_of(self, model: str) -> str:
        """The adapter `model` names ("" for the base model)."""
        return "" if model in (self.facade.model, self.facade.public_model) else model

    async def _run(self, request: Request, inp, n: int) -> list[tuple[Generation, asyncio.Queue]]:
        """Queue the request's `n` completions; each with the queue its events arrive on."""
        if self._mailbox is None:
            self._mailbox = Mailbox(asyncio.get_running_loop())
        post = self._mailbox.post
        queues: list[asyncio.Queue[Event]] = [asyncio.Queue() for _ in range(n)]
        tenant = caller.get().tenant
        if self.facade.must_read(tenant, inp.adapter_id):
            await self._blocking(self._pools.adapters, self.facade.resolve, tenant, inp.adapter_id)
        span = trace.get_current_span()
        span.set_attributes(request_attributes(self.facade, inp, tenant, n))
        emits = [functools.partial(post, queue) for queue in queues]
        generations = await self._blocking(self._pools.admission, self.facade.generate_many, tenant, inp, emits,
                                           trace_context=otel_context.get_current())
        span.set_attribute("gen_ai.request.max_tokens", generations[0].max_new_tokens)
        return list(zip(generations, queues))

    async def _collect(self, request: Request, runs, span) -> list[list[Event]]:
        """Every event of a non-streamed request, per completion, cancelling it if the
        client disconnects."""
        async def gather():
            per_choice: list[list[Event]] = [[] for _ in runs]
            async for index, event in merged_events(self.facade, runs, span):
                per_choice[index].append(event)
            return per_choice

        work = asyncio.ensure_future(gather())
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:  # the completions are cancelled as `work` ends (its events' finally)
                raise Cancelled("the client went away before the answer was ready")
            return work.result()
        finally:
            work.cancel()
            watch.cancel()

    # -- generation -----------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        body, inp = await self._input(request, CompletionRequest)
        return await self._answer(request, body, inp, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        body, inp = await self._input(request, ChatCompletionRequest, self.default_max_tokens)
        return await self._answer(request, body, inp, chat=True)

    async def _answer(self, request: Request, body, inp, chat: bool) -> Response:
        named = constraint_param(body)
        try:
            runs = await self._run(request, inp, body.n or 1)
        except LoramuxError as e:
            raise _named(e, named) from None
        span = trace.get_current_span()
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        forced = body.forced_tool() if chat else None  # a forced tool call: the answer is its JSON
        echo = None if chat or not body.echo else (inp.prompt or self.facade.decode(inp.prompt_token_ids))
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            stream = self._stream(runs, span, ident, created, body.model, chat, usage, inp, forced, echo,
                                  body.prompt_logprobs is not None, named)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            per_choice = await self._collect(request, runs, span)
        except LoramuxError as e:  # (a constraint that failed while it generated)
            raise _named(e, named) from None
        build = functools.partial(self._choices, per_choice, inp, chat, echo, forced, body.prompt_logprobs is not None)
        if inp.return_logprobs or inp.prompt_logprobs is not None:  # a token's text per score: off the event loop
            choices, finishes = await self._blocking(self._pools.admission, build)
        else:
            choices, finishes = build()
        return JSONResponse({"id": ident, "object": kind, "created": created, "model": body.model, "choices": choices,
                             "usage": _usage(finishes)})

    def _choices(self, per_choice: list[list[Event]], inp, chat: bool, echo: str | None, forced: str | None,
                 prompt_logprobs: bool) -> tuple[list[dict], list[FinishEvent]]:
        """The response's choices from each completion's events, and their finish events."""
        choices, finishes = [], []
        for index, collected in enumerate(per_choice):
            prompt = next((e for e in collected if isinstance(e, PromptEvent)), None)
            collected = [e for e in collected if not isinstance(e, PromptEvent)]
            tokens = [t for e in collected if isinstance(e, TokenEvent) for t in e.token_ids]
            logprobs = [lp for e in collected if isinstance(e, TokenEvent) for lp in e.logprobs]
            alternatives = [a for e in collected if isinstance(e, TokenEvent) for a in e.top_logprobs]
            text = (echo or "") + "".join(e.text for e in collected)
            finish: FinishEvent = collected[-1]
            finishes.append(finish)
            scored = None
            if inp.return_logprobs:
                scored = self._logprobs(tokens, logprobs, alternatives, chat)
                if echo is not None and prompt is not None:
                    scored = self._echoed(prompt, inp.top_logprobs, tokens, logprobs, alternatives)
            choice = {"index": index, "finish_reason": finish.finish_reason.openai, "logprobs": scored}
            if prompt_logprobs and prompt is not None:  # asked for (not only echo's scores)
                choice["prompt_logprobs"] = self._prompt_logprobs(prompt)
            calls = _tool_calls(forced, text, finish) if forced is not None else None
            if calls:
                choice["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
                choice["finish_reason"] = "tool_calls"
            elif chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        return choices, finishes

    async def _stream(self, runs, span, ident, created, model, chat, usage, inp, forced: str | None = None,
                      echo: str | None = None, prompt_logprobs: bool = False,
                      named: str = "response_format") -> AsyncIterator[bytes]:
        """Chunks of every completion as they come (each names its `index`); `forced`: a
        forced tool call's answer is held back and sent as one `tool_calls` delta when it is
        complete. With `include_usage`, one last chunk holds the usage of them all. `echo`:
        the prompt's text, sent first (with its scores when logprobs are asked)."""
        logprobs = inp.return_logprobs
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict | None, **extra) -> bytes:
            payload = {"id": ident, "object": kind, "created": created, "model": model,
                       "choices": [choice] if choice is not None else [], **extra}
            return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

        held: list[list[str]] = [[] for _ in runs]
        offsets = [0] * len(runs)  # characters of text before a chunk's first token (logprobs' text_offset)
        finishes: list[FinishEvent] = []
        try:
            if chat:
                for index in range(len(runs)):
                    yield chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None})
            elif echo is not None and inp.prompt_logprobs is None:  # no scores to wait for
                for index in range(len(runs)):
                    offsets[index] = len(echo)
                    yield chunk({"index": index, "text": echo, "logprobs": None, "finish_reason": None})
            async for index, event in merged_events(self.facade, runs, span):
                if isinstance(event, PromptEvent):  # its texts (a prompt's worth) are made off the event loop
                    first: dict = {"index": index, "logprobs": None, "finish_reason": None}
                    if prompt_logprobs:
                        first["prompt_logprobs"] = await self._blocking(self._pools.admission, self._prompt_logprobs, event)
                    if chat:
                        first["delta"] = {}
                    else:
                        first["text"] = echo or ""
                        if echo is not None and logprobs:
                            first["logprobs"] = await self._blocking(self._pools.admission, self._echoed, event,
                                                                     inp.top_logprobs, [], [], [])
                            offsets[index] = len(echo)
                    yield chunk(first)
                    continue
                reason = event.finish_reason.openai if isinstance(event, FinishEvent) else None
                if reason is not None:
                    finishes.append(event)
                tokens = event.token_ids if isinstance(event, TokenEvent) else []
                values = event.logprobs if isinstance(event, TokenEvent) else []
                alternatives = event.top_logprobs if isinstance(event, TokenEvent) else []
                if not event.text and not tokens and reason is None:
                    continue
                if forced is not None:
                    held[index].append(event.text)
                    if reason is None:
                        continue
                    calls = _tool_calls(forced, "".join(held[index]), event)
                    if calls:
                        yield chunk({"index": index, "delta": {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]},
                                     "logprobs": None, "finish_reason": "tool_calls"})
                        continue
                    event = dataclasses.replace(event, text="".join(held[index]))  # cut short: the text as it is
                choice = {"index": index, "finish_reason": reason,
                          "logprobs": (self._logprobs(tokens, values, alternatives, chat, offsets[index])
                                       if logprobs and tokens else None)}
                offsets[index] += len(event.text)
                if chat:
                    choice["delta"] = {"content": event.text} if event.text or reason is None else {}
                else:
                    choice["text"] = event.text
                yield chunk(choice)
            if usage:
                yield chunk(None, usage=_usage(finishes))
        except Exception as e:  # noqa: BLE001 - after the first byte the status is sent: the error is the last event
            error = _named(e, named) if isinstance(e, LoramuxError) else InternalError.logged(e)
            body = json.loads(error_response(error).body)
            body["error"]["status"] = status_of(error)
            span.set_attribute("error.type", error.reason)
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"in stream: {error.reason}"))
            yield b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    def _echoed(self, prompt: PromptEvent, top: int, tokens: list[int], values: list[float], alternatives: list) -> dict:
        """A completion's logprobs object with the echoed prompt's tokens first (the first has
        no score: null, as OpenAI gives it)."""
        texts = self.facade.token_texts(prompt.token_ids)
        special = self.facade.special_token_ids  # (a BOS token is listed, but is not in the echoed text)
        offsets, at = [], 0
        for token, text in zip(prompt.token_ids, texts):
            offsets.append(at)
            if token not in special:
                at += len(text)
        tops = None
        if top:
            tops = [None] + [dict(zip(self.facade.token_texts([t for t, _ in a]), [v for _, v in a]))
                             for a in prompt.top_logprobs]
        prompt_part = {"tokens": texts, "token_logprobs": [None, *prompt.logprobs], "top_logprobs": tops,
                       "text_offset": offsets}
        if not tokens:
            return prompt_part
        answer = self._logprobs(tokens, values, alternatives, False, at)
        return {key: (prompt_part[key] + answer[key]) if prompt_part[key] is not None and answer[key] is not None else None
                for key in prompt_part}

    def _prompt_logprobs(self, prompt: PromptEvent) -> list:
        """vLLM's `prompt_logprobs`: null for the first token, then per token a map from token
        id to its logprob, rank and text: the prompt's token and its most likely alternatives."""
        out: list = [None]
        texts = self.facade.token_texts(prompt.token_ids[1:])
        for i, (token, value, rank) in enumerate(zip(prompt.token_ids[1:], prompt.logprobs, prompt.ranks)):
            entry = {str(token): {"logprob": value, "rank": rank, "decoded_token": texts[i]}}
            alternatives = prompt.top_logprobs[i] if i < len(prompt.top_logprobs) else []
            for place, text, (alt, alt_value) in zip(range(1, len(alternatives) + 1),
                                                     self.facade.token_texts([a for a, _ in alternatives]), alternatives):
                entry.setdefault(str(alt), {"logprob": alt_value, "rank": place, "decoded_token": text})
            out.append(entry)
        return out

    def _logprobs(self, tokens: list[int], values: list[float], alternatives: list, chat: bool, offset: int = 0) -> dict:
        """OpenAI's logprobs object: each chosen token's text and log-probability, and with
        top_logprobs its most likely alternatives (the model's own scores, before sampling's
        adjustments)."""
        texts = self.facade.token_texts(tokens)
        tops = [[(text, v) for text, (_, v) in zip(self.facade.token_texts([t for t, _ in a]), a)] for a in alternatives]
        tops += [[] for _ in range(len(texts) - len(tops))]
        if chat:
            return {"content": [{"token": t, "logprob": v, "bytes": list(t.encode()),
                                 "top_logprobs": [{"token": a, "logprob": w, "bytes": list(a.encode())} for a, w in top]}
                                for t, v, top in zip(texts, values, tops)]}
        offsets, at = [], offset
        for text in texts:
            offsets.append(at)
            at += len(text)
        return {"tokens": texts, "token_logprobs": values,
                "top_logprobs": [dict(top) for top in tops] if alternatives else None, "text_offset": offsets}

    async def tokenize(self, request: Request) -> Response:
        _, inp = await self._input(request, TokenizeRequest)
        ids, context_tokens = await self._blocking(self._pools.admission, self.facade.tokenize, caller.get().tenant, inp)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": context_tokens})

    # -- models and probes ----------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        tenant = caller.get().tenant
        adapters = await self._blocking(self._pools.adapters, self.facade.list_adapters, tenant)
        return JSONResponse({"object": "list", "data": [self._base_card()] + [self._card(a, tenant) for a in adapters]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        tenant = caller.get().tenant
        if self._adapter_of(name) == "":
            return JSONResponse(self._base_card())
        return JSONResponse(self._card(await self._blocking(self._pools.adapters, self.facade.get_adapter, tenant, name),
                                       tenant))

    def _base_card(self) -> dict:
        return {"id": self.facade.public_model, "object": "model", "created": int(self.facade.started), "owned_by": "loramux",
                "root": self.facade.public_model, "parent": None}

    def _card(self, adapter, tenant: str) -> dict:
        return {"id": adapter.adapter_id, "object": "model", "created": int(adapter.load_time), "owned_by": tenant,
                "root": adapter.adapter_id, "parent": self.facade.public_model}

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        if self.draining or not self.facade.healthy():
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ready"})


def _named(error: LoramuxError, param: str) -> LoramuxError:
    """A structured-output error names the field as the request named it (guided_regex, tools,
    ...): on a copy, since a compiled constraint's refusal is one object for every request."""
    if error.field == "structured_output":
        error = copy.copy(error)
        error.field = param
    return error


def _tool_calls(forced: str, text: str, finish: FinishEvent) -> list[dict] | None:
    """A forced call's answer as OpenAI's tool_calls; None when it was cut short (by
    max_tokens, a stop string or a stop token where its schema could not end: the engine
    says whether its constraint accepted the answer whole, as a prefix can parse as JSON)."""
    if not finish.grammar_complete:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if forced:
        calls = [(forced, text)]
    else:
        calls = [(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in value]
    return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function", "function": {"name": name, "arguments": arguments}}
            for name, arguments in calls]


async def _ending(body: AsyncIterator[bytes], done: Callable[[], None]) -> AsyncIterator[bytes]:
    """A stream's body that calls `done` once it ends (sent whole, or cut by the client)."""
    try:
        async for chunk in body:
            yield chunk
    finally:
        done()


def _usage(finishes: list[FinishEvent]) -> dict:
    """The prompt once (its completions share it), and every completion's tokens. No prompt
    token is served from a cache (loramux keeps no prefix cache): cached_tokens is 0."""
    prompt = finishes[0].prompt_tokens if finishes else 0
    completion = sum(f.completion_tokens for f in finishes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0}}


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
