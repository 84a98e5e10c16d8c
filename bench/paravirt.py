"""Full virtualization against paravirtualization, same workloads, one run (issue: para is faster).

Workloads (guests `fullwork` and `parawork`, docs/GUESTS.md): write 1 MiB to the console; write,
read back and checksum 16 MiB on the disk; 100K null operations (a write to an emulated device
register vs a null hypercall); a CPU-bound loop. Each runs as an unmodified guest on emulated
hardware (UART, ATA PIO, port 0x80), as a paravirtualized guest (virtio-console/virtio-blk, and the
hypercalls), and, for the CPU loop, natively on the host. The guest times its own work with the
TSC; virtkit adds the exit picture (exits, exits per KiB, time in the guest vs in the VMM).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.common import ROOT, md_table, platform_record, write_results

MiB = 1 << 20


def _fields(line: str) -> dict[str, str]:
    return dict(f.split("=", 1) for f in line.split() if "=" in f)


def _work_line(output: str) -> dict[str, str] | None:
    for line in output.splitlines():
        if line.startswith("work="):
            bad = "MISMATCH" in line or "error" in line
            return _fields(line) | {"_ok": "" if bad else "ok"}
    return None


def run_guest(kernel: Path, mode: str, cmdline: str, disk: str | None, tsc_khz: int) -> dict[str, Any]:
    from virtkit import VM

    with VM(kernel, mode=mode, cmdline=cmdline, disks=[disk] if disk else [], memory="128M") as vm:
        r = vm.run(timeout=600)
    line = _work_line(r.serial_output)
    if r.exit_code != 1 or line is None:
        raise RuntimeError(
            f"{kernel.name} {cmdline}: ended {r.reason.value} ({r.exit_code}): {r.detail or r.serial_output[-300:]}"
        )
    seconds = int(line["tsc"]) / (tsc_khz * 1e3)
    nbytes = int(line.get("bytes", 0))
    exits = r.stats.total_exits
    return {
        "seconds": seconds,
        "bytes": nbytes,
        "mb_s": nbytes / MiB / seconds if nbytes and seconds else None,
        "exits": exits,
        "exits_per_kib": exits / (nbytes / 1024) if nbytes else None,
        "guest_s": r.stats.guest_s,
        "vmm_s": r.stats.vmm_s,
        "wall_s": r.stats.wall_s,
        "exits_by_reason": r.stats.exits,
        "checksum_ok": line.get("_ok") == "ok",
        "line": line,
    }


def native_cpu(loop: int) -> dict[str, Any] | None:
    exe = ROOT / "build" / "native" / "cpuloop"
    if not exe.exists():
        return None
    out = subprocess.run([str(exe), str(loop)], capture_output=True, text=True, timeout=120).stdout
    for line in out.splitlines():
        if line.startswith("work=cpu"):
            f = _fields(line)
            return {"seconds": int(f["ns"]) / 1e9, "bytes": 0, "mb_s": None, "exits": 0, "exits_per_kib": None}
    return None


def run(quick: bool = False, guests: Path | None = None, full_size: bool = False) -> dict[str, Any]:
    """``full_size``: the emulated path also moves the whole 1 MiB / 16 MiB. By default it moves
    less (its cost per byte is constant: one exit per 16-bit word written), which keeps the
    benchmark at a few minutes; every row says how many bytes it moved."""
    guests = guests or ROOT / "build" / "guests"
    plat = platform_record()
    tsc_khz = int(plat.get("tsc_khz") or 0)
    scale = 4 if quick else 1
    para_sizes = {"console": MiB // scale, "disk": 16 // scale}
    full_sizes = dict(para_sizes) if full_size else {"console": MiB // (4 * scale), "disk": max(1, 2 // scale)}
    null_n = 100_000 // (5 if quick else 1)
    loop = 200_000_000 // scale

    def cmdline(name: str, sizes: dict[str, int]) -> str:
        return {
            "console": f"work=console bytes={sizes['console']}",
            "disk": f"work=disk mib={sizes['disk']}",
            "null": f"work=null n={null_n}",
            "cpu": f"work=cpu loop={loop}",
        }[name]

    plans = {
        "console": [
            ("full", "full", ""),
            ("para (virtio)", "para", "via=virtio"),
            ("para (hcall)", "para", "via=hcall"),
        ],
        "disk": [("full", "full", ""), ("para (virtio)", "para", "via=virtio"), ("para (hcall)", "para", "via=hcall")],
        "null": [
            ("full", "full", ""),
            ("para (hcall)", "para", "via=hcall"),
            ("para (virtio kick)", "para", "via=virtio"),
        ],
        "cpu": [("full", "full", ""), ("para", "para", "")],
    }
    results: dict[str, dict[str, Any]] = {}
    workloads: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="virtkit-bench-") as tmp:
        disk = os.path.join(tmp, "disk.img")
        with open(disk, "wb") as f:
            f.truncate((para_sizes["disk"] + 1) * MiB)
        for name, plan in plans.items():
            res: dict[str, Any] = {}
            workloads[name] = {}
            for label, mode, via in plan:
                line = cmdline(name, full_sizes if mode == "full" else para_sizes)
                line = f"{line} {via}".strip()
                workloads[name][label] = line
                print(f"  {name:<8} {label:<19} {line}", flush=True)
                kernel = guests / ("fullwork.elf" if mode == "full" else "parawork.elf")
                res[label] = run_guest(kernel, mode, line, disk, tsc_khz)
            if name == "cpu":
                nat = native_cpu(loop)
                if nat:
                    res["native"] = nat
                    workloads[name]["native"] = f"build/native/cpuloop {loop}"
            results[name] = res
    paths = _virtio_paths()
    data = {
        "platform": plat,
        "workloads": workloads,
        "results": results,
        "virtio_paths": paths,
        "targets": targets(results),
    }
    md = render(data)
    jpath, mpath = write_results("paravirt", data, md)
    png = plot(data)
    print(md)
    print(f"wrote {jpath}, {mpath}" + (f", {png}" if png else ""))
    return data


def _virtio_paths() -> dict[str, str]:
    """Which notification and interrupt paths a paravirtualized machine uses on this host."""
    from virtkit.vm import Machine, MachineConfig

    m = Machine(MachineConfig(paravirt=True), lambda data: None)
    try:
        return dict(m.virtio_paths)
    finally:
        m.close()


def targets(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("console", "disk"):
        r = results.get(name, {})
        full = r.get("full", {}).get("mb_s")
        best = max((v["mb_s"] or 0 for k, v in r.items() if k.startswith("para")), default=0)
        if full and best:
            out[f"{name}_para_speedup"] = best / full  # throughput ratio: the sizes may differ
    cpu = results.get("cpu", {})
    if "native" in cpu and "para" in cpu:
        out["cpu_para_vs_native"] = cpu["para"]["seconds"] / cpu["native"]["seconds"]
    null = results.get("null", {})
    if "full" in null and "para (hcall)" in null:
        out["null_hcall_vs_port_write"] = null["para (hcall)"]["seconds"] / null["full"]["seconds"]
    return out


def render(data: dict[str, Any]) -> str:
    plat = data["platform"]
    lines = [
        f"# Full virtualization vs paravirtualization\n\nPlatform: {plat.get('cpu_model')}, KVM flavor "
        f"**{plat.get('kvm_flavor')}** ({plat.get('meaning')}). virtio notifications by "
        f"{data['virtio_paths'].get('notify')}, interrupts by {data['virtio_paths'].get('interrupt')}. "
        "Times are the guest's own TSC measurement of the work.\n"
    ]
    rows = []
    for name, res in data["results"].items():
        for how, r in res.items():
            rows.append(
                [
                    name,
                    how,
                    data["workloads"][name].get(how, ""),
                    f"{r['seconds'] * 1e3:,.1f}",
                    "-" if r.get("mb_s") is None else f"{r['mb_s']:,.2f}",
                    f"{r['exits']:,}",
                    "-" if r.get("exits_per_kib") is None else f"{r['exits_per_kib']:,.2f}",
                    "-" if "guest_s" not in r else f"{r['guest_s'] * 1e3:,.0f} / {r['vmm_s'] * 1e3:,.0f}",
                    {True: "ok", False: "MISMATCH"}.get(r.get("checksum_ok"), "-") if name == "disk" else "-",
                ]
            )
    lines.append(
        md_table(
            [
                "workload",
                "how",
                "guest command line",
                "time (ms)",
                "MB/s",
                "VM exits",
                "exits per KiB",
                "in guest / in VMM (ms)",
                "data check",
            ],
            rows,
        )
    )
    lines.append("\n## Targets\n")
    t = data["targets"]
    trows = []
    for name in ("console", "disk"):
        if f"{name}_para_speedup" in t:
            trows.append([f"{name} throughput, para over full", ">= 20x", f"{t[f'{name}_para_speedup']:,.1f}x"])
    if "cpu_para_vs_native" in t:
        trows.append(
            ["CPU loop in the para guest vs native", "within 5%", f"{(t['cpu_para_vs_native'] - 1) * 100:+.1f}%"]
        )
    if "null_hcall_vs_port_write" in t:
        trows.append(
            [
                "null hypercall vs emulated register write",
                "(no target)",
                f"{t['null_hcall_vs_port_write']:.2f}x the time",
            ]
        )
    lines.append(md_table(["target", "goal", "measured"], trows))
    return "\n".join(lines)


def _per_unit_ms(r: dict[str, Any]) -> float:
    """Milliseconds per MiB where bytes moved (sizes differ between paths), else per run."""
    if not r:
        return 0.0
    if r.get("bytes"):
        return float(r["seconds"] * 1e3 / (r["bytes"] / MiB))
    return float(r["seconds"] * 1e3)


def plot(data: dict[str, Any]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    # One question: for the same work, how much faster is the paravirtualized path? Every bar is
    # that workload's time divided by its time under full virtualization, so one axis fits the
    # console, the disk (time per MiB), the null call and the CPU loop (time per run).
    names = list(data["results"].keys())
    hows = ["full", "para", "para (virtio)", "para (hcall)", "para (virtio kick)", "native"]
    colours = {
        "full": "#8a8a8a",
        "para": "#2a9d5c",
        "para (virtio)": "#2a9d5c",
        "para (hcall)": "#1f6f8b",
        "para (virtio kick)": "#7fc97f",
        "native": "#333333",
    }
    fig, ax = plt.subplots(figsize=(10, 5.5))
    width = 0.15
    shown = [h for h in hows if any(data["results"][n].get(h) for n in names)]
    for j, how in enumerate(shown):
        xs, ys = [], []
        for i, n in enumerate(names):
            base = _per_unit_ms(data["results"][n].get("full", {}))
            value = _per_unit_ms(data["results"][n].get(how, {}))
            if base and value:
                xs.append(i + (j - (len(shown) - 1) / 2) * width)
                ys.append(value / base)
        bars = ax.bar(xs, ys, width=width, label=how, color=colours.get(how))
        for bar, y in zip(bars, ys, strict=True):
            if how != "full":
                if y <= 1:
                    text = f"{1 / y:,.0f}x faster" if y < 0.5 else f"{1 / y:.2f}x faster"
                else:
                    text = f"{y:.2f}x slower"
                ax.annotate(
                    text,
                    (bar.get_x() + bar.get_width() / 2, y * 1.15),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    rotation=90,
                )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("time relative to full virtualization (log; lower is faster)")
    plat = data["platform"]
    ax.set_title(
        f"Same work, paravirtualized vs fully virtualized ({plat.get('kvm_flavor')} KVM, {plat.get('cpu_model')})"
    )
    ax.set_ylim(top=30)  # room for the labels above the bars at 1x
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=len(shown), frameon=False)
    fig.tight_layout()
    path = ROOT / "bench" / "results" / "paravirt.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
