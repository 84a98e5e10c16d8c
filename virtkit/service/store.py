"""SQLite persistence of VM definitions, their runtime record and events.

One database file in the service's state directory, WAL mode so that readers (the API threads)
never wait for a writer. The service is the only writer; every write is one short transaction,
so a service killed at any instant leaves a consistent database, and the VMMs it started are
found again on the next start (:meth:`virtkit.service.daemon.Service.reattach`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: the VM's uid and cgroup derive from it
    name TEXT UNIQUE NOT NULL,
    definition TEXT NOT NULL,              -- JSON, as validated by the API, defaults filled in
    state TEXT NOT NULL,                   -- created, starting, running, restarting, stopped, failed
    instance TEXT,                         -- id of the current VMM process (a fresh one per start)
    pid INTEGER,
    created REAL NOT NULL,
    started REAL,
    restarts INTEGER NOT NULL DEFAULT 0,   -- consecutive restarts after failures
    last_exit TEXT                         -- JSON: reason, exit_status, detail, when
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    vm TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_vm ON events (vm, id);
"""

COLUMNS = ("id", "name", "definition", "state", "instance", "pid", "created", "started", "restarts", "last_exit")


class Store:
    def __init__(self, path: str) -> None:
        # VM definitions hold kernel command lines: the database and its WAL files are the
        # service's alone (0600), also when an older service left them readable. SQLite gives
        # the -wal and -shm files the database file's mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
        for p in (path, path + "-wal", path + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(p, 0o600)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self.lock = threading.Lock()
        with self.lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    @staticmethod
    def _row(row: tuple[Any, ...] | None) -> dict[str, Any] | None:
        if row is None:
            return None
        rec = dict(zip(COLUMNS, row, strict=True))
        rec["definition"] = json.loads(rec["definition"])
        rec["last_exit"] = json.loads(rec["last_exit"]) if rec["last_exit"] else None
        return rec

    def insert(self, name: str, definition: dict[str, Any]) -> dict[str, Any]:
        """Raises sqlite3.IntegrityError if the name is taken."""
        with self.lock:
            self.db.execute(
                "INSERT INTO vms (name, definition, state, created) VALUES (?, ?, 'created', ?)",
                (name, json.dumps(definition), time.time()),
            )
        rec = self.get(name)
        assert rec is not None
        return rec

    def get(self, name: str) -> dict[str, Any] | None:
        with self.lock:
            row = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM vms WHERE name = ?", (name,)).fetchone()
        return self._row(row)

    def all(self) -> list[dict[str, Any]]:
        with self.lock:
            rows = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM vms ORDER BY id").fetchall()
        return [r for r in (self._row(x) for x in rows) if r is not None]

    def update(self, name: str, **fields: Any) -> None:
        if "last_exit" in fields and fields["last_exit"] is not None:
            fields["last_exit"] = json.dumps(fields["last_exit"])
        assert fields and all(k in COLUMNS and k not in ("id", "name") for k in fields)
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.lock:
            self.db.execute(f"UPDATE vms SET {sets} WHERE name = ?", (*fields.values(), name))

    def delete(self, name: str) -> None:
        with self.lock:
            self.db.execute("DELETE FROM vms WHERE name = ?", (name,))

    def event(self, vm: str, kind: str, detail: str = "") -> None:
        with self.lock:
            self.db.execute(
                "INSERT INTO events (ts, vm, kind, detail) VALUES (?, ?, ?, ?)", (time.time(), vm, kind, detail)
            )

    def events(self, vm: str | None = None, since: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        q = "SELECT id, ts, vm, kind, detail FROM events WHERE id > ?"
        args: list[Any] = [since]
        if vm is not None:
            q += " AND vm = ?"
            args.append(vm)
        q += " ORDER BY id LIMIT ?"
        args.append(limit)
        with self.lock:
            rows = self.db.execute(q, args).fetchall()
        return [dict(zip(("id", "ts", "vm", "kind", "detail"), r, strict=True)) for r in rows]
