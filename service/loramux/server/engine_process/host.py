"""The engine's side of `--engine-process`: the facade, served over one pipe to the front
doors' process (`client.py`); the process itself starts in `entry.py`.

The engine thread's only cost for a caller in another process is handing its events to the
outbox: a list append. A sender thread pickles whatever has gathered since its last message
and writes it as one message, so a decode step's events for every row cross together.

The messages (tuples), to this process:
    ("call", id, name, args, kwargs)  a call (FACADE_CALLS, Host._own), answered by ("result", id, ok, value)
    ("cancel", gid)                   cancel the generation `gid` (no answer)
    ("watch", key, tenant, name)      answered by ("done", key, operation) once it ends
    ("stop", id)                      stop the engine, answer, and end the process
and from it:
    ("ready", facts) or ("failed", error)  once, after start-up
    ("events", [(gid, event), ...])       events of generations, in the engine's order
    ("health", ok)                        every HEALTH_PERIOD_S
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.reduction import ForkingPickler

from loramux.server.cpu_threads import limit_to_one_thread
from loramux.server.engine.facade import ErrorEvent, Facade, FinishEvent
from loramux.server.errors import InternalError, LoramuxError

log = logging.getLogger(__name__)

HEALTH_PERIOD_S = 0.5
CALL_THREADS = 64  # calls at once: more than the front doors ever send together (their pools: 4 + 4, and asyncio's
# default executor, at most 32), so that their turns between tenants are taken there, not queued here
# The facade's methods the front doors' process calls as they are (Host._own answers the others).
FACADE_CALLS = frozenset({
    "resolve", "tokenize", "load_adapter", "unload_adapter", "get_adapter", "list_adapters", "get_operation",
    "list_operations", "cancel_operation", "delete_operation", "server_info",
})


class Host:
    def __init__(self, engine, conn, telemetry):
        self._engine = engine
        self._facade = Facade(engine)
        self._conn = conn
        self._telemetry = telemetry
        self._out: queue.SimpleQueue = queue.SimpleQueue()  # the sender's: messages, or the outbox's flush
        self._send_lock = threading.Lock()
        self._events: list = []
        self._events_lock = threading.Lock()
        self._generations: dict[int, object] = {}  # gid -> its Generation, until its last event
        self._pending: set[int] = set()  # gids whose generate call runs
        self._ended: set[int] = set()  # pending gids whose last event came before their Generation was kept
        self._generations_lock = threading.Lock()
        self._calls = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="loramux-engine-call",
                                         initializer=limit_to_one_thread)
        self._stopping = threading.Event()
        # Calls whose arguments cross differently (ids for emits, trace headers), and the engine's own
        # (its counters are what benchmarks read).
        self._own = {"generate": self._generate, "merge": self._merge, "drain": engine.drain, "metrics": self._metrics,
                     "stats": engine.stats}

    def serve(self) -> None:
        """Read the front doors' messages until `stop` (or until their process is gone)."""
        sender = threading.Thread(target=self._send_loop, name="loramux-engine-send", daemon=True)
        sender.start()
        threading.Thread(target=self._health_loop, name="loramux-engine-health", daemon=True).start()
        while not self._stopping.is_set():
            try:
                message = self._conn.recv()
            except (EOFError, OSError):  # the front doors' process is gone: nobody to serve
                log.warning("the front doors' process closed its pipe: the engine stops")
                self._stop_engine()
                break
            except Exception:  # noqa: BLE001 - a message that does not unpickle: the contract is broken
                _die("a message from the front doors' process could not be read")
            kind = message[0]
            if kind == "call":
                self._calls.submit(self._call, *message[1:])
            elif kind == "cancel":
                with self._generations_lock:
                    generation = self._generations.get(message[1])
                if generation is not None:
                    self._facade.cancel(generation)
            elif kind == "watch":
                self._calls.submit(self._watch, *message[1:])
            elif kind == "stop":  # the rows running finish, what waits fails; then this process ends
                self._stop_engine()
                self._out.put(("result", message[1], True, None))
                break
        self._calls.shutdown(wait=False, cancel_futures=True)  # a call still waiting (a slot) is failed by the exit
        self._out.put(None)
        sender.join(10)
        self._telemetry.shutdown()

    # -- calls ---------------------------------------------------------------------------------

    def _call(self, call_id: int, name: str, args: tuple, kwargs: dict) -> None:
        try:
            handler = self._own.get(name) or (getattr(self._facade, name) if name in FACADE_CALLS else None)
            if handler is None:
                raise InternalError.logged(ValueError(f"no engine call {name!r}"))
            answer = ("result", call_id, True, handler(*args, **kwargs))
        except LoramuxError as e:
            answer = ("result", call_id, False, e)
        except Exception as e:  # noqa: BLE001 - the caller gets INTERNAL with a correlation id
            answer = ("result", call_id, False, InternalError.logged(e, f"engine call {name} failed"))
        self._send(answer)  # from this thread: no hand-over to the sender

    def _generate(self, gids: list[int], tenant: str, inp, deadline: float | None, carrier: dict | None,
                  many: bool) -> list[int]:
        """Queue a request's completions; their events go to the outbox under `gids`. Returns
        each completion's max_new_tokens."""
        context = _context(carrier)
        emits = [self._emitter(gid) for gid in gids]
        with self._generations_lock:
            self._pending.update(gids)
        try:
            if many:
                generations = self._facade.generate_many(tenant, inp, emits, deadline, trace_context=context)
            else:
                generations = [self._facade.generate(tenant, inp, emits[0], deadline, trace_context=context)]
        except BaseException:
            with self._generations_lock:
                self._pending.difference_update(gids)
                self._ended.difference_update(gids)
            raise
        with self._generations_lock:
            self._pending.difference_update(gids)
            for gid, generation in zip(gids, generations):
                if gid in self._ended:
                    self._ended.discard(gid)
                else:
                    self._generations[gid] = generation
        return [generation.max_new_tokens for generation in generations]

    def _merge(self, tenant: str, job, carrier: dict | None):
        return self._facade.merge(tenant, job, trace_context=_context(carrier))

    def _metrics(self) -> str:
        scrape = self._telemetry.scrape
        return scrape() if scrape is not None else ""

    def _stop_engine(self) -> None:
        if not self._stopping.is_set():
            self._stopping.set()
            self._engine.stop()

    def _watch(self, key: int, tenant: str, name: str) -> None:
        try:
            operation = self._facade.get_operation(tenant, name)
        except LoramuxError:  # gone meanwhile (deleted, trimmed): the waiter reads it again
            self._out.put(("done", key, None))
            return
        self._facade.on_operation_done(operation, lambda: self._out.put(("done", key, operation)))

    # -- events --------------------------------------------------------------------------------

    def _emitter(self, gid: int):
        events, lock, out = self._events, self._events_lock, self._out

        def emit(event) -> None:  # the engine thread
            if isinstance(event, (FinishEvent, ErrorEvent)):
                self._forget(gid)
            with lock:
                events.append((gid, event))
                first = len(events) == 1
            if first:
                out.put(self._flush)

        return emit

    def _forget(self, gid: int) -> None:
        with self._generations_lock:
            if self._generations.pop(gid, None) is None and gid in self._pending:
                self._ended.add(gid)  # ended before its Generation was kept: not to be kept

    def _flush(self) -> tuple:
        with self._events_lock:
            batch = self._events[:]
            self._events.clear()
        return ("events", batch)

    def _send_loop(self) -> None:
        """Writes what the engine thread and the callbacks queued (events, health, operations
        done), so that the engine thread never waits on the pipe. If it cannot go on, the
        process ends (the front doors' process then fails what waited) rather than go quiet."""
        try:
            while True:
                item = self._out.get()
                if item is None:
                    return
                if callable(item):  # the outbox's events, pickled here once
                    events = item()
                    try:
                        item = ForkingPickler.dumps(events)
                    except Exception as e:  # noqa: BLE001 - every event is a plain dataclass; one that is not fails its row alone
                        item = ForkingPickler.dumps(("events", [self._sendable(gid, event, e) for gid, event in events[1]]))
                if not self._send(item):
                    return
        except Exception:  # noqa: BLE001
            _die("the engine process's sender failed")

    def _send(self, message: tuple | memoryview) -> bool:
        """Write one message, or one already pickled (any thread; one writer at a time); False
        once the pipe is closed."""
        try:
            with self._send_lock:
                if isinstance(message, memoryview):
                    self._conn.send_bytes(message)
                else:
                    self._conn.send(message)
        except OSError:  # the pipe is closed: the reader sees it too
            return False
        except Exception as e:  # noqa: BLE001 - a value that does not pickle: its caller gets INTERNAL
            log.exception("an engine message could not be sent")
            if message[0] == "result":
                return self._send(("result", message[1], False, InternalError.logged(e, "an engine answer could not be sent")))
        return True

    def _sendable(self, gid: int, event, error: Exception) -> tuple:
        """(gid, event), or, for an event that does not pickle, (gid, INTERNAL as its last
        event), its generation cancelled."""
        try:
            ForkingPickler.dumps(event)
            return gid, event
        except Exception:  # noqa: BLE001
            with self._generations_lock:
                generation = self._generations.get(gid)
            if generation is not None:
                self._facade.cancel(generation)
            self._forget(gid)
            return gid, ErrorEvent(InternalError.logged(error, "an engine event could not be sent"))

    def _health_loop(self) -> None:
        stall_s = self._engine.settings.engine_stall_s
        while not self._stopping.wait(HEALTH_PERIOD_S):
            self._out.put(("health", self._engine.healthy(stall_s)))


def _die(what: str) -> None:
    """End this process at once, after logging why: the front doors' process sees it end and
    fails every call and generation that waited on it."""
    log.exception("%s: the engine process ends", what)
    logging.shutdown()
    os._exit(1)


def _context(carrier: dict | None):
    """The caller's trace context, from the W3C headers the front doors' process wrote."""
    if not carrier:
        return None
    from opentelemetry.propagate import extract

    return extract(carrier)
