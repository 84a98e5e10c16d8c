"""virtkitd as a host for many VMs: creation rate, density, memory overhead per VM.

* **creation rate**: VMs created and started through the REST API one after another, each timed
  from the request to the first byte of its guest's output (counter guest);
* **density**: small VMs (16 MiB, 1 vCPU, the exit-free ``spin`` guest at CPL3) started until the
  service refuses one; the refusal names the limit (vCPU overcommit, memory), measured twice: with
  the default overcommit (4) and with overcommit 64 (then memory or the ``--max`` cap stops it);
* **memory overhead**: RSS of each VMM process beyond its guest's resident RAM (from
  /proc/PID/smaps: the guest RAM mapping's own Rss is subtracted); the same for QEMU
  ``-M microvm`` processes started the same way with the same guest; and per VM when many
  ``virtkit.api.VM`` run in one process (the in-process mode).

Writes bench/results/service.{json,md,png}. Needs root (namespaces, cgroups) and /dev/kvm.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, md_table, median, platform_record, qemu_version, write_results

GUESTS = Path(os.environ.get("VIRTKIT_GUESTS", ROOT / "build" / "guests"))
MIB = 1 << 20


def _guest_rss(pid: int, guest_bytes: int) -> tuple[int, int]:
    """(total RSS, RSS of the mapping that is the guest's RAM) in bytes, from /proc/PID/smaps."""
    total = guest = 0
    size = 0
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return 0, 0
    for line in text.splitlines():
        if "-" in line.split(" ", 1)[0] and not line.startswith(("Size", "Rss")):
            lo, hi = line.split(" ", 1)[0].split("-")
            size = int(hi, 16) - int(lo, 16)
        elif line.startswith("Rss:"):
            kb = int(line.split()[1]) * 1024
            total += kb
            if size >= guest_bytes * 0.9 and size <= guest_bytes * 1.1:
                guest += kb
    return total, guest


class Service:
    def __init__(self, *extra: str) -> None:
        from virtkit.service.client import Client

        self.tmp = tempfile.mkdtemp(prefix="vkb", dir="/tmp")
        self.parent = f"virtkitd-bench-{os.getpid()}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "virtkit.service",
                "--state-dir",
                f"{self.tmp}/state",
                "--run-dir",
                self.tmp,
                "--cgroup-parent",
                self.parent,
                *extra,
            ],
            stderr=subprocess.DEVNULL,
        )
        sock = f"{self.tmp}/api.sock"
        while not os.path.exists(sock):
            time.sleep(0.02)
        self.c = Client(sock)

    def create(self, name: str, kernel: str, **kw: Any) -> dict[str, Any]:
        return self.c.call("POST", "/v1/vms", {"name": name, "kernel": kernel, "start": True, **kw})  # type: ignore[no-any-return]

    def close(self) -> None:
        from virtkit.service.cgroups import remove_parent

        for vm in self.c.call("GET", "/v1/vms"):
            self.c.call("DELETE", f"/v1/vms/{vm['name']}?force=true")
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        remove_parent(self.parent)
        shutil.rmtree(self.tmp, ignore_errors=True)


def creation_rate(n: int) -> dict[str, Any]:
    s = Service("--overcommit", "64")  # the rate, not the vCPU account, is measured here
    try:
        kernel = str(GUESTS / "counter.elf")
        times = []
        t_all = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            s.create(f"r{i}", kernel, memory_mib=16)
            while not s.c.call("GET", f"/v1/vms/r{i}/logs?limit=1")["data"]:
                time.sleep(0.001)
            times.append(time.perf_counter() - t0)
        total = time.perf_counter() - t_all
        overhead = []
        for vm in s.c.call("GET", "/v1/vms"):
            rss, guest = _guest_rss(vm["pid"], 16 * MIB)
            overhead.append(rss - guest)
        return {
            "vms": n,
            "total_s": total,
            "vms_per_s": n / total,
            "to_first_output_ms_median": median(times) * 1e3,
            "to_first_output_ms_min": min(times) * 1e3,
            "vmm_rss_beyond_guest_mib_median": median(overhead) / MIB,
            "vmm_rss_beyond_guest_mib_max": max(overhead) / MIB,
        }
    finally:
        s.close()


def density(overcommit: float, cap: int) -> dict[str, Any]:
    from virtkit.service.client import ApiError

    s = Service("--overcommit", str(overcommit))
    try:
        kernel = str(GUESTS / "spin.elf")
        n, limit = 0, f"--max {cap} reached"
        t0 = time.perf_counter()
        while n < cap:
            try:
                s.create(f"d{n}", kernel, memory_mib=16, cmdline="cpl=3")
            except ApiError as e:
                limit = str(e)
                break
            n += 1
        running = sum(1 for v in s.c.call("GET", "/v1/vms") if v["state"] == "running")
        host = s.c.call("GET", "/v1/host")
        return {
            "overcommit": overcommit,
            "started": n,
            "running": running,
            "stopped_by": limit,
            "seconds": time.perf_counter() - t0,
            "load_average": host["load_average"],
            "memory_available_mib": host["memory_available_now"] // MIB,
        }
    finally:
        s.close()


def qemu_overhead(n: int) -> dict[str, Any]:
    if shutil.which("qemu-system-x86_64") is None:
        return {"skipped": "qemu-system-x86_64 not installed"}
    procs = []
    try:
        for _ in range(n):
            procs.append(
                subprocess.Popen(
                    [
                        "qemu-system-x86_64",
                        "-M",
                        "microvm",
                        "-enable-kvm",
                        "-m",
                        "16",
                        "-nodefaults",
                        "-no-user-config",
                        "-nographic",
                        "-serial",
                        "stdio",
                        "-kernel",
                        str(GUESTS / "counter.elf"),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    stdin=subprocess.DEVNULL,
                )
            )
        for p in procs:
            assert p.stdout is not None
            p.stdout.read(1)
        time.sleep(0.5)
        overhead = []
        for p in procs:
            rss, guest = _guest_rss(p.pid, 16 * MIB)
            overhead.append(rss - guest)
        return {"processes": n, "rss_beyond_guest_mib_median": median(overhead) / MIB}
    finally:
        for p in procs:
            p.kill()
            p.wait()
            if p.stdout:
                p.stdout.close()


IN_PROCESS = r"""
import json, sys, time
from virtkit.api import VM
from bench.service import _guest_rss
import os
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
base = rss()
vms = []
for i in range(int(sys.argv[1])):
    vm = VM(sys.argv[2], memory="16M")
    vm.start()
    vms.append(vm)
time.sleep(0.5)
total = rss()
guest = sum(sum(r.size for r in [] ) for _ in vms)
_, guest = _guest_rss(os.getpid(), 16 << 20)
print(json.dumps({"base": base, "total": total, "guest": guest}))
sys.stdout.flush()
os._exit(0)
"""


def in_process(n: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", IN_PROCESS, str(n), str(GUESTS / "counter.elf")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    d = json.loads(out.stdout)
    per_vm = (d["total"] - d["guest"] - d["base"]) / n
    return {
        "vms": n,
        "process_base_mib": d["base"] / MIB,
        "per_vm_beyond_guest_mib": per_vm / MIB,
        "total_beyond_guest_mib": (d["total"] - d["guest"]) / MIB,
    }


def plot(data: dict[str, Any]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels, values = [], []
    labels.append("virtkit VMM\nprocess (jailed)")
    values.append(data["creation"]["vmm_rss_beyond_guest_mib_median"])
    labels.append("virtkit\nin-process, per VM")
    values.append(data["in_process"]["per_vm_beyond_guest_mib"])
    if "rss_beyond_guest_mib_median" in data["qemu"]:
        labels.append("QEMU microvm\nprocess")
        values.append(data["qemu"]["rss_beyond_guest_mib_median"])
    # green is virtkit, grey QEMU (as in the other plots); labels sit above the bars, the
    # target line has its legend entry instead of a label that a bar could cover
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.bar(labels, values, color=["#2a9d5c" if lab.startswith("virtkit") else "#8a8a8a" for lab in labels])
    ax.axhline(15, color="black", linestyle="--", linewidth=1, label="target: < 15 MiB per VMM process")
    ax.set_ylim(0, max(values) * 1.25)
    ax.set_ylabel("MiB per VM beyond guest RAM")
    ax.set_title("What does one more VM cost in host memory? (counter guest)")
    for i, v in enumerate(values):
        if v > max(values) / 5:  # inside a tall bar, clear of the target line
            ax.text(i, v / 2, f"{v:.1f} MiB", ha="center", va="center", fontsize=10, color="white")
        else:
            ax.annotate(f"{v:.1f} MiB", (i, v), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = RESULTS / "service.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(quick: bool = False) -> dict[str, Any]:
    n = 4 if quick else 12
    data: dict[str, Any] = {"platform": platform_record(), "qemu": {}, "qemu_version": qemu_version()}
    data["creation"] = creation_rate(n)
    data["in_process"] = in_process(n)
    data["qemu"] = qemu_overhead(n)
    data["density"] = [density(4.0, 64), density(64.0, 20 if quick else 120)]
    c, ip, q = data["creation"], data["in_process"], data["qemu"]
    rows = [
        [
            "VM creation, API request to first guest output (median / min)",
            f"{c['to_first_output_ms_median']:.0f} / {c['to_first_output_ms_min']:.0f} ms",
            f"{c['vms_per_s']:.1f} VMs/s",
        ],
        [
            "VMM process RSS beyond guest RAM (median / max)",
            f"{c['vmm_rss_beyond_guest_mib_median']:.1f} / {c['vmm_rss_beyond_guest_mib_max']:.1f} MiB",
            "target < 15",
        ],
        [
            "in-process mode, per VM beyond guest RAM",
            f"{ip['per_vm_beyond_guest_mib']:.1f} MiB",
            f"base process {ip['process_base_mib']:.1f} MiB",
        ],
        [
            "QEMU -M microvm process RSS beyond guest RAM",
            f"{q.get('rss_beyond_guest_mib_median', float('nan')):.1f} MiB",
            data["qemu_version"],
        ],
    ]
    for d in data["density"]:
        rows.append(
            [
                f"density, overcommit {d['overcommit']:g} (16 MiB spin VMs)",
                f"{d['running']} running",
                f"stopped by: {d['stopped_by'][:90]}",
            ]
        )
    md = (
        "# virtkitd: creation rate, density, memory overhead\n\n"
        f"Platform: {data['platform'].get('kvm_flavor')}, {data['platform'].get('cpu_count')} CPUs. "
        f"{n} VMs per measurement.\n\n" + md_table(["what", "value", "note"], rows) + "\n"
    )
    jpath, mpath = write_results("service", data, md)
    png = plot(data)
    print(md)
    print(f"wrote {jpath}, {mpath}" + (f", {png}" if png else ""))
    return data


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
