"""Failover commands: ``snapshot``, ``snapshot-info``, ``restore``, ``clone``, ``migrate``,
``migrate-keygen`` and ``migrate-receive``.

The failover options of ``run`` itself (``--control``, ``--checkpoint-every``, ``--restart
on-failure``) and the foreground run that ``restore`` and ``migrate-receive`` share with ``run``
are in :mod:`virtkit.cli.foreground`; the restart supervisor is :mod:`virtkit.cli.supervisor`.
"""

from __future__ import annotations

# Imported when the whole parser is built (`virtkit --help`): only cheap modules at the top.
import argparse
import os
import sys

from virtkit.cli.foreground import add_runtime_options, foreground

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


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
    p.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="IMAGE",
        help="the VM's disk image, once per disk of the snapshot, in order (a snapshot's recorded "
        "paths are never opened on its word; 'virtkit snapshot-info DIR' lists them)",
    )
    p.add_argument(
        "--net",
        action="append",
        default=[],
        metavar="tap[,bridge=BR][,name=IF]",
        help="the host side of each network card of the snapshot, in order: a new TAP, on bridge BR "
        "(the card keeps the MAC the guest knows; a recorded bridge is never followed on its word)",
    )
    add_runtime_options(p)
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
        "--disk",
        action="append",
        default=[],
        metavar="IMAGE",
        help="base image of each disk the snapshot did not copy into DIR (read-only disks), once "
        "per disk of the snapshot, in order; disks copied into DIR need none",
    )
    p.add_argument(
        "--net",
        action="append",
        default=[],
        metavar="tap[,bridge=BR][,name=IF]",
        help="the host side of the snapshot's network cards: once per card (every clone gets its own "
        "TAPs on those bridges) or once per card per clone (clone 0's first); every clone's card keeps "
        "the MAC the guest knows, so two clones' cards may not share a bridge",
    )
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
    p.add_argument(
        "--net",
        action="append",
        default=[],
        metavar="tap[,bridge=BR][,mac=MAC][,name=IF]",
        help="the host side of each network card of the incoming VM, in order: a new TAP, on bridge BR, "
        "made before the receiver leaves the host's network namespace and removed when it ends; the "
        "card keeps the MAC the guest knows (a mac= given must be that one) (--mode para)",
    )
    add_runtime_options(p)
    p.set_defaults(handler=cmd_migrate_receive)


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
    from virtkit.api import parse_disk
    from virtkit.devices.virtio.net.tap import parse_net
    from virtkit.snapshot import RestoredVM

    vm = RestoredVM(
        args.dir,
        serial=args.serial,
        verify=args.verify,
        disks=[parse_disk(d) for d in args.disk],
        nets=[parse_net(n) for n in args.net],
    )
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
    from virtkit.api import parse_disk
    from virtkit.devices.virtio.net.tap import parse_net

    disks = [parse_disk(d) for d in args.disk]
    nets = [parse_net(n) for n in args.net]
    vms = clone(args.dir, args.count, serial=serial, workdir=args.workdir, disks=disks, nets=nets)
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

    return run(args)
