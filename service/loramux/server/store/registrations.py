"""Where adapter registrations live when the server keeps them: the names every replica
serves, with the source and revision each resolved to.

Two backends, one contract:
- `DirectoryRegistrations`: `<state-dir>/adapters/<tenant>/<adapter_id>.json`, written whole
  and renamed into place; changes hold the directory's lock (state.directory_lock), so
  concurrent replicas on one shared volume see each change whole and in one order.
- `ObjectRegistrations`: `<url>/adapters/<tenant>/<adapter_id>.json` in object storage
  (`--registry s3://bucket/prefix`). A new name is created with a conditional write (S3's
  If-None-Match), so two replicas registering one name at once cannot both win; replacing,
  pinning and unloading write last-writer-wins, which the sync loop then spreads.

A registration carries a `generation`, new at each load or replace: a replica holding an
older generation of a name follows the newer one (engine/registry_sync.py).

`all()` runs at every sync pass on every replica, so both backends read again only what
changed since their last listing: a registration is kept with the version its listing gave
(an object's ETag, modification time and size; a file's modification time and size) and
re-read when that changes. A pass over an unchanged registry is one listing, not one read per
adapter.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from loramux.server.errors import SourceUnavailable
from loramux.server.settings import Settings
from loramux.server.store.state import (
    MAX_REGISTRATION_BYTES, BadRecord, SavedAdapter, Skipped, StateStore, directory_lock, read_record, subdirectories,
    write_atomically,
)

log = logging.getLogger(__name__)
READERS = 8  # object-store reads of one listing at once (each waits on the network)


class Registrations(Protocol):
    skipped: Skipped  # stored records that were skipped, and why

    def get(self, tenant: str, adapter_id: str) -> SavedAdapter | None: ...

    def all(self, tenant: str | None = None) -> list[SavedAdapter]:
        """Every registration (of one tenant, when given), oldest first."""

    def create(self, saved: SavedAdapter) -> SavedAdapter:
        """Store `saved` unless the name is registered; returns what is stored now."""

    def put(self, saved: SavedAdapter) -> None:
        """Store `saved` over whatever the name held."""

    def update(self, saved: SavedAdapter) -> bool:
        """Store `saved` only while the name still holds its generation; False if it does not."""

    def delete(self, tenant: str, adapter_id: str, generation: str | None = None) -> None:
        """Remove the name (only while it holds `generation`, when given)."""


def _parse(data: bytes | None, key: str, skipped: Skipped, root: str) -> SavedAdapter | None:
    """The registration stored at `key`, which must be `<root>/<tenant>/<adapter_id>.json` for
    the tenant and id it names; None when there is none, or it is skipped (reported in
    `skipped`)."""
    if data is None:
        return None
    try:
        saved = SavedAdapter.from_json(data)
        if key != f"{root}/{saved.tenant}/{saved.adapter_id}.json":
            raise BadRecord(f"names tenant {saved.tenant!r} and adapter {saved.adapter_id!r}, not the place it lies in")
    except Exception as e:  # noqa: BLE001 (another version's, someone's edit, or an attack: skipped, reported)
        skipped.add(key, str(e) if isinstance(e, BadRecord) else f"not decodable ({type(e).__name__})")
        return None
    skipped.discard(key)
    return saved


class _Seen:
    """The registrations listings last read, by key, with the version each listing gave.
    Shared by the sync thread and callers counting quotas: the held map changes under a lock,
    reads happen outside it."""

    def __init__(self, skipped: Skipped, root: str) -> None:
        self._held: dict[str, tuple[object, SavedAdapter | None]] = {}
        self._lock = threading.Lock()
        self._skipped = skipped
        self._root = root

    def read(self, prefix: str, listed: dict[str, object], read_many) -> list[SavedAdapter]:
        """The registrations of a listing of everything under `prefix`: `listed` maps key ->
        version (None: unknown, always read); `read_many(keys)` returns {key: bytes} for the
        keys it could read (one deleted meanwhile is missing). Held keys under `prefix` that
        the listing no longer shows are forgotten."""
        with self._lock:
            for key in [k for k in self._held if k.startswith(prefix) and k not in listed]:
                del self._held[key]
            known = {k: self._held[k] for k, version in listed.items()
                     if version is not None and self._held.get(k, (None,))[0] == version}
        stale = [k for k in listed if k not in known]
        fresh = read_many(stale) if stale else {}
        found = [saved for _, saved in known.values() if saved is not None]
        with self._lock:
            for key in stale:
                if key in fresh:
                    saved = _parse(fresh[key], key, self._skipped, self._root)
                    self._held[key] = (listed[key], saved)
                    if saved is not None:
                        found.append(saved)
                else:
                    self._held.pop(key, None)
        return sorted(found, key=lambda s: (s.load_time, s.tenant, s.adapter_id))


class DirectoryRegistrations:
    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.skipped = Skipped("a registration")
        self._seen = _Seen(self.skipped, str(directory))

    def _path(self, tenant: str, adapter_id: str) -> Path:
        return self.directory / tenant / f"{adapter_id}.json"  # both validated: letters, digits, '-', '_', '.'

    def _read(self, path: Path) -> bytes | None:
        try:
            return read_record(path, MAX_REGISTRATION_BYTES)
        except BadRecord as e:
            self.skipped.add(str(path), str(e))
            return None

    def get(self, tenant: str, adapter_id: str) -> SavedAdapter | None:
        path = self._path(tenant, adapter_id)
        if path.parent.is_symlink():
            return None
        return _parse(self._read(path), str(path), self.skipped, str(self.directory))

    def all(self, tenant: str | None = None) -> list[SavedAdapter]:
        listed = {}
        folders = [f for f in subdirectories(self.directory) if tenant is None or f.name == tenant]  # no link followed
        for path in (p for folder in folders for p in folder.glob("*.json")):
            if not path.name.startswith("."):
                try:
                    stat = path.lstat()  # a link is listed as itself, and refused when read
                except FileNotFoundError:  # unloaded meanwhile
                    continue
                listed[str(path)] = (stat.st_mtime_ns, stat.st_size, stat.st_ino)

        def read_many(keys):
            return {k: data for k in keys if (data := self._read(Path(k))) is not None}

        return self._seen.read(str(self.directory / tenant) + "/" if tenant else "", listed, read_many)

    def create(self, saved: SavedAdapter) -> SavedAdapter:
        with directory_lock(self.directory):
            current = self.get(saved.tenant, saved.adapter_id)
            if current is not None:
                return current
            write_atomically(self._path(saved.tenant, saved.adapter_id), saved.to_json())
            return saved

    def put(self, saved: SavedAdapter) -> None:
        with directory_lock(self.directory):
            write_atomically(self._path(saved.tenant, saved.adapter_id), saved.to_json())

    def update(self, saved: SavedAdapter) -> bool:
        with directory_lock(self.directory):
            current = self.get(saved.tenant, saved.adapter_id)
            if current is None or current.generation != saved.generation:
                return False
            write_atomically(self._path(saved.tenant, saved.adapter_id), saved.to_json())
            return True

    def delete(self, tenant: str, adapter_id: str, generation: str | None = None) -> None:
        with directory_lock(self.directory):
            current = self.get(tenant, adapter_id)
            if current is not None and (generation is None or current.generation == generation):
                self._path(tenant, adapter_id).unlink(missing_ok=True)


@dataclasses.dataclass
class ObjectRegistrations:
    """Registrations as objects under `url` (s3://bucket/prefix), through fsspec."""

    url: str
    filesystem: object  # an fsspec filesystem for url's protocol

    def __post_init__(self) -> None:
        self._root = self.url.split("://", 1)[1].rstrip("/") + "/adapters"
        self.skipped = Skipped("a registration")
        self._seen = _Seen(self.skipped, self._root)

    def _key(self, tenant: str, adapter_id: str) -> str:
        return f"{self._root}/{tenant}/{adapter_id}.json"

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            return None
        except FileExistsError:
            raise
        except Exception as e:  # network, credentials, throttling: retriable
            raise SourceUnavailable(
                f"the adapter registry at {self.url} could not be {what} ({type(e).__name__}: {str(e)[:200]})",
                retry_after_s=2.0,
            ) from e

    def get(self, tenant: str, adapter_id: str) -> SavedAdapter | None:
        key = self._key(tenant, adapter_id)
        # At most one byte past the bound is fetched: a huge object is refused, not downloaded.
        data = self._call("read", self.filesystem.cat_file, key, start=0, end=MAX_REGISTRATION_BYTES + 1)
        if data is not None and len(data) > MAX_REGISTRATION_BYTES:
            self.skipped.add(key, f"more than the {MAX_REGISTRATION_BYTES} bytes a record may hold")
            return None
        return _parse(data, key, self.skipped, self._root)

    def all(self, tenant: str | None = None) -> list[SavedAdapter]:
        where = f"{self._root}/{tenant}" if tenant else self._root
        infos = self._call("listed", self.filesystem.find, where, refresh=True, detail=True) or {}
        listed = {}
        for key, info in infos.items():
            if not key.endswith(".json") or key.rsplit("/", 1)[-1].startswith("."):
                continue
            if (info.get("size") or 0) > MAX_REGISTRATION_BYTES:
                self.skipped.add(key, f"{info.get('size')} bytes, more than the {MAX_REGISTRATION_BYTES} a record may hold")
                continue
            listed[key] = _object_version(info)

        def read_one(key: str) -> tuple[str, bytes | BaseException | None]:
            if not infos[key].get("size"):
                return key, b""  # empty as listed (a range read of nothing is an error on S3)
            try:  # at most one byte past the bound, whatever the object became since the listing
                return key, self.filesystem.cat_file(key, start=0, end=MAX_REGISTRATION_BYTES + 1)
            except FileNotFoundError:
                return key, None  # deleted since the listing
            except Exception as e:  # noqa: BLE001 (network, credentials: kept unread, read again next pass)
                return key, e

        def read_many(keys):
            found = {}
            with ThreadPoolExecutor(min(READERS, len(keys)), thread_name_prefix="loramux-registry") as pool:
                for key, data in pool.map(read_one, keys):
                    if isinstance(data, BaseException):
                        log.warning("could not read the registration %s (%s: %s)", key, type(data).__name__, str(data)[:200])
                    elif data is not None and len(data) > MAX_REGISTRATION_BYTES:  # grew since the listing
                        self.skipped.add(key, f"more than the {MAX_REGISTRATION_BYTES} bytes a record may hold")
                    elif data is not None:
                        found[key] = data
            return found

        return self._seen.read(f"{where}/", listed, read_many)

    def create(self, saved: SavedAdapter) -> SavedAdapter:
        try:
            self._call("written", self.filesystem.pipe_file, self._key(saved.tenant, saved.adapter_id), saved.to_json(),
                       mode="create")
        except FileExistsError:
            current = self.get(saved.tenant, saved.adapter_id)
            return current if current is not None else self.create(saved)
        return saved

    def put(self, saved: SavedAdapter) -> None:
        self._call("written", self.filesystem.pipe_file, self._key(saved.tenant, saved.adapter_id), saved.to_json())

    def update(self, saved: SavedAdapter) -> bool:
        current = self.get(saved.tenant, saved.adapter_id)
        if current is None or current.generation != saved.generation:
            return False
        self.put(saved)
        return True

    def delete(self, tenant: str, adapter_id: str, generation: str | None = None) -> None:
        current = self.get(tenant, adapter_id)
        if current is not None and (generation is None or current.generation == generation):
            self._call("written", self.filesystem.rm_file, self._key(tenant, adapter_id))


def _object_version(info: dict) -> object:
    """What tells one version of an object from another in a listing (None: nothing does)."""
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    when = info.get("LastModified") or info.get("last_modified") or info.get("mtime") or info.get("updated")
    if tag is None and when is None:
        return None
    return (str(tag), str(when), info.get("size"))


def open_registrations(settings: Settings, state: StateStore | None, objects) -> Registrations | None:
    """The registrations the settings name: `registry` (object storage, through `objects`: the
    adapters' ObjectStores, whose `filesystem(protocol)` gives the fsspec filesystem), else the
    state directory's, else none (nothing is kept)."""
    if settings.registry:
        return ObjectRegistrations(settings.registry.rstrip("/"), objects.filesystem(settings.registry.split("://", 1)[0]))
    if state is not None:
        return DirectoryRegistrations(state.adapters_dir)
    return None
