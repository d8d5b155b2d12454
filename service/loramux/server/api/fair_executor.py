"""A thread pool that takes turns between tenants.

The front door's blocking work (tokenizing and queueing a generate call, reading an adapter's
files) runs on a few threads. With one FIFO queue in front of them, a tenant that sends 500
calls at once puts every other tenant's next call behind all 500: measured at the default
flags, a calm tenant's call waited 0.5 s for its turn to be tokenized while the engine itself
admitted it within milliseconds. Here each tenant has its own FIFO and the threads serve the
tenants with work in turn, so another tenant's call waits for at most one call per tenant
ahead of it, not for the whole flood.
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
        with self._lock:
            while not self._turns:
                if self._closed:
                    return None
                self._lock.wait()
            tenant = self._turns.popleft()
            queue = self._queues[tenant]
            item = queue.popleft()
            if queue:
                self._turns.append(tenant)  # to the back of the turns
            else:
                del self._queues[tenant]
            return item

    def _work(self) -> None:
        if self._initializer is not None:
            self._initializer()
        while (item := self._next()) is not None:
            future, fn = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 (handed to whoever awaits the future)
                future.set_exception(e)
