"""Waiting requests, and which of them join the running batch at the next step.

Admission is fair across tenants and aware of adapters:

- Tenants take turns, the one served least first. Each tenant's service is counted in tokens
  while it is active (has requests waiting or rows running): PROMPT_WEIGHT per prompt token
  when a request is admitted, OUTPUT_WEIGHT per output token (each decode step, per row it
  holds). A tenant that becomes active starts at the least service of the tenants already
  active (none: 0), or where it was if higher: time spent idle is no credit, and a lead is
  kept through idle moments (a client calling one request at a time is idle between its
  calls). A tenant's counter is forgotten once it is inactive and not ahead of the least
  active service (it would start there anyway), or when no tenant is active. (The virtual
  token counter of Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024.) So
  a tenant sending long requests gets turns as a tenant sending short ones gets them, in
  proportion to the tokens each takes. Among equals, a tenant that was just served goes to
  the back of the turn order (round robin). In its turn a tenant offers its best waiting
  request; the `n` completions of one request are taken together (as many as fit), so they
  share one prefill, and a group's prompt is charged once per pass that prefills it.
- A tenant's best request is its oldest *urgent* one (waiting longer than
  `adapter_wait_ms`), else its oldest whose adapter is already in a slot (or chosen in this
  pass, so same-adapter requests batch together, or no adapter at all), else its oldest
  whose adapter is in host memory, else its oldest whose adapter is on disk.
- A request whose adapter is on disk starts a read on an I/O thread and waits for it.
- A request whose adapter cannot get a slot (every slot held by running rows or pinned)
  waits. If that request is urgent, no request that needs an adapter is admitted until it
  gets in (requests for the base model, or for an adapter pinned in its slot, still are):
  running rows finish, their slots free up,
  and nothing new takes them first. So once its tenant's turn comes, no request waits much
  longer than `adapter_wait_ms` plus the longest running request, however cold its adapter.
  Urgency orders a tenant's own requests, never the tenants: a backlog grown old does not
  turn the turns into first come, first served.
- Limits per step: rows (`max_batch_size`), the padded KV cache the batch can reach
  (`KvBudget`: rows x (width + most tokens still to come), `max_batch_tokens`) and prompt
  tokens prefilled together
  (`max_prefill_tokens`; a longer prompt is prefilled alone). An urgent request that does
  not fit also stops admission until it does.

Everything here runs under the engine's lock, on the engine thread (admit) or a caller's
thread (push, remove).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from loramux.server.adapters.cache import AdapterGone, NoSlotAvailable, Tier, TieredAdapterCache
from loramux.server.engine.request import ErrorEvent, GenerationRequest
from loramux.server.errors import AdapterNotFound, Cancelled, DeadlineExceeded, InternalError, LoramuxError, QueueFull
from loramux.server.tenancy.quotas import refuse
from loramux.server.settings import Settings

_TIER_RANK = {Tier.ACCELERATOR: 0, Tier.HOST: 1, Tier.DISK: 2}
RESERVE_RECENT_S = 10.0  # a tenant that sent a request this recently, and holds no row, has a row kept free for it
KEPT_ROWS = 1  # rows kept free for such tenants at most (and at most a quarter of the batch)
REMEMBERED = 1024  # inactive tenants whose lead over the active ones is kept at most (the largest leads)
PROMPT_WEIGHT = 1.0  # a tenant's service per prompt token prefilled for it
OUTPUT_WEIGHT = 2.0  # ... per output token (a decode step of a row it holds); the weights of Sheng et al.


class KvBudget:
    """The padded KV cache a batch can reach, in token slots: every row is as wide as the widest.

    After a join the batch's width is the longer of the running cache and the longest new
    prompt, and it grows by one column per step until the row with the most tokens still to
    come is done. So the bound is rows x (that width + the most tokens any row may still
    generate), and admission keeps it within `max_batch_tokens`."""

    def __init__(self, limit: int, rows: int = 0, kv_width: int = 0, most_remaining: int = 0):
        self.limit = limit
        self.rows = rows  # running rows plus those chosen so far
        self.width = kv_width  # the cache's width after the join
        self.most_remaining = most_remaining  # the most tokens one row may still generate

    def fits(self, request: GenerationRequest) -> bool:
        """Whether the batch with `request` added stays within the limit."""
        width = max(self.width, request.prompt_tokens)
        remaining = max(self.most_remaining, request.params.max_new_tokens)
        return (self.rows + 1) * (width + remaining) <= self.limit

    def add(self, request: GenerationRequest) -> None:
        self.rows += 1
        self.width = max(self.width, request.prompt_tokens)
        self.most_remaining = max(self.most_remaining, request.params.max_new_tokens)


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        cache: TieredAdapterCache,
        current_uid: Callable[[str, str, int], int | None],
        io: ThreadPoolExecutor,
        wake: Callable[[], None],
    ):
        self._settings = settings
        self._cache = cache
        self._current_uid = current_uid
        self._io = io
        self._wake = wake
        self._waiting: dict[str, deque[GenerationRequest]] = {}  # tenant -> FIFO
        self._turns: deque[str] = deque()  # tenants with waiting requests, next to be served first
        self._count = 0
        self._loads: dict[int, Future] = {}  # disk reads in flight for waiting requests, by adapter uid
        self._shed: list[GenerationRequest] = []  # taken out of a full queue for a lighter tenant, to be answered
        self._recent: dict[str, float] = {}  # tenant -> when its latest request arrived (monotonic), for RESERVE_RECENT_S
        self._service: dict[str, float] = {}  # active tenant -> its service so far (weighted tokens): who goes first
        self._rows: Counter = Counter()  # tenant -> its running rows (the engine tells at each change: set_running)
        self.retry_hint_s = 1.0  # kept current by the engine from recent request durations

    def __len__(self) -> int:
        return self._count

    def oldest_arrival(self) -> float | None:
        oldest = self.oldest()
        return oldest.arrival if oldest is not None else None

    def newest_arrival(self) -> float | None:
        return max((q[-1].arrival for q in self._waiting.values() if q), default=None)

    def oldest(self) -> GenerationRequest | None:
        return min((q[0] for q in self._waiting.values() if q), key=lambda r: r.arrival, default=None)

    def waiting_requests(self) -> list[GenerationRequest]:
        return [r for q in self._waiting.values() for r in q]

    def waiting_by_tenant(self) -> dict[str, int]:
        return {tenant: len(q) for tenant, q in self._waiting.items()}

    def push(self, request: GenerationRequest, tenant_queue_quota: int | None = None) -> None:
        """Queue a request, or refuse it: the tenant has as many waiting as it may (its `queued`
        quota, or `max_queue_per_tenant` when set), or the queue is full and the tenant already
        holds as many places as any other.

        A full queue is shared out by refusing the heaviest tenant first: a request from a
        tenant holding fewer places than the tenant holding the most takes the newest of that
        tenant's places, whose request is refused with QUEUE_FULL (at the engine's next pass;
        it has waited least). So one tenant alone may use the whole queue, and under contention
        every tenant's share tends to max_queue / (tenants waiting)."""
        s = self._settings
        queue = self._waiting.get(request.tenant)
        waiting = len(queue) if queue is not None else 0
        if tenant_queue_quota is not None and waiting >= tenant_queue_quota:
            raise refuse(request.tenant, "queued", tenant_queue_quota, waiting, f"{waiting} requests waiting",
                         retry_after_s=self.retry_hint_s)
        if s.max_queue_per_tenant is not None and waiting >= s.max_queue_per_tenant:
            raise self._full(
                f"tenant {request.tenant!r} has {waiting} requests waiting, the most one tenant may queue; retry later"
            )
        if self._count >= s.max_queue:
            heaviest = max(self._waiting, key=lambda tenant: len(self._waiting[tenant]))
            if len(self._waiting[heaviest]) <= waiting + 1:
                raise self._full(f"{self._count} requests are waiting, the most this server queues, and this tenant holds "
                                 f"{waiting} of them, as many as any other; retry later")
            shed = self._waiting[heaviest][-1]
            self._remove(shed)
            self._shed.append(shed)
            self._wake()
        queue = self._waiting.get(request.tenant)
        self._recent[request.tenant] = request.arrival
        if queue is None:
            if not self._rows[request.tenant]:
                self._activate(request.tenant)
            queue = self._waiting[request.tenant] = deque()
            self._turns.append(request.tenant)
        queue.append(request)
        self._count += 1

    def push_many(self, requests: list[GenerationRequest], tenant_queue_quota: int | None = None) -> None:
        """Queue the `n` completions of one request, or none of them: room is checked for all
        before any is queued and before any other tenant's place is given up for them."""
        if len(requests) > 1:
            self._check_room(requests[0].tenant, len(requests), tenant_queue_quota)
        pushed = []
        try:
            for request in requests:
                self.push(request, tenant_queue_quota)
                pushed.append(request)
        except BaseException:  # (not expected after the check: none stays queued either way)
            for request in pushed:
                self._remove(request)
            raise

    def _check_room(self, tenant: str, count: int, tenant_queue_quota: int | None) -> None:
        """Whether `count` requests of `tenant` can be queued (push's rules, run ahead on the
        counts alone: nothing changes); QueueFull or QuotaExceeded if not."""
        s = self._settings
        counts = {t: len(q) for t, q in self._waiting.items()}
        total = self._count
        for _ in range(count):
            waiting = counts.get(tenant, 0)
            if tenant_queue_quota is not None and waiting >= tenant_queue_quota:
                raise refuse(tenant, "queued", tenant_queue_quota, waiting, f"{waiting} requests waiting, and "
                             f"{count} completions asked for", retry_after_s=self.retry_hint_s)
            if s.max_queue_per_tenant is not None and waiting >= s.max_queue_per_tenant:
                raise self._full(f"tenant {tenant!r} would have more requests waiting than one tenant may queue "
                                 f"({count} completions asked for); retry later")
            if total >= s.max_queue:
                heaviest = max(counts, key=lambda t: counts[t])
                if counts[heaviest] <= waiting + 1:
                    raise self._full(f"{total} requests are waiting, the most this server queues, and the "
                                     f"{count} completions asked for do not fit; retry later")
                counts[heaviest] -= 1
                total -= 1
            counts[tenant] = waiting + 1
            total += 1

    def _floor(self, tenant: str) -> float:
        """The least service of the other tenants active now (waiting or running), or 0."""
        return min((served for other, served in self._service.items()
                    if other != tenant and (other in self._waiting or self._rows[other])), default=0.0)

    def _activate(self, tenant: str) -> None:
        """A tenant with nothing waiting or running sends a request: it starts at the least
        service of the tenants active now (idle time is no credit), or where it was if higher."""
        floor = self._floor(tenant)
        self._service[tenant] = max(self._service.get(tenant, floor), floor)

    def _charge(self, tenant: str, amount: float) -> None:
        if tenant not in self._service:  # (not forgotten while active; never below the floor)
            self._service[tenant] = self._floor(tenant)
        self._service[tenant] += amount

    def _forget_inactive(self) -> None:
        """Forget the counters of tenants neither waiting nor running (at each admission pass,
        when no admitted request is between its admission and its rows) that would start at
        the floor anyway: not ahead of the least active service, or every one when none is
        active. Of those ahead, the REMEMBERED largest leads are kept."""
        active = [served for t, served in self._service.items() if t in self._waiting or self._rows[t]]
        floor = min(active) if active else None
        inactive = [t for t in self._service if t not in self._waiting and not self._rows[t]]
        kept = [t for t in inactive if floor is not None and self._service[t] > floor]
        if len(kept) > REMEMBERED:  # (sorted only then: this runs at every admission pass)
            kept = sorted(kept, key=lambda t: self._service[t], reverse=True)[:REMEMBERED]
        for tenant in set(inactive) - set(kept):
            del self._service[tenant]

    def set_running(self, rows: Counter) -> None:
        """The running rows per tenant, after the batch changed."""
        self._rows = +rows

    def charge_step(self) -> None:
        """A decode step: each running row is an output token of its tenant's."""
        for tenant, rows in self._rows.items():
            self._charge(tenant, OUTPUT_WEIGHT * rows)

    def service(self) -> dict[str, float]:
        """Each active tenant's service so far (weighted tokens; who goes first: the least)."""
        return dict(self._service)

    def drain(self) -> list[GenerationRequest]:
        """Take every waiting request out (at shutdown)."""
        out = [r for q in self._waiting.values() for r in q] + self._shed
        self._shed = []
        self._waiting.clear()
        self._turns.clear()
        self._count = 0
        self._forget_inactive()
        return out

    def admit(self, rows_free: int, budget: KvBudget, now: float,
              held: Mapping[str, int] | None = None) -> list[GenerationRequest]:
        """Choose requests to prefill now and put their adapters in slots (acquired for them).
        `held`: the running rows of each tenant.

        Requests that were cancelled, expired, lost their adapter or failed to read it are
        answered with an error and dropped here."""
        held = Counter(held or {})
        for tenant in [t for t, at in self._recent.items() if now - at > RESERVE_RECENT_S]:
            del self._recent[tenant]
        self._drop_dead(now)
        self._forget_inactive()
        for uid in [u for u, f in self._loads.items() if f.done()]:
            del self._loads[uid]
        if rows_free <= 0 or not self._count:
            return []
        if all(held[t] and rows_free <= self._reserved_for_others(t, held) for t in self._turns):
            return []  # the free rows are kept for tenants holding none (every decode step asks again)
        wait_bound = self._settings.adapter_wait_ms / 1000
        prefill_free = self._settings.max_prefill_tokens
        options = {t: list(self._waiting[t]) for t in self._turns}
        chosen: list[GenerationRequest] = []
        uids: set[int] = set()
        blocked = False
        service = dict(self._service)  # with this pass's choices counted as they are made

        slots_blocked = False  # an urgent request waits for a slot: only base-model requests go in meanwhile
        prompts_counted: set[int] = set()  # groups of n whose prompt this pass prefills already

        def turn(tenant: str) -> float:
            """The least served first; among equals, the turn order (sorted keeps it)."""
            return service.get(tenant, 0.0)

        def take(request: GenerationRequest, tenant: str) -> None:
            nonlocal rows_free, prefill_free
            chosen.append(request)
            held[tenant] += 1
            if request.adapter_uid is not None:
                uids.add(request.adapter_uid)
            rows_free -= 1
            budget.add(request)
            cost = OUTPUT_WEIGHT
            if _new_prompt(request, prompts_counted):
                prefill_free -= request.prompt_tokens
                cost += PROMPT_WEIGHT * request.prompt_tokens
            service[tenant] = service.get(tenant, 0.0) + cost

        while rows_free > 0 and not blocked:
            progressed = False
            for tenant in sorted(self._turns, key=turn):
                left = options[tenant]
                if left and held[tenant] and rows_free <= self._reserved_for_others(tenant, held):
                    continue  # the last free rows wait for tenants that hold none (who may take them)
                while left:
                    offered = [r for r in left if self._holds_no_slot(r)] if slots_blocked else left
                    if not offered:
                        break
                    best = min(offered, key=lambda r: self._preference(r, uids, now, wait_bound))
                    left.remove(best)
                    urgent = now - best.arrival > wait_bound
                    fits = budget.fits(best) and (best.prompt_tokens <= prefill_free or not chosen)
                    uid = best.adapter_uid
                    ready = True
                    if uid is not None and uid not in uids:
                        if self._cache.tier(uid) is Tier.DISK:
                            self._start_read(uid)
                            ready = False
                        elif not self._cache.slots_available_for(uids | {uid}):
                            ready = False
                            slots_blocked = slots_blocked or urgent
                    if ready and not fits:
                        blocked = urgent
                    if blocked:
                        break
                    if not ready or not fits:
                        continue
                    take(best, tenant)
                    if best.group is not None:  # its group's other completions with it, as many as fit
                        for member in [r for r in left if r.group is best.group]:
                            if rows_free <= self._reserved_for_others(tenant, held) or not budget.fits(member):
                                break
                            left.remove(member)
                            take(member, tenant)
                    progressed = True
                    break
                if blocked or rows_free <= 0 or progressed:
                    break  # (after a choice, the turns again, its cost counted)
            if not progressed:
                break
        return self._give_slots(chosen)

    def _holds_no_slot(self, request: GenerationRequest) -> bool:
        """Whether admitting `request` keeps no slot from others: the base model, or an adapter
        pinned in its slot for good."""
        return request.adapter_uid is None or self._cache.pinned_in_slot(request.adapter_uid)

    def _reserved_for_others(self, tenant: str, held: Counter) -> int:
        """Rows `tenant` must leave free: one for each other tenant that sent a request within
        RESERVE_RECENT_S and holds no row now (at most a quarter of the batch). A tenant alone
        uses the whole batch; one flooding it leaves a row for the next caller of another
        tenant, who then starts at the next pass instead of after a whole cohort of the
        flood's requests has ended."""
        others = sum(1 for other in self._recent if other != tenant and not held[other])
        return min(others, KEPT_ROWS, self._settings.max_batch_size // 4)

    def _preference(self, r: GenerationRequest, uids: set[int], now: float, wait_bound: float):
        if now - r.arrival > wait_bound:
            return (0, 0, r.arrival)
        if r.adapter_uid is None or r.adapter_uid in uids:
            return (1, 0, r.arrival)
        return (1, _TIER_RANK[self._cache.tier(r.adapter_uid)], r.arrival)

    def _give_slots(self, chosen: list[GenerationRequest]) -> list[GenerationRequest]:
        # Adapters already in slots first: promoting another must not evict one of them.
        chosen.sort(key=lambda r: r.adapter_uid is not None and self._cache.tier(r.adapter_uid) is not Tier.ACCELERATOR)
        admitted = []
        prompts_counted: set[int] = set()
        for request in chosen:
            uid = request.adapter_uid
            timeline = request.timeline
            if uid is not None:
                started = time.perf_counter()
                try:
                    self._cache.acquire(uid)
                except (KeyError, NoSlotAvailable, AdapterGone):
                    # Pushed out of memory meanwhile (it waits, read again), or unloaded or
                    # replaced meanwhile (the next pass re-points or drops it).
                    continue
                except Exception as e:  # a bug: this request alone fails
                    self._remove(request)
                    request.emit(ErrorEvent(InternalError.logged(e, "giving a request its adapter slot failed")))
                    continue
                if timeline.tier_found is not Tier.ACCELERATOR:
                    timeline.load_s = time.perf_counter() - started
                    if timeline.tier_found is Tier.DISK:
                        timeline.load_s += self._cache.last_read_s.get(uid, 0.0)
            timeline.admitted_ns = time.time_ns()
            self._remove(request)
            self._charge(request.tenant, _admission_cost(request, prompts_counted))
            admitted.append(request)
        for tenant in dict.fromkeys(r.tenant for r in admitted):  # served tenants go to the back, in the order served
            if tenant in self._turns:
                self._turns.remove(tenant)
                self._turns.append(tenant)
        return admitted

    def _remove(self, request: GenerationRequest) -> None:
        queue = self._waiting[request.tenant]
        queue.remove(request)
        self._count -= 1
        if not queue:
            del self._waiting[request.tenant]
            self._turns.remove(request.tenant)

    def answer_shed(self) -> None:
        """Answer the requests whose places went to lighter tenants (push) with QUEUE_FULL (the
        engine thread, at every pass)."""
        shed, self._shed = self._shed, []
        for request in shed:
            request.emit(ErrorEvent(self._full(
                f"tenant {request.tenant!r} held the most places of a full queue and another tenant needed one; retry "
                "later")))

    def _drop_dead(self, now: float) -> None:
        self.answer_shed()
        for queue in list(self._waiting.values()):
            for request in list(queue):
                error = self._why_drop(request, now)
                if error is not None:
                    self._remove(request)
                    request.emit(ErrorEvent(error))

    def _why_drop(self, request: GenerationRequest, now: float) -> LoramuxError | None:
        if request.cancelled:
            return Cancelled("the request was cancelled while queued")
        if request.deadline is not None and now > request.deadline:
            waited = round(now - request.arrival, 3)
            return DeadlineExceeded(f"the deadline passed after {waited:.3f}s in the queue", waited_s=waited)
        uid = request.adapter_uid
        if uid is not None:
            # A replaced adapter: a queued request runs on the version its name holds now.
            current = self._current_uid(request.tenant, request.adapter_id, uid)
            if current is None:
                return AdapterNotFound(f"adapter {request.adapter_id!r} was unloaded while the request waited", field="adapter_id")
            if current != uid:
                request.adapter_uid = uid = current
                request.timeline.tier_found = self._cache.tier(uid)
        load = self._loads.get(uid) if uid is not None else None
        if load is not None and load.done() and load.exception() is not None:
            error = load.exception()
            return error if isinstance(error, LoramuxError) else LoramuxError(f"reading the adapter failed: {error}")
        return None

    def _start_read(self, uid: int) -> None:
        if uid in self._loads:
            return
        future = self._io.submit(self._cache.ensure_in_memory, uid)
        self._loads[uid] = future
        future.add_done_callback(lambda _: self._wake())

    def _full(self, message: str) -> QueueFull:
        return QueueFull(message, retry_after_s=self.retry_hint_s, queued=self._count)


def _admission_cost(request: GenerationRequest, prompts_counted: set[int]) -> float:
    """The service a request's admission gives its tenant: its prompt (once per pass for a
    group of n completions: their prefill in one pass runs it once) and the first token its
    prefill makes."""
    return (PROMPT_WEIGHT * request.prompt_tokens if _new_prompt(request, prompts_counted) else 0.0) + OUTPUT_WEIGHT


def _new_prompt(request: GenerationRequest, prompts_counted: set[int]) -> bool:
    """Whether the request's prompt is prefilled for it in this pass (its group's first here),
    noting it in `prompts_counted`."""
    if request.group is None:
        return True
    if id(request.group) in prompts_counted:
        return False
    prompts_counted.add(id(request.group))
    return True

