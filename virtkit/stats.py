"""VM exit statistics: the trap-and-emulate picture, made visible.

Collected per vCPU on the exit path (see :class:`virtkit.vcpu.VcpuStats`) and merged here into
one record per run, with a plain-text table for ``virtkit run --stats``.
"""

from __future__ import annotations

from virtkit.kvm.constants import ExitReason
from virtkit.vcpu import VcpuStats

KNOWN_PORTS = {
    0x3F8: "uart0",
    0x3F9: "uart0",
    0x3FA: "uart0",
    0x3FB: "uart0",
    0x3FC: "uart0",
    0x3FD: "uart0",
    0x3FE: "uart0",
    0x3FF: "uart0",
    0xF4: "debug-exit",
    0x60: "i8042",
    0x64: "i8042",
    0x70: "rtc",
    0x71: "rtc",
    0x80: "post",
    0xC48: "acpi-power",
    0xC49: "acpi-power",
    0xC4A: "acpi-power",
}


class RunStats:
    def __init__(self, wall_s: float = 0.0) -> None:
        self.wall_s = wall_s
        self.guest_s = 0.0  # inside KVM_RUN: guest code plus in-kernel exit handling
        self.vmm_s = 0.0  # in virtkit's own code, handling exits
        self.exits: dict[str, int] = {}
        self.pio: dict[tuple[int, str], int] = {}
        self.mmio: dict[tuple[int, str], int] = {}
        self.unknown_pio: dict[tuple[int, str], int] = {}
        self.unknown_mmio: dict[tuple[int, str], int] = {}
        self.kicks = 0
        self.tsc_khz = 0
        self.first_output_s: float | None = None
        #: how the kernel was booted ("multiboot", "linux (bzImage, boot protocol 2.15)"...)
        self.boot_protocol = ""
        #: CPL0 instructions KVM's emulator rejected and the VMM completed (virtkit.cpl0), by kind
        self.completed: dict[str, int] = {}

    @property
    def total_exits(self) -> int:
        return sum(self.exits.values())

    @property
    def exits_per_second(self) -> float:
        return self.total_exits / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        def keyed(d: dict[tuple[int, str], int]) -> dict[str, int]:
            return {f"{a:#x}:{rw}": n for (a, rw), n in sorted(d.items())}

        return {
            "wall_s": self.wall_s,
            "guest_s": self.guest_s,
            "vmm_s": self.vmm_s,
            "exits": dict(self.exits),
            "total_exits": self.total_exits,
            "exits_per_second": self.exits_per_second,
            "pio": keyed(self.pio),
            "mmio": keyed(self.mmio),
            "unknown_pio": keyed(self.unknown_pio),
            "unknown_mmio": keyed(self.unknown_mmio),
            "kicks": self.kicks,
            "tsc_khz": self.tsc_khz,
            "first_output_s": self.first_output_s,
            "boot_protocol": self.boot_protocol,
            "completed": dict(sorted(self.completed.items())),
        }


def _rw(is_write: bool) -> str:
    return "write" if is_write else "read"


def merge(
    per_vcpu: list[VcpuStats],
    unknown_pio: dict[tuple[int, bool], int],
    unknown_mmio: dict[tuple[int, bool], int],
    wall_ns: int,
) -> RunStats:
    out = RunStats(wall_s=wall_ns / 1e9)
    for st in per_vcpu:
        out.guest_s += st.guest_ns / 1e9
        out.vmm_s += st.vmm_ns / 1e9
        out.kicks += st.interrupted
        for reason, n in enumerate(st.exits):
            if n:
                try:
                    name = ExitReason(reason).name.lower()
                except ValueError:
                    name = str(reason)
                out.exits[name] = out.exits.get(name, 0) + n
        for kind, n in st.completed.items():
            out.completed[kind] = out.completed.get(kind, 0) + n
        for (port, w), n in st.pio.items():
            out.pio[(port, _rw(w))] = out.pio.get((port, _rw(w)), 0) + n
        for (addr, w), n in st.mmio.items():
            out.mmio[(addr, _rw(w))] = out.mmio.get((addr, _rw(w)), 0) + n
    out.unknown_pio = {(p, _rw(w)): n for (p, w), n in unknown_pio.items()}
    out.unknown_mmio = {(a, _rw(w)): n for (a, w), n in unknown_mmio.items()}
    return out


def format_table(stats: RunStats, top: int = 10) -> str:
    """The ``--stats`` report."""
    lines = [""]
    if stats.boot_protocol:
        lines += [f"Boot protocol: {stats.boot_protocol}", ""]
    lines.append("VM exits")
    total = stats.total_exits
    lines.append(f"  {'reason':<18}{'count':>12}{'share':>9}")
    for name, n in sorted(stats.exits.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<18}{n:>12,}{(100.0 * n / total if total else 0):>8.1f}%")
    lines.append(f"  {'total':<18}{total:>12,}")

    def section(title: str, data: dict[tuple[int, str], int], unknown: dict[tuple[int, str], int], port: bool) -> None:
        if not data:
            return
        lines.append("")
        lines.append(title)
        for (addr, rw), n in sorted(data.items(), key=lambda kv: -kv[1])[:top]:
            if addr < 0:
                label = "(other)"
            elif port:
                label = KNOWN_PORTS.get(addr, "unknown" if (addr, rw) in unknown else "")
            else:
                label = "unknown" if (addr, rw) in unknown else ""
            where = "(many)" if addr < 0 else (f"{addr:#06x}" if port else f"{addr:#x}")
            lines.append(f"  {where:<14}{rw:<7}{n:>12,}  {label}")
        if len(data) > top:
            lines.append(f"  ... {len(data) - top} more")

    if stats.completed:
        lines.append("")
        lines.append("CPL0 instructions completed by the VMM (rejected by KVM's emulator)")
        for kind, n in sorted(stats.completed.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {kind:<18}{n:>12,}")
    section("Port I/O exits by port", stats.pio, stats.unknown_pio, True)
    section("MMIO exits by address", stats.mmio, stats.unknown_mmio, False)
    unknown = sum(stats.unknown_pio.values()) + sum(stats.unknown_mmio.values())
    lines.append("")
    lines.append("Time")
    lines.append(
        f"  wall {stats.wall_s * 1e3:,.1f} ms; in KVM_RUN (guest, summed over vCPUs) "
        f"{stats.guest_s * 1e3:,.1f} ms; "
        f"in the VMM handling exits {stats.vmm_s * 1e3:,.1f} ms"
    )
    per_exit = (stats.vmm_s / total * 1e6) if total else 0.0
    lines.append(
        f"  {stats.exits_per_second:,.0f} exits/s; VMM time per exit {per_exit:.2f} us; unknown accesses {unknown:,}"
    )
    return "\n".join(lines)
