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

A record is read back as untrusted input (a crash, a full disk or a person may have left anything
there): its size and depth are bounded and every field is type- and range-checked
(:mod:`virtkit.records`), then checked against what this runtime could have written for that id
(:meth:`Record.check`). A record that fails is :class:`CorruptState`: ``list`` skips it with a
warning, ``state`` says so in one line, and ``delete --force`` removes it.

Every write is ``write tmp + rename``; transitions hold ``flock`` on the container directory. There is
no fsync: the state describes processes, mounts and cgroups that a reboot ends anyway (runc keeps it
in /run, a tmpfs, for that reason), and rename is atomic against a crash of the runtime, which is
the failure that matters. On this project's machines /run is on disk and an fsync costs ~4 ms.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from virtkit.errors import ContainerError
from virtkit.records import Bounds, UntrustedInput, load_object, parse

DEFAULT_ROOT = "/run/virtkit"
STATE_FILE = "state.json"
EXIT_FILE = "exit.json"
FIFO = "exec.fifo"
LOG_FILE = "output.log"

# the ids runc accepts: no path separators, no leading dot, bounded length
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,1023}"
_ID_RE = re.compile(f"^{ID_PATTERN}$")

STATUSES = ("creating", "created", "running", "stopped")
#: a state.json or exit.json larger than this is corrupt (ours are well under 4 KiB)
MAX_RECORD_BYTES = 1 << 20
PID_MAX = 1 << 22  # PID_MAX_LIMIT on 64-bit
_PATH = 4096


class CorruptState(ContainerError):
    """A container's state directory holds a record this runtime cannot trust."""


def validate_id(cid: str) -> str:
    if not _ID_RE.match(cid or "") or cid in (".", ".."):
        raise ContainerError(
            f"invalid container id {cid!r}: use letters, digits and _ . + - "
            "(starting with a letter or digit, at most 1024 characters)"
        )
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
    rest = data[data.rindex(b")") + 2 :].split()
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

    id: Annotated[str, Bounds(pattern=ID_PATTERN)]
    bundle: Annotated[str, Bounds(max_len=_PATH)]
    status: Annotated[str, Bounds(pattern="|".join(STATUSES))] = "creating"
    pid: Annotated[int, Bounds(lo=0, hi=PID_MAX)] = 0
    pid_start: Annotated[int, Bounds(lo=0)] | None = None
    created: Annotated[str, Bounds(max_len=64)] = ""
    owner: Annotated[str, Bounds(max_len=256)] = "root"
    annotations: Annotated[dict[str, str], Bounds(max_len=1024)] | None = None
    creator_pid: Annotated[int, Bounds(lo=0, hi=PID_MAX)] = 0
    creator_start: Annotated[int, Bounds(lo=0)] | None = None
    monitor_pid: Annotated[int, Bounds(lo=0, hi=PID_MAX)] = 0
    rootfs: Annotated[str, Bounds(max_len=_PATH)] = ""
    cgroup_path: Annotated[str, Bounds(max_len=_PATH)] = ""
    cgroup_dirs: Annotated[list[str], Bounds(max_len=64)] | None = None  # the container's own cgroup directories
    mounts: Annotated[list[str], Bounds(max_len=4)] | None = None  # host mounts virtkit made (the overlay rootfs)
    netdevs: Annotated[list[str], Bounds(max_len=4)] | None = None  # host network devices made for this container
    capture: bool = False
    cgroup_made: Annotated[list[str], Bounds(max_len=256)] | None = None  # every cgroup directory made (intent log)
    lease: Annotated[str, Bounds(max_len=_PATH)] | None = None  # the --net bridge address lease file
    address: Annotated[str, Bounds(max_len=64)] | None = None

    def to_json(self) -> bytes:
        return json.dumps({k: getattr(self, k) for k in self.__slots__}, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, what: str = "state.json") -> Record:
        """Parse a record read back from disk; :class:`UntrustedInput` on anything malformed."""
        raw = load_object(data, what=what, max_bytes=MAX_RECORD_BYTES)
        extra = raw.pop("extra", None)  # records written before these fields had names of their own
        if isinstance(extra, dict):
            for key in ("cgroup_made", "lease", "address"):
                if key in extra and key not in raw:
                    raw[key] = extra[key]
        return parse(cls, raw, what=what, unknown="ignore")

    def check(self, root: str, cid: str) -> None:
        """What this runtime could have written for container ``cid`` under ``root``, and nothing
        else: delete acts on these fields (kills a cgroup, unmounts, removes a device and a file),
        so a value outside that is refused rather than acted on."""

        def bad(field: str, value: object) -> UntrustedInput:
            return UntrustedInput(f"{field} {str(value)[:80]!r} is not something virtkit makes for container {cid}")

        if self.id != cid:
            raise bad("id", self.id)
        for field in ("bundle", "rootfs", "created", "owner"):
            v = getattr(self, field)
            if "\0" in v or (field in ("bundle", "rootfs") and v and not v.startswith("/")):
                raise bad(field, v)
        if self.cgroup_path:
            from virtkit.container.config import _parse_cgroups_path
            from virtkit.errors import ConfigError

            try:
                if _parse_cgroups_path(self.cgroup_path) != self.cgroup_path:
                    raise bad("cgroup_path", self.cgroup_path)
            except ConfigError:
                raise bad("cgroup_path", self.cgroup_path) from None
        for d in [*(self.cgroup_dirs or []), *(self.cgroup_made or [])]:
            # a cgroup directory is the container's path, or one of its parents, below a hierarchy
            if not d.startswith("/") or ".." in d.split("/") or not self.cgroup_path:
                raise bad("cgroup directory", d)
        own = os.path.join(root, cid)
        for m in self.mounts or []:
            if m != os.path.join(own, "rootfs"):
                raise bad("mount", m)
        from virtkit.container import network

        for dev in self.netdevs or []:
            if dev != network.host_ifname(root, cid):
                raise bad("network device", dev)
        if self.lease is not None and not network.is_lease_path(self.lease):
            raise bad("lease", self.lease)


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """``exit.json``, written by the monitor when the container's process ends."""

    exitStatus: Annotated[int, Bounds(lo=0, hi=255)] | None = None  # noqa: N815 - the OCI state's names
    signal: Annotated[int, Bounds(lo=1, hi=64)] | None = None
    oomKilled: bool = False  # noqa: N815

    def as_dict(self) -> dict[str, Any]:
        return {"exitStatus": self.exitStatus, "signal": self.signal, "oomKilled": self.oomKilled}


def read_small(path: str, limit: int) -> bytes:
    """A regular file, opened without following a symlink, at most ``limit`` (+1) bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UntrustedInput(f"{path} is not a regular file")
        chunks = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


_OCTAL = re.compile(r"\\([0-7]{3})")


def mounts_below(path: str) -> list[str]:
    """Mount points at or below ``path`` (this process's view), deepest first."""
    prefix = path.rstrip("/") + "/"
    out = []
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4:
                    point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), os.fsdecode(fields[4]))
                    if point == path or point.startswith(prefix):
                        out.append(point)
    except OSError:
        return []
    return sorted(out, key=lambda p: p.count("/"), reverse=True)


def remove_tree(path: str) -> None:
    """Delete a state directory: unmount whatever is mounted below it first (an overlay rootfs left
    by a crash), then delete its files without ever following a symlink or crossing into another
    filesystem (what could not be unmounted is left in place, not emptied)."""
    from virtkit.host import mounts

    for point in mounts_below(path):
        with contextlib.suppress(OSError):
            mounts.umount2(point, mounts.MNT_DETACH)
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(top.st_mode):
        with contextlib.suppress(OSError):
            os.unlink(path)
        return

    def clear(d: str) -> None:
        with contextlib.suppress(OSError), os.scandir(d) as it:
            for entry in list(it):
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        if st.st_dev == top.st_dev:
                            clear(entry.path)
                            os.rmdir(entry.path)
                    else:
                        os.unlink(entry.path)

    clear(path)
    with contextlib.suppress(OSError):
        os.rmdir(path)


class StateDir:
    """The root directory holding every container's directory."""

    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.abspath(root or DEFAULT_ROOT)

    def ensure(self) -> None:
        """Make the root, only root may enter it (0700, the mode of one made earlier is fixed too)."""
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            st = os.lstat(self.root)
            if not stat.S_ISDIR(st.st_mode):
                raise ContainerError(
                    f"the state directory {self.root} is not a directory; remove it or pick another with --root"
                )
            if stat.S_IMODE(st.st_mode) != 0o700 and st.st_uid == os.geteuid():
                os.chmod(self.root, 0o700)
        except OSError as err:
            raise ContainerError(
                f"cannot create the state directory {self.root}: {err.strerror}; "
                "run as root or pick another with --root"
            ) from None

    def path(self, cid: str, *parts: str) -> str:
        return os.path.join(self.root, validate_id(cid), *parts)

    def exists(self, cid: str) -> bool:
        return os.path.lexists(self.path(cid))

    # --- create / remove -------------------------------------------------------------------
    def create(self, record: Record, extra_files: dict[str, bytes] | None = None) -> str:
        """Atomically make ``ROOT/ID`` holding ``state.json``; raise if the id is taken."""
        self.ensure()
        self.sweep()
        extra_files = extra_files or {}
        final = self.path(record.id)
        if os.path.lexists(final):
            raise ContainerError(
                f"container id {record.id!r} is already in use: pick another id or 'virtkit delete {record.id}' first"
            )
        tmp = os.path.join(self.root, f".new-{record.id[:64]}-{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(tmp, 0o700)
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
            remove_tree(tmp)
            raise
        return final

    def remove(self, cid: str) -> None:
        """Take the directory away atomically, then delete its files."""
        trash = os.path.join(self.root, f".trash-{cid[:64]}-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(self.path(cid), trash)
        except FileNotFoundError:
            return
        remove_tree(trash)

    def sweep(self) -> None:
        """Delete leftovers of interrupted creates/deletes (they hold no resources by construction)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith(".trash-"):
                remove_tree(os.path.join(self.root, name))
            elif name.startswith(".new-"):
                pid = name.rsplit("-", 2)[-2]
                if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                    remove_tree(os.path.join(self.root, name))

    # --- records -----------------------------------------------------------------------------
    def load(self, cid: str) -> Record:
        """The record of ``cid``; ContainerError if there is none, :class:`CorruptState` if it
        cannot be trusted (the message says how to get rid of it)."""
        d = self.path(cid)
        try:
            data = read_small(os.path.join(d, STATE_FILE), MAX_RECORD_BYTES)
            rec = Record.from_json(data, what=f"state of container {cid}")
            rec.check(self.root, cid)
            return rec
        except FileNotFoundError:
            if not os.path.lexists(d):
                raise ContainerError(f"container {cid!r} does not exist (see 'virtkit list')") from None
            why = "it has no state.json (a create that never finished?)"
        except (UntrustedInput, OSError) as err:
            why = str(err) if isinstance(err, UntrustedInput) else (err.strerror or str(err))
        raise CorruptState(f"state of container {cid!r} is corrupt ({why}): 'virtkit delete --force {cid}' removes it")

    def save(self, record: Record) -> None:
        atomic_write(self.path(record.id, STATE_FILE), record.to_json())

    def ids(self) -> list[str]:
        """Every container directory, including ones whose record is missing or corrupt."""
        try:
            names = sorted(os.listdir(self.root))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [n for n in names if not n.startswith(".") and _ID_RE.match(n)]

    @contextmanager
    def lock(self, cid: str) -> Iterator[None]:
        try:
            fd = os.open(self.path(cid), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ContainerError(f"container {cid!r} does not exist (see 'virtkit list')") from None
        except OSError:  # a symlink or a file where the directory should be: no lock to take
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def exit_info(self, cid: str) -> dict[str, Any] | None:
        try:
            data = read_small(self.path(cid, EXIT_FILE), MAX_RECORD_BYTES)
            return parse(
                ExitInfo,
                load_object(data, what="exit.json", max_bytes=MAX_RECORD_BYTES),
                what="exit.json",
                unknown="ignore",
            ).as_dict()
        except (OSError, UntrustedInput):
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
