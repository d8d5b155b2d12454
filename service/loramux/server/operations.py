"""Long-running operations (merges), kept in memory for google.longrunning.Operations.

Transport-free: the gRPC layer turns an Operation into a google.longrunning.Operation.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable

from loramux.server.errors import LoramuxError, OperationNotFound

MAX_KEPT = 1000  # finished operations kept for Get/List, oldest dropped first


@dataclasses.dataclass
class Operation:
    name: str  # "operations/merge-<uuid>"
    tenant: str
    metadata: dict  # kind-specific progress, updated while it runs
    create_time: float
    done: bool = False
    result: object | None = None
    error: LoramuxError | None = None
    end_time: float | None = None
    cancel_error: LoramuxError | None = None  # set to stop the work at its next check


class OperationStore:
    def __init__(self) -> None:
        self._ops: OrderedDict[str, Operation] = OrderedDict()
        self._cond = threading.Condition()
        self._callbacks: dict[str, list[Callable[[], None]]] = {}

    def create(self, tenant: str, kind: str, metadata: dict) -> Operation:
        op = Operation(name=f"operations/{kind}-{uuid.uuid4().hex}", tenant=tenant, metadata=metadata, create_time=time.time())
        with self._cond:
            self._ops[op.name] = op
            self._trim()
        return op

    def update(self, op: Operation, **metadata: object) -> None:
        with self._cond:
            op.metadata.update(metadata)

    def finish(self, op: Operation, result: object | None = None, error: LoramuxError | None = None) -> None:
        with self._cond:
            op.done, op.result, op.error, op.end_time = True, result, error, time.time()
            self._cond.notify_all()
            callbacks = self._callbacks.pop(op.name, [])
        for callback in callbacks:
            callback()

    def get(self, tenant: str, name: str) -> Operation:
        with self._cond:
            op = self._ops.get(name)
            if op is None or op.tenant != tenant:
                shown = name if len(name) <= 100 else name[:97] + "..."
                raise OperationNotFound(f"no operation {shown!r}", field="name")
            return op

    def wait(self, tenant: str, name: str, timeout: float | None) -> Operation:
        """Block until the operation is done or `timeout` passes; returns it either way."""
        op = self.get(tenant, name)
        with self._cond:
            self._cond.wait_for(lambda: op.done, timeout=timeout)
        return op

    def on_done(self, op: Operation, callback: Callable[[], None]) -> None:
        """Call `callback` once `op` is done (at once if it is; else from the finishing thread)."""
        with self._cond:
            if not op.done:
                self._callbacks.setdefault(op.name, []).append(callback)
                return
        callback()

    def running(self) -> bool:
        with self._cond:
            return any(not op.done for op in self._ops.values())

    def cancel_running(self, error: LoramuxError) -> None:
        """Ask every unfinished operation to stop with `error` (its worker checks between steps)."""
        with self._cond:
            for op in self._ops.values():
                if not op.done:
                    op.cancel_error = error

    def list(self, tenant: str) -> list[Operation]:
        with self._cond:
            return [op for op in self._ops.values() if op.tenant == tenant]

    def _trim(self) -> None:
        finished = [name for name, op in self._ops.items() if op.done]
        for name in finished[: max(0, len(self._ops) - MAX_KEPT)]:
            del self._ops[name]
