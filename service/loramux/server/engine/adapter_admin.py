"""Adapter administration on behalf of callers: load (register), warm, pin.

Reading and validating files happens on the caller's thread (a pool of the gRPC layer); only
placing an adapter in a slot runs on the engine thread, between passes (`call_on_engine`).
With no slot free, warm and pin retry for a bounded time and then answer NO_SLOT_AVAILABLE
with a retry hint; the registration stands.

A tenant's quotas of registered and pinned adapters are checked before any file is read, and
a load that passes holds its place until it ends: loads in flight count against the quota, so
concurrent loads on one replica cannot overshoot it together. Across replicas sharing a
store, a load that registered a new name counts the store's registrations again afterwards
and withdraws its own if the tenant went over (racing replicas may then both withdraw; they
never both stay). Pins are bounded so that room for one unpinned
adapter of any size always remains (a slot, and the bytes of a max-rank adapter); the cache
checks that under its lock, so concurrent pins cannot overshoot.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from loramux.server.adapters.budget import AdapterBudget
from loramux.server.adapters.cache import AdapterGone, NoSlotAvailable
from loramux.server.adapters.registry import AdapterRecord, AdapterRegistry
from loramux.server.adapters.sources import ANYWHERE, SourceAllowance
from loramux.server.errors import AdapterNotFound, LoramuxError, NoSlotFree, PinLimit
from loramux.server.names import refuse_model_name
from loramux.server.tenancy.quotas import UNLIMITED, Quotas, refuse
from loramux.server.settings import Settings

_SLOT_RETRY_S = 0.05  # warm/pin: how often to look for a free slot again


class AdapterAdmin:
    def __init__(
        self,
        settings: Settings,
        registry: AdapterRegistry,
        budget: AdapterBudget,
        call_on_engine: Callable[[Callable[[], object]], Future],
        retry_hint: Callable[[], float],
        refusal: Callable[[], LoramuxError | None],
        cut: Callable[[], LoramuxError | None],
        quotas: Callable[[str], Quotas] = lambda tenant: UNLIMITED,
        sources: Callable[[str], SourceAllowance] = lambda tenant: ANYWHERE,
    ):
        """`refusal()`: an error when new work is refused (draining); `cut()`: an error once
        waiting work must end (shutdown past its grace period)."""
        self._settings = settings
        self._registry = registry
        self._cache = registry.cache
        self._max_pinned_bytes = budget.max_pinned_bytes
        self._call_on_engine = call_on_engine
        self._retry_hint = retry_hint
        self._refusal = refusal
        self._cut = cut
        self._quotas = quotas
        self._sources = sources
        self._tenant_locks: dict[str, threading.Lock] = {}  # tenants with quotas only (a bounded set)
        self._loading: Counter[tuple[str, str]] = Counter()  # (tenant, id) -> loads in flight of a name not yet registered
        self._pinning: Counter[str] = Counter()  # tenant -> loads in flight that will pin a new adapter
        self._locks_lock = threading.Lock()

    def load(
        self,
        tenant: str,
        adapter_id: str,
        source: str,
        revision: str = "",
        pin: bool = False,
        warm: bool = False,
        replace: bool = False,
        wait_s: float | None = None,
    ) -> AdapterRecord:
        """Register (read, validate) an adapter; with pin or warm, also put it in a slot now,
        waiting at most `wait_s` (default `slot_wait_s`) for room. If none frees up the
        registration stands and NO_SLOT_AVAILABLE (retriable) is raised. Blocking: call it off
        the event loop."""
        refused = self._refusal()
        if refused is not None:
            raise refused
        refuse_model_name(adapter_id, self._settings.model_names)
        new_pin = pin and not self._pinned_already(tenant, adapter_id, source, replace)
        with self._held_quota(tenant, adapter_id, new_pin) as adds_name:
            if new_pin:
                self._check_pin_room()  # refuse before reading anything (the cache checks again, atomically)
            record, created = self._registry.load(tenant, adapter_id, source, revision, replace, self._sources(tenant))
            if adds_name and created and self._registry.shared:
                self._recount_shared(tenant, adapter_id)
            if pin or warm:
                self._warm(record, pin, self._settings.slot_wait_s if wait_s is None else wait_s)
        return record

    @contextlib.contextmanager
    def _held_quota(self, tenant: str, adapter_id: str, new_pin: bool) -> Iterator[bool]:
        """Check the tenant's quotas of registered and pinned adapters, counting this replica's
        loads in flight, and hold this load's place until it ends. Yields whether the load adds
        a name the tenant has not registered."""
        quotas = self._quotas(tenant)
        if quotas.adapters is None and quotas.pinned is None:
            yield False
            return
        key = (tenant, adapter_id)
        with self._tenant_lock(tenant):
            records = self._registry.registered(tenant)  # every replica's, with a shared store
            names = {r.adapter_id for r in records}
            loading = {a for (t, a), n in self._loading.items() if t == tenant and n > 0} - names
            adds_name = adapter_id not in names
            counted = len(names | loading)
            if quotas.adapters is not None and adds_name and adapter_id not in loading and counted >= quotas.adapters:
                being = f" and {len(loading)} being loaded" if loading else ""
                raise refuse(tenant, "adapters", quotas.adapters, counted, f"{len(names)} adapters registered{being}")
            pinned = sum(r.pinned for r in records) + self._pinning[tenant]
            if new_pin and quotas.pinned is not None and pinned >= quotas.pinned:
                raise refuse(tenant, "pinned", quotas.pinned, pinned, f"{pinned} adapters pinned or being pinned")
            if adds_name:
                self._loading[key] += 1
            self._pinning[tenant] += new_pin
        try:
            yield adds_name
        finally:
            with self._tenant_lock(tenant):
                if adds_name:
                    self._loading[key] -= 1
                    if self._loading[key] <= 0:
                        del self._loading[key]
                self._pinning[tenant] -= new_pin
                if self._pinning[tenant] <= 0:
                    del self._pinning[tenant]

    def _tenant_lock(self, tenant: str) -> threading.Lock:
        with self._locks_lock:
            return self._tenant_locks.setdefault(tenant, threading.Lock())

    def _recount_shared(self, tenant: str, adapter_id: str) -> None:
        """After registering a new name in a shared store: if loads on other replicas took the
        tenant over its quota meanwhile, withdraw this registration and refuse."""
        limit = self._quotas(tenant).adapters
        if limit is None:
            return
        registered = len(self._registry.registered(tenant))
        if registered > limit:
            with contextlib.suppress(AdapterNotFound):
                self._registry.unload(tenant, adapter_id)
            raise refuse(tenant, "adapters", limit, registered - 1,
                         f"{registered - 1} adapters registered (others were registered on other replicas meanwhile)")

    def pin_registered(self, record: AdapterRecord) -> None:
        """Pin an adapter pinned on another replica, if there is room now (no waiting)."""
        self._check_pin_room()
        self._warm(record, pin=True, wait_s=0.0)

    def _pinned_already(self, tenant: str, adapter_id: str, source: str, replace: bool) -> bool:
        """Pinning again what is pinned is a no-op, never a pin-limit refusal."""
        try:
            record = self._registry.get(tenant, adapter_id)
        except LoramuxError:
            return False
        return record.pinned and record.source == source and not replace

    def _check_pin_room(self) -> None:
        full_bytes = self._cache.pinned_bytes() >= self._max_pinned_bytes
        if self._cache.pinned_count() >= self._settings.adapter_slots - 1 or full_bytes:
            raise self._pin_limit()

    def _pin_limit(self) -> PinLimit:
        return PinLimit(
            f"{self._cache.pinned_count()} adapters ({self._cache.pinned_bytes()} bytes) are pinned; room for one "
            "unpinned adapter of any size must stay (a slot, and the bytes of a max_lora_rank adapter). Unpin one, "
            "or serve with more --adapter-slots or --adapter-memory-mib",
            pinned=self._cache.pinned_count(),
            adapter_slots=self._settings.adapter_slots,
        )

    def _warm(self, record: AdapterRecord, pin: bool, wait_s: float) -> None:
        """Put a registered adapter in a slot (and pin it), retrying until `wait_s` passes."""
        deadline = time.monotonic() + wait_s
        while True:
            cut = self._cut()
            if cut is not None:  # shutdown past its grace period
                raise cut
            if not self._registry.is_live(record.uid):
                raise AdapterNotFound(f"adapter {record.adapter_id!r} was unloaded or replaced meanwhile", field="adapter_id")
            self._cache.ensure_in_memory(record.uid)
            if self._call_on_engine(lambda: self._place(record, pin)).result():
                return
            if time.monotonic() >= deadline:
                raise NoSlotFree(
                    f"adapter {record.adapter_id!r} is registered, but no room became free within {wait_s:.1f}s "
                    "(every slot or byte is used by running requests or pinned); it will be placed on first use, "
                    "or retry warm/pin later",
                    retry_after_s=max(self._retry_hint(), 0.1),
                    adapter_slots=self._settings.adapter_slots,
                )
            time.sleep(_SLOT_RETRY_S)

    def _place(self, record: AdapterRecord, pin: bool) -> bool:
        """Engine thread: into a slot and, with pin, pinned. False when there is no room now."""
        try:
            self._cache.acquire(record.uid)
        except (NoSlotAvailable, KeyError, AdapterGone):  # no room; evicted to disk again; unloaded: retry or report
            return False
        try:
            if pin:
                if not self._cache.pin(record.uid, self._settings.adapter_slots - 1, self._max_pinned_bytes):
                    raise self._pin_limit()
                self._registry.set_pinned(record)
        except AdapterGone:  # unloaded or replaced between acquire and pin: the caller reports it
            return False
        finally:
            self._cache.release(record.uid)
        return True
