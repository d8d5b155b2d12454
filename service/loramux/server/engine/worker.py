"""The engine thread: the running batch, one pass at a time (continuous batching).

A pass is one of: run queued jobs (slot placements from adapter administration), prefill the
requests the scheduler admits and concatenate them to the running batch, or decode one step.
After each pass, rows that finished, were cancelled or expired leave the batch and release
their adapters at once. A pass never breaks the loop: a failure ends the requests it
concerns (the rows being joined, or the running batch) and the loop goes on.

The worker owns the running batch, the jobs queue, the pass counters and the flags that stop
it; the scheduler (scheduler.py) owns the waiting requests and the admission policy; the
batch (batch.py) owns its KV cache (kv_cache.py); with `--kv-cache static` the worker holds
the preallocated rows every running batch uses, and with `--compile` the compiled decode step
(compiled_step.py), compiled on this thread before the loop starts. Everything the worker
shares with other threads is guarded by its condition `cond`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from loramux.server.adapters.registry import AdapterRegistry
from loramux.server.model.base_model import BaseModel
from loramux.server.engine.batch import Batch, Row, StepOutput, emit_step, ended_early, new_row
from loramux.server.engine.compiled_step import CompiledDecode
from loramux.server.engine.graph_step import GraphDecode
from loramux.server.engine.failures import as_domain_error
from loramux.server.engine.kv_cache import RowKv, StaticKvPool, static_row_tokens
from loramux.server.engine.request import ErrorEvent, GenerationRequest
from loramux.server.engine.scheduler import KvBudget, Scheduler
from loramux.server.errors import InternalError, InvalidSettings, LoramuxError, ShuttingDown
from loramux.server.settings import Settings

log = logging.getLogger(__name__)

UNBOUNDED = 1 << 62
IDLE_POLL_S = 0.02  # while requests wait for an adapter read or a slot and nothing runs
QUIET_WAIT_CAP = 4  # when idle, the batch window ends at most this many windows after the first arrival


@dataclasses.dataclass(frozen=True)
class EngineStats:
    waiting: int
    waiting_by_tenant: dict[str, int]
    running: int
    kv_length: int  # KV cache columns of the running batch (padding included)
    steps: int  # decode steps started so far (counted before a step emits its tokens)
    prefills: int  # prefill passes run so far
    adapter_bytes_read: int  # adapter weights read by the decode steps so far (each distinct adapter once a step)
    decode_seconds: float = 0.0  # time spent in decode passes so far (forward pass, sampling, handing on tokens)


class Worker:
    def __init__(self, settings: Settings, base: BaseModel, registry: AdapterRegistry, io: ThreadPoolExecutor):
        self.settings = settings
        self.base = base
        self.registry = registry
        self.cache = registry.cache
        self.cond = threading.Condition()
        self.scheduler = Scheduler(settings, self.cache, registry.current_uid, io, self.wake)
        self._jobs: deque[tuple[Callable[[], object], Future]] = deque()
        self._running: Batch | None = None
        # --overlap-steps: on a GPU a decode step is queued before the previous step's tokens are handed on, so
        # the host's work per row (stop conditions, detokenizing, events) runs while the device
        # computes the next step (off the step's critical path). On the CPU the model runs on
        # this thread, so there is nothing to overlap and the tokens would go out a step late.
        self.overlap = settings.overlap_steps and base.device.type == "cuda"
        self._pending: StepOutput | None = None  # a queued step whose tokens are not handed on yet
        self.launched = 0  # steps queued ahead of the previous one's tokens (diagnostics, tests)
        self._steps = 0
        self._prefills = 0
        self._adapter_bytes_read = 0
        self._decode_seconds = 0.0
        self.stopping = False  # the loop ends once the running rows finish
        self.draining = False  # new work is refused
        self.cut: LoramuxError | None = None  # set: end everything queued or running with it
        self._pass_started: float | None = None  # when the current pass began (None: between passes)
        self._thread = threading.Thread(target=self._run, name="loramux-engine", daemon=True)
        # --kv-cache static: every row's positions, allocated now (counted before any request).
        self.kv_pool = (StaticKvPool(base.model, settings.max_batch_size, static_row_tokens(settings, base.max_sequence_length),
                                     base.pad_token_id, base.device)
                        if settings.kv_cache == "static" else None)
        self.decode = None  # --compile (warmed by start()) or --cuda-graphs: the decode step; None: eager
        if settings.compile:
            self.decode = CompiledDecode(base, self.kv_pool)
        elif settings.cuda_graphs:
            if base.device.type != "cuda":
                raise InvalidSettings(f"cuda_graphs needs a CUDA device; the model is on {base.device}", field="cuda_graphs")
            self.decode = GraphDecode(base, self.kv_pool)
        self._warmed: Future = Future()

    # -- for other threads ----------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; with --compile, return once it has warmed the compiled step
        (raising what stopped it)."""
        self._thread.start()
        self._warmed.result()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def healthy(self, stall_s: float) -> bool:
        """Alive, and no pass has run longer than `stall_s`."""
        if not self._thread.is_alive():
            return False
        started = self._pass_started
        return started is None or time.monotonic() - started < stall_s

    def enqueue(self, requests: list[GenerationRequest], tenant_queue_quota: int | None = None) -> None:
        """Queue validated requests (the `n` completions of one call), all or none (the
        scheduler may refuse them: QueueFull, QuotaExceeded)."""
        with self.cond:
            if self.draining:
                raise ShuttingDown("the server is shutting down")
            for request in requests:
                request.arrival_step = self._steps
            self.scheduler.push_many(requests, tenant_queue_quota)
            self.cond.notify_all()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine thread between passes."""
        future: Future = Future()
        with self.cond:
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            self._jobs.append((fn, future))
            self.cond.notify_all()
        return future

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def busy(self) -> bool:
        """Rows running, requests waiting or jobs queued (hold `cond`)."""
        return self._running is not None or bool(len(self.scheduler)) or bool(self._jobs)

    def stats(self) -> EngineStats:
        with self.cond:
            running = self._running
            return EngineStats(
                waiting=len(self.scheduler),
                waiting_by_tenant=self.scheduler.waiting_by_tenant(),
                running=len(running) if running is not None else 0,
                kv_length=running.kv_length if running is not None else 0,
                steps=self._steps,
                prefills=self._prefills,
                adapter_bytes_read=self._adapter_bytes_read,
                decode_seconds=self._decode_seconds,
            )

    def adapters_in_use(self) -> tuple[Counter[str], Counter[str]]:
        """Per adapter (`tenant/adapter_id`): its running rows and its waiting requests, in
        first-seen order."""
        with self.cond:
            running = [r.request for r in self._running.rows] if self._running is not None else []
            waiting = self.scheduler.waiting_requests()

        def counts(requests) -> Counter[str]:
            return Counter(f"{r.tenant}/{r.adapter_id}" for r in requests if r.adapter_id)
        return counts(running), counts(waiting)

    def refuse_new(self) -> None:
        with self.cond:
            self.draining = True
            self.cond.notify_all()

    def end_everything(self, error: LoramuxError) -> None:
        """End what is queued or running with `error` at the next pass (shutdown past its grace)."""
        with self.cond:
            self.cut = error
            self.cond.notify_all()

    def stop(self) -> tuple[list[GenerationRequest], list[Future]]:
        """Let the running rows finish, then end the loop; returns the waiting requests and the
        queued jobs' futures, taken out, for the caller to answer."""
        with self.cond:
            self.stopping = self.draining = True
            waiting = self.scheduler.drain()
            jobs = [future for _, future in self._jobs]
            self._jobs.clear()
            self.cond.notify_all()
        return waiting, jobs

    # -- the loop (engine thread) -----------------------------------------------------------

    def _run(self) -> None:
        try:
            if self.base.device.type == "cuda":  # kernels (Triton's too) and graphs go to the model's device
                torch.cuda.set_device(self.base.device)
            if self.decode is not None:  # compiled here: torch's compiler settings are per thread
                self.decode.warm()
        except BaseException as e:
            self._warmed.set_exception(e)
            return
        self._warmed.set_result(None)
        while True:
            try:
                admitted = self._next_work()
            except Exception as e:  # a bug in admission: report it, keep serving
                InternalError.logged(e, "admission failed")
                time.sleep(IDLE_POLL_S)
                continue
            if admitted is None:
                return
            self._pass_started = time.monotonic()
            try:
                self._pass(admitted)
            except Exception as e:  # last resort: nothing below should raise
                self._fail_running(as_domain_error(e, "engine pass failed"))
            finally:
                with self.cond:
                    self._pass_started = None
                    self.cond.notify_all()

    def _pass(self, admitted: list[GenerationRequest]) -> None:
        if self.cut is not None:
            self._end_all(admitted, self.cut)
            return
        if admitted:
            try:
                self._hand_on()  # (a join changes the batch: the step in flight goes out first)
            except Exception as e:  # its rows are the running batch's: they fail, the admitted join on
                self._fail_running(as_domain_error(e, "handing on a decode step failed"))
            self._join(admitted)
        elif self._running is not None:
            try:
                # Counted before the step emits its tokens: whoever has seen a step's tokens
                # sees it in the counters too.
                with self.cond:
                    self._steps += 1
                    self._adapter_bytes_read += self._running.adapter_bytes
                    self.scheduler.charge_step()  # each row's token, to its tenant's service
                started = time.perf_counter()
                if self.overlap and self._running.can_launch():
                    queued = self._running.launch(lag=1 if self._pending is not None else 0)
                    self.launched += 1
                    self._hand_on()  # the previous step's tokens, while this one runs
                    self._pending = queued
                else:
                    self._hand_on()
                    self._running.step()
                self._decode_seconds += time.perf_counter() - started
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
                self._pending = None  # (every row it holds has left: none of its tokens is used)
                with self.cond:
                    self._running = None
            if gone or admitted:
                self._rows_changed()

    def _rows_changed(self) -> None:
        """Tell the scheduler each tenant's running rows (whose service each step counts)."""
        rows = Counter(row.request.tenant for row in self._running.rows) if self._running is not None else Counter()
        with self.cond:
            self.scheduler.set_running(rows)

    def _hand_on(self) -> None:
        """Hand on the tokens of the step in flight, if any (its rows that ended since it was
        queued are skipped)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            emit_step(pending)

    def _end_all(self, admitted: list[GenerationRequest], error: LoramuxError) -> None:
        """Answer every admitted, waiting and running request with `error` (at shutdown)."""
        self._abandon(admitted, [], error)
        with self.cond:
            waiting = self.scheduler.drain()
        for request in waiting:
            request.emit(ErrorEvent(error))
        self._fail_running(error)

    def _join(self, admitted: list[GenerationRequest]) -> None:
        """Prefill newly admitted requests and add them to the running batch. If anything fails
        on the way, the admitted requests (and only they) get the error and their slots back."""
        rows: list[Row] = []
        refused: set[int] = set()
        try:
            now = time.monotonic()
            for request in admitted:
                try:
                    rows.append(new_row(self.base, request, now))
                except Exception as e:  # this request's own values (nothing else's) are at fault
                    refused.add(id(request))
                    self._abandon([request], [], as_domain_error(e, "starting the request failed"))
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
            fresh = None
            for part, scored in _prefills(live):  # a request with prompt logprobs is prefilled on its own
                for prefilled in self._prefilled(part, scored):
                    try:
                        if fresh is None:
                            fresh = prefilled
                        else:
                            fresh.concatenate(prefilled)
                    except Exception as e:  # (its rows alone: the batch joined so far is intact)
                        for row in Batch.abandon(prefilled.rows, as_domain_error(e, "joining a prefill failed")):
                            self._row_done(row)
            if fresh is None:
                return
            # The first tokens were emitted inside prefill; the end stamp only orders the spans.
            ended_ns = time.time_ns()
            for row in live:
                row.request.timeline.prefill_end_ns = ended_ns
            self._prefills += 1
            with self.cond:
                if self._running is None and self.kv_pool is not None:
                    self._running = Batch.empty(self.base, RowKv(self.kv_pool), self.decode)
                if self._running is None:
                    fresh.decode = self.decode
                    self._running = fresh
                else:
                    self._running.concatenate(fresh)  # all or nothing: the running batch is intact on failure
        except Exception as e:
            self._abandon([r for r in admitted if id(r) not in refused], rows,
                          as_domain_error(e, f"joining {len(admitted)} request(s) failed"))

    def _prefilled(self, part: list[Row], scored: bool) -> Iterator[Batch]:
        """The part's prefill; if it fails, each request's alone (unless the part is one
        request, or a row already has its first token), so that only the requests at fault
        fail: one whose values break the batch's tensors, or a batch too large for memory."""
        try:
            yield Batch.prefill(self.base, part, prompt_logprobs=scored)
            return
        except Exception as e:
            error = as_domain_error(e, f"prefilling {len(part)} request(s) failed")
        pieces = _by_request(part)
        if len(pieces) == 1 or any(row.generated for row in part):
            for row in Batch.abandon(part, error):
                self._row_done(row)
            return
        for piece in pieces:
            try:
                yield Batch.prefill(self.base, piece, prompt_logprobs=scored)
            except Exception as e:  # (this request's own failure)
                for row in Batch.abandon(piece, as_domain_error(e, "prefilling the request failed")):
                    self._row_done(row)

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
        try:
            self._hand_on()  # a step queued before the failure chose valid tokens: they go out first
        except Exception:  # noqa: BLE001 - its rows are failed below either way
            log.exception("handing on the last queued step failed")
        if self._running is not None:
            for row in self._running.fail(error):
                self._row_done(row)
            with self.cond:
                self._running = None
            self._rows_changed()

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
        hint = self.scheduler.retry_hint_s
        self.scheduler.retry_hint_s = 0.9 * hint + 0.1 * held

    def _worth_joining(self, running: int) -> bool:
        """Whether waiting requests should be prefilled now, stalling the running rows for one
        pass: once they are a `join_ratio` share of the running rows, or the oldest has waited
        `join_max_steps` steps (0, the default: at once; holding them back to prefill several
        together measured no faster, and slower to first token: benchmarks.md)."""
        if len(self.scheduler) >= self.settings.join_ratio * running:
            return True
        return self._steps - self.scheduler.oldest().arrival_step >= self.settings.join_max_steps

    def _next_work(self) -> list[GenerationRequest] | None:
        """Run pending jobs, then return the requests to admit now ([] = just step), or None to stop."""
        window = self.settings.batch_window_ms / 1000
        scheduler = self.scheduler
        while True:
            with self.cond:
                scheduler.answer_shed()  # whether or not anything is admitted at this pass
                job = self._jobs.popleft() if self._jobs else None
                if job is None:
                    running = len(self._running) if self._running is not None else 0
                    if self.stopping:
                        return [] if running else None
                    if self.cut is not None and (running or len(scheduler)):
                        return []  # the pass ends them
                    if not len(scheduler):
                        if running:
                            return []
                        self.cond.wait()
                        continue
                    if running and (self.settings.scheduling == "static" or not self._worth_joining(running)):
                        return []
                    now = time.monotonic()
                    if not running:  # a quiet gap of `window`, at most QUIET_WAIT_CAP windows in all
                        wait_left = min(scheduler.newest_arrival() + window,
                                        scheduler.oldest_arrival() + QUIET_WAIT_CAP * window) - now
                        if len(scheduler) < self.settings.max_batch_size and wait_left > 0:
                            self.cond.wait(wait_left)
                            continue
                    budget = KvBudget(self.settings.max_batch_tokens)
                    if self.kv_pool is not None:  # every row has its positions already: rows are the limit
                        budget = KvBudget(UNBOUNDED)
                    elif running:
                        budget = KvBudget(budget.limit, running, self._running.kv_length + 1, self._running.most_remaining())
                    held = Counter(row.request.tenant for row in self._running.rows) if running else Counter()
                    admitted = scheduler.admit(self.settings.max_batch_size - running, budget, now, held)
                    if admitted or running:
                        return admitted
                    self.cond.wait(IDLE_POLL_S)
                    continue
            fn, future = job
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)


def _prefills(rows: list[Row]) -> list[tuple[list[Row], bool]]:
    """The admitted rows' prefills: those without prompt logprobs together, and each request
    with them (its n rows) apart, since its prefill keeps every position's scores."""
    plain = [row for row in rows if row.request.params.prompt_logprobs is None]
    parts: list[tuple[list[Row], bool]] = [(plain, False)] if plain else []
    scored = [row for row in rows if row.request.params.prompt_logprobs is not None]
    return parts + [(group, True) for group in _by_request(scored)]


def _by_request(rows: list[Row]) -> list[list[Row]]:
    """The rows of each request (its n completions together), in order."""
    groups: dict[int, list[Row]] = {}
    for row in rows:
        key = id(row.request.group) if row.request.group is not None else id(row)
        groups.setdefault(key, []).append(row)
    return list(groups.values())
