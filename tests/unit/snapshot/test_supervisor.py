"""The restart supervisor's child command lines (no process is started)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from virtkit.cli import build_parser
from virtkit.errors import ConfigError
from virtkit.snapshot.supervisor import Supervisor


def _args(tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(
        [
            "run",
            "guest.elf",
            "--memory",
            "32M",
            "--cmdline",
            "us=5 x=y",
            "--checkpoint-dir",
            str(tmp_path),
            "--restart",
            "on-failure",
            *extra,
        ]
    )


def test_boot_and_restore_commands_keep_the_vm_and_its_checkpointing(tmp_path: Path) -> None:
    sup = Supervisor(_args(tmp_path, "--checkpoint-every", "2s", "--control", "/tmp/x.sock", "--strict"))
    boot = sup.boot_command()
    assert boot[:5] == [sys.executable, "-m", "virtkit", "run", "guest.elf"]
    joined = " ".join(boot)
    for part in (
        "--memory 32M",
        "--checkpoint-every 2s",
        f"--checkpoint-dir {tmp_path}",
        "--control /tmp/x.sock",
        "--strict",
        "--serial stdout",
        "--exit-report",
    ):
        assert part in joined
    assert boot[boot.index("--cmdline") + 1] == "us=5 x=y"
    assert "--restart" not in boot  # the child must not supervise again
    restore = sup.restore_command()
    assert restore[3:5] == ["restore", str(tmp_path)] and "--checkpoint-every" in restore


def test_default_period_and_bad_values(tmp_path: Path) -> None:
    assert Supervisor(_args(tmp_path)).period == "5s"
    with pytest.raises(ConfigError, match="not a duration"):
        Supervisor(_args(tmp_path, "--checkpoint-every", "soon"))
    with pytest.raises(ConfigError, match="must be 0 or more"):
        Supervisor(_args(tmp_path, "--restart-limit", "-1"))
