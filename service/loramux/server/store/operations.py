"""Long-running operations (merges), kept in memory for google.longrunning.Operations.

Transport-free: the gRPC layer turns an Operation into a google.longrunning.Operation.

With a state store, each operation is written when created and when it ends, with the
replica that runs it. Replicas sharing a `--state-dir` answer for each other's operations
(read from the store: `foreign`), and the survivors end an operation whose replica stopped
sending heartbeats with INTERRUPTED_BY_RESTART, as a restarted replica ends its own.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable

from loramux.server.errors import (
    Cancelled, Interrupted, Kind, LoramuxError, OperationNotFound, OperationRunning, shown_metadata,
)
from loramux.server.store.state import BadRecord, OperationRecord, StateStore

log = logging.getLogger(__name__)
_NAME = re.compile(r"operations/[a-z]+-[0-9a-f]{32}")
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
    foreign: bool = False  # read from the state store: another replica runs it


@dataclasses.dataclass(frozen=True)
class ResultCodec:
    """How an operation's result is written to the state store and read back."""

    encode: Callable[[object], dict]
    decode: Callable[[dict], object]


class OperationStore:
    def __init__(self, store: StateStore | None = None, codec: ResultCodec | None = None) -> None:
        """With a `store`, operations are written when created and when they finish."""
        self._store = store
        self._codec = codec
        self._ops: OrderedDict[str, Operation] = OrderedDict()
        self._cond = threading.Condition()
        self._callbacks: dict[str, list[Callable[[], None]]] = {}

    def create(self, tenant: str, kind: str, metadata: dict) -> Operation:
        """A new operation, written to the store first: if that fails, nothing was made."""
        op = Operation(name=f"operations/{kind}-{uuid.uuid4().hex}", tenant=tenant, metadata=metadata, create_time=time.time())
        with self._cond:
            self._save(op)
            self._ops[op.name] = op
            self._trim()
        return op

    def update(self, op: Operation, **metadata: object) -> None:
        with self._cond:
            op.metadata.update(metadata)

    def finish(self, op: Operation, result: object | None = None, error: LoramuxError | None = None) -> None:
        with self._cond:
            op.done, op.result, op.error, op.end_time = True, result, error, time.time()
            try:
                self._save(op)
            except Exception:  # the store could not be written: this replica still answers, waiters still wake
                log.exception("operation %s ended but could not be written to the state directory", op.name)
            self._cond.notify_all()
            callbacks = self._callbacks.pop(op.name, [])
        for callback in callbacks:
            callback()

    def get(self, tenant: str, name: str) -> Operation:
        with self._cond:
            op = self._ops.get(name)
        if op is None and self._store is not None and _NAME.fullmatch(name):
            saved = self._store.operation(tenant, name)  # run by another replica sharing the state directory
            op = self._decode_or_skip(saved) if saved is not None else None
        if op is None or op.tenant != tenant:
            shown = name if len(name) <= 100 else name[:97] + "..."
            raise OperationNotFound(f"no operation {shown!r}", field="name")
        return op

    def cancel(self, tenant: str, name: str) -> Operation:
        """Ask an operation to stop: it ends with CANCELLED at its next check (a merge: the next
        tensor), leaving nothing behind. One another replica runs is asked through the state
        store. Cancelling an operation that has ended changes nothing."""
        op = self.get(tenant, name)
        if op.done:
            return op
        if op.foreign:
            self._store.request_cancel(tenant, name)
        else:
            op.cancel_error = Cancelled(f"{name} was cancelled")
        return op

    def check_cancel_request(self, op: Operation) -> None:
        """Whether a cancel for `op` was asked through another replica (the running work calls this)."""
        if self._store is not None and op.cancel_error is None and self._store.cancel_requested(op.tenant, op.name):
            op.cancel_error = Cancelled(f"{op.name} was cancelled")

    def delete(self, tenant: str, name: str) -> None:
        """Forget an operation that has ended (its result too); a running one must be cancelled first."""
        op = self.get(tenant, name)
        if not op.done:
            raise OperationRunning(f"{name} is still running; cancel it, then delete it", field="name")
        with self._cond:
            self._ops.pop(name, None)
        if self._store is not None:
            self._store.delete_operation(tenant, name)

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
        """The tenant's operations, this replica's and (with a store) every replica's. Reads
        only the tenant's own records (blocking: call it off the event loop)."""
        with self._cond:
            mine = {op.name: op for op in self._ops.values() if op.tenant == tenant}
        if self._store is not None:
            for saved in self._store.operations(tenant):
                if saved.name not in mine and (op := self._decode_or_skip(saved)) is not None:
                    mine[saved.name] = op
        return list(mine.values())

    def page(self, tenant: str, after: str, size: int) -> tuple[list[Operation], bool]:
        """Up to `size` of the tenant's operations whose names sort after `after` (this
        replica's and every replica's), in name order, and whether more follow. Reads only the
        records it returns (and those it skips as unreadable), however many the tenant has:
        blocking, call it off the event loop."""
        with self._cond:
            mine = {op.name: op for op in self._ops.values() if op.tenant == tenant and op.name > after}
        names = set(mine)
        if self._store is not None:
            names.update(n for n in self._store.operation_names(tenant) if n > after)
        chosen: list[Operation] = []
        ordered = sorted(names)
        for i, name in enumerate(ordered):
            if len(chosen) == size:
                return chosen, True
            op = mine.get(name)
            if op is None:
                saved = self._store.operation(tenant, name)
                op = self._decode_or_skip(saved) if saved is not None else None
            if op is not None:
                chosen.append(op)
        return chosen, False

    def _trim(self) -> None:
        finished = [op for op in self._ops.values() if op.done]
        for op in finished[: max(0, len(self._ops) - MAX_KEPT)]:
            del self._ops[op.name]
            if self._store is not None:
                self._store.delete_operation(op.tenant, op.name)

    def expire(self, retention_s: float) -> int:
        """Forget finished operations that ended more than `retention_s` ago: this replica's
        in memory, and every replica's in the store (the registry sync calls this)."""
        cutoff = time.time() - retention_s
        with self._cond:
            for op in [op for op in self._ops.values() if op.done and (op.end_time or op.create_time) < cutoff]:
                del self._ops[op.name]
        return self._store.trim(retention_s) if self._store is not None else 0

    # -- persistence ----------------------------------------------------------------------

    def _save(self, op: Operation) -> None:
        if self._store is None:
            return
        body = {"metadata": op.metadata, "create_time": op.create_time, "done": op.done, "end_time": op.end_time}
        if op.error is not None:
            body["error"] = {"kind": op.error.kind.value, "reason": op.error.reason, "message": op.error.message,
                             "field": op.error.field, "metadata": op.error.metadata}
        if op.result is not None and self._codec is not None:
            body["result"] = self._codec.encode(op.result)
        self._store.put_operation(op.name, op.tenant, body)

    def _decode_or_skip(self, saved: OperationRecord) -> Operation | None:
        """The operation a stored record holds; None (skipped and reported) if its body is not
        one this server writes. Any failure to decode it is such a record's, never the caller's."""
        where = f"operations/{saved.tenant}/{saved.name.removeprefix('operations/')}.json"
        try:
            op = self._decode(saved)
        except Exception as e:  # noqa: BLE001 (a stored record may hold anything)
            self._store.skipped.add(where, str(e) if isinstance(e, BadRecord) else f"not decodable ({type(e).__name__})")
            return None
        self._store.skipped.discard(where)
        return op

    def _decode(self, saved: OperationRecord) -> Operation:
        body = saved.body
        _check_metadata(body.get("metadata", {}))
        op = Operation(name=saved.name, tenant=saved.tenant, metadata=body.get("metadata", {}),
                       create_time=float(body["create_time"]), done=body["done"], end_time=body.get("end_time"),
                       foreign=saved.owner != self._store.replica)
        if "error" in body:
            op.error = _decode_error(body["error"])
        if "result" in body and self._codec is not None:
            try:
                op.result = self._codec.decode(body["result"])
            except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
                raise BadRecord(f"'result' is not a result this server writes ({type(e).__name__})") from None
        return op

    def restore(self, lease_s: float) -> int:
        """Take back this replica's saved operations, and those of replicas whose heartbeat is
        older than `lease_s`; those cut short end with INTERRUPTED_BY_RESTART. Returns how many
        were interrupted."""
        if self._store is None:
            return 0
        interrupted = 0
        for saved in self._store.operations():
            op = self._decode_or_skip(saved)  # every record checked: one that is not this server's is reported
            if op is None:
                continue
            if saved.owner != self._store.replica and (saved.body["done"] or self._store.alive(saved.owner, lease_s)):
                continue  # another replica's: answered from the store
            op.foreign = False
            name = saved.name
            with self._cond:
                if name in self._ops:
                    continue
                self._ops[name] = op
            if not op.done:
                interrupted += 1
                kind = name.split("/")[-1].split("-")[0]
                self.finish(op, error=Interrupted(f"the server running this {kind} restarted or stopped; run it again"))
        return interrupted


def _decode_error(saved) -> LoramuxError:
    """A stored operation's error, checked field by field (the record may be anyone's)."""
    if not isinstance(saved, dict):
        raise BadRecord("'error' is not an object")
    message, reason, field, metadata = saved.get("message"), saved.get("reason"), saved.get("field"), saved.get("metadata", {})
    if not (isinstance(message, str) and isinstance(reason, str) and (field is None or isinstance(field, str))
            and isinstance(metadata, dict) and all(isinstance(k, str) and k.isidentifier() for k in metadata)):
        raise BadRecord("'error' lacks a message, reason, field or metadata of their types")
    try:
        kind = Kind(saved.get("kind"))
    except ValueError:
        raise BadRecord(f"'error' has an unknown kind {str(saved.get('kind'))[:40]!r}") from None
    error = LoramuxError(message, field=field, reason=reason)
    error.metadata = shown_metadata(metadata)  # set after: a key such as "self" must not reach the constructor
    error.kind = kind
    return error


_INT64 = 1 << 63
_METADATA_TYPES = {"adapter_id": str, "output_dir": str, "phase": str, "tensors_done": int, "tensors_total": int,
                   "bytes_done": int, "bytes_total": int}


def _check_metadata(metadata: dict) -> None:
    """The progress fields the API shows, of their types and ranges (a stored record may hold anything)."""
    for key, kind in _METADATA_TYPES.items():
        value = metadata.get(key)
        if value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and not 0 <= value < _INT64):
            raise BadRecord(f"metadata {key!r} is not a {kind.__name__} in range")
