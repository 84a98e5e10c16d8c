"""Failover commands: ``snapshot``, ``snapshot-info``, ``restore``, ``clone``, ``migrate``,
``migrate-receive``; and the failover options of ``run`` (``--control``, ``--checkpoint-every``,
``--restart on-failure``), which this module adds to the ``run`` parser that
:mod:`virtkit.cli.vm` registered.

A VM that resumes here (``restore``, ``migrate-receive``) runs in the foreground exactly as one
that ``run`` booted: same serial, timeout, stats and exit statuses, and the same failover options,
so a restored or migrated VM can be snapshotted, migrated or checkpointed again.
"""

from __future__ import annotations

# This module is imported on every `virtkit run` (its options are part of the run parser): only
# cheap modules at the top; json, re, signal... are imported by the functions that use them.
import argparse
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    import threading
    from types import FrameType
    from typing import Any

    from virtkit.api import VM, RunResult


def parse_duration(text: str, what: str) -> float:
    """``5s``, ``500ms``, ``2m``, ``1h`` or plain seconds, as seconds."""
    import re

    from virtkit.errors import ConfigError

    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", text)
    if not m:
        raise ConfigError(f"{what} {text!r} is not a duration: use e.g. 5s, 500ms, 2m")
    value = float(m.group(1)) * {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[m.group(2)]
    if value <= 0:
        raise ConfigError(f"{what} must be positive, got {text!r}")
    return value


def _add_runtime_options(p: argparse.ArgumentParser, *, serial: bool = True) -> None:
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
    _add_failover_options(p)


def _add_failover_options(p: argparse.ArgumentParser) -> None:
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
    _add_failover_options(run)
    run.add_argument(
        "--restart",
        default="no",
        choices=("no", "on-failure"),
        help="on-failure: supervise the VMM and, if it dies, resume the VM from its last "
        "checkpoint (with --checkpoint-every, default 5s)",
    )
    run.add_argument("--restart-limit", type=int, default=5, metavar="N", help="give up after N restarts (default 5)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:

    p = sub.add_parser(
        "snapshot",
        help="snapshot a running VM through its control socket",
        description="Pause the VM served at --control, write its snapshot (state file and "
        "memory file) into DIR, and resume it.",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--control", required=True, metavar="PATH", help="the VM's control socket (virtkit run --control)")
    p.add_argument("--leave-paused", action="store_true", help="do not resume the VM afterwards")
    p.add_argument("--sync", action="store_true", help="fsync the files before returning")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_snapshot)

    p = sub.add_parser("snapshot-info", help="describe a snapshot directory (format, size, vCPUs, devices)")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(handler=cmd_snapshot_info)

    p = sub.add_parser(
        "restore",
        help="resume a VM from a snapshot directory, in the foreground",
        description="Resume the VM saved in DIR where it was. Guest memory maps the snapshot's "
        "memory file copy-on-write: the file is never modified, so DIR can be "
        "restored again, or cloned.",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--verify", action="store_true", help="read the whole memory file and check its checksums first")
    _add_runtime_options(p)
    p.set_defaults(handler=cmd_restore)

    p = sub.add_parser(
        "clone",
        help="resume N VMs from one snapshot, sharing its memory copy-on-write",
        description="Each clone gets its own serial, its own copy-on-write overlay of every "
        "writable disk (reflink, else a sparse copy) and an identity: name clone-I and "
        "a 16-byte id, which the guest reads from CMOS bytes 0x40-0x4F (index: 0x50-0x51).",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--count", "-n", type=int, required=True, help="how many clones")
    p.add_argument(
        "--workdir",
        default=None,
        metavar="DIR",
        help="put clone i's disk overlays in DIR/clone-i/ (default: a new DIR/clones-* in the snapshot)",
    )
    p.add_argument(
        "--serial-dir",
        default=None,
        metavar="DIR",
        help="write clone i's serial output to DIR/clone-i.log (default: discard)",
    )
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="stop the clones after S seconds")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_clone)

    p = sub.add_parser(
        "migrate",
        help="move a running VM to another virtkit host, live",
        description="Pre-copy the VM's memory to a 'virtkit migrate-receive' at HOST:PORT while it "
        "runs, then pause it, send the rest and its state, and let it resume there. "
        "Both ends must hold the same pre-shared key (virtkit migrate-keygen); every "
        "message is authenticated with it, guest memory is not encrypted. If anything "
        "fails before the switch-over, the VM keeps running here.",
    )
    p.add_argument("--control", required=True, metavar="PATH", help="the VM's control socket (virtkit run --control)")
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="where 'virtkit migrate-receive' listens")
    p.add_argument(
        "--key-file",
        required=True,
        metavar="FILE",
        help="the pre-shared key (mode 0600; the receiver's --key-file holds the same key)",
    )
    p.add_argument(
        "--downtime-ms",
        type=float,
        default=50.0,
        help="stop pre-copying once the rest can be sent in this long (default 50)",
    )
    p.add_argument("--max-rounds", type=int, default=30, help="pre-copy rounds at most (default 30)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_migrate)

    p = sub.add_parser(
        "migrate-keygen",
        help="make a pre-shared key for live migration",
        description="Write 32 random bytes, in hex, to FILE (created with mode 0600; an existing "
        "file is never overwritten). Copy it to the other host over a channel you trust "
        "(e.g. scp) and give it to both 'migrate' and 'migrate-receive' with --key-file.",
    )
    p.add_argument("file", metavar="FILE")
    p.set_defaults(handler=cmd_migrate_keygen)

    from virtkit.cli.options import add_machine_options

    p = sub.add_parser(
        "migrate-receive",
        help="wait for one incoming live migration and run the VM here",
        description="Build a VM from the machine options below (the same as 'virtkit run' takes), listen on "
        "[HOST:]PORT, accept one migration from 'virtkit migrate' authenticated with the key in "
        "--key-file, and run the VM in the foreground once it has switched over. The incoming VM "
        "must have the shape of this one (memory, vCPUs, mode, strict, the number, sizes and "
        "read-only flags of the disks, devices, CPU features): otherwise it is refused, naming the "
        "field, and nothing runs. Disk images are the ones named here, never paths from the "
        "sender. Once its machine and sockets are ready the receiver confines itself (namespaces, "
        "an empty root, an unprivileged uid, seccomp), before it reads a byte from the network.",
        epilog="Listening on another address than loopback: the key protects the integrity and authenticity "
        "of the stream (nobody without it can send a VM here, alter or replay one), not its "
        "confidentiality (guest memory crosses the network unencrypted) nor its availability (anyone "
        "who can connect or cut the connection can make this migration fail). So the network must be "
        "trusted with what the guest's memory holds (or the port tunnelled: ssh, WireGuard), and "
        "for availability.",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:7000",
        metavar="[HOST:]PORT",
        help="address to listen on (default 127.0.0.1:7000; port 0: any free port; no host: loopback, "
        "never all interfaces unless asked, e.g. 0.0.0.0:7000)",
    )
    p.add_argument(
        "--key-file",
        required=True,
        metavar="FILE",
        help="the pre-shared key (mode 0600; the sender's --key-file holds the same key)",
    )
    p.add_argument(
        "--port-file", default=None, metavar="FILE", help="write the port listened on to FILE once ready to accept"
    )
    p.add_argument(
        "--accept-timeout",
        type=float,
        default=None,
        metavar="S",
        help="give up if no migration arrives within S seconds",
    )
    p.add_argument(
        "--no-jail",
        action="store_true",
        help="do not confine the receiver (it stays root, with the host's files and network); "
        "needed for --checkpoint-every and the control socket's snapshot/migrate",
    )
    p.add_argument(
        "--jail-uid",
        type=int,
        default=None,
        metavar="UID",
        help="uid and gid of the confined receiver (default: 2000000000 + its pid)",
    )
    p.add_argument(
        "--inject-fault",
        default=None,
        help=argparse.SUPPRESS,
        choices=("refuse", "drop-during-memory", "die-before-switchover"),
    )
    p.add_argument("--no-seccomp", action="store_true", help=argparse.SUPPRESS)  # measuring the allow-list
    add_machine_options(p)
    _add_runtime_options(p)
    p.set_defaults(handler=cmd_migrate_receive)


# ------------------------------------------------------------------------------------------------
# the runtime side: control socket, checkpoints, exit report


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


#: what ``virtkit run`` (virtkit/cli/run_vm.py) wraps the VM's run in
failover_hooks = FailoverHooks


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
    if getattr(args, "stats", False):
        from virtkit.stats import format_table

        print(format_table(result.stats), file=sys.stderr)
    return hooks.finish(result)


# ------------------------------------------------------------------------------------------------
# handlers


def _print(obj: dict[str, Any], as_json: bool, text: str) -> None:
    import json

    print(json.dumps(obj) if as_json else text)


def cmd_snapshot(args: argparse.Namespace) -> int:
    from virtkit.migration.control import request

    reply = request(
        args.control, "snapshot", dir=os.path.abspath(args.dir), resume=not args.leave_paused, sync=args.sync
    )
    reply.pop("ok", None)
    from virtkit.units import format_size

    _print(
        reply,
        args.json,
        f"snapshot written to {reply['dir']}: state {format_size(reply['state_bytes'])}, "
        f"memory {format_size(reply['memory_bytes'])} ({format_size(reply['memory_written'])} stored); "
        f"guest paused {reply['paused_ms']:.1f} ms",
    )
    return 0


def cmd_snapshot_info(args: argparse.Namespace) -> int:
    import json

    from virtkit.snapshot import describe

    print(json.dumps(describe(args.dir), indent=2))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from virtkit.snapshot import RestoredVM

    vm = RestoredVM(args.dir, serial=args.serial, verify=args.verify)
    with vm:
        for w in vm.warnings:
            print(f"virtkit: warning: {w}", file=sys.stderr)
        return foreground(vm, args)


def cmd_clone(args: argparse.Namespace) -> int:
    import time

    from virtkit.errors import ConfigError
    from virtkit.snapshot import clone

    if args.count < 1:
        raise ConfigError(f"--count must be at least 1, got {args.count}")
    serial: list[str | None] | None = None
    if args.serial_dir:
        os.makedirs(args.serial_dir, exist_ok=True)
        serial = [os.path.join(args.serial_dir, f"clone-{i}.log") for i in range(args.count)]
    t0 = time.perf_counter()
    vms = clone(args.dir, args.count, serial=serial, workdir=args.workdir)
    started = time.perf_counter() - t0
    try:
        results = []
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        try:
            for vm in vms:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                results.append(vm.wait(timeout=left if left is None or left > 0 else 0.001))
        except KeyboardInterrupt:
            print("virtkit: stopped by Ctrl-C", file=sys.stderr)
            return 130
    finally:
        for vm in vms:
            vm.close()
    clones = [vm.identity.to_json() for vm in vms if vm.identity is not None]
    out = {
        "count": args.count,
        "start_s": started,
        "clones_per_s": args.count / started if started else 0.0,
        "exit_codes": [r.exit_code for r in results],
        "clones": clones,
    }
    methods = sorted({d["method"] for c in clones for d in c["disks"]})
    overlays = f"; disk overlays by {'/'.join(methods)} in {os.path.dirname(clones[0]['directory'])}" if methods else ""
    _print(
        out,
        args.json,
        f"{args.count} clones started in {started * 1e3:.1f} ms "
        f"({out['clones_per_s']:.0f}/s); exit statuses {out['exit_codes']}{overlays}",
    )
    return max((r.exit_code for r in results), default=0)


def cmd_migrate(args: argparse.Namespace) -> int:
    from virtkit.migration.control import request
    from virtkit.migration.keys import load

    key = load(args.key_file)
    # The key goes to the VMM over its control socket (mode 0600, root's), so that a confined VMM,
    # which cannot open files, can migrate too; it is never echoed back.
    reply = request(
        args.control, "migrate", to=args.to, key=key.hex(), downtime_ms=args.downtime_ms, max_rounds=args.max_rounds
    )
    reply.pop("ok", None)
    _print(
        reply,
        args.json,
        f"migrated to {args.to}: {reply['rounds']} pre-copy rounds, "
        f"{reply['pages_sent']} pages sent, total {reply['total_ms']:.0f} ms, "
        f"downtime {reply['downtime_ms']:.1f} ms",
    )
    return 0


def cmd_migrate_keygen(args: argparse.Namespace) -> int:
    from virtkit.migration.keys import generate

    generate(args.file)
    print(
        f"wrote a new migration key to {args.file} (mode 0600): copy it to the other host and pass it "
        "to both sides with --key-file"
    )
    return 0


def cmd_migrate_receive(args: argparse.Namespace) -> int:
    from virtkit.cli.migrate_receive import run

    return run(args, foreground)


# ------------------------------------------------------------------------------------------------
# supervisor: virtkit run --checkpoint-every 5s --restart on-failure


def supervise(args: argparse.Namespace) -> int:
    from virtkit.snapshot.supervisor import Supervisor

    return Supervisor(args).run()
