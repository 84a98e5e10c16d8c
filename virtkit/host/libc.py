"""The one ctypes handle on the C library, and the system calls Python 3.11's ``os`` lacks that
are neither namespaces (:mod:`virtkit.host.ns`) nor mounts (:mod:`virtkit.host.mounts`):
prctl, capget/capset, seccomp, close_range, pidfd_send_signal, bpf, ptrace; and the few libc
functions the VMM calls through ctypes.

The wrappers are thin and typed and raise :class:`OSError` with the errno, like ``os`` does; no
policy. Numbers are x86-64 (``asm/unistd_64.h``) and the flag values come from the kernel UAPI
headers named next to each group. Every module of virtkit that calls into the C library uses
:data:`handle` (no private ``CDLL``), with :data:`syscall`, :func:`check` and :func:`encode`.

The prototyped functions (``c_ioctl``, ``c_mmap``, ``c_munmap``, ``c_memcmp``) are the raw ctypes
function objects, errno kept (read it with :func:`ctypes.get_errno`): the vCPU loop, guest
memory and the dirty-page scans call them per exit or per page, so their modules import them
once at module level and call them with no wrapper in between.
"""

from __future__ import annotations

import ctypes
import os
import struct

#: the C library of this process (``dlopen(NULL)``), errno saved after every call
handle = ctypes.CDLL(None, use_errno=True)
#: syscall(2), for the calls glibc has no wrapper for; returns a long (-1 and errno on failure)
syscall = handle.syscall
syscall.restype = ctypes.c_long

# --- prototyped libc functions, called directly by hot paths (no wrapper: see the docstring) ---
#: ioctl(2) whose argument is an unsigned long value wider than a C int (an address); returns -1
#: with errno set on failure
c_ioctl = handle.ioctl
c_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
c_ioctl.restype = ctypes.c_int
#: mmap(2): returns the address, or MAP_FAILED (``ctypes.c_void_p(-1).value``) with errno set
c_mmap = handle.mmap
c_mmap.restype = ctypes.c_void_p
c_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
c_munmap = handle.munmap
c_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
#: memcmp(3) on two addresses (guest RAM against a zero buffer, without copying it into Python)
c_memcmp = handle.memcmp
c_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
c_memcmp.restype = ctypes.c_int

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
SYS_seccomp = 317
SYS_bpf = 321
SYS_pidfd_send_signal = 424
SYS_close_range = 436

# --- linux/seccomp.h -----------------------------------------------------------------------
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_FILTER_FLAG_LOG = 2
SECCOMP_FILTER_FLAG_SPEC_ALLOW = 4

CLOSE_RANGE_CLOEXEC = 1 << 2

_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def check(ret: int, what: str, path: str | None = None) -> int:
    """``ret``, or the OSError of the errno a call that returned ``ret`` < 0 left."""
    if ret < 0:
        err = ctypes.get_errno()
        if path is not None:
            raise OSError(err, f"{what}: {os.strerror(err)}", path)
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def encode(value: str | bytes | None) -> bytes | None:
    """A path or string argument as the C call takes it (None stays NULL)."""
    if value is None or isinstance(value, bytes):
        return value
    return os.fsencode(value)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    ret = handle.prctl(
        ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)
    )
    return check(ret, f"prctl({option})")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def capget(pid: int = 0) -> tuple[int, int, int]:
    """Return (effective, permitted, inheritable) as 64-bit masks."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, pid)
    data = (_CapData * 2)()
    check(syscall(SYS_capget, ctypes.byref(hdr), ctypes.byref(data)), "capget")
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
    check(syscall(SYS_capset, ctypes.byref(hdr), ctypes.byref(data)), "capset")


def seccomp_set_filter(program: bytes, flags: int = 0) -> None:
    """Install a classic-BPF seccomp filter; ``program`` is packed ``struct sock_filter``s."""
    count = len(program) // 8
    buf = ctypes.create_string_buffer(program, len(program))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; } (padded to 16 bytes)
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", count, ctypes.addressof(buf)), 16)
    check(syscall(SYS_seccomp, ctypes.c_uint(SECCOMP_SET_MODE_FILTER), ctypes.c_uint(flags), fprog), "seccomp")


def close_range_cloexec(first: int) -> None:
    """Mark every fd >= first close-on-exec (kernel 5.11+)."""
    check(
        syscall(SYS_close_range, ctypes.c_uint(first), ctypes.c_uint(0xFFFFFFFF), ctypes.c_uint(CLOSE_RANGE_CLOEXEC)),
        "close_range",
    )


def bpf(cmd: int, attr: bytes) -> int:
    """bpf(2) with ``attr`` (a packed ``union bpf_attr``, copied to a buffer of its own size);
    returns what the kernel returned (an fd for BPF_PROG_LOAD, 0 for BPF_PROG_ATTACH)."""
    buf = ctypes.create_string_buffer(attr, len(attr))
    ret = syscall(ctypes.c_long(SYS_bpf), ctypes.c_int(cmd), buf, ctypes.c_uint(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def ptrace(request: int, pid: int, addr: int = 0, data: int = 0) -> int:
    """ptrace(2); returns the kernel's answer, or -1 with errno set: the caller decides (a probe
    of what a confined process may do reports the -1 rather than raising)."""
    return int(handle.ptrace(ctypes.c_int(request), ctypes.c_int(pid), ctypes.c_void_p(addr), ctypes.c_void_p(data)))


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    check(
        syscall(SYS_pidfd_send_signal, ctypes.c_int(pidfd), ctypes.c_int(sig), None, ctypes.c_uint(0)),
        "pidfd_send_signal",
    )
