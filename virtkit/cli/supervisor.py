"""Restart on failure: ``virtkit run --checkpoint-every 5s --restart on-failure``.

The supervisor is the process the user started. It runs the VMM as a child process that
checkpoints the VM every period into a checkpoint directory (a snapshot, written atomically: see
:mod:`virtkit.snapshot.snapshot`). When the child ends, the supervisor reads the child's exit
report (a small JSON file the VMM writes as it finishes):

* a report says how the VM ended (guest exit, guest crash, timeout, migrated away): the supervisor
  exits with the child's status, as ``virtkit run`` would have;
* no report (the VMM was killed, or died inside Python), or a report of a VMM error: that is the
  failure this mode is for. The supervisor starts ``virtkit restore CHECKPOINT`` (with the same
  checkpointing), so the guest continues from its last checkpoint: it sees a pause, not a
  reboot. Output the guest printed after that checkpoint is printed again. If the VMM died
  before the first checkpoint, the VM is booted again from its kernel (and the supervisor says
  so).

A guest crash (triple fault, emulation failure) is not restarted: resuming the same state would
replay the same crash. ``--restart-limit`` bounds the restarts.

The child's ``virtkit run`` command line is derived from the ``run`` parser itself
(:func:`replay_flags`): every machine option the user gave reaches the child, including options
added after this module was written, and only the supervisor's own options are left out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import FrameType
from typing import IO

from virtkit.errors import ConfigError
from virtkit.records import UntrustedInput, load_object
from virtkit.snapshot.snapshot import STATE_FILE
from virtkit.units import parse_duration

DEFAULT_PERIOD = "5s"
#: the exit report is written by the child VMM: bound it before parsing (it is a few fields)
MAX_REPORT_BYTES = 4096

#: ``virtkit run`` options the supervisor consumes or sets itself for each child
SUPERVISOR_DESTS = frozenset(
    {
        "restart",
        "restart_limit",
        "checkpoint_every",
        "checkpoint_dir",
        "exit_report",
        "serial",
        "timeout",
        "control",
        "stats",
        "command",
        "handler",
    }
)


def replay_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, skip: Iterable[str] = ()) -> list[str]:
    """The command-line tokens that make ``parser`` produce ``args`` again (its non-default
    values), leaving out the destinations in ``skip``. Positionals come first, in order.

    Raises :class:`ConfigError` for an option kind it cannot write back, so a new kind of option
    cannot be dropped silently (tests/unit/cli/test_supervisor.py round-trips every run option)."""
    skipped = set(skip)
    positionals: list[str] = []
    options: list[str] = []
    for action in parser._actions:  # argparse keeps no public list of its actions
        if action.dest in skipped or isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        value = getattr(args, action.dest, action.default)
        if not action.option_strings:
            if action.nargs in (None, 1):
                positionals.append(str(value))
            elif value:  # "*" / "+" / "?" positionals
                positionals.extend(str(v) for v in (value if isinstance(value, list) else [value]))
            continue
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)  # the long form, for a readable command line
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            options.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for item in value:
                options += [flag, str(item)]
        elif isinstance(action, argparse._StoreAction) and action.nargs is None:
            options += [flag, str(value)]
        else:
            raise ConfigError(f"cannot pass option {flag} on to a restarted VMM (kind {type(action).__name__})")
    return positionals + options


def run_parser() -> argparse.ArgumentParser:
    """The ``run`` subcommand's parser, as ``virtkit run`` builds it."""
    from virtkit.cli import build_parser

    parser = build_parser("virtkit.cli.vm")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            run: argparse.ArgumentParser = action.choices["run"]
            return run
    raise AssertionError("the run command is not registered")  # pragma: no cover - a build error


@dataclass(frozen=True, slots=True)
class Supervision:
    """What the supervisor needs, parsed once from ``virtkit run``'s arguments."""

    run_flags: tuple[str, ...]  # the child's `virtkit run` arguments, machine options only
    period: str
    checkpoint_dir: str | None
    restart_limit: int
    serial: str
    timeout: float | None
    control: str | None
    stats: bool
    disks: tuple[str, ...]  # the run's --disk values: a restore names the same images
    nets: tuple[str, ...]  # the run's --net values: a restore puts the cards on the same bridges

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Supervision:
        if args.restart_limit < 0:
            raise ConfigError(f"--restart-limit must be 0 or more, got {args.restart_limit}")
        period = args.checkpoint_every or DEFAULT_PERIOD
        parse_duration(period, "--checkpoint-every")  # refuse a bad value before starting anything
        return cls(
            run_flags=tuple(replay_flags(run_parser(), args, SUPERVISOR_DESTS)),
            period=period,
            checkpoint_dir=args.checkpoint_dir,
            restart_limit=args.restart_limit,
            serial=args.serial,
            timeout=args.timeout,
            control=args.control,
            stats=args.stats,
            disks=tuple(args.disk),
            nets=tuple(getattr(args, "net", ())),
        )


class Supervisor:
    def __init__(self, spec: Supervision) -> None:
        self.spec = spec
        self.period = spec.period
        self.own_dir = spec.checkpoint_dir is None
        self.dir = spec.checkpoint_dir or tempfile.mkdtemp(prefix="virtkit-checkpoints-")
        os.makedirs(self.dir, exist_ok=True)
        self.report = os.path.join(self.dir, ".exit-report.json")
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False

    # --- the child's command lines -----------------------------------------------------------------
    def _common(self) -> list[str]:
        s = self.spec
        out = [
            "--serial",
            "stdout" if s.serial != "none" else "none",
            "--checkpoint-every",
            self.period,
            "--checkpoint-dir",
            self.dir,
            "--exit-report",
            self.report,
        ]
        if s.timeout is not None:
            out += ["--timeout", str(s.timeout)]
        if s.control:
            out += ["--control", s.control]
        if s.stats:
            out.append("--stats")
        return out

    def boot_command(self) -> list[str]:
        return [sys.executable, "-m", "virtkit", "run", *self.spec.run_flags, *self._common()]

    def restore_command(self) -> list[str]:
        disks = [token for d in self.spec.disks for token in ("--disk", d)]
        nets = [token for n in self.spec.nets for token in ("--net", _without_name(n))]
        return [sys.executable, "-m", "virtkit", "restore", self.dir, *disks, *nets, *self._common()]

    # --- running -----------------------------------------------------------------------------------
    def _forward(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(signum)

    def _read_report(self, pid: int) -> dict[str, object] | None:
        try:
            with open(self.report, "rb") as f:
                report = load_object(f.read(MAX_REPORT_BYTES + 1), what="exit report", max_bytes=MAX_REPORT_BYTES)
        except (OSError, UntrustedInput):
            return None
        return report if report.get("pid") == pid else None

    def run(self) -> int:
        s = self.spec
        out: IO[bytes] | None = None
        if s.serial not in ("stdout", "none"):
            try:
                out = open(s.serial, "wb")  # noqa: SIM115 - one file across all children
            except OSError as e:
                raise ConfigError(f"cannot open serial output file {s.serial}: {e.strerror}") from None
        previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        restarts = 0
        cmd = self.boot_command()
        try:
            while True:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.report)
                self.child = subprocess.Popen(cmd, stdout=out if out is not None else None)
                status = self.child.wait()
                report = self._read_report(self.child.pid)
                if self.stopping:
                    return status if status >= 0 else 128 - status
                if report is not None and report.get("reason") != "error":
                    code = report.get("exit_code")
                    return code if isinstance(code, int) else status
                why = (
                    f"was killed by signal {-status} ({signal.Signals(-status).name})"
                    if status < 0
                    else f"failed ({report.get('reason') if report else f'exit status {status}, no report'})"
                )
                if restarts >= s.restart_limit:
                    print(f"virtkit: VMM {why}; restart limit {s.restart_limit} reached, giving up", file=sys.stderr)
                    return 1
                restarts += 1
                if os.path.exists(os.path.join(self.dir, STATE_FILE)):
                    age = time.time() - os.path.getmtime(os.path.join(self.dir, STATE_FILE))
                    print(
                        f"virtkit: VMM {why}; resuming the VM from its checkpoint of {age:.1f} s ago "
                        f"(restart {restarts}/{s.restart_limit})",
                        file=sys.stderr,
                        flush=True,
                    )
                    cmd = self.restore_command()
                else:
                    print(
                        f"virtkit: VMM {why} before its first checkpoint; booting the VM again "
                        f"(restart {restarts}/{s.restart_limit})",
                        file=sys.stderr,
                        flush=True,
                    )
                    cmd = self.boot_command()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.child is not None and self.child.poll() is None:
                self.child.kill()
                self.child.wait()
            if out is not None:
                out.close()
            if self.own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)


def _without_name(net: str) -> str:
    """A ``--net`` value for a restarted VMM: a TAP name the user chose may still be held by the
    VMM that died (the kernel removes a TAP when its last fd closes), so the new one gets its own."""
    kind, *opts = net.split(",")
    return ",".join([kind, *(o for o in opts if not o.startswith("name="))])


def supervise(args: argparse.Namespace) -> int:
    """``virtkit run --restart on-failure``: this process becomes the supervisor of a child VMM."""
    return Supervisor(Supervision.from_args(args)).run()
