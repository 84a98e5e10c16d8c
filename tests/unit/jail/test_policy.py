"""The VMM's seccomp policy: what each measured path needs is allowed, the rest is not."""

from __future__ import annotations

import pytest

from virtkit.jail import policy
from virtkit.jail.confine import EXTRA_THREADS, thread_limit


@pytest.mark.parametrize(
    "call",
    [
        "epoll_wait",
        "epoll_pwait",
        "read",  # the I/O thread: eventfd notifications (para mode)
        "preadv2",
        "pwritev2",
        "fdatasync",  # disks
        "getrandom",  # virtio-rng's host source
        "accept4",
        "recvfrom",
        "sendto",  # the control server
    ],
)
def test_every_path_a_service_vmm_takes_is_allowed(call: str) -> None:
    assert policy.classify(call) == "allow"


@pytest.mark.parametrize(
    "call",
    [
        "execve",
        "socket",
        "fork",
        "vfork",
        "ptrace",
        "mount",
        "bpf",
        "kill",
        "open_by_handle_at",
        "connect",
        "setuid",
        "unshare",
        "pidfd_open",
    ],
)
def test_what_a_vmm_never_needs_kills_it(call: str) -> None:
    assert policy.classify(call) == "kill"


def test_conditional_and_refused_calls() -> None:
    assert policy.classify("ioctl") == "allow-if" and policy.classify("clone") == "allow-if"
    assert policy.classify("openat") == "errno" and policy.classify("clone3") == "errno"
    names = {n for rule in policy.profile()["syscalls"] for n in rule["names"]}
    assert set(policy.ALLOWED) | set(policy.CONDITIONAL) | set(policy.REFUSED) == names


def test_the_filter_compiles() -> None:
    assert len(policy.vmm_filter()) % 8 == 0 and policy.vmm_filter()


def test_thread_limit_counts_the_io_thread_in_para_mode_only() -> None:
    assert thread_limit(1, False) == 1 + EXTRA_THREADS
    assert thread_limit(2, True) == 2 + EXTRA_THREADS + 1
