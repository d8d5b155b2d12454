"""The engine: the only code that touches the model and the accelerator.

One worker thread runs the running batch one step at a time (continuous batching). Between
steps it runs queued jobs (slot warm-ups), asks the scheduler which waiting requests join,
prefills those and concatenates them to the running batch; rows that finished, were
cancelled or expired leave the batch after the step and release their adapters at once.
Other threads (the gRPC layer's executor, I/O workers) read adapter files and register
adapters, but slot changes happen on the worker thread only, between steps. The scheduler
(scheduler.py) owns the waiting requests and the admission policy; the batch (batch.py)
owns the KV cache.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch
from opentelemetry.trace import StatusCode

from loramux.server.adapters.cache import TieredAdapterCache, Tier
from loramux.server.adapters.registry import AdapterRecord, AdapterRegistry
from loramux.server.base_model import BaseModel
from loramux.server.engine.batch import Batch, Row, check_cache_layout, ended_early, new_row
from loramux.server.engine.inputs import GenerateInput, prompt_ids, sampling_params
from loramux.server.engine.scheduler import Scheduler
from loramux.server.engine.request import (
    ErrorEvent,
    Event,
    GenerationRequest,
    TokenEvent,
)
from loramux.server.errors import (
    InvalidRequest,
    LoramuxError,
    MergeFailed,
    PinLimit,
    ShuttingDown,
)
from loramux.server.merge import MergeResult, merge_to_checkpoint, resolve_output
from loramux.server.operations import Operation, OperationStore
from loramux.server.settings import Settings
from loramux.server.telemetry.signals import Telemetry

log = logging.getLogger(__name__)
T = TypeVar("T")
_IDLE_POLL_S = 0.02  # while requests wait for an adapter read or a slot and nothing runs


@dataclasses.dataclass(frozen=True)
class EngineStats:
    waiting: int
    waiting_by_tenant: dict[str, int]
    running: int
    kv_length: int  # KV cache columns of the running batch (padding included)
    steps: int  # decode steps run so far
    prefills: int  # prefill passes run so far


class Engine:
    def __init__(self, settings: Settings, base: BaseModel, telemetry: Telemetry | None = None):
        self.settings = settings
        self.base = base
        self.telemetry = telemetry or Telemetry()
        self.registry = AdapterRegistry(
            settings,
            base.view(settings),
            lambda reload: TieredAdapterCache(
                base.bank, settings.host_cache_bytes, reload, host_pin_memory=base.device.type == "cuda"
            ),
        )
        self.cache = self.registry.cache
        self.cache.on_event = self.telemetry.cache_event
        check_cache_layout(base)
        self._cond = threading.Condition()
        self._jobs: deque[tuple[Callable[[], object], Future]] = deque()
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="loramux-io")
        self._scheduler = Scheduler(
            settings, self.cache, self.registry.is_live, self._io, self._wake, base.bank.base_slot
        )
        self._running: Batch | None = None
        self._steps = 0
        self._prefills = 0
        self._merges = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramux-merge")
        self.operations = OperationStore()
        self._stopping = False
        self.telemetry.observe(self.stats, self.cache.usage, self.cache.pinned_count)
        self._thread = threading.Thread(target=self._run, name="loramux-engine", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the running rows, fail what waits with SHUTTING_DOWN, stop the worker."""
        with self._cond:
            self._stopping = True
            waiting = self._scheduler.drain()
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
        self,
        tenant: str,
        inp: GenerateInput,
        emit: Callable[[Event], None],
        deadline: float | None = None,
        trace_context: object = None,
    ) -> GenerationRequest:
        """Validate and queue a request; events arrive through `emit` on the engine thread.
        `trace_context` (an OpenTelemetry context) is the parent of the request's engine spans."""
        record = self.registry.get(tenant, inp.adapter_id) if inp.adapter_id else None
        ids = prompt_ids(inp, self.base)
        params = sampling_params(inp, self.base, self.settings)
        room = self.base.max_sequence_length - len(ids)
        if params.max_new_tokens > room:  # the context length caps the output
            params = dataclasses.replace(params, max_new_tokens=room)
        if len(ids) + params.max_new_tokens > self.settings.max_batch_tokens:
            raise InvalidRequest(
                f"the prompt ({len(ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) exceed the "
                f"{self.settings.max_batch_tokens} tokens a batch may hold; ask for fewer tokens",
                field="max_new_tokens",
                reason="REQUEST_TOO_LARGE",
                max_batch_tokens=self.settings.max_batch_tokens,
            )
        telemetry = self.telemetry

        def emit_last_after_telemetry(event: Event) -> None:
            if not isinstance(event, TokenEvent):
                telemetry.request_ended(request, event)
            emit(event)

        request = GenerationRequest(
            tenant=tenant,
            adapter_uid=record.uid if record else None,
            adapter_id=inp.adapter_id,
            prompt_ids=ids,
            params=params,
            emit=emit_last_after_telemetry,
            deadline=deadline,
            trace_context=trace_context,
        )
        if record is not None:
            request.timeline.tier_found = self.cache.tier(record.uid)
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            request.arrival_step = self._steps
            self._scheduler.push(request)
            self._cond.notify_all()
        if record is not None:
            telemetry.adapter_lookup(request.timeline.tier_found)
        return request

    def stats(self) -> EngineStats:
        with self._cond:
            running = self._running
            return EngineStats(
                waiting=len(self._scheduler),
                waiting_by_tenant=self._scheduler.waiting_by_tenant(),
                running=len(running) if running is not None else 0,
                kv_length=running.kv_length if running is not None else 0,
                steps=self._steps,
                prefills=self._prefills,
            )

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

    def start_merge(
        self, tenant: str, adapter_id: str, output_dir: str, overwrite: bool = False, trace_context: object = None
    ) -> Operation:
        """Check the request and start merging on the merge thread; returns the operation.

        The merge reads the base weights (never changed while serving) and the adapter's files,
        so it runs beside generation without touching slots. Its spans (one per phase) are
        children of `trace_context`."""
        if self.settings.merge_root is None:
            raise MergeFailed("this server has no merge root (--merge-root); merging is off")
        record = self.registry.get(tenant, adapter_id)
        target = resolve_output(self.settings.merge_root, output_dir, overwrite)
        op = self.operations.create(
            tenant,
            "merge",
            {"adapter_id": adapter_id, "output_dir": output_dir, "phase": "queued", "tensors_done": 0, "tensors_total": 0},
        )
        tracer = self.telemetry.tracer

        def work() -> None:
            started = time.perf_counter()
            attributes = {"loramux.tenant": tenant, "loramux.adapter.id": adapter_id, "loramux.operation": op.name}
            with tracer.start_as_current_span("loramux.merge", context=trace_context, attributes=attributes) as span:
                try:
                    result = self._merge(op, record, adapter_id, target)
                except BaseException as e:
                    error = e if isinstance(e, LoramuxError) else LoramuxError(f"merge failed: {type(e).__name__}: {e}")
                    if not isinstance(e, LoramuxError):
                        log.exception("merge %s failed", op.name)
                    span.set_status(StatusCode.ERROR, error.message)
                    span.set_attribute("error.type", error.reason)
                    # Metrics first: whoever waits on the operation may read them at once.
                    self.telemetry.merge_duration.record(time.perf_counter() - started, {"outcome": "error"})
                    self.operations.finish(op, error=error)
                    return
                self.telemetry.merge_duration.record(time.perf_counter() - started, {"outcome": "ok"})
                self.operations.update(op, phase="done")
                self.operations.finish(op, result=result)

        self._merges.submit(work)
        return op

    def _merge(self, op: Operation, record: AdapterRecord, adapter_id: str, target) -> MergeResult:
        """The merge itself, on the merge thread, one child span per phase."""
        tracer = self.telemetry.tracer
        self.operations.update(op, phase="merging")
        with tracer.start_as_current_span("loramux.merge.read_adapter"):
            weights = self.registry.read_weights(record, dtype=torch.float32)
        provenance = {
            "base_model": self.settings.served_model_name,
            "base_revision": self.base.revision,
            "adapter_id": adapter_id,
            "adapter_source": record.source,
            "adapter_revision": record.revision,
        }
        phase = {"span": tracer.start_span("loramux.merge.merge_tensors")}

        def progress(done: int, total: int) -> None:
            self.operations.update(op, tensors_done=done, tensors_total=total)
            if done == total:
                phase["span"].set_attribute("loramux.merge.tensors", total)
                phase["span"].end()
                phase["span"] = tracer.start_span("loramux.merge.write_checkpoint")
                self.operations.update(op, phase="writing_config")

        try:
            result: MergeResult = merge_to_checkpoint(self.base, weights, target, provenance, progress)
        except BaseException as e:
            phase["span"].set_status(StatusCode.ERROR, str(e))
            raise
        finally:
            phase["span"].end()
        return result

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

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            admitted = self._next_work()
            if admitted is None:
                return
            try:
                if admitted:
                    self._join(admitted)
                elif self._running is not None:
                    self._running.step()
                    self._steps += 1
            except LoramuxError as e:
                self._fail_running(e)
            except Exception as e:
                log.exception("generation step failed")
                self._fail_running(LoramuxError(f"generation failed: {type(e).__name__}: {e}"))
            if self._running is not None:
                for row in self._running.filter():
                    self._row_done(row)
                if not self._running:
                    with self._cond:
                        self._running = None

    def _join(self, admitted: list[tuple[GenerationRequest, int]]) -> None:
        """Prefill newly admitted requests and add them to the running batch."""
        now = time.monotonic()
        rows = [new_row(self.base, request, slot, now) for request, slot in admitted]
        live = []
        for row in rows:
            if ended_early(row):
                self._row_done(row)
            else:
                live.append(row)
        if not live:
            return
        started_ns = time.time_ns()
        for row in live:
            row.request.timeline.prefill_start_ns = started_ns
            row.request.timeline.prefill_rows = len(live)
        try:
            fresh = Batch.prefill(self.base, live)
            # The first tokens were emitted inside prefill; the end stamp only orders the spans.
            ended_ns = time.time_ns()
            for row in live:
                row.request.timeline.prefill_end_ns = ended_ns
        except BaseException as e:
            error = e if isinstance(e, LoramuxError) else LoramuxError(f"prefill failed: {type(e).__name__}: {e}")
            if not isinstance(e, LoramuxError):
                log.exception("prefill of %d rows failed", len(live))
            for row in Batch.abandon(live, error):
                self._row_done(row)
            return
        self._prefills += 1
        with self._cond:
            if self._running is None:
                self._running = fresh
            else:
                self._running.concatenate(fresh)

    def _fail_running(self, error: LoramuxError) -> None:
        if self._running is not None:
            for row in self._running.fail(error):
                self._row_done(row)
            with self._cond:
                self._running = None

    def _row_done(self, row: Row) -> None:
        request = row.request
        if request.adapter_uid is not None:
            self.cache.release(request.adapter_uid)
            self.registry.mark_used(request.adapter_uid, time.time())
        # The queue-full retry hint: about how long one row holds its place, recently.
        held = time.monotonic() - row.started
        hint = self._scheduler.retry_hint_s
        self._scheduler.retry_hint_s = 0.9 * hint + 0.1 * held

    def _worth_joining(self, running: int) -> bool:
        """Whether waiting requests should be prefilled now, stalling the running rows for one
        pass. Prefilling several prompts together costs much less per token than one at a
        time, so while rows decode, requests join once they are a `join_ratio` share of the
        running rows, or the oldest has waited `join_max_steps` steps."""
        if len(self._scheduler) >= self.settings.join_ratio * running:
            return True
        return self._steps - self._scheduler.oldest().arrival_step >= self.settings.join_max_steps

    def _next_work(self) -> list[tuple[GenerationRequest, int]] | None:
        """Run pending jobs, then return the requests to admit now ([] = just step), or None to stop."""
        window = self.settings.batch_window_ms / 1000
        while True:
            with self._cond:
                job = self._jobs.popleft() if self._jobs else None
                if job is None:
                    running = len(self._running) if self._running is not None else 0
                    if self._stopping:
                        return [] if running else None
                    if not len(self._scheduler):
                        if running:
                            return []
                        self._cond.wait()
                        continue
                    if running and (self.settings.scheduling == "static" or not self._worth_joining(running)):
                        return []
                    now = time.monotonic()
                    if not running:
                        wait_left = self._scheduler.oldest_arrival() + window - now
                        if len(self._scheduler) < self.settings.max_batch_size and wait_left > 0:
                            self._cond.wait(wait_left)
                            continue
                    reserved = self._running.tokens_reserved() if running else 0
                    admitted = self._scheduler.admit(
                        self.settings.max_batch_size - running, self.settings.max_batch_tokens - reserved, now
                    )
                    if admitted or running:
                        return admitted
                    self._cond.wait(_IDLE_POLL_S)
                    continue
            fn, future = job
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)
