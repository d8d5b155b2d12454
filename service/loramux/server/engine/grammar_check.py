"""Each new structured-output constraint meets the library in a child process first.

llguidance compiles and masks in native code, in the engine's process. A fuzzing of it
(docs/security.md, "Structured output") found constraints that crash the process (numbers on
the most negative 64-bit integer, refused in constraints.py) and others whose compile or
first mask runs for minutes or for ever, burning a core no thread can be stopped on: a
`multipleOf` of 2147483648, twenty-five unanchored `pattern`s one string must match, a
recursion with a long forced key and no end. No check of the text can know every such
shape; a process can be killed. So before the engine's process compiles a constraint, a
child process holding the same tokenizer compiles it and takes its masks along three paths
(`_walk`: the first mask builds the lexer, and a slow step may hide behind a first choice).
A constraint with a mask over CHECK_MASK_S, or that outlasts CHECK_S or kills the child, is
refused (GRAMMAR_TOO_COMPLEX, INVALID_GRAMMAR); a child killed or dead is started again at
once. Grammars caches the outcome with the compiled constraint, so a constraint is checked
once; two children (one per compile thread) serve the checks.

The child is `python -m loramux.server.engine.grammar_check`: it reads JSON lines on stdin
(first the tokenizer, then one constraint per line) and answers each with one line on
stdout. It ends when its stdin closes (the server stopped or died).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import selectors
import subprocess
import sys
import threading
import time
import weakref

from loramux.server.engine.constraints import Constraint, invalid

log = logging.getLogger(__name__)
CHECK_S = 5.0  # a constraint's compile and its masks' walk in the child (ordinary ones: milliseconds)
CHECK_STEPS = 16  # masks the child takes along each of its three paths (the lowest token allowed, the highest, a random one)
CHECK_MASK_S = 0.25  # one of those masks may take this long (ordinary ones: microseconds to milliseconds)
START_S = 60.0  # the child's start: the library's tokenizer state (about 2 s per 32,000 tokens)
CHILD_MEMORY_BYTES = 8 << 30  # the child's address space (the 256 MiB compile stack is address space too)
CHILD_STACK_BYTES = 256 << 20  # deep grammars recurse deeply, as on the engine's compile threads


class GrammarCheck:
    """The parent's side: `children` child processes (one per compile thread, so that one
    constraint's check never delays another's), each started when first needed, killed and
    started again when a check outlasts CHECK_S or it dies."""

    def __init__(self, tokenizer_text: str, vocab_size: int, eos_ids: list[int], children: int = 2):
        hello = (json.dumps({"tokenizer": tokenizer_text, "vocab_size": vocab_size, "eos": eos_ids}) + "\n").encode()
        self._all = [_Child(hello) for _ in range(children)]
        self._free: queue.Queue[_Child] = queue.Queue()
        for child in self._all:
            self._free.put(child)

    @property
    def starts(self) -> int:
        """Child processes started so far (diagnostics, tests)."""
        return sum(child.starts for child in self._all)

    def check(self, constraint: Constraint) -> None:
        """Return when a child compiled `constraint` and walked its masks within the limits;
        InvalidRequest otherwise (the library's own refusal, too long, or the child died)."""
        child = self._free.get()
        try:
            child.check(constraint)
        finally:
            self._free.put(child)

    @property
    def starting(self) -> bool:
        """Whether a child is starting now (a check waiting for it is not its constraint's fault)."""
        return any(child.starting for child in self._all)

    def close(self) -> None:
        for child in self._all:
            child.stop(closed=True)


class _Child:
    def __init__(self, hello: bytes):
        self._hello = hello
        self._process: subprocess.Popen | None = None
        self._pending = b""  # bytes read past the last answer's line (none, in practice)
        self._lock = threading.Lock()
        self.starts = 0
        self.checking: Constraint | None = None  # the constraint the child is checking now
        self.starting = False
        self._closed = False
        self._finalizer = weakref.finalize(self, _kill, [None])

    def check(self, constraint: Constraint) -> None:
        with self._lock:
            process = self._started()
            answer, died = None, False
            self.checking = constraint
            try:
                request = {"kind": constraint.kind, "spec": constraint.spec, "steps": CHECK_STEPS, "step_s": CHECK_MASK_S}
                process.stdin.write((json.dumps(request) + "\n").encode())
                process.stdin.flush()
                answer = self._line(process, time.monotonic() + CHECK_S)
            except (OSError, EOFError):  # the child is gone: it died on this constraint
                died = True
            except BaseException:  # anything else: the child's state is unknown, it goes
                self._stop()
                raise
            finally:
                self.checking = None
            if answer is None:
                self._stop()
                self._restart_soon()
                if not died:
                    log.warning("structured output: a %s outlasted its %g s check; its child process was stopped",
                                constraint.kind, CHECK_S)
                    raise invalid(f"the {constraint.kind} did not compile and take its first masks within {CHECK_S:g} s",
                                  reason="GRAMMAR_TOO_COMPLEX")
                log.warning("structured output: the library's child process died on a %s (exit %s)", constraint.kind,
                            process.returncode)
                raise invalid(f"the structured-output library failed on this {constraint.kind} (its process ended)")
        reply = json.loads(answer)
        if "error" in reply:
            raise invalid(str(reply["error"])[:400], reason=reply.get("reason") or "INVALID_GRAMMAR")

    def stop(self, closed: bool = False) -> None:
        with self._lock:
            self._closed = self._closed or closed
            self._stop()

    def _restart_soon(self) -> None:
        """Start the next child now, in the background, so that the next constraint does not
        wait for it (the lock is taken when this one's check has let it go)."""
        def start() -> None:
            with self._lock:
                if self._closed:
                    return
                try:
                    self._started()
                except Exception:  # noqa: BLE001 - the next check starts it, or says why it cannot
                    log.exception("structured output: restarting the checking process failed")
        threading.Thread(target=start, name="loramux-grammar-check-start", daemon=True).start()

    def _started(self) -> subprocess.Popen:
        if self._process is not None and self._process.poll() is None:
            return self._process
        self._stop()
        if self._closed:
            raise invalid("structured output is stopping with its engine", reason="STRUCTURED_OUTPUT_UNAVAILABLE")
        self.starting = True
        try:
            return self._start()
        finally:
            self.starting = False

    def _start(self) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-m", "loramux.server.engine.grammar_check"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
        self._process, self._pending = process, b""
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _kill, [process])
        self.starts += 1
        try:
            process.stdin.write(self._hello)
            process.stdin.flush()
            ready = self._line(process, time.monotonic() + START_S)
        except (OSError, EOFError):
            ready = None
        except BaseException:
            self._stop()
            raise
        if ready is None or json.loads(ready).get("ready") is not True:
            self._stop()
            raise invalid("structured output's checking process did not start; retry shortly",
                          reason="STRUCTURED_OUTPUT_UNAVAILABLE")
        return process

    def _line(self, process: subprocess.Popen, deadline: float) -> bytes | None:
        """The child's next line; None at the deadline, EOFError if it ended first."""
        fd = process.stdout.fileno()
        with selectors.DefaultSelector() as selector:  # (not select(): descriptors past 1024)
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    return None
                data = os.read(fd, 1 << 16)
                if not data:
                    raise EOFError("the checking process ended")
                self._pending += data
        line, _, self._pending = self._pending.partition(b"\n")
        return line

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            _kill([process])


def _kill(holder: list) -> None:
    child = holder[0]
    if child is None:
        return
    for stream in (child.stdin, child.stdout):
        try:
            stream.close()
        except OSError:
            pass
    if child.poll() is None:
        child.kill()
    child.wait()


# -- the child -----------------------------------------------------------------------------


def _serve() -> None:
    from loramux.server.engine.constraints import compile_matcher, library_tokenizer
    from loramux.server.errors import InvalidRequest

    inp, out = sys.stdin.buffer, sys.stdout.buffer

    def answer(value: dict) -> None:
        out.write((json.dumps(value) + "\n").encode())
        out.flush()

    hello = json.loads(inp.readline())
    state = library_tokenizer(hello["tokenizer"], hello["vocab_size"], hello["eos"])
    answer({"ready": True})
    for line in inp:
        request = json.loads(line)
        try:
            _walk(compile_matcher(state, Constraint(request["kind"], request["spec"])), request, hello["eos"])
            answer({"ok": True})
        except InvalidRequest as e:
            answer({"error": e.message, "reason": e.reason})
        except Exception as e:  # noqa: BLE001 - a library error is the constraint's
            answer({"error": f"the {request['kind']} could not be compiled ({type(e).__name__}: {str(e)[:200]})"})


def _watch_parent(parent: int) -> None:
    """End this process when the server's is gone (a server killed outright never closes the
    pipe's other end if a process it forked still holds it)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


def _walk(matcher, request: dict, eos: list[int]) -> None:
    """Take the matcher's masks along three paths, `steps` masks each at most, each next token
    the lowest the mask allows, the highest, or one drawn at random (a fixed seed), the end
    tokens aside: InvalidRequest when a mask takes over `step_s` or the library fails. The
    first mask builds the lexer; a grammar may also hide a slow step behind a first choice.
    (Some paths, not every path: the engine's own step wait covers the rest.)"""
    import random

    from loramux.server.errors import InvalidRequest

    kind, ends, rng = request["kind"], set(eos), random.Random(0)
    choosers = (lambda allowed: allowed[0], lambda allowed: allowed[-1], rng.choice)
    for path, choose in enumerate(choosers):
        walker = matcher.deep_copy() if path < len(choosers) - 1 else matcher
        for step in range(request["steps"]):
            started = time.perf_counter()
            mask = walker.compute_bitmask()
            seconds = time.perf_counter() - started
            if walker.is_error():
                raise InvalidRequest(f"the {kind} failed at step {step + 1}: {walker.get_error().strip()[:300]}",
                                     reason="INVALID_GRAMMAR")
            if seconds > request["step_s"]:
                raise InvalidRequest(f"the {kind} took {seconds:.2f} s for one token's mask (step {step + 1}), more "
                                     f"than the {request['step_s']:g} s this server allows", reason="GRAMMAR_TOO_COMPLEX")
            allowed = [t for t in _allowed(mask) if t not in ends]
            if not allowed or walker.is_stopped() or not walker.consume_token(choose(allowed)):
                break


def _allowed(mask: bytes) -> list[int]:
    """The token ids a bitmask allows (32-bit little-endian words), in order."""
    out = []
    for offset in range(0, len(mask), 4):
        word = int.from_bytes(mask[offset:offset + 4], "little")
        while word:
            out.append(offset * 8 + (word & -word).bit_length() - 1)
            word &= word - 1
    return out


def main() -> None:
    threading.Thread(target=_watch_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):  # a lower hard limit already: it stays
        pass
    threading.stack_size(CHILD_STACK_BYTES)
    worker = threading.Thread(target=_serve, name="loramux-grammar-check")
    worker.start()
    worker.join()


if __name__ == "__main__":
    main()
