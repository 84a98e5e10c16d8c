"""The Linux system calls Python 3.11's ``os`` module lacks, through ctypes, and nothing else.

Everything here is a thin typed wrapper that raises :class:`OSError` with the errno, like ``os``
does; no policy. Numbers are x86-64 (``asm/unistd_64.h``) and the flag values come from the
kernel UAPI headers named next to each group.
"""

from __future__ import annotations

import ctypes
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

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
SYS_pidfd_send_signal = 424
SYS_close_range = 436

# --- linux/seccomp.h -----------------------------------------------------------------------
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_FILTER_FLAG_LOG = 2
SECCOMP_FILTER_FLAG_SPEC_ALLOW = 4

CLOSE_RANGE_CLOEXEC = 1 << 2

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


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
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
    ret = _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                      ctypes.c_ulong(arg4), ctypes.c_ulong(arg5))
    return _check(ret, f"prctl({option})")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def capget(pid: int = 0) -> tuple[int, int, int]:
    """Return (effective, permitted, inheritable) as 64-bit masks."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, pid)
    data = (_CapData * 2)()
    _check(_syscall(SYS_capget, ctypes.byref(hdr), ctypes.byref(data)), "capget")
    eff, prm, inh = (int(getattr(data[0], f)) | (int(getattr(data[1], f)) << 32)
                     for f in ("effective", "permitted", "inheritable"))
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
    _check(_syscall(SYS_seccomp, ctypes.c_uint(SECCOMP_SET_MODE_FILTER), ctypes.c_uint(flags),
                    fprog), "seccomp")


def close_range_cloexec(first: int) -> None:
    """Mark every fd >= first close-on-exec (kernel 5.11+)."""
    _check(_syscall(SYS_close_range, ctypes.c_uint(first), ctypes.c_uint(0xFFFFFFFF),
                    ctypes.c_uint(CLOSE_RANGE_CLOEXEC)), "close_range")


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    _check(_syscall(SYS_pidfd_send_signal, ctypes.c_int(pidfd), ctypes.c_int(sig), None,
                    ctypes.c_uint(0)), "pidfd_send_signal")
