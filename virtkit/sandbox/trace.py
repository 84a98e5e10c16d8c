"""``--trace`` (each system call, strace-style, with its result) and ``--stats`` (calls by name,
count, errors and time spent serving them, and the page faults served)."""

from __future__ import annotations

import errno
import os
import threading
import time

from virtkit.sandbox.syscalls import NAMES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from virtkit.sandbox.process import Process

#: how many argument registers each call shows (strace's view; the rest shows six)
_ARGC = {
    "getpid": 0,
    "gettid": 0,
    "getppid": 0,
    "getuid": 0,
    "geteuid": 0,
    "getgid": 0,
    "getegid": 0,
    "fork": 0,
    "vfork": 0,
    "exit_group": 1,
    "exit": 1,
    "close": 1,
    "brk": 1,
    "dup": 1,
    "umask": 1,
    "uname": 1,
    "set_tid_address": 1,
    "read": 3,
    "write": 3,
    "openat": 4,
    "open": 3,
    "mmap": 6,
    "munmap": 2,
    "mprotect": 3,
    "arch_prctl": 2,
    "wait4": 4,
    "execve": 3,
    "pipe2": 2,
    "dup2": 2,
    "fstat": 2,
    "newfstatat": 4,
    "ioctl": 3,
    "rt_sigaction": 4,
    "rt_sigprocmask": 4,
    "lseek": 3,
    "getdents64": 3,
    "fcntl": 3,
    "clone": 5,
}


class Tracer:
    """Wraps each call when ``--trace`` or ``--stats`` is on (the plain loop calls handlers
    directly: tracing costs nothing when off)."""

    def __init__(self, trace: bool, stats: bool, out: Callable[[str], None]) -> None:
        self.trace, self.stats, self.out = trace, stats, out
        self.lock = threading.Lock()
        #: nr -> [calls, errors, ns serving]
        self.counts: dict[int, list[int]] = {}

    def call(self, p: Process, nr: int, handler: Callable[..., object], args: tuple[int, ...]) -> object:
        name = NAMES.get(nr, f"syscall_{nr}")
        if self.trace and name in ("exit_group", "exit", "execve"):
            self.out(f"[pid {p.pid}] {name}({self._args(name, args)}) ...")
        t0 = time.perf_counter_ns()
        failed = False
        try:
            ret = handler(p, *args)
        except BaseException:
            self._count(nr, time.perf_counter_ns() - t0, False)
            raise
        dt = time.perf_counter_ns() - t0
        if isinstance(ret, int):
            failed = -4096 < ret < 0
        self._count(nr, dt, failed)
        if self.trace:
            if isinstance(ret, int):
                shown = (
                    f"-1 {errno.errorcode.get(-ret, str(-ret))} ({os.strerror(-ret)})"
                    if failed
                    else (hex(ret) if ret > 0xFFFF else str(ret))
                )
            else:
                shown = "0"
            self.out(f"[pid {p.pid}] {name}({self._args(name, args)}) = {shown}")
        return ret

    @staticmethod
    def _args(name: str, args: tuple[int, ...]) -> str:
        n = _ARGC.get(name, 6)
        return ", ".join(hex(a) if a > 0xFFFF else str(a) for a in args[:n])

    def _count(self, nr: int, ns: int, failed: bool) -> None:
        with self.lock:
            c = self.counts.setdefault(nr, [0, 0, 0])
            c[0] += 1
            c[1] += failed
            c[2] += ns

    def table(self, faults: int) -> str:
        rows = sorted(self.counts.items(), key=lambda kv: -kv[1][2])
        total_ns = sum(c[2] for c in self.counts.values()) or 1
        lines = [f"{'% time':>6} {'usecs':>10} {'usecs/call':>10} {'calls':>7} {'errors':>6} syscall"]
        for nr, (calls, errors, ns) in rows:
            name = NAMES.get(nr, f"syscall_{nr}")
            lines.append(
                f"{100 * ns / total_ns:6.2f} {ns // 1000:10d} {ns // 1000 // max(calls, 1):10d} {calls:7d} "
                f"{errors or '':>6} {name}"
            )
        calls = sum(c[0] for c in self.counts.values())
        lines.append(f"{100.0:6.2f} {total_ns // 1000:10d} {'':>10} {calls:7d} {'':>6} total")
        lines.append(f"page faults served: {faults}")
        return "\n".join(lines)
