"""Continuous batching and admission: requests join and leave the running batch mid-decode
with outputs still equal to peft; tenants take turns; resident adapters go first, within a
bound; limits on rows, tokens and the queue."""

import queue
import threading
import time

import grpc
import pytest

import loramux.client as lc
from conftest import ADAPTERS, PROMPTS, eventually
from loramux.server.adapters.cache import Tier
from loramux.server.app import BackgroundServer
from loramux.server.model.base_model import load_base_model
from loramux.server.engine.engine import Engine
from loramux.server.engine.inputs import GenerateInput
from loramux.server.engine.request import FinishEvent, TokenEvent
from loramux.server.errors import Cancelled, InvalidRequest, QueueFull

N = 24


class Recorder:
    """Collects every request's events in the one order the engine thread emitted them."""

    def __init__(self):
        self.log: list[tuple[str, object]] = []
        self._lock = threading.Lock()
        self._ended: dict[str, threading.Event] = {}
        self._tokens: dict[str, queue.Queue] = {}

    def emit_for(self, name: str):
        self._ended[name] = threading.Event()
        self._tokens[name] = queue.Queue()

        def emit(event):
            with self._lock:
                self.log.append((name, event))
            if isinstance(event, TokenEvent):
                self._tokens[name].put(event)
            else:
                self._ended[name].set()

        return emit

    def wait_tokens(self, name: str, n: int) -> None:
        for _ in range(n):
            self._tokens[name].get(timeout=60)

    def wait_all(self) -> None:
        for name, ended in self._ended.items():
            assert ended.wait(60), name

    def token_ids(self, name: str) -> list[int]:
        return [t for n, e in self.log if n == name and isinstance(e, TokenEvent) for t in e.token_ids]

    def index(self, name: str, kind: type) -> int:
        """Position in the log of `name`'s first event of `kind`."""
        return next(i for i, (n, e) in enumerate(self.log) if n == name and isinstance(e, kind))

    def outcome(self, name: str):
        return next(e for n, e in self.log if n == name and not isinstance(e, TokenEvent))

    def first_token_order(self) -> list[str]:
        seen = []
        for name, event in self.log:
            if isinstance(event, TokenEvent) and name not in seen:
                seen.append(name)
        return seen


def make_engine(assets, **overrides):
    settings = assets.settings(**{"batch_window_ms": 0, **overrides})
    engine = Engine(settings, load_base_model(settings)).start()
    for name in ADAPTERS:
        engine.load_adapter("default", name, name)
    return engine


def hold(engine) -> threading.Event:
    """Block the engine thread (between steps) until the returned event is set."""
    gate = threading.Event()
    entered = threading.Event()

    def wait():
        entered.set()
        gate.wait(60)

    engine.call_on_engine(wait)
    assert entered.wait(10)
    return gate


def settle(engine) -> None:
    """Wait until the engine thread is between steps (rows that ended have released their adapters)."""
    engine.call_on_engine(lambda: None).result(60)


def pausing(rec, name: str, kind: type):
    """An emit for `name` that records its events and, at its first event of `kind`, holds the
    engine thread (inside the step) until `go_on` is set; returns (emit, reached, go_on)."""
    record, reached, go_on = rec.emit_for(name), threading.Event(), threading.Event()

    def emit(event):
        record(event)
        if isinstance(event, kind) and not reached.is_set():
            reached.set()
            assert go_on.wait(60)

    return emit, reached, go_on


def submit(engine, rec, name, adapter, prompt, n=N, tenant="default"):
    return engine.submit(tenant, GenerateInput(adapter_id=adapter, prompt=prompt, max_new_tokens=n), rec.emit_for(name))


def long_jobs(assets, count):
    """(adapter, prompt) pairs whose peft output runs the full N tokens, for mid-decode joins."""
    jobs = [(a, p) for p in PROMPTS for a in ADAPTERS if len(assets.oracle(a, p, N)) == N]
    assert len(jobs) >= count, "the test assets give too few long outputs"
    return jobs


def test_requests_join_mid_decode_with_more_adapters_than_slots(assets):
    engine = make_engine(assets, adapter_slots=2, max_batch_size=8)
    try:
        jobs = long_jobs(assets, 4)
        distinct = []
        for a, p in jobs:
            if a not in [d[0] for d in distinct]:
                distinct.append((a, p))
        assert len(distinct) >= 3
        first, later = distinct[0], distinct[1:4]
        rec = Recorder()
        submit(engine, rec, "first", *first)
        rec.wait_tokens("first", 3)
        for i, (a, p) in enumerate(later):
            submit(engine, rec, f"later{i}", a, p)
        rec.wait_tokens("later0", 2)
        submit(engine, rec, "base", "", PROMPTS[2])  # joins whatever runs then
        rec.wait_all()
        # The first later request got tokens while `first` was still decoding: it joined mid-decode.
        assert rec.index("later0", TokenEvent) < rec.index("first", FinishEvent)
        for name, (a, p) in [("first", first), *[(f"later{i}", j) for i, j in enumerate(later)], ("base", ("", PROMPTS[2]))]:
            assert isinstance(rec.outcome(name), FinishEvent), name
            assert rec.token_ids(name) == assets.oracle(a or None, p, N), name
        # 3+ adapters through 2 slots: at least one adapter waited for a slot and was promoted.
        settle(engine)
        snap = engine.cache.snapshot()
        assert snap.in_use == {} and sum(s is not None for s in snap.slot_table) == 2
        stats = engine.stats()
        assert stats.running == 0 and stats.waiting == 0 and stats.prefills >= 3
    finally:
        engine.stop()


def test_cancel_mid_decode_drops_the_row_and_its_pin(assets):
    engine = make_engine(assets, adapter_slots=2)
    try:
        (a1, p1), (a2, p2) = long_jobs(assets, 2)[:2]
        rec = Recorder()
        gate = hold(engine)
        doomed = submit(engine, rec, "doomed", a1, p1)
        submit(engine, rec, "kept", a2, p2)
        gate.set()
        rec.wait_tokens("doomed", 3)
        engine.cancel(doomed)
        rec.wait_all()
        assert isinstance(rec.outcome("doomed").error, Cancelled)
        assert 3 <= len(rec.token_ids("doomed")) < N
        assert rec.token_ids("kept") == assets.oracle(a2, p2, N)
        settle(engine)
        assert engine.cache.snapshot().in_use == {}
    finally:
        engine.stop()


@pytest.mark.parametrize("adapter_wait_ms", [2000, 0])
def test_tenants_take_turns(assets, adapter_wait_ms):
    """Also when every request is past the adapter wait bound: urgency orders a tenant's own
    requests, never the tenants (an old backlog once turned the turns into first come, first
    served)."""
    engine = make_engine(assets, max_batch_size=1, adapter_wait_ms=adapter_wait_ms)
    try:
        rec = Recorder()
        gate = hold(engine)
        for i in range(5):
            submit(engine, rec, f"flood{i}", "", PROMPTS[0], n=2, tenant="flood")
        for i in range(2):
            submit(engine, rec, f"small{i}", "", PROMPTS[1], n=2, tenant="small")
        assert engine.stats().waiting_by_tenant == {"flood": 5, "small": 2}
        gate.set()
        rec.wait_all()
        assert rec.first_token_order() == ["flood0", "small0", "flood1", "small1", "flood2", "flood3", "flood4"]
    finally:
        engine.stop()


def test_turns_follow_the_tokens_each_tenant_was_served(assets):
    """A tenant of long requests and one of short ones, every request waiting before the first
    is admitted, one row at a time: the short one's requests go in until its service (prompt
    tokens, output tokens twice) passes the long one's, not one for one."""
    from collections import deque

    from loramux.server.engine.scheduler import OUTPUT_WEIGHT, PROMPT_WEIGHT

    engine = make_engine(assets, max_batch_size=1)
    jobs = {"long": (3, 12), "short": (6, 1)}  # tenant -> (requests, tokens each)
    try:
        rec = Recorder()
        gate = hold(engine)
        for tenant, (count, tokens) in jobs.items():
            for i in range(count):
                engine.submit(tenant, GenerateInput(prompt=PROMPTS[0], max_new_tokens=tokens, ignore_eos=True),
                              rec.emit_for(f"{tenant}{i}"))
        gate.set()
        rec.wait_all()
        order = rec.first_token_order()
    finally:
        engine.stop()
    # What the rule gives: the least served tenant first, the one served last behind among equals.
    prompt = len(engine.base.tokenizer(PROMPTS[0])["input_ids"])
    service, turns, left, expected = {t: 0.0 for t in jobs}, deque(jobs), dict(jobs), []
    while any(count for count, _ in left.values()):
        tenant = sorted((t for t in turns if left[t][0]), key=lambda t: service[t])[0]
        count, tokens = left[tenant]
        expected.append(f"{tenant}{jobs[tenant][0] - count}")
        service[tenant] += PROMPT_WEIGHT * prompt + OUTPUT_WEIGHT * tokens
        left[tenant] = (count - 1, tokens)
        turns.remove(tenant)
        turns.append(tenant)
    assert order == expected
    assert order[:3] == ["long0", "short0", "short1"]  # not round robin's long0, short0, long1


def test_a_tenant_back_from_idle_gets_no_credit_for_it(assets):
    """A tenant that was idle while another was served starts at that tenant's service: the
    two then take turns, instead of the newcomer taking every turn until it caught up (which
    counting its service from 0 would give)."""
    engine = make_engine(assets, max_batch_size=1)
    try:
        rec = Recorder()
        gate = hold(engine)
        # The engine thread stops in busy2's end, before busy3 can be admitted.
        paused, third_ended, go_on = pausing(rec, "busy2", FinishEvent)
        for i in range(6):
            emit = paused if i == 2 else rec.emit_for(f"busy{i}")
            engine.submit("busy", GenerateInput(prompt=PROMPTS[0], max_new_tokens=4, ignore_eos=True), emit)
        gate.set()
        assert third_ended.wait(60)
        for i in range(2):
            engine.submit("back", GenerateInput(prompt=PROMPTS[0], max_new_tokens=4, ignore_eos=True),
                          rec.emit_for(f"back{i}"))
        service = engine.worker.scheduler.service()
        go_on.set()
        rec.wait_all()
        order = rec.first_token_order()
    finally:
        go_on.set()
        engine.stop()
    assert service["back"] == service["busy"] > 0
    # Equals: busy is first in the turn order (back joined behind it), then turns alternate.
    assert order == ["busy0", "busy1", "busy2", "busy3", "back0", "busy4", "back1", "busy5"]


def adapter_order_run(assets, adapter_wait_ms):
    engine = make_engine(assets, adapter_slots=2, max_batch_size=4, adapter_wait_ms=adapter_wait_ms)
    try:
        x, y, z = "qv-r4", "mlp-r2", "all-r16"
        engine.load_adapter("default", x, x, warm=True)
        engine.load_adapter("default", y, y, warm=True)
        uid = {a: engine.registry.get("default", a).uid for a in (x, y, z)}
        assert [engine.cache.tier(uid[a]) for a in (x, y, z)] == [Tier.ACCELERATOR, Tier.ACCELERATOR, Tier.HOST]
        rec = Recorder()
        gate = hold(engine)
        for name, adapter in [("z", z), ("x0", x), ("y", y), ("x1", x)]:
            submit(engine, rec, name, adapter, PROMPTS[0], n=6)
        gate.set()
        rec.wait_all()
        for name, adapter in [("z", z), ("x0", x), ("y", y), ("x1", x)]:
            assert rec.token_ids(name) == assets.oracle(adapter, PROMPTS[0], 6), name
        return rec
    finally:
        engine.stop()


def test_resident_adapters_go_first_and_same_adapter_requests_batch(assets):
    rec = adapter_order_run(assets, adapter_wait_ms=60_000)
    # z (oldest, adapter in host memory) waits: x0, y and x1 use the two resident slots.
    assert rec.first_token_order()[:3] == ["x0", "y", "x1"]
    assert rec.index("z", TokenEvent) > min(rec.index(n, FinishEvent) for n in ("x0", "y", "x1"))


def test_a_request_passed_over_too_long_goes_first(assets):
    rec = adapter_order_run(assets, adapter_wait_ms=0)
    # Everyone is past the bound: oldest first. z and x0 are admitted together (z takes the
    # idle slot of y); y cannot get a slot then and holds up admission, so x1 does not overtake it.
    assert set(rec.first_token_order()[:2]) == {"z", "x0"}
    assert rec.index("z", TokenEvent) < min(rec.index(n, FinishEvent) for n in ("z", "x0", "y", "x1"))
    # y starts no later than x1 (in the same prefill at the latest: before x1's second token).
    x1_tokens = [i for i, (n, e) in enumerate(rec.log) if n == "x1" and isinstance(e, TokenEvent)]
    assert rec.index("y", TokenEvent) < x1_tokens[1]


def test_token_budget_limits_rows_and_oversized_requests_are_refused(assets):
    prompt_len = len(assets.tokenizer(PROMPTS[0])["input_ids"])
    engine = make_engine(assets, max_batch_tokens=2 * (prompt_len + 6) + 1)
    try:
        rec = Recorder()
        gate = hold(engine)
        for i in range(3):
            submit(engine, rec, f"r{i}", "", PROMPTS[0], n=6)
        gate.set()
        rec.wait_all()
        # Two fit the budget; the third starts only after one of them has left.
        assert rec.index("r2", TokenEvent) > min(rec.index("r0", FinishEvent), rec.index("r1", FinishEvent))
        assert rec.index("r1", TokenEvent) < rec.index("r0", FinishEvent)
        with pytest.raises(InvalidRequest) as e:
            engine.submit("default", GenerateInput(prompt=PROMPTS[0], max_new_tokens=prompt_len + 20), lambda e: None)
        assert (e.value.reason, e.value.field) == ("REQUEST_TOO_LARGE", "max_new_tokens")
    finally:
        engine.stop()


def test_the_budget_counts_padding_a_short_request_would_add_to_a_long_batch(assets):
    long_len = len(assets.tokenizer(PROMPTS[3])["input_ids"])
    short_len = len(assets.tokenizer(PROMPTS[2])["input_ids"])
    # Unpadded, both fit: (long + 6) + (short + 6). Padded to the long row's width, two rows do not.
    limit = (long_len + 6) + (short_len + 6)
    assert limit < 2 * (long_len + 6)
    engine = make_engine(assets, max_batch_tokens=limit)
    try:
        rec = Recorder()
        gate = hold(engine)
        submit(engine, rec, "long", "", PROMPTS[3], n=6)
        submit(engine, rec, "short", "", PROMPTS[2], n=6)
        gate.set()
        rec.wait_all()
        assert rec.index("short", TokenEvent) > rec.index("long", FinishEvent)
    finally:
        engine.stop()


def test_static_scheduling_waits_for_the_running_batch(assets):
    engine = make_engine(assets, scheduling="static")
    try:
        (a1, p1), (a2, p2) = long_jobs(assets, 2)[:2]
        rec = Recorder()
        submit(engine, rec, "first", a1, p1)
        rec.wait_tokens("first", 3)
        submit(engine, rec, "second", a2, p2)
        rec.wait_all()
        assert rec.index("second", TokenEvent) > rec.index("first", FinishEvent)
        assert rec.token_ids("second") == assets.oracle(a2, p2, N)
    finally:
        engine.stop()


def test_per_tenant_queue_limit(assets):
    engine = make_engine(assets, max_queue=4, max_queue_per_tenant=2)
    try:
        rec = Recorder()
        gate = hold(engine)
        submit(engine, rec, "a0", "", "x", n=1, tenant="a")
        submit(engine, rec, "a1", "", "x", n=1, tenant="a")
        with pytest.raises(QueueFull) as e:
            engine.submit("a", GenerateInput(prompt="x", max_new_tokens=1), lambda e: None)
        assert "tenant 'a'" in e.value.message and e.value.retry_after_s > 0
        submit(engine, rec, "b0", "", "x", n=1, tenant="b")  # another tenant still gets in
        gate.set()
        rec.wait_all()
    finally:
        engine.stop()


def test_a_full_queue_refuses_the_heaviest_tenant_first(assets):
    """At the default (no per-tenant bound), one tenant may fill the queue alone; a request
    of a lighter tenant then takes the newest place of the heaviest, which is refused with
    QUEUE_FULL; a tenant already holding as many places as any other is refused itself."""
    engine = make_engine(assets, max_queue=4)
    try:
        rec = Recorder()
        gate = hold(engine)
        for i in range(4):
            submit(engine, rec, f"a{i}", "", "x", n=1, tenant="a")
        with pytest.raises(QueueFull):  # a alone: the queue is its own, and full
            engine.submit("a", GenerateInput(prompt="x", max_new_tokens=1), lambda e: None)
        submit(engine, rec, "b0", "", "x", n=1, tenant="b")  # takes a3's place
        submit(engine, rec, "c0", "", "x", n=1, tenant="c")  # takes a2's place
        assert engine.worker.scheduler.waiting_by_tenant() == {"a": 2, "b": 1, "c": 1}
        with pytest.raises(QueueFull) as e:  # b holds 1 where the most is 2: one more would make it 2 and a 1
            engine.submit("b", GenerateInput(prompt="x", max_new_tokens=1), lambda e: None)
        assert "as many as any other" in e.value.message
        gate.set()
        rec.wait_all()
        outcomes = {name: type(rec.outcome(name)).__name__ for name in ("a0", "a1", "a2", "a3", "b0", "c0")}
        assert outcomes == {"a0": "FinishEvent", "a1": "FinishEvent", "a2": "ErrorEvent", "a3": "ErrorEvent",
                            "b0": "FinishEvent", "c0": "FinishEvent"}
        assert rec.outcome("a3").error.reason == rec.outcome("a2").error.reason == "QUEUE_FULL"
    finally:
        engine.stop()


def test_a_flooding_tenant_leaves_a_row_for_a_tenant_that_called_recently(assets):
    """A tenant alone fills the batch; once another tenant has called within RESERVE_RECENT_S and
    holds no row, the flood leaves one row free, and that tenant's next request takes it at
    the next pass instead of waiting for a flood request to end."""
    engine = make_engine(assets, max_batch_size=4)

    def long(name: str, tenant: str) -> None:
        inp = GenerateInput(prompt=PROMPTS[3], max_new_tokens=24, ignore_eos=True)
        engine.submit(tenant, inp, rec.emit_for(name))

    try:
        rec = Recorder()
        gate = hold(engine)
        for i in range(5):
            long(f"alone{i}", "flood")
        gate.set()
        rec.wait_all()
        # No other tenant: four rows at once; the fifth starts once one has ended.
        assert max(rec.index(f"alone{i}", TokenEvent) for i in range(4)) < rec.index("alone0", FinishEvent)
        assert rec.index("alone4", TokenEvent) > rec.index("alone0", FinishEvent)

        submit(engine, rec, "calm0", "", "x", n=1, tenant="calm")  # calm has called: it holds no row now
        rec.wait_all()
        gate = hold(engine)
        for i in range(5):
            long(f"flood{i}", "flood")
        gate.set()
        rec.wait_tokens("flood0", 1)
        gate = hold(engine)  # between two steps of the flood's three rows
        submit(engine, rec, "calm1", "", "x", n=2, tenant="calm")
        gate.set()
        rec.wait_all()
        first_end = min(rec.index(f"flood{i}", FinishEvent) for i in range(5))
        assert max(rec.index(f"flood{i}", TokenEvent) for i in range(3)) < first_end  # three rows at once
        assert rec.index("flood3", TokenEvent) > first_end  # the fourth row was kept
        assert rec.index("calm1", TokenEvent) < first_end  # and calm took it at once
    finally:
        engine.stop()


def test_the_kept_row_goes_to_any_tenant_that_holds_none(assets):
    """With a row kept for a tenant that called recently, another tenant holding no row may take
    it too (the row is kept from the tenants that hold rows, not from the light ones)."""
    from loramux.server.engine.scheduler import KvBudget

    engine = make_engine(assets, max_batch_size=4)
    try:
        rec = Recorder()
        submit(engine, rec, "calm", "", "x", n=1, tenant="calm")  # calm called: it holds no row now
        rec.wait_all()
        gate = hold(engine)
        for i in range(3):
            submit(engine, rec, f"flood{i}", "", "x", n=1, tenant="flood")
        submit(engine, rec, "third", "", "x", n=1, tenant="third")
        scheduler = engine.worker.scheduler
        with engine.worker.cond:  # as the engine thread would, with the flood holding 3 of 4 rows
            admitted = scheduler.admit(1, KvBudget(10**9), time.monotonic(), {"flood": 3})
        assert [r.tenant for r in admitted] == ["third"]
        gate.set()
    finally:
        engine.stop()


def test_full_queue_is_resource_exhausted_with_retry_info(assets):
    with BackgroundServer(assets.settings(max_queue=2, batch_window_ms=0)) as server:
        gate = hold(server.engine)
        with lc.Client(server.target, timeout=60) as client:
            streams = [client.generate_stream(prompt="x", max_new_tokens=1) for _ in range(2)]
            firsts = []
            # Open both streams (each is queued once its first read is under way).
            threads = [threading.Thread(target=lambda s=s: firsts.append(list(s))) for s in streams]
            for t in threads:
                t.start()
            deadline = threading.Event()
            while server.engine.stats().waiting < 2 and not deadline.wait(0.01):
                pass
            with pytest.raises(lc.ResourceExhausted) as e:
                client.generate(prompt="x", max_new_tokens=1)
            assert e.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and e.value.reason == "QUEUE_FULL"
            assert e.value.retry_after is not None and e.value.retry_after > 0
            gate.set()
            for t in threads:
                t.join(60)
            assert [c[-1].finish_reason for c in firsts] == ["length", "length"]


def test_a_lone_arrival_joins_a_busy_batch_after_join_max_steps(assets):
    engine = make_engine(assets, max_batch_size=8, join_ratio=1.0, join_max_steps=3)
    try:
        jobs = long_jobs(assets, 4)[:4]
        rec = Recorder()
        gate = hold(engine)
        for i, (a, p) in enumerate(jobs):
            submit(engine, rec, f"r{i}", a, p)
        gate.set()
        rec.wait_tokens("r0", 2)
        record = rec.emit_for("late")
        steps_at_first_token = []

        def emit(event):
            if isinstance(event, TokenEvent) and not steps_at_first_token:
                steps_at_first_token.append(engine.stats().steps)  # on the engine thread, in the prefill
            record(event)

        late = engine.submit("default", GenerateInput(prompt=PROMPTS[2], max_new_tokens=4), emit)  # 1 waiting < 1.0 x 4 running
        rec.wait_all()
        # Prefilled exactly when the oldest waiter had waited 3 decode steps, not before and
        # not at the end of the running batch.
        assert steps_at_first_token[0] - late.arrival_step == 3
        assert rec.index("late", TokenEvent) < rec.index("r0", FinishEvent)
        assert rec.token_ids("late") == assets.oracle(None, PROMPTS[2], 4)
    finally:
        engine.stop()


def test_idle_window_waits_for_a_quiet_gap_at_most_four_windows(assets):
    """When nothing runs, requests start once none has arrived for `batch_window_ms`: arrivals
    closer together than the window start as one prefill, however long they keep coming, up
    to four windows after the first."""
    import time

    engine = make_engine(assets, batch_window_ms=500)
    try:
        rec = Recorder()
        before = engine.stats().prefills
        for i in range(3):  # 0, 300 and 600 ms: each gap under the window, the spread over it
            if i:
                time.sleep(0.3)
            submit(engine, rec, f"near{i}", None, PROMPTS[i], n=2)
        rec.wait_all()
        assert engine.stats().prefills - before == 1
        assert {rec.index(f"near{i}", TokenEvent) for i in range(3)} == {0, 1, 2}  # the first three events

        before = engine.stats().prefills
        first_token_at = []

        def emit(event):
            if isinstance(event, TokenEvent) and not first_token_at:
                first_token_at.append(time.monotonic())

        started = time.monotonic()
        submitted = []
        for i in range(10):  # one every 300 ms, for 2.7 s: never a quiet gap
            if i:
                time.sleep(0.3)
            submitted.append(time.monotonic() - started)
            engine.submit("default", GenerateInput(prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=2), emit)
        eventually(lambda: engine.stats().prefills - before >= 2 and not engine.stats().running
                   and not engine.stats().waiting, within=60)
        # The cap (4 x 500 ms after the first arrival) started a batch while requests still
        # arrived, and not before: no gap was quiet for a window.
        assert submitted[-1] > 2.4
        assert 2.0 <= first_token_at[0] - started < submitted[-1]
    finally:
        engine.stop()


def test_decode_steps_count_each_distinct_adapters_bytes_once(assets):
    engine = make_engine(assets)
    try:
        (a, p), = [(a, p) for a, p in long_jobs(assets, 1)][:1]
        rec = Recorder()
        gate = hold(engine)
        before = engine.stats()
        for i in range(3):  # two rows on one adapter, one on the base model, prefilled together
            submit(engine, rec, f"r{i}", a if i < 2 else None, p)
        gate.set()
        rec.wait_all()
        settle(engine)
        after = engine.stats()
        uid = engine.registry.get("default", a).uid
        steps = after.steps - before.steps
        assert steps == N - 1  # the prefill chose each row's first token
        assert after.adapter_bytes_read - before.adapter_bytes_read == steps * engine.base.bank.bytes_of(uid) > 0
    finally:
        engine.stop()


def test_an_urgent_request_waiting_for_a_slot_holds_back_only_requests_that_need_one(assets):
    """Both free slots held by running rows (the third is pinned); an urgent request for another
    adapter waits for one. Meanwhile another tenant's base-model request and its request for
    the pinned adapter go in at once (they hold no slot another could take); the urgent one
    goes in when a running row's slot frees, with peft's tokens."""
    engine = make_engine(assets, adapter_slots=3, max_batch_size=6, adapter_wait_ms=0)
    try:
        x, y, z, p = "qv-r4", "mlp-r2", "all-r16", "pattern"
        engine.load_adapter("cold", z, z)
        engine.load_adapter("other", p, p, pin=True)  # in its slot for good: the two others are the free ones
        rec = Recorder()
        gate = hold(engine)
        engine.submit("default", GenerateInput(adapter_id=x, prompt=PROMPTS[0], max_new_tokens=N, ignore_eos=True),
                      rec.emit_for("x"))
        engine.submit("default", GenerateInput(adapter_id=y, prompt=PROMPTS[0], max_new_tokens=N - 8, ignore_eos=True),
                      rec.emit_for("y"))
        gate.set()
        rec.wait_tokens("x", 1)
        gate = hold(engine)
        submit(engine, rec, "z", z, PROMPTS[1], n=4, tenant="cold")
        submit(engine, rec, "base", "", PROMPTS[1], n=4, tenant="other")
        submit(engine, rec, "pinned", p, PROMPTS[1], n=4, tenant="other")
        gate.set()
        rec.wait_all()
        first_end = min(rec.index(n, FinishEvent) for n in ("x", "y"))
        assert rec.index("base", TokenEvent) < first_end  # not held back by the urgent request
        assert rec.index("pinned", TokenEvent) < first_end  # (its slot is no one else's either way)
        assert rec.token_ids("pinned") == assets.oracle(p, PROMPTS[1], 4)
        assert rec.index("z", TokenEvent) > first_end  # which waited for a slot
        assert rec.token_ids("z") == assets.oracle(z, PROMPTS[1], 4)
        assert rec.token_ids("base") == assets.oracle(None, PROMPTS[1], 4)
    finally:
        engine.stop()


def test_a_tenant_keeps_its_lead_through_an_idle_moment(assets):
    """A tenant calling one request at a time is idle between its calls: its service, ahead of
    the others', is kept (forgetting it let such a client take 88% of a batch of one row)."""
    from collections import deque

    from loramux.server.engine.scheduler import OUTPUT_WEIGHT, PROMPT_WEIGHT

    engine = make_engine(assets, max_batch_size=1)
    try:
        rec = Recorder()
        gate = hold(engine)
        engine.submit("heavy", GenerateInput(prompt=PROMPTS[0], max_new_tokens=12, ignore_eos=True),
                      rec.emit_for("heavy0"))
        # The engine thread stops at light0's first token: heavy is idle, and was at that pass.
        paused, light_started, go_on = pausing(rec, "light0", TokenEvent)
        for i in range(6):
            emit = paused if i == 0 else rec.emit_for(f"light{i}")
            engine.submit("light", GenerateInput(prompt=PROMPTS[0], max_new_tokens=1, ignore_eos=True), emit)
        gate.set()
        assert light_started.wait(60)
        engine.submit("heavy", GenerateInput(prompt=PROMPTS[0], max_new_tokens=12, ignore_eos=True),
                      rec.emit_for("heavy1"))
        go_on.set()
        rec.wait_all()
        order = rec.first_token_order()
    finally:
        go_on.set()
        engine.stop()
    prompt = len(engine.base.tokenizer(PROMPTS[0])["input_ids"])
    cost = {"heavy": PROMPT_WEIGHT * prompt + OUTPUT_WEIGHT * 12, "light": PROMPT_WEIGHT * prompt + OUTPUT_WEIGHT}
    # After heavy0 and light0: heavy's service is kept; light's next requests go while it is below.
    service, turns, left, expected = dict(cost), deque(["heavy", "light"]), {"heavy": 1, "light": 5}, []
    while any(left.values()):
        tenant = sorted((t for t in turns if left[t]), key=lambda t: service[t])[0]
        expected.append(f"{tenant}{(2 if tenant == 'heavy' else 6) - left[tenant]}")
        service[tenant] += cost[tenant]
        left[tenant] -= 1
        turns.remove(tenant)
        turns.append(tenant)
    assert order == ["heavy0", "light0", *expected]
    assert order.index("heavy1") > order.index("light2")  # not the next turn, as a forgotten lead gave


def test_a_group_of_n_is_taken_together_and_its_prompt_charged_once_per_prefill(assets):
    """n completions admitted in one pass share one prefill, even when max_prefill_tokens holds
    only one prompt; split over passes (a batch of 2 rows, n = 3), each pass's prefill is
    charged its prompt."""
    from loramux.server.engine.scheduler import OUTPUT_WEIGHT, PROMPT_WEIGHT

    prompt = len(assets.tokenizer(PROMPTS[0])["input_ids"])
    for rows, prefills in ((4, 1), (2, 2)):
        engine = make_engine(assets, max_batch_size=rows, max_prefill_tokens=prompt)
        try:
            charged, ended = [], threading.Event()

            def emit(event, count=[0]):
                if isinstance(event, FinishEvent):
                    count[0] += 1
                    if count[0] == 3:  # on the engine thread, the group still counted as running
                        charged.append(engine.worker.scheduler.service()["g"])
                        ended.set()

            gate = hold(engine)
            before = engine.stats().prefills
            engine.submit_many("g", GenerateInput(prompt=PROMPTS[0], max_new_tokens=4, ignore_eos=True), [emit] * 3)
            gate.set()
            assert ended.wait(60)
            assert engine.stats().prefills - before == prefills, rows
            assert charged == [PROMPT_WEIGHT * prompt * prefills + OUTPUT_WEIGHT * 3 * 4], rows
        finally:
            engine.stop()


def test_completions_that_cannot_all_be_queued_take_no_other_tenants_place(assets):
    """A full queue held by one tenant: n = 3 from another would need three of its places, and
    may take two; none is queued and none of the holder's requests is refused for it."""
    engine = make_engine(assets, max_queue=4)
    try:
        rec = Recorder()
        gate = hold(engine)
        for i in range(4):
            submit(engine, rec, f"v{i}", "", PROMPTS[0], n=2, tenant="holder")
        with pytest.raises(QueueFull):
            engine.submit_many("asker", GenerateInput(prompt=PROMPTS[0], max_new_tokens=2), [lambda e: None] * 3)
        assert engine.stats().waiting_by_tenant == {"holder": 4}
        engine.submit_many("asker", GenerateInput(prompt=PROMPTS[0], max_new_tokens=2), [rec.emit_for("a0"),
                                                                                        rec.emit_for("a1")])
        assert engine.stats().waiting_by_tenant == {"holder": 2, "asker": 2}  # two places: the holder's newest
        gate.set()
        rec.wait_all()
        assert [type(rec.outcome(f"v{i}")).__name__ for i in range(4)] == ["FinishEvent"] * 2 + ["ErrorEvent"] * 2
    finally:
        engine.stop()


def test_tenants_that_called_recently_keep_one_row_free_at_most(assets):
    """Three tenants called and hold no row: a flood still takes every row but one (each kept
    row stood idle while they had nothing waiting)."""
    engine = make_engine(assets, max_batch_size=8)
    try:
        rec = Recorder()
        for tenant in ("c1", "c2", "c3"):
            submit(engine, rec, tenant, "", "x", n=1, tenant=tenant)
        rec.wait_all()
        gate = hold(engine)
        for i in range(10):
            engine.submit("flood", GenerateInput(prompt=PROMPTS[3], max_new_tokens=N, ignore_eos=True),
                          rec.emit_for(f"flood{i}"))
        gate.set()
        rec.wait_tokens("flood0", 2)
        assert engine.stats().running == 7
        rec.wait_all()
    finally:
        engine.stop()
