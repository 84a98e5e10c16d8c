"""The system-call table: number -> handler, each serving one Linux x86-64 call for a process.

A handler takes the process and the six argument registers and returns the value for RAX (a
result, or ``-errno``), or :data:`~virtkit.sandbox.process.NO_RETURN` when it set the registers
itself. Every guest pointer goes through the process's page tables (a bad one is EFAULT), every
length is bounded before the VMM allocates for it, and a number without a handler answers ENOSYS.

Numbers: Linux arch/x86/entry/syscalls/syscall_64.tbl (virtkit.host.syscalls_x86_64); structure
layouts: the x86-64 UAPI headers (struct stat: asm/stat.h; linux_dirent64: linux/dirent.h;
utsname: linux/utsname.h; timespec/timeval: linux/time_types.h; rusage: linux/resource.h;
sysinfo: linux/sysinfo.h; wait status encoding: bits/waitstatus.h).
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat as stat_mod
import struct
import threading
import time

from virtkit.arch.x86 import fpu_init_state
from virtkit.host.syscalls_x86_64 import SYSCALLS
from virtkit.sandbox import cpu, mm, signals
from virtkit.sandbox.files import AT_FDCWD, O_CLOEXEC, OpenFile, Root
from virtkit.sandbox.paging import Fault, OutOfMemory
from virtkit.sandbox.process import NO_RETURN, Process
from virtkit.sandbox.signals import Exited

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    Handler = Callable[..., object]

#: bound on one read/write the VMM performs for the program (bytes)
MAX_IO = 1 << 20
MAX_IOV = 1024
AT_EMPTY_PATH, AT_SYMLINK_NOFOLLOW, AT_REMOVEDIR = 0x1000, 0x100, 0x200
_STAT = struct.Struct("<QQQIIIIQqqqqqqqqq24x")
NAMES: dict[int, str] = {n: name for name, n in SYSCALLS.items()}

_table: dict[int, Handler] = {}


def syscall(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _table[SYSCALLS[name]] = fn
        return fn

    return register


def enosys(p: Process, *args: int) -> int:
    return -errno.ENOSYS


def build_table() -> list[Handler]:
    """The dispatch list, indexed by number (ENOSYS where there is no handler)."""
    size = max(_table) + 1
    return [_table.get(i, enosys) for i in range(size)]


def _s64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _s32(v: int) -> int:
    v &= 0xFFFF_FFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _errno(e: OSError) -> int:
    return -(e.errno or errno.EIO)


def _guard(fn: Handler) -> Handler:
    """Turn a bad guest pointer (Fault) or a host error (OSError) into -errno."""

    def wrapped(p: Process, *a: int) -> object:
        try:
            return fn(p, *a)
        except Fault:
            return -errno.EFAULT
        except OSError as e:
            return _errno(e)
        except OutOfMemory:
            return -errno.ENOMEM

    wrapped.__name__ = fn.__name__
    return wrapped


def guarded(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _table[SYSCALLS[name]] = _guard(fn)
        return fn

    return register


# --- paths ---------------------------------------------------------------------------------
def _path(p: Process, dirfd: int, va: int) -> str:
    raw = p.cstr(va, 4096)
    if not raw:
        raise OSError(errno.ENOENT, "empty path")
    base = p.cwd
    dirfd = _s32(dirfd)
    if not raw.startswith(b"/") and dirfd != AT_FDCWD:
        f = p.fds.get(dirfd)
        if f is None:
            raise OSError(errno.EBADF, "bad dirfd")
        if not f.is_dir:
            raise OSError(errno.ENOTDIR, "dirfd is not a directory")
        base = f.path
    return Root.join(base, os.fsdecode(raw))


def _stat_bytes(st: os.stat_result) -> bytes:
    return _STAT.pack(
        st.st_dev,
        st.st_ino,
        st.st_nlink,
        st.st_mode,
        st.st_uid,
        st.st_gid,
        0,
        st.st_rdev,
        st.st_size,
        st.st_blksize,
        st.st_blocks,
        int(st.st_atime),
        st.st_atime_ns % 1_000_000_000,
        int(st.st_mtime),
        st.st_mtime_ns % 1_000_000_000,
        int(st.st_ctime),
        st.st_ctime_ns % 1_000_000_000,
    )


def _stat_path(p: Process, path: str, follow: bool) -> os.stat_result:
    root = p.sandbox.root
    if follow:
        fd = root.open(path, os.O_PATH)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)
    pfd, name = root.parent(path, write=False)
    try:
        return os.stat(name, dir_fd=pfd, follow_symlinks=False)
    finally:
        os.close(pfd)


def _open(p: Process, path: str, flags: int, mode: int) -> int:
    host_flags = flags & ~O_CLOEXEC
    fd = p.sandbox.root.open(path, host_flags, mode & ~p.umask & 0o7777)
    try:
        is_dir = stat_mod.S_ISDIR(os.fstat(fd).st_mode)
    except OSError:
        is_dir = False
    return p.fds.install(OpenFile(fd, path, is_dir), cloexec=bool(flags & O_CLOEXEC))


@guarded("open")
def sys_open(p: Process, path: int, flags: int, mode: int, *_: int) -> int:
    return _open(p, _path(p, AT_FDCWD, path), _s32(flags), mode)


@guarded("openat")
def sys_openat(p: Process, dirfd: int, path: int, flags: int, mode: int, *_: int) -> int:
    return _open(p, _path(p, dirfd, path), _s32(flags), mode)


@guarded("creat")
def sys_creat(p: Process, path: int, mode: int, *_: int) -> int:
    return _open(p, _path(p, AT_FDCWD, path), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode)


@syscall("close")
def sys_close(p: Process, fd: int, *_: int) -> int:
    return p.fds.close(_s32(fd))


def _fd(p: Process, fd: int) -> OpenFile:
    f = p.fds.get(_s32(fd))
    if f is None:
        raise OSError(errno.EBADF, "bad fd")
    return f


def _sigpipe(p: Process) -> int:
    """A write to a pipe nobody reads: SIGPIPE (ends the writer unless handled or ignored)."""
    signals.post(p.sandbox, p, 13, sender=p)
    return -errno.EPIPE


@guarded("read")
def sys_read(p: Process, fd: int, buf: int, count: int, *_: int) -> int:
    f = _fd(p, fd)
    n = min(count, MAX_IO)
    if n == 0:
        return 0
    if not _writable(p, buf, n):
        return -errno.EFAULT
    data = os.read(f.fd, n)
    p.write(buf, data)
    return len(data)


def _writable(p: Process, va: int, n: int) -> bool:
    """Whether [va, va+n) can be written for the program (populating demand pages)."""
    space = p.mm.space
    try:
        for page in range(va & ~0xFFF, va + n, 4096):
            space._frame(page, True)
    except Fault:
        return False
    return True


@guarded("write")
def sys_write(p: Process, fd: int, buf: int, count: int, *_: int) -> int:
    f = _fd(p, fd)
    data = p.read(buf, min(count, MAX_IO))
    try:
        return os.write(f.fd, data)
    except BrokenPipeError:
        return _sigpipe(p)


@guarded("pread64")
def sys_pread(p: Process, fd: int, buf: int, count: int, off: int, *_: int) -> int:
    f = _fd(p, fd)
    n = min(count, MAX_IO)
    if not _writable(p, buf, n):
        return -errno.EFAULT
    data = os.pread(f.fd, n, _s64(off))
    p.write(buf, data)
    return len(data)


@guarded("pwrite64")
def sys_pwrite(p: Process, fd: int, buf: int, count: int, off: int, *_: int) -> int:
    f = _fd(p, fd)
    return os.pwrite(f.fd, p.read(buf, min(count, MAX_IO)), _s64(off))


def _iovecs(p: Process, iov: int, cnt: int) -> list[tuple[int, int]]:
    if cnt > MAX_IOV:
        raise OSError(errno.EINVAL, "iovcnt")
    raw = p.read(iov, 16 * cnt)
    return [struct.unpack_from("<QQ", raw, 16 * i) for i in range(cnt)]


@guarded("readv")
def sys_readv(p: Process, fd: int, iov: int, cnt: int, *_: int) -> int:
    f = _fd(p, fd)
    total = 0
    for base, ln in _iovecs(p, iov, cnt):
        if ln == 0:
            continue
        n = min(ln, MAX_IO)
        if not _writable(p, base, n):
            return total or -errno.EFAULT
        data = os.read(f.fd, n)
        p.write(base, data)
        total += len(data)
        if len(data) < n:
            break
    return total


@guarded("writev")
def sys_writev(p: Process, fd: int, iov: int, cnt: int, *_: int) -> int:
    f = _fd(p, fd)
    data = b"".join(p.read(base, min(ln, MAX_IO)) for base, ln in _iovecs(p, iov, cnt))
    try:
        return os.write(f.fd, data)
    except BrokenPipeError:
        return _sigpipe(p)


@guarded("lseek")
def sys_lseek(p: Process, fd: int, off: int, whence: int, *_: int) -> int:
    f = _fd(p, fd)
    if f.is_dir:
        if _s64(off) == 0 and whence == 0:
            f.dir_stream = None
            return 0
        return -errno.EINVAL
    return os.lseek(f.fd, _s64(off), whence)


@guarded("fstat")
def sys_fstat(p: Process, fd: int, buf: int, *_: int) -> int:
    p.write(buf, _stat_bytes(os.fstat(_fd(p, fd).fd)))
    return 0


@guarded("stat")
def sys_stat(p: Process, path: int, buf: int, *_: int) -> int:
    p.write(buf, _stat_bytes(_stat_path(p, _path(p, AT_FDCWD, path), True)))
    return 0


@guarded("lstat")
def sys_lstat(p: Process, path: int, buf: int, *_: int) -> int:
    p.write(buf, _stat_bytes(_stat_path(p, _path(p, AT_FDCWD, path), False)))
    return 0


@guarded("newfstatat")
def sys_newfstatat(p: Process, dirfd: int, path: int, buf: int, flags: int, *_: int) -> int:
    if flags & AT_EMPTY_PATH and path and p.cstr(path, 4096) == b"":
        if _s32(dirfd) == AT_FDCWD:
            st = _stat_path(p, p.cwd, True)
        else:
            st = os.fstat(_fd(p, dirfd).fd)
    else:
        st = _stat_path(p, _path(p, dirfd, path), not flags & AT_SYMLINK_NOFOLLOW)
    p.write(buf, _stat_bytes(st))
    return 0


@guarded("statx")
def sys_statx(p: Process, dirfd: int, path: int, flags: int, mask: int, buf: int, *_: int) -> int:
    if flags & AT_EMPTY_PATH and p.cstr(path, 4096) == b"":
        st = os.fstat(_fd(p, dirfd).fd) if _s32(dirfd) != AT_FDCWD else _stat_path(p, p.cwd, True)
    else:
        st = _stat_path(p, _path(p, dirfd, path), not flags & AT_SYMLINK_NOFOLLOW)

    def ts(sec: float, ns: int) -> bytes:
        return struct.pack("<qIi", int(sec), ns % 1_000_000_000, 0)

    out = struct.pack(
        "<IIQIIIHHQQQQ",
        0x7FF,  # STATX_BASIC_STATS
        st.st_blksize,
        0,
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_mode,
        0,
        st.st_ino,
        st.st_size,
        st.st_blocks,
        0,
    )
    out += (
        ts(st.st_atime, st.st_atime_ns) + ts(0, 0) + ts(st.st_ctime, st.st_ctime_ns) + ts(st.st_mtime, st.st_mtime_ns)
    )
    out += struct.pack("<IIII", os.major(st.st_rdev), os.minor(st.st_rdev), os.major(st.st_dev), os.minor(st.st_dev))
    p.write(buf, out.ljust(256, b"\0"))
    return 0


@guarded("getdents64")
def sys_getdents64(p: Process, fd: int, buf: int, count: int, *_: int) -> int:
    f = _fd(p, fd)
    if not f.is_dir:
        return -errno.ENOTDIR
    if f.dir_stream is None:
        entries: list[tuple[int, int, bytes]] = []
        st = os.fstat(f.fd)
        entries.append((st.st_ino, 4, b"."))
        entries.append((st.st_ino, 4, b".."))
        with os.scandir(f.fd) as it:
            for de in it:
                if len(entries) > 100_000:
                    break
                try:
                    t = (
                        4
                        if de.is_dir(follow_symlinks=False)
                        else 10
                        if de.is_symlink()
                        else 8
                        if de.is_file(follow_symlinks=False)
                        else 0
                    )
                    ino = de.inode()
                except OSError:
                    t, ino = 0, 0
                entries.append((ino, t, os.fsencode(de.name)))
        f.dir_stream = entries
    out = bytearray()
    limit = min(count, MAX_IO)
    stream = f.dir_stream
    while stream:
        ino, t, name = stream[0]
        reclen = (19 + len(name) + 1 + 7) & ~7
        if len(out) + reclen > limit:
            if not out:
                return -errno.EINVAL
            break
        out += struct.pack("<QqHB", ino, len(out) + reclen, reclen, t) + name + b"\0"
        out += bytes(reclen - 19 - len(name) - 1)
        stream.pop(0)
    p.write(buf, out)
    return len(out)


@guarded("readlink")
def sys_readlink(p: Process, path: int, buf: int, size: int, *_: int) -> int:
    return _readlink(p, _path(p, AT_FDCWD, path), buf, size)


@guarded("readlinkat")
def sys_readlinkat(p: Process, dirfd: int, path: int, buf: int, size: int, *_: int) -> int:
    return _readlink(p, _path(p, dirfd, path), buf, size)


def _readlink(p: Process, path: str, buf: int, size: int) -> int:
    if _s32(size) <= 0:
        return -errno.EINVAL
    if path == "/proc/self/exe":
        target = os.fsencode(p.exe)
    else:
        pfd, name = p.sandbox.root.parent(path, write=False)
        try:
            target = os.fsencode(os.readlink(name, dir_fd=pfd))
        finally:
            os.close(pfd)
    data = target[: min(size, 4096)]
    p.write(buf, data)
    return len(data)


def _access(p: Process, path: str, mode: int) -> int:
    fd = p.sandbox.root.open(path, os.O_PATH)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if mode & 1 and not st.st_mode & 0o111 and not stat_mod.S_ISDIR(st.st_mode):
        return -errno.EACCES
    return 0


@guarded("access")
def sys_access(p: Process, path: int, mode: int, *_: int) -> int:
    return _access(p, _path(p, AT_FDCWD, path), mode)


@guarded("faccessat")
def sys_faccessat(p: Process, dirfd: int, path: int, mode: int, *_: int) -> int:
    return _access(p, _path(p, dirfd, path), mode)


@guarded("faccessat2")
def sys_faccessat2(p: Process, dirfd: int, path: int, mode: int, *_: int) -> int:
    return _access(p, _path(p, dirfd, path), mode)


def _on_parent(p: Process, path: str, op: Callable[[str, int], None]) -> int:
    pfd, name = p.sandbox.root.parent(path)
    try:
        op(name, pfd)
    finally:
        os.close(pfd)
    return 0


@guarded("mkdir")
def sys_mkdir(p: Process, path: int, mode: int, *_: int) -> int:
    return _on_parent(p, _path(p, AT_FDCWD, path), lambda n, d: os.mkdir(n, mode & ~p.umask & 0o7777, dir_fd=d))


@guarded("mkdirat")
def sys_mkdirat(p: Process, dirfd: int, path: int, mode: int, *_: int) -> int:
    return _on_parent(p, _path(p, dirfd, path), lambda n, d: os.mkdir(n, mode & ~p.umask & 0o7777, dir_fd=d))


@guarded("unlink")
def sys_unlink(p: Process, path: int, *_: int) -> int:
    return _on_parent(p, _path(p, AT_FDCWD, path), lambda n, d: os.unlink(n, dir_fd=d))


@guarded("rmdir")
def sys_rmdir(p: Process, path: int, *_: int) -> int:
    return _on_parent(p, _path(p, AT_FDCWD, path), lambda n, d: os.rmdir(n, dir_fd=d))


@guarded("unlinkat")
def sys_unlinkat(p: Process, dirfd: int, path: int, flags: int, *_: int) -> int:
    if flags & AT_REMOVEDIR:
        return _on_parent(p, _path(p, dirfd, path), lambda n, d: os.rmdir(n, dir_fd=d))
    return _on_parent(p, _path(p, dirfd, path), lambda n, d: os.unlink(n, dir_fd=d))


@guarded("symlink")
def sys_symlink(p: Process, target: int, path: int, *_: int) -> int:
    t = os.fsdecode(p.cstr(target))
    return _on_parent(p, _path(p, AT_FDCWD, path), lambda n, d: os.symlink(t, n, dir_fd=d))


@guarded("symlinkat")
def sys_symlinkat(p: Process, target: int, dirfd: int, path: int, *_: int) -> int:
    t = os.fsdecode(p.cstr(target))
    return _on_parent(p, _path(p, dirfd, path), lambda n, d: os.symlink(t, n, dir_fd=d))


def _rename(p: Process, old: str, new: str) -> int:
    root = p.sandbox.root
    ofd, oname = root.parent(old)
    try:
        nfd, nname = root.parent(new)
        try:
            os.rename(oname, nname, src_dir_fd=ofd, dst_dir_fd=nfd)
        finally:
            os.close(nfd)
    finally:
        os.close(ofd)
    return 0


@guarded("rename")
def sys_rename(p: Process, old: int, new: int, *_: int) -> int:
    return _rename(p, _path(p, AT_FDCWD, old), _path(p, AT_FDCWD, new))


@guarded("renameat")
def sys_renameat(p: Process, ofd: int, old: int, nfd: int, new: int, *_: int) -> int:
    return _rename(p, _path(p, ofd, old), _path(p, nfd, new))


@guarded("renameat2")
def sys_renameat2(p: Process, ofd: int, old: int, nfd: int, new: int, flags: int, *_: int) -> int:
    if flags:
        return -errno.EINVAL
    return _rename(p, _path(p, ofd, old), _path(p, nfd, new))


@guarded("chmod")
def sys_chmod(p: Process, path: int, mode: int, *_: int) -> int:
    if p.sandbox.root.readonly:
        return -errno.EROFS
    fd = p.sandbox.root.open(_path(p, AT_FDCWD, path), os.O_RDONLY)
    try:
        os.fchmod(fd, mode & 0o7777)
    finally:
        os.close(fd)
    return 0


@guarded("fchmod")
def sys_fchmod(p: Process, fd: int, mode: int, *_: int) -> int:
    os.fchmod(_fd(p, fd).fd, mode & 0o7777)
    return 0


UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2


@guarded("utimensat")
def sys_utimensat(p: Process, dirfd: int, path: int, times: int, flags: int, *_: int) -> int:
    if p.sandbox.root.readonly:
        return -errno.EROFS
    if path:
        st_path = _path(p, dirfd, path)
        pfd, name = p.sandbox.root.parent(st_path)
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=not flags & AT_SYMLINK_NOFOLLOW)
            os.utime(name, ns=_times(p, times, st), dir_fd=pfd, follow_symlinks=not flags & AT_SYMLINK_NOFOLLOW)
        finally:
            os.close(pfd)
        return 0
    f = _fd(p, dirfd)
    os.utime(f.fd, ns=_times(p, times, os.fstat(f.fd)))
    return 0


def _times(p: Process, times: int, st: os.stat_result) -> tuple[int, int]:
    now = time.time_ns()
    if not times:
        return now, now
    a_s, a_ns, m_s, m_ns = struct.unpack("<qqqq", p.read(times, 32))

    def one(sec: int, ns: int, current: int) -> int:
        if ns == UTIME_NOW:
            return now
        if ns == UTIME_OMIT:
            return current
        if not 0 <= ns < 1_000_000_000:
            raise OSError(errno.EINVAL, "bad timespec")
        return sec * 1_000_000_000 + ns

    return one(a_s, a_ns, st.st_atime_ns), one(m_s, m_ns, st.st_mtime_ns)


@guarded("ftruncate")
def sys_ftruncate(p: Process, fd: int, length: int, *_: int) -> int:
    os.ftruncate(_fd(p, fd).fd, _s64(length))
    return 0


@guarded("fsync")
def sys_fsync(p: Process, fd: int, *_: int) -> int:
    _fd(p, fd)
    return 0


@guarded("getcwd")
def sys_getcwd(p: Process, buf: int, size: int, *_: int) -> int:
    data = os.fsencode(p.cwd) + b"\0"
    if len(data) > size:
        return -errno.ERANGE
    p.write(buf, data)
    return len(data)


@guarded("chdir")
def sys_chdir(p: Process, path: int, *_: int) -> int:
    guest = _path(p, AT_FDCWD, path)
    fd = p.sandbox.root.open(guest, os.O_PATH | os.O_DIRECTORY)
    os.close(fd)
    p.cwd = guest
    return 0


@guarded("fchdir")
def sys_fchdir(p: Process, fd: int, *_: int) -> int:
    f = _fd(p, fd)
    if not f.is_dir:
        return -errno.ENOTDIR
    p.cwd = f.path
    return 0


@syscall("umask")
def sys_umask(p: Process, mask: int, *_: int) -> int:
    old, p.umask = p.umask, mask & 0o777
    return old


# --- descriptors ---------------------------------------------------------------------------
@guarded("dup")
def sys_dup(p: Process, fd: int, *_: int) -> int:
    return p.fds.install(_fd(p, fd).incref())


@guarded("dup2")
def sys_dup2(p: Process, fd: int, new: int, *_: int) -> int:
    f = _fd(p, fd)
    new = _s32(new)
    if new == _s32(fd):
        return new
    if not 0 <= new < 1024:
        return -errno.EBADF
    return p.fds.install(f.incref(), exact=new)


@guarded("dup3")
def sys_dup3(p: Process, fd: int, new: int, flags: int, *_: int) -> int:
    f = _fd(p, fd)
    new = _s32(new)
    if new == _s32(fd) or flags & ~O_CLOEXEC:
        return -errno.EINVAL
    if not 0 <= new < 1024:
        return -errno.EBADF
    return p.fds.install(f.incref(), cloexec=bool(flags & O_CLOEXEC), exact=new)


@guarded("fcntl")
def sys_fcntl(p: Process, fd: int, cmd: int, arg: int, *_: int) -> int:
    f = _fd(p, fd)
    gfd = _s32(fd)
    if cmd in (0, 1030):  # F_DUPFD, F_DUPFD_CLOEXEC
        return p.fds.install(f.incref(), cloexec=cmd == 1030, lowest=max(0, _s32(arg)))
    if cmd == 1:  # F_GETFD
        return 1 if p.fds.cloexec(gfd) else 0
    if cmd == 2:  # F_SETFD
        p.fds.set_cloexec(gfd, bool(arg & 1))
        return 0
    if cmd == 3:  # F_GETFL
        return fcntl.fcntl(f.fd, fcntl.F_GETFL)
    if cmd == 4:  # F_SETFL
        return fcntl.fcntl(f.fd, fcntl.F_SETFL, arg & (os.O_APPEND | os.O_NONBLOCK))
    return -errno.EINVAL


@guarded("pipe")
def sys_pipe(p: Process, fds: int, *_: int) -> int:
    return _pipe(p, fds, 0)


@guarded("pipe2")
def sys_pipe2(p: Process, fds: int, flags: int, *_: int) -> int:
    return _pipe(p, fds, flags)


def _pipe(p: Process, fds: int, flags: int) -> int:
    if flags & ~(O_CLOEXEC | os.O_NONBLOCK):
        return -errno.EINVAL
    if not _writable(p, fds, 8):
        return -errno.EFAULT
    r, w = os.pipe2(os.O_CLOEXEC | (flags & os.O_NONBLOCK))
    ce = bool(flags & O_CLOEXEC)
    gr = p.fds.install(OpenFile(r, "pipe:[r]"), cloexec=ce)
    if gr < 0:
        os.close(w)
        return gr
    gw = p.fds.install(OpenFile(w, "pipe:[w]"), cloexec=ce)
    if gw < 0:
        p.fds.close(gr)
        return gw
    p.write(fds, struct.pack("<ii", gr, gw))
    return 0


TCGETS, TCSETS, TCSETSW, TCSETSF, TIOCGWINSZ, TIOCGPGRP, TIOCSPGRP = (
    0x5401,
    0x5402,
    0x5403,
    0x5404,
    0x5413,
    0x540F,
    0x5410,
)


@guarded("ioctl")
def sys_ioctl(p: Process, fd: int, req: int, arg: int, *_: int) -> int:
    f = _fd(p, fd)
    req &= 0xFFFF_FFFF
    if not os.isatty(f.fd):
        return -errno.ENOTTY
    if req == TCGETS:
        p.write(arg, fcntl.ioctl(f.fd, TCGETS, bytes(60)))
        return 0
    if req in (TCSETS, TCSETSW, TCSETSF):
        fcntl.ioctl(f.fd, req, p.read(arg, 60))
        return 0
    if req == TIOCGWINSZ:
        p.write(arg, fcntl.ioctl(f.fd, TIOCGWINSZ, bytes(8)))
        return 0
    if req == TIOCGPGRP:
        p.write(arg, struct.pack("<i", p.pgid))
        return 0
    if req == TIOCSPGRP:
        return 0
    return -errno.ENOTTY


@guarded("sendfile")
def sys_sendfile(p: Process, out_fd: int, in_fd: int, offp: int, count: int, *_: int) -> int:
    src, dst = _fd(p, in_fd), _fd(p, out_fd)
    n = min(count, MAX_IO)
    if offp:
        off = _s64(p.mm.space.read_u64(offp))
        data = os.pread(src.fd, n, off)
        p.mm.space.write_u64(offp, off + len(data))
    else:
        data = os.read(src.fd, n)
    try:
        return os.write(dst.fd, data) if data else 0
    except BrokenPipeError:
        return _sigpipe(p)


@guarded("poll")
def sys_poll(p: Process, fds: int, nfds: int, timeout: int, *_: int) -> int:
    import select

    if nfds > 1024:
        return -errno.EINVAL
    raw = bytearray(p.read(fds, 8 * nfds))
    poller = select.poll()
    index: dict[int, list[int]] = {}
    for i in range(nfds):
        gfd, events, _r = struct.unpack_from("<ihh", raw, 8 * i)
        f = p.fds.get(gfd)
        if f is None:
            struct.pack_into("<h", raw, 8 * i + 6, 0x20 if gfd >= 0 else 0)  # POLLNVAL
            continue
        poller.register(f.fd, events & 0xFFFF)
        index.setdefault(f.fd, []).append(i)
    ready = poller.poll(_s32(timeout) if _s32(timeout) >= 0 else None)
    for hfd, rev in ready:
        for i in index.get(hfd, []):
            struct.pack_into("<h", raw, 8 * i + 6, rev)
    p.write(fds, raw)
    return sum(1 for i in range(nfds) if struct.unpack_from("<h", raw, 8 * i + 6)[0])


# --- memory --------------------------------------------------------------------------------
@syscall("brk")
def sys_brk(p: Process, addr: int, *_: int) -> int:
    if addr == 0:
        return p.mm.brk
    return p.mm.set_brk(addr)


@guarded("mmap")
def sys_mmap(p: Process, addr: int, length: int, prot: int, flags: int, fd: int, off: int) -> int:
    host_fd = None
    if not flags & mm.MAP_ANONYMOUS:
        host_fd = _fd(p, fd).fd
    return p.mm.mmap(addr, length, prot & 7, flags, host_fd, off)


@syscall("munmap")
def sys_munmap(p: Process, addr: int, length: int, *_: int) -> int:
    return p.mm.unmap(addr, length)


@syscall("mprotect")
def sys_mprotect(p: Process, addr: int, length: int, prot: int, *_: int) -> int:
    return p.mm.protect(addr, length, prot & 7)


@syscall("madvise")
def sys_madvise(p: Process, addr: int, length: int, advice: int, *_: int) -> int:
    if advice in (4, 8):  # MADV_DONTNEED, MADV_FREE: anonymous pages read back as zero
        return p.mm.discard(addr, length)
    return 0  # the other advice changes nothing a program can observe here


@guarded("mremap")
def sys_mremap(p: Process, old: int, old_len: int, new_len: int, flags: int, new_addr: int, *_: int) -> int:
    """Served by copying into a fresh mapping (MREMAP_MAYMOVE) or shrinking in place."""
    if old & 0xFFF or new_len == 0 or new_len > 1 << 40:
        return -errno.EINVAL
    old_len, new_len = mm.page_up(old_len), mm.page_up(new_len)
    v = p.mm.find(old)
    if v is None or old + old_len > v.end:
        return -errno.EFAULT
    if new_len <= old_len:
        if new_len < old_len:
            p.mm.unmap(old + new_len, old_len - new_len)
        return old
    if p.mm.is_free(old + old_len, old + new_len):
        v_end = v.end
        if v_end == old + old_len:
            v.end = old + new_len
            return old
    if not flags & 1:  # MREMAP_MAYMOVE
        return -errno.ENOMEM
    dst = p.mm.mmap(0, new_len, v.prot, mm.MAP_PRIVATE | mm.MAP_ANONYMOUS, None, 0)
    if dst < 0:
        return dst
    space = p.mm.space
    for off in range(0, old_len, 4096):
        e = space.lookup(old + off)
        if e & 0x000F_FFFF_FFFF_F000:
            space.map_page(dst + off, p.mm.frames.alloc(zero=False), e & ~0x000F_FFFF_FFFF_F000)
            src_gpa, dst_gpa = e & 0x000F_FFFF_FFFF_F000, space.lookup(dst + off) & 0x000F_FFFF_FFFF_F000
            space.ram[dst_gpa : dst_gpa + 4096] = space.ram[src_gpa : src_gpa + 4096]
    p.mm.unmap(old, old_len)
    return dst


# --- process identity and limits -------------------------------------------------------------
@syscall("getpid")
def sys_getpid(p: Process, *_: int) -> int:
    return p.pid


@syscall("gettid")
def sys_gettid(p: Process, *_: int) -> int:
    return p.pid


@syscall("getppid")
def sys_getppid(p: Process, *_: int) -> int:
    return p.ppid


def _zero(p: Process, *_: int) -> int:
    return 0


for _name in (
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "setuid",
    "setgid",
    "setgroups",
    "sigaltstack",
    "set_robust_list",
    "sched_yield",
    "sync",
    "fadvise64",
    "flock",
    "fdatasync",
):
    _table[SYSCALLS[_name]] = _zero


@syscall("getpgrp")
def sys_getpgrp(p: Process, *_: int) -> int:
    return p.pgid


@syscall("getpgid")
def sys_getpgid(p: Process, pid: int, *_: int) -> int:
    return p.pgid


@syscall("setpgid")
def sys_setpgid(p: Process, pid: int, pgid: int, *_: int) -> int:
    if pid in (0, p.pid):
        p.pgid = pgid or p.pid
    return 0


@syscall("getsid")
def sys_getsid(p: Process, *_: int) -> int:
    return p.sid


@syscall("setsid")
def sys_setsid(p: Process, *_: int) -> int:
    p.sid = p.pgid = p.pid
    return p.pid


@guarded("set_tid_address")
def sys_set_tid_address(p: Process, addr: int, *_: int) -> int:
    p.clear_tid = addr
    return p.pid


@guarded("arch_prctl")
def sys_arch_prctl(p: Process, code: int, addr: int, *_: int) -> int:
    if code == 0x1002:  # ARCH_SET_FS
        if addr >= 0x0000_8000_0000_0000:
            return -errno.EPERM
        p.set_fs_base(addr)
        return 0
    if code == 0x1003:  # ARCH_GET_FS
        p.mm.space.write_u64(addr, p.fs_base)
        return 0
    return -errno.EINVAL


@guarded("uname")
def sys_uname(p: Process, buf: int, *_: int) -> int:
    fields = (b"Linux", b"sandbox", b"6.1.0-virtkit-sandbox", b"#1 virtkit sandbox", b"x86_64", b"(none)")
    p.write(buf, b"".join(f.ljust(65, b"\0") for f in fields))
    return 0


@guarded("prlimit64")
def sys_prlimit64(p: Process, pid: int, resource: int, new: int, old: int, *_: int) -> int:
    return _prlimit(p, resource, old)


def _prlimit(p: Process, resource: int, old: int) -> int:
    if old:
        lim = {3: (8 << 20, 1 << 63), 7: (1024, 1024)}.get(resource, ((1 << 64) - 1, (1 << 64) - 1))
        p.write(old, struct.pack("<QQ", lim[0] & ((1 << 64) - 1), lim[1] & ((1 << 64) - 1)))
    return 0


@guarded("getrlimit")
def sys_getrlimit(p: Process, resource: int, old: int, *_: int) -> int:
    return _prlimit(p, resource, old)


@guarded("getrusage")
def sys_getrusage(p: Process, who: int, buf: int, *_: int) -> int:
    p.write(buf, bytes(144))
    return 0


@guarded("sysinfo")
def sys_sysinfo(p: Process, buf: int, *_: int) -> int:
    total = p.mm.frames.end
    free = total - p.mm.frames.in_use * 4096
    uptime = int(time.monotonic())
    p.write(
        buf,
        struct.pack(
            "<q3Q6QHH4xQQI", uptime, 0, 0, 0, total, max(free, 0), 0, 0, 0, 0, len(p.sandbox.procs), 0, 0, 0, 1
        ).ljust(112, b"\0"),
    )
    return 0


@guarded("getrandom")
def sys_getrandom(p: Process, buf: int, n: int, flags: int, *_: int) -> int:
    n = min(n, MAX_IO)
    p.write(buf, secrets.token_bytes(n))
    return n


# --- time ----------------------------------------------------------------------------------
_CLOCKS = {
    0: time.CLOCK_REALTIME,
    1: time.CLOCK_MONOTONIC,
    2: time.CLOCK_PROCESS_CPUTIME_ID,
    3: time.CLOCK_THREAD_CPUTIME_ID,
    4: time.CLOCK_MONOTONIC_RAW,
    5: time.CLOCK_REALTIME,
    6: time.CLOCK_MONOTONIC,
    7: time.CLOCK_BOOTTIME,
}


@guarded("clock_gettime")
def sys_clock_gettime(p: Process, clk: int, ts: int, *_: int) -> int:
    c = _CLOCKS.get(clk)
    if c is None:
        return -errno.EINVAL
    ns = time.clock_gettime_ns(c)
    p.write(ts, struct.pack("<qq", ns // 1_000_000_000, ns % 1_000_000_000))
    return 0


@guarded("clock_getres")
def sys_clock_getres(p: Process, clk: int, ts: int, *_: int) -> int:
    if ts:
        p.write(ts, struct.pack("<qq", 0, 1))
    return 0


@guarded("gettimeofday")
def sys_gettimeofday(p: Process, tv: int, tz: int, *_: int) -> int:
    ns = time.time_ns()
    if tv:
        p.write(tv, struct.pack("<qq", ns // 1_000_000_000, (ns // 1000) % 1_000_000))
    return 0


@guarded("time")
def sys_time(p: Process, t: int, *_: int) -> int:
    now = int(time.time())
    if t:
        p.mm.space.write_u64(t, now)
    return now


def _sleep(p: Process, req: int) -> int:
    sec, nsec = struct.unpack("<qq", p.read(req, 16))
    if sec < 0 or not 0 <= nsec < 1_000_000_000:
        return -errno.EINVAL
    deadline = time.monotonic() + min(sec, 1 << 31) + nsec / 1e9
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or p.kill_signal:
            break
        if signals.deliverable(p):
            return -errno.EINTR
        time.sleep(min(left, 0.1))
    if p.kill_signal:
        p.status = p.kill_signal
        raise Exited
    return 0


@guarded("nanosleep")
def sys_nanosleep(p: Process, req: int, rem: int, *_: int) -> int:
    return _sleep(p, req)


@guarded("clock_nanosleep")
def sys_clock_nanosleep(p: Process, clk: int, flags: int, req: int, rem: int, *_: int) -> int:
    if flags & 1:  # TIMER_ABSTIME
        sec, nsec = struct.unpack("<qq", p.read(req, 16))
        c = _CLOCKS.get(clk, time.CLOCK_MONOTONIC)
        left = sec * 1_000_000_000 + nsec - time.clock_gettime_ns(c)
        if left <= 0:
            return 0
        return _sleep_ns(p, left)
    return _sleep(p, req)


def _sleep_ns(p: Process, ns: int) -> int:
    deadline = time.monotonic() + ns / 1e9
    while not p.kill_signal and time.monotonic() < deadline:
        time.sleep(min(0.1, deadline - time.monotonic()))
    return 0


# --- signals (recorded; only default actions are carried out, docs/SANDBOX.md) --------------
@guarded("rt_sigaction")
def sys_rt_sigaction(p: Process, sig: int, act: int, oldact: int, size: int, *_: int) -> int:
    if not 1 <= sig <= 64 or sig in (9, 19) and act:
        return -errno.EINVAL
    old = p.sigactions.get(sig, bytes(32))
    if act:
        p.sigactions[sig] = p.read(act, 32)
    if oldact:
        p.write(oldact, old)
    return 0


@guarded("rt_sigprocmask")
def sys_rt_sigprocmask(p: Process, how: int, new: int, old: int, size: int, *_: int) -> int:
    if old:
        p.mm.space.write_u64(old, p.sigmask)
    if new:
        m = p.mm.space.read_u64(new)
        if how == 0:
            p.sigmask |= m
        elif how == 1:
            p.sigmask &= ~m
        elif how == 2:
            p.sigmask = m
        else:
            return -errno.EINVAL
    return 0


def _signal(p: Process, pid: int, sig: int) -> int:
    sb = p.sandbox
    pid = _s32(pid)
    with sb.lock:
        if pid > 0:
            targets = [sb.procs[pid]] if pid in sb.procs else []
        elif pid == 0:
            targets = [q for q in sb.procs.values() if q.pgid == p.pgid]
        elif pid == -1:
            targets = [q for q in sb.procs.values() if q.pid != 1]
        else:
            targets = [q for q in sb.procs.values() if q.pgid == -pid]
    targets = [q for q in targets if q.status is None]
    if not targets:
        return -errno.ESRCH
    if not 0 <= sig <= 64:
        return -errno.EINVAL
    if sig == 0:
        return 0
    for q in targets:
        signals.post(sb, q, sig, sender=p)
    return 0


@syscall("rt_sigreturn")
def sys_rt_sigreturn(p: Process, *_: int) -> object:
    signals.sigreturn(p)
    return NO_RETURN


@syscall("kill")
def sys_kill(p: Process, pid: int, sig: int, *_: int) -> int:
    return _signal(p, pid, sig)


@syscall("tgkill")
def sys_tgkill(p: Process, tgid: int, tid: int, sig: int, *_: int) -> int:
    return _signal(p, tid, sig)


@syscall("tkill")
def sys_tkill(p: Process, tid: int, sig: int, *_: int) -> int:
    return _signal(p, tid, sig)


@syscall("futex")
def sys_futex(p: Process, addr: int, op: int, val: int, *_: int) -> int:
    cmd = op & 0x7F
    if cmd == 1:  # FUTEX_WAKE: one thread per process, nobody to wake
        return 0
    if cmd == 0:  # FUTEX_WAIT: with no other thread it could only sleep forever
        return -errno.EAGAIN
    return -errno.ENOSYS


# --- processes -----------------------------------------------------------------------------
@syscall("exit")
def sys_exit(p: Process, code: int, *_: int) -> int:
    p.status = (code & 0xFF) << 8
    raise Exited


@syscall("exit_group")
def sys_exit_group(p: Process, code: int, *_: int) -> int:
    p.status = (code & 0xFF) << 8
    raise Exited


def _fork(p: Process, vfork: bool) -> int:
    sb = p.sandbox
    assert p.vcpu is not None
    # the registers at the exit: the program's own (both stubs leave them alone), RCX/R11 the
    # return address and RFLAGS the child resumes with
    parent_regs = p.vcpu.get_regs()
    child_mm = p.mm.clone()
    child = Process(sb, sb.new_pid(), p.pid, child_mm, p.fds.fork(), p.cwd)
    child.pgid, child.sid, child.umask = p.pgid, p.sid, p.umask
    child.sigactions = dict(p.sigactions)
    child.sigmask = p.sigmask
    child.fs_base = p.fs_base
    child.exe = p.exe
    from virtkit.kvm import structs as S

    regs = S.kvm_regs.from_buffer_copy(parent_regs)
    regs.rax = 0
    regs.rip, regs.rflags = regs.rcx, regs.r11
    if vfork:
        child.vfork_done = threading.Event()
    with sb.lock:
        p.children.add(child.pid)
    sb.start(child, regs)
    if vfork and child.vfork_done is not None:
        child.vfork_done.wait()
    return child.pid


@syscall("fork")
def sys_fork(p: Process, *_: int) -> int:
    return _fork(p, False)


@syscall("vfork")
def sys_vfork(p: Process, *_: int) -> int:
    return _fork(p, True)


CLONE_VM, CLONE_VFORK, CLONE_THREAD, CLONE_SETTLS = 0x100, 0x4000, 0x10000, 0x80000
CLONE_PARENT_SETTID, CLONE_CHILD_CLEARTID, CLONE_CHILD_SETTID = 0x100000, 0x200000, 0x1000000


@guarded("clone")
def sys_clone(p: Process, flags: int, stack: int, ptid: int, ctid: int, tls: int, *_: int) -> int:
    if flags & CLONE_THREAD:
        return -errno.ENOSYS  # threads (a vCPU sharing the address space) are not served yet
    if flags & CLONE_VM and not flags & CLONE_VFORK:
        return -errno.ENOSYS
    if stack and not flags & CLONE_VFORK:
        return -errno.ENOSYS
    pid = _fork(p, bool(flags & CLONE_VFORK))
    if flags & CLONE_PARENT_SETTID and ptid:
        p.write(ptid, struct.pack("<i", pid))
    return pid


@syscall("execve")
def sys_execve(p: Process, path: int, argv: int, envp: int, *_: int) -> object:
    return _execve(p, AT_FDCWD, path, argv, envp)


@syscall("execveat")
def sys_execveat(p: Process, dirfd: int, path: int, argv: int, envp: int, *_: int) -> object:
    return _execve(p, dirfd, path, argv, envp)


def _execve(p: Process, dirfd: int, path: int, argv: int, envp: int) -> object:
    from virtkit.kvm import structs as S

    sb = p.sandbox
    try:
        guest = _path(p, dirfd, path)
        args = p.string_array(argv)
        env = p.string_array(envp)
        new_mm, entry, rsp = sb.load_program(p.cwd, os.fsencode(guest), args or [os.fsencode(guest)], env)
    except Fault:
        return -errno.EFAULT
    except OSError as e:
        return _errno(e)
    old = p.mm
    p.mm = new_mm
    old.destroy()
    p.fds.exec()
    p.exe = guest
    p.sigactions = {s: a for s, a in p.sigactions.items() if struct.unpack_from("<Q", a)[0] == 1}
    assert p.vcpu is not None
    regs = S.kvm_regs()
    regs.rip, regs.rsp, regs.rflags = entry, rsp, cpu.RFLAGS_USER
    p.vcpu.set_regs(regs)
    sregs = p.vcpu.get_sregs()
    sregs.cr3 = new_mm.space.pml4
    sregs.fs.base = 0
    cpu.user_segments(sregs)
    p.vcpu.set_sregs(sregs)
    p.cr3, p.fs_base = new_mm.space.pml4, 0
    p.vcpu.set_fpu(fpu_init_state())
    if p.vfork_done is not None:
        p.vfork_done.set()
        p.vfork_done = None
    return NO_RETURN


@guarded("wait4")
def sys_wait4(p: Process, pid: int, status: int, options: int, rusage: int, *_: int) -> int:
    sb = p.sandbox
    pid = _s32(pid)
    if status and not _writable(p, status, 4):
        return -errno.EFAULT
    with sb.lock:
        while True:
            mine = [sb.procs[c] for c in p.children if c in sb.procs]
            if pid > 0:
                mine = [c for c in mine if c.pid == pid]
            elif pid == 0:
                mine = [c for c in mine if c.pgid == p.pgid]
            elif pid < -1:
                mine = [c for c in mine if c.pgid == -pid]
            if not mine:
                return -errno.ECHILD
            done = next((c for c in mine if c.status is not None and c.vcpu is None), None)
            if done is not None:
                sb.procs.pop(done.pid, None)
                p.children.discard(done.pid)
                break
            if options & 1:  # WNOHANG
                return 0
            if signals.deliverable(p):
                return -errno.EINTR
            if p.kill_signal:
                p.status = p.kill_signal
                raise Exited
            sb.changed.wait(0.5)
    assert done.status is not None
    if status:
        p.write(status, struct.pack("<i", done.status))
    if rusage:
        p.write(rusage, bytes(144))
    return done.pid


# --- the rest: refused on purpose (no network, no namespaces, no ptrace...) ------------------
def _eacces(p: Process, *_: int) -> int:
    return -errno.EACCES


for _name in ("socket", "socketpair"):
    _table[SYSCALLS[_name]] = lambda p, *a: -errno.EAFNOSUPPORT
for _name in (
    "ptrace",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "reboot",
    "init_module",
    "kexec_load",
    "bpf",
    "perf_event_open",
    "iopl",
    "ioperm",
    "swapon",
    "swapoff",
    "sethostname",
    "setdomainname",
):
    _table[SYSCALLS[_name]] = lambda p, *a: -errno.EPERM

#: numbers served (not ENOSYS), for docs and tests
SERVED = frozenset(_table)
