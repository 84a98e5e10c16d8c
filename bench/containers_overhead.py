"""What a container costs a workload: the same programs natively and in a virtkit container.

    python -m bench.containers_overhead [--quick]

Workloads (one static C program, built here with gcc, timing itself with CLOCK_MONOTONIC so that
container set-up is not counted): a CPU loop (200M additions), 10K small file writes (create,
write 6 bytes, close, then unlink), 100K ``getpid`` system calls, and 200 process starts
(fork + exec of busybox ``true`` + wait). Each runs natively, in a container with virtkit's default
config, and in the same container without its seccomp filter (a filter is a BPF program the kernel
runs on every system call: the getpid column shows its price). The VM columns of the seed's picture
come from the VM suites (bench/vmm.py, bench/paravirt.py) as they land.

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
        volatile unsigned long x = 0;
        for (unsigned long i = 0; i < 200000000UL; i++) x += i;
    } else if (!strcmp(w, "getpid")) {
        for (int i = 0; i < 100000; i++) syscall(SYS_getpid);
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

WORKLOADS = (("cpu", "CPU loop (200M adds)"), ("files", "10K small file writes"),
             ("getpid", "100K getpid"), ("spawn", "200 process starts"))


def _args(work: str, tmp: str, true_path: str) -> list[str]:
    if work == "files":
        return ["/workload", work, tmp]
    if work == "spawn":
        return ["/workload", work, true_path]
    return ["/workload", work]


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
        subprocess.run(["gcc", "-O2", "-static", "-o", str(exe), str(src)], check=True)
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

        results: dict[str, dict[str, float]] = {}
        medians: dict[str, dict[str, float]] = {}
        for work, _label in WORKLOADS:
            modes: dict[str, list[float]] = {"native": [], "container": [], "container, no seccomp": []}
            for _ in range(reps):  # interleaved, so load changes hit every mode alike
                modes["native"].append(native(_args(work, str(native_tmp), "/bin/busybox")))
                modes["container"].append(in_container(_args(work, "/tmp", "/bin/true"), True))
                modes["container, no seccomp"].append(in_container(_args(work, "/tmp", "/bin/true"), False))
            # best of N: on a shared 2-core machine the minimum is the figure least disturbed by others
            results[work] = {m: min(v) for m, v in modes.items()}
            medians[work] = {m: statistics.median(v) for m, v in modes.items()}
    finally:
        subprocess.run(["umount", str(base / "native-tmp")], check=False, stderr=subprocess.DEVNULL)
        shutil.rmtree(base, ignore_errors=True)

    header = "| workload | native | container | ratio | container, no seccomp | ratio |"
    lines = [header, "|---|---|---|---|---|---|"]
    for work, label in WORKLOADS:
        r = results[work]
        lines.append(f"| {label} | {r['native'] * 1000:.1f} ms | {r['container'] * 1000:.1f} ms | "
                     f"{r['container'] / r['native']:.2f}x | {r['container, no seccomp'] * 1000:.1f} ms | "
                     f"{r['container, no seccomp'] / r['native']:.2f}x |")
    md = (f"## Workload overhead: native vs virtkit container (best of {reps}, times measured inside "
          "the workload; files on tmpfs)\n\n" + "\n".join(lines) + "\n\nVM columns: see the vmm and paravirt suites.\n")
    record = {"suite": "containers_overhead", "reps": reps, "best": results, "median": medians,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "containers_overhead.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "containers_overhead.md").write_text(md)
    _chart(results)
    print(md)
    return record


def _chart(results: dict[str, dict[str, float]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    modes = ("native", "container", "container, no seccomp")
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.26
    for i, mode in enumerate(modes):
        values = [results[w][mode] / results[w]["native"] for w, _ in WORKLOADS]
        ax.bar([x + (i - 1) * width for x in range(len(WORKLOADS))], values, width, label=mode)
    ax.set_xticks(range(len(WORKLOADS)), [label for _, label in WORKLOADS])
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_ylabel("time relative to native")
    ax.set_title("Workload time in a virtkit container, relative to native")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(RESULTS / "containers_overhead.png", dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.containers_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    run(quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
