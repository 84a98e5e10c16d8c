"""The cgroup2 device filter program, run in a reference interpreter of its few eBPF instructions."""

from __future__ import annotations

import pytest

from virtkit.container.cgroups import device_rules
from virtkit.container.config import DeviceRule, Resources
from virtkit.container.devices import Rule, build_program, parse_rule, run_program


@pytest.fixture(scope="module")
def default_prog() -> bytes:
    return build_program(device_rules(Resources()))


@pytest.mark.parametrize(
    ("kind", "major", "minor", "access", "allowed"),
    [
        ("c", 1, 3, "rw", 1),  # null
        ("c", 1, 9, "r", 1),  # urandom
        ("c", 136, 7, "rw", 1),  # a pty
        ("c", 5, 2, "rw", 1),  # ptmx
        ("b", 254, 0, "r", 0),  # the host's disk: no reads
        ("b", 254, 0, "w", 0),
        ("b", 254, 0, "m", 1),  # mknod alone is allowed (b *:* m), as with Docker
        ("c", 4, 1, "rw", 0),  # a console tty of the host
        ("c", 10, 229, "rw", 0),  # /dev/fuse
    ],
)
def test_default_allowlist(default_prog: bytes, kind: str, major: int, minor: int, access: str, allowed: int) -> None:
    assert run_program(default_prog, kind, major, minor, access) == allowed


def test_later_rules_win() -> None:
    res = Resources(
        devices=(DeviceRule(False, "a"), DeviceRule(True, "c", 10, 229, "rw"), DeviceRule(False, "c", 10, 229, "w"))
    )
    prog = build_program(device_rules(res))
    assert run_program(prog, "c", 10, 229, "r") == 1
    assert run_program(prog, "c", 10, 229, "w") == 0
    assert run_program(prog, "c", 1, 3, "r") == 1  # the default allowlist comes last, as in runc
    assert run_program(prog, "b", 8, 0, "r") == 0  # and adds nothing beyond the minimal /dev


def test_access_must_be_a_subset() -> None:
    prog = build_program([Rule(False, "a", None, None, "rwm"), parse_rule(True, "c 1:5 r")])
    assert run_program(prog, "c", 1, 5, "r") == 1
    assert run_program(prog, "c", 1, 5, "rw") == 0


def test_nothing_after_an_unconditional_rule() -> None:
    """The kernel's verifier refuses unreachable instructions."""
    prog = build_program([Rule(False, "a", None, None, "rwm")])
    assert len(prog) // 8 == 6 + 2  # the context loads, then "return 0"
