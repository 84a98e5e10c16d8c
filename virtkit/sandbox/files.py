"""The sandbox's file system view: paths resolved inside a root directory, and the fd table.

Every path a program names is resolved by the host kernel with ``openat2(RESOLVE_IN_ROOT |
RESOLVE_NO_MAGICLINKS)`` against the root's directory fd, so ``..``, absolute symlinks and
``/proc/self/root``-style magic links all stay inside the root: there is no check-then-use window
in the VMM (Linux openat2(2)). Operations on a last component (unlink, mkdir, rename, symlink,
readlink, lstat) open its parent that way and act relative to the parent's fd with a name that
holds no ``/``.

A guest fd maps to an :class:`OpenFile` (a host fd, shared by dup and fork like a Linux open
file description). Directories remember their guest path, so ``openat(dirfd, ...)`` resolves
against the root too, never against the directory as a new root.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import threading

from virtkit.host.mounts import RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, openat2

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

AT_FDCWD: Final = -100
O_CLOEXEC: Final = 0o2000000
MAX_FDS: Final = 1024
RESOLVE: Final = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS


class OpenFile:
    """An open file description: host fd, the path it was opened by (inside the root)."""

    __slots__ = ("fd", "path", "refs", "is_dir", "dir_stream", "lock")

    def __init__(self, fd: int, path: str, is_dir: bool = False) -> None:
        self.fd, self.path, self.refs, self.is_dir = fd, path, 1, is_dir
        self.dir_stream: list[tuple[int, int, bytes]] | None = None
        self.lock = threading.Lock()

    def incref(self) -> OpenFile:
        with self.lock:
            self.refs += 1
        return self

    def decref(self) -> None:
        with self.lock:
            self.refs -= 1
            last = self.refs == 0
        if last:
            with contextlib.suppress(OSError):
                os.close(self.fd)


class FdTable:
    """Guest fd -> (OpenFile, close-on-exec)."""

    def __init__(self) -> None:
        self.fds: dict[int, tuple[OpenFile, bool]] = {}
        self.lock = threading.Lock()

    def get(self, fd: int) -> OpenFile | None:
        entry = self.fds.get(fd)
        return entry[0] if entry else None

    def install(self, f: OpenFile, cloexec: bool = False, lowest: int = 0, exact: int | None = None) -> int:
        with self.lock:
            if exact is not None:
                old = self.fds.get(exact)
                self.fds[exact] = (f, cloexec)
                fd = exact
            else:
                fd = lowest
                while fd in self.fds:
                    fd += 1
                if fd >= MAX_FDS:
                    f.decref()
                    return -errno.EMFILE
                self.fds[fd] = (f, cloexec)
                old = None
        if old is not None:
            old[0].decref()
        return fd

    def close(self, fd: int) -> int:
        with self.lock:
            entry = self.fds.pop(fd, None)
        if entry is None:
            return -errno.EBADF
        entry[0].decref()
        return 0

    def set_cloexec(self, fd: int, on: bool) -> None:
        with self.lock:
            if fd in self.fds:
                self.fds[fd] = (self.fds[fd][0], on)

    def cloexec(self, fd: int) -> bool:
        entry = self.fds.get(fd)
        return bool(entry and entry[1])

    def fork(self) -> FdTable:
        t = FdTable()
        with self.lock:
            t.fds = {fd: (f.incref(), ce) for fd, (f, ce) in self.fds.items()}
        return t

    def exec(self) -> None:
        """Close the close-on-exec descriptors (execve)."""
        with self.lock:
            gone = [fd for fd, (_f, ce) in self.fds.items() if ce]
        for fd in gone:
            self.close(fd)

    def close_all(self) -> None:
        with self.lock:
            entries, self.fds = list(self.fds.values()), {}
        for f, _ce in entries:
            f.decref()


class Root:
    """A directory that is ``/`` for the program."""

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        self.path = path
        #: refuse every change (EROFS): opens for writing, creating, removing, renaming
        self.readonly = readonly
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @staticmethod
    def join(base: str, path: str) -> str:
        """The guest path of ``path`` seen from guest directory ``base`` (textual, normalised;
        ``..`` above ``/`` stays at ``/``, as the kernel's RESOLVE_IN_ROOT does)."""
        full = path if path.startswith("/") else posixpath.join(base, path)
        norm = posixpath.normpath(full)
        if norm.startswith("//"):
            norm = "/" + norm.lstrip("/")
        return norm

    def open(self, guest_path: str, flags: int, mode: int = 0) -> int:
        """A host fd for ``guest_path`` (absolute guest path), resolved inside the root."""
        rel = guest_path.lstrip("/") or "."
        if self.readonly and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
            raise OSError(errno.EROFS, "read-only sandbox root")
        return openat2(self.fd, rel, flags, RESOLVE, mode)

    def parent(self, guest_path: str, *, write: bool = True) -> tuple[int, str]:
        """(host fd of the parent directory, last component) for operations on a name."""
        if write and self.readonly:
            raise OSError(errno.EROFS, "read-only sandbox root")
        norm = self.join("/", guest_path)
        head, name = posixpath.split(norm)
        if not name:  # the root itself
            name = "."
        fd = self.open(head or "/", os.O_PATH | os.O_DIRECTORY)
        return fd, name
