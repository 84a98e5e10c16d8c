"""The steps that confine a VMM process, in the order the kernel requires.

1. :func:`enter_namespaces` (still single-threaded, before the VMM forks): new mount, PID, network,
   IPC, UTS and cgroup namespaces. ``CLONE_NEWPID`` applies to children only, so the caller forks
   next and the child, PID 1 of the new namespace, becomes the VMM.
2. The VMM opens everything it will ever need (``/dev/kvm``, kernel, disks, log, control socket).
3. :func:`confine`, before any vCPU thread exists (namespaces, credentials and seccomp filters are
   per thread; threads created afterwards inherit them):

   a. :func:`empty_root`: pivot into an empty tmpfs, detach the host's tree, remount read-only;
   b. rlimits (open files, threads of the uid, file size of the serial log, no core dumps);
   c. capabilities: empty the bounding set (needs CAP_SETPCAP, so before the uid change), then
      ``setresgid``/``setresuid`` to an unprivileged id of the VM's own, which clears the
      permitted and effective sets (capabilities(7), "Effect of user ID changes");
   d. not dumpable (no ptrace by the same uid, /proc files owned by root), ``no_new_privs``;
   e. the seccomp filter, last: every call above is one the filter would refuse.
"""

from __future__ import annotations

import os
import resource

from virtkit.host import caps as capsmod
from virtkit.host import libc, mounts, ns

#: namespaces a confined VMM gets (user namespaces are not used: the VMM starts as real root to
#: open /dev/kvm and join cgroups, and ends as an unprivileged uid in the host's user namespace)
NAMESPACE_FLAGS = (
    ns.CLONE_NEWNS | ns.CLONE_NEWPID | ns.CLONE_NEWNET | ns.CLONE_NEWIPC | ns.CLONE_NEWUTS | ns.CLONE_NEWCGROUP
)

#: where the empty root is mounted before pivot_root; any directory works, the mount is private
#: to the VMM's mount namespace and the host's directory is never written
JAIL_MOUNTPOINT = "/tmp"

#: threads a VMM runs besides one per vCPU, each counted against RLIMIT_NPROC of its uid: main,
#: control server, watchdog, and KVM's own NX-huge-page recovery worker (a task of the VMM's thread
#: group since Linux 6.13, named ``kvm-nx-lpage-re``, made at the first KVM_RUN). No spare: the
#: limit is what stops a subverted VMM from forking (test_jail.py)
EXTRA_THREADS = 4


def thread_limit(vcpus: int, paravirt: bool) -> int:
    """RLIMIT_NPROC for a VMM: its vCPUs, :data:`EXTRA_THREADS`, and in para mode the I/O thread
    that runs virtio's ioeventfd handlers (measured: ``python -m virtkit.jail.measure``)."""
    return vcpus + EXTRA_THREADS + (1 if paravirt else 0)


#: file descriptors a VMM may open after confinement (accepted control connections)
SPARE_FDS = 16


class JailSpec:
    """How to confine one VMM. ``uid``/``gid``: the unprivileged ids it ends as (one per VM, so
    VMMs cannot signal or ptrace one another); ``threads``: the RLIMIT_NPROC of that uid;
    ``max_file_size``: RLIMIT_FSIZE (bounds the serial log); ``seccomp``: False only in tests
    that show what the other layers stop on their own; ``parent_death_signal``: a signal the
    process gets when its parent dies (a foreground launcher), armed again after the uid change,
    which clears it (prctl(2), PR_SET_PDEATHSIG)."""

    __slots__ = ("uid", "gid", "threads", "max_file_size", "seccomp", "parent_death_signal")

    def __init__(
        self,
        uid: int,
        gid: int,
        threads: int,
        max_file_size: int = 64 << 20,
        seccomp: bool = True,
        parent_death_signal: int = 0,
    ) -> None:
        self.uid, self.gid, self.threads = uid, gid, threads
        self.max_file_size, self.seccomp = max_file_size, seccomp
        self.parent_death_signal = parent_death_signal


def enter_namespaces() -> None:
    """unshare the VMM's namespaces; the caller must fork next (see the module docstring)."""
    ns.unshare(NAMESPACE_FLAGS)


def empty_root() -> None:
    """Make the root of this mount namespace an empty, read-only tmpfs with no way back."""
    # MS_PRIVATE first: otherwise the mounts below would propagate to the host's namespace
    mounts.mount(None, "/", None, mounts.MS_REC | mounts.MS_PRIVATE)
    mounts.mount(
        "virtkit-jail",
        JAIL_MOUNTPOINT,
        "tmpfs",
        mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC,
        "size=4k,nr_inodes=4,mode=0555",
    )
    os.mkdir(os.path.join(JAIL_MOUNTPOINT, "old"), 0o000)
    os.chdir(JAIL_MOUNTPOINT)
    mounts.pivot_root(".", "old")
    os.chdir("/")
    # lazily detach the whole host tree: nothing under it is reachable by path any more
    mounts.umount2("/old", mounts.MNT_DETACH)
    os.rmdir("/old")
    mounts.mount(
        None,
        "/",
        None,
        mounts.MS_REMOUNT | mounts.MS_BIND | mounts.MS_RDONLY | mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC,
    )


def set_rlimits(spec: JailSpec, highest_fd: int) -> None:
    limits = (
        (resource.RLIMIT_NOFILE, highest_fd + 1 + SPARE_FDS),
        (resource.RLIMIT_NPROC, spec.threads),
        (resource.RLIMIT_FSIZE, spec.max_file_size),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_MEMLOCK, 0),
        (resource.RLIMIT_MSGQUEUE, 0),
    )
    for which, value in limits:
        resource.setrlimit(which, (value, value))


def drop_privileges(uid: int, gid: int) -> None:
    capsmod.drop_bounding((), capsmod.last_cap())
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # all three non-zero: permitted and effective sets are cleared
    libc.capset(0, 0, 0)  # and the inheritable set
    libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL)


def highest_open_fd() -> int:
    return max(int(fd) for fd in os.listdir("/proc/self/fd"))


def _preload_unwinder() -> None:
    """glibc loads libgcc_s.so.1 the first time a thread unwinds (``pthread_exit``, which Python
    calls for a daemon thread at interpreter exit); in the empty root that load fails and glibc
    aborts the process, turning an error exit into SIGABRT. Loaded now, it stays loaded."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError):  # no libgcc_s on this host: nothing would load it later either
        ctypes.CDLL("libgcc_s.so.1")


def confine(spec: JailSpec, program: bytes | None = None) -> None:
    """Steps 3a-3e of the module docstring. Call from the VMM's only thread. ``program``: the
    seccomp filter to install (default: the service VMM's, :func:`virtkit.jail.policy.vmm_filter`);
    a migration receiver passes its own, which also allows receiving the VM."""
    if not spec.seccomp:
        program = None
    elif program is None:  # compiled first: nothing can be imported once the root is empty
        from virtkit.jail.policy import vmm_filter

        program = vmm_filter()
    _preload_unwinder()
    highest_fd = highest_open_fd()  # /proc is gone after empty_root
    empty_root()
    set_rlimits(spec, highest_fd)
    drop_privileges(spec.uid, spec.gid)
    if spec.parent_death_signal:
        libc.prctl(libc.PR_SET_PDEATHSIG, spec.parent_death_signal)
    libc.prctl(libc.PR_SET_DUMPABLE, 0)
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
    if program is not None:
        libc.seccomp_set_filter(program)
