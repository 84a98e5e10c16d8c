"""``virtkit demo``: boot the shipped guests and show, in a few seconds, what happened.

Each step is one guest and one point of the seed's story: an unmodified kernel booting on
emulated PC hardware, every privileged operation trapping to the VMM, two vCPUs running at
once, and a hostile or broken guest ending with a report instead of taking the VMM down.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from virtkit.api import VM, RunResult
from virtkit.doctor import FLAVOR_MEANING
from virtkit.guests import guests_dir
from virtkit.kvm.flavor import kvm_flavor


@dataclass
class Step:
    title: str
    guest: str
    kwargs: dict[str, object]
    explain: Callable[[RunResult], str]


def _first_line(r: RunResult, prefix: str = "") -> str:
    for line in r.serial_output.splitlines():
        if line.startswith(prefix):
            return line.strip()
    return ""


def _phase_ns(r: RunResult, phase: str, cpl: int) -> float | None:
    """Nanoseconds per operation of a trap-cost phase, from the guest's own TSC count."""
    for line in r.serial_output.splitlines():
        if f"phase={phase}" in line and f"cpl={cpl}" in line:
            fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
            try:
                n, tsc = int(fields["n"]), int(fields["tsc"])
            except (KeyError, ValueError):
                return None
            return tsc / (r.stats.tsc_khz / 1e6) / n if r.stats.tsc_khz and n else None
    return None


def _trapcost(r: RunResult) -> str:
    pio, mmio = _phase_ns(r, "pio", 3), _phase_ns(r, "mmio", 3)
    cpu3, cpu0 = _phase_ns(r, "cpu", 3), _phase_ns(r, "cpu", 0)
    parts = []
    if pio and mmio:
        parts.append(f"one port-I/O exit {pio / 1e3:.1f} us, one MMIO exit {mmio / 1e3:.1f} us")
    if cpu3 and cpu0:
        parts.append(f"loop iteration {cpu3:.2f} ns at CPL3 vs {cpu0:,.0f} ns at CPL0 ({cpu0 / cpu3:,.0f}x)")
    return "; ".join(parts) or "phases not reported"


STEPS = [
    Step(
        "Unmodified kernel, Multiboot, emulated 16550A UART",
        "hello.elf",
        {"cmdline": "demo"},
        lambda r: _first_line(r, "hello"),
    ),
    Step(
        "Same guest entered directly in 64-bit mode",
        "hello64.elf",
        {"boot": "direct64"},
        lambda r: _first_line(r, "hello"),
    ),
    Step(
        "Trap-and-emulate: every port/MMIO access exits to the VMM",
        "trapcost.elf",
        {"cmdline": "n=20000 phases=pio,mmio,cpu loop=10000000"},
        _trapcost,
    ),
    Step(
        "Two vCPUs inside the guest at the same moment",
        "smp.elf",
        {"vcpus": 2, "cmdline": "rounds=100000"},
        lambda r: _first_line(r, "smp: pingpong"),
    ),
    Step("A guest that triple-faults", "triplefault.elf", {}, lambda r: r.detail.splitlines()[0] if r.detail else ""),
    Step(
        "An instruction the CPU emulator cannot run",
        "badinsn.elf",
        {},
        lambda r: " ".join(r.detail.splitlines()[:2]).replace("  ", " ") if r.detail else "",
    ),
]


def run_demo(guests_dir_override: str | None = None) -> int:
    console = Console()
    gdir = guests_dir(guests_dir_override)
    flavor = kvm_flavor()
    console.print(f"[bold]virtkit demo[/bold]: KVM flavor [cyan]{flavor}[/cyan]: {FLAVOR_MEANING[flavor]}")
    failures = _vmm_section(console, gdir)
    failures += _paravirt_section(console, gdir)
    failures += _container_section(console)
    failures += _service_section(console, gdir)
    failures += _failover_section(console, gdir)
    return 1 if failures else 0


def _counts(text: str) -> list[int]:
    """The numbers of the counter guest's complete ``count N`` lines (a last line without its
    newline may be cut short, so it does not count)."""
    lines = text.split("\n")[:-1]
    out = []
    for line in lines:
        fields = line.split()
        if len(fields) == 2 and fields[0] == "count" and fields[1].isdigit():
            out.append(int(fields[1]))
    return out


def _continuous(before: str, after: str) -> tuple[bool, int, int, int]:
    """Whether the counter went on without a gap or a repeat across a pause, however the pause cut
    a line in two: the output before it and after it, joined, must count up by one. Returns that,
    the last count before, and the first and last after."""
    joined = _counts(before + after)
    ok = bool(joined) and joined == list(range(joined[0], joined[0] + len(joined)))
    b = _counts(before)
    last = b[-1] if b else -1
    rest = [n for n in joined if n > last]
    return ok and bool(rest), last, rest[0] if rest else -1, rest[-1] if rest else -1


def _failover_section(console: Console, gdir: Path) -> int:
    """Snapshot and restore through the API; a live migration between two virtkit processes."""
    from virtkit import snapshot

    console.rule("[bold]5. Failover: snapshot, restore and live migration")
    failures = 0
    with tempfile.TemporaryDirectory(prefix="virtkit-demo-fo-") as tmp:
        snap = os.path.join(tmp, "snap")
        with VM(gdir / "counter.elf", cmdline="us=2000") as vm:
            vm.start()
            time.sleep(0.3)
            info = snapshot.save(vm, snap, resume=False)  # stays paused: its output ends at the snapshot
            before = vm.console.output.decode(errors="replace")
            vm.stop()
        t0 = time.perf_counter()
        with snapshot.restore(snap) as restored:
            ready = time.perf_counter()
            time.sleep(0.2)
            restored.stop()
            after = restored.console.output.decode(errors="replace")
        console.print(
            f"snapshot of a running 64 MiB guest: paused {info.paused_ns / 1e6:.1f} ms, state "
            f"{info.state_bytes / 1024:.0f} KiB, {info.memory_written / (1 << 20):.1f} MiB of RAM stored"
        )
        continued, last, first, end = _continuous(before, after)
        console.print(
            f"restore to running: {(ready - t0) * 1e3:.1f} ms; the original had printed up to count "
            f"{last}, the restored guest went on with {first}..{end}: "
            + ("no line lost or repeated" if continued else "[red]a gap")
        )
        failures += not continued

        # live migration between two processes, driven with the CLI as a user would: a shared key,
        # a receiver built with the VM's shape (the default 64M, 1 vCPU) that confines itself
        port_file, src_log, dst_log = (os.path.join(tmp, n) for n in ("port", "src.log", "dst.log"))
        control, key = os.path.join(tmp, "control.sock"), os.path.join(tmp, "migration.key")
        vk = [sys.executable, "-m", "virtkit"]
        subprocess.run([*vk, "migrate-keygen", key], check=True, stdout=subprocess.DEVNULL)
        target = subprocess.Popen(
            [
                *vk,
                "migrate-receive",
                "--listen",
                "127.0.0.1:0",
                "--port-file",
                port_file,
                "--key-file",
                key,
                "--serial",
                dst_log,
                "--timeout",
                "2",
                "--accept-timeout",
                "30",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        source = subprocess.Popen(
            [
                *vk,
                "run",
                str(gdir / "counter.elf"),
                "--cmdline",
                "us=2000 dirty=8",
                "--control",
                control,
                "--serial",
                src_log,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 20
            while not (os.path.exists(control) and os.path.exists(port_file) and os.path.getsize(port_file)):
                if time.monotonic() > deadline:
                    raise RuntimeError("source or target did not come up")
                time.sleep(0.05)
            time.sleep(0.3)
            port = Path(port_file).read_text().strip()
            p = _sh(console, ["migrate", "--control", control, "--to", f"127.0.0.1:{port}", "--key-file", key])
            failures += p.returncode != 0
            source.wait(20)
            target.wait(30)
            gap_free, last, first, end = _continuous(Path(src_log).read_text(), Path(dst_log).read_text())
            console.print(
                f"source printed count 0..{last} and exited {source.returncode}; the target went on "
                f"from {first} to {end}: " + ("no line lost or repeated" if gap_free else "[red]a gap")
            )
            failures += not gap_free
        except Exception as e:
            console.print(f"[red]migration demo failed: {e}")
            failures += 1
        finally:
            for proc in (source, target):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return failures


def _sh(
    console: Console,
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    show: str | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run a virtkit command the way a user would, and show the command and what it printed."""
    cmd = [sys.executable, "-m", "virtkit", *args]
    console.print(f"[bold cyan]$ {show or 'virtkit ' + ' '.join(shlex.quote(a) for a in args)}")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    text = (p.stdout + p.stderr).rstrip()
    if text:
        console.print(text, markup=False, highlight=False)
    return p


CONTAINER_SCRIPT = (
    "echo hello from $(hostname), PID $$; "
    "m=/sys/fs/cgroup/memory/memory.limit_in_bytes; [ -r $m ] || m=/sys/fs/cgroup/memory.max; "
    "q=/sys/fs/cgroup/cpu/cpu.cfs_quota_us; [ -r $q ] || q=/sys/fs/cgroup/cpu.max; "
    "p=/sys/fs/cgroup/pids/pids.max; [ -r $p ] || p=/sys/fs/cgroup/pids.max; "
    "echo memory limit $(cat $m), cpu quota $(cat $q), pids max $(cat $p); "
    "echo processes visible: $(ps -o pid= | wc -l); "
    "unshare -U true 2>/dev/null && echo unshare allowed || echo unshare denied by seccomp"
)


def _container_section(console: Console) -> int:
    console.rule("[bold]3. Containers: the host kernel shared, limits and isolation applied")
    p = _sh(
        console,
        [
            "run",
            "--mode",
            "container",
            "busybox",
            "--memory",
            "64M",
            "--cpus",
            "0.5",
            "--pids-limit",
            "50",
            "--",
            "sh",
            "-c",
            CONTAINER_SCRIPT,
        ],
        show="virtkit run --mode container busybox --memory 64M --cpus 0.5 --pids-limit 50 -- sh -c "
        "'<print hostname and PID, the cgroup limits, the visible processes; try unshare>'",
    )
    console.print(
        "The container saw its own hostname and PID 1, the cgroup limits it was given, and the "
        "default seccomp profile; `make bench` compares its start-up with crun and runc."
    )
    return 0 if p.returncode == 0 else 1


def _service_section(console: Console, gdir: Path) -> int:
    """virtkitd with several VMs under different CPU shares, each in its own confined VMM."""
    console.rule("[bold]4. The hypervisor as a service: several isolated VMs sharing one host")
    with tempfile.TemporaryDirectory(prefix="virtkit-demo-svc-") as tmp:
        sock = os.path.join(tmp, "run", "api.sock")
        env = dict(os.environ, VIRTKITD_SOCKET=sock)
        log = open(os.path.join(tmp, "virtkitd.log"), "wb")  # noqa: SIM115 - closed below
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "virtkit.service",
                "--state-dir",
                os.path.join(tmp, "state"),
                "--run-dir",
                os.path.join(tmp, "run"),
                "--cgroup-parent",
                f"virtkit-demo-{os.getpid()}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        failures = 0
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(sock):
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("virtkitd did not start: see its log")
                time.sleep(0.05)
            spin, counter = str(gdir / "spin.elf"), str(gdir / "counter.elf")
            steps = [
                [
                    "vm",
                    "create",
                    "heavy",
                    "--kernel",
                    spin,
                    "--cmdline",
                    "cpl=3",
                    "--cpu-weight",
                    "300",
                    "--cpus",
                    "0",
                    "--start",
                ],
                [
                    "vm",
                    "create",
                    "light",
                    "--kernel",
                    spin,
                    "--cmdline",
                    "cpl=3",
                    "--cpu-weight",
                    "100",
                    "--cpus",
                    "0",
                    "--start",
                ],
                ["vm", "create", "capped", "--kernel", counter, "--cpu-quota", "20", "--start"],
            ]
            for args in steps:
                failures += _sh(console, args, env=env).returncode != 0
            time.sleep(3)  # let the CPU-bound guests compete for CPU 0 for a while
            for args in (["vm", "list"], ["host"], ["vm", "stats", "heavy"], ["vm", "stats", "light"]):
                failures += _sh(console, args, env=env).returncode != 0
            for name in ("heavy", "light", "capped"):
                _sh(console, ["vm", "delete", "--force", name], env=env)
        except Exception as e:  # the demo reports and goes on to clean up
            console.print(f"[red]service demo failed: {e}")
            failures += 1
        finally:
            daemon.terminate()
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
            log.close()
            from virtkit.service.cgroups import remove_parent

            remove_parent(f"virtkit-demo-{os.getpid()}")  # the demo made it; the service keeps it
    console.print(
        "heavy and light share CPU 0 at 3:1 weights; capped is held to 20% of a CPU; each VM runs in "
        "its own jailed VMM process (docs/SECURITY.md)."
    )
    return failures


def _vmm_section(console: Console, gdir: Path) -> int:
    console.rule("[bold]1. A hypervisor running unmodified guests (full virtualization)")
    table = Table(show_lines=False)
    for col in ("guest", "what it shows", "ended", "exits", "time", "what the guest said / the VMM saw"):
        table.add_column(col, overflow="fold")
    failures = 0
    for step in STEPS:
        with VM(gdir / step.guest, **step.kwargs) as vm:  # type: ignore[arg-type]
            r = vm.run(timeout=60)
        ended = r.reason.value + ("" if r.reason.value != "debug-exit" else f" ({r.exit_code})")
        style = "red" if r.crashed else "green"
        table.add_row(
            step.guest,
            step.title,
            f"[{style}]{ended}[/{style}]",
            f"{r.stats.total_exits:,}",
            f"{r.stats.wall_s * 1e3:,.0f} ms",
            step.explain(r),
        )
        if r.reason.value in ("timeout", "error"):
            failures += 1
    console.print(table)
    console.print("Crashes above are the point: the guest died, the VMM reported it and carried on.")
    return failures


def _work(r: RunResult) -> dict[str, str]:
    for line in r.serial_output.splitlines():
        if line.startswith("work="):
            return dict(f.split("=", 1) for f in line.split() if "=" in f) | {"_ok": str("MISMATCH" not in line)}
    return {}


CONSOLE_LINE = b"virtkit console workload 0123456789 abcdefghijklmnopqrstuvwxyz.\n"


def _data_check(title: str, w: dict[str, str], r: RunResult) -> str:
    if title.startswith("disk"):
        return "read back = written" if w.get("rsum") == w.get("wsum") and w["_ok"] == "True" else "[red]MISMATCH"
    if title.startswith("console"):
        n = int(w.get("bytes", 0))
        sent = (CONSOLE_LINE * (n // len(CONSOLE_LINE) + 1))[:n]
        return "host received every byte" if sent in r.serial_bytes else "[red]bytes lost"
    return "-"


def _paravirt_section(console: Console, gdir: Path) -> int:
    """The same workloads as an unmodified guest on emulated hardware and as a paravirtualized
    guest (virtio and hypercalls): small sizes, so it takes seconds (`make bench` does it in full)."""
    console.rule("[bold]2. Full virtualization vs paravirtualization, same work")
    plans = [
        ("console 8 KiB", "work=console bytes=8192", "work=console bytes=8192", 8192),
        ("disk write+read", "work=disk sectors=16", "work=disk sectors=2048", None),
        ("2,000 null ops", "work=null n=2000", "work=null n=2000", None),
        ("CPU loop 50M", "work=cpu loop=50000000", "work=cpu loop=50000000", None),
    ]
    table = Table()
    for col in ("workload", "how", "time", "throughput", "VM exits", "data"):
        table.add_column(col)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="virtkit-demo-") as tmp:
        img = os.path.join(tmp, "disk.img")
        with open(img, "wb") as f:
            f.truncate(2 << 20)
        for title, full_cmd, para_cmd, _ in plans:
            runs = [("full: emulated UART/ATA/port", "fullwork.elf", "full", full_cmd)]
            vias = ("virtio", "hcall") if not title.startswith("CPU") else ("",)
            runs += [
                (f"para: {via or 'same loop'}", "parawork.elf", "para", f"{para_cmd} via={via}" if via else para_cmd)
                for via in vias
            ]
            for how, guest, mode, cmdline in runs:
                with VM(gdir / guest, mode=mode, cmdline=cmdline, disks=[img], memory="128M") as vm:
                    r = vm.run(timeout=120)
                w = _work(r)
                if r.exit_code != 1 or not w:
                    failures += 1
                    table.add_row(title, how, "-", "-", "-", f"[red]{r.reason.value}: {r.detail[:60]}")
                    continue
                secs = int(w["tsc"]) / (r.stats.tsc_khz * 1e3) if r.stats.tsc_khz else 0.0
                nbytes = int(w.get("bytes", 0))
                rate = f"{nbytes / secs / (1 << 20):,.2f} MB/s" if nbytes and secs else "-"
                data = _data_check(title, w, r)
                table.add_row(title, how, f"{secs * 1e3:,.1f} ms", rate, f"{r.stats.total_exits:,}", data)
    console.print(table)
    console.print(
        "Paravirtualized I/O moves kilobytes per VM exit where emulated hardware needs one exit per "
        "byte or word; `make bench` measures the full sizes next to native."
    )
    return failures
