"""The one ctypes handle on the C library: the Linux system calls Python 3.11's ``os`` module
lacks, and the few libc functions the VMM calls through ctypes, and nothing else.

The wrappers are thin and typed and raise :class:`OSError` with the errno, like ``os`` does; no
policy. Numbers are x86-64 (``asm/unistd_64.h``) and the flag values come from the kernel UAPI
headers named next to each group.

The prototyped functions at the end (``c_ioctl``, ``c_mmap``, ``c_munmap``, ``c_memcmp``) are the
raw ctypes function objects, errno kept (read it with :func:`ctypes.get_errno`): the vCPU loop,
guest memory and the dirty-page scans call them per exit or per page, so their modules import
them once at module level and call them with no wrapper in between.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# --- prototyped libc functions, called directly by hot paths (no wrapper: see the docstring) ---
#: ioctl(2) whose argument is an unsigned long value wider than a C int (an address); returns -1
#: with errno set on failure
c_ioctl = _libc.ioctl
c_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
c_ioctl.restype = ctypes.c_int
#: mmap(2): returns the address, or MAP_FAILED (``ctypes.c_void_p(-1).value``) with errno set
c_mmap = _libc.mmap
c_mmap.restype = ctypes.c_void_p
c_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
c_munmap = _libc.munmap
c_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
#: memcmp(3) on two addresses (guest RAM against a zero buffer, without copying it into Python)
c_memcmp = _libc.memcmp
c_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
c_memcmp.restype = ctypes.c_int

# --- linux/sched.h: namespace flags ---------------------------------------------------------
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

#: OCI namespace type -> (clone flag, name of the /proc/PID/ns link)
NAMESPACES: dict[str, tuple[int, str]] = {
    "user": (CLONE_NEWUSER, "user"),
    "pid": (CLONE_NEWPID, "pid"),
    "network": (CLONE_NEWNET, "net"),
    "ipc": (CLONE_NEWIPC, "ipc"),
    "uts": (CLONE_NEWUTS, "uts"),
    "mount": (CLONE_NEWNS, "mnt"),
    "cgroup": (CLONE_NEWCGROUP, "cgroup"),
    "time": (CLONE_NEWTIME, "time"),
}

# --- linux/mount.h -------------------------------------------------------------------------
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
MNT_FORCE = 1
MNT_DETACH = 2

# --- linux/prctl.h -------------------------------------------------------------------------
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_SET_NAME = 15
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

# --- syscall numbers (x86-64) ----------------------------------------------------------------
SYS_capget = 125
SYS_capset = 126
SYS_pivot_root = 155
SYS_setns = 308
SYS_seccomp = 317
SYS_bpf = 321
SYS_statx = 332
SYS_pidfd_send_signal = 424
SYS_open_tree = 428
SYS_move_mount = 429
SYS_fsopen = 430
SYS_fsconfig = 431
SYS_fsmount = 432
SYS_close_range = 436
SYS_openat2 = 437
SYS_mount_setattr = 442

# --- linux/seccomp.h -----------------------------------------------------------------------
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_FILTER_FLAG_LOG = 2
SECCOMP_FILTER_FLAG_SPEC_ALLOW = 4

CLOSE_RANGE_CLOEXEC = 1 << 2

# --- linux/openat2.h: struct open_how.resolve ------------------------------------------------
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# --- linux/fcntl.h, linux/mount.h: the fd-based mount API (5.2+; mount_setattr 5.12+) ---------
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40
FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOUNT_ATTR_RDONLY = 0x01
MOUNT_ATTR_NOSUID = 0x02
MOUNT_ATTR_NODEV = 0x04
MOUNT_ATTR_NOEXEC = 0x08
MOUNT_ATTR__ATIME = 0x70
MOUNT_ATTR_RELATIME = 0x00
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
MOUNT_ATTR_NOSYMFOLLOW = 0x200000

# --- statfs f_type (linux/magic.h) -------------------------------------------------------------
PROC_SUPER_MAGIC = 0x9FA0
TMPFS_MAGIC = 0x01021994
CGROUP_SUPER_MAGIC = 0x27E0EB
CGROUP2_SUPER_MAGIC = 0x63677270

STATX_MNT_ID = 0x1000

_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _check(ret: int, what: str, path: str | None = None) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        if path is not None:
            raise OSError(err, f"{what}: {os.strerror(err)}", path)
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _b(value: str | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return os.fsencode(value)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_syscall(SYS_setns, ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    ret = _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data))
    _check(ret, f"mount {fstype or ''} {source or ''} on {target}".replace("  ", " "), target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), "umount", target)


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_syscall(SYS_pivot_root, _b(new_root), _b(put_old)), "pivot_root", new_root)


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname")


def setdomainname(name: str) -> None:
    raw = name.encode()
    _check(_libc.setdomainname(raw, ctypes.c_size_t(len(raw))), "setdomainname")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    ret = _libc.prctl(
        ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)
    )
    return _check(ret, f"prctl({option})")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def capget(pid: int = 0) -> tuple[int, int, int]:
    """Return (effective, permitted, inheritable) as 64-bit masks."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, pid)
    data = (_CapData * 2)()
    _check(_syscall(SYS_capget, ctypes.byref(hdr), ctypes.byref(data)), "capget")
    eff, prm, inh = (
        int(getattr(data[0], f)) | (int(getattr(data[1], f)) << 32) for f in ("effective", "permitted", "inheritable")
    )
    return eff, prm, inh


def capset(effective: int, permitted: int, inheritable: int) -> None:
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    _check(_syscall(SYS_capset, ctypes.byref(hdr), ctypes.byref(data)), "capset")


def seccomp_set_filter(program: bytes, flags: int = 0) -> None:
    """Install a classic-BPF seccomp filter; ``program`` is packed ``struct sock_filter``s."""
    count = len(program) // 8
    buf = ctypes.create_string_buffer(program, len(program))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; } (padded to 16 bytes)
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", count, ctypes.addressof(buf)), 16)
    _check(_syscall(SYS_seccomp, ctypes.c_uint(SECCOMP_SET_MODE_FILTER), ctypes.c_uint(flags), fprog), "seccomp")


def close_range_cloexec(first: int) -> None:
    """Mark every fd >= first close-on-exec (kernel 5.11+)."""
    _check(
        _syscall(SYS_close_range, ctypes.c_uint(first), ctypes.c_uint(0xFFFFFFFF), ctypes.c_uint(CLOSE_RANGE_CLOEXEC)),
        "close_range",
    )


def bpf(cmd: int, attr: bytes) -> int:
    """bpf(2) with ``attr`` (a packed ``union bpf_attr``, copied to a buffer of its own size);
    returns what the kernel returned (an fd for BPF_PROG_LOAD, 0 for BPF_PROG_ATTACH)."""
    buf = ctypes.create_string_buffer(attr, len(attr))
    ret = _syscall(ctypes.c_long(SYS_bpf), ctypes.c_int(cmd), buf, ctypes.c_uint(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def ptrace(request: int, pid: int, addr: int = 0, data: int = 0) -> int:
    """ptrace(2); returns the kernel's answer, or -1 with errno set: the caller decides (a probe
    of what a confined process may do reports the -1 rather than raising)."""
    return int(_libc.ptrace(ctypes.c_int(request), ctypes.c_int(pid), ctypes.c_void_p(addr), ctypes.c_void_p(data)))


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    _check(
        _syscall(SYS_pidfd_send_signal, ctypes.c_int(pidfd), ctypes.c_int(sig), None, ctypes.c_uint(0)),
        "pidfd_send_signal",
    )


# --- paths resolved by the kernel, and mounts made on file descriptors --------------------------


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): open ``path`` relative to ``dirfd`` with the ``RESOLVE_*`` rules enforced by the
    kernel during the walk itself (so nothing can be swapped in between a check and the open).
    The returned fd is close-on-exec. Retries the EAGAIN the kernel returns when a concurrent
    rename makes a ``..`` step of RESOLVE_IN_ROOT/BENEATH ambiguous."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    raw = os.fsencode(path)
    for _ in range(64):
        ret = _syscall(SYS_openat2, ctypes.c_int(dirfd), raw, ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if ret >= 0:
            return int(ret)
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EINTR):
            raise OSError(err, f"openat2: {os.strerror(err)}", path)
    raise OSError(errno.EAGAIN, "openat2: the path kept changing while it was resolved", path)


def mount_id(fd: int) -> int:
    """The id of the mount ``fd`` is on (statx STATX_MNT_ID; the same number /proc/PID/mountinfo
    and fdinfo show), read without going through /proc."""
    buf = ctypes.create_string_buffer(256)
    _check(
        _syscall(
            SYS_statx,
            ctypes.c_int(fd),
            b"",
            ctypes.c_int(AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW),
            ctypes.c_uint(STATX_MNT_ID),
            buf,
        ),
        "statx",
    )
    mask = struct.unpack_from("<I", buf.raw, 0)[0]
    if not mask & STATX_MNT_ID:
        raise OSError(errno.ENOSYS, "statx: this kernel does not report mount ids")
    return int(struct.unpack_from("<Q", buf.raw, 144)[0])


def fstatfs_type(fd: int) -> int:
    """``f_type`` of fstatfs(2): which filesystem ``fd`` is on (PROC_SUPER_MAGIC, TMPFS_MAGIC...)."""
    buf = ctypes.create_string_buffer(120)  # struct statfs on x86-64; f_type is the first long
    _check(_libc.fstatfs(ctypes.c_int(fd), buf), "fstatfs")
    return int(struct.unpack_from("<q", buf.raw, 0)[0])


def open_tree(fd: int, recursive: bool) -> int:
    """A detached copy of the mount tree at ``fd`` (a bind mount not yet attached anywhere)."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    return _check(_syscall(SYS_open_tree, ctypes.c_int(fd), b"", ctypes.c_uint(flags)), "open_tree")


def move_mount(mount_fd: int, target_fd: int) -> None:
    """Attach the mount ``mount_fd`` on top of what ``target_fd`` is (no path is walked)."""
    _check(
        _syscall(
            SYS_move_mount,
            ctypes.c_int(mount_fd),
            b"",
            ctypes.c_int(target_fd),
            b"",
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
        ),
        "move_mount",
    )


def _fs_error(fs_fd: int, what: str) -> OSError:
    """The errno of a failed fs-context call, with the kernel's own message if it left one."""
    err = ctypes.get_errno()
    detail = ""
    try:
        detail = os.read(fs_fd, 256).decode(errors="replace").strip()
        detail = detail[2:] if detail[1:2] == " " else detail  # "e tmpfs: Unknown parameter 'x'"
    except OSError:
        pass
    return OSError(err, f"{what}: {detail or os.strerror(err)}")


def fs_mount(fstype: str, source: str | None, options: list[str], attrs: int) -> int:
    """A new, detached instance of ``fstype`` (fsopen + fsconfig + fsmount); returns its mount fd.
    ``options`` are mount(8) data options (``mode=755``, ``newinstance``); ``attrs`` MOUNT_ATTR_*."""
    fs_fd = _check(_syscall(SYS_fsopen, os.fsencode(fstype), ctypes.c_uint(FSOPEN_CLOEXEC)), f"fsopen {fstype}")
    try:
        params: list[tuple[str, str | None]] = []
        if source:
            params.append(("source", source))
        for opt in options:
            name, eq, text = opt.partition("=")
            params.append((name, text if eq else None))
        for key, value in params:
            cmd = FSCONFIG_SET_FLAG if value is None else FSCONFIG_SET_STRING
            ret = _syscall(
                SYS_fsconfig,
                ctypes.c_int(fs_fd),
                ctypes.c_uint(cmd),
                os.fsencode(key),
                None if value is None else os.fsencode(value),
                ctypes.c_int(0),
            )
            if ret < 0:
                raise _fs_error(fs_fd, f"{fstype} option {key}")
        if (
            _syscall(SYS_fsconfig, ctypes.c_int(fs_fd), ctypes.c_uint(FSCONFIG_CMD_CREATE), None, None, ctypes.c_int(0))
            < 0
        ):
            raise _fs_error(fs_fd, f"mount {fstype}")
        ret = _syscall(SYS_fsmount, ctypes.c_int(fs_fd), ctypes.c_uint(FSMOUNT_CLOEXEC), ctypes.c_uint(attrs))
        if ret < 0:
            raise _fs_error(fs_fd, f"mount {fstype}")
        return int(ret)
    finally:
        os.close(fs_fd)


def mount_setattr(fd: int, attr_set: int, attr_clr: int = 0, propagation: int = 0, recursive: bool = False) -> None:
    """Change the flags (MOUNT_ATTR_*) or propagation (MS_SHARED...) of the mount ``fd`` is the root of."""
    attr = ctypes.create_string_buffer(struct.pack("<QQQQ", attr_set, attr_clr, propagation, 0), 32)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    _check(
        _syscall(SYS_mount_setattr, ctypes.c_int(fd), b"", ctypes.c_uint(flags), attr, ctypes.c_size_t(32)),
        "mount_setattr",
    )
