"""The system-call table: by number, ENOSYS for what is not served, refusals on purpose."""

from __future__ import annotations

import errno

from virtkit.host.syscalls_x86_64 import SYSCALLS
from virtkit.sandbox.syscalls import SERVED, build_table, enosys


def test_table_by_number() -> None:
    table = build_table()
    for name in ("read", "write", "openat", "mmap", "brk", "execve", "wait4", "pipe2", "exit_group", "getdents64"):
        assert SYSCALLS[name] in SERVED and table[SYSCALLS[name]] is not enosys
    assert table[SYSCALLS["io_uring_setup"] if SYSCALLS["io_uring_setup"] < len(table) else 0] is not None
    assert enosys(None, 0) == -errno.ENOSYS  # type: ignore[arg-type]


def test_network_and_privileged_calls_are_refused() -> None:
    table = build_table()
    assert table[SYSCALLS["socket"]](None, 2, 1, 0) == -errno.EAFNOSUPPORT
    for name in ("ptrace", "mount", "unshare", "bpf", "iopl"):
        assert table[SYSCALLS[name]](None) == -errno.EPERM
