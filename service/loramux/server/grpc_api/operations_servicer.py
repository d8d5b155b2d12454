"""google.longrunning.Operations over the engine's operation store.

Every call that may read the state store (another replica's operations, a tenant's listing)
runs off the event loop: a slow or crowded shared volume delays that call only."""

from __future__ import annotations

import asyncio

from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import empty_pb2

from loramux.server.grpc_api import convert
from loramux.server.grpc_api.servicer import maps_errors, tenant_of
from loramux.server.engine.facade import Facade
from loramux.server.errors import OperationNotFound

MAX_WAIT_S = 600.0


class OperationsServicer(operations_pb2_grpc.OperationsServicer):
    def __init__(self, facade: Facade, loramux):
        self.facade = facade
        self._loramux = loramux  # its `draining` flag refuses new calls here too

    @property
    def draining(self) -> bool:
        return self._loramux.draining

    @property
    def auth(self):
        return self._loramux.auth

    @maps_errors
    async def GetOperation(self, request, context):
        op = await asyncio.to_thread(self.facade.get_operation, tenant_of(context), request.name)
        return convert.operation(op)

    @maps_errors
    async def ListOperations(self, request, context):
        size, after = convert.page_request(request.page_size, request.page_token)
        chosen, more = await asyncio.to_thread(self.facade.list_operations, tenant_of(context), after, size)
        return operations_pb2.ListOperationsResponse(operations=[convert.operation(op) for op in chosen],
                                                     next_page_token=convert.page_token(chosen[-1].name if chosen else None, more))

    @maps_errors
    async def CancelOperation(self, request, context):
        await asyncio.to_thread(self.facade.cancel_operation, tenant_of(context), request.name)
        return empty_pb2.Empty()

    @maps_errors
    async def DeleteOperation(self, request, context):
        await asyncio.to_thread(self.facade.delete_operation, tenant_of(context), request.name)
        return empty_pb2.Empty()

    @maps_errors
    async def WaitOperation(self, request, context):
        """Wait until done, the request's timeout, or the call's deadline, whichever comes first."""
        limits = [MAX_WAIT_S]
        if request.HasField("timeout"):
            limits.append(request.timeout.ToNanoseconds() / 1e9)
        remaining = context.time_remaining()
        if remaining is not None:
            limits.append(max(remaining - 0.05, 0.0))
        tenant = tenant_of(context)
        op = await asyncio.to_thread(self.facade.get_operation, tenant, request.name)
        poll_s = self.facade.poll_interval(op)
        if poll_s is not None:  # another replica runs it: read its record again until it is done
            deadline = asyncio.get_running_loop().time() + min(limits)
            while not op.done and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(poll_s)
                op = await asyncio.to_thread(self.facade.get_operation, tenant, request.name)
            return convert.operation(op)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        # No thread waits: the store calls back (from the merge thread) when the operation ends.
        self.facade.on_operation_done(op, lambda: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None)))
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout=min(limits))
        except TimeoutError:  # its progress now (an engine in its own process answered with a copy)
            try:
                op = await asyncio.to_thread(self.facade.get_operation, tenant, request.name)
            except OperationNotFound:  # deleted meanwhile: as it was last seen
                pass
        return convert.operation(op)
