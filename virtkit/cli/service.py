"""Commands that talk to virtkitd: ``vm create|list|start|stop|kill|delete|console|stats|logs``,
``host``, ``top``; and ``vmm``, the one-VM process virtkitd starts (also usable by hand).

The socket is ``--socket``, else $VIRTKITD_SOCKET, else /run/virtkitd/api.sock. What the user
types is parsed into the API's records here (``vm create`` builds a
:class:`~virtkit.service.model.VmCreate`, so a bad value is refused before anything is sent), and
the daemon's answers come back as records (:class:`~virtkit.service.client.Client`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from virtkit.service.client import Client
    from virtkit.service.model import VmDefinition, VmStats


def _client(args: argparse.Namespace) -> Client:
    from virtkit.service.client import Client

    return Client(getattr(args, "socket", None))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vm = sub.add_parser(
        "vm",
        help="manage VMs run by virtkitd (create, list, start, stop, stats...)",
        description="VMs run by the virtkitd service, each in its own confined VMM process.",
    )
    vm.add_argument(
        "--socket", default=None, help="virtkitd's API socket (default $VIRTKITD_SOCKET or /run/virtkitd/api.sock)"
    )
    vsub = vm.add_subparsers(dest="vm_command", metavar="ACTION")
    add_parser = vsub.add_parser

    def sub_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        p = add_parser(name, **kw)
        p.add_argument("--socket", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # after ACTION too
        return p

    vsub.add_parser = sub_parser  # type: ignore[method-assign]

    def usage(args: argparse.Namespace) -> int:
        vm.print_help()
        return 2

    vm.set_defaults(handler=usage)

    p = vsub.add_parser("create", help="define a VM (and with --start, start it)")
    p.add_argument("name")
    p.add_argument("--kernel", "-k", required=True, help="guest kernel (Multiboot or ELF64)")
    p.add_argument("--memory", "-m", default="64M", help="guest memory, e.g. 64M, 1G (default 64M)")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--cmdline", default="")
    p.add_argument("--mode", choices=("full", "para"), default="full")
    p.add_argument("--cpu-weight", type=int, default=100, help="CPU share against other VMs (default 100)")
    p.add_argument("--cpu-quota", type=int, default=None, metavar="PCT", help="CPU cap in %% of one CPU")
    p.add_argument("--cpus", default=None, help="pin to host CPUs, e.g. 0 or 0-1")
    p.add_argument("--restart", choices=("never", "on-failure"), default="never")
    p.add_argument("--start", action="store_true", help="start it at once")
    p.set_defaults(handler=cmd_create)

    p = vsub.add_parser("list", help="VMs, their state, resources and pids")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_list)
    for action, text in (
        ("start", "start a VM"),
        ("stop", "stop a VM (its guest is told; SIGKILL after 10 s)"),
        ("kill", "SIGKILL a VM's VMM"),
    ):
        p = vsub.add_parser(action, help=text)
        p.add_argument("names", nargs="+", metavar="NAME")
        p.set_defaults(handler=cmd_action, action=action)
    p = vsub.add_parser("delete", help="delete a VM (--force: kill it first)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--force", "-f", action="store_true")
    p.set_defaults(handler=cmd_delete)
    p = vsub.add_parser("stats", help="CPU time, memory, exits by reason, device I/O")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_stats)
    p = vsub.add_parser("logs", help="the guest's serial output")
    p.add_argument("name")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new output")
    p.set_defaults(handler=cmd_logs)
    p = vsub.add_parser(
        "console", help="attach to the serial console (lines you type go to the guest; Ctrl-C detaches)"
    )
    p.add_argument("name")
    p.set_defaults(handler=cmd_console)
    p = vsub.add_parser("events", help="the VM's events (created, started, failed, restarted...)")
    p.add_argument("name")
    p.set_defaults(handler=cmd_events)

    p = sub.add_parser("host", help="host capacity and what virtkitd's VMs hold")
    p.add_argument("--socket", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_host)
    p = sub.add_parser("top", help="live view of virtkitd's VMs: CPU, memory, exits")
    p.add_argument("--socket", default=None)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.set_defaults(handler=cmd_top)
    p = sub.add_parser(
        "vmm", help="run one VM from DIR/definition.json in a confined process (what virtkitd starts)", add_help=False
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(handler=cmd_vmm)


#: the flag of `vm create` each field of the request comes from
_FLAGS = {
    "name": "NAME",
    "kernel": "--kernel",
    "memory_mib": "--memory (MiB)",
    "vcpus": "--vcpus",
    "cmdline": "--cmdline",
    "cpu_weight": "--cpu-weight",
    "cpu_quota_pct": "--cpu-quota",
    "cpus": "--cpus",
}


def cmd_create(args: argparse.Namespace) -> int:
    from virtkit.errors import ConfigError
    from virtkit.records import UntrustedInput, parse
    from virtkit.service.model import VmCreate
    from virtkit.units import parse_size

    memory = parse_size(args.memory, what="--memory", default_unit="M")
    body: dict[str, Any] = {
        "name": args.name,
        "kernel": os.path.abspath(args.kernel),
        "memory_mib": max(memory >> 20, 1),
        "vcpus": args.vcpus,
        "cmdline": args.cmdline,
        "mode": args.mode,
        "cpu_weight": args.cpu_weight,
        "restart": args.restart,
        "start": args.start,
        "cpu_quota_pct": args.cpu_quota,
        "cpus": args.cpus or None,
    }
    try:
        request = parse(VmCreate, body, what="create")
    except UntrustedInput as e:  # "create.vcpus is 0, less than 1" -> "--vcpus is 0, less than 1"
        field, _, rest = str(e).removeprefix("create.").partition(" ")
        raise ConfigError(f"{_FLAGS.get(field, field)} {rest}") from None
    rec = _client(args).create(request)
    print(f"{rec.name}: {rec.state}" + (f" (pid {rec.pid})" if rec.pid else ""))
    return 0


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    )


def _limits(d: VmDefinition) -> str:
    parts = [f"w{d.cpu_weight}"]
    if d.cpu_quota_pct:
        parts.append(f"{d.cpu_quota_pct}%")
    if d.cpus:
        parts.append(f"cpus {d.cpus}")
    return " ".join(parts)


def cmd_list(args: argparse.Namespace) -> int:
    from virtkit.records import to_json

    vms = _client(args).vms()
    if args.json:
        print(json.dumps([to_json(v) for v in vms], indent=2))
        return 0
    rows = []
    for v in vms:
        d = v.definition
        rows.append(
            [
                v.name,
                v.state,
                str(v.pid or ""),
                str(d.vcpus),
                f"{d.memory_mib}M",
                _limits(d),
                d.restart,
                os.path.basename(d.kernel),
                v.last_exit.reason if v.last_exit and v.state != "running" else "",
            ]
        )
    print(_table(rows, ["NAME", "STATE", "PID", "VCPUS", "MEMORY", "CPU", "RESTART", "KERNEL", "LAST EXIT"]))
    return 0


def cmd_action(args: argparse.Namespace) -> int:
    c = _client(args)
    for name in args.names:
        rec = c.action(name, args.action)
        ended = f" ({rec.last_exit.reason})" if rec.state != "running" and rec.last_exit else ""
        print(f"{name}: {rec.state}{ended}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    c = _client(args)
    for name in args.names:
        c.delete(name, force=args.force)
        print(f"{name}: deleted")
    return 0


def format_stats(st: VmStats) -> str:
    from virtkit.units import format_size

    lines = [f"{st.name}: {st.state}" + (f", VMM pid {st.pid}" if st.pid else "")]
    if st.cpu_seconds is not None:
        lines.append(f"  CPU time        {st.cpu_seconds:.3f} s (throttled {st.throttled_seconds or 0:.3f} s)")
    if st.rss_bytes is not None:
        lines.append(
            f"  memory          guest {format_size(st.memory_bytes)}; "
            f"VMM RSS {format_size(st.rss_bytes)}; cgroup {format_size(st.memory_cgroup_bytes or 0)}"
        )
    vmm = st.vmm
    if vmm is not None:
        exits = ", ".join(f"{k} {v:,}" for k, v in sorted((vmm.exits or {}).items(), key=lambda kv: -kv[1]))
        lines.append(f"  exits           {vmm.total_exits:,} ({exits or 'none'}); {vmm.exits_per_second:,.0f}/s")
        dev = ", ".join(f"{k} {v:,}" for k, v in sorted((vmm.device_exits or {}).items(), key=lambda kv: -kv[1]))
        lines.append(f"  device I/O      {dev or 'none'}; serial out {vmm.serial_bytes:,} bytes")
        if vmm.first_output_s is not None:
            lines.append(f"  first output    {vmm.first_output_s * 1e3:.1f} ms after start; up {vmm.uptime_s:.1f} s")
        if vmm.boot_protocol:
            lines.append(f"  boot protocol   {vmm.boot_protocol}")
        if vmm.completed:
            done = ", ".join(f"{k} {v:,}" for k, v in sorted(vmm.completed.items(), key=lambda kv: (-kv[1], kv[0])))
            lines.append(f"  CPL0 completed  {done} (rejected by KVM's emulator, done by the VMM)")
    elif st.vmm_error:
        lines.append(f"  VMM             {st.vmm_error}")
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace) -> int:
    from virtkit.records import to_json

    st = _client(args).stats(args.name)
    print(json.dumps(to_json(st), indent=2) if args.json else format_stats(st))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    c = _client(args)
    offset = 0
    while True:
        out = c.logs(args.name, offset)
        sys.stdout.write(out.data)
        sys.stdout.flush()
        offset = out.next
        if not args.follow:
            return 0
        if not out.data:
            time.sleep(0.2)


def cmd_console(args: argparse.Namespace) -> int:
    import threading

    c = _client(args)
    rec = c.vm(args.name)
    if rec.state != "running":
        from virtkit.errors import VirtkitError

        raise VirtkitError(f"{args.name} is {rec.state}: start it first (`virtkit vm start {args.name}`)")
    print(f"[attached to {args.name}; lines you type go to the guest; Ctrl-C detaches]", file=sys.stderr)

    def pump_input() -> None:
        for line in sys.stdin:
            try:
                c.console(args.name, line)
            except Exception:  # noqa: BLE001 - the VM ended: the output loop notices
                return

    threading.Thread(target=pump_input, daemon=True).start()
    offset = 0
    try:
        while True:
            out = c.logs(args.name, offset)
            sys.stdout.write(out.data)
            sys.stdout.flush()
            offset = out.next
            if not out.data:
                if c.vm(args.name).state not in ("running", "starting", "restarting"):
                    print(f"\n[{args.name} is no longer running]", file=sys.stderr)
                    return 0
                time.sleep(0.2)
    except KeyboardInterrupt:
        print("\n[detached]", file=sys.stderr)
        return 0


def cmd_events(args: argparse.Namespace) -> int:
    for e in _client(args).events(args.name):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.ts))
        print(f"{stamp}  {e.kind:<18} {e.detail[:200]}")
    return 0


def cmd_host(args: argparse.Namespace) -> int:
    from virtkit.records import to_json
    from virtkit.units import format_size

    h = _client(args).host()
    if args.json:
        print(json.dumps(to_json(h), indent=2))
        return 0
    print(f"cores      {h.cores} (overcommit {h.overcommit:g}: up to {h.vcpu_capacity} vCPUs)")
    print(
        f"vCPUs      {h.vcpus_used} of {h.vcpu_capacity} in use ({100 * h.vcpus_used / max(h.vcpu_capacity, 1):.0f}%)"
    )
    print(
        f"memory     {format_size(h.memory_used)} of {format_size(h.memory_capacity)} for VMs in use "
        f"({100 * h.memory_used / max(h.memory_capacity, 1):.0f}%); {format_size(h.memory_free)} free; "
        f"{format_size(h.memory_reserved_for_host)} kept for the host"
    )
    print(f"load       {' '.join(f'{x:.2f}' for x in h.load_average)}")
    print(f"cgroups    {h.cgroups}")
    print(f"VMs        {', '.join(f'{n} {k}' for k, n in sorted(h.vms.items())) or 'none'}")
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from virtkit.units import format_size

    c = _client(args)
    last: dict[str, tuple[float, float, int]] = {}

    def frame() -> Table:
        now = time.monotonic()
        h = c.host()
        table = Table(
            title=f"virtkitd: {h.vcpus_used}/{h.vcpu_capacity} vCPUs, "
            f"{format_size(h.memory_used)}/{format_size(h.memory_capacity)} memory in use"
        )
        for col in ("NAME", "STATE", "CPU%", "CPU s", "RSS", "CGROUP MEM", "EXITS/s", "TOP EXIT", "LIMITS"):
            table.add_column(col, justify="right" if col not in ("NAME", "STATE", "TOP EXIT", "LIMITS") else "left")
        for v in c.vms():
            name = v.name
            if v.state != "running":
                table.add_row(name, v.state, "", "", "", "", "", "", _limits(v.definition))
                continue
            try:
                st = c.stats(name)
            except Exception:  # noqa: BLE001 - it ended between the two calls
                continue
            cpu = st.cpu_seconds or 0.0
            exits = st.vmm.total_exits if st.vmm else 0
            prev = last.get(name)
            pct = rate = 0.0
            if prev:
                dt = max(now - prev[0], 1e-3)
                pct, rate = 100 * (cpu - prev[1]) / dt, (exits - prev[2]) / dt
            last[name] = (now, cpu, exits)
            by_reason = (st.vmm.exits if st.vmm else None) or {}
            top = max(by_reason.items(), key=lambda kv: kv[1], default=("", 0))[0]
            table.add_row(
                name,
                v.state,
                f"{pct:.0f}",
                f"{cpu:.1f}",
                format_size(st.rss_bytes or 0),
                format_size(st.memory_cgroup_bytes or 0),
                f"{rate:,.0f}",
                top,
                _limits(v.definition),
            )
        return table

    if args.once:
        frame()
        time.sleep(min(args.interval, 1.0))
        Console().print(frame())
        return 0
    try:
        with Live(frame(), refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(args.interval)
                live.update(frame())
    except KeyboardInterrupt:
        return 0


def cmd_vmm(args: argparse.Namespace) -> int:
    from virtkit.service.vmm import main

    return main(args.rest)
