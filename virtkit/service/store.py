"""SQLite persistence of VM definitions, their runtime record and events.

One database file in the service's state directory, WAL mode so that readers (the API threads)
never wait for a writer. The service is the only writer; every write is one short transaction,
so a service killed at any instant leaves a consistent database, and the VMMs it started are
found again on the next start (:meth:`virtkit.service.daemon.Service.reattach`).

The store is an edge: records go in (:class:`~virtkit.service.model.VmDefinition`,
:class:`~virtkit.service.model.ExitInfo`) and come out parsed (:class:`~virtkit.service.model.VmRow`,
:class:`~virtkit.service.model.Event`). A row is input like any other (a database restored from
elsewhere, edited by hand, written by another version): its JSON columns are bounded before they
are decoded, and a row that does not fit its record is a :class:`CorruptRow` naming the VM and the
field, never a ``KeyError`` deep in the service.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from virtkit.errors import VirtkitError
from virtkit.records import UntrustedInput, load_object, parse, to_json
from virtkit.service.model import Event, ExitInfo, VmDefinition, VmRow

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
#: a definition or an exit record is well under a KiB; anything past this is not ours
MAX_JSON_COLUMN: Final = 64 << 10
#: event details are cut to this when written (and refused past it when read)
MAX_EVENT_DETAIL: Final = 64 << 10
#: the columns :meth:`Store.update` may set
UPDATABLE: Final = frozenset({"state", "instance", "pid", "started", "restarts", "last_exit"})


class CorruptRow(VirtkitError):
    """A row of the database does not fit its record (one line: the VM and the field)."""


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
    def _row(row: tuple[Any, ...]) -> VmRow:
        value = dict(zip(COLUMNS, row, strict=True))
        what = f"the database row of VM {str(value['name'])[:64]!r}"
        try:
            for column in ("definition", "last_exit"):
                text = value[column]
                if text is None and column == "last_exit":
                    continue
                if not isinstance(text, str | bytes):
                    raise UntrustedInput(f"{what}.{column} is not JSON text")
                value[column] = load_object(text, what=f"{what}.{column}", max_bytes=MAX_JSON_COLUMN)
            return parse(VmRow, value, what=what)
        except UntrustedInput as e:
            raise CorruptRow(f"{e}: delete the VM (`virtkit vm delete --force`) or repair the database") from None

    def insert(self, name: str, definition: VmDefinition) -> VmRow:
        """Raises sqlite3.IntegrityError if the name is taken."""
        with self.lock:
            self.db.execute(
                "INSERT INTO vms (name, definition, state, created) VALUES (?, ?, 'created', ?)",
                (name, json.dumps(to_json(definition)), time.time()),
            )
        rec = self.get(name)
        assert rec is not None
        return rec

    def get(self, name: str) -> VmRow | None:
        """The VM's row; None if there is none. Raises :class:`CorruptRow`."""
        with self.lock:
            row = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM vms WHERE name = ?", (name,)).fetchone()
        return None if row is None else self._row(row)

    def names(self) -> list[str]:
        """Every VM's name, also of rows that do not parse (what :meth:`delete` can remove)."""
        with self.lock:
            return [str(r[0]) for r in self.db.execute("SELECT name FROM vms ORDER BY id").fetchall()]

    def all(self, on_corrupt: Callable[[str, CorruptRow], None] | None = None) -> list[VmRow]:
        """Every VM's row. A row that does not parse is left out and handed to ``on_corrupt``
        (name, error), or raises when there is none."""
        with self.lock:
            rows = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM vms ORDER BY id").fetchall()
        out = []
        for row in rows:
            try:
                out.append(self._row(row))
            except CorruptRow as e:
                if on_corrupt is None:
                    raise
                on_corrupt(str(row[1]), e)
        return out

    def update(self, name: str, **fields: str | int | float | ExitInfo | None) -> None:
        if isinstance(fields.get("last_exit"), ExitInfo):
            fields["last_exit"] = json.dumps(to_json(fields["last_exit"]))
        assert fields and set(fields) <= UPDATABLE, fields
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.lock:
            self.db.execute(f"UPDATE vms SET {sets} WHERE name = ?", (*fields.values(), name))

    def delete(self, name: str) -> None:
        with self.lock:
            self.db.execute("DELETE FROM vms WHERE name = ?", (name,))

    def event(self, vm: str, kind: str, detail: str = "") -> None:
        with self.lock:
            self.db.execute(
                "INSERT INTO events (ts, vm, kind, detail) VALUES (?, ?, ?, ?)",
                (time.time(), vm, kind, detail[:MAX_EVENT_DETAIL]),
            )

    def events(self, vm: str | None = None, since: int = 0, limit: int = 1000) -> list[Event]:
        """Events after id ``since`` (of VM ``vm``), at most ``limit``. Raises :class:`CorruptRow`."""
        q = "SELECT id, ts, vm, kind, detail FROM events WHERE id > ?"
        args: list[Any] = [since]
        if vm is not None:
            q += " AND vm = ?"
            args.append(vm)
        q += " ORDER BY id LIMIT ?"
        args.append(limit)
        with self.lock:
            rows = self.db.execute(q, args).fetchall()
        out = []
        for r in rows:
            try:
                out.append(parse(Event, dict(zip(("id", "ts", "vm", "kind", "detail"), r, strict=True)), what="event"))
            except UntrustedInput as e:
                raise CorruptRow(f"the database row of event {r[0]}: {e}") from None
        return out
