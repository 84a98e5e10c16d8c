"""Hermetic checks of the service's parts: the VMM seccomp policy (run by the reference BPF
interpreter), the OpenAPI document, the store, accounting, exit descriptions."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest

from virtkit.host.seccomp import SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS, run_filter
from virtkit.host.syscalls_x86_64 import SYSCALLS
from virtkit.jail.policy import vmm_filter
from virtkit.service import openapi
from virtkit.service.daemon import describe_exit, is_failure
from virtkit.service.model import ExitInfo, VmDefinition
from virtkit.service.resources import Account, InsufficientResources
from virtkit.service.store import Store
from virtkit.service.vmm import SerialSink
from virtkit.service.vmmproto import ExitReport

ROOT = Path(__file__).resolve().parents[3]
KVM_RUN = 0xAE80
TCGETS = 0x5401


@pytest.fixture(scope="module")
def program() -> bytes:
    return vmm_filter()


@pytest.mark.parametrize(
    "name", ["write", "futex", "accept4", "recvfrom", "sendto", "munmap", "exit_group", "tgkill", "preadv", "pwritev"]
)
def test_the_calls_a_vmm_makes_are_allowed(program: bytes, name: str) -> None:
    assert run_filter(program, SYSCALLS[name]) == SECCOMP_RET_ALLOW


@pytest.mark.parametrize(
    "name",
    [
        "execve",
        "execveat",
        "socket",
        "fork",
        "vfork",
        "ptrace",
        "mount",
        "kill",
        "bpf",
        "open_by_handle_at",
        "setuid",
        "unshare",
        "setns",
        "pidfd_open",
        "process_vm_writev",
        "connect",
        "bind",
        "init_module",
        "keyctl",
    ],
)
def test_everything_else_kills_the_process(program: bytes, name: str) -> None:
    assert run_filter(program, SYSCALLS[name]) == SECCOMP_RET_KILL_PROCESS


def test_path_lookups_fail_with_an_error_and_clone3_with_enosys(program: bytes) -> None:
    assert run_filter(program, SYSCALLS["openat"]) == SECCOMP_RET_ERRNO | errno.EACCES
    assert run_filter(program, SYSCALLS["newfstatat"]) == SECCOMP_RET_ERRNO | errno.EACCES
    assert run_filter(program, SYSCALLS["clone3"]) == SECCOMP_RET_ERRNO | errno.ENOSYS


def test_arguments_are_checked(program: bytes) -> None:
    ioctl, clone, mmap = SYSCALLS["ioctl"], SYSCALLS["clone"], SYSCALLS["mmap"]
    assert run_filter(program, ioctl, (5, KVM_RUN)) == SECCOMP_RET_ALLOW
    assert run_filter(program, ioctl, (5, 0xC008AE05)) == SECCOMP_RET_ALLOW  # _IOWR(KVMIO, ...)
    assert run_filter(program, ioctl, (5, TCGETS)) == SECCOMP_RET_KILL_PROCESS
    thread_flags = 0x3D0F00  # what glibc's pthread_create passes
    assert run_filter(program, clone, (thread_flags,)) == SECCOMP_RET_ALLOW
    assert run_filter(program, clone, (signal.SIGCHLD,)) == SECCOMP_RET_KILL_PROCESS  # fork
    assert run_filter(program, mmap, (0, 4096, 3)) == SECCOMP_RET_ALLOW
    assert run_filter(program, mmap, (0, 4096, 7)) == SECCOMP_RET_KILL_PROCESS  # PROT_EXEC
    assert run_filter(program, SYSCALLS["mprotect"], (0, 4096, 5)) == SECCOMP_RET_KILL_PROCESS
    assert run_filter(program, SYSCALLS["write"], arch=0x40000003) != SECCOMP_RET_ALLOW  # i386 ABI


def test_the_checked_in_openapi_document_is_current() -> None:
    assert (ROOT / "docs" / "openapi.json").read_text() == openapi.document()
    assert json.loads(openapi.document())["openapi"].startswith("3.0")


def test_store_round_trip(tmp_path: Path) -> None:
    s = Store(str(tmp_path / "db"))
    definition = VmDefinition(name="a", kernel="/k", vcpus=2)
    rec = s.insert("a", definition)
    assert rec.state == "created" and rec.definition == definition and rec.last_exit is None
    s.update("a", state="running", pid=42, last_exit=ExitInfo(reason="vmm-gone", detail="d"))
    s.event("a", "started", "pid 42")
    s.close()
    s = Store(str(tmp_path / "db"))  # a restarted service sees the same
    rec2 = s.get("a")
    assert rec2 is not None and rec2.pid == 42 and rec2.last_exit == ExitInfo(reason="vmm-gone", detail="d")
    assert [e.kind for e in s.events("a")] == ["started"]
    import sqlite3

    with pytest.raises(sqlite3.IntegrityError):
        s.insert("a", definition)
    s.close()


def test_account_refuses_what_it_cannot_back() -> None:
    a = Account(overcommit=1.0, reserve=0)
    cores = a.cores
    a.reserve_for("x", cores, 1 << 20)
    with pytest.raises(InsufficientResources, match=r"asked 1 vCPUs, 0 free of \d+"):
        a.reserve_for("y", 1, 1 << 20)
    a.release("x")
    with pytest.raises(InsufficientResources, match=r"asked \d+ MiB .* MiB free of \d+ MiB for VMs"):
        a.reserve_for("z", 1, a.total_memory)
    a.reserve_for("y", 1, 1 << 20)


def test_exit_descriptions() -> None:
    killed = describe_exit(None, signal.SIGSYS)  # a wait status: terminated by SIGSYS
    assert killed.reason == "vmm-killed" and "seccomp" in killed.detail and is_failure(killed)
    assert killed.exit_status == 128 + signal.SIGSYS
    ok = describe_exit(ExitReport(reason="debug-exit", exit_status=1), 1 << 8)
    assert not is_failure(ok) and ok.reason == "debug-exit" and ok.exit_status == 1
    gone = describe_exit(None, None)
    assert gone.reason == "vmm-gone" and is_failure(gone)
    bad = describe_exit(None, 1 << 8, unreadable="the exit report of a is a JSON array, not an object\nx\x1b[2J")
    assert bad.reason == "bad-exit-report" and is_failure(bad)
    assert bad.detail == (
        "the VMM wrote an unreadable exit report: the exit report of a is a JSON array, not an object x [2J"
    )


def test_store_files_are_the_services_alone(tmp_path: Path) -> None:
    db = tmp_path / "virtkitd.db"
    db.touch(mode=0o644)
    db.chmod(0o644)  # as an older service left it
    s = Store(str(db))
    s.insert("a", VmDefinition(name="a", kernel="/k", cmdline="secret"))
    s.close()
    for p in tmp_path.iterdir():
        assert p.stat().st_mode & 0o077 == 0, p


def test_serial_ring_keeps_offsets() -> None:
    w = os.open(os.devnull, os.O_WRONLY)
    try:
        sink = SerialSink(w)
        sink.write(b"x" * 70000)
        sink.write(b"tail")
        first, data, nxt = sink.read(0, 10)
        assert first == 70004 - len(sink.ring) and nxt == first + 10
        assert sink.read(70000, 100)[1] == b"tail"
    finally:
        os.close(w)
