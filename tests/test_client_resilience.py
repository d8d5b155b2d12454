"""The SDK against a broken server: a real gRPC server on loopback that answers as a faulty
server or proxy might (a page token that repeats, WaitOperation answered at once, error
details that do not parse). Every case ends, with a LoramuxError, never a loop or a raw
protobuf error."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

import grpc
import pytest
from google.longrunning import operations_pb2
from google.protobuf import any_pb2

import loramux.client as lc
from loramux.client._convert import WAIT_BACKOFF_S
from loramux.v1 import adapter_pb2, loramux_service_pb2

DONE_AFTER = 6  # WaitOperation calls answered "not done" at once before the operation ends


class Broken:
    """The broken server's handlers, and what it saw."""

    def __init__(self):
        self.waits: list[float] = []
        self.keys: list[str] = []
        self.lock = threading.Lock()

    def list_adapters(self, request, context):
        self.keys += [v for k, v in context.invocation_metadata() if k == "authorization"]
        return adapter_pb2.ListAdaptersResponse(adapters=[adapter_pb2.Adapter(adapter_id="a")], next_page_token="again")

    def get_adapter(self, request, context):
        context.abort_with_status(_CorruptStatus())

    def merge(self, request, context):
        return operations_pb2.Operation(name="operations/merge-" + "0" * 32, done=False)

    def wait_operation(self, request, context):
        with self.lock:
            self.waits.append(time.monotonic())
            done = len(self.waits) >= DONE_AFTER
        op = operations_pb2.Operation(name=request.name, done=done)
        if done:
            response = any_pb2.Any()
            response.Pack(loramux_service_pb2.MergeResponse(output_path="out", files=["model.safetensors"]))
            op.response.CopyFrom(response)
        return op


class _CorruptStatus(grpc.Status):
    code = grpc.StatusCode.NOT_FOUND
    details = "no such adapter"
    trailing_metadata = (("grpc-status-details-bin", b"\xff\xfe not a google.rpc.Status \x00\x01"),)


@pytest.fixture
def broken():
    state = Broken()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    unary = grpc.unary_unary_rpc_method_handler

    def handler(fn, request_cls, response_cls):
        return unary(fn, request_deserializer=request_cls.FromString, response_serializer=response_cls.SerializeToString)

    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler("loramux.v1.Loramux", {
            "ListAdapters": handler(state.list_adapters, adapter_pb2.ListAdaptersRequest, adapter_pb2.ListAdaptersResponse),
            "GetAdapter": handler(state.get_adapter, adapter_pb2.GetAdapterRequest, adapter_pb2.Adapter),
            "Merge": handler(state.merge, loramux_service_pb2.MergeRequest, operations_pb2.Operation),
        }),
        grpc.method_handlers_generic_handler("google.longrunning.Operations", {
            "WaitOperation": handler(state.wait_operation, operations_pb2.WaitOperationRequest, operations_pb2.Operation),
        }),
    ))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", state
    server.stop(0)


def _check_backoff(waits: list[float]) -> None:
    """WaitOperation answered at once: the client paused between calls, doubling from the first pause."""
    assert len(waits) == DONE_AFTER
    gaps = [b - a for a, b in zip(waits, waits[1:])]
    low, high = WAIT_BACKOFF_S
    floors = [min(high, low * 2 ** i) for i in range(len(gaps))]
    assert all(gap >= 0.9 * floor for gap, floor in zip(gaps, floors)), (gaps, floors)


def test_the_blocking_client_survives_a_broken_server(broken):
    target, state = broken
    with lc.Client(target, timeout=10, api_key="lmx_key-read-from-a-file\n") as client:
        with pytest.raises(lc.LoramuxError) as e:
            client.list_adapters()
        assert e.value.reason == "PAGE_TOKEN_REPEATED" and e.value.code is grpc.StatusCode.INTERNAL
        assert state.keys == ["Bearer lmx_key-read-from-a-file"] * 2  # the newline dropped; the second page refused
        with pytest.raises(lc.NotFound) as e:
            client.get_adapter("x")
        assert e.value.message == "no such adapter" and e.value.reason == ""
        result = client.merge("a", "out").result(timeout=30)
        assert result.output_path == "out" and result.files == ["model.safetensors"]
    _check_backoff(state.waits)


def test_the_asyncio_client_survives_a_broken_server(broken):
    target, state = broken

    async def run():
        async with lc.AsyncClient(target, timeout=10) as client:
            with pytest.raises(lc.LoramuxError) as e:
                await client.list_adapters()
            assert e.value.reason == "PAGE_TOKEN_REPEATED"
            with pytest.raises(lc.NotFound):
                await client.get_adapter("x")
            handle = await client.merge("a", "out")
            return await handle.result(timeout=30)

    assert asyncio.run(run()).output_path == "out"
    _check_backoff(state.waits)


def test_a_key_a_header_cannot_carry_is_refused_at_once():
    with pytest.raises(ValueError, match="header cannot carry"):
        lc.Client("127.0.0.1:1", api_key="lmx_\u00e9t\u00e9")
