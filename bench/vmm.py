"""The VMM against QEMU on the same Multiboot guests, in one run.

Figures: time to the first serial byte and to guest exit (process start to end, and for virtkit
also a VM started from the Python API in a warm process), cost of one port-I/O and one MMIO exit
(measured by the trap-cost guest's own TSC), and peak RSS of the VMM process.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, md_table, median, platform_record, qemu_version, run_process, write_results

QEMU = "qemu-system-x86_64"
QEMU_COMMON = [
    "-enable-kvm",
    "-m",
    "64M",
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-serial",
    "stdio",
    "-device",
    "isa-debug-exit,iobase=0xf4,iosize=0x04",
]
QEMU_MACHINES = {
    "qemu -M microvm": ["-M", "microvm"],
    "qemu -M pc + qboot": ["-M", "pc", "-bios", "/usr/share/qemu/qboot.rom"],
    "qemu -M pc (SeaBIOS)": ["-M", "pc"],
}


def virtkit_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "virtkit"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "virtkit"]


def qemu_cmd(machine: list[str], kernel: Path, cmdline: str = "") -> list[str]:
    cmd = [QEMU, *QEMU_COMMON, *machine, "-kernel", str(kernel)]
    return cmd + (["-append", cmdline] if cmdline else [])


def parse_trapcost(output: str, tsc_khz: int) -> dict[str, float]:
    """``trapcost phase=pio cpl=3 n=100000 tsc=...`` lines -> microseconds per operation."""
    out: dict[str, float] = {}
    for line in output.splitlines():
        if not line.startswith("trapcost phase="):
            continue
        fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
        try:
            n, tsc = int(fields["n"]), int(fields["tsc"])
        except (KeyError, ValueError):
            continue
        if n > 0 and tsc_khz > 0:
            out[f"{fields['phase']}_cpl{fields.get('cpl', '?')}_us"] = tsc / (tsc_khz * 1e3) * 1e6 / n
    return out


def api_first_byte(kernel: Path, runs: int) -> dict[str, float]:
    from virtkit import VM

    firsts, exits = [], []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        with VM(kernel) as vm:
            r = vm.run(timeout=30)
            t1 = time.perf_counter_ns()
            first = vm.console.first_byte_ns
        if first is not None:
            firsts.append((first - t0) / 1e9)
        exits.append((t1 - t0) / 1e9)
        assert r.exit_code == 1, r.detail
    return {"first_byte_s": median(firsts), "exit_s": median(exits)}


def run(quick: bool = False, guests: Path | None = None) -> dict[str, Any]:
    guests = guests or ROOT / "build" / "guests"
    hello, hello64, trapcost = guests / "hello.elf", guests / "hello64.elf", guests / "trapcost.elf"
    runs = 3 if quick else 10
    plat = platform_record()
    tsc_khz = int(plat.get("tsc_khz") or 0)
    boot: dict[str, dict[str, float]] = {}

    def measure(label: str, cmd: list[str], n: int) -> None:
        results = [run_process(cmd) for _ in range(n)]
        ok = [r for r in results if r.status in (0, 1)]
        boot[label] = {
            "first_byte_s": median([r.first_byte_s for r in ok if r.first_byte_s is not None]),
            "exit_s": median([r.exit_s for r in ok]),
            "peak_rss_mib": median([r.maxrss_kib / 1024 for r in ok]),
            "runs": len(ok),
            "failed": len(results) - len(ok),
        }
        print(
            f"  {label:<28} first byte {boot[label]['first_byte_s'] * 1e3:8.1f} ms   exit "
            f"{boot[label]['exit_s'] * 1e3:8.1f} ms   peak RSS {boot[label]['peak_rss_mib']:6.1f} MiB",
            flush=True,
        )

    print("boot: process start -> first serial byte -> exit (median)", flush=True)
    measure("virtkit run (Multiboot)", [*virtkit_cmd(), "run", str(hello)], runs)
    measure("virtkit run (direct64)", [*virtkit_cmd(), "run", str(hello64), "--boot", "direct64"], runs)
    for label, machine in QEMU_MACHINES.items():
        if "SeaBIOS" in label:
            measure(label, qemu_cmd(machine, hello), 1 if quick else 3)
        else:
            measure(label, qemu_cmd(machine, hello), runs)
    api = api_first_byte(hello, runs * 3)
    boot["virtkit API (warm process)"] = {**api, "peak_rss_mib": float("nan"), "runs": runs * 3, "failed": 0}
    print(
        f"  {'virtkit API (warm process)':<28} first byte {api['first_byte_s'] * 1e3:8.2f} ms   exit "
        f"{api['exit_s'] * 1e3:8.2f} ms",
        flush=True,
    )

    print("exit cost: trap-cost guest, 100K port writes and 100K MMIO writes at CPL3", flush=True)
    n = 20000 if quick else 100000
    cmdline = f"n={n} phases=pio,mmio"
    from virtkit import VM

    with VM(trapcost, cmdline=cmdline) as vm:
        r = vm.run(timeout=300)
    vk = parse_trapcost(r.serial_output, tsc_khz)
    vk["vmm_python_us_per_exit"] = r.stats.vmm_s / max(r.stats.total_exits, 1) * 1e6
    q = run_process(qemu_cmd(QEMU_MACHINES["qemu -M microvm"], trapcost, cmdline), timeout=300)
    qm = parse_trapcost(q.stdout.decode(errors="replace"), tsc_khz)
    exits = {"virtkit": vk, "qemu microvm": qm}
    for who, d in exits.items():
        print(f"  {who:<14} " + "  ".join(f"{k} {v:.2f}" for k, v in sorted(d.items())), flush=True)

    data = {
        "platform": plat,
        "qemu": qemu_version(),
        "boot": boot,
        "exit_cost_us": exits,
        "guest_cmdline": cmdline,
        "targets": targets(boot, exits),
    }
    md = render(data)
    jpath, mpath = write_results("vmm", data, md)
    png = plot(data)
    print(md)
    print(f"wrote {jpath}, {mpath}" + (f", {png}" if png else ""))
    return data


def targets(boot: dict[str, dict[str, float]], exits: dict[str, dict[str, float]]) -> dict[str, Any]:
    micro = boot.get("qemu -M microvm", {})
    cli = boot.get("virtkit run (Multiboot)", {})
    api = boot.get("virtkit API (warm process)", {})
    out: dict[str, Any] = {}
    if micro and cli:
        out["cli_exit_vs_microvm"] = cli["exit_s"] / micro["exit_s"]
        out["cli_peak_rss_vs_microvm"] = cli["peak_rss_mib"] / micro["peak_rss_mib"]
    if micro and api:
        out["api_first_byte_speedup_vs_microvm"] = micro["first_byte_s"] / api["first_byte_s"]
    for key in ("pio_cpl3_us", "mmio_cpl3_us"):
        v, q = exits["virtkit"].get(key), exits["qemu microvm"].get(key)
        if v and q:
            out[f"{key}_ratio_vs_qemu"] = v / q
    return out


def render(data: dict[str, Any]) -> str:
    plat = data["platform"]
    lines = [
        f"# VMM: virtkit vs QEMU\n\nPlatform: {plat.get('cpu_model')}, KVM flavor **{plat.get('kvm_flavor')}** "
        f"({plat.get('meaning')}); TSC {int(plat.get('tsc_khz') or 0) / 1e6:.3f} GHz; {data['qemu']}.\n",
        "## Boot of the `hello` guest (median)\n",
    ]
    rows = []
    for label, d in data["boot"].items():
        rss = d.get("peak_rss_mib")
        rows.append(
            [
                label,
                f"{d['first_byte_s'] * 1e3:.2f}",
                f"{d['exit_s'] * 1e3:.2f}",
                "-" if rss != rss else f"{rss:.1f}",
                str(d["runs"]),
            ]
        )
    lines.append(md_table(["VMM", "first serial byte (ms)", "guest exit (ms)", "peak RSS (MiB)", "runs"], rows))
    lines.append(f"\n## Cost of one VM exit, measured by the guest (`{data['guest_cmdline']}`)\n")
    keys = sorted({k for d in data["exit_cost_us"].values() for k in d})
    rows = [[k] + [f"{data['exit_cost_us'][w].get(k, float('nan')):.2f}" for w in data["exit_cost_us"]] for k in keys]
    lines.append(md_table(["microseconds per operation", *data["exit_cost_us"].keys()], rows))
    lines.append("\n## Targets\n")
    t = data["targets"]
    rows = []
    if "cli_exit_vs_microvm" in t:
        rows.append(["`virtkit run` to guest exit vs QEMU microvm", "<= 1.0x", f"{t['cli_exit_vs_microvm']:.2f}x"])
    if "api_first_byte_speedup_vs_microvm" in t:
        rows.append(
            [
                "API first serial byte, speed-up over QEMU microvm",
                ">= 10x",
                f"{t['api_first_byte_speedup_vs_microvm']:.1f}x",
            ]
        )
    for key in ("pio_cpl3_us_ratio_vs_qemu", "mmio_cpl3_us_ratio_vs_qemu"):
        if key in t:
            rows.append([f"{key.split('_')[0]} exit cost vs QEMU", "<= 1.5x", f"{t[key]:.2f}x"])
    if "cli_peak_rss_vs_microvm" in t:
        rows.append(["peak RSS vs QEMU microvm", "< 1.0x", f"{t['cli_peak_rss_vs_microvm']:.2f}x"])
    lines.append(md_table(["target", "goal", "measured"], rows))
    return "\n".join(lines)


def plot(data: dict[str, Any]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    # One question per panel, one meaning per colour: green is virtkit and grey is QEMU in both
    # panels; solid is the first serial byte, hatched the guest's exit.
    def colour(name: str) -> str:
        return "#2a9d5c" if name.startswith("virtkit") else "#8a8a8a"

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [3, 2]})
    labels = list(data["boot"].keys())
    firsts = [data["boot"][k]["first_byte_s"] * 1e3 for k in labels]
    exits = [data["boot"][k]["exit_s"] * 1e3 for k in labels]
    y = range(len(labels))
    colours = [colour(k) for k in labels]
    ax1.barh([i + 0.2 for i in y], firsts, height=0.4, color=colours, label="first serial byte")
    ax1.barh(
        [i - 0.2 for i in y],
        exits,
        height=0.4,
        color=colours,
        hatch="//",
        edgecolor="white",
        label="guest exit (hatched)",
    )
    micro = data["boot"].get("qemu -M microvm")
    if micro:
        ax1.axvline(
            micro["exit_s"] * 1e3,
            color="black",
            linestyle="--",
            linewidth=1,
            label="target: exit no later than QEMU microvm",
        )
    ax1.set_yticks(list(y), labels)
    ax1.set_xscale("log")
    ax1.set_xlabel("milliseconds from process start (log scale)")
    ax1.set_title("How fast does a guest boot and finish?")
    ax1.legend(loc="lower right", fontsize=8)
    keys = sorted({k for d in data["exit_cost_us"].values() for k in d if k.endswith("cpl3_us")})
    who = list(data["exit_cost_us"].keys())
    for j, w in enumerate(who):
        ax2.bar(
            [i + j * 0.4 for i in range(len(keys))],
            [data["exit_cost_us"][w].get(k, 0) for k in keys],
            width=0.4,
            label=w,
            color=colour(w),
        )
    qemu = next((w for w in who if not w.startswith("virtkit")), None)
    if qemu:
        for i, k in enumerate(keys):
            limit = data["exit_cost_us"][qemu].get(k, 0) * 1.5
            ax2.hlines(
                limit,
                i - 0.2,
                i + 0.6,
                colors="black",
                linestyles="--",
                linewidth=1,
                label="target: at most 1.5x QEMU" if i == 0 else None,
            )
    ax2.set_xticks(
        [i + 0.2 for i in range(len(keys))],
        [{"pio_cpl3_us": "port I/O", "mmio_cpl3_us": "MMIO"}.get(k, k) for k in keys],
    )
    ax2.set_ylabel("microseconds per exit (from guest CPL3)")
    ax2.set_title("What does one VM exit cost?")
    top = max((v for d in data["exit_cost_us"].values() for k, v in d.items() if k in keys), default=1)
    ax2.set_ylim(0, top * 1.9)  # room above the bars for the legend
    ax2.legend(loc="upper center", ncol=1, fontsize=8)
    plat = data["platform"]
    fig.suptitle(f"virtkit (green) vs QEMU (grey) on {plat.get('kvm_flavor')} KVM ({plat.get('cpu_model')})")
    fig.tight_layout()
    path = Path(os.fspath(ROOT / "bench" / "results" / "vmm.png"))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
