"""The front doors' side of an engine in its own process (`--engine-process`).

`EngineProcess` starts the engine's process (`entry.py`, spawned: a fresh interpreter that
loads the model and serves it with `host.py`), and is what the server's lifecycle calls
(drain, stop, health).
`RemoteFacade` is the facade the front doors call: the same methods, in the same terms, each
a message to the engine's process and its answer; what needs only the tokenizer (token
texts, decoding) is answered here, without a round trip. Events of generations come back
one message per engine step and are handed to each generation's `emit` on the reader thread.

If the engine's process ends (a crash, the kernel's OOM killer), every call waiting on it
fails with ENGINE_EXITED, every generation under way gets that error as its last event,
`healthy()` turns false (health NOT_SERVING: a liveness probe restarts the server) and
`on_lost` is called (`loramux serve` then stops, exit code 1).
"""

from __future__ import annotations

import atexit
import copy
import itertools
import logging
import multiprocessing
import os
import queue
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import wait

from loramux.server.engine.facade import (
    REMOTE_OPERATION_POLL_S, AdapterInfo, ErrorEvent, Event, FinishEvent, GenerateInput, Generation, MergeJob,
    Operation, ServerInfo, token_texts,
)
from loramux.server.errors import AdapterNotFound, EngineExited, InternalError, LoramuxError
from loramux.server.settings import Settings
from loramux.server.telemetry.signals import Telemetry

log = logging.getLogger(__name__)

START_TIMEOUT_S = 24 * 3600.0  # loading a model may take long (a Hub download); a process that dies is seen at once
HEALTH_STALE_S = 5.0  # no health message for this long: the engine's process is stuck (or its pipe is)
STOP_TIMEOUT_S = 30.0
METRICS_TIMEOUT_S = 5.0
REAP_POLL_S = 0.05  # how often the process's exit is asked of the kernel while waiting for it
EXITED_READ_S = 2.0  # after the process ended, how long what it wrote is still read
KNOWN_ADAPTERS = 4096  # adapters remembered as held by the engine (must_read), least recently used dropped


class EngineProcess:
    """An engine in a process of its own: start it, call it, stop it."""

    def __init__(self, settings: Settings, log_level: str = "INFO", log_format: str = "text"):
        self.settings = settings
        self.telemetry: Telemetry | None = None  # the front doors' (set by start)
        self.pid: int | None = None
        self.restored = 0  # registrations the engine brought back from the state directory
        self._log = (log_level, log_format)
        self._process = None
        self._conn = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._calls: dict[int, Future] = {}
        self._emits: dict[int, Callable[[Event], None]] = {}
        self._watches: dict[int, tuple[Operation, Callable[[], None]]] = {}
        self._out: queue.SimpleQueue = queue.SimpleQueue()  # messages the event loop sends (never waiting on the pipe)
        self._send_lock = threading.Lock()
        self._health = (False, 0.0)  # the engine's last word on its health, and when it came
        self._gone: LoramuxError | None = None  # set once the engine's process has ended
        self._stopping = False
        self._reaping = threading.Lock()  # one thread waits for the process at a time (a second's waitpid would fail)
        self._aborted = False
        self._reader: threading.Thread | None = None
        self._read_done = threading.Event()
        self._ended: int | None = None  # readable once the process has ended (_exit_signal)
        self.facade: RemoteFacade | None = None
        # Called once if the engine's process ends unasked (a crash): `serve` then stops the server.
        self.on_lost: Callable[[], None] | None = None

    def start(self, telemetry: Telemetry) -> EngineProcess:
        """Spawn the engine's process and wait until it serves (or raise its start-up error).
        Whatever fails or interrupts the start (`abort`), the process does not outlive it."""
        from loramux.server.engine_process.entry import main

        self.telemetry = telemetry
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or CUDA state
        here, there = context.Pipe(duplex=True)
        self._process = context.Process(target=main, args=(self.settings, there, *self._log), name="loramux-engine",
                                        daemon=False)
        self._conn = here
        try:
            atexit.register(self._at_exit)  # before multiprocessing's own hook, which would join it forever
            self._process.start()
            there.close()  # only the child holds its end: its exit is an EOF here
            facts = self._wait_ready(here)
            self.pid, self.restored = facts["pid"], facts["restored"]
            self._health = (True, time.monotonic())
            self.facade = RemoteFacade(self, telemetry, _load_tokenizer(facts["model_dir"]))
            if self._aborted:
                raise InternalError.logged(RuntimeError("the engine process's start was interrupted"))
        except BaseException:
            if self._process.pid is not None:
                self._end_process(0)
            there.close()
            here.close()
            atexit.unregister(self._at_exit)
            raise
        self._start_reading()
        threading.Thread(target=self._send_loop, name="loramux-engine-write", daemon=True).start()
        log.info("engine process %d serving", self.pid)
        return self

    def abort(self) -> None:
        """End a start under way (the server's start was interrupted): the process is killed,
        and `start` raises."""
        self._aborted = True
        self._stopping = True
        self._kill()

    def _wait_ready(self, conn) -> dict:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not conn.poll(0.5):
            if self._process.exitcode is not None or self._aborted or time.monotonic() > deadline:
                break
        try:
            kind, value = conn.recv() if conn.poll(0) and not self._aborted else ("exited", None)
        except EOFError:
            kind, value = "exited", None
        if kind == "ready":
            return value
        if kind == "failed":
            self._end_process(10)
            raise value
        code = self._end_process(0)
        raise InternalError.logged(RuntimeError("the engine process's start was interrupted" if self._aborted else
                                                f"the engine process exited during start-up (exit code {code})"))

    def _end_process(self, grace_s: float) -> int | None:
        """Wait up to `grace_s` for the process to end, then kill it; its exit code."""
        with self._reaping:
            if self._reaped(grace_s) is None:
                self._process.kill()
                self._reaped(10)
            return self._process.exitcode

    def _reaped(self, timeout: float) -> int | None:
        """The exit code once the process has ended, waiting up to `timeout` (callers hold
        `_reaping`). Asked of the kernel (waitpid), not read from the process's sentinel, which
        a process it forked may hold open after it ended."""
        deadline = time.monotonic() + timeout
        while self._process.exitcode is None and time.monotonic() < deadline:
            time.sleep(REAP_POLL_S)
        return self._process.exitcode

    def _kill(self) -> None:
        """Kill the process if it was started and has not been reaped (not a reused pid)."""
        with self._reaping:
            if self._process is not None and self._process.pid is not None and self._process.exitcode is None:
                self._process.kill()

    def _at_exit(self) -> None:
        """At interpreter exit (the server's process ends without `stop`): the engine's process
        is not left running, nor waited for forever."""
        self._stopping = True
        self._kill()
        if self._process is not None and self._process.pid is not None:
            self._wait_exit(10)

    # -- what the server's lifecycle calls -------------------------------------------------------

    def healthy(self, stall_s: float | None = None) -> bool:
        """Whether the engine makes progress: its process runs, and its last health message (at
        most HEALTH_STALE_S old) said so (it checks its own stalls, engine_stall_s)."""
        ok, when = self._health
        return self._gone is None and ok and time.monotonic() - when < HEALTH_STALE_S

    def drain(self, grace_s: float) -> bool:
        if self._gone is not None:
            return True  # nothing is left running: what ran failed with ENGINE_EXITED
        try:
            return self.call("drain", grace_s)
        except EngineExited:
            return True

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the engine (the rows running finish, what waits fails with SHUTTING_DOWN) and
        wait for its process to end; one that does not end in `timeout` is killed. The reader
        thread delivers what the engine sent last, then fails what still waits."""
        if self._process is None or self._reader is None:
            return
        self._stopping = True
        if self._gone is None:
            try:
                self._ask(lambda call_id: ("stop", call_id), timeout)
            except (LoramuxError, TimeoutError):
                pass
        with self._reaping:
            if self._reaped(timeout) is None:
                log.warning("the engine process did not end within %.0fs: killed", timeout)
                self._process.kill()
                self._reaped(5)
        self._reader.join(10)
        if self._reader.is_alive():  # a grandchild still holds the pipe open: fail what waits from here
            self._closed(EngineExited("the engine process has stopped"))
        self._conn.close()
        if self._ended is not None:
            os.close(self._ended)
            self._ended = None
        atexit.unregister(self._at_exit)

    def stats(self):
        """The engine's counters (`EngineStats`: queue, rows, steps, decode time), from its process."""
        return self.call("stats")

    def metrics(self) -> str:
        """The engine's Prometheus series (exposition text): empty until it serves."""
        if self.facade is None or self._gone is not None:
            return ""
        return self.call("metrics", timeout=METRICS_TIMEOUT_S)

    # -- the pipe --------------------------------------------------------------------------------

    def call(self, name: str, *args, timeout: float | None = None, **kwargs):
        """Run `name` in the engine's process and return its answer (or raise its error)."""
        return self._ask(lambda call_id: ("call", call_id, name, args, kwargs), timeout)

    def _ask(self, message: Callable[[int], tuple], timeout: float | None):
        future: Future = Future()
        with self._lock:
            if self._gone is not None:
                raise copy.copy(self._gone)
            call_id = next(self._ids)
            self._calls[call_id] = future
        self._send(message(call_id))  # from the caller's thread (a front door's pool): no hand-over to another
        try:
            return future.result(timeout)
        except TimeoutError:
            with self._lock:
                self._calls.pop(call_id, None)
            raise

    def send(self, message: tuple) -> None:
        """Queue a message that wants no answer (never blocks the caller: the event loop's)."""
        self._out.put(message)

    def _send(self, message: tuple) -> None:
        """Write one message (any thread; one writer at a time). A call that cannot be sent
        is answered with its error."""
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError:  # the engine's process is gone: the reader fails what waits
            if message[0] in ("call", "stop"):
                self._answer(message[1], False, EngineExited("the engine process has exited"))
        except Exception as e:  # noqa: BLE001 - an argument that does not pickle
            if message[0] in ("call", "stop"):
                self._answer(message[1], False, InternalError.logged(e, "an engine call could not be sent"))

    def new_ids(self, emits: list[Callable[[Event], None]]) -> list[int]:
        """Ids for generations whose events go to `emits` (kept until their last event)."""
        with self._lock:
            if self._gone is not None:
                raise copy.copy(self._gone)
            gids = [next(self._ids) for _ in emits]
            self._emits.update(zip(gids, emits))
        return gids

    def drop_ids(self, gids: list[int]) -> None:
        with self._lock:
            for gid in gids:
                self._emits.pop(gid, None)

    def watch(self, operation: Operation, callback: Callable[[], None]) -> None:
        with self._lock:
            gone = self._gone is not None
            if not gone:
                key = next(self._ids)
                self._watches[key] = (operation, callback)
        if gone:
            _call_back(callback)
            return
        self._out.put(("watch", key, operation.tenant, operation.name))

    def _send_loop(self) -> None:
        """Writes what the event loop queued (cancellations, watches), so that it never waits on the pipe."""
        while True:
            message = self._out.get()
            if message is None:
                return
            self._send(message)

    def _read_loop(self) -> None:
        """Read the engine's messages until its process ends. A message that cannot be read is a
        broken contract (a call or a generation would wait forever): the engine is ended, and
        everything waiting on it fails."""
        conn, ended = self._conn, self._ended
        try:
            while True:
                ready = wait([conn, ended])
                if conn not in ready:  # ended, but a descendant still holds its end of the pipe open
                    try:
                        while conn.poll(0):
                            self._handle(conn.recv())
                    except (EOFError, OSError):
                        pass
                    break
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    break
                self._handle(message)
        except Exception:  # noqa: BLE001 - logged; the engine is ended below
            log.exception("a message from the engine process could not be read: the engine process is ended")
            self._kill()
        finally:
            self._read_done.set()
            code = self._wait_exit(1)
            lost = self._gone is None and not self._stopping
            if lost:
                log.error("the engine process exited (exit code %s): calls and generations under way fail", code)
            self._closed(EngineExited(f"the engine process exited (exit code {code})" if code is not None
                                      else "the engine process has exited"))
            if lost and self.on_lost is not None:
                self.on_lost()

    def _start_reading(self) -> None:
        self._ended = _exit_signal(self._process)
        self._reader = threading.Thread(target=self._read_loop, name="loramux-engine-read", daemon=True)
        self._reader.start()
        threading.Thread(target=self._watch_exit, name="loramux-engine-exit", daemon=True).start()

    def _watch_exit(self) -> None:
        """Once the process has ended, what it wrote is read for EXITED_READ_S; then a read still
        waiting (on a message it never finished, the pipe held open by a descendant) is cut off."""
        wait([self._ended])
        if not self._read_done.wait(EXITED_READ_S):
            try:
                with socket.socket(fileno=os.dup(self._conn.fileno())) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "events":
            self._deliver(message[1])
        elif kind == "result":
            self._answer(*message[1:4])
        elif kind == "health":
            self._health = (message[1], time.monotonic())
        elif kind == "done":
            self._done(message[1], message[2])

    def _wait_exit(self, timeout: float) -> int | None:
        """The process's exit code once it has ended (None if it runs past `timeout`)."""
        with self._reaping:
            return self._reaped(timeout)

    def _deliver(self, batch: list) -> None:
        with self._lock:
            emits = self._emits
            targets = [((emits.pop(gid, None) if isinstance(event, (FinishEvent, ErrorEvent)) else emits.get(gid)), event)
                       for gid, event in batch]
        for emit, event in targets:
            if emit is None:
                continue
            try:
                emit(event)
            except Exception:  # noqa: BLE001 - one consumer's failure is not the others'
                log.exception("delivering an engine event failed")

    def _answer(self, call_id: int, ok: bool, value) -> None:
        with self._lock:
            future = self._calls.pop(call_id, None)
        if future is None:
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def _done(self, key: int, final: Operation | None) -> None:
        with self._lock:
            watched = self._watches.pop(key, None)
        if watched is None:
            return
        operation, callback = watched
        if final is not None:  # the waiter's copy takes the engine's final state (one update, under the GIL)
            operation.__dict__.update(final.__dict__)
        _call_back(callback)

    def _closed(self, error: LoramuxError) -> None:
        """The engine's process is gone: fail what waits on it, once."""
        with self._lock:
            if self._gone is not None:
                return
            self._gone = error
            calls, self._calls = self._calls, {}
            emits, self._emits = self._emits, {}
            watches, self._watches = self._watches, {}
        self._out.put(None)
        for future in calls.values():
            future.set_exception(copy.copy(error))  # each waiter its own (a raise adds to its traceback)
        for emit in emits.values():
            try:
                emit(ErrorEvent(copy.copy(error)))
            except Exception:  # noqa: BLE001
                log.exception("delivering an engine event failed")
        for _, callback in watches.values():
            _call_back(callback)


class RemoteRequest:
    """A generation's handle in the front doors' process (`Generation.request`)."""

    __slots__ = ("gid",)

    def __init__(self, gid: int):
        self.gid = gid


class RemoteFacade:
    """`engine.facade.Facade`'s methods, answered by an engine in its own process."""

    def __init__(self, engine: EngineProcess, telemetry: Telemetry, tokenizer):
        from loramux.server.model.base_model import fast_decoder

        settings = engine.settings
        self._engine = engine
        self._tokenizer = tokenizer
        self._decode = fast_decoder(tokenizer)
        self.special_token_ids = frozenset(tokenizer.all_special_ids)
        self.telemetry = telemetry
        self.model = settings.served_model_name
        self.public_model = settings.public_model_name
        self.started = time.time()
        self._shared = settings.state_dir is not None
        self._known: OrderedDict[tuple[str, str], None] = OrderedDict()  # adapters the engine was seen to hold
        self._known_lock = threading.Lock()

    # -- generation ------------------------------------------------------------------------

    def must_read(self, tenant: str, adapter_id: str) -> bool:
        """With a shared store, an adapter not yet seen here in the engine (loaded, resolved,
        served, listed) may need a read first: `resolve` (on the adapter pool) does it. Never
        blocks: what the engine holds is remembered here, not asked."""
        return bool(adapter_id) and self._shared and (tenant, adapter_id) not in self._known

    def _seen(self, tenant: str, adapter_ids) -> None:
        if not self._shared:
            return
        with self._known_lock:
            for adapter_id in adapter_ids:
                if adapter_id:
                    self._known[(tenant, adapter_id)] = None
                    self._known.move_to_end((tenant, adapter_id))
            while len(self._known) > KNOWN_ADAPTERS:
                self._known.popitem(last=False)

    def _forget(self, tenant: str, adapter_id: str) -> None:
        with self._known_lock:
            self._known.pop((tenant, adapter_id), None)

    def resolve(self, tenant: str, adapter_id: str) -> None:
        if adapter_id:
            self._engine.call("resolve", tenant, adapter_id)
            self._seen(tenant, (adapter_id,))

    def generate(self, tenant: str, inp: GenerateInput, emit: Callable[[Event], None], deadline: float | None = None,
                 trace_context: object = None) -> Generation:
        return self._generate(tenant, inp, [emit], deadline, trace_context, many=False)[0]

    def generate_many(self, tenant: str, inp: GenerateInput, emits: list[Callable[[Event], None]],
                      deadline: float | None = None, trace_context: object = None) -> list[Generation]:
        return self._generate(tenant, inp, emits, deadline, trace_context, many=True)

    def _generate(self, tenant, inp, emits, deadline, trace_context, many: bool) -> list[Generation]:
        gids = self._engine.new_ids(emits)
        try:
            limits = self._engine.call("generate", gids, tenant, inp, deadline, _carrier(trace_context), many)
        except BaseException as e:
            self._engine.drop_ids(gids)
            if isinstance(e, AdapterNotFound):
                self._forget(tenant, inp.adapter_id)
            raise
        self._seen(tenant, (inp.adapter_id,))
        return [Generation(RemoteRequest(gid), self.model, limit) for gid, limit in zip(gids, limits)]

    def cancel(self, generation: Generation) -> None:
        self._engine.send(("cancel", generation.request.gid))

    def tokenize(self, tenant: str, inp: GenerateInput) -> tuple[list[int], int]:
        return self._engine.call("tokenize", tenant, inp)

    def token_texts(self, ids: list[int]) -> list[str]:
        return token_texts(self._tokenizer, self._decode, ids)

    def decode(self, ids: list[int]) -> str:
        return self._decode(ids)

    def healthy(self) -> bool:
        return self._engine.healthy()

    # -- adapters ----------------------------------------------------------------------------

    def load_adapter(self, tenant: str, adapter_id: str, source: str, revision: str = "", pin: bool = False,
                     warm: bool = False, replace: bool = False, deadline: float | None = None) -> AdapterInfo:
        info = self._engine.call("load_adapter", tenant, adapter_id, source, revision=revision, pin=pin, warm=warm,
                                 replace=replace, deadline=deadline)
        self._seen(tenant, (adapter_id,))
        return info

    def unload_adapter(self, tenant: str, adapter_id: str) -> None:
        self._forget(tenant, adapter_id)
        self._engine.call("unload_adapter", tenant, adapter_id)

    def get_adapter(self, tenant: str, adapter_id: str) -> AdapterInfo:
        info = self._engine.call("get_adapter", tenant, adapter_id)
        self._seen(tenant, (adapter_id,))
        return info

    def list_adapters(self, tenant: str) -> list[AdapterInfo]:
        infos = self._engine.call("list_adapters", tenant)
        self._seen(tenant, [info.adapter_id for info in infos])
        return infos

    # -- merges and operations -------------------------------------------------------------

    def merge(self, tenant: str, job: MergeJob, trace_context: object = None) -> Operation:
        return self._engine.call("merge", tenant, job, _carrier(trace_context))

    def get_operation(self, tenant: str, name: str) -> Operation:
        return self._engine.call("get_operation", tenant, name)

    def list_operations(self, tenant: str, after: str, size: int) -> tuple[list[Operation], bool]:
        return self._engine.call("list_operations", tenant, after, size)

    def cancel_operation(self, tenant: str, name: str) -> None:
        self._engine.call("cancel_operation", tenant, name)

    def delete_operation(self, tenant: str, name: str) -> None:
        self._engine.call("delete_operation", tenant, name)

    def poll_interval(self, operation: Operation) -> float | None:
        return REMOTE_OPERATION_POLL_S if operation.foreign else None

    def on_operation_done(self, operation: Operation, callback: Callable[[], None]) -> None:
        """`callback` once `operation` ends, with `operation` updated to its final state
        (never blocks: the engine's process is asked, and answers when it ends)."""
        if operation.done:
            callback()
            return
        self._engine.watch(operation, callback)

    # -- the server ----------------------------------------------------------------------------

    def server_info(self) -> ServerInfo:
        return self._engine.call("server_info")


def _exit_signal(process) -> int:
    """A file descriptor that becomes readable when `process` ends: a pidfd (Linux 5.3), which
    no descendant can hold open as it can the process's sentinel; else a pipe that a thread
    polling the exit code (waitpid) closes."""
    try:
        return os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        pass
    read_end, write_end = os.pipe()

    def watch() -> None:
        while process.exitcode is None:
            time.sleep(REAP_POLL_S)
        os.close(write_end)

    threading.Thread(target=watch, name="loramux-engine-exit-poll", daemon=True).start()
    return read_end


def _call_back(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:  # noqa: BLE001 - a waiter's failure (its loop closed) is not the reader's
        log.exception("an operation's callback failed")


def _carrier(trace_context: object) -> dict | None:
    """The caller's trace context as W3C headers (what crosses to the engine's process)."""
    if trace_context is None:
        return None
    from opentelemetry.propagate import inject

    carrier: dict = {}
    inject(carrier, context=trace_context)
    return carrier or None


def _load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
