"""What the server keeps across restarts, in `--state-dir`: adapter registrations and
long-running operations, one small JSON file each.

    <state-dir>/adapters/<tenant>/<adapter_id>.json    a registration (see registrations.py)
    <state-dir>/operations/<operation>.json           an operation, with the replica that runs it
    <state-dir>/replicas/<replica>.json               each replica's heartbeat (its lease)

Files, not a database, so that several replicas may point at one `--state-dir` on a shared
(ReadWriteMany) volume: every file is written whole to a temporary name and renamed into
place (atomic on local disks and on NFS), so no reader ever sees half of one; changes that
read before they write hold the directory's lock (`flock` on `.lock`, which NFSv4 and
CephFS honour). A process killed at any instant leaves the old file or the new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

LEASE_MISSES = 5  # a replica whose heartbeat is this many sync intervals old is gone


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
        body = json.loads(data)
        return cls(str(body["tenant"]), str(body["adapter_id"]), str(body["source"]), str(body["revision"]),
                   bool(body["pinned"]), float(body["load_time"]), str(body.get("generation", "")))


def write_atomically(path: Path, data: bytes) -> None:
    """Write `path` whole: to a unique temporary name beside it, flushed, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


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


class StateStore:
    """The files of one `--state-dir`, as seen by the replica `replica`."""

    def __init__(self, directory: Path, replica: str):
        self.directory = directory
        self.replica = replica
        for sub in ("adapters", "operations", "replicas"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        self._migrate_sqlite()

    @property
    def adapters_dir(self) -> Path:
        return self.directory / "adapters"

    def close(self) -> None:
        (self.directory / "replicas" / f"{self.replica}.json").unlink(missing_ok=True)

    # -- operations -----------------------------------------------------------------------

    def _operation_path(self, name: str) -> Path:
        return self.directory / "operations" / f"{name.replace('/', '_')}.json"

    def put_operation(self, name: str, tenant: str, body: dict) -> None:
        record = {"name": name, "tenant": tenant, "owner": self.replica, "body": body}
        write_atomically(self._operation_path(name), json.dumps(record).encode())

    def delete_operation(self, name: str) -> None:
        self._operation_path(name).unlink(missing_ok=True)
        self._operation_path(name).with_suffix(".cancel").unlink(missing_ok=True)

    def request_cancel(self, name: str) -> None:
        """Ask the replica that runs `name` to cancel it (it looks about once a second)."""
        write_atomically(self._operation_path(name).with_suffix(".cancel"), self.replica.encode())

    def cancel_requested(self, name: str) -> bool:
        return self._operation_path(name).with_suffix(".cancel").exists()

    def operation(self, name: str) -> tuple[str, str, str, dict] | None:
        """(name, tenant, owner, body) of one operation, from whichever replica ran it."""
        data = read_file(self._operation_path(name))
        if data is None:
            return None
        record = json.loads(data)
        return record["name"], record["tenant"], record["owner"], record["body"]

    def operations(self) -> list[tuple[str, str, str, dict]]:
        """Every operation kept, oldest first: (name, tenant, owner, body)."""
        found = []
        for path in (self.directory / "operations").glob("operations_*.json"):
            data = read_file(path)
            if data is not None:
                record = json.loads(data)
                found.append((record["name"], record["tenant"], record["owner"], record["body"]))
        return sorted(found, key=lambda item: (item[3]["create_time"], item[0]))

    # -- replicas' leases -----------------------------------------------------------------

    def heartbeat(self) -> None:
        write_atomically(self.directory / "replicas" / f"{self.replica}.json",
                         json.dumps({"replica": self.replica, "time": time.time()}).encode())

    def stopped(self, replica: str, within_s: float) -> bool:
        """Whether `replica` left a heartbeat older than `within_s` seconds (it was killed; one
        that stops cleanly removes its heartbeat, and leaves nothing behind)."""
        if replica == self.replica:
            return False
        data = read_file(self.directory / "replicas" / f"{replica}.json")
        return data is not None and time.time() - json.loads(data)["time"] > within_s

    def alive(self, replica: str, within_s: float) -> bool:
        """Whether `replica` wrote its heartbeat within the last `within_s` seconds."""
        if replica == self.replica:
            return True
        data = read_file(self.directory / "replicas" / f"{replica}.json")
        return data is not None and time.time() - json.loads(data)["time"] <= within_s

    # -- the SQLite store of earlier versions ---------------------------------------------

    def _migrate_sqlite(self) -> None:
        """Bring rows of `state.sqlite3` (loramux 0.1's store) over once, then set it aside."""
        old = self.directory / "state.sqlite3"
        if not old.exists():
            return
        import sqlite3

        with directory_lock(self.directory):
            if not old.exists():
                return
            db = sqlite3.connect(str(old))
            try:
                for tenant, adapter_id, source, revision, pinned, load_time in db.execute(
                    "SELECT tenant, adapter_id, source, revision, pinned, load_time FROM adapters"
                ):
                    path = self.adapters_dir / tenant / f"{adapter_id}.json"
                    saved = SavedAdapter(tenant, adapter_id, source, revision, bool(pinned), load_time, uuid.uuid4().hex)
                    write_atomically(path, saved.to_json())
                for name, tenant, body in db.execute("SELECT name, tenant, body FROM operations ORDER BY rowid"):
                    self.put_operation(name, tenant, json.loads(body))
            finally:
                db.close()
            old.rename(old.with_name("state.sqlite3.migrated"))
