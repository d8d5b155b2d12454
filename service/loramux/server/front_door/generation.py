"""A generation's events as a front door consumes them, written once for both doors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from loramux.server.engine.facade import ErrorEvent, Event, Facade, FinishEvent, Generation


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
                    "gen_ai.response.finish_reasons": (event.finish_reason.value,),
                })
            yield event
            if finished:
                return
    finally:
        if not finished:
            facade.cancel(generation)
