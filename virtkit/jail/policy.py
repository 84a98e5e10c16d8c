"""The seccomp allow-list of a running VMM.

Measured, not guessed, and derived from what the service can start rather than from a few guests:
``python -m virtkit.jail.measure`` runs the VMM (``--no-seccomp``, every other layer of the jail
on) under ``strace -f`` once per mode and device the service can put in a machine: full mode (UART,
PIT and PIC through the in-kernel irqchip, an ATA disk, two vCPUs, a guest crash, an emulation
failure, a guest halted for good) and para mode (virtio console, virtio-blk polled and with
interrupts, the block and null hypercalls, so the I/O thread with its ioeventfds and irqfds), with
control-socket traffic (status, stats, console read and write, pause, resume, stop) while a guest
runs. It keeps the calls made after ``PR_SET_NO_NEW_PRIVS`` (the filter goes on right after it),
prints each with the cases that made it and what this policy does with it, and fails if one would
kill the VMM. Rerun it whenever a mode, a device, a thread or a control operation is added, and
add the case to its table. ``tests/integration/service/test_guests_under_service.py`` then runs
every guest kind under the service with this filter and asserts a clean end (no SIGSYS).
The thread limit (RLIMIT_NPROC, :data:`virtkit.jail.confine.EXTRA_THREADS`) is derived the same
way: it counts every thread of the VMM's thread group, KVM's own worker included. Three outcomes:

* **allowed**: the calls below, some only with the arguments a VMM uses: ``ioctl`` only with KVM
  requests (type 0xAE, ``linux/kvm.h``: KVM_RUN, the state and MP-state reads); ``clone`` only
  for threads (``CLONE_THREAD``: no new process); ``mmap``/``mprotect`` never executable (no code
  loaded after start-up);
* **refused with an error**: lookups by path that Python's import and traceback machinery attempt
  (they would fail anyway in the empty root): EACCES, so an error path stays an error and is
  reported; ``clone3`` answers ENOSYS so that glibc falls back to ``clone``, whose flags BPF can
  read (clone3 passes them in memory);
* **everything else kills the process** (``SECCOMP_RET_KILL_PROCESS``): ``execve``, ``socket``,
  ``fork``, ``ptrace``, ``mount``, ``bpf``, ``kill`` of another process, ``open_by_handle_at``...
  A VMM that makes such a call is compromised or broken; the service sees SIGSYS and says so.
"""

from __future__ import annotations

import errno
from typing import Any

#: unconditional allow-list (x86-64 names). Measured: the calls ``python -m virtkit.jail.measure``
#: saw after no_new_privs, over every case it runs (module docstring). Added by reading the code
#: paths the measurement does not exercise: malloc growing (brk, mremap), time.sleep
#: (clock_nanosleep), signals interrupting a restartable call (restart_syscall), the plain
#: preadv/pwritev and fdatasync of disk I/O (os.preadv without flags), epoll_pwait (glibc may
#: implement epoll_wait with it), getrandom (virtio-rng's host source, os.urandom: no guest we
#: ship reads the device), writev (stderr messages of the error path).
ALLOWED = """
read write preadv pwritev preadv2 pwritev2 lseek fdatasync close
futex set_robust_list rseq gettid getpid tgkill
brk munmap mremap madvise
rt_sigaction rt_sigprocmask rt_sigreturn restart_syscall
clock_gettime clock_nanosleep
epoll_wait epoll_pwait
accept4 recvfrom sendto getsockname
getrandom writev
exit exit_group
""".split()  # noqa: SIM905 - a readable table of names

#: calls answered with an error instead of death (see the module docstring)
REFUSED: dict[str, int] = {
    name: errno.EACCES
    for name in (
        "open",
        "openat",
        "openat2",
        "stat",
        "lstat",
        "newfstatat",
        "statx",
        "access",
        "faccessat",
        "faccessat2",
        "readlink",
        "readlinkat",
        "getcwd",
        "getdents64",
        "getpeername",
    )
}
REFUSED["clone3"] = errno.ENOSYS

KVMIO = 0xAE  # linux/kvm.h: _IO(KVMIO, nr) and friends; bits 8-15 of the request are the type
CLONE_THREAD = 0x00010000  # linux/sched.h
PROT_EXEC = 0x4  # asm-generic/mman-common.h


#: calls allowed only with some arguments (see :func:`profile`)
CONDITIONAL = ("ioctl", "clone", "mmap", "mprotect")


def classify(name: str) -> str:
    """What the filter does with system call ``name``: "allow", "allow-if" (some arguments only),
    "errno" (refused with an error) or "kill" (used by :mod:`virtkit.jail.measure`)."""
    if name in ALLOWED:
        return "allow"
    if name in CONDITIONAL:
        return "allow-if"
    if name in REFUSED:
        return "errno"
    return "kill"


def profile() -> dict[str, Any]:
    """The policy as an OCI ``linux.seccomp`` object, compiled by :mod:`virtkit.host.seccomp`."""
    rules: list[dict[str, Any]] = [{"names": sorted(ALLOWED), "action": "SCMP_ACT_ALLOW"}]
    for name, err in sorted(REFUSED.items()):
        rules.append({"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": err})
    rules.append(
        {
            "names": ["ioctl"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 1, "value": 0xFF00, "valueTwo": KVMIO << 8, "op": "SCMP_CMP_MASKED_EQ"}],
        }
    )
    rules.append(
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": CLONE_THREAD, "valueTwo": CLONE_THREAD, "op": "SCMP_CMP_MASKED_EQ"}],
        }
    )
    for name in ("mmap", "mprotect"):
        rules.append(
            {
                "names": [name],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 2, "value": PROT_EXEC, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
            }
        )
    return {"defaultAction": "SCMP_ACT_KILL_PROCESS", "architectures": ["SCMP_ARCH_X86_64"], "syscalls": rules}


def vmm_filter() -> bytes:
    from virtkit.host.seccomp import compile_profile

    return compile_profile(profile())


# --- a migration receiver (virtkit migrate-receive): the VMM's list, and what receiving adds ----
#: Measured like the VMM's list: ``strace -f`` of confined receivers (seccomp off, every other layer
#: on) taking a full-mode counter guest, and a para-mode guest in the middle of virtio-blk writes
#: (I/O thread, disk); with control-socket traffic (status, pause, resume, stop, and the refused
#: snapshot/migrate); and each injected failure (refuse, drop mid-copy, die before switch-over);
#: counting the calls after ``PR_SET_NO_NEW_PRIVS`` in the receiver and its threads. What the
#: VMM's list lacks:
#:
#: * the migration stream: ``poll`` (how Python waits on a socket with a timeout), ``sendmsg``
#:   (replies and page-less messages go out with it), ``setsockopt`` (TCP_NODELAY on the accepted
#:   connection; SO_LINGER of the injected drop), ``getrandom`` (the session nonce);
#: * the control socket: ``shutdown`` (closing client connections);
#: * the para-mode I/O thread: ``epoll_wait`` and ``read`` (its eventfds);
#: * disk I/O: ``preadv2``/``pwritev2``, which is what Python's os.preadv/os.pwritev call (the
#:   VMM's list names preadv/pwritev, which Python 3.11 does not use);
#: * ``ioctl(FIONBIO)`` (argument-checked, below): Python switches a socket between blocking and
#:   timeout mode with it.
RECEIVER_ALLOWED = """
poll sendmsg setsockopt getrandom
shutdown
epoll_wait read
preadv2 pwritev2
""".split()  # noqa: SIM905 - a readable table of names

FIONBIO = 0x5421  # asm-generic/ioctls.h


def receiver_profile() -> dict[str, Any]:
    """:func:`profile` plus :data:`RECEIVER_ALLOWED`, and ``ioctl(FIONBIO)`` next to the KVM
    requests. Built from the VMM's profile, so what is added to or removed from that list applies
    here too; everything else still kills the process (``socket``, ``connect``, ``execve``...: a
    confined receiver has all its sockets and files before it reads from the network)."""
    base = profile()
    extra = sorted(set(RECEIVER_ALLOWED) - set(ALLOWED))
    rules: list[dict[str, Any]] = [{"names": extra, "action": "SCMP_ACT_ALLOW"}, *base["syscalls"]]
    rules.append(
        {"names": ["ioctl"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 1, "value": FIONBIO, "op": "SCMP_CMP_EQ"}]}
    )
    return {**base, "syscalls": rules}


def receiver_filter() -> bytes:
    from virtkit.host.seccomp import compile_profile

    return compile_profile(receiver_profile())
