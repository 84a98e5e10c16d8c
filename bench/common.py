"""Shared benchmark plumbing: process timing with peak RSS, medians, the platform record, output."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclass
class ProcessRun:
    first_byte_s: float | None
    exit_s: float
    maxrss_kib: int
    status: int
    stdout: bytes


def run_process(cmd: list[str], timeout: float = 120.0) -> ProcessRun:
    """Start ``cmd``; time to its first stdout byte and to its exit; its peak RSS (wait4)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert p.stdout is not None
    first = p.stdout.read(1)
    t1 = time.perf_counter()
    rest = p.stdout.read()
    deadline = t0 + timeout
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            p.kill()
            pid, status, usage = os.wait4(p.pid, 0)
            break
        time.sleep(0.0005)
    t2 = time.perf_counter()
    p.returncode = os.waitstatus_to_exitcode(status)
    p.stdout.close()
    return ProcessRun(t1 - t0 if first else None, t2 - t0, usage.ru_maxrss, p.returncode, first + rest)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def platform_record() -> dict[str, Any]:
    from virtkit.doctor import probe

    info = probe()
    return {
        k: info.get(k)
        for k in ("host", "kernel", "cpu_model", "cpu_count", "kvm_flavor", "meaning", "tsc_khz", "api_version")
    }


def qemu_version() -> str:
    try:
        out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "not installed"


def write_results(name: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    jpath, mpath = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    jpath.write_text(json.dumps(data, indent=2, default=str) + "\n")
    mpath.write_text(markdown)
    return jpath, mpath


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


# --- the conditions a suite ran under --------------------------------------------------------------
#: a 1-minute load average above this share of the cores, or another process using more than
#: BUSY_PROCESS_SHARE of a core, marks the machine busy: figures are then pessimistic
BUSY_LOAD_SHARE = 0.5
BUSY_PROCESS_SHARE = 0.2


def _cpu_ticks() -> dict[int, tuple[str, int]]:
    ticks: dict[int, tuple[str, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks[int(entry)] = (name, int(fields[11]) + int(fields[12]))  # utime + stime
    return ticks


def busy_processes(window: float = 0.5) -> list[dict[str, Any]]:
    """Other processes that used more than BUSY_PROCESS_SHARE of a core over ``window`` seconds."""
    hz = os.sysconf("SC_CLK_TCK")
    before = _cpu_ticks()
    time.sleep(window)
    after = _cpu_ticks()
    mine = os.getpid()
    out = []
    for pid, (name, t) in after.items():
        if pid == mine or pid not in before:
            continue
        share = (t - before[pid][1]) / hz / window
        if share > BUSY_PROCESS_SHARE:
            out.append({"pid": pid, "name": name, "cpu_share": round(share, 2)})
    return sorted(out, key=lambda p: -p["cpu_share"])


def conditions_before() -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_count": os.cpu_count(),
        "load_before": list(os.getloadavg()),
        "others_before": busy_processes(),
    }


def conditions_after(cond: dict[str, Any]) -> dict[str, Any]:
    cond = {**cond, "load_after": list(os.getloadavg())}
    cores = cond["cpu_count"] or 1
    cond["busy"] = bool(cond["others_before"]) or cond["load_before"][0] > BUSY_LOAD_SHARE * cores
    return cond
