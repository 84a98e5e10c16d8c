"""Failover: snapshot, restore, clone and live migration, next to QEMU where QEMU runs here.

Figures, all on a 64 MiB counter guest (guests/counter.c):

* snapshot: how long the guest is paused, state and memory file sizes (API, warm process);
* restore-to-running: from the call to vCPUs running and to the first byte the resumed guest
  prints (API, warm process), and from process start to that byte (``virtkit restore``);
* clone rate: machines resumed from one snapshot per second;
* live migration between two processes on loopback, an idle and a memory-dirtying guest: total
  time, downtime (source paused -> target running), pages per pre-copy round;
* QEMU 7.2 (``-M microvm``) on the same guest: migration to a file (its savevm without a disk),
  ``-incoming`` from that file (loadvm), and live migration over loopback (its own figures from
  ``query-migrate``), with the same 50 ms downtime limit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, md_table, median, platform_record, qemu_version, write_results

MEMORY = "64M"
IDLE = "us=1000"
#: stamps 16 pages of a 32 MiB buffer per line, ~1500 lines/s: ~100 MB/s of guest writes
DIRTYING = "us=100 dirty=16 buf=32"
HEAVY = "us=100 dirty=256 buf=32"  # ~1.5 GB/s: the whole buffer rewritten every ~20 ms
DOWNTIME_MS = 50.0
#: the heavy guest again with a 1 ms budget it cannot meet: shows the rounds until pre-copy gives up
TIGHT = "heavy, 1 ms budget"
QEMU = "qemu-system-x86_64"


def virtkit_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "virtkit"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "virtkit"]


def _wait(pred: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark step timed out")
        time.sleep(0.005)


def _lines(vm: Any) -> int:
    return int(vm.console.output.count(b"\n"))


# --- virtkit, in this process ------------------------------------------------------------------
def measure_snapshot(counter: Path, work: Path, runs: int) -> tuple[dict[str, Any], Path]:
    from virtkit import VM, snapshot

    out: dict[str, Any] = {}
    keep = work / "snap-idle"
    for label, cmdline in (("idle", IDLE), ("32 MiB touched", HEAVY)):
        paused, state_ms, memory_ms, sizes = [], [], [], None
        with VM(counter, memory=MEMORY, cmdline=cmdline) as vm:
            vm.start()
            _wait(lambda vm=vm: _lines(vm) > 300)
            for i in range(runs):
                d = keep if label == "idle" else work / f"snap-{i}"
                info = snapshot.save(vm, d)
                paused.append(info.paused_ns / 1e6)
                state_ms.append(info.state_ns / 1e6)
                memory_ms.append(info.memory_ns / 1e6)
                disk = sum(p.stat().st_blocks * 512 for p in d.iterdir())
                sizes = {
                    "state_bytes": info.state_bytes,
                    "memory_file_bytes": info.memory_bytes,
                    "memory_stored_bytes": info.memory_written,
                    "on_disk_bytes": disk,
                }
                time.sleep(0.02)
        out[label] = {
            "paused_ms": median(paused),
            "state_ms": median(state_ms),
            "memory_ms": median(memory_ms),
            **(sizes or {}),
            "runs": runs,
        }
        print(
            f"  snapshot {label:<16} paused {out[label]['paused_ms']:7.2f} ms (state {out[label]['state_ms']:.2f},"
            f" memory {out[label]['memory_ms']:.2f})  stored {out[label]['memory_stored_bytes'] >> 10} KiB"
            f"  state {out[label]['state_bytes'] >> 10} KiB",
            flush=True,
        )
    return out, keep


def measure_restore(snap: Path, runs: int) -> dict[str, Any]:
    from virtkit import snapshot

    to_running, to_byte = [], []
    snapshot.restore(snap).close()  # warm: imports, the MSR list, page cache
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        vm = snapshot.restore(snap)  # load + check + build + apply + start the vCPU threads
        t1 = time.perf_counter_ns()
        try:
            _wait(lambda vm=vm: vm.console.first_byte_ns is not None)
            to_running.append((t1 - t0) / 1e6)
            to_byte.append((vm.console.first_byte_ns - t0) / 1e6)
        finally:
            vm.close()
    cli = []
    for _ in range(max(3, runs // 2)):
        cli.append(_process_first_byte([*virtkit_cmd(), "restore", str(snap)]))
    out = {
        "api_to_running_ms": median(to_running),
        "api_to_first_byte_ms": median(to_byte),
        "api_min_to_running_ms": min(to_running),
        "cli_to_first_byte_ms": median(cli),
        "runs": runs,
    }
    print(
        f"  restore  API to running {out['api_to_running_ms']:.2f} ms, to first guest byte "
        f"{out['api_to_first_byte_ms']:.2f} ms; virtkit restore (process) {out['cli_to_first_byte_ms']:.1f} ms",
        flush=True,
    )
    return out


def measure_clone(snap: Path, count: int) -> dict[str, Any]:
    from virtkit import snapshot

    t0 = time.perf_counter()
    vms = snapshot.clone(snap, count)
    started = time.perf_counter() - t0
    try:
        _wait(lambda: all(vm.console.first_byte_ns is not None for vm in vms))
        all_printing = time.perf_counter() - t0
    finally:
        for vm in vms:
            vm.close()
    out = {"count": count, "start_s": started, "clones_per_s": count / started, "all_printing_s": all_printing}
    print(f"  clone    {count} clones running in {started * 1e3:.1f} ms ({out['clones_per_s']:.0f}/s)", flush=True)
    return out


def _process_first_byte(cmd: list[str], timeout: float = 30.0) -> float:
    """Milliseconds from starting ``cmd`` to its first stdout byte; the process is then killed."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert p.stdout is not None
    watchdog = threading.Timer(timeout, p.kill)  # a process that never prints must not hang the run
    watchdog.start()
    try:
        first = p.stdout.read(1)
        t1 = time.perf_counter()
    finally:
        watchdog.cancel()
        p.kill()
        p.communicate(timeout=timeout)
    return (t1 - t0) * 1e3 if first else float("nan")


# --- virtkit live migration, two processes -----------------------------------------------------
def migrate_once(
    counter: Path, cmdline: str, work: Path, max_rounds: int = 30, downtime_ms: float = DOWNTIME_MS
) -> dict[str, Any]:
    from virtkit.migration.control import request
    from virtkit.migration.keys import generate, load

    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    sock, port_file, key = work / f"src-{tag}.sock", work / f"port-{tag}", work / "migration.key"
    if not key.exists():
        generate(str(key))
    vk = virtkit_cmd()
    # the receiver is built with the source's shape (its own --memory) and confines itself
    target = subprocess.Popen(
        [
            *vk,
            "migrate-receive",
            "--listen",
            "127.0.0.1:0",
            "--port-file",
            str(port_file),
            "--key-file",
            str(key),
            "--memory",
            MEMORY,
            "--serial",
            "none",
            "--accept-timeout",
            "60",
        ],
        stderr=subprocess.DEVNULL,
    )
    source = subprocess.Popen(
        [
            *vk,
            "run",
            str(counter),
            "--memory",
            MEMORY,
            "--cmdline",
            cmdline,
            "--control",
            str(sock),
            "--serial",
            "none",
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait(lambda: port_file.exists() and sock.exists())
        time.sleep(0.5)  # let the guest fill its buffer and settle
        reply = request(
            str(sock),
            "migrate",
            to=f"127.0.0.1:{port_file.read_text().strip()}",
            key=load(str(key)).hex(),
            downtime_ms=downtime_ms,
            max_rounds=max_rounds,
        )
        reply.pop("ok", None)
        return reply
    finally:
        for p in (source, target):
            if p.poll() is None:
                p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
            if p.poll() is None:
                p.kill()


# --- QEMU --------------------------------------------------------------------------------------
class Qmp:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        _wait(lambda: self._connect(path))  # the file appears at bind(), before QEMU listens
        self.sock.settimeout(60)
        self.f = self.sock.makefile("rb")
        self.f.readline()  # greeting
        self.cmd("qmp_capabilities")

    def _connect(self, path: str) -> bool:
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            self.sock = socket.socket(socket.AF_UNIX)  # a fresh socket for the next attempt
            return False
        return True

    def cmd(self, name: str, **args: Any) -> Any:
        self.sock.sendall(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        while True:
            msg = json.loads(self.f.readline())
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(f"QMP {name}: {msg['error']}")

    def wait_migration(self, timeout: float = 60.0) -> dict[str, Any]:
        """Poll query-migrate until the migration ends; after ``timeout`` seconds cancel it (a
        guest that dirties memory faster than it can be sent never converges without throttling)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.cmd("query-migrate")
            if st.get("status") in ("completed", "failed", "cancelled"):
                return st  # type: ignore[no-any-return]
            if time.monotonic() > deadline:
                self.cmd("migrate_cancel")
                st["status"] = f"not converged in {timeout:g} s"
                return st  # type: ignore[no-any-return]
            time.sleep(0.002)

    def close(self) -> None:
        self.sock.close()


def _qemu(counter: Path, cmdline: str, qmp: str, *extra: str) -> subprocess.Popen[bytes]:
    """QEMU with its serial port in ``qmp``.log (a pipe nobody drains would stall it)."""
    return subprocess.Popen(
        [
            QEMU,
            "-enable-kvm",
            "-m",
            MEMORY,
            "-M",
            "microvm",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            f"file:{qmp}.log",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel",
            str(counter),
            "-append",
            cmdline,
            "-qmp",
            f"unix:{qmp},server,nowait",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )


def _printing(qmp: str, lines: int = 100) -> bool:
    try:
        return os.path.getsize(f"{qmp}.log") > lines * 10
    except OSError:
        return False


def _stop(p: subprocess.Popen[bytes]) -> None:
    p.kill()
    p.communicate(timeout=10)


def measure_qemu(counter: Path, work: Path, runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    state = work / "qemu.state"
    # savevm: stop, migrate the whole state into a file (QEMU's snapshot without a qcow2 disk)
    paused = []
    for i in range(runs):
        qmp_path = str(work / f"q{i}.qmp")
        q = _qemu(counter, IDLE, qmp_path)
        try:
            mon = Qmp(qmp_path)
            _wait(lambda qmp_path=qmp_path: _printing(qmp_path))
            with contextlib.suppress(FileNotFoundError):
                state.unlink()
            t0 = time.perf_counter()
            mon.cmd("stop")
            mon.cmd("migrate", uri=f"exec:cat > {state}")
            st = mon.wait_migration()
            paused.append((time.perf_counter() - t0) * 1e3)
            mon.close()
        finally:
            _stop(q)
    out["savevm"] = {
        "paused_ms": median(paused),
        "file_bytes": state.stat().st_size,
        "status": st.get("status"),
        "runs": runs,
    }
    # loadvm: a new QEMU process loads the file; the state was saved stopped (as savevm does), so it
    # comes up paused and is continued over QMP as soon as the load completes (what libvirt does).
    # Time from process start to the first byte the resumed guest prints.
    firsts = []
    for i in range(max(3, runs // 2)):
        qmp_path = str(work / f"l{i}.qmp")

        def resume(qmp_path: str = qmp_path) -> None:
            with contextlib.suppress(Exception):
                mon = Qmp(qmp_path)
                mon.wait_migration()
                mon.cmd("cont")
                mon.close()

        t = threading.Thread(target=resume, daemon=True)
        t.start()
        firsts.append(
            _process_first_byte(
                [
                    QEMU,
                    "-enable-kvm",
                    "-m",
                    MEMORY,
                    "-M",
                    "microvm",
                    "-nodefaults",
                    "-no-user-config",
                    "-nographic",
                    "-serial",
                    "stdio",
                    "-device",
                    "isa-debug-exit,iobase=0xf4,iosize=0x04",
                    "-kernel",
                    str(counter),
                    "-append",
                    IDLE,
                    "-incoming",
                    f"exec:cat {state}",
                    "-qmp",
                    f"unix:{qmp_path},server,nowait",
                ]
            )
        )
        t.join(timeout=10)
    out["loadvm"] = {"process_to_first_byte_ms": median(firsts)}
    print(
        f"  qemu     savevm (migrate to file) paused {out['savevm']['paused_ms']:.1f} ms, "
        f"{out['savevm']['file_bytes'] >> 10} KiB; -incoming to first byte "
        f"{out['loadvm']['process_to_first_byte_ms']:.1f} ms",
        flush=True,
    )
    # live migration over loopback
    for label, cmdline in (("idle", IDLE), ("dirtying", DIRTYING), ("heavy", HEAVY)):
        sq, dq = str(work / f"ms-{label}.qmp"), str(work / f"md-{label}.qmp")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        src = _qemu(counter, cmdline, sq)
        dst = _qemu(counter, cmdline, dq, "-incoming", f"tcp:127.0.0.1:{port}")
        try:
            ms, md = Qmp(sq), Qmp(dq)
            _wait(lambda sq=sq: _printing(sq, 300))
            ms.cmd("migrate-set-parameters", **{"downtime-limit": int(DOWNTIME_MS)})
            t0 = time.perf_counter()
            ms.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            st = ms.wait_migration(timeout=15.0)
            wall = (time.perf_counter() - t0) * 1e3
            ram = st.get("ram", {})
            out[f"migrate_{label}"] = {
                "status": st.get("status"),
                "total_ms": st.get("total-time", wall),
                "downtime_ms": st.get("downtime"),
                "rounds": ram.get("dirty-sync-count"),
                "transferred_bytes": ram.get("transferred"),
            }
            ms.close()
            md.close()
        finally:
            _stop(src)
            _stop(dst)
        m = out[f"migrate_{label}"]
        print(
            f"  qemu     migrate {label:<9} {m['status']}: total {m['total_ms']} ms, downtime {m['downtime_ms']} ms, "
            f"{m['rounds']} dirty syncs",
            flush=True,
        )
    return out


# --- output ------------------------------------------------------------------------------------
def render(d: dict[str, Any]) -> str:
    plat = d["platform"]
    lines = [
        f"# Failover: snapshot, restore, clone, live migration\n\nPlatform: {plat.get('cpu_model')}, KVM "
        f"flavor **{plat.get('kvm_flavor')}**; {d['qemu']}. Guest: counter, {MEMORY}; medians.\n"
    ]
    s = d["snapshot"]
    rows = [
        [
            label,
            f"{v['paused_ms']:.2f}",
            f"{v['state_ms']:.2f}",
            f"{v['memory_ms']:.2f}",
            f"{v['state_bytes'] / 1024:.1f}",
            f"{v['memory_stored_bytes'] / 1024:.0f}",
            f"{v['on_disk_bytes'] / 1024:.0f}",
        ]
        for label, v in s.items()
    ]
    q = d.get("qemu_figures") or {}
    if "savevm" in q:
        rows.append(
            [
                "QEMU migrate-to-file (idle)",
                f"{q['savevm']['paused_ms']:.2f}",
                "-",
                "-",
                "-",
                "-",
                f"{q['savevm']['file_bytes'] / 1024:.0f}",
            ]
        )
    lines.append("## Snapshot (guest paused; virtkit API, warm process)\n")
    lines.append(
        md_table(
            [
                "guest",
                "paused (ms)",
                "of which state (ms)",
                "of which memory (ms)",
                "state file (KiB)",
                "memory stored (KiB)",
                "on disk (KiB)",
            ],
            rows,
        )
    )
    r = d["restore"]
    rows = [
        ["virtkit API: call -> vCPUs running", f"{r['api_to_running_ms']:.2f}"],
        ["virtkit API: call -> first guest byte", f"{r['api_to_first_byte_ms']:.2f}"],
        ["`virtkit restore`: process start -> first guest byte", f"{r['cli_to_first_byte_ms']:.1f}"],
    ]
    if "loadvm" in q:
        rows.append(
            [
                "QEMU `-incoming exec:cat`: process start -> first guest byte",
                f"{q['loadvm']['process_to_first_byte_ms']:.1f}",
            ]
        )
    lines.append("\n## Restore to running (64 MiB guest; memory file mapped copy-on-write)\n")
    lines.append(md_table(["path", "ms"], rows))
    c = d["clone"]
    lines.append(
        f"\n## Clone\n\n{c['count']} clones of one snapshot running in {c['start_s'] * 1e3:.1f} ms: "
        f"**{c['clones_per_s']:.0f} VMs/s** (all printing after {c['all_printing_s'] * 1e3:.1f} ms).\n"
    )
    rows = []
    for label, m in d["migration"].items():
        rows.append(
            [
                f"virtkit, {label}",
                str(m["rounds"]),
                f"{m['pages_sent']}",
                f"{m['total_ms']:.1f}",
                f"{m['downtime_ms']:.2f}",
                m.get("stop_reason", ""),
            ]
        )
        qm = q.get(f"migrate_{label}")
        if qm:
            rows.append(
                [
                    f"QEMU, {label}",
                    str(qm["rounds"]),
                    f"{(qm['transferred_bytes'] or 0) // 4096}",
                    f"{qm['total_ms']}",
                    f"{qm['downtime_ms']}",
                    qm["status"],
                ]
            )
    lines.append(f"\n## Live migration over loopback (downtime limit {DOWNTIME_MS:.0f} ms)\n")
    lines.append(md_table(["VMM, guest", "rounds", "pages sent", "total (ms)", "downtime (ms)", "ended by"], rows))
    lines.append(
        "\nGuests: idle `" + IDLE + "`; dirtying `" + DIRTYING + "`; heavy `" + HEAVY + "`. virtkit's "
        "downtime is source pause to the target's RUNNING reply; QEMU's is its own `query-migrate` figure.\n"
    )
    tight = d["migration"].get(TIGHT)
    if tight:
        lines.append(
            f"\nWith a {TIGHT.split(', ')[1]} the heavy guest never fits: pre-copy ran "
            f"{len(tight['dirty_per_round'])} rounds (dirty set at each check: {tight['dirty_seen']}) and "
            f"ended by *{tight['stop_reason']}*; downtime {tight['downtime_ms']:.1f} ms.\n"
        )
    t = d["targets"]
    lines.append("\n## Targets\n")
    lines.append(
        md_table(
            ["target", "goal", "measured"],
            [
                ["restore to running, 64 MiB (API)", "< 10 ms", f"{t['restore_ms']:.2f} ms"],
                ["migration downtime, loopback (idle)", "< 50 ms", f"{t['downtime_idle_ms']:.2f} ms"],
                ["migration downtime, loopback (dirtying)", "< 50 ms", f"{t['downtime_dirtying_ms']:.2f} ms"],
            ],
        )
    )
    return "\n".join(lines)


def plot(d: dict[str, Any]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    # Left: how long is the guest stopped, per failover operation, virtkit (green) next to QEMU
    # (grey), with the targets drawn. Right: does pre-copy converge (every series visible: each is
    # offset a little and has its own marker).
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.2), gridspec_kw={"width_ratios": [3, 2]})
    q = d.get("qemu_figures", {})
    bars: list[tuple[str, float | None, str]] = [
        ("snapshot pause, idle", d["snapshot"]["idle"]["paused_ms"], "virtkit"),
        ("snapshot pause, 32 MiB touched", d["snapshot"]["32 MiB touched"]["paused_ms"], "virtkit"),
        ("QEMU savevm pause, idle", q.get("savevm", {}).get("paused_ms"), "qemu"),
        ("restore to running (API)", d["restore"]["api_to_running_ms"], "virtkit"),
        ("restore, fresh process to first byte", d["restore"]["cli_to_first_byte_ms"], "virtkit"),
        ("QEMU -incoming, process to first byte", q.get("loadvm", {}).get("process_to_first_byte_ms"), "qemu"),
        (
            f"clone start, per clone ({d['clone']['count']} at once)",
            d["clone"]["start_s"] * 1e3 / d["clone"]["count"],
            "virtkit",
        ),
    ]
    for label, m in d["migration"].items():
        bars.append((f"migration downtime, {label}", m["downtime_ms"], "virtkit"))
    for label in ("idle", "dirtying", "heavy"):
        qm = q.get(f"migrate_{label}", {})
        if qm:
            bars.append((f"QEMU migration downtime, {label}", qm.get("downtime_ms"), "qemu"))
    shown = [(lab, v, who) for lab, v, who in bars if v is not None]
    ys = range(len(shown))
    ax1.barh(
        list(ys),
        [max(v, 0.01) for _, v, _ in shown],
        color=["#2a9d5c" if who == "virtkit" else "#8a8a8a" for _, _, who in shown],
    )
    for y, (_, v, _) in zip(ys, shown, strict=True):
        ax1.annotate(f"{v:.1f} ms", (max(v, 0.01) * 1.1, y), va="center", fontsize=7)
    missing = [lab for lab, v, _ in bars if v is None]
    ax1.set_yticks(list(ys), [lab for lab, _, _ in shown], fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xscale("log")
    ax1.axvline(10, color="black", linestyle=":", linewidth=1, label="target: restore < 10 ms")
    ax1.axvline(50, color="black", linestyle="--", linewidth=1, label="target: migration downtime < 50 ms")
    ax1.set_xlabel(
        "milliseconds the guest does not run (log)" + (f"; no figure: {', '.join(missing)}" if missing else "")
    )
    ax1.set_title("How long is the guest stopped? (green: virtkit, grey: QEMU)")
    ax1.legend(fontsize=8, loc="lower right")
    markers = "osD^v<>"
    for k, (label, m) in enumerate(d["migration"].items()):
        rounds = [*m["dirty_per_round"], m["final_pages"]]
        xs = [x + (k - 1.5) * 0.06 for x in range(len(rounds))]
        (line,) = ax2.plot(
            xs,
            rounds,
            marker=markers[k % len(markers)],
            linestyle="-" if k % 2 == 0 else "--",
            label=f"{label} ({m['stop_reason']}, downtime {m['downtime_ms']:.1f} ms)",
        )
        ax2.plot([xs[-1]], [rounds[-1]], marker="s", markersize=10, color=line.get_color(), fillstyle="none")
    ax2.set_yscale("symlog", linthresh=1)  # a round may find nothing dirty: 0 must be plottable
    ax2.set_ylim(bottom=0)
    ax2.xaxis.get_major_locator().set_params(integer=True)
    ax2.set_xlabel("pre-copy round (0: all non-zero RAM; hollow square: stop-and-copy)")
    ax2.set_ylabel("pages sent (4 KiB)")
    ax2.set_title(f"Does pre-copy converge? ({MEMORY} guest, {d['platform'].get('kvm_flavor')} KVM)")
    ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = ROOT / "bench" / "results" / "failover.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(quick: bool = False) -> dict[str, Any]:
    counter = ROOT / "build" / "guests" / "counter.elf"
    if not counter.exists():
        raise SystemExit(f"{counter} is missing: run `make guests`")
    runs = 3 if quick else 10
    work = Path(tempfile.mkdtemp(prefix="virtkit-bench-failover-"))
    try:
        print("failover: snapshot, restore, clone (virtkit API, warm process)", flush=True)
        snaps, snap_dir = measure_snapshot(counter, work, runs)
        restore = measure_restore(snap_dir, runs * 2)
        clone = measure_clone(snap_dir, 4 if quick else 16)
        print("live migration, two virtkit processes on loopback", flush=True)
        migration = {}
        for label, cmdline, budget in (
            ("idle", IDLE, DOWNTIME_MS),
            ("dirtying", DIRTYING, DOWNTIME_MS),
            ("heavy", HEAVY, DOWNTIME_MS),
            (TIGHT, HEAVY, 1.0),
        ):
            migration[label] = migrate_once(counter, cmdline, work, downtime_ms=budget)
            m = migration[label]
            print(
                f"  virtkit  migrate {label:<9} total {m['total_ms']:.1f} ms, downtime {m['downtime_ms']:.2f} ms, "
                f"rounds {m['dirty_per_round']} + {m['final_pages']} ({m['stop_reason']})",
                flush=True,
            )
        qemu: dict[str, Any] = {}
        if shutil.which(QEMU):
            try:
                qemu = measure_qemu(counter, work, runs if not quick else 2)
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as e:
                qemu = {"error": str(e)}
                print(f"  qemu: could not measure: {e}", flush=True)
        data = {
            "platform": platform_record(),
            "qemu": qemu_version(),
            "memory": MEMORY,
            "snapshot": snaps,
            "restore": restore,
            "clone": clone,
            "migration": migration,
            "qemu_figures": qemu,
            "targets": {
                "restore_ms": restore["api_to_running_ms"],
                "downtime_idle_ms": migration["idle"]["downtime_ms"],
                "downtime_dirtying_ms": migration["dirtying"]["downtime_ms"],
            },
        }
        md = render(data)
        jpath, mpath = write_results("failover", data, md)
        png = plot(data)
        print(md)
        print(f"wrote {jpath}, {mpath}" + (f", {png}" if png else ""))
        return data
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
