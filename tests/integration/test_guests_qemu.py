"""The guest kernels in guests/ under QEMU with KVM: QEMU is the reference VMM they must boot on.

Each test boots one guest with ``qemu-system-x86_64 -enable-kvm -M microvm -kernel`` (Multiboot,
ELF32) and checks its serial output and exit status. isa-debug-exit turns the guest's exit value v
into QEMU's status (v << 1) | 1; ``-no-reboot`` turns a triple fault or a reset into status 0.
Guests that never exit (spin, hltcli, badinsn on PVM) are checked while running, then killed.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from virtkit.kvm.flavor import kvm_flavor

pytestmark = [pytest.mark.qemu, pytest.mark.kvm, pytest.mark.usefixtures("kvm")]

DEBUG_EXIT = ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]


@dataclass(frozen=True, slots=True)
class Run:
    status: int | None  # None: still running when we stopped it
    stdout: str
    stderr: str


def qemu_cmd(
    qemu: str,
    kernel: Path,
    append: str = "",
    *,
    smp: int = 1,
    machine: str = "microvm",
    accel: str = "kvm",
    extra: tuple[str, ...] = (),
) -> list[str]:
    return [
        qemu,
        "-accel",
        accel,
        "-M",
        machine,
        "-smp",
        str(smp),
        "-m",
        "128M",
        "-no-reboot",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        *DEBUG_EXIT,
        *extra,
        "-kernel",
        str(kernel),
        "-append",
        append,
    ]


def boot(qemu: str, kernel: Path, append: str = "", *, timeout: float = 10.0, **kw: Any) -> Run:
    """Boot and wait for QEMU to exit."""
    p = subprocess.run(
        qemu_cmd(qemu, kernel, append, **kw), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    return Run(p.returncode, p.stdout.replace("\r\n", "\n"), p.stderr)


def boot_and_watch(
    qemu: str, kernel: Path, append: str = "", *, until: str, hold: float = 0.3, timeout: float = 10.0, **kw: Any
) -> Run:
    """Boot, wait until ``until`` appears on stdout or stderr, watch ``hold`` more seconds, kill."""
    p = subprocess.Popen(
        qemu_cmd(qemu, kernel, append, **kw), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    assert p.stdout is not None and p.stderr is not None
    fd_out, fd_err = p.stdout.fileno(), p.stderr.fileno()
    out = {fd_out: bytearray(), fd_err: bytearray()}
    deadline, seen_at = time.monotonic() + timeout, None
    try:
        while p.poll() is None:
            now = time.monotonic()
            if seen_at is None and any(until.encode() in b for b in out.values()):
                seen_at = now
            if (seen_at is not None and now - seen_at >= hold) or now > deadline:
                break
            ready, _, _ = select.select(list(out), [], [], 0.05)
            for fd in ready:
                out[fd] += os.read(fd, 65536)
        status = p.poll()
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
        for fd in out:
            while chunk := os.read(fd, 65536):
                out[fd] += chunk
        p.stdout.close()
        p.stderr.close()
    stdout, stderr = (bytes(out[fd]).decode(errors="replace") for fd in (fd_out, fd_err))
    return Run(status, stdout.replace("\r\n", "\n"), stderr)


def status(value: int) -> int:
    """QEMU's exit status for a debug-exit value."""
    return (value << 1) | 1


# --- hello ---------------------------------------------------------------------------------------


def test_hello_prints_and_exits_0(qemu: str, guests: Path) -> None:
    r = boot(qemu, guests / "hello.elf", "greeting=yes")
    assert r.status == status(0), r
    assert "hello from virtkit guest\n" in r.stdout
    # QEMU passes "<kernel path> <append>" as the Multiboot command line
    assert re.search(r"^cmdline: \S*hello\.elf greeting=yes$", r.stdout, re.M), r.stdout


def test_hello_exit_value_from_cmdline(qemu: str, guests: Path) -> None:
    assert boot(qemu, guests / "hello.elf", "exit=3").status == status(3)


def test_hello_is_architecturally_clean_under_tcg(qemu: str, guests: Path) -> None:
    # software emulation: no PVM quirks, so what the guest relies on is plain x86
    r = boot(qemu, guests / "hello.elf", "exit=5", accel="tcg")
    assert r.status == status(5) and "hello from virtkit guest" in r.stdout


def test_direct64_images_are_elf64_without_multiboot_header(guests: Path) -> None:
    for name in ("hello64.elf", "trapcost64.elf"):
        data = (guests / name).read_bytes()
        assert data[:5] == b"\x7fELF\x02", name  # ELFCLASS64
        assert b"\x02\xb0\xad\x1b" not in data[:8192], name  # so virtkit's "auto" picks direct64
    assert (guests / "hello.elf").read_bytes()[:5] == b"\x7fELF\x01"  # Multiboot: ELFCLASS32


# --- trapcost ------------------------------------------------------------------------------------

PHASE = re.compile(r"^trapcost phase=(\w+) cpl=([03]) n=(\d+) tsc=(\d+)$", re.M)


def test_trapcost_reports_every_phase(qemu: str, guests: Path) -> None:
    r = boot(qemu, guests / "trapcost.elf", "n=300 loop=100000 pages=64 ticks=10")
    assert r.status == status(0), r
    got = {(phase, int(cpl)): (int(n), int(tsc)) for phase, cpl, n, tsc in PHASE.findall(r.stdout)}
    assert set(got) == {
        ("pio", 3),
        ("pio", 0),
        ("mmio", 3),
        ("mmio", 0),
        ("cpu", 3),
        ("cpu", 0),
        ("pages", 3),
        ("kcall", 3),
        ("timer", 0),
    }, r.stdout
    assert got["pio", 3][0] == 300 and got["pio", 0][0] == 3
    assert got["cpu", 3][0] == 100000 and got["cpu", 0][0] == 100
    assert got["pages", 3][0] == 64 and got["timer", 0][0] == 10
    assert all(tsc > 0 for _, tsc in got.values())
    # 10 ticks of a 1000 Hz PIT take at least 9 ms: at any TSC rate above 0.5 GHz, 4.5M cycles
    assert got["timer", 0][1] > 4_500_000
    assert r.stdout.rstrip().endswith("trapcost done")


def test_trapcost_phase_selection(qemu: str, guests: Path) -> None:
    r = boot(qemu, guests / "trapcost.elf", "phases=cpu loop=1000")
    assert r.status == status(0)
    assert {p for p, _, _, _ in PHASE.findall(r.stdout)} == {"cpu"}


# --- smp -----------------------------------------------------------------------------------------


def test_smp_pingpong_on_two_vcpus(qemu: str, guests: Path) -> None:
    r = boot(qemu, guests / "smp.elf", "rounds=20000", smp=2, timeout=20)
    assert r.status == status(0), r
    lines = r.stdout.splitlines()
    assert "smp: cpu1 online" in lines
    assert "smp: pingpong rounds=20000 ok" in lines
    assert "smp: 2 cpus" in lines


def test_smp_reports_a_missing_ap(qemu: str, guests: Path) -> None:
    r = boot(qemu, guests / "smp.elf", "wait_ms=100", smp=1)
    assert r.status == status(3)
    assert "smp: cpu1 did not start" in r.stdout


# --- failure cases -------------------------------------------------------------------------------


@pytest.mark.parametrize("cpl", [0, 3])
def test_triplefault_shuts_down(qemu: str, guests: Path, cpl: int) -> None:
    r = boot(qemu, guests / "triplefault.elf", f"cpl={cpl}")
    assert r.status == 0, r  # -no-reboot: the shutdown ends QEMU with status 0
    assert "triplefault: loading a zero-limit IDT" in r.stdout
    assert "still running" not in r.stdout


def test_reset_through_i8042(qemu: str, guests: Path) -> None:
    r = boot(qemu, guests / "reset.elf", extra=("-device", "i8042"))
    assert r.status == 0, r  # -no-reboot: the reset ends QEMU
    assert "reset: writing 0xfe" in r.stdout and "still running" not in r.stdout


def test_reset_without_i8042_says_so(qemu: str, guests: Path) -> None:
    r = boot(qemu, guests / "reset.elf")  # microvm has no keyboard controller by default
    assert r.status == status(4)
    assert "reset: still running" in r.stdout


def test_hammer_survives_unknown_ports_and_mmio(qemu: str, guests: Path) -> None:
    r = boot(qemu, guests / "hammer.elf", "n=2000")
    assert r.status == status(0), r
    assert "hammer: done n=2000" in r.stdout


@pytest.mark.parametrize("cpl", [0, 3])
def test_spin_keeps_running(qemu: str, guests: Path, cpl: int) -> None:
    r = boot_and_watch(qemu, guests / "spin.elf", f"cpl={cpl}", until=f"looping forever at CPL{cpl}")
    assert r.status is None, r


def test_hltcli_halts_for_good(qemu: str, guests: Path) -> None:
    r = boot_and_watch(qemu, guests / "hltcli.elf", until="hltcli: halting")
    assert r.status is None, r


def test_badinsn_is_rejected(qemu: str, guests: Path) -> None:
    # PVM: the CPL0 emulator fails on lock cmpxchg16b and QEMU stops the VM with a KVM internal
    # error (and hangs); VT-x/AMD-V: it succeeds (CX16) or raises #UD, a triple fault with this IDT
    r = boot_and_watch(qemu, guests / "badinsn.elf", until="emulation failure", hold=0)
    assert "badinsn: executing lock cmpxchg16b" in r.stdout
    if kvm_flavor() == "pvm":
        assert "not rejected" not in r.stdout
    assert r.status == 0 or "emulation failure" in r.stderr, r


def test_sysret_experiment(qemu: str, guests: Path) -> None:
    r = boot(qemu, guests / "sysret.elf")
    assert "sysret: step 1:" in r.stdout
    assert "sysret: step 3: SYSRETQ from CPL0 returned to CPL3" in r.stdout, r.stdout
    if "step 2: SYSCALL reached LSTAR at CPL0" in r.stdout:  # hardware virtualization, TCG
        assert r.status == status(0) and "sysret: step 4: SYSCALL/SYSRETQ round trip" in r.stdout
    else:  # PVM: SYSCALL stays at CPL3, so the handler's SYSRETQ faults there
        assert "step 2: SYSCALL reached LSTAR but at CPL3" in r.stdout
        assert r.status == status(5) and "executed at CPL3" in r.stdout
