"""Running a VM in the foreground: what ``virtkit run``, ``restore`` and ``migrate-receive`` share.

The options every foreground VM command takes (serial, timeout, stats, and the failover options
``--control``, ``--checkpoint-every``, ``--exit-report``), the hooks those options add around the
VM's run (:class:`FailoverHooks`), and :func:`foreground` itself: signals, the end report and the
process exit status. A VM that resumes (``restore``, ``migrate-receive``) runs exactly as one that
``run`` booted, so a restored or migrated VM can be snapshotted, migrated or checkpointed again.
"""

from __future__ import annotations

# Imported on every `virtkit run` (its options are part of the run parser): only cheap modules at
# the top; json, signal, threading... are imported by the functions that use them.
import argparse
import os
import sys

from virtkit.units import parse_duration

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from types import FrameType
    from typing import Any

    from virtkit.api import VM, RunResult


def add_runtime_options(p: argparse.ArgumentParser, *, serial: bool = True) -> None:
    """What every foreground VM command takes, whether it boots, restores or receives the VM."""
    if serial:
        p.add_argument(
            "--serial",
            default="stdout",
            metavar="stdout|FILE|none",
            help="where the UART's output goes (default stdout)",
        )
        p.add_argument(
            "--timeout", type=float, default=None, metavar="S", help="stop the guest after S seconds (exit status 124)"
        )
        p.add_argument("--stats", action="store_true", help="print VM exit statistics at the end")
    add_failover_options(p)


def add_failover_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--control",
        default=None,
        metavar="PATH",
        help="serve a control socket at PATH (JSON lines): snapshot, migrate, pause, resume, stop",
    )
    p.add_argument(
        "--checkpoint-every",
        default=None,
        metavar="DURATION",
        help="snapshot the running VM every DURATION (e.g. 5s) into --checkpoint-dir",
    )
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="where checkpoints go")
    p.add_argument("--exit-report", default=None, help=argparse.SUPPRESS)  # the supervisor's channel


def add_run_options(run: argparse.ArgumentParser) -> None:
    """The failover options of ``virtkit run`` (virtkit.cli.vm calls this on its parser, so they
    exist even when only that module's commands are registered)."""
    add_failover_options(run)
    run.add_argument(
        "--restart",
        default="no",
        choices=("no", "on-failure"),
        help="on-failure: supervise the VMM and, if it dies, resume the VM from its last "
        "checkpoint (with --checkpoint-every, default 5s)",
    )
    run.add_argument("--restart-limit", type=int, default=5, metavar="N", help="give up after N restarts (default 5)")


class FailoverHooks:
    """What ``--control``, ``--checkpoint-every`` and ``--exit-report`` add to a foreground VM."""

    def __init__(
        self, args: argparse.Namespace, vm: VM, *, control_listener: socket.socket | None = None, confined: bool = False
    ) -> None:
        """``control_listener``: the --control socket, bound before the process confined itself
        (``confined``: no host files, no network; see virtkit.cli.migrate_receive)."""
        import threading

        self.args = args
        self.vm = vm
        self.control_listener = control_listener
        self.confined = confined
        self.exit_code: int | None = None  # set when the VM left this host (migrated)
        self.migrated_to: str | None = None
        self._server: Any = None
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None

    def __enter__(self) -> FailoverHooks:
        from virtkit.errors import ConfigError

        args = self.args
        assert self.vm.machine is not None
        every = getattr(args, "checkpoint_every", None)
        try:  # every check before anything starts, so a refusal leaves nothing running
            if every is not None and not args.checkpoint_dir:
                raise ConfigError("--checkpoint-every needs --checkpoint-dir DIR (where the checkpoints go)")
            period = parse_duration(every, "--checkpoint-every") if every is not None else 0.0
        except BaseException:
            if self.control_listener is not None:
                self.control_listener.close()
            raise
        if getattr(args, "control", None):
            from virtkit.migration.control import ControlServer

            self._server = ControlServer(
                args.control,
                self.vm.machine,
                on_migrated=self._migrated,
                listener=self.control_listener,
                confined=self.confined,
            )
            self.control_listener = None  # the server owns (and closes) it now
        if every is not None:
            import threading

            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop, args=(period,), name="vm-checkpoint", daemon=True
            )
            self._checkpointer.start()
        return self

    def _migrated(self, to: str) -> None:
        from virtkit.stop import Stop, StopReason

        self.migrated_to = to
        self.exit_code = 0
        assert self.vm.machine is not None
        self.vm.machine.request_stop(Stop(StopReason.STOPPED, detail=f"migrated to {to}"))

    def _checkpoint_loop(self, period: float) -> None:
        from virtkit.errors import VirtkitError
        from virtkit.snapshot import save

        m = self.vm.machine
        while not self._stop.wait(period):
            if m is None or m.stopping:
                return
            try:
                save(m, self.args.checkpoint_dir)
            except VirtkitError as e:
                print(f"virtkit: warning: checkpoint failed: {e}", file=sys.stderr)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=30)
        if self._server is not None:
            self._server.close()

    def finish(self, result: RunResult) -> int:
        """The process exit status, and the report the supervisor reads."""
        code = result.exit_code if self.exit_code is None else self.exit_code
        report = getattr(self.args, "exit_report", None)
        if report:
            import json

            try:
                with open(report, "w") as f:
                    json.dump(
                        {
                            "pid": os.getpid(),
                            "reason": result.reason.value,
                            "exit_code": code,
                            "migrated": self.migrated_to is not None,
                        },
                        f,
                    )
            except OSError:
                pass
        return code


class _Terminated(BaseException):
    pass


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


def foreground(
    vm: VM,
    args: argparse.Namespace,
    *,
    started: bool = False,
    control_listener: socket.socket | None = None,
    confined: bool = False,
) -> int:
    """Run ``vm`` (already opened) until it stops, as ``virtkit run`` does. ``control_listener``
    and ``confined``: see :class:`FailoverHooks`."""
    import signal

    from virtkit.api import EXIT_STOPPED
    from virtkit.diagnose import linux_init_wall  # imported before a confined VMM loses its files
    from virtkit.kvm.flavor import kvm_flavor
    from virtkit.stop import StopReason

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with FailoverHooks(args, vm, control_listener=control_listener, confined=confined) as hooks:
            try:
                if not started:
                    vm.start()
                result = vm.wait(timeout=args.timeout)
            except (KeyboardInterrupt, _Terminated) as e:
                print("virtkit: stopped by " + ("SIGTERM" if isinstance(e, _Terminated) else "Ctrl-C"), file=sys.stderr)
                return EXIT_STOPPED if isinstance(e, KeyboardInterrupt) else 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result.reason not in (StopReason.DEBUG_EXIT, StopReason.OUTPUT_CLOSED):
        label = "guest crashed" if result.crashed else result.reason.value
        print(f"virtkit: {label}: {result.detail}", file=sys.stderr)
    wall = linux_init_wall(result.serial_bytes, kvm_flavor())
    if wall:
        print(f"virtkit: note: {wall}", file=sys.stderr)
    if getattr(args, "stats", False):
        from virtkit.stats import format_table

        print(format_table(result.stats), file=sys.stderr)
    return hooks.finish(result)
