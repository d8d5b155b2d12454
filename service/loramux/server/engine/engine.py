"""The engine: the only code that touches the model and the accelerator.

One worker thread takes queued requests, forms batches that mix adapters, puts their
adapters in slots and runs the batch. Other threads (the gRPC layer's executor, I/O
workers) read adapter files and register adapters, but slot changes happen on the worker
thread only, between batches.

Scheduling here is by batch: requests that arrive within `batch_window_ms` of the oldest
waiting one (up to `max_batch_size`) run together until the last of them finishes.
A request whose adapter is on disk waits while an I/O thread reads it; a request whose
adapter cannot get a slot (all slots held by the batch being formed, or pinned) waits for
the next batch, and requests behind it with resident adapters may go first. Waiting is
bounded by each request's deadline.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from loramux.server.adapters.cache import NoSlotAvailable, TieredAdapterCache, Tier
from loramux.server.adapters.registry import AdapterRecord, AdapterRegistry
from loramux.server.base_model import BaseModel
from loramux.server.engine.batch import run_batch
from loramux.server.engine.inputs import GenerateInput, prompt_ids, sampling_params
from loramux.server.engine.request import (
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationRequest,
    TokenEvent,
)
from loramux.server.errors import (
    AdapterNotFound,
    Cancelled,
    DeadlineExceeded,
    LoramuxError,
    MergeFailed,
    PinLimit,
    QueueFull,
    ShuttingDown,
)
from loramux.server.merge import MergeResult, merge_to_checkpoint, resolve_output
from loramux.server.operations import Operation, OperationStore
from loramux.server.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
_IDLE_POLL_S = 0.02  # while requests wait for an adapter read or a slot


class Engine:
    def __init__(self, settings: Settings, base: BaseModel):
        self.settings = settings
        self.base = base
        self.registry = AdapterRegistry(
            settings,
            base.view(settings),
            lambda reload: TieredAdapterCache(
                base.bank, settings.host_cache_bytes, reload, host_pin_memory=base.device.type == "cuda"
            ),
        )
        self.cache = self.registry.cache
        self._cond = threading.Condition()
        self._queue: deque[GenerationRequest] = deque()
        self._jobs: deque[tuple[Callable[[], object], Future]] = deque()
        self._loads: dict[int, Future] = {}  # disk reads in flight for queued requests, by uid
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="loramux-io")
        self._merges = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramux-merge")
        self.operations = OperationStore()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="loramux-engine", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the running batch, fail what is queued with SHUTTING_DOWN, stop the worker."""
        with self._cond:
            self._stopping = True
            waiting = list(self._queue)
            self._queue.clear()
            jobs = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        for request in waiting:
            request.emit(ErrorEvent(ShuttingDown("the server is shutting down")))
        for _, future in jobs:
            future.set_exception(ShuttingDown("the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._io.shutdown(wait=False, cancel_futures=True)
        self._merges.shutdown(wait=True, cancel_futures=True)

    # -- generation ---------------------------------------------------------------------

    def submit(
        self, tenant: str, inp: GenerateInput, emit: Callable[[Event], None], deadline: float | None = None
    ) -> GenerationRequest:
        """Validate and queue a request; events arrive through `emit` on the engine thread."""
        record = self.registry.get(tenant, inp.adapter_id) if inp.adapter_id else None
        request = GenerationRequest(
            tenant=tenant,
            adapter_uid=record.uid if record else None,
            adapter_id=inp.adapter_id,
            prompt_ids=prompt_ids(inp, self.base),
            params=sampling_params(inp, self.base, self.settings),
            emit=emit,
            deadline=deadline,
        )
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.settings.max_queue:
                raise QueueFull(
                    f"{len(self._queue)} requests are waiting, the most this server queues; retry later",
                    queued=len(self._queue),
                )
            self._queue.append(request)
            self._cond.notify_all()
        return request

    def cancel(self, request: GenerationRequest) -> None:
        request.cancelled = True
        with self._cond:
            self._cond.notify_all()

    def generate(self, tenant: str, inp: GenerateInput, timeout: float | None = None) -> dict:
        """Run one request to the end from any thread but the engine's; returns its collected output."""
        events: queue.Queue[Event] = queue.Queue()
        deadline = time.monotonic() + timeout if timeout else None
        self.submit(tenant, inp, events.put, deadline)
        token_ids: list[int] = []
        logprobs: list[float] = []
        text = []
        while True:
            event = events.get()
            if isinstance(event, ErrorEvent):
                raise event.error
            text.append(event.text)
            if isinstance(event, TokenEvent):
                token_ids += event.token_ids
                logprobs += event.logprobs
            else:
                return {"text": "".join(text), "token_ids": token_ids, "logprobs": logprobs, "finish": event}

    # -- adapters -----------------------------------------------------------------------

    def load_adapter(
        self,
        tenant: str,
        adapter_id: str,
        source: str,
        revision: str = "",
        pin: bool = False,
        warm: bool = False,
        replace: bool = False,
    ) -> AdapterRecord:
        """Register (read, validate) an adapter; with pin or warm, also put it in a slot now.
        Blocking: call it off the event loop."""
        if pin:
            self._check_pin_room()
        record, created = self.registry.load(tenant, adapter_id, source, revision, replace)
        if pin or warm:
            try:
                self.call_on_engine(lambda: self._warm(record, pin)).result()
            except BaseException:
                if created:
                    self.registry.unload(tenant, adapter_id)
                raise
        return record

    def unload_adapter(self, tenant: str, adapter_id: str) -> AdapterRecord:
        return self.registry.unload(tenant, adapter_id)

    def tier(self, record: AdapterRecord) -> Tier:
        return self.registry.tier(record)

    def start_merge(self, tenant: str, adapter_id: str, output_dir: str, overwrite: bool = False) -> Operation:
        """Check the request and start merging on the merge thread; returns the operation.

        The merge reads the base weights (never changed while serving) and the adapter's files,
        so it runs beside generation without touching slots."""
        if self.settings.merge_root is None:
            raise MergeFailed("this server has no merge root (--merge-root); merging is off")
        record = self.registry.get(tenant, adapter_id)
        target = resolve_output(self.settings.merge_root, output_dir, overwrite)
        op = self.operations.create(
            tenant,
            "merge",
            {"adapter_id": adapter_id, "output_dir": output_dir, "phase": "queued", "tensors_done": 0, "tensors_total": 0},
        )

        def work() -> None:
            try:
                self.operations.update(op, phase="merging")
                weights = self.registry.read_weights(record, dtype=torch.float32)
                provenance = {
                    "base_model": self.settings.served_model_name,
                    "base_revision": self.base.revision,
                    "adapter_id": adapter_id,
                    "adapter_source": record.source,
                    "adapter_revision": record.revision,
                }

                def progress(done: int, total: int) -> None:
                    self.operations.update(op, tensors_done=done, tensors_total=total)
                    if done == total:
                        self.operations.update(op, phase="writing_config")

                result: MergeResult = merge_to_checkpoint(self.base, weights, target, provenance, progress)
                self.operations.update(op, phase="done")
                self.operations.finish(op, result=result)
            except LoramuxError as e:
                self.operations.finish(op, error=e)
            except Exception as e:
                log.exception("merge %s failed", op.name)
                self.operations.finish(op, error=LoramuxError(f"merge failed: {type(e).__name__}: {e}"))

        self._merges.submit(work)
        return op

    def call_on_engine(self, fn: Callable[[], T]) -> Future:
        """Run `fn` on the engine thread between batches."""
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            self._jobs.append((fn, future))
            self._cond.notify_all()
        return future

    def _check_pin_room(self) -> None:
        if self.cache.pinned_count() >= self.settings.adapter_slots - 1:
            raise PinLimit(
                f"{self.cache.pinned_count()} of {self.settings.adapter_slots} slots are pinned; at least one "
                "slot must stay free for unpinned adapters. Unpin one, or serve with more --adapter-slots",
                pinned=self.cache.pinned_count(),
                adapter_slots=self.settings.adapter_slots,
            )

    def _warm(self, record: AdapterRecord, pin: bool) -> None:
        self.cache.ensure_in_memory(record.uid)
        if pin and not record.pinned:
            self._check_pin_room()
        self.cache.acquire(record.uid)
        try:
            if pin:
                self.cache.pin(record.uid)
                record.pinned = True
        finally:
            self.cache.release(record.uid)

    # -- the worker ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                run_batch(self.base, batch, self._row_done)
            except Exception:
                log.exception("batch of %d failed", len(batch))

    def _row_done(self, request: GenerationRequest) -> None:
        if request.adapter_uid is not None:
            self.cache.release(request.adapter_uid)
            self.registry.mark_used(request.adapter_uid, time.time())

    def _next_batch(self) -> list[tuple[GenerationRequest, int]] | None:
        window = self.settings.batch_window_ms / 1000
        while True:
            with self._cond:
                if self._stopping:
                    return None
                job = self._jobs.popleft() if self._jobs else None
                if job is None:
                    if not self._queue:
                        self._cond.wait()
                        continue
                    wait_left = self._queue[0].arrival + window - time.monotonic()
                    if len(self._queue) < self.settings.max_batch_size and wait_left > 0:
                        self._cond.wait(wait_left)
                        continue
                    batch = self._form_batch()
                    if batch:
                        return batch
                    self._cond.wait(_IDLE_POLL_S)
                    continue
            fn, future = job
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)

    def _form_batch(self) -> list[tuple[GenerationRequest, int]]:
        """Pick queued requests that can run now and give them slots (lock held)."""
        chosen: list[GenerationRequest] = []
        uids: set[int] = set()
        now = time.monotonic()
        for request in list(self._queue):
            if len(chosen) >= self.settings.max_batch_size:
                break
            error = self._why_drop(request, now)
            if error is not None:
                self._queue.remove(request)
                request.emit(ErrorEvent(error))
                continue
            uid = request.adapter_uid
            if uid is not None and uid not in uids:
                if self.cache.tier(uid) is Tier.DISK:
                    self._start_read(uid)
                    continue
                if not self.cache.slots_available_for(uids | {uid}):
                    continue
                uids.add(uid)
            chosen.append(request)
        for future_uid in [u for u, f in self._loads.items() if f.done()]:
            del self._loads[future_uid]
        # Resident adapters first: taking a slot for another must not evict them.
        chosen.sort(key=lambda r: r.adapter_uid is None or self.cache.tier(r.adapter_uid) is not Tier.ACCELERATOR)
        batch = []
        for request in chosen:
            uid = request.adapter_uid
            if uid is None:
                slot = self.base.bank.base_slot
            else:
                try:
                    slot = self.cache.acquire(uid)
                except (KeyError, NoSlotAvailable):  # pushed out of memory meanwhile: read it again
                    continue
            self._queue.remove(request)
            batch.append((request, slot))
        return batch

    def _why_drop(self, request: GenerationRequest, now: float) -> LoramuxError | None:
        if request.cancelled:
            return Cancelled("the request was cancelled while queued")
        if request.deadline is not None and now > request.deadline:
            return DeadlineExceeded(
                f"the deadline passed after {now - request.arrival:.3f}s in the queue", waited_s=round(now - request.arrival, 3)
            )
        uid = request.adapter_uid
        if uid is not None and not self.registry.is_live(uid):
            return AdapterNotFound(
                f"adapter {request.adapter_id!r} was unloaded while the request waited", field="adapter_id"
            )
        load = self._loads.get(uid) if uid is not None else None
        if load is not None and load.done() and load.exception() is not None:
            error = load.exception()
            return error if isinstance(error, LoramuxError) else LoramuxError(f"reading the adapter failed: {error}")
        return None

    def _start_read(self, uid: int) -> None:
        if uid in self._loads:
            return
        future = self._io.submit(self.cache.ensure_in_memory, uid)
        self._loads[uid] = future

        def wake(_: Future) -> None:
            with self._cond:
                self._cond.notify_all()

        future.add_done_callback(wake)
