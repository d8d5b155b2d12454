"""Adapters by name, per tenant: registration, replacement, lookup and listing.

Each registration gets a fresh `uid`; the tiered cache and the engine work with uids only.
Replacing or unloading an adapter gives its name to a new record (or to nobody) at once,
while requests already running keep the old weights until they finish.

With a store (registrations.py) the store holds the names and this registry holds what this
replica has read of them: a load checks the store first and writes it before serving, a name
registered on another replica is read on first use (`find`; or by the next `sync` when it is
pinned), and a name unloaded or replaced elsewhere is followed by `sync`
(engine/registry_sync.py). A replica so holds what it serves, not the whole store.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loramux.server.adapters.cache import TieredAdapterCache, Tier
from loramux.server.adapters.checkpoint import AdapterSpec, BaseModelView, read_checkpoint
from loramux.server.adapters.objects import ObjectStores
from loramux.server.adapters.sources import (
    ANYWHERE, HUB_PREFIX, SourceAllowance, resolve_source, source_kind,
)
from loramux.server.lora.weights import AdapterWeights
from loramux.server.cpu_threads import limit_to_one_thread
from loramux.server.errors import AdapterChanged, AdapterExists, AdapterNotFound, LoramuxError
from loramux.server.names import validate_adapter_id  # noqa: F401 (re-exported)
from loramux.server.store.registrations import Registrations
from loramux.server.settings import Settings
from loramux.server.store.state import SavedAdapter

_COMMIT = re.compile(r"[0-9a-f]{40}")
MISS_TTL_S = 1.0  # with a store: a name it did not hold is not looked up again for this long (a request storm)
MAX_MISSES = 10_000
SYNC_READERS = 4  # registrations a sync pass reads at once (start-up, or a burst registered elsewhere)


@dataclasses.dataclass(eq=False)
class AdapterRecord:
    uid: int
    tenant: str
    adapter_id: str
    source: str
    revision: str  # Hub commit sha, or the content hash of local files
    directory: Path
    root: Path  # the directory every file read for it must resolve inside
    spec: AdapterSpec
    load_time: float  # epoch seconds
    generation: str = ""  # the registration's generation (registrations.py): new at each load or replace
    pinned: bool = False
    last_used: float | None = None  # epoch seconds
    use_count: int = 0


class AdapterRegistry:
    def __init__(
        self,
        settings: Settings,
        base: BaseModelView,
        cache_for: Callable[[Callable[[int], AdapterWeights]], TieredAdapterCache],
        store: Registrations | None = None,
        objects: ObjectStores | None = None,
        allowance: Callable[[str], SourceAllowance] = lambda tenant: ANYWHERE,
    ):
        """`cache_for(reload)` builds the tiered cache given this registry's reload function.
        With a `store`, registrations live there (shared by every replica that uses it): a
        name registered there is this replica's to serve, read on first use or by `sync`.
        `objects` fetches object-storage sources."""
        self._settings = settings
        self._store = store
        self._objects = objects
        self._base = base
        self._lock = threading.RLock()
        self._by_name: dict[tuple[str, str], AdapterRecord] = {}
        self._by_uid: dict[int, AdapterRecord] = {}
        self._name_locks: dict[tuple[str, str], threading.Lock] = {}
        self._uids = itertools.count(1)
        self._failed: dict[tuple[str, str, str], float] = {}  # (tenant, id, generation) -> when it failed to be read
        self._misses: OrderedDict[tuple[str, str], float] = OrderedDict()  # names the store did not hold, and when
        self.allowance = allowance  # where each tenant's adapters may come from (the keys file's)
        self.on_read: Callable[[str, float], None] = lambda source_kind, seconds: None  # telemetry
        self.cache: TieredAdapterCache = cache_for(self._reload)

    @property
    def shared(self) -> bool:
        return self._store is not None

    def skipped(self) -> list[tuple[str, str]]:
        """Stored registrations skipped as not written by this server as they are, and why."""
        return self._store.skipped.items() if self._store is not None else []

    def _name_lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._lock:
            return self._name_locks.setdefault(key, threading.Lock())

    def load(
        self, tenant: str, adapter_id: str, source: str, revision: str = "", replace: bool = False,
        allowed: SourceAllowance = ANYWHERE,
    ) -> tuple[AdapterRecord, bool]:
        """Register an adapter (reading and validating its files). Returns (record, created).

        Loading the same id from the same source again returns the existing record, unless
        `replace` asks for the files to be read again. With a store, the store's registration
        is the existing one, wherever it was made."""
        validate_adapter_id(adapter_id)
        key = (tenant, adapter_id)
        with self._name_lock(key):  # concurrent loads of one name: one reads, the others see its result
            existing = self._by_name.get(key)
            if not replace:
                if self._store is not None:
                    saved = self._store.get(tenant, adapter_id)
                    if saved is not None:
                        _check_same(adapter_id, saved.source, source, revision, saved.revision)
                        if existing is not None and existing.generation == saved.generation:
                            return existing, False
                        return self._adopt(saved, allowed), False
                elif existing is not None:
                    _check_same(adapter_id, existing.source, source, revision, existing.revision)
                    return existing, False
            record, weights = self._read(tenant, adapter_id, source, revision, allowed, uuid.uuid4().hex, time.time())
            created = True
            if self._store is not None:
                try:
                    if replace:
                        self._store.put(_saved(record))
                    else:
                        winner = self._store.create(_saved(record))
                        if winner.generation != record.generation:  # another replica registered the name meanwhile
                            _check_same(adapter_id, winner.source, source, revision, winner.revision)
                            if winner.revision != record.revision:
                                raise AdapterChanged("another replica registered this name from the same source with "
                                                     "other files at the same moment; load it again")
                            record.generation, record.load_time = winner.generation, winner.load_time
                            created = False
                except BaseException:
                    self._discard(record)
                    raise
            self._install(record, weights)
            return record, created

    def _read(
        self, tenant: str, adapter_id: str, source: str, revision: str, allowed: SourceAllowance, generation: str,
        load_time: float,
    ) -> tuple[AdapterRecord, AdapterWeights]:
        started = time.perf_counter()
        resolved = resolve_source(source, revision, self._settings, allowed, self._objects, tenant,
                                  max_bytes=self._base.budget.max_download_bytes)
        try:
            spec, weights = read_checkpoint(resolved.directory, self._base, root=resolved.root)
        except BaseException:
            self._release_copy(resolved.directory)
            raise
        self.on_read(source_kind(source), time.perf_counter() - started)
        return AdapterRecord(
            uid=next(self._uids),
            tenant=tenant,
            adapter_id=adapter_id,
            source=source,
            revision=resolved.hub_revision or spec.content_hash,
            directory=resolved.directory,
            root=resolved.root,
            spec=spec,
            load_time=load_time,
            generation=generation,
        ), weights

    def _adopt(self, saved: SavedAdapter, allowed: SourceAllowance) -> AdapterRecord:
        """Read a registration made earlier or on another replica, at the revision it recorded
        (held: the name's lock). ADAPTER_FILES_CHANGED if the files are no longer those."""
        hub = saved.source.startswith(HUB_PREFIX)
        record, weights = self._read(saved.tenant, saved.adapter_id, saved.source, saved.revision if hub else "", allowed,
                                     saved.generation, saved.load_time)
        if record.revision != saved.revision:
            self._discard(record)
            raise AdapterChanged(
                f"the files of adapter {saved.adapter_id!r} changed since it was registered ({saved.revision[:19]}, now "
                f"{record.revision[:19]}); load it again with replace",
                adapter_id=saved.adapter_id,
            )
        self._install(record, weights)
        return record

    def _install(self, record: AdapterRecord, weights: AdapterWeights) -> None:
        key = (record.tenant, record.adapter_id)
        with self._lock:
            self._misses.pop(key, None)
            previous = self._by_name.get(key)
            self.cache.add(record.uid, weights)
            self._by_uid[record.uid] = record
            self._by_name[key] = record
        if previous is not None:
            self._forget(previous)

    def set_pinned(self, record: AdapterRecord) -> None:
        record.pinned = True
        if self._store is not None:
            with self._lock:
                if self._by_name.get((record.tenant, record.adapter_id)) is not record:
                    return  # replaced or unloaded meanwhile: its successor's registration stands
            self._store.update(_saved(record))

    def unload(self, tenant: str, adapter_id: str) -> None:
        """Unregister a name: here at once, and (with a store) on every replica at its next sync."""
        validate_adapter_id(adapter_id)
        key = (tenant, adapter_id)
        with self._name_lock(key):
            record = self._by_name.get(key)
            registered = self._store.get(tenant, adapter_id) is not None if self._store is not None else record is not None
            if not registered:
                if record is not None:  # unloaded on another replica, not yet followed here
                    self._forget(record)
                raise AdapterNotFound(f"no adapter {adapter_id!r} is loaded", field="adapter_id", adapter_id=adapter_id)
            if self._store is not None:
                self._store.delete(tenant, adapter_id)
            if record is not None:
                self._forget(record)

    def find(self, tenant: str, adapter_id: str) -> AdapterRecord:
        """The adapter that serves a request: this replica's, or read now if it was registered
        elsewhere and not yet here. Blocking (it may read files): call it off the event loop."""
        try:
            return self.get(tenant, adapter_id)
        except AdapterNotFound:
            if self._store is None:
                raise
        key = (tenant, adapter_id)
        missed = self._misses.get(key)
        if missed is not None and time.monotonic() - missed < MISS_TTL_S:  # asked again at once: spare the store
            raise AdapterNotFound(f"no adapter {adapter_id!r} is loaded", field="adapter_id", adapter_id=adapter_id)
        with self._name_lock(key):
            record = self._by_name.get(key)
            if record is not None:
                return record
            saved = self._store.get(tenant, adapter_id)
            if saved is None:
                with self._lock:
                    self._misses[key] = time.monotonic()
                    self._misses.move_to_end(key)
                    while len(self._misses) > MAX_MISSES:
                        self._misses.popitem(last=False)
                raise AdapterNotFound(f"no adapter {adapter_id!r} is loaded", field="adapter_id", adapter_id=adapter_id)
            return self._adopt(saved, self.allowance(tenant))

    def has(self, tenant: str, adapter_id: str) -> bool:
        with self._lock:
            return (tenant, adapter_id) in self._by_name

    def registered(self, tenant: str) -> list[SavedAdapter]:
        """The tenant's registrations: the store's, or this replica's without one."""
        if self._store is not None:
            return self._store.all(tenant)
        return [_saved(r) for r in self.list(tenant)]

    def sync(
        self, retry_failed_s: float = 60.0,
    ) -> tuple[list[AdapterRecord], list[AdapterRecord], list[tuple[SavedAdapter, LoramuxError]]]:
        """Follow the store: read again the names held here that were replaced elsewhere, read
        the names pinned elsewhere, forget those unloaded; a name registered elsewhere and not
        used here is not read until a request needs it (`find`). Returns (records to pin: pinned in the store, not here; records read now;
        [(registration, error)] that could not be read). One that failed is tried again after
        `retry_failed_s`. Each change is checked again under its name's lock, so a load racing
        with this pass is never undone by it."""
        if self._store is None:
            return [], [], []
        wanted = {(s.tenant, s.adapter_id): s for s in self._store.all()}
        with self._lock:
            held = dict(self._by_name)
        for key in held.keys() - wanted.keys():
            with self._name_lock(key):
                record = self._by_name.get(key)
                if record is not None and self._store.get(*key) is None:
                    self._forget(record)
        to_pin, read, failed = [], [], []
        now = time.monotonic()
        stale = []
        for key, saved in wanted.items():
            record = held.get(key)
            if record is not None and record.generation == saved.generation:
                if saved.pinned and not record.pinned:
                    to_pin.append(record)
                continue
            if record is None and not saved.pinned:
                continue  # not served here yet: read on first use (find), so start-up and memory do not grow with the store
            if now - self._failed.get((saved.tenant, saved.adapter_id, saved.generation), -math.inf) >= retry_failed_s:
                stale.append(key)
        # Reading is I/O (an object store, the Hub, a network volume) and validation: a start-up
        # or a burst of registrations elsewhere reads several at once.
        if len(stale) > 1:
            with ThreadPoolExecutor(min(SYNC_READERS, len(stale)), thread_name_prefix="loramux-sync",
                                    initializer=limit_to_one_thread) as pool:
                outcomes = list(pool.map(lambda key: self._follow(key, now), stale))
        else:
            outcomes = [self._follow(key, now) for key in stale]
        for outcome in outcomes:
            if outcome is None:
                continue
            record, pinned, error = outcome
            if error is not None:
                failed.append(error)
                continue
            read.append(record)
            if pinned:
                to_pin.append(record)
        self._failed = {m: t for m, t in self._failed.items() if getattr(wanted.get(m[:2]), "generation", None) == m[2]}
        return to_pin, read, failed

    def _follow(self, key: tuple[str, str], now: float):
        """Read the store's current registration of `key` here, under the name's lock. Returns
        None (nothing to do), (record, pinned, None), or (None, False, (registration, error))."""
        with self._name_lock(key):
            current = self._store.get(*key)
            record = self._by_name.get(key)
            if current is None or (record is not None and record.generation == current.generation):
                return None
            try:
                adopted = self._adopt(current, self.allowance(current.tenant))
            except LoramuxError as e:
                self._failed[(current.tenant, current.adapter_id, current.generation)] = now
                if record is not None:  # an older generation: never serve what was replaced
                    self._forget(record)
                return None, False, (current, e)
            return adopted, current.pinned, None

    def get(self, tenant: str, adapter_id: str) -> AdapterRecord:
        validate_adapter_id(adapter_id)
        with self._lock:
            record = self._by_name.get((tenant, adapter_id))
        if record is None:
            raise AdapterNotFound(f"no adapter {adapter_id!r} is loaded", field="adapter_id", adapter_id=adapter_id)
        return record

    def list(self, tenant: str) -> list[AdapterRecord]:
        with self._lock:
            return sorted((r for (t, _), r in self._by_name.items() if t == tenant), key=lambda r: r.adapter_id)

    def is_live(self, uid: int) -> bool:
        with self._lock:
            return uid in self._by_uid

    def current_uid(self, tenant: str, adapter_id: str, uid: int) -> int | None:
        """`uid` while it is registered; else the uid that holds the name now (after a
        replace); None once the name is unloaded."""
        with self._lock:
            if uid in self._by_uid:
                return uid
            record = self._by_name.get((tenant, adapter_id))
            return record.uid if record is not None else None

    def tier(self, record: AdapterRecord) -> Tier:
        return self.cache.tier(record.uid)

    def mark_used(self, uid: int, when: float) -> None:
        with self._lock:
            record = self._by_uid.get(uid)
            if record is not None:
                record.use_count += 1
                record.last_used = when

    def read_weights(self, record: AdapterRecord, dtype=None) -> AdapterWeights:
        """The adapter's weights read from its files, checked unchanged (used by merge)."""
        spec, weights = read_checkpoint(record.directory, self._base, dtype=dtype, root=record.root)
        if spec.content_hash != record.spec.content_hash:
            raise AdapterChanged(
                f"the files of adapter {record.adapter_id!r} changed on disk since it was loaded; "
                "load it again with replace",
                adapter_id=record.adapter_id,
            )
        return weights

    def _reload(self, uid: int) -> AdapterWeights:
        with self._lock:
            record = self._by_uid.get(uid)
        if record is None:
            raise AdapterNotFound("the adapter was unloaded or replaced while it was being read", field="adapter_id")
        return self.read_weights(record)

    def _forget(self, record: AdapterRecord) -> None:
        with self._lock:
            if self._by_name.get((record.tenant, record.adapter_id)) is record:
                del self._by_name[(record.tenant, record.adapter_id)]
            self._by_uid.pop(record.uid, None)
            self.cache.remove(record.uid)
        self._discard(record)

    def _discard(self, record: AdapterRecord) -> None:
        """Drop the local copy of a fetched adapter once no live record reads from it."""
        with self._lock:
            if record.uid in self._by_uid:
                return
        self._release_copy(record.directory)

    def _release_copy(self, directory: Path) -> None:
        if self._objects is None:
            return
        with self._lock:
            if any(r.directory == directory for r in self._by_uid.values()):
                return
            self._objects.release(directory)


def _check_same(adapter_id: str, held_source: str, source: str, revision: str, held_revision: str) -> None:
    """Loading a registered name again (without replace) must name the same source, and for a
    Hub source no other commit (a branch or tag is not resolved again: replace moves a name to
    where a branch points now)."""
    other_commit = bool(_COMMIT.fullmatch(revision)) and revision != held_revision
    if held_source != source or (other_commit and source.startswith(HUB_PREFIX)):
        raise AdapterExists(
            f"adapter {adapter_id!r} is already loaded from {held_source!r}; set replace to load it from another source",
            field="adapter_id",
            existing_source=held_source,
        )


def _saved(record: AdapterRecord) -> SavedAdapter:
    return SavedAdapter(record.tenant, record.adapter_id, record.source, record.revision, record.pinned,
                        record.load_time, record.generation)
