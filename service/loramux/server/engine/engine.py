"""The engine: the only code that touches the model and the accelerator.

One worker thread runs the running batch one step at a time (continuous batching). Between
steps it runs queued jobs (slot warm-ups), asks the scheduler which waiting requests join,
prefills those and concatenates them to the running batch; rows that finished, were
cancelled or expired leave the batch after the step and release their adapters at once.
Other threads (the gRPC layer's pools, I/O workers) read adapter files and register
adapters. Adapters are placed in slots on the worker thread only, between passes; an unload
frees an idle adapter's slot at once from the caller's thread (a slot in use is freed when
its rows finish). A pass never breaks the worker: a failure ends the requests it concerns.
The scheduler (scheduler.py) owns the waiting requests and the admission policy; the batch
(batch.py) owns the KV cache; adapter administration (adapter_admin.py) and merges
(merges.py) have their own owners.
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


from loramux.server.adapters.cache import TieredAdapterCache, Tier
from loramux.server.adapters.registry import AdapterRecord, AdapterRegistry
from loramux.server.base_model import BaseModel
from loramux.server.cpu_threads import limit_to_one_thread
from loramux.server.engine.failures import as_domain_error
from loramux.server.engine.batch import Batch, Row, check_cache_layout, ended_early, new_row
from loramux.server.engine.inputs import GenerateInput, prompt_ids, sampling_params
from loramux.server.engine.scheduler import KvBudget, Scheduler
from loramux.server.engine.request import (
    ErrorEvent,
    Event,
    GenerationRequest,
    TokenEvent,
)
from loramux.server.errors import (
    InvalidSettings,
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    LoramuxError,
    ShuttingDown,
)
from loramux.server.engine.adapter_admin import AdapterAdmin
from loramux.server.engine.merges import Merges
from loramux.server.merge import MERGE_RESULTS
from loramux.server.operations import OperationStore
from loramux.server.state import StateStore
from loramux.server.settings import Settings
from loramux.server.telemetry.signals import Telemetry

log = logging.getLogger(__name__)
T = TypeVar("T")
_IDLE_POLL_S = 0.02  # while requests wait for an adapter read or a slot and nothing runs
_CUT_WAIT_S = 5.0
QUIET_WAIT_CAP = 4  # when idle, the batch window ends at most this many windows after the first arrival  # after the grace period: how long the cut rows may take to be answered


@dataclasses.dataclass(frozen=True)
class EngineStats:
    waiting: int
    waiting_by_tenant: dict[str, int]
    running: int
    kv_length: int  # KV cache columns of the running batch (padding included)
    steps: int  # decode steps run so far
    prefills: int  # prefill passes run so far
    adapter_bytes_read: int  # adapter weights read by the decode steps so far (each distinct adapter once a step)


RESIDENT_MAX_RANK_ADAPTERS = 8  # the default accelerator budget, in adapters of max_lora_rank


def accelerator_budget(settings: Settings, base: BaseModel) -> int:
    """Bytes for resident adapters: the setting, or room for 8 adapters of the largest size."""
    largest = base.bank.max_adapter_bytes
    if settings.adapter_memory_mib is None:
        return RESIDENT_MAX_RANK_ADAPTERS * largest
    budget = int(settings.adapter_memory_mib * 1024 * 1024)
    if budget < largest:
        raise InvalidSettings(
            f"adapter_memory_mib: {settings.adapter_memory_mib:g} MiB cannot hold one adapter of max_lora_rank "
            f"{settings.max_lora_rank} on every served module ({largest / 2**20:.1f} MiB); raise it or lower max_lora_rank",
            field="adapter_memory_mib",
        )
    return budget


class Engine:
    def __init__(self, settings: Settings, base: BaseModel, telemetry: Telemetry | None = None):
        self.settings = settings
        self.base = base
        self.telemetry = telemetry or Telemetry()
        self.adapter_memory_bytes = accelerator_budget(settings, base)
        self.state = StateStore(settings.state_dir) if settings.state_dir is not None else None
        self.registry = AdapterRegistry(
            settings,
            base.view(settings),
            lambda reload: TieredAdapterCache(
                base.bank,
                settings.host_cache_bytes,
                reload,
                host_pin_memory=base.device.type == "cuda",
                accelerator_capacity_bytes=self.adapter_memory_bytes,
            ),
            store=self.state,
        )
        self.cache = self.registry.cache
        self.cache.on_event = self.telemetry.cache_event
        check_cache_layout(base)
        self._cond = threading.Condition()
        self._jobs: deque[tuple[Callable[[], object], Future]] = deque()
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="loramux-io", initializer=limit_to_one_thread)
        self._scheduler = Scheduler(
            settings, self.cache, self.registry.current_uid, self._io, self._wake
        )
        self._running: Batch | None = None
        self._steps = 0
        self._prefills = 0
        self._adapter_bytes_read = 0
        self.operations = OperationStore(self.state, MERGE_RESULTS)
        self.merges = Merges(settings, base, self.registry, self.operations, self.telemetry)
        self.adapters = AdapterAdmin(
            settings,
            self.registry,
            base.bank.max_adapter_bytes,
            self.adapter_memory_bytes,
            self.call_on_engine,
            retry_hint=lambda: self._scheduler.retry_hint_s,
            refusal=lambda: ShuttingDown("the server is shutting down") if self._draining else None,
            cut=lambda: self._cut,
        )
        self._stopping = False  # the worker ends once the running rows finish
        self._draining = False  # new work is refused
        self._cut: LoramuxError | None = None  # set: end everything queued or running with it
        self._pass_started: float | None = None  # when the worker's current pass began (None: idle)
        self.restore_report = None  # what start-up brought back from the state directory (app.build_engine)
        self.telemetry.observe(self.stats, self.cache.usage, self.cache.pinned_count)
        self._thread = threading.Thread(target=self._run, name="loramux-engine", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread.start()
        return self

    def drain(self, grace_s: float) -> bool:
        """Shut down step one: refuse new work, let what is queued or running finish for up to
        `grace_s`, then end what is left with SHUTTING_DOWN (merges too). True if all finished."""
        with self._cond:
            self._draining = self.merges.draining = True
            self._cond.notify_all()
        finished = self._wait_idle(grace_s)
        if not finished:
            with self._cond:
                self._cut = ShuttingDown("the server is shutting down and its grace period ended")
                self._cond.notify_all()
            self.operations.cancel_running(self._cut)
            self._wait_idle(_CUT_WAIT_S)
        return finished

    def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._running is not None or len(self._scheduler) or self._jobs or self.operations.running():
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(min(left, _IDLE_POLL_S))
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the running rows, fail what waits with SHUTTING_DOWN, stop the worker."""
        with self._cond:
            self._stopping = self._draining = True
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
        self.operations.cancel_running(ShuttingDown("the server is shutting down"))
        self.merges.shutdown()
        if self.state is not None:
            self.state.close()
        if not self._thread.is_alive():
            self.base.bank.drop_all()  # the adapters' accelerator memory goes back with the engine

    def healthy(self, stall_s: float) -> bool:
        """Whether the worker can make progress: alive, and no pass has run longer than `stall_s`."""
        if not self._thread.is_alive():
            return False
        started = self._pass_started
        return started is None or time.monotonic() - started < stall_s

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
        if self._draining:
            raise ShuttingDown("the server is shutting down")
        record = self.registry.get(tenant, inp.adapter_id) if inp.adapter_id else None
        ids = prompt_ids(inp, self.base, self.settings)
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
        if deadline is not None and time.monotonic() > deadline:  # tokenizing took the caller's time
            raise DeadlineExceeded("the deadline passed while the prompt was being tokenized")
        with self._cond:
            if self._draining:
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
                adapter_bytes_read=self._adapter_bytes_read,
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

    # -- adapters (AdapterAdmin does the work) -------------------------------------------

    def load_adapter(self, tenant: str, adapter_id: str, source: str, revision: str = "", pin: bool = False,
                     warm: bool = False, replace: bool = False, wait_s: float | None = None) -> AdapterRecord:
        """Register an adapter, with warm or pin also placed now (see AdapterAdmin.load)."""
        return self.adapters.load(tenant, adapter_id, source, revision, pin, warm, replace, wait_s)

    def unload_adapter(self, tenant: str, adapter_id: str) -> AdapterRecord:
        return self.registry.unload(tenant, adapter_id)

    def tier(self, record: AdapterRecord) -> Tier:
        return self.registry.tier(record)

    def call_on_engine(self, fn: Callable[[], T]) -> Future:
        """Run `fn` on the engine thread between batches."""
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            self._jobs.append((fn, future))
            self._cond.notify_all()
        return future

    # -- the worker ---------------------------------------------------------------------

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        """The worker. Nothing that goes wrong in a pass ends it: a failure fails the requests it
        concerns (the rows being joined, or the running batch) and the loop goes on."""
        while True:
            try:
                admitted = self._next_work()
            except Exception as e:  # a bug in admission: report it, keep serving
                InternalError.logged(e, "admission failed")
                time.sleep(_IDLE_POLL_S)
                continue
            if admitted is None:
                return
            self._pass_started = time.monotonic()
            try:
                self._pass(admitted)
            except Exception as e:  # last resort: nothing below should raise
                self._fail_running(as_domain_error(e, "engine pass failed"))
            finally:
                with self._cond:
                    self._pass_started = None
                    self._cond.notify_all()

    def _pass(self, admitted: list[GenerationRequest]) -> None:
        if self._cut is not None:
            self._end_all(admitted, self._cut)
            return
        if admitted:
            self._join(admitted)
        elif self._running is not None:
            try:
                self._running.step()
                self._steps += 1
                self._adapter_bytes_read += self._running.adapter_bytes
            except Exception as e:  # the forward pass is shared: every running row is concerned
                self._fail_running(as_domain_error(e, "decode step failed"))
        if self._running is not None:
            try:
                gone = self._running.filter()
            except Exception as e:
                self._fail_running(as_domain_error(e, "filtering the batch failed"))
                return
            for row in gone:
                self._row_done(row)
            if not self._running:
                with self._cond:
                    self._running = None

    def _end_all(self, admitted: list[GenerationRequest], error: LoramuxError) -> None:
        """Answer every admitted, waiting and running request with `error` (at shutdown)."""
        self._abandon(admitted, [], error)
        with self._cond:
            waiting = self._scheduler.drain()
        for request in waiting:
            request.emit(ErrorEvent(error))
        self._fail_running(error)

    def _join(self, admitted: list[GenerationRequest]) -> None:
        """Prefill newly admitted requests and add them to the running batch. If anything fails
        on the way, the admitted requests (and only they) get the error and their slots back."""
        rows: list[Row] = []
        try:
            now = time.monotonic()
            for request in admitted:
                rows.append(new_row(self.base, request, now))
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
            fresh = Batch.prefill(self.base, live)
            # The first tokens were emitted inside prefill; the end stamp only orders the spans.
            ended_ns = time.time_ns()
            for row in live:
                row.request.timeline.prefill_end_ns = ended_ns
            self._prefills += 1
            with self._cond:
                if self._running is None:
                    self._running = fresh
                else:
                    self._running.concatenate(fresh)  # all or nothing: the running batch is intact on failure
        except Exception as e:
            self._abandon(admitted, rows, as_domain_error(e, f"joining {len(admitted)} request(s) failed"))

    def _abandon(self, admitted: list[GenerationRequest], rows: list[Row], error: LoramuxError) -> None:
        """End admitted requests that are not in the running batch, releasing their slots."""
        with_rows = {id(row.request) for row in rows}
        for row in Batch.abandon(rows, error):
            self._row_done(row)
        for request in admitted:
            if id(request) not in with_rows:
                request.emit(ErrorEvent(error))
                if request.adapter_uid is not None:
                    self.cache.release(request.adapter_uid)

    def _fail_running(self, error: LoramuxError) -> None:
        if self._running is not None:
            for row in self._running.fail(error):
                self._row_done(row)
            with self._cond:
                self._running = None

    def _row_done(self, row: Row) -> None:
        if row.released:  # a row is released once, however it ended
            return
        row.released = True
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

    def _next_work(self) -> list[GenerationRequest] | None:
        """Run pending jobs, then return the requests to admit now ([] = just step), or None to stop."""
        window = self.settings.batch_window_ms / 1000
        while True:
            with self._cond:
                job = self._jobs.popleft() if self._jobs else None
                if job is None:
                    running = len(self._running) if self._running is not None else 0
                    if self._stopping:
                        return [] if running else None
                    if self._cut is not None and (running or len(self._scheduler)):
                        return []  # the pass ends them
                    if not len(self._scheduler):
                        if running:
                            return []
                        self._cond.wait()
                        continue
                    if running and (self.settings.scheduling == "static" or not self._worth_joining(running)):
                        return []
                    now = time.monotonic()
                    if not running:  # a quiet gap of `window`, at most QUIET_WAIT_CAP windows in all
                        wait_left = min(self._scheduler.newest_arrival() + window,
                                        self._scheduler.oldest_arrival() + QUIET_WAIT_CAP * window) - now
                        if len(self._scheduler) < self.settings.max_batch_size and wait_left > 0:
                            self._cond.wait(wait_left)
                            continue
                    budget = KvBudget(self.settings.max_batch_tokens)
                    if running:
                        budget = KvBudget(budget.limit, running, self._running.kv_length + 1, self._running.most_remaining())
                    admitted = self._scheduler.admit(self.settings.max_batch_size - running, budget, now)
                    if admitted or running:
                        return admitted
                    self._cond.wait(_IDLE_POLL_S)
                    continue
            fn, future = job
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)
