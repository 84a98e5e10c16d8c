"""The state directory: one directory per container under the root (default /run/virtkit).

Crash consistency, by construction:

* a container appears by ``rename(2)`` of a fully written temporary directory onto ``ROOT/ID``: it is
  there with a ``state.json`` or not at all, and the rename fails if the id is taken;
* every resource (cgroup directories, mounts, network devices) is written into ``state.json``
  *before* it is made (an intent log), so ``delete`` can undo a create that crashed half-way;
* a ``creating`` container whose creator process has died is reported as ``stopped``, so it can be
  deleted, and ``list`` shows it rather than hiding it;
* ``delete`` releases the resources first and renames the directory away last; a crash in between
  leaves the container listed (and deletable again), never a resource with no record.

Every write is ``write tmp + rename``; transitions hold ``flock`` on the container directory. There is
no fsync: the state describes processes, mounts and cgroups that a reboot ends anyway (runc keeps it
in /run, a tmpfs, for that reason), and rename is atomic against a crash of the runtime, which is
the failure that matters. On this project's machines /run is on disk and an fsync costs ~4 ms.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from virtkit.errors import ContainerError

DEFAULT_ROOT = "/run/virtkit"
STATE_FILE = "state.json"
EXIT_FILE = "exit.json"
FIFO = "exec.fifo"
LOG_FILE = "output.log"

# the ids runc accepts: no path separators, no leading dot, bounded length
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,1023}$")

STATUSES = ("creating", "created", "running", "stopped")


def validate_id(cid: str) -> str:
    if not _ID_RE.match(cid or "") or cid in (".", ".."):
        raise ContainerError(f"invalid container id {cid!r}: use letters, digits and _ . + - "
                             "(starting with a letter or digit, at most 1024 characters)")
    return cid


def atomic_write(path: str, data: bytes, mode: int = 0o644, dir_fd: int | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a mix."""
    tmp = f".{os.path.basename(path)}.{os.getpid()}.tmp"
    dirpath = os.path.dirname(path) if dir_fd is None else None
    tmp_path = os.path.join(dirpath, tmp) if dirpath is not None else tmp
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    final = path if dir_fd is None else os.path.basename(path)
    os.rename(tmp_path, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'
    rest = data[data.rindex(b")") + 2:].split()
    if rest[0] == b"Z":  # a zombie has exited
        return None
    return int(rest[19])


def process_alive(pid: int, start_time: int | None) -> bool:
    if pid <= 0:
        return False
    st = proc_start_time(pid)
    return st is not None and (start_time is None or st == start_time)


@dataclass(slots=True)
class Record:
    """The persistent record of one container (``state.json``); OCI fields plus virtkit's own."""

    id: str
    bundle: str
    status: str = "creating"
    pid: int = 0
    pid_start: int | None = None
    created: str = ""
    owner: str = "root"
    annotations: dict[str, str] | None = None
    creator_pid: int = 0
    creator_start: int | None = None
    monitor_pid: int = 0
    rootfs: str = ""
    cgroup_path: str = ""
    cgroup_dirs: list[str] | None = None  # every cgroup directory made (intent-logged)
    mounts: list[str] | None = None  # host mounts virtkit made for this container (overlay rootfs)
    netdevs: list[str] | None = None  # host network devices made for this container
    capture: bool = False
    extra: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        return json.dumps({k: getattr(self, k) for k in self.__slots__}, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Record:
        raw = json.loads(data)
        return cls(**{k: raw.get(k) for k in cls.__slots__ if k in raw})


class StateDir:
    """The root directory holding every container's directory."""

    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.abspath(root or DEFAULT_ROOT)

    def ensure(self) -> None:
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
        except OSError as err:
            raise ContainerError(f"cannot create the state directory {self.root}: {err.strerror}; "
                                 "run as root or pick another with --root") from None

    def path(self, cid: str, *parts: str) -> str:
        return os.path.join(self.root, validate_id(cid), *parts)

    def exists(self, cid: str) -> bool:
        return os.path.exists(self.path(cid, STATE_FILE))

    # --- create / remove -------------------------------------------------------------------
    def create(self, record: Record, extra_files: dict[str, bytes] | None = None) -> str:
        """Atomically make ``ROOT/ID`` holding ``state.json``; raise if the id is taken."""
        self.ensure()
        self.sweep()
        extra_files = extra_files or {}
        final = self.path(record.id)
        if os.path.lexists(final):
            raise ContainerError(f"container id {record.id!r} is already in use: pick another id or "
                                 f"'virtkit delete {record.id}' first")
        tmp = os.path.join(self.root, f".new-{record.id[:64]}-{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(tmp, 0o711)
        try:
            # nobody sees the directory before the rename: plain writes suffice
            for name, data in ((STATE_FILE, record.to_json()), *extra_files.items()):
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            try:
                os.rename(tmp, final)  # fails (EEXIST/ENOTEMPTY) if someone else got the id first
            except OSError as err:
                if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise ContainerError(f"container id {record.id!r} is already in use: pick another id") from None
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def remove(self, cid: str) -> None:
        """Take the directory away atomically, then delete its files."""
        trash = os.path.join(self.root, f".trash-{cid[:64]}-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(self.path(cid), trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def sweep(self) -> None:
        """Delete leftovers of interrupted creates/deletes (they hold no resources by construction)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith(".trash-"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            elif name.startswith(".new-"):
                pid = name.rsplit("-", 2)[-2]
                if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    # --- records -----------------------------------------------------------------------------
    def load(self, cid: str) -> Record:
        try:
            with open(self.path(cid, STATE_FILE), "rb") as f:
                return Record.from_json(f.read())
        except FileNotFoundError:
            raise ContainerError(f"container {cid!r} does not exist (see 'virtkit list')") from None
        except ValueError:
            raise ContainerError(f"state of container {cid!r} is corrupt: 'virtkit delete --force {cid}'") from None

    def save(self, record: Record) -> None:
        atomic_write(self.path(record.id, STATE_FILE), record.to_json())

    def ids(self) -> list[str]:
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        return [n for n in names if not n.startswith(".") and os.path.exists(os.path.join(self.root, n, STATE_FILE))]

    @contextmanager
    def lock(self, cid: str) -> Iterator[None]:
        try:
            fd = os.open(self.path(cid), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ContainerError(f"container {cid!r} does not exist (see 'virtkit list')") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def exit_info(self, cid: str) -> dict[str, Any] | None:
        try:
            with open(self.path(cid, EXIT_FILE), "rb") as f:
                return json.loads(f.read())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None


def current_status(rec: Record) -> str:
    """The OCI status, from the record and the processes actually alive."""
    if rec.status == "creating":
        if process_alive(rec.creator_pid, rec.creator_start):
            return "creating"
        return "stopped"
    if rec.status in ("created", "running"):
        return rec.status if process_alive(rec.pid, rec.pid_start) else "stopped"
    return rec.status
