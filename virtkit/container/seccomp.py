"""Seccomp for containers: the shape check of a bundle's ``linux.seccomp``, and the default profile
(Docker's) a container gets when its config has none.

The compiler to classic BPF and the reference interpreter are the host layer's
(:mod:`virtkit.host.seccomp`); this module only decides what a container is allowed.
"""

from __future__ import annotations

import errno as _errno
from typing import Any

from virtkit.errors import ConfigError
from virtkit.host.seccomp import ACTIONS, OPS

CLONE_NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET


def validate_profile(raw: dict[str, Any], path: str) -> None:
    """Check the shape of an OCI seccomp object; raise ConfigError naming the bad field."""

    def bad(where: str, what: str, value: Any = ...) -> ConfigError:
        got = "" if value is ... else f" (got {value!r})"
        return ConfigError(f"config.json: {path}.{where} {what}{got}; fix it in the bundle's config.json")

    if raw.get("defaultAction") not in ACTIONS:
        raise bad("defaultAction", f"must be one of {', '.join(ACTIONS)}", raw.get("defaultAction"))
    if raw.get("listenerPath"):
        # SCMP_ACT_NOTIFY hands syscalls to an agent over this socket (seccomp user notification);
        # ignoring it would leave the agent waiting for a connection that never comes
        raise bad("listenerPath", "is not supported by virtkit (no seccomp user notification); remove it")
    for i, rule in enumerate(raw.get("syscalls") or []):
        rp = f"syscalls[{i}]"
        if not isinstance(rule, dict):
            raise bad(rp, "must be an object", rule)
        names = rule.get("names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise bad(f"{rp}.names", "must be a non-empty list of syscall names", names)
        if rule.get("action") not in ACTIONS:
            raise bad(f"{rp}.action", "is not a seccomp action", rule.get("action"))
        for j, arg in enumerate(rule.get("args") or []):
            ap = f"{rp}.args[{j}]"
            if not isinstance(arg, dict):
                raise bad(ap, "must be an object", arg)
            if not isinstance(arg.get("index"), int) or not 0 <= arg["index"] <= 5:
                raise bad(f"{ap}.index", "must be 0..5", arg.get("index"))
            if arg.get("op") not in OPS:
                raise bad(f"{ap}.op", "is not a comparison operator", arg.get("op"))
            for key in ("value", "valueTwo"):
                v = arg.get(key, 0)
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**64:
                    raise bad(f"{ap}.{key}", "must be an unsigned 64-bit integer", v)


# --------------------------------------------------------------------------------------------
# the default profile: Docker's (moby profiles/seccomp/default.json), resolved for x86-64 and a
# capability set, as dockerd resolves it before handing the spec to runc.

_ALLOWED = [
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "clock_adjtime",
    "clock_getres",
    "clock_gettime",
    "clock_nanosleep",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchownat",
    "fcntl",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstatfs",
    "fsync",
    "ftruncate",
    "futex",
    "futex_requeue",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "geteuid",
    "getgid",
    "getgroups",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresuid",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getxattr",
    "getxattrat",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "listxattrat",
    "llistxattr",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedsend",
    "mq_unlink",
    "mremap",
    "mseal",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recvfrom",
    "recvmmsg",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "removexattrat",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "sendfile",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsuid",
    "setgid",
    "setgroups",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setresgid",
    "setresuid",
    "setreuid",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setxattr",
    "setxattrat",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "socketpair",
    "splice",
    "stat",
    "statfs",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_settime",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_settime",
    "times",
    "tkill",
    "truncate",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "write",
    "writev",
    "arch_prctl",
    "modify_ldt",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
]

#: never allowed by the default profile, whatever the capabilities: io_uring submits work that the
#: kernel runs outside the calling task's seccomp filter (every operation behind one allowed call) and
#: has been a steady source of kernel privilege escalations; current Docker profiles deny it too.
DENIED_ALWAYS = ("io_uring_setup", "io_uring_enter", "io_uring_register")

#: syscalls allowed only when the container keeps a capability (Docker's "includes.caps")
_BY_CAPABILITY: dict[str, tuple[str, ...]] = {
    "CAP_DAC_READ_SEARCH": ("open_by_handle_at",),
    "CAP_SYS_ADMIN": (
        "bpf",
        "clone",
        "clone3",
        "fanotify_init",
        "fsconfig",
        "fsmount",
        "fsopen",
        "fspick",
        "lookup_dcookie",
        "mount",
        "mount_setattr",
        "move_mount",
        "open_tree",
        "perf_event_open",
        "quotactl",
        "quotactl_fd",
        "setdomainname",
        "sethostname",
        "setns",
        "syslog",
        "umount2",
        "unshare",
        "listmount",
        "statmount",
    ),
    "CAP_SYS_BOOT": ("reboot",),
    "CAP_SYS_CHROOT": ("chroot",),
    "CAP_SYS_MODULE": ("delete_module", "init_module", "finit_module"),
    "CAP_SYS_PACCT": ("acct",),
    "CAP_SYS_PTRACE": ("kcmp", "pidfd_getfd", "process_madvise"),
    "CAP_SYS_RAWIO": ("iopl", "ioperm"),
    "CAP_SYS_TIME": ("settimeofday", "clock_settime"),
    "CAP_SYS_TTY_CONFIG": ("vhangup",),
    "CAP_SYS_NICE": ("get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node"),
    "CAP_SYSLOG": ("syslog",),
    "CAP_BPF": ("bpf",),
    "CAP_PERFMON": ("perf_event_open",),
}

AF_VSOCK = 40


def default_profile(capabilities: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """Docker's default profile as an OCI ``linux.seccomp`` object, for a container keeping ``capabilities``.

    EPERM by default; an allowlist (never the io_uring calls); ``socket`` except AF_VSOCK;
    ``personality`` for the few values programs use; namespace-creating ``clone`` denied (and
    ``clone3`` answered with ENOSYS so that libc falls back to ``clone``, whose flags a BPF filter
    can read) unless CAP_SYS_ADMIN is kept.
    """
    caps = set(capabilities)
    names = list(_ALLOWED)
    for cap, extra in _BY_CAPABILITY.items():
        if cap in caps:
            names.extend(n for n in extra if n not in names)
    names = [n for n in names if n not in DENIED_ALWAYS]
    syscalls: list[dict[str, Any]] = [{"names": sorted(names), "action": "SCMP_ACT_ALLOW"}]
    syscalls.append(
        {
            "names": ["socket"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_NE"}],
        }
    )
    for value in (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF):
        syscalls.append(
            {
                "names": ["personality"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": value, "op": "SCMP_CMP_EQ"}],
            }
        )
    if "CAP_SYS_ADMIN" not in caps:
        syscalls.append(
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
            }
        )
        syscalls.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": _errno.ENOSYS})
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": _errno.EPERM,
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": syscalls,
    }
