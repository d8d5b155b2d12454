"""What the server keeps across restarts, in `--state-dir`: adapter registrations and
long-running operations, one small JSON file each.

    <state-dir>/adapters/<tenant>/<adapter_id>.json        a registration (see registrations.py)
    <state-dir>/operations/<tenant>/<kind>-<hex>.json      an operation, with the replica that runs it
    <state-dir>/operations/<tenant>/<kind>-<hex>.cancel    a cancel asked through another replica
    <state-dir>/replicas/<replica>.json                    each replica's heartbeat (its lease)

Files, not a database, so that several replicas may point at one `--state-dir` on a shared
(ReadWriteMany) volume: every file is written whole to a temporary name and renamed into
place (atomic on local disks and on NFS), so no reader ever sees half of one; changes that
read before they write hold the directory's lock (`flock` on `.lock`, which NFSv4 and
CephFS honour). A process killed at any instant leaves the old file or the new one.

Every file here may have been written by another replica, another version, or someone
else with access to the volume, so each is read as hostile: only a regular file (never a
FIFO, a device or a symbolic link, opened without blocking), at most a bound of bytes
(`MAX_REGISTRATION_BYTES`, `MAX_OPERATION_BYTES`), parsed and checked field by field and
against where it lies (a record under one tenant's folder naming another is refused). A
record that fails is skipped and reported (`Skipped`: a log line once per file and reason,
and the list start-up returns), never fatal to start-up or to another tenant's call.

Operations live in their tenant's folder, so one tenant's listing reads only its own; the
registry sync trims finished operations of every replica after `operation_retention_s`, and
keeps at most `MAX_FINISHED_PER_TENANT` finished ones per tenant (see `trim`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import math
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LEASE_MISSES = 5  # a replica whose heartbeat is this many sync intervals old is gone
MAX_REGISTRATION_BYTES = 64 * 1024  # a registration is a few hundred bytes
MAX_OPERATION_BYTES = 1024 * 1024  # an operation's record: progress, an error or a merge's result
MAX_HEARTBEAT_BYTES = 4096
MAX_FINISHED_PER_TENANT = 1000  # finished operations kept per tenant; the oldest go first
TEMPORARY_AGE_S = 3600.0  # a `.tmp-*` file this old was left by a writer that died
OPERATION_FILE = re.compile(r"([a-z]+-[0-9a-f]{32})\.json")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")  # tenants and adapter ids (registry.validate_adapter_id)
REPLICA = re.compile(r"[A-Za-z0-9._-]{1,253}")


class BadRecord(ValueError):
    """A stored file that cannot be a record this server wrote: skipped, with why."""


@dataclasses.dataclass(frozen=True)
class SavedAdapter:
    tenant: str
    adapter_id: str
    source: str
    revision: str  # what the source resolved to: Hub commit sha or content hash
    pinned: bool
    load_time: float
    generation: str = ""  # new at each registration or replacement; replicas compare it to follow changes

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SavedAdapter:
        """BadRecord unless `data` is a registration as this server writes them."""
        body = _json_object(data)
        try:
            saved = cls(_text(body, "tenant"), _text(body, "adapter_id"), _text(body, "source", 4096),
                         _text(body, "revision", 256), body["pinned"], body["load_time"], _text(body, "generation", 64, ""))
        except KeyError as e:
            raise BadRecord(f"no {e.args[0]!r}") from None
        if not isinstance(saved.pinned, bool):
            raise BadRecord("'pinned' is not true or false")
        if not _finite(saved.load_time):
            raise BadRecord("'load_time' is not a number")
        if not (NAME.fullmatch(saved.tenant) and NAME.fullmatch(saved.adapter_id)):
            raise BadRecord("a tenant or adapter id that no load could have written")
        return dataclasses.replace(saved, load_time=float(saved.load_time))


def _json_object(data: bytes) -> dict:
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BadRecord(f"not JSON ({str(e)[:80]})") from None
    if not isinstance(body, dict):
        raise BadRecord(f"a JSON {type(body).__name__}, not an object")
    return body


def _text(body: dict, key: str, limit: int = 128, default: str | None = None) -> str:
    value = body.get(key, default) if default is not None else body[key]
    if not isinstance(value, str) or len(value) > limit:
        raise BadRecord(f"{key!r} is not a string of at most {limit} characters")
    return value


def _finite(value) -> bool:
    """A JSON number that is a time this server could have written: finite, and within 0..1e11
    seconds (an integer of 400 digits would overflow float arithmetic later)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and 0 <= value < 1e11
    except OverflowError:
        return False


def real_dir(path: Path) -> Path:
    """`path` as a real directory of its own, made if missing: a symbolic link (or a file) put
    in its place in a shared folder is removed first, so that nothing written or deleted here
    lands elsewhere through it."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        path.mkdir(parents=True, exist_ok=True)
        return path
    if not stat.S_ISDIR(info.st_mode):
        log.warning("removed %s from the state store: a %s where a directory belongs", path,
                    "symbolic link" if stat.S_ISLNK(info.st_mode) else "file")
        path.unlink(missing_ok=True)
        path.mkdir(exist_ok=True)
    return path


def subdirectories(folder: Path) -> list[Path]:
    """The real directories directly in `folder` (a symbolic link is never followed)."""
    try:
        with os.scandir(folder) as entries:
            return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def write_atomically(path: Path, data: bytes) -> None:
    """Write `path` whole: to a unique temporary name beside it, flushed, then renamed over it.
    Its folder is made a real directory first (real_dir)."""
    real_dir(path.parent)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_record(path: Path, limit: int) -> bytes | None:
    """A stored file's bytes; None when it is not there. BadRecord when it is not a regular
    file (a FIFO is opened without blocking and refused; a symbolic link is not followed) or
    holds more than `limit` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BadRecord("a symbolic link (records are written as regular files)") from None
        raise BadRecord(f"cannot be opened ({e.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadRecord("not a regular file")
        if info.st_size > limit:
            raise BadRecord(f"{info.st_size} bytes, more than the {limit} a record may hold")
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 16, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise BadRecord(f"more than the {limit} bytes a record may hold")
        return b"".join(chunks)
    finally:
        os.close(fd)


class Skipped:
    """Stored records that were skipped, and why: each logged once (per reason), all kept
    for the start-up report and tests, at most `limit` (the newest)."""

    def __init__(self, what: str, limit: int = 10_000):
        self._what = what
        self._limit = limit
        self._items: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, where: str, why: str) -> None:
        with self._lock:
            if self._items.get(where) == why:
                return
            self._items[where] = why
            self._items.move_to_end(where)
            while len(self._items) > self._limit:
                self._items.popitem(last=False)
        log.warning("skipped %s %s: %s", self._what, where, why)

    def discard(self, where: str) -> None:
        with self._lock:
            self._items.pop(where, None)

    def items(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._items.items())


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """Exclusive across processes and hosts that share `directory` (and within this one)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@dataclasses.dataclass(frozen=True)
class OperationRecord:
    name: str  # "operations/<kind>-<hex>"
    tenant: str
    owner: str  # the replica that runs (or ran) it
    body: dict  # what operations.py wrote: metadata, times, done, error, result


class StateStore:
    """The files of one `--state-dir`, as seen by the replica `replica`."""

    def __init__(self, directory: Path, replica: str):
        self.directory = directory
        self.replica = replica
        self.skipped = Skipped("a state file")
        for sub in ("adapters", "operations", "replicas"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        self._migrate_sqlite()
        self._migrate_flat_operations()

    @property
    def adapters_dir(self) -> Path:
        return self.directory / "adapters"

    def close(self) -> None:
        (self.directory / "replicas" / f"{self.replica}.json").unlink(missing_ok=True)

    # -- operations -----------------------------------------------------------------------

    def _operation_path(self, tenant: str, name: str) -> Path:
        # Both checked by their callers: a tenant name and "operations/<kind>-<hex>".
        return self.directory / "operations" / tenant / f"{name.removeprefix('operations/')}.json"

    def put_operation(self, name: str, tenant: str, body: dict) -> None:
        record = {"name": name, "tenant": tenant, "owner": self.replica, "body": body}
        write_atomically(self._operation_path(tenant, name), json.dumps(record).encode())

    def delete_operation(self, tenant: str, name: str) -> None:
        path = self._operation_path(tenant, name)
        path.unlink(missing_ok=True)
        path.with_suffix(".cancel").unlink(missing_ok=True)

    def request_cancel(self, tenant: str, name: str) -> None:
        """Ask the replica that runs `name` to cancel it (it looks about once a second)."""
        write_atomically(self._operation_path(tenant, name).with_suffix(".cancel"), self.replica.encode())

    def cancel_requested(self, tenant: str, name: str) -> bool:
        return self._operation_path(tenant, name).with_suffix(".cancel").exists()

    def operation(self, tenant: str, name: str) -> OperationRecord | None:
        """One operation of `tenant`, from whichever replica ran it (None: none, or skipped)."""
        if not NAME.fullmatch(tenant) or (self.directory / "operations" / tenant).is_symlink():
            return None
        return self._read_operation(self._operation_path(tenant, name), tenant)

    def operations(self, tenant: str | None = None) -> list[OperationRecord]:
        """The operations kept (of one tenant, or all), oldest first; unreadable ones skipped."""
        root = self.directory / "operations"
        if tenant is not None and not NAME.fullmatch(tenant):
            return []
        folders = [p for p in subdirectories(root) if NAME.fullmatch(p.name) and (tenant is None or p.name == tenant)]
        found = []
        for folder in folders:
            for path in _entries(folder):
                if path.name.endswith(".json") and not path.name.startswith("."):
                    record = self._read_operation(path, folder.name)
                    if record is not None:
                        found.append(record)
        return sorted(found, key=lambda r: (r.body["create_time"], r.name))

    def operation_names(self, tenant: str) -> list[str]:
        """The names of the tenant's stored operations, from the folder's listing alone (no file
        is read: a page of a long listing reads only its own records)."""
        folder = self.directory / "operations" / tenant
        if not NAME.fullmatch(tenant) or folder.is_symlink():
            return []
        try:
            entries = os.scandir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return []
        with entries:
            return [f"operations/{match.group(1)}" for entry in entries
                    if (match := OPERATION_FILE.fullmatch(entry.name)) is not None]

    def _read_operation(self, path: Path, tenant: str) -> OperationRecord | None:
        where = str(path.relative_to(self.directory))
        try:
            data = read_record(path, MAX_OPERATION_BYTES)
            if data is None:
                return None
            record = _operation_record(data, path.name, tenant)
        except BadRecord as e:
            self.skipped.add(where, str(e))
            return None
        return record  # the report forgets it once it decodes (operations.py)

    def trim(self, retention_s: float, now: float | None = None) -> int:
        """Remove finished operations (any replica's) that ended more than `retention_s` ago,
        and each tenant's oldest finished ones beyond MAX_FINISHED_PER_TENANT; cancels whose
        operation is gone; temporaries of writers that died; heartbeats of replicas gone for
        longer than the retention. Returns how many operations were removed."""
        now = time.time() if now is None else now
        removed = 0
        by_tenant: dict[str, list[OperationRecord]] = {}
        for record in self.operations():
            if record.body["done"]:
                by_tenant.setdefault(record.tenant, []).append(record)
        for tenant, records in by_tenant.items():
            records.sort(key=lambda r: (r.body.get("end_time") or r.body["create_time"], r.name))
            excess = len(records) - MAX_FINISHED_PER_TENANT
            for i, record in enumerate(records):
                ended = record.body.get("end_time") or record.body["create_time"]
                if i < excess or now - ended > retention_s:
                    self.delete_operation(tenant, record.name)
                    removed += 1
        folders = [self.directory / "replicas"]
        for top in (self.directory / "operations", self.directory / "adapters"):
            folders += [top, *subdirectories(top)]
        for folder in folders:  # never through a symbolic link
            for path in _entries(folder):
                with contextlib.suppress(OSError):
                    if path.name.startswith(".tmp-") and now - path.lstat().st_mtime > TEMPORARY_AGE_S:
                        path.unlink()
                    elif path.suffix == ".cancel" and folder.parent.name == "operations" and \
                            not path.with_suffix(".json").exists():
                        path.unlink()
        self._migrate_flat_operations()
        for path in (self.directory / "replicas").glob("*.json"):
            with contextlib.suppress(OSError):
                if path.stem != self.replica and now - path.lstat().st_mtime > retention_s:
                    path.unlink()
        return removed

    # -- replicas' leases -----------------------------------------------------------------

    def heartbeat(self) -> None:
        write_atomically(self.directory / "replicas" / f"{self.replica}.json",
                         json.dumps({"replica": self.replica, "time": time.time()}).encode())

    def _heartbeat(self, replica: str) -> float | None:
        """When `replica` last wrote its heartbeat (None: no readable heartbeat)."""
        if not REPLICA.fullmatch(replica):
            return None
        path = self.directory / "replicas" / f"{replica}.json"
        try:
            data = read_record(path, MAX_HEARTBEAT_BYTES)
            if data is None:
                return None
            when = _json_object(data).get("time")
            if not _finite(when):
                raise BadRecord("'time' is not a number")
        except BadRecord as e:
            self.skipped.add(str(path.relative_to(self.directory)), str(e))
            return None
        return float(when)

    def stopped(self, replica: str, within_s: float) -> bool:
        """Whether `replica` left a heartbeat older than `within_s` seconds (it was killed). No
        heartbeat says nothing: a replica that stopped cleanly left nothing behind, and one with
        a state directory of its own (sharing only a merge root) writes its heartbeat elsewhere."""
        if replica == self.replica:
            return False
        when = self._heartbeat(replica)
        return when is not None and time.time() - when > within_s

    def alive(self, replica: str, within_s: float) -> bool:
        """Whether `replica` wrote its heartbeat within the last `within_s` seconds."""
        if replica == self.replica:
            return True
        when = self._heartbeat(replica)
        return when is not None and time.time() - when <= within_s

    # -- earlier layouts ------------------------------------------------------------------

    def _migrate_flat_operations(self) -> None:
        """Operations of versions that kept them in one folder (`operations/operations_<name>.json`)
        move to their tenant's folder (with a cancel asked for them): at start-up, and at each
        trim for those a replica of such a version was still running (during a rolling upgrade
        it goes on writing its flat file until its operation ends)."""
        root = self.directory / "operations"
        flat = [p for p in _entries(root) if p.name.startswith("operations_") and p.name.endswith(".json")]
        if not flat:
            return
        with directory_lock(self.directory):
            for path in flat:
                try:
                    data = read_record(path, MAX_OPERATION_BYTES)
                    if data is None:
                        continue
                    body = _json_object(data)
                    tenant = body.get("tenant")
                    if not isinstance(tenant, str) or not NAME.fullmatch(tenant):
                        raise BadRecord("no valid 'tenant'")
                    record = _operation_record(data, path.name.removeprefix("operations_"), tenant)
                except BadRecord as e:
                    self.skipped.add(str(path.relative_to(self.directory)), str(e))
                    continue
                if not record.body["done"] and record.owner != self.replica and not self.stopped(record.owner, 60.0):
                    continue  # its (older) replica still runs it: moved once it ends
                target = self._operation_path(record.tenant, record.name)
                write_atomically(target, data)
                cancel = path.with_suffix(".cancel")
                if cancel.exists() and not cancel.is_symlink():
                    write_atomically(target.with_suffix(".cancel"), b"migrated")
                    cancel.unlink(missing_ok=True)
                path.unlink(missing_ok=True)

    def _migrate_sqlite(self) -> None:
        """Bring rows of `state.sqlite3` (loramux 0.1's store) over once, then set it aside."""
        old = self.directory / "state.sqlite3"
        if not old.exists():
            return
        import sqlite3

        with directory_lock(self.directory):
            if not old.exists():
                return
            try:
                db = sqlite3.connect(f"file:{old}?mode=ro", uri=True)
            except sqlite3.Error as e:
                self.skipped.add("state.sqlite3", f"not a database ({e})")
                return
            try:
                for row in db.execute("SELECT tenant, adapter_id, source, revision, pinned, load_time FROM adapters"):
                    try:  # each row checked as a registration file would be
                        data = json.dumps(dict(zip(("tenant", "adapter_id", "source", "revision", "pinned", "load_time"),
                                                   (row[0], row[1], row[2], row[3], bool(row[4]), row[5])))).encode()
                        saved = dataclasses.replace(SavedAdapter.from_json(data), generation=uuid.uuid4().hex)
                    except (BadRecord, TypeError, ValueError) as e:
                        self.skipped.add(f"state.sqlite3 adapters row {str(row)[:80]}", str(e))
                        continue
                    write_atomically(self.adapters_dir / saved.tenant / f"{saved.adapter_id}.json", saved.to_json())
                for name, tenant, body in db.execute("SELECT name, tenant, body FROM operations ORDER BY rowid"):
                    try:
                        record = {"name": name, "tenant": tenant, "owner": self.replica, "body": json.loads(body)}
                        checked = _operation_record(json.dumps(record).encode(), f"{str(name).removeprefix('operations/')}.json",
                                                    tenant if isinstance(tenant, str) and NAME.fullmatch(tenant) else "?")
                    except (BadRecord, TypeError, ValueError) as e:
                        self.skipped.add(f"state.sqlite3 operation {str(name)[:80]}", str(e))
                        continue
                    self.put_operation(checked.name, checked.tenant, checked.body)
            except sqlite3.Error as e:
                self.skipped.add("state.sqlite3", f"cannot be read ({e})")
                return
            finally:
                db.close()
            old.rename(old.with_name("state.sqlite3.migrated"))


def _entries(folder: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(folder)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _operation_record(data: bytes, file_name: str, tenant: str) -> OperationRecord:
    """An operation file's record, checked against its place: the file `<kind>-<hex>.json`
    in the folder of `tenant` must hold that name and tenant. Its body's fields are checked
    by operations.py when it is decoded."""
    match = OPERATION_FILE.fullmatch(file_name)
    if match is None:
        raise BadRecord("not named like an operation (<kind>-<32 hex digits>.json)")
    record = _json_object(data)
    name, owner, body = record.get("name"), record.get("owner"), record.get("body")
    if name != f"operations/{match.group(1)}":
        raise BadRecord(f"names another operation than its file ({str(name)[:80]!r})")
    if record.get("tenant") != tenant:
        raise BadRecord(f"names another tenant than the folder it lies in ({str(record.get('tenant'))[:80]!r})")
    if not isinstance(owner, str) or not REPLICA.fullmatch(owner):
        raise BadRecord("no valid 'owner' replica")
    if not isinstance(body, dict):
        raise BadRecord("no 'body' object")
    if not _finite(body.get("create_time")) or not isinstance(body.get("done"), bool):
        raise BadRecord("'create_time' or 'done' missing or not of their types")
    if body.get("end_time") is not None and not _finite(body["end_time"]):
        raise BadRecord("'end_time' is not a number")
    if not isinstance(body.get("metadata", {}), dict):
        raise BadRecord("'metadata' is not an object")
    return OperationRecord(name, tenant, owner, body)
