"""Linux guests: how far, and how fast, the test kernel boots under virtkit and under QEMU.

The same small kernel (guests/linux, built by ``make setup``), initramfs and command line, with 2
vCPUs and 256 MiB, under ``virtkit run`` in full and in para mode and under QEMU's microvm
(``-enable-kvm``), one after the other in one run. Each boot is timed from process start to the
first appearance of each milestone line on the serial console (the host's clock, not the guest's
timestamps, which follow the TSC), and ends when the last milestone shows, when the VMM exits, or
at the deadline; the VMM's peak RSS comes from wait4.

On a PVM host the kernel's own code is emulated (~1000x slower), so the figures there say how far
each VMM gets and at what pace, not what a user of a VT-x host would see: QEMU stops at the
kernel's int3 self-test, virtkit completes that instruction and goes on (docs/LINUX.md). The
platform is in the results, as for every suite.
"""

from __future__ import annotations

import gzip
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, md_table, platform_record, qemu_version, write_results

#: (name, serial line that marks it), in boot order
MILESTONES: list[tuple[str, str]] = [
    ("first kernel line", "Linux version"),
    ("int3 self-test passed", "Freeing SMP alternatives memory"),
    ("both CPUs up", "smp: Brought up 1 node, 2 CPUs"),
    ("ACPI tables loaded", "ACPI: Interpreter enabled"),
    ("initramfs unpacked", "Freeing initrd memory"),
    ("Run /init", "Run /init as init process"),
    ("/init printed", "VIRTKIT-INITRAMFS-OK"),
]
OUTPUT_CAP = 4 << 20  # a guest's console is hostile input too: keep at most 4 MiB of it


def _cmdline(tsc_khz: int) -> str:
    # a preset delay loop and TSC rate (calibration loops are slow where kernel code is emulated),
    # no RCU stall reports (long emulated stack dumps), one UART to probe: docs/LINUX.md
    return (
        f"console=ttyS0 lpj={tsc_khz * 4} tsc_early_khz={tsc_khz} no_timer_check noxsave panic=-1 "
        "rcupdate.rcu_cpu_stall_suppress=1 8250.nr_uarts=1"
    )


def boot(cmd: list[str], deadline_s: float) -> dict[str, Any]:
    """Run one boot; milestone times (s from process start), how it ended, peak RSS."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert p.stdout is not None
    fd = p.stdout.fileno()
    out = bytearray()
    seen: dict[str, float] = {}
    ended = "deadline"
    while True:
        left = t0 + deadline_s - time.perf_counter()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            ended = "exited"
            break
        if len(out) < OUTPUT_CAP:
            out += chunk[: OUTPUT_CAP - len(out)]
        now = time.perf_counter() - t0
        for name, line in MILESTONES:
            if name not in seen and line.encode() in out:
                seen[name] = now
        if MILESTONES[-1][0] in seen:
            ended = "reached the last milestone"
            break
        if b"KVM internal error" in out:  # QEMU stays alive, paused, after one: nothing more comes
            ended = "KVM internal error"
            break
    reaped = _reap(p.pid, 0.0)
    if reaped is None:
        p.send_signal(signal.SIGTERM)
        reaped = _reap(p.pid, 10.0)
    if reaped is None:
        p.kill()
        reaped = _reap(p.pid, None)
    assert reaped is not None
    status, maxrss = reaped
    p.returncode = status
    p.stdout.close()
    text = out.decode(errors="replace")
    last = [ln.strip() for ln in text.splitlines() if ln.strip()][-1:] or [""]
    return {
        "command": cmd,
        "milestones_s": seen,
        "reached": [n for n, _ in MILESTONES if n in seen],
        "ended": ended,
        "exit_status": p.returncode,
        "seconds": time.perf_counter() - t0,
        "last_line": last[0][:200],
        "peak_rss_mib": maxrss / 1024,
        "init_syscall_wall": "Attempted to kill init" in text,
    }


def _test_kernel() -> tuple[Path, Path]:
    """The vmlinux and initramfs ``make setup`` built (build/linux.json points into the cache)."""
    path = ROOT / "build" / "linux.json"
    try:
        data = json.loads(path.read_text()[: 64 * 1024])
        vmlinux, initramfs = Path(data["kernel"]["vmlinux"]), Path(data["initramfs"]["cpio_gz"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"bench linux: {path} is missing or malformed ({e}): run `make setup`") from None
    for f in (vmlinux, initramfs):
        if not f.is_file():
            raise SystemExit(f"bench linux: {f} is missing from the kernel cache: run `make setup`")
    return vmlinux, initramfs


def _reap(pid: int, timeout: float | None) -> tuple[int, int] | None:
    """(exit status, peak RSS in KiB) of the child once it has ended, or None at the timeout."""
    end = None if timeout is None else time.perf_counter() + timeout
    while True:
        got, status, usage = os.wait4(pid, 0 if timeout is None else os.WNOHANG)
        if got:
            return os.waitstatus_to_exitcode(status), usage.ru_maxrss
        if end is not None and time.perf_counter() >= end:
            return None
        time.sleep(0.05)


def run(quick: bool = False) -> dict[str, Any]:
    from virtkit.doctor import probe

    vmlinux, initramfs_gz = _test_kernel()
    # handed over uncompressed: gzip's inflate in emulated kernel code alone takes minutes on PVM
    tmp = tempfile.TemporaryDirectory(prefix="virtkit-bench-linux-")
    initramfs = Path(tmp.name) / "initramfs.cpio"
    with gzip.open(initramfs_gz) as src, initramfs.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    info = probe()
    tsc_khz = int(info.get("tsc_khz") or 0)
    pvm = info["kvm_flavor"] == "pvm"
    deadline = (150.0 if quick else 480.0) if pvm else 60.0
    cmdline = _cmdline(tsc_khz)
    common = [str(vmlinux), "--initrd", str(initramfs), "-m", "256M", "--vcpus", "2"]
    virtkit = [sys.executable, "-m", "virtkit", "run", *common, "--cmdline", cmdline, "--timeout", str(int(deadline))]
    runs = {
        "virtkit full": virtkit,
        "virtkit para": [*virtkit, "--mode", "para"],
        "qemu -M microvm": [
            "qemu-system-x86_64",
            "-M",
            "microvm",
            "-enable-kvm",
            "-cpu",
            "qemu64,-cx16",
            "-smp",
            "2",
            "-m",
            "256",
            "-nographic",
            "-no-reboot",
            "-kernel",
            str(vmlinux),
            "-initrd",
            str(initramfs),
            "-append",
            cmdline,
        ],  # fmt: skip
    }
    results: dict[str, Any] = {}
    for name, cmd in runs.items():
        print(f"  {name}: booting (up to {deadline:.0f} s)", flush=True)
        results[name] = boot(cmd, deadline)
        r = results[name]
        print(f"  {name}: {len(r['reached'])}/{len(MILESTONES)} milestones, {r['ended']}", flush=True)
    data = {
        "platform": platform_record(),
        "qemu": qemu_version(),
        "kernel": str(vmlinux),
        "cmdline": cmdline,
        "deadline_s": deadline,
        "milestones": [n for n, _ in MILESTONES],
        "boots": results,
    }
    write_results("linux", data, render(data))
    tmp.cleanup()
    return data


def render(data: dict[str, Any]) -> str:
    boots = data["boots"]
    names = list(boots)
    rows = []
    for m in data["milestones"]:
        cells = []
        for n in names:
            t = boots[n]["milestones_s"].get(m)
            cells.append("-" if t is None else f"{t:.1f} s")
        rows.append([m, *cells])
    rows.append(["ended", *[f"{boots[n]['ended']} (status {boots[n]['exit_status']})" for n in names]])
    rows.append(["last line", *[f"`{boots[n]['last_line'][:60]}`" for n in names]])
    rows.append(["VMM peak RSS", *[f"{boots[n]['peak_rss_mib']:.1f} MiB" for n in names]])
    plat = data["platform"]
    return (
        "# Linux guests: the test kernel under virtkit and QEMU\n\n"
        f"Platform: {plat.get('cpu_model')}, {plat.get('cpu_count')} cores, KVM {plat.get('kvm_flavor')} "
        f"({plat.get('meaning')}); {data['qemu']}.\n\n"
        f"Kernel `{data['kernel']}`, 2 vCPUs, 256 MiB, command line `{data['cmdline']}`; seconds from process "
        f"start to the first serial line of each milestone, deadline {data['deadline_s']:.0f} s.\n\n"
        + md_table(["milestone", *names], rows)
        + "\n"
    )


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
