"""Paravirtualization end to end on real KVM: what CPUID tells each kind of guest, and the same
data crossing emulated hardware and paravirtual paths intact (checked by the guest and, from the
disk image and the console output, by the host)."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from virtkit import VM
from virtkit.stop import StopReason

pytestmark = pytest.mark.usefixtures("kvm", "no_leaks")

MASK = (1 << 64) - 1
CONSOLE_LINE = b"virtkit console workload 0123456789 abcdefghijklmnopqrstuvwxyz.\n"


def fnv1a_bytes(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & MASK
    return h


def disk_pattern(sector: int) -> bytes:
    """Sector contents the workload guests write (docs/GUESTS.md, 'Data and checksums')."""
    x = ((sector + 1) * 0x9E3779B97F4A7C15) & MASK
    words = []
    for _ in range(64):
        x = (x * 6364136223846793005 + 1442695040888963407) & MASK
        words.append(x ^ (x >> 31))
    return struct.pack("<64Q", *words)


def work_line(output: str) -> dict[str, str]:
    line = next(line for line in output.splitlines() if line.startswith("work="))
    return dict(f.split("=", 1) for f in line.split() if "=" in f) | {"_raw": line}


def run(kernel: Path, **kw: object) -> object:
    with VM(kernel, memory="128M", **kw) as vm:  # type: ignore[arg-type]
        return vm.run(timeout=120)


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("full", "cpuid hypervisor_bit=0 leaf40000000=none"),
        ("para", "cpuid hypervisor_bit=1 leaf40000000=virtkitvirtk max=0x40000001 features=0x3"),
    ],
)
def test_cpuid_hides_or_announces_the_hypervisor(guests: Path, mode: str, expected: str) -> None:
    r = run(guests / "cpuid.elf", mode=mode)
    assert r.exit_code == 1
    assert expected in r.serial_output, r.serial_output


@pytest.mark.parametrize("how", ["full", "virtio", "hcall"])
def test_disk_data_survives_the_round_trip(guests: Path, tmp_path: Path, how: str) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    sectors = 32 if how == "full" else 1024  # the emulated path costs one exit per word written
    if how == "full":
        r = run(guests / "fullwork.elf", cmdline=f"work=disk sectors={sectors}", disks=[str(img)])
    else:
        r = run(
            guests / "parawork.elf", mode="para", cmdline=f"work=disk sectors={sectors} via={how}", disks=[str(img)]
        )
    f = work_line(r.serial_output)
    assert r.exit_code == 1 and f["_raw"].endswith(" ok"), r.serial_output[-500:]
    assert f["wsum"] == f["rsum"]
    data = img.read_bytes()
    for s in (0, 1, sectors // 2, sectors - 1):  # the host reads the image the guest wrote
        assert data[s * 512 : (s + 1) * 512] == disk_pattern(s), f"sector {s}"
    assert data[sectors * 512 : (sectors + 1) * 512] == bytes(512)  # nothing written past the end


@pytest.mark.parametrize("how", ["full", "virtio", "hcall"])
def test_console_bytes_arrive_exactly(guests: Path, how: str) -> None:
    n = 4096 if how == "full" else 65536
    if how == "full":
        r = run(guests / "fullwork.elf", cmdline=f"work=console bytes={n}")
    else:
        r = run(guests / "parawork.elf", mode="para", cmdline=f"work=console bytes={n} via={how}")
    expected = (CONSOLE_LINE * (n // len(CONSOLE_LINE) + 1))[:n]
    assert expected in r.serial_bytes
    f = work_line(r.serial_output)
    assert int(f["wsum"], 16) == fnv1a_bytes(expected)


def test_para_console_costs_far_fewer_exits_than_the_uart(guests: Path) -> None:
    full = run(guests / "fullwork.elf", cmdline="work=console bytes=16384")
    para = run(guests / "parawork.elf", mode="para", cmdline="work=console bytes=16384 via=virtio")
    # one exit per byte (plus LSR polls) against a handful of notifications: counts, not times;
    # both guests also print their banner and result lines over the UART
    assert full.stats.total_exits > 16384
    assert para.stats.total_exits < full.stats.total_exits / 10


def test_power_off_hypercall_sets_the_exit_status(guests: Path) -> None:
    r = run(guests / "parawork.elf", mode="para", cmdline="work=null n=10 exit=hcall")
    assert r.reason is StopReason.POWER_OFF and r.exit_code == 0


def test_read_only_disk_refuses_guest_writes(guests: Path, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    for via in ("virtio", "hcall"):
        r = run(guests / "parawork.elf", mode="para", cmdline=f"work=disk sectors=8 via={via}", disks=[f"{img},ro"])
        assert r.exit_code == 3, r.serial_output  # the guest saw its write fail and said so
        assert "error=" in work_line(r.serial_output)["_raw"]
    assert img.read_bytes() == bytes(1 << 20)


def test_sparse_image_stays_sparse(guests: Path, tmp_path: Path) -> None:
    img = tmp_path / "sparse.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    r = run(guests / "parawork.elf", mode="para", cmdline="work=disk sectors=2048 via=virtio", disks=[str(img)])
    assert r.exit_code == 1
    allocated = img.stat().st_blocks * 512
    assert allocated <= 2 << 20, f"{allocated} bytes allocated for 1 MiB written to a 64 MiB image"


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--disk", "/nonexistent.img"], "does not exist"),
        (["--disk", "{odd}"], "not a multiple of 512"),
        (["--mode", "paravirt"], "invalid choice: 'paravirt'"),
    ],
)
def test_bad_disk_and_mode_input(guests: Path, tmp_path: Path, args: list[str], fragment: str) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    args = [a.replace("{odd}", str(odd)) for a in args]
    p = subprocess.run(
        [sys.executable, "-m", "virtkit", "run", str(guests / "parawork.elf"), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], p.stderr
