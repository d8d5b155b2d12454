"""A thread pool that takes turns between tenants.

The front door's blocking work (tokenizing and queueing a generate call, reading an adapter's
files) runs on a few threads. With one FIFO queue in front of them, a tenant that sends 500
calls at once puts every other tenant's next call behind all 500: measured at the default
flags, a calm tenant's call waited 0.5 s for its turn to be tokenized while the engine itself
admitted it within milliseconds. Here each tenant has its own FIFO and the threads serve the
tenants with work in turn, so another tenant's call waits for at most one call per tenant
ahead of it, not for the whole flood. And a tenant may hold all threads but one: slow calls
of one tenant (a Hub download, a wait for a slot) leave a thread for the others.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent.futures import Future


class FairExecutor:
    def __init__(self, threads: int, name: str, initializer: Callable[[], None] | None = None):
        self._lock = threading.Condition()
        self._queues: dict[str, collections.deque] = {}  # tenant -> its waiting (future, fn)
        self._turns: collections.deque[str] = collections.deque()  # tenants with work, next first
        self._closed = False
        self._running: collections.Counter[str] = collections.Counter()  # tenant -> its calls running now
        self._most = max(1, threads - 1)  # calls one tenant may run at once
        self._initializer = initializer
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, tenant: str, fn: Callable[[], object]) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the executor is shut down")
            queue = self._queues.get(tenant)
            if queue is None:
                queue = self._queues[tenant] = collections.deque()
                self._turns.append(tenant)
            queue.append((future, fn))
            self._lock.notify()
        return future

    def shutdown(self) -> None:
        """Stop taking work; what is waiting is cancelled, what runs finishes on its own."""
        with self._lock:
            self._closed = True
            waiting = [future for queue in self._queues.values() for future, _ in queue]
            self._queues.clear()
            self._turns.clear()
            self._lock.notify_all()
        for future in waiting:
            future.cancel()

    def _next(self):
        """(tenant, future, fn) of the next call: the first tenant in turn below its share of
        the threads; None once shut down."""
        with self._lock:
            while True:
                if self._closed and not self._turns:
                    return None
                tenant = next((t for t in self._turns if self._running[t] < self._most), None)
                if tenant is not None:
                    break
                self._lock.wait()
            self._turns.remove(tenant)
            queue = self._queues[tenant]
            future, fn = queue.popleft()
            if queue:
                self._turns.append(tenant)  # to the back of the turns
            else:
                del self._queues[tenant]
            self._running[tenant] += 1
            return tenant, future, fn

    def _work(self) -> None:
        if self._initializer is not None:
            self._initializer()
        while (item := self._next()) is not None:
            tenant, future, fn = item
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 (handed to whoever awaits the future)
                        future.set_exception(e)
            finally:
                with self._lock:
                    self._running[tenant] -= 1
                    if not self._running[tenant]:
                        del self._running[tenant]
                    self._lock.notify_all()
