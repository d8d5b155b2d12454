"""Adapters by name, per tenant: registration, replacement, lookup and listing.

Each registration gets a fresh `uid`; the tiered cache and the engine work with uids only.
Replacing or unloading an adapter gives its name to a new record (or to nobody) at once,
while requests already running keep the old weights until they finish.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path

from loramux.server.adapters.cache import TieredAdapterCache, Tier
from loramux.server.adapters.checkpoint import AdapterSpec, BaseModelView, read_checkpoint
from loramux.server.adapters.sources import ANYWHERE, SourceAllowance, resolve_source
from loramux.server.adapters.weights import AdapterWeights
from loramux.server.errors import AdapterChanged, AdapterExists, AdapterNotFound, InvalidRequest
from loramux.server.settings import Settings
from loramux.server.state import SavedAdapter, StateStore

_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
MAX_ID_LENGTH = 128


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
    pinned: bool = False
    last_used: float | None = None  # epoch seconds
    use_count: int = 0


def validate_adapter_id(adapter_id: str, field: str = "adapter_id") -> None:
    if not adapter_id:
        raise InvalidRequest(f"{field} is required", field=field, reason="ADAPTER_ID_INVALID")
    if len(adapter_id) > MAX_ID_LENGTH or not set(adapter_id) <= _ID_CHARS or adapter_id[0] in "-.":
        shown = adapter_id if len(adapter_id) <= 40 else adapter_id[:37] + "..."
        raise InvalidRequest(
            f"{field} {shown!r} must be 1-{MAX_ID_LENGTH} characters of letters, digits, '-', '_' and '.', "
            "not starting with '-' or '.'",
            field=field,
            reason="ADAPTER_ID_INVALID",
        )


class AdapterRegistry:
    def __init__(
        self,
        settings: Settings,
        base: BaseModelView,
        cache_for: Callable[[Callable[[int], AdapterWeights]], TieredAdapterCache],
        store: StateStore | None = None,
    ):
        """`cache_for(reload)` builds the tiered cache given this registry's reload function.
        With a `store`, every registration, pin and unload is written to it."""
        self._settings = settings
        self._store = store
        self._base = base
        self._lock = threading.RLock()
        self._by_name: dict[tuple[str, str], AdapterRecord] = {}
        self._by_uid: dict[int, AdapterRecord] = {}
        self._name_locks: dict[tuple[str, str], threading.Lock] = {}
        self._uids = itertools.count(1)
        self.cache: TieredAdapterCache = cache_for(self._reload)

    def load(
        self, tenant: str, adapter_id: str, source: str, revision: str = "", replace: bool = False,
        allowed: SourceAllowance = ANYWHERE,
    ) -> tuple[AdapterRecord, bool]:
        """Register an adapter (reading and validating its files). Returns (record, created).

        Loading the same id from the same source again returns the existing record, unless
        `replace` asks for the files to be read again."""
        validate_adapter_id(adapter_id)
        key = (tenant, adapter_id)
        with self._lock:
            name_lock = self._name_locks.setdefault(key, threading.Lock())
        with name_lock:  # concurrent loads of one name: one reads, the others see its result
            existing = self._by_name.get(key)
            if existing is not None and not replace:
                if existing.source != source or (revision and revision != existing.revision and source.startswith("hf://")):
                    raise AdapterExists(
                        f"adapter {adapter_id!r} is already loaded from {existing.source!r}; "
                        "set replace to load it from another source",
                        field="adapter_id",
                        existing_source=existing.source,
                    )
                return existing, False
            resolved = resolve_source(source, revision, self._settings, allowed)
            spec, weights = read_checkpoint(resolved.directory, self._base, root=resolved.root)
            record = AdapterRecord(
                uid=next(self._uids),
                tenant=tenant,
                adapter_id=adapter_id,
                source=source,
                revision=resolved.hub_revision or spec.content_hash,
                directory=resolved.directory,
                root=resolved.root,
                spec=spec,
                load_time=time.time(),
            )
            with self._lock:
                self.cache.add(record.uid, weights)
                self._by_uid[record.uid] = record
                self._by_name[key] = record
            if existing is not None:
                self._forget(existing)
            self._save(record)
            return record, True

    def set_pinned(self, record: AdapterRecord) -> None:
        record.pinned = True
        self._save(record)

    def _save(self, record: AdapterRecord) -> None:
        if self._store is None:
            return
        with self._lock:
            if self._by_name.get((record.tenant, record.adapter_id)) is not record:
                return  # replaced or unloaded meanwhile: its successor's row stands
            self._store.put_adapter(
                SavedAdapter(record.tenant, record.adapter_id, record.source, record.revision, record.pinned, record.load_time)
            )

    def unload(self, tenant: str, adapter_id: str) -> AdapterRecord:
        record = self.get(tenant, adapter_id)
        with self._lock:
            current = self._by_name.get((tenant, adapter_id)) is record
            self._forget(record)
            if current and self._store is not None:
                self._store.delete_adapter(tenant, adapter_id)
        return record

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
