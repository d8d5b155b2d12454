"""What the blocking and asyncio clients share beyond conversions: the requests each method
sends, and the calls that take several round trips (following pages, waiting for a merge)
written once as conversations that a transport drives, blocking or awaited.

A conversation is a generator: it yields what it needs next, a `Pause(seconds)` or an `Rpc`
(which stub, which method, the request, the call's deadline), receives the response (None
after a pause), and returns its result. `drive` runs one on a blocking client, `drive_async`
on an asyncio one, so the logic (the backoff, the repeated page token) cannot drift between them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Generator

from google.longrunning import operations_pb2
from google.protobuf import duration_pb2

from loramux.client import _convert, types
from loramux.v1 import adapter_pb2, loramux_service_pb2

WAIT_CHUNK_S = 30.0  # one WaitOperation call waits at most this long on the server


@dataclasses.dataclass(frozen=True)
class Pause:
    seconds: float


@dataclasses.dataclass(frozen=True)
class Rpc:
    stub: str  # "loramux" or "operations"
    method: str
    request: object
    timeout: float | None


Conversation = Generator[Pause | Rpc, object, object]


def load_adapter_request(adapter_id: str, source: str, revision: str, pin: bool, warm: bool,
                         replace: bool) -> adapter_pb2.LoadAdapterRequest:
    return adapter_pb2.LoadAdapterRequest(adapter_id=adapter_id, source=source, revision=revision, pin=pin, warm=warm,
                                          replace=replace)


def merge_request(adapter_id: str, output_dir: str, overwrite: bool, max_shard_bytes: int, verify: bool,
                  adapter_only: bool, register_as: str) -> loramux_service_pb2.MergeRequest:
    return loramux_service_pb2.MergeRequest(adapter_id=adapter_id, output_dir=output_dir, overwrite=overwrite,
                                            max_shard_bytes=max_shard_bytes, verify=verify, adapter_only=adapter_only,
                                            register_as=register_as)


def merge_routing_key(request) -> str:
    """The adapter a merge's operation is routed by (its first input)."""
    return request.adapter_id or request.combination.adapters[0].adapter_id


def list_adapters(page_size: int, timeout: float | None) -> Conversation:
    """Every adapter of the caller's tenant, following pages; a page token the server repeats
    ends it with PAGE_TOKEN_REPEATED."""
    adapters: list[types.AdapterInfo] = []
    token, seen = "", set()
    while True:
        page = yield Rpc("loramux", "ListAdapters", adapter_pb2.ListAdaptersRequest(page_size=page_size, page_token=token),
                         timeout)
        adapters += [_convert.adapter_info(a) for a in page.adapters]
        token = _convert.next_page(page.next_page_token, seen)
        if not token:
            return adapters


def wait_merge(operation: operations_pb2.Operation, timeout: float | None) -> Conversation:
    """Wait for a merge's operation (at most `timeout` s; None: as long as it takes) and return
    the last operation read; TimeoutError if it is not done by then. WaitOperation calls that a
    server answers at once are spaced by a doubling pause."""
    end = None if timeout is None else time.monotonic() + timeout
    pause = 0.0
    while not operation.done:
        left = WAIT_CHUNK_S if end is None else end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"merge {operation.name} not done after {timeout}s")
        if pause:
            yield Pause(pause)
        asked_s = min(left, WAIT_CHUNK_S)
        wait = duration_pb2.Duration()
        wait.FromNanoseconds(int(asked_s * 1e9))
        started = time.monotonic()
        operation = yield Rpc("operations", "WaitOperation",
                              operations_pb2.WaitOperationRequest(name=operation.name, timeout=wait), asked_s + 5)
        pause = _convert.wait_pause(asked_s, time.monotonic() - started, pause)
    return operation


def drive(conversation: Conversation, stubs: dict[str, object]):
    """Run a conversation on blocking stubs."""
    reply = None
    try:
        while True:
            step = conversation.send(reply)
            if isinstance(step, Pause):
                time.sleep(step.seconds)
                reply = None
            else:
                reply = getattr(stubs[step.stub], step.method)(step.request, timeout=step.timeout)
    except StopIteration as done:
        return done.value


async def drive_async(conversation: Conversation, stubs: dict[str, object]):
    """Run a conversation on asyncio stubs."""
    reply = None
    try:
        while True:
            step = conversation.send(reply)
            if isinstance(step, Pause):
                await asyncio.sleep(step.seconds)
                reply = None
            else:
                reply = await getattr(stubs[step.stub], step.method)(step.request, timeout=step.timeout)
    except StopIteration as done:
        return done.value

