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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType
from typing import IO

from virtkit.errors import ConfigError
from virtkit.snapshot.snapshot import STATE_FILE

DEFAULT_PERIOD = "5s"


class Supervisor:
    def __init__(self, args: argparse.Namespace) -> None:
        if args.restart_limit < 0:
            raise ConfigError(f"--restart-limit must be 0 or more, got {args.restart_limit}")
        self.args = args
        self.period = args.checkpoint_every or DEFAULT_PERIOD
        from virtkit.cli.failover import parse_duration

        parse_duration(self.period, "--checkpoint-every")  # refuse a bad value before starting anything
        self.own_dir = args.checkpoint_dir is None
        self.dir = args.checkpoint_dir or tempfile.mkdtemp(prefix="virtkit-checkpoints-")
        os.makedirs(self.dir, exist_ok=True)
        self.report = os.path.join(self.dir, ".exit-report.json")
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False

    # --- the child's command lines -----------------------------------------------------------------
    def _common(self) -> list[str]:
        a = self.args
        out = [
            "--serial",
            "stdout" if a.serial != "none" else "none",
            "--checkpoint-every",
            self.period,
            "--checkpoint-dir",
            self.dir,
            "--exit-report",
            self.report,
        ]
        if a.timeout is not None:
            out += ["--timeout", str(a.timeout)]
        if a.control:
            out += ["--control", a.control]
        if a.stats:
            out.append("--stats")
        return out

    def boot_command(self) -> list[str]:
        a = self.args
        cmd = [
            sys.executable,
            "-m",
            "virtkit",
            "run",
            a.target,
            "--mode",
            a.mode,
            "--vcpus",
            str(a.vcpus),
            "--boot",
            a.boot,
            "--cmdline",
            a.cmdline,
        ]
        if a.memory:
            cmd += ["--memory", a.memory]
        for m in a.module:
            cmd += ["--module", m]
        for d in getattr(a, "disk", []):
            cmd += ["--disk", d]
        if a.strict:
            cmd.append("--strict")
        return cmd + self._common()

    def restore_command(self) -> list[str]:
        return [sys.executable, "-m", "virtkit", "restore", self.dir, *self._common()]

    # --- running -----------------------------------------------------------------------------------
    def _forward(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(signum)

    def _read_report(self, pid: int) -> dict[str, object] | None:
        try:
            with open(self.report) as f:
                report = json.load(f)
        except (OSError, ValueError):
            return None
        return report if isinstance(report, dict) and report.get("pid") == pid else None

    def run(self) -> int:
        a = self.args
        out: IO[bytes] | None = None
        if a.serial not in ("stdout", "none"):
            try:
                out = open(a.serial, "wb")  # noqa: SIM115 - one file across all children
            except OSError as e:
                raise ConfigError(f"cannot open serial output file {a.serial}: {e.strerror}") from None
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGINT)}
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
                if restarts >= a.restart_limit:
                    print(f"virtkit: VMM {why}; restart limit {a.restart_limit} reached, giving up", file=sys.stderr)
                    return 1
                restarts += 1
                if os.path.exists(os.path.join(self.dir, STATE_FILE)):
                    age = time.time() - os.path.getmtime(os.path.join(self.dir, STATE_FILE))
                    print(
                        f"virtkit: VMM {why}; resuming the VM from its checkpoint of {age:.1f} s ago "
                        f"(restart {restarts}/{a.restart_limit})",
                        file=sys.stderr,
                        flush=True,
                    )
                    cmd = self.restore_command()
                else:
                    print(
                        f"virtkit: VMM {why} before its first checkpoint; booting the VM again "
                        f"(restart {restarts}/{a.restart_limit})",
                        file=sys.stderr,
                        flush=True,
                    )
                    cmd = self.boot_command()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if self.child is not None and self.child.poll() is None:
                self.child.kill()
                self.child.wait()
            if out is not None:
                out.close()
            if self.own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
