"""Namespaces: the clone flags, unshare(2), setns(2), and the UTS namespace's names.

Thin errno-checked wrappers on :mod:`virtkit.host.libc`'s handle, no policy; which namespaces a
process gets is its caller's (the container's config, the jail's list).
"""

from __future__ import annotations

import ctypes

from virtkit.host.libc import check, handle, syscall

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

SYS_setns = 308  # x86-64


def unshare(flags: int) -> None:
    check(handle.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    check(syscall(SYS_setns, ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def sethostname(name: str) -> None:
    raw = name.encode()
    check(handle.sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname")


def setdomainname(name: str) -> None:
    raw = name.encode()
    check(handle.setdomainname(raw, ctypes.c_size_t(len(raw))), "setdomainname")
