"""What a confined receiver may still do: its seccomp allow-list (the VMM's, plus what receiving
needs, and nothing that reaches out), and its control socket (no snapshot, no onward migration)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, cast

import pytest

from virtkit.host.seccomp import SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS, run_filter
from virtkit.host.syscalls_x86_64 import SYSCALLS
from virtkit.jail import policy
from virtkit.migration.control import ControlServer
from virtkit.vm import Machine

KVM_RUN = 0xAE80
TCGETS = 0x5401


@pytest.fixture(scope="module")
def program() -> bytes:
    return policy.receiver_filter()


def verdict(program: bytes, name: str, *args: int) -> int:
    return run_filter(program, SYSCALLS[name], args) & 0xFFFF0000


@pytest.mark.parametrize("name", sorted(set(policy.ALLOWED) | set(policy.RECEIVER_ALLOWED)))
def test_what_a_vmm_and_a_receiver_need_is_allowed(program: bytes, name: str) -> None:
    assert verdict(program, name) == SECCOMP_RET_ALLOW


@pytest.mark.parametrize(
    "name",
    [
        "socket",
        "connect",
        "bind",
        "listen",
        "execve",
        "execveat",
        "fork",
        "vfork",
        "ptrace",
        "mount",
        "unshare",
        "setns",
        "kill",
        "unlink",
        "rename",
        "chmod",
        "bpf",
        "open_by_handle_at",
        "pidfd_open",
        "process_vm_readv",
        "sendfile",
    ],
)
def test_anything_that_reaches_out_kills_the_receiver(program: bytes, name: str) -> None:
    assert verdict(program, name) == SECCOMP_RET_KILL_PROCESS


def test_ioctl_only_for_kvm_and_socket_blocking_mode(program: bytes) -> None:
    assert verdict(program, "ioctl", 3, KVM_RUN) == SECCOMP_RET_ALLOW
    assert verdict(program, "ioctl", 3, policy.FIONBIO) == SECCOMP_RET_ALLOW
    assert verdict(program, "ioctl", 3, TCGETS) == SECCOMP_RET_KILL_PROCESS
    assert verdict(program, "ioctl", 3, policy.FIONBIO + 1) == SECCOMP_RET_KILL_PROCESS


def test_threads_but_no_processes_and_no_new_code(program: bytes) -> None:
    assert verdict(program, "clone", policy.CLONE_THREAD | 0x3D0F00) == SECCOMP_RET_ALLOW
    assert verdict(program, "clone", 0x11) == SECCOMP_RET_KILL_PROCESS  # fork's flags: SIGCHLD
    assert verdict(program, "mmap", 0, 4096, 3) == SECCOMP_RET_ALLOW
    assert verdict(program, "mmap", 0, 4096, 7) == SECCOMP_RET_KILL_PROCESS  # PROT_EXEC


def test_path_lookups_fail_softly(program: bytes) -> None:
    assert verdict(program, "openat") == SECCOMP_RET_ERRNO


def test_the_receiver_profile_is_the_vmm_profile_plus_additions() -> None:
    vmm = policy.profile()
    receiver = policy.receiver_profile()
    for rule in vmm["syscalls"]:
        assert rule in receiver["syscalls"]
    assert receiver["defaultAction"] == vmm["defaultAction"] == "SCMP_ACT_KILL_PROCESS"


# --- the control socket of a confined receiver ----------------------------------------------------
def _ask(path: Path, **req: Any) -> dict[str, Any]:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(path))
    s.sendall(json.dumps(req).encode() + b"\n")
    reply = json.loads(s.makefile("rb").readline())
    s.close()
    return cast(dict[str, Any], reply)


@pytest.mark.parametrize("cmd", ["snapshot", "migrate"])
def test_a_confined_control_socket_refuses_what_needs_the_host(tmp_path: Path, cmd: str) -> None:
    from virtkit.migration.control import bind

    path = tmp_path / "c.sock"
    server = ControlServer(str(path), cast(Machine, object()), listener=bind(str(path)), confined=True)
    try:
        reply = _ask(path, cmd=cmd, dir=str(tmp_path), to="127.0.0.1:1", key="00" * 32)
        assert reply["ok"] is False and "confined" in reply["error"] and "--no-jail" in reply["error"]
        assert list(tmp_path.iterdir()) == [path]  # nothing written
    finally:
        server.close()
    assert path.exists()  # left for the unconfined parent: unlink would be a seccomp kill
