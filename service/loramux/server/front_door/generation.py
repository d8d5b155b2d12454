"""A generation's events as a front door consumes them, written once for both doors: one
completion's (`events`), or a request's n completions' merged as they come (`merged`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from loramux.server.engine.facade import ErrorEvent, Event, Facade, FinishEvent, GenerateInput, Generation


def request_attributes(facade: Facade, inp: GenerateInput, tenant: str, n: int) -> dict:
    """A generation call's span attributes, the same on both doors (GenAI conventions: the
    model is the one the caller named, an adapter or the base)."""
    return {
        "gen_ai.operation.name": "chat" if inp.messages else "text_completion",
        "gen_ai.request.model": inp.adapter_id or facade.public_model,
        "loramux.base_model": facade.public_model,
        "gen_ai.request.temperature": inp.temperature,
        "gen_ai.request.choice.count": n,
        "loramux.adapter.id": inp.adapter_id,
        "loramux.tenant": tenant,
    }


async def events(facade: Facade, generation: Generation, queue: asyncio.Queue, span) -> AsyncIterator[Event]:
    """The generation's events from `queue` until it finishes; raises its error. The usage and
    finish reason go on `span` (the call's). A consumer that stops early (its caller went away)
    cancels the request: its row is freed at the next step."""
    finished = False
    try:
        while True:
            event = await queue.get()
            if isinstance(event, ErrorEvent):
                finished = True
                raise event.error
            finished = isinstance(event, FinishEvent)
            if finished:
                span.set_attributes({
                    "gen_ai.usage.input_tokens": event.prompt_tokens,
                    "gen_ai.usage.output_tokens": event.completion_tokens,
                    "gen_ai.response.finish_reasons": (event.finish_reason.openai,),
                })
            yield event
            if finished:
                return
    finally:
        if not finished:
            facade.cancel(generation)


async def merged(facade: Facade, runs: list[tuple[Generation, asyncio.Queue]], span) -> AsyncIterator[tuple[int, Event]]:
    """Every completion's events as they come, tagged with its index; the first error is
    raised, and every completion still running is then cancelled (as one whose consumer
    stops early is). With n > 1 the span's usage and finish reasons are all of theirs."""
    if len(runs) == 1:  # the common case, without tasks
        generation, queue = runs[0]
        async for event in events(facade, generation, queue, span):
            yield 0, event
        return
    inbox: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, generation: Generation, queue: asyncio.Queue) -> None:
        try:
            async for event in events(facade, generation, queue, span):
                inbox.put_nowait((index, event, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            inbox.put_nowait((index, None, e))

    tasks = [asyncio.ensure_future(pump(i, g, q)) for i, (g, q) in enumerate(runs)]
    finishes: list[FinishEvent] = []
    try:
        while len(finishes) < len(runs):
            index, event, error = await inbox.get()
            if error is not None:
                raise error
            if isinstance(event, FinishEvent):
                finishes.append(event)
            yield index, event
        span.set_attributes({"gen_ai.usage.output_tokens": sum(f.completion_tokens for f in finishes),
                             "gen_ai.response.finish_reasons": tuple(f.finish_reason.openai for f in finishes)})
    finally:
        for task in tasks:  # a completion still running is cancelled (its events' finally)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
