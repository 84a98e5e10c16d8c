"""The seccomp compiler, checked with a reference BPF interpreter (no filter is installed here)."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtkit.container import seccomp as profiles
from virtkit.errors import ConfigError
from virtkit.host import seccomp as sc
from virtkit.host.syscalls_x86_64 import SYSCALLS

ALLOW = sc.SECCOMP_RET_ALLOW
EPERM = sc.SECCOMP_RET_ERRNO | errno.EPERM


@pytest.fixture(scope="module")
def default_prog() -> bytes:
    from virtkit.host.caps import DOCKER_DEFAULT

    return sc.compile_profile(profiles.default_profile(DOCKER_DEFAULT))


def run(prog: bytes, name: str, *args: int) -> int:
    return sc.run_filter(prog, SYSCALLS[name], args)


@pytest.mark.parametrize(
    "name",
    [
        "read",
        "write",
        "openat",
        "execve",
        "exit_group",
        "getpid",
        "futex",
        "rt_sigreturn",
        "wait4",
        "capset",
        "prctl",
        "setresuid",
    ],
)
def test_default_allows_ordinary_calls(default_prog: bytes, name: str) -> None:
    assert run(default_prog, name) == ALLOW


@pytest.mark.parametrize(
    "name",
    [
        "ptrace",  # Docker allows it since kernel 4.8, where a tracer can no longer skip the tracee's filter
        "chroot",  # CAP_SYS_CHROOT is in Docker's default capability set, and the profile follows the caps
    ],
)
def test_default_allows_on_purpose(default_prog: bytes, name: str) -> None:
    assert run(default_prog, name) == ALLOW


@pytest.mark.parametrize(
    "name",
    [
        "mount",
        "umount2",
        "unshare",
        "setns",
        "bpf",
        "keyctl",
        "add_key",
        "reboot",
        "init_module",
        "kexec_load",
        "open_by_handle_at",
        "pivot_root",
        "swapon",
        "sethostname",
        "fsopen",
        "move_mount",
        "perf_event_open",
    ],
)
def test_default_denies_privileged_calls(default_prog: bytes, name: str) -> None:
    assert run(default_prog, name) == EPERM


@pytest.mark.parametrize("name", ["io_uring_setup", "io_uring_enter", "io_uring_register"])
def test_io_uring_is_denied_whatever_the_capabilities(name: str) -> None:
    from virtkit.host.caps import CAPABILITIES

    assert SYSCALLS[name] in (425, 426, 427)  # the table must know them, or the rule would be skipped
    for caps in ((), tuple(CAPABILITIES)):
        prog = sc.compile_profile(profiles.default_profile(caps))
        assert run(prog, name) == EPERM, caps


def test_clone3_is_answered_enosys(default_prog: bytes) -> None:
    """Not allowed and not EPERM: ENOSYS makes libc fall back to clone, whose flags the filter reads."""
    assert run(default_prog, "clone3") == sc.SECCOMP_RET_ERRNO | errno.ENOSYS


def test_clone_namespace_flags_denied(default_prog: bytes) -> None:
    CLONE_THREAD_FLAGS = 0x3D0F00  # what pthread_create passes
    assert run(default_prog, "clone", CLONE_THREAD_FLAGS) == ALLOW
    assert run(default_prog, "clone", 0x11) == ALLOW  # fork(): SIGCHLD | ...
    for flag in (0x20000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000):
        assert run(default_prog, "clone", 0x11 | flag) == EPERM


def test_socket_and_personality_rules(default_prog: bytes) -> None:
    assert run(default_prog, "socket", 2) == ALLOW
    assert run(default_prog, "socket", profiles.AF_VSOCK) == EPERM
    assert run(default_prog, "personality", 0) == ALLOW
    assert run(default_prog, "personality", 0xFFFFFFFF) == ALLOW
    assert run(default_prog, "personality", 0x0040000) == EPERM  # ADDR_NO_RANDOMIZE


def test_foreign_architectures_and_x32_are_refused(default_prog: bytes) -> None:
    AUDIT_ARCH_I386 = 0x40000003
    assert sc.run_filter(default_prog, 3, arch=AUDIT_ARCH_I386) == EPERM  # read on i386 numbering
    assert sc.run_filter(default_prog, SYSCALLS["read"] | sc.X32_SYSCALL_BIT) == EPERM


def test_sys_admin_opens_mount_and_clone(default_prog: bytes) -> None:
    prog = sc.compile_profile(profiles.default_profile(["CAP_SYS_ADMIN"]))
    assert run(prog, "mount") == ALLOW
    assert run(prog, "clone", 0x10000000 | 0x11) == ALLOW


def test_every_default_name_is_known() -> None:
    profile = profiles.default_profile()
    missing = [n for rule in profile["syscalls"] for n in rule["names"] if n not in SYSCALLS]
    assert missing == []


def test_program_is_a_whole_number_of_instructions(default_prog: bytes) -> None:
    assert len(default_prog) % 8 == 0
    assert len(default_prog) // 8 < 400


def test_far_jumps_are_expanded() -> None:
    """Hundreds of argument rules put targets more than 255 instructions away."""
    rules = [
        {"names": ["ioctl"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 1, "value": v, "op": "SCMP_CMP_EQ"}]}
        for v in range(200)
    ]
    rules.append({"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"})
    prog = sc.compile_profile({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": rules})
    assert len(prog) // 8 > 600
    assert run(prog, "read") == ALLOW
    assert run(prog, "ioctl", 0, 0) == ALLOW
    assert run(prog, "ioctl", 0, 199) == ALLOW
    assert run(prog, "ioctl", 0, 200) == EPERM
    assert run(prog, "openat") == EPERM


def test_too_big_a_program_is_refused() -> None:
    rules = [
        {"names": ["ioctl"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 1, "value": v, "op": "SCMP_CMP_EQ"}]}
        for v in range(1200)
    ]
    with pytest.raises(ConfigError, match="BPF instructions"):
        sc.compile_profile({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": rules})


def test_actions_encode() -> None:
    assert sc.action_value("SCMP_ACT_ERRNO", 38) == sc.SECCOMP_RET_ERRNO | 38
    assert sc.action_value("SCMP_ACT_KILL_PROCESS", None) == sc.SECCOMP_RET_KILL_PROCESS
    prog = sc.compile_profile(
        {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["getpid"], "action": "SCMP_ACT_KILL"}]}
    )
    assert run(prog, "getpid") == sc.SECCOMP_RET_KILL_THREAD
    assert run(prog, "read") == ALLOW


U64 = st.integers(min_value=0, max_value=2**64 - 1)
PY_OPS = {
    "SCMP_CMP_EQ": lambda a, v, m: a == v,
    "SCMP_CMP_NE": lambda a, v, m: a != v,
    "SCMP_CMP_LT": lambda a, v, m: a < v,
    "SCMP_CMP_LE": lambda a, v, m: a <= v,
    "SCMP_CMP_GT": lambda a, v, m: a > v,
    "SCMP_CMP_GE": lambda a, v, m: a >= v,
    "SCMP_CMP_MASKED_EQ": lambda a, v, m: a & v == m,
}


def _near(v: int) -> st.SearchStrategy[int]:
    # arguments that share the high or low word with the value are the interesting ones
    return st.one_of(
        U64,
        st.just(v),
        st.integers(0, 2**32 - 1).map(lambda lo: (v & ~0xFFFFFFFF) | lo),
        st.integers(0, 2**32 - 1).map(lambda hi: (hi << 32) | (v & 0xFFFFFFFF)),
    )


@given(op=st.sampled_from(sorted(PY_OPS)), value=U64, two=U64, data=st.data())
def test_64bit_comparisons_match_python(op: str, value: int, two: int, data: st.DataObject) -> None:
    arg = data.draw(_near(value))
    prog = sc.compile_profile(
        {
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                {
                    "names": ["ioctl"],
                    "action": "SCMP_ACT_ALLOW",
                    "args": [{"index": 2, "op": op, "value": value, "valueTwo": two}],
                }
            ],
        }
    )
    expect = ALLOW if PY_OPS[op](arg, value, two) else EPERM
    assert sc.run_filter(prog, SYSCALLS["ioctl"], (0, 0, arg)) == expect


def test_instruction_encoding() -> None:
    asm = sc.Assembler()
    asm.load(sc.OFF_NR)
    asm.ret(sc.SECCOMP_RET_ALLOW)
    prog = asm.assemble()
    assert prog == struct.pack("<HBBI", 0x20, 0, 0, 0) + struct.pack("<HBBI", 0x06, 0, 0, 0x7FFF0000)
