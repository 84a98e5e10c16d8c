"""What a container costs a workload: the same programs natively and in a virtkit container.

    python -m bench.containers_overhead [--quick]

Workloads (one static C program, built here with gcc, timing itself with CLOCK_MONOTONIC so that
container set-up is not counted): a CPU loop (200M iterations of add/xor/dec/jnz in registers, the
VM guests' loop), 10K small file writes (create,
write 6 bytes, close, then unlink), 100K ``getpid`` system calls, and 200 process starts
(fork + exec of busybox ``true`` + wait). Each runs natively, in a container with virtkit's default
config, and in the same container without its seccomp filter (a filter is a BPF program the kernel
runs on every system call: the getpid column shows its price).

The VM columns run virtkit's own guests, which have no operating system: the CPU loop is
``fullwork`` (full mode) and ``parawork`` (para mode) with ``work=cpu`` and the same iteration count
(the same add/xor/dec/jnz loop as natively, at CPL3); the system call is trapcost's ``kcall`` phase,
100K CPL3 -> CPL0 -> CPL3 round trips (INT3 + IRETQ), the guest kernel's equivalent of a getpid.
Both time themselves with RDTSC, converted with KVM's TSC rate. File writes and process starts have
no counterpart (no filesystem, no processes in these guests): "n/a".

Writes bench/results/containers_overhead.{json,md,png}. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

WORKLOAD_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *w = argv[1];
    double t0 = now();
    if (!strcmp(w, "cpu")) {
        /* the VM guests' loop (guests/lib/work.c), so every column runs the same instructions */
        unsigned long a = 0, b = 1, n = CPU_LOOP;
        __asm__ volatile("1:\n\tadd %[b], %[a]\n\txor %[a], %[b]\n\tdec %[n]\n\tjnz 1b"
                         : [a] "+r"(a), [b] "+r"(b), [n] "+r"(n));
        if (a == 42) puts("");  /* keep the result live */
    } else if (!strcmp(w, "getpid")) {
        for (int i = 0; i < GETPIDS; i++) syscall(SYS_getpid);
    } else if (!strcmp(w, "files")) {
        char p[256];
        for (int i = 0; i < 10000; i++) {
            snprintf(p, sizeof p, "%s/f%d", argv[2], i);
            int fd = open(p, O_CREAT | O_WRONLY | O_TRUNC, 0644);
            if (fd < 0 || write(fd, "hello\n", 6) != 6) return 1;
            close(fd);
        }
        for (int i = 0; i < 10000; i++) {
            snprintf(p, sizeof p, "%s/f%d", argv[2], i);
            unlink(p);
        }
    } else if (!strcmp(w, "spawn")) {
        for (int i = 0; i < 200; i++) {
            pid_t pid = fork();
            if (pid == 0) { execl(argv[2], "true", (char *)NULL); _exit(127); }
            int st;
            waitpid(pid, &st, 0);
            if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) return 1;
        }
    } else {
        return 2;
    }
    printf("%.6f\n", now() - t0);
    return 0;
}
"""

CPU_LOOP = 200_000_000  # one figure for the native, container and VM loops
GETPIDS = 100_000  # getpid calls natively; kcall round trips in the VMs
VM_MODES = ("VM full", "VM para")
MODES = ("native", "container", "container, no seccomp", *VM_MODES)

WORKLOADS = (
    ("cpu", "CPU loop (200M iterations)"),
    ("files", "10K small file writes"),
    ("getpid", "100K getpid"),
    ("spawn", "200 process starts"),
)


def _args(work: str, tmp: str, true_path: str) -> list[str]:
    if work == "files":
        return ["/workload", work, tmp]
    if work == "spawn":
        return ["/workload", work, true_path]
    return ["/workload", work]


def _vm_line(kernel: Path, mode: str, cmdline: str, prefix: str) -> dict[str, str]:
    from virtkit import VM

    with VM(kernel, mode=mode, cmdline=cmdline) as vm:
        r = vm.run(timeout=300)
    for line in r.serial_output.splitlines():
        if line.startswith(prefix):
            return dict(f.split("=", 1) for f in line.split() if "=" in f)
    raise RuntimeError(
        f"{kernel.name} {cmdline} ({mode}): no {prefix!r} line; ended {r.reason.value} "
        f"({r.exit_code}): {r.detail or r.serial_output[-300:]}"
    )


def in_vm(work: str, mode: str, tsc_khz: int) -> float:
    """Seconds of the CPU loop or of GETPIDS kcall round trips in a virtkit VM (``mode`` full|para)."""
    guests = ROOT / "build" / "guests"
    if work == "cpu":
        kernel = guests / ("fullwork.elf" if mode == "full" else "parawork.elf")
        f = _vm_line(kernel, mode, f"work=cpu loop={CPU_LOOP}", "work=cpu ")
        if int(f["n"]) != CPU_LOOP:
            raise RuntimeError(f"{kernel.name} ran {f['n']} iterations, not {CPU_LOOP}")
    else:  # the kcall phase runs n/100 round trips
        f = _vm_line(guests / "trapcost.elf", mode, f"phases=kcall n={GETPIDS * 100}", "trapcost phase=kcall ")
        if int(f["n"]) != GETPIDS:
            raise RuntimeError(f"trapcost ran {f['n']} kcall round trips, not {GETPIDS}")
    return int(f["tsc"]) / (tsc_khz * 1e3)


def run(quick: bool = False) -> dict[str, Any]:
    if os.geteuid() != 0:
        print("containers_overhead: needs root; skipped")
        return {}
    if shutil.which("gcc") is None:
        print("containers_overhead: needs gcc; skipped")
        return {}
    from virtkit.container.image import ensure_busybox
    from virtkit.container.runtime import Runtime
    from virtkit.container.sealexe import ensure_sealed
    from virtkit.container.spec import default_spec

    ensure_sealed()  # the library path, as a long-lived caller runs it
    reps = 3 if quick else 9
    base = Path(tempfile.mkdtemp(prefix="virtkit-overhead-"))
    try:
        src = base / "workload.c"
        src.write_text(WORKLOAD_C)
        exe = base / "workload"
        subprocess.run(
            ["gcc", "-O2", "-static", f"-DCPU_LOOP={CPU_LOOP}UL", f"-DGETPIDS={GETPIDS}", "-o", str(exe), str(src)],
            check=True,
        )
        image = Path(ensure_busybox(str(base / "images")))
        bundle = base / "bundle"
        bundle.mkdir()
        shutil.copytree(image / "rootfs", bundle / "rootfs", symlinks=True)
        shutil.copy2(exe, bundle / "rootfs" / "workload")
        # both sides write their files to a tmpfs: the figure is the system-call path, not this VM's disk
        native_tmp = base / "native-tmp"
        native_tmp.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(native_tmp)], check=True)
        rt = Runtime(str(base / "run"))
        counter = iter(range(10_000))

        def in_container(argv: list[str], seccomp: bool) -> float:
            spec = default_spec(argv)
            spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["size=64m"]})
            if not seccomp:
                del spec["linux"]["seccomp"]
            (bundle / "config.json").write_text(json.dumps(spec))
            cid = f"ovh{next(counter)}"
            rt.create(cid, str(bundle), capture=True)
            try:
                rt.start(cid)
                info = rt.wait(cid, timeout=300)
                out = rt.logs(cid)
            finally:
                rt.delete(cid, force=True)
            if info.get("exitStatus") != 0:
                raise RuntimeError(f"{argv} in a container: {info} {out[-200:]}")
            return float(out.strip().splitlines()[-1])

        def native(argv: list[str]) -> float:
            argv = [str(exe), *argv[1:]]
            out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            return float(out.strip().splitlines()[-1])

        vm_skip = _vm_unavailable()
        tsc_khz = 0
        if vm_skip is None:
            from virtkit.doctor import probe

            tsc_khz = int(probe().get("tsc_khz") or 0)
            vm_skip = None if tsc_khz > 0 else "KVM reports no TSC rate"
        if vm_skip:
            print(f"containers_overhead: VM columns skipped: {vm_skip}")
        results: dict[str, dict[str, float | None]] = {}
        medians: dict[str, dict[str, float | None]] = {}
        for work, _label in WORKLOADS:
            in_vms = work in ("cpu", "getpid") and vm_skip is None
            modes: dict[str, list[float]] = {m: [] for m in MODES}
            for _ in range(reps):  # interleaved, so load changes hit every mode alike
                modes["native"].append(native(_args(work, str(native_tmp), "/bin/busybox")))
                modes["container"].append(in_container(_args(work, "/tmp", "/bin/true"), True))
                modes["container, no seccomp"].append(in_container(_args(work, "/tmp", "/bin/true"), False))
                if in_vms:
                    modes["VM full"].append(in_vm(work, "full", tsc_khz))
                    modes["VM para"].append(in_vm(work, "para", tsc_khz))
            # best of N: on a shared 2-core machine the minimum is the figure least disturbed by others
            results[work] = {m: min(v) if v else None for m, v in modes.items()}
            medians[work] = {m: statistics.median(v) if v else None for m, v in modes.items()}
    finally:
        subprocess.run(["umount", str(base / "native-tmp")], check=False, stderr=subprocess.DEVNULL)
        shutil.rmtree(base, ignore_errors=True)

    header = "| workload | native | " + " | ".join(f"{m} | ratio" for m in MODES[1:]) + " |"
    lines = [header, "|---" * (2 * len(MODES)) + "|"]
    for work, label in WORKLOADS:
        r = results[work]
        nat = r["native"]
        assert nat is not None
        cells = [label, f"{nat * 1000:.1f} ms"]
        for m in MODES[1:]:
            v = r[m]
            cells += [f"{v * 1000:.1f} ms", f"{v / nat:.2f}x"] if v is not None else ["n/a", ""]
        lines.append("| " + " | ".join(cells) + " |")
    md = (
        f"## Workload overhead: native vs virtkit container vs virtkit VMs (best of {reps}, times measured "
        "inside the workload; files on tmpfs)\n\n" + "\n".join(lines) + "\n\n"
        "VM columns: virtkit's guests have no operating system. CPU loop: `fullwork` (full mode) and "
        f"`parawork` (para mode), `work=cpu loop={CPU_LOOP}`, the same count and the same body as the native loop "
        "(add/xor/dec/jnz in registers; CPL3 in the guests). "
        f"getpid: {GETPIDS // 1000}K round trips CPL3 -> CPL0 -> CPL3 of trapcost's `kcall` (INT3 + IRETQ, "
        "the guest kernel's equivalent of a system call). Both timed with RDTSC at KVM's TSC rate. "
        "File writes and process starts: n/a, there is no filesystem and there are no processes in "
        "these guests." + (f" Not run: {vm_skip}." if vm_skip else "") + "\n"
    )
    record = {
        "suite": "containers_overhead",
        "reps": reps,
        "cpu_loop": CPU_LOOP,
        "getpids": GETPIDS,
        "vm_skipped": vm_skip,
        "tsc_khz": tsc_khz,
        "best": results,
        "median": medians,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "containers_overhead.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "containers_overhead.md").write_text(md)
    _chart(results)
    print(md)
    return record


def _vm_unavailable() -> str | None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no usable /dev/kvm"
    missing = [
        g for g in ("fullwork.elf", "parawork.elf", "trapcost.elf") if not (ROOT / "build" / "guests" / g).exists()
    ]
    return f"guests not built ({', '.join(missing)}; make guests)" if missing else None


def _chart(results: dict[str, dict[str, float | None]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        xs, values = [], []
        for x, (w, _) in enumerate(WORKLOADS):
            v, nat = results[w][mode], results[w]["native"]
            if v is not None and nat:
                xs.append(x + (i - (len(MODES) - 1) / 2) * width)
                values.append(v / nat)
        ax.bar(xs, values, width, label=mode)
    ax.set_xticks(range(len(WORKLOADS)), [label for _, label in WORKLOADS])
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_yscale("log")  # a kcall round trip in a VM costs orders of magnitude more than a getpid
    ax.set_ylabel("time relative to native (log)")
    ax.set_title(
        "Workload time in a virtkit container and VMs, relative to native\n"
        "(VMs: CPU loop and syscall only; no files or processes in their guests)",
        fontsize=10,
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "containers_overhead.png", dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.containers_overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    run(quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
