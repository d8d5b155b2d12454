"""Following the shared registrations: each replica is a cache of what the store holds.

A thread of its own wakes every `registry_sync_s` and
- writes this replica's heartbeat (its lease on the operations it runs);
- reads the registrations: names this replica serves that were replaced on another replica,
  and names pinned on another, are read here (at the revision recorded, checked) and pinned
  where they were pinned; names unloaded elsewhere are forgotten here (running requests keep
  their weights until they finish); a name registered elsewhere and not yet used here is
  read by the first request that names it;
- every few passes, ends operations of replicas whose heartbeat stopped, and every 30 passes
  removes finished operations past `operation_retention_s` (every replica's).

So a change made on one replica reaches every replica within `registry_sync_s` plus the time
to read the adapter's files; a request that arrives first reads it on demand
(AdapterRegistry.find). A registration that cannot be read (files gone or changed, a source
the tenant may no longer use) is reported once per minute in the log and kept: the operator
may put the files back, or unload it. The thread does no work for a request: nothing a caller
sends runs on it, and its reads are bounded like any adapter read.
"""

from __future__ import annotations

import logging
import threading
import time

from loramux.server.errors import LoramuxError
from loramux.server.store.state import LEASE_MISSES

log = logging.getLogger(__name__)
EXPIRE_EVERY_PASSES = 30  # finished operations past their retention are removed every this many passes
RETRY_FAILED_S = 60.0  # a registration that failed to be read, or a pin that found no room, is tried again after this


class RegistrySync:
    def __init__(self, engine):
        self._engine = engine
        self._interval = engine.settings.registry_sync_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pin_failed: dict[int, float] = {}
        self.passes = 0
        self.lease_s = LEASE_MISSES * self._interval

    def start(self) -> None:
        if not self._engine.registry.shared and self._engine.state is None:
            return
        from loramux.server.cpu_threads import limit_to_one_thread

        def loop() -> None:
            limit_to_one_thread()
            while not self._stop.wait(self._interval):
                try:
                    self.run_once()
                except Exception:  # a store that cannot be reached now: try again next time
                    log.exception("following the shared registrations failed; retrying in %.1fs", self._interval)

        self._thread = threading.Thread(target=loop, name="loramux-registry-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)

    def run_once(self, retry_failed_s: float = RETRY_FAILED_S, start_up: bool = False):
        """One pass; returns (records read, [(registration, error)] that could not be read)."""
        engine = self._engine
        if engine.state is not None:
            engine.state.heartbeat()
        to_pin, read, failed = engine.registry.sync(retry_failed_s)
        for saved, error in failed:
            log.warning("%s adapter %r of tenant %r (%s: %s)", "not restored:" if start_up else "could not read",
                        saved.adapter_id, saved.tenant, error.reason, error.message)
        now = time.monotonic()
        for record in to_pin:
            if now - self._pin_failed.get(record.uid, -retry_failed_s) < retry_failed_s:
                continue
            try:
                engine.adapters.pin_registered(record)
            except LoramuxError as e:
                self._pin_failed[record.uid] = now
                log.warning("adapter %r of tenant %r is pinned elsewhere but could not be pinned here (%s)",
                            record.adapter_id, record.tenant, e.reason)
        self.passes += 1
        if engine.state is not None and self.passes % LEASE_MISSES == 0:
            ended = engine.operations.restore(self.lease_s)
            if ended:
                log.warning("ended %d operation(s) of replicas that stopped", ended)
        if engine.state is not None and self.passes % EXPIRE_EVERY_PASSES == 0:
            expired = engine.operations.expire(engine.settings.operation_retention_s)
            if expired:
                log.info("removed %d finished operation(s) past their retention", expired)
        return read, failed
