"""What the server keeps across restarts, in `--state-dir`: adapter registrations and
long-running operations.

An embedded SQLite database (`state.sqlite3`, write-ahead log): every change is one
transaction, so a process killed at any instant leaves either the old row or the new one,
never half of either. The store knows rows, not servers: the registry and the operation
store call it, and start-up (`engine/restore.py`) reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from pathlib import Path

STATE_FILE = "state.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    tenant TEXT NOT NULL,
    adapter_id TEXT NOT NULL,
    source TEXT NOT NULL,
    revision TEXT NOT NULL,       -- what the source resolved to: Hub commit sha or content hash
    pinned INTEGER NOT NULL,
    load_time REAL NOT NULL,
    PRIMARY KEY (tenant, adapter_id)
);
CREATE TABLE IF NOT EXISTS operations (
    name TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    body TEXT NOT NULL            -- JSON: metadata, times, done, error, result
);
"""


@dataclasses.dataclass(frozen=True)
class SavedAdapter:
    tenant: str
    adapter_id: str
    source: str
    revision: str
    pinned: bool
    load_time: float


class StateStore:
    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / STATE_FILE
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across a process crash
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- adapters -------------------------------------------------------------------------

    def put_adapter(self, saved: SavedAdapter) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO adapters VALUES (?, ?, ?, ?, ?, ?)",
                (saved.tenant, saved.adapter_id, saved.source, saved.revision, int(saved.pinned), saved.load_time),
            )

    def delete_adapter(self, tenant: str, adapter_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM adapters WHERE tenant = ? AND adapter_id = ?", (tenant, adapter_id))

    def adapters(self) -> list[SavedAdapter]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM adapters ORDER BY load_time, tenant, adapter_id").fetchall()
        return [SavedAdapter(t, a, s, r, bool(p), lt) for t, a, s, r, p, lt in rows]

    # -- operations -----------------------------------------------------------------------

    def put_operation(self, name: str, tenant: str, body: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO operations VALUES (?, ?, ?)", (name, tenant, json.dumps(body)))

    def delete_operation(self, name: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM operations WHERE name = ?", (name,))

    def operations(self) -> list[tuple[str, str, dict]]:
        with self._lock:
            rows = self._db.execute("SELECT name, tenant, body FROM operations ORDER BY rowid").fetchall()
        return [(name, tenant, json.loads(body)) for name, tenant, body in rows]
