"""Structured output: a row's answer held to a JSON schema, a regex, a grammar or a list of
choices, by masking the tokens that would break it (llguidance).

Chosen by measurement (`scripts/grammar_libraries.py`, docs/benchmarks.md): llguidance
compiles lazily (under a millisecond for the schemas people send, where xgrammar spends
5-13 ms and outlines-core 20-100 ms), bounds the work of every compile and every mask step
with its own fuel limits (xgrammar spent 2.5 s on a 300-deep schema and over 20 s on a
50,000-rule grammar; outlines-core over 20 s on a 20,000-value enum), speaks JSON Schema,
regexes and Lark grammars, and installs as one 8 MB wheel with no dependencies (xgrammar
requires torch, transformers and Triton). Its masks cost 10-30 µs per row per token on one
CPU at a 32,000-token vocabulary.

- `Constraint`: what a request asked for (kind and text), bounded in size;
- `Grammars`: per server, the tokenizer's llguidance state (built once, in the background),
  compiling on its own threads (deep grammars recurse deeply: the threads have large stacks)
  with a time limit, and a cache of compiled constraints (each row gets its own copy of the
  compiled matcher, which builds its lexer's states as it goes, at most LEXER_STATES);
- `start_masks` / `allowed`: a batch's masks, computed on a helper thread while the forward
  pass runs, each row timed (a row whose masks stay over MASK_STEP_BUDGET_S ends alone:
  every row of the batch waits for them), then applied to the logits as one tensor operation.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import logging
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from loramux.server.engine.constraints import (
    Constraint, compile_matcher, first_line, invalid, library_tokenizer, tokenizer_text,
)
from loramux.server.engine.grammar_check import GrammarCheck
from loramux.server.errors import InvalidRequest, QueueFull

log = logging.getLogger(__name__)
COMPILE_TIMEOUT_S = 10.0  # a request waits this long for its constraint to compile (its own, or others' before it)
COMPILE_THREADS = 2
COMPILE_QUEUE = 64  # constraints waiting for a compile thread; more are refused as busy
COMPILE_STACK_BYTES = 256 << 20  # address space only: a 50,000-rule chain recurses past 8 MiB
MASK_STEP_BUDGET_S = 0.005  # one row's mask per token: 10-30 us for ordinary constraints at a 32,000-token vocabulary
MASK_SLOW_STEPS = 3  # steps in a row over the budget end the row (the first mask also builds the lexer)
MASK_WAIT_S = 1.0  # a step waits this long for its masks at most: a row whose mask is not done by then ends
MASK_THREADS = 2  # threads computing a step's masks (a late one is lost until the library returns)
MAX_LOST_MASK_THREADS = 4  # threads lost in late calls at once: past it, new constraints are refused until one returns
CACHE_ENTRIES = 64  # compiled constraints kept (each at most LEXER_STATES states of 1-2 kB as it is used)
class _Compiler:
    """A few threads with large stacks, fed from a bounded queue."""

    def __init__(self, threads: int, stack_bytes: int, capacity: int):
        self._jobs: queue.Queue = queue.Queue(capacity)
        for i in range(threads):
            self._start(f"loramux-grammar-{i}", stack_bytes)

    def _start(self, name: str, stack_bytes: int) -> None:
        """A worker with a `stack_bytes` stack, or smaller ones where the address space is
        limited (ulimit -v): then the size limit on constraints is what keeps recursion in bounds."""
        for size in (stack_bytes, stack_bytes // 4, 0):
            previous = threading.stack_size(size)
            try:
                threading.Thread(target=self._work, name=name, daemon=True).start()
                if size != stack_bytes:
                    log.warning("structured output: compile thread %s runs with a %s stack", name,
                                f"{size >> 20} MiB" if size else "default")
                return
            except (RuntimeError, MemoryError, ValueError):
                continue
            finally:
                threading.stack_size(previous)
        raise RuntimeError("could not start a structured-output compile thread")

    def submit(self, fn) -> Future:
        future: Future = Future()
        try:
            self._jobs.put_nowait((fn, future))
        except queue.Full:
            raise QueueFull("too many structured-output constraints are compiling; retry shortly",
                             reason="GRAMMAR_QUEUE_FULL", retry_after_s=1.0) from None
        return future

    def _work(self) -> None:
        while True:
            fn, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                future.set_exception(e)


class Grammars:
    """Per server: compile constraints for the served tokenizer and give each request its matcher."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int]):
        self.vocab_size = vocab_size
        self._words = (vocab_size + 31) // 32
        self._compiler = _compiler()
        self._cache: collections.OrderedDict[Constraint, Future] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.check: GrammarCheck | None = None  # (made with the tokenizer's state)
        self._turns = threading.Condition()
        self._compiling: set[str] = set()  # tenants with a new constraint compiling (one each at a time)
        self._closed = False
        # Building the tokenizer's state reads every token (about 2 s at 32,000): started now, waited for by the first request.
        self._tokenizer: Future = self._compiler.submit(lambda: self._build_tokenizer(tokenizer, eos_ids))

    def _build_tokenizer(self, tokenizer, eos_ids: frozenset[int]):
        try:
            importlib.import_module("llguidance")
        except ImportError as e:  # a server installed without its dependencies
            raise InvalidRequest(f"structured output needs llguidance, which is not installed ({e})",
                                 field="structured_output", reason="STRUCTURED_OUTPUT_UNAVAILABLE") from None
        try:
            text = tokenizer_text(tokenizer)
            state = library_tokenizer(text, self.vocab_size, sorted(eos_ids))
        except Exception as e:  # noqa: BLE001 - e.g. a slow (Python) tokenizer
            raise InvalidRequest(f"structured output is not available for this model's tokenizer ({type(e).__name__}: "
                                 f"{str(e)[:160]})", field="structured_output", reason="STRUCTURED_OUTPUT_UNAVAILABLE") from None
        self.check = GrammarCheck(text, self.vocab_size, sorted(eos_ids), children=COMPILE_THREADS)
        if self._closed:  # (closed while the state was being built)
            self.check.close()
        return state

    def close(self) -> None:
        """Stop the grammar check's child processes (and start none after)."""
        self._closed = True
        if self.check is not None:
            self.check.close()

    def matcher(self, constraint: Constraint, timeout_s: float = COMPILE_TIMEOUT_S, tenant: str | None = None) -> RowGrammar:
        """A fresh matcher for one request (blocking: waits for the compile, at most `timeout_s`).
        InvalidRequest when the constraint does not compile, or takes too long. A tenant has
        one new constraint compiling at a time (`tenant`; its others wait in their callers'
        threads), so one tenant's slow constraints hold one compile thread, never both."""
        constraint.check()
        if _mask_pool().lost_now >= MAX_LOST_MASK_THREADS:
            raise QueueFull("structured output's mask threads are held by constraints the library is slow on; retry "
                            "shortly", reason="GRAMMAR_QUEUE_FULL", retry_after_s=5.0)
        deadline = time.monotonic() + timeout_s
        turn = submitted = False
        try:
            while True:
                with self._lock:
                    future = self._cache.get(constraint)
                    if future is not None:
                        self._cache.move_to_end(constraint)
                        break
                    if tenant is None or turn:
                        future = self._compiler.submit(lambda: self._compile(constraint))
                        submitted = True
                        self._cache[constraint] = future
                        while len(self._cache) > CACHE_ENTRIES:
                            self._cache.popitem(last=False)
                        break
                turn = self._take_turn(tenant, deadline)  # (then looks again: another request may have compiled it)
        finally:
            if turn and submitted:  # the turn ends with the compile
                future.add_done_callback(lambda _: self._end_turn(tenant))
            elif turn:
                self._end_turn(tenant)
        try:
            pristine = future.result(max(0.0, deadline - time.monotonic()))  # (a turn waited for counts too)
        except FutureTimeout:
            check = self.check
            if not future.running() or (check is not None and check.starting):  # behind other compiles, or a
                # checking process's start: not this constraint's fault
                raise QueueFull("structured-output constraints are compiling for other requests; retry shortly",
                                reason="GRAMMAR_QUEUE_FULL", retry_after_s=1.0) from None
            raise invalid(f"the {constraint.kind} did not compile within {timeout_s:g} s", reason="GRAMMAR_TOO_COMPLEX") from None
        except InvalidRequest as e:
            if e.reason == "STRUCTURED_OUTPUT_UNAVAILABLE":  # (no checking process: not this constraint's answer)
                with self._lock:
                    if self._cache.get(constraint) is future:
                        del self._cache[constraint]
            raise
        except Exception as e:  # noqa: BLE001 - a library error is the constraint's
            with self._lock:
                self._cache.pop(constraint, None)
            raise invalid(f"the {constraint.kind} could not be compiled ({type(e).__name__}: {str(e)[:200]})") from None
        return RowGrammar(self, pristine.deep_copy())

    def _take_turn(self, tenant: str, deadline: float) -> bool:
        """Wait until `tenant` has no new constraint compiling, then take the turn (True);
        QueueFull past `deadline`."""
        with self._turns:
            if not self._turns.wait_for(lambda: tenant not in self._compiling, max(0.0, deadline - time.monotonic())):
                raise QueueFull("this tenant's other structured-output constraints are compiling; retry shortly",
                                reason="GRAMMAR_QUEUE_FULL", retry_after_s=1.0)
            self._compiling.add(tenant)
        return True

    def _end_turn(self, tenant: str) -> None:
        with self._turns:
            self._compiling.discard(tenant)
            self._turns.notify_all()

    def _compile(self, constraint: Constraint):
        state = self._tokenizer.result()
        self.check.check(constraint)  # in a child process first: it may crash or hang the library
        return compile_matcher(state, constraint)

    # -- per step (engine thread) -----------------------------------------------------------

    def start_masks(self, matchers: list) -> Masks:
        """Start computing the masks of `matchers` (one per constrained row, in order) on the
        mask threads (llguidance drops the GIL while it works), each taking the next row
        until none is left. The caller runs its forward pass meanwhile, then takes them with
        `allowed`."""
        masks = Masks(matchers, self._words)
        _mask_pool().submit(masks)
        return masks

    def allowed(self, masks: Masks, device: torch.device) -> torch.Tensor:
        """The masks as booleans [k, vocab_size] on `device`, waiting MASK_WAIT_S at most
        (twice, when every mask thread was lost to a late row: see `Masks.wait`)."""
        masks.wait(MASK_WAIT_S, _mask_pool())
        words = masks.bitmask.to(device)
        bits = (words[:, :, None] >> torch.arange(32, dtype=torch.int32, device=device)) & 1
        return bits.reshape(len(words), -1)[:, : self.vocab_size].bool()


class Masks:
    """One step's masks. Mask threads take rows one at a time (a row is claimed before its
    matcher is touched, so no matcher is ever used by two threads). A row whose mask is still
    in the library when the step stops waiting is late: its row ends, its matcher is never
    used again, and its thread is lost to the pool until the call returns (the pool starts a
    new one). Library work never runs on the caller's (the engine's) thread."""

    def __init__(self, matchers: list, words: int):
        self.matchers = matchers
        self.bitmask = torch.zeros((len(matchers), words), dtype=torch.int32)
        self.seconds = [0.0] * len(matchers)  # each row's mask time (a late row: how long it was waited for)
        self.late: set[int] = set()  # rows whose mask was not done in time (their rows end)
        self._size = words * 4
        self._lock = threading.Lock()
        self._next = 0  # the next row no thread has taken
        self._finished = [False] * len(matchers)
        self._left = len(matchers)  # rows neither done nor late
        self._done = threading.Event()
        self._closed = False  # the step stopped waiting: no thread takes another row
        if not matchers:
            self._done.set()

    def work(self) -> bool:
        """Take rows and compute their masks until none is left; True when this thread's row
        went late while it computed (the thread is lost: the pool has replaced it)."""
        while True:
            with self._lock:
                if self._closed or self._next >= len(self.matchers):
                    return False
                i = self._next
                self._next += 1
            started = time.perf_counter()
            try:
                self.matchers[i].unsafe_compute_mask_ptr(self.bitmask.data_ptr() + i * self._size, self._size)
            except Exception:  # noqa: BLE001 - this row's constraint is broken: it allows nothing
                log.exception("structured output: a row's mask could not be computed")
                self.bitmask[i] = 0
            with self._lock:
                if i in self.late:
                    return True
                self.seconds[i] = time.perf_counter() - started
                self._finished[i] = True
                self._left -= 1
                if not self._left:
                    self._done.set()

    def wait(self, timeout_s: float, pool: _MaskPool) -> None:
        """Wait for the masks, `timeout_s` at most; the rows still being computed then are
        late. If rows were left that no thread had taken (every thread was in a late row),
        the pool's new threads take them, for `timeout_s` more at most. Then no thread takes
        another row, and every row not done is late."""
        if self._done.wait(timeout_s):
            return  # (every row done: the common case)
        self._give_up(pool, timeout_s, close=False)
        if not self._done.is_set():
            pool.submit(self)  # (the rows no thread took yet, for the threads that replace the lost)
            if not self._done.wait(timeout_s):
                self._give_up(pool, 2 * timeout_s, close=True)
        if self.late:
            log.warning("structured output: %d row(s)' masks were not done within %g s; those rows end",
                        len(self.late), timeout_s)
            # A late computation still writes into the buffer it was given: kept alive (this
            # object, which its thread holds, keeps it), and the rows are read from a copy.
            self._written = self.bitmask
            self.bitmask = self.bitmask.clone()
            self.bitmask[sorted(self.late)] = 0

    def _give_up(self, pool: _MaskPool, waited_s: float, close: bool) -> None:
        """Make the rows being computed late (their threads are lost to the pool); with
        `close`, also those no thread took, and let no thread take another."""
        with self._lock:
            untaken = []
            if close:
                self._closed = True
                untaken = list(range(self._next, len(self.matchers)))
                self._next = len(self.matchers)
            running = [i for i in range(self._next) if not self._finished[i] and i not in self.late]
            for i in untaken + running:
                self.late.add(i)
                self.seconds[i] = waited_s
            self._left = len(self.matchers) - sum(self._finished) - len(self.late)
            if not self._left:
                self._done.set()
        pool.lost(len(running))


@dataclasses.dataclass(eq=False)
class RowGrammar:
    """One request's constraint as it generates: its own matcher, and the server's Grammars."""

    grammars: Grammars
    matcher: object  # llguidance.LLMatcher
    slow_steps: int = 0  # consecutive steps whose mask took more than MASK_STEP_BUDGET_S

    def failed(self, seconds: float = 0.0) -> str | None:
        """Why the row must end: its matcher stopped working (its work limit, say), or its
        masks cost more than MASK_STEP_BUDGET_S for MASK_SLOW_STEPS steps in a row (every
        row of the batch waits for them); else None."""
        if self.matcher.is_error():
            return first_line(self.matcher.get_error())
        self.slow_steps = self.slow_steps + 1 if seconds > MASK_STEP_BUDGET_S else 0
        if self.slow_steps >= MASK_SLOW_STEPS:
            return (f"its masks took {1000 * seconds:.1f} ms per token, more than the {1000 * MASK_STEP_BUDGET_S:g} ms "
                    "this server allows (every row of the batch waits for them)")
        return None

    def late(self, waited_s: float) -> str:
        """Why the row ends when its mask was not done after `waited_s` (its matcher is still in
        the library, on a mask thread: never used again)."""
        self.matcher = None
        return (f"its mask took more than {waited_s:g} s, the longest this server waits (every row of the batch "
                "waits for it)")

    def consume(self, token: int) -> bool:
        """Take the row's chosen token; False when the grammar refuses it (the row must end)."""
        return bool(self.matcher.consume_token(token))

    def complete(self) -> bool:
        """Whether the answer is complete: nothing but the end may follow."""
        return bool(self.matcher.is_stopped())

    def accepting(self) -> bool:
        """Whether the answer may end here (a stop token now leaves it whole)."""
        return bool(self.matcher.is_stopped() or self.matcher.is_accepting())


_MASK_POOL: list = []
_COMPILER: list = []
_MASK_LOCK = threading.Lock()


def _mask_pool() -> _MaskPool:
    """The process's mask threads (shared by every engine in it)."""
    with _MASK_LOCK:
        if not _MASK_POOL:
            _MASK_POOL.append(_MaskPool(MASK_THREADS))
        return _MASK_POOL[0]


def _compiler() -> _Compiler:
    """The process's compile threads (shared by every engine in it)."""
    with _MASK_LOCK:
        if not _COMPILER:
            _COMPILER.append(_Compiler(COMPILE_THREADS, COMPILE_STACK_BYTES, COMPILE_QUEUE))
        return _COMPILER[0]


class _MaskPool:
    """MASK_THREADS threads taking a step's rows; a thread lost in a late row's library call is
    replaced, up to MAX_LOST_MASK_THREADS lost at once (Grammars refuses new constraints at
    that point, until one comes back)."""

    def __init__(self, threads: int):
        self._lock = threading.Lock()
        self._steps: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = threads
        self._live = 0
        self.lost_now = 0  # threads still inside a late row's call

    def submit(self, masks: Masks) -> None:
        with self._lock:
            while self._live < self._threads and self.lost_now < MAX_LOST_MASK_THREADS:
                self._live += 1
                threading.Thread(target=self._run, name="loramux-masks", daemon=True).start()
            live = self._live
        for _ in range(live):  # each live thread takes rows of this step until none is left
            self._steps.put(masks)

    def lost(self, n: int) -> None:
        """`n` threads went late: they leave the pool (they end when their call returns)."""
        if n:
            with self._lock:
                self._live -= n
                self.lost_now += n

    def _run(self) -> None:
        while True:
            masks = self._steps.get()
            if masks.work():  # this thread's row went late: it was counted lost
                with self._lock:
                    self.lost_now -= 1
                return


