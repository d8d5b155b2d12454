"""google.longrunning.Operations over the engine's operation store."""

from __future__ import annotations

from google.longrunning import operations_pb2, operations_pb2_grpc

from loramux.server.api import convert
from loramux.server.api.servicer import _blocking, maps_errors, tenant_of
from loramux.server.engine.engine import Engine

MAX_WAIT_S = 600.0


class OperationsServicer(operations_pb2_grpc.OperationsServicer):
    def __init__(self, engine: Engine):
        self._engine = engine

    @maps_errors
    async def GetOperation(self, request, context):
        return convert.operation(self._engine.operations.get(tenant_of(context, self._engine), request.name))

    @maps_errors
    async def ListOperations(self, request, context):
        ops = sorted(self._engine.operations.list(tenant_of(context, self._engine)), key=lambda op: op.name)
        chosen, token = convert.page(ops, request.page_size, request.page_token, key=lambda op: op.name)
        return operations_pb2.ListOperationsResponse(operations=[convert.operation(op) for op in chosen], next_page_token=token)

    @maps_errors
    async def WaitOperation(self, request, context):
        """Wait until done, the request's timeout, or the call's deadline, whichever comes first."""
        limits = [MAX_WAIT_S]
        if request.HasField("timeout"):
            limits.append(request.timeout.ToNanoseconds() / 1e9)
        remaining = context.time_remaining()
        if remaining is not None:
            limits.append(max(remaining - 0.05, 0.0))
        tenant = tenant_of(context, self._engine)
        op = await _blocking(self._engine.operations.wait, tenant, request.name, min(limits))
        return convert.operation(op)
