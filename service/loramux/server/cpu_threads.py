"""Which threads may use every CPU core for torch: the engine's, and nobody else's for long.

torch's CPU kernels run on OpenMP (libgomp in the Linux wheels). OpenMP gives every thread
that starts a parallel region its own team of worker threads, and keeps that team, idle,
for as long as the thread lives. Once the process holds more OpenMP threads than there are
cores, libgomp stops spinning between parallel regions: every region then wakes its workers
through the kernel, and a decode step runs hundreds of regions. Measured here (2 cores, a
hidden-512 Llama, 16 rows): one step took 9-10 ms on the engine thread alone and 12-15 ms
once a helper thread had run one large tensor operation, for the rest of the process's life.

So the engine thread keeps the full thread count, and:

- helper threads that live long and may touch tensors (adapter reads, merges, the gRPC
  layer's pools) call `limit_to_one_thread` first: their torch work runs single-threaded
  and never creates a team;
- start-up work that wants every core (loading the model, restoring adapters) runs in
  `in_own_thread`: a fresh thread whose team goes away when it ends.

With a torch built on another threading backend (a shared native pool) there are no
per-thread teams and `limit_to_one_thread` does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")


def _omp_set_num_threads() -> Callable[[int], None] | None:
    try:
        return ctypes.CDLL(None).omp_set_num_threads
    except (AttributeError, OSError):
        return None


_SET = _omp_set_num_threads() if "OpenMP" in torch.__config__.parallel_info() else None


def limit_to_one_thread() -> None:
    """Make this thread's torch CPU work single-threaded (a ThreadPoolExecutor initializer)."""
    if _SET is None:
        return
    torch.get_num_threads()  # torch sets this thread's OpenMP count on first use: let it, then override
    _SET(1)


def in_own_thread(fn: Callable[..., T], *args, name: str = "loramux-startup") -> T:
    """Run `fn(*args)` on a fresh thread that ends with it, and return its result (or raise)."""
    outcome: list = []

    def target() -> None:
        try:
            outcome.append((True, fn(*args)))
        except BaseException as e:  # handed to the caller
            outcome.append((False, e))

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
