"""The restart supervisor's child command lines (no process is started)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from virtkit.cli import build_parser
from virtkit.cli.supervisor import SUPERVISOR_DESTS, Supervision, Supervisor, replay_flags, run_parser
from virtkit.errors import ConfigError


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
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


def _supervisor(tmp_path: Path, *extra: str) -> Supervisor:
    return Supervisor(Supervision.from_args(_args(tmp_path, *extra)))


def test_boot_and_restore_commands_keep_the_vm_and_its_checkpointing(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, "--checkpoint-every", "2s", "--control", "/tmp/x.sock", "--strict")
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
    assert "--restart" not in boot and "--restart-limit" not in boot  # the child must not supervise again
    restore = sup.restore_command()
    assert restore[3:5] == ["restore", str(tmp_path)] and "--checkpoint-every" in restore


def test_a_restart_names_the_runs_disks(tmp_path: Path) -> None:
    """The snapshot's recorded disk paths are not trusted: the restore names the run's images."""
    sup = _supervisor(tmp_path, "--disk", "a.img", "--disk", "b.img,ro")
    restore = sup.restore_command()
    assert " --disk a.img --disk b.img,ro " in " ".join(restore) + " "


def test_default_period_and_bad_values(tmp_path: Path) -> None:
    assert _supervisor(tmp_path).period == "5s"
    with pytest.raises(ConfigError, match="not a duration"):
        _supervisor(tmp_path, "--checkpoint-every", "soon")
    with pytest.raises(ConfigError, match="must be 0 or more"):
        _supervisor(tmp_path, "--restart-limit", "-1")


def _sample(action: argparse.Action) -> list[str]:
    """Command-line tokens giving ``action`` a value other than its default."""
    flag = action.option_strings[-1]
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        return [flag]
    value = "on-failure" if action.dest == "restart" else None
    if action.choices:
        value = value or next(str(c) for c in action.choices if c != action.default)
    value = value or ("3" if action.type in (int, float) else "2")
    if isinstance(action, argparse._AppendAction):
        return [flag, value, flag, value + "x"]
    return [flag, value]


def test_every_run_option_reaches_the_child_or_is_the_supervisors() -> None:
    """Each machine option of `virtkit run`, set to a non-default value, is passed on to the child
    unchanged: an option added to `run` later cannot be dropped by a restart."""
    parser = run_parser()
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert len(options) > 10
    for action in options:
        if action.dest in SUPERVISOR_DESTS:
            continue
        argv = ["guest.elf", *_sample(action)]
        args = parser.parse_args(argv)
        again = parser.parse_args(replay_flags(parser, args, SUPERVISOR_DESTS))
        assert getattr(again, action.dest) == getattr(args, action.dest), action.option_strings


def test_all_options_at_once_round_trip() -> None:
    parser = run_parser()
    argv = ["guest.elf"]
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            argv += _sample(action)
    args = parser.parse_args(argv)
    again = parser.parse_args(replay_flags(parser, args))
    assert {k: v for k, v in vars(again).items() if k != "handler"} == {
        k: v for k, v in vars(args).items() if k != "handler"
    }


def test_an_option_kind_it_cannot_write_back_is_refused() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pair", nargs=2)
    with pytest.raises(ConfigError, match="cannot pass option --pair"):
        replay_flags(parser, parser.parse_args(["--pair", "a", "b"]))


def test_a_hostile_exit_report_is_not_trusted(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path)
    Path(sup.report).write_text('{"pid": 7, "exit_code": 3}')
    assert sup._read_report(7) == {"pid": 7, "exit_code": 3}
    assert sup._read_report(8) is None  # a report from another process
    Path(sup.report).write_text('{"pid": 7, "x": "' + "a" * 10_000 + '"}')
    assert sup._read_report(7) is None  # oversized
    Path(sup.report).write_text("[" * 100 + "]" * 100)
    assert sup._read_report(7) is None  # not an object, too deep


def test_a_linux_guest_keeps_its_initrd_and_boot_protocol_across_a_restart(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, "--initrd", "initrd.img", "--boot", "linux")
    boot = " ".join(sup.boot_command())
    assert "--initrd initrd.img" in boot and "--boot linux" in boot


def test_a_restart_puts_the_network_cards_on_the_runs_bridges(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, "--mode", "para", "--net", "tap,bridge=br0,name=vk0,mac=02:00:00:00:00:01")
    boot = sup.boot_command()
    assert boot[boot.index("--net") + 1] == "tap,bridge=br0,name=vk0,mac=02:00:00:00:00:01"
    restore = sup.restore_command()
    assert restore[restore.index("--net") + 1] == "tap,bridge=br0,mac=02:00:00:00:00:01"
