"""The workload guests (fullwork, parawork, cpuid) under QEMU with KVM, the reference VMM.

fullwork drives an ATA disk in PIO mode (QEMU microvm with ``-device isa-ide``), the COM1 UART
and port 0x80; parawork drives virtio-blk and virtio-console over virtio-mmio version 2 with its
own drivers (QEMU microvm's transports, named on the command line as ``virtio_mmio.device=``).
Both write a deterministic pattern; the checks recompute it here, independently of the guests, and
compare it with what the guest printed and with what really reached the disk image or the
console. Sizes are small: on a PVM host every word of a ``rep outsw``/``rep insw`` is an exit of
tens of microseconds. No wall-clock time is asserted.
"""

from __future__ import annotations

import re
import struct
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.kvm, pytest.mark.usefixtures("kvm")]

MASK = (1 << 64) - 1
FNV_BASIS, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3
CONSOLE_LINE = b"virtkit console workload 0123456789 abcdefghijklmnopqrstuvwxyz.\n"
LBA28_LIMIT = 1 << 28
VIRTIO_BASE_ARGS = ("-global", "virtio-mmio.force-legacy=false")

RESULT = re.compile(r"^work=(\w+) mode=(full|para)((?: \w+=\S+)*)(?: (ok|MISMATCH))?$", re.M)


# --- the guests' data, recomputed ----------------------------------------------------------------


def sector_pattern(s: int) -> bytes:
    """Sector s as both guests write it (guests/lib/work.h): an LCG keyed by the sector number."""
    x = ((s + 1) * 0x9E3779B97F4A7C15) & MASK
    words = []
    for _ in range(64):
        x = (x * 6364136223846793005 + 1442695040888963407) & MASK
        words.append(x ^ (x >> 31))
    return struct.pack("<64Q", *words)


def disk_checksum(first: int, count: int) -> int:
    """FNV-1a over the 64-bit little-endian words of the sectors, in order."""
    h = FNV_BASIS
    for s in range(first, first + count):
        for (w,) in struct.iter_unpack("<Q", sector_pattern(s)):
            h = ((h ^ w) * FNV_PRIME) & MASK
    return h


def console_stream(n: int) -> bytes:
    return (CONSOLE_LINE * (n // len(CONSOLE_LINE) + 1))[:n]


def fnv1a(data: bytes) -> int:
    h = FNV_BASIS
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & MASK
    return h


def check_disk_image(image: Path, first: int, count: int) -> None:
    with image.open("rb") as f:
        f.seek(first * 512)
        data = f.read(count * 512)
    for i in range(count):
        assert data[i * 512 : (i + 1) * 512] == sector_pattern(first + i), f"sector {first + i} on the image"


# --- running QEMU --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    status: int
    stdout: str
    stderr: str

    def results(self) -> dict[str, dict[str, str]]:
        """The machine-parseable lines, by workload: their key=value fields, plus "verdict"."""
        out = {}
        for work, mode, fields, verdict in RESULT.findall(self.stdout):
            d = dict(f.split("=", 1) for f in fields.split())
            d["mode"] = mode
            if verdict:
                d["verdict"] = verdict
            out[work] = d
        return out


def status(value: int) -> int:
    """QEMU's exit status for a debug-exit value v: (v << 1) | 1."""
    return (value << 1) | 1


def qemu_base(qemu: str) -> list[str]:
    return [
        qemu,
        "-accel",
        "kvm",
        "-M",
        "microvm",
        "-m",
        "128M",
        "-no-reboot",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]


def boot(qemu: str, kernel: Path, append: str, devices: tuple[str, ...] = (), *, timeout: float = 30.0) -> Run:
    cmd = [*qemu_base(qemu), "-serial", "stdio", *devices, "-kernel", str(kernel), "-append", append]
    p = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    stdout = p.stdout.decode(errors="replace").replace("\r\n", "\n")
    return Run(p.returncode, stdout, p.stderr.decode(errors="replace"))


def ide_disk(image: Path) -> tuple[str, ...]:
    """An ATA disk as the master of an ISA IDE channel at 0x1F0/0x3F6, IRQ 14."""
    return (
        "-device",
        "isa-ide,id=ide0",
        "-drive",
        f"id=hd,file={image},format=raw,if=none",
        "-device",
        "ide-hd,drive=hd,bus=ide0.0",
    )


def virtio_blk(image: Path) -> tuple[str, ...]:
    return ("-drive", f"id=vd,file={image},format=raw,if=none", "-device", "virtio-blk-device,drive=vd")


def virtio_console(out: Path) -> tuple[str, ...]:
    return (
        "-device",
        "virtio-serial-device",
        "-chardev",
        f"file,id=vc,path={out}",
        "-device",
        "virtconsole,chardev=vc",
    )


@cache
def microvm_transports(qemu: str) -> tuple[int, ...]:
    """The addresses of QEMU microvm's virtio-mmio transports, read from ``info qtree``: 0xfeb00000
    on, 0x200 apart (24 of them with the second IOAPIC, 8 without). Devices take them from the top:
    the first -device gets the highest address."""
    cmd = [*qemu_base(qemu), "-S", "-monitor", "stdio", "-serial", "none"]
    p = subprocess.run(cmd, input=b"info qtree\nquit\n", capture_output=True, timeout=20)
    tree = p.stdout.decode(errors="replace")
    addrs = []
    for block in re.split(r"\n\s*dev: ", tree):
        if block.startswith("virtio-mmio") and (m := re.search(r"\n\s*mmio ([0-9a-f]+)/", block)):
            addrs.append(int(m[1], 16))
    if not addrs:
        pytest.skip("could not read QEMU microvm's virtio-mmio transports from `info qtree`")
    return tuple(sorted(addrs))


def virtio_words(qemu: str, count: int, *, order: tuple[int, ...] | None = None) -> str:
    """virtio_mmio.device= words for the first ``count`` devices on the command line, in ``order``
    (indices into the devices as plugged) or plugging order. The IRQ is QEMU's GSI for that
    transport (24 + i with the second IOAPIC, else 16 + i with ACPI); the guests poll and only
    print it."""
    t = microvm_transports(qemu)
    irq_base = 24 if len(t) == 24 else 16
    words = []
    for k in order if order is not None else range(count):
        i = len(t) - 1 - k
        words.append(f"virtio_mmio.device=512@{t[i]:#x}:{irq_base + i}")
    return " ".join(words)


@pytest.fixture(scope="module")
def work_guests(guests: Path) -> Path:
    for name in ("fullwork.elf", "parawork.elf", "cpuid.elf"):
        if not (guests / name).exists():
            pytest.skip(f"{name} is not built in {guests}: run `make guests`")
    return guests


def sparse_image(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


# --- cpuid ---------------------------------------------------------------------------------------

CPUID_LINE = re.compile(
    r"^cpuid hypervisor_bit=([01]) leaf40000000=(\S+) max=(0x[0-9a-f]+|0) "
    r"features=(0x[0-9a-f]+|0)$",
    re.M,
)


def test_cpuid_sees_qemus_kvm_leaves(qemu: str, work_guests: Path) -> None:
    r = boot(qemu, work_guests / "cpuid.elf", "")
    assert r.status == status(0), r
    m = CPUID_LINE.search(r.stdout)
    assert m, r.stdout
    assert m[1] == "1" and m[2] == "KVMKVMKVM" and int(m[3], 16) >= 0x40000001, r.stdout


def test_cpuid_says_none_without_hypervisor_leaves(qemu: str, work_guests: Path) -> None:
    # CPUID runs at CPL0 in the guest, where QEMU's CPUID table answers even on a PVM host
    r = boot(qemu, work_guests / "cpuid.elf", "", ("-cpu", "qemu64,-hypervisor,kvm=off"))
    assert r.status == status(0), r
    m = CPUID_LINE.search(r.stdout)
    assert m and m[1] == "0" and m[2] == "none" and m[4] in ("0", "0x0"), r.stdout


# --- fullwork: ATA PIO, UART, port 0x80, CPU loop ------------------------------------------------


def test_fullwork_disk_roundtrip_over_ata_pio(qemu: str, work_guests: Path, tmp_path: Path) -> None:
    image = sparse_image(tmp_path / "disk.img", 1 << 20)
    # 40 sectors in commands of 16, 16 and 8: more than one command, and a short last one
    r = boot(qemu, work_guests / "fullwork.elf", "work=disk sectors=40 req=16 lba=3", ide_disk(image))
    assert r.status == status(0), r
    assert re.search(r'^fullwork: ata: model="QEMU HARDDISK" sectors=2048 lba48=1$', r.stdout, re.M), r.stdout
    disk = r.results()["disk"]
    want = f"{disk_checksum(3, 40):016x}"
    assert disk["bytes"] == str(40 * 512) and disk["wsum"] == want and disk["rsum"] == want, disk
    assert disk["verdict"] == "ok" and int(disk["tsc"]) > 0
    assert int(disk["tsc"]) >= int(disk["wtsc"]) + int(disk["rtsc"]) - 1
    check_disk_image(image, 3, 40)
    with image.open("rb") as f:
        assert f.read(3 * 512) == bytes(3 * 512), "sectors before lba= were written"


def test_fullwork_disk_lba48_across_the_lba28_limit(qemu: str, work_guests: Path, tmp_path: Path) -> None:
    # A sparse 128 GiB + 1 MiB image: the commands that reach past sector 2^28 must be the EXT ones
    image = sparse_image(tmp_path / "big.img", LBA28_LIMIT * 512 + (1 << 20))
    first = LBA28_LIMIT - 12
    r = boot(qemu, work_guests / "fullwork.elf", f"work=disk sectors=24 req=8 lba={first}", ide_disk(image))
    assert r.status == status(0), r
    disk = r.results()["disk"]
    assert disk["verdict"] == "ok" and disk["wsum"] == f"{disk_checksum(first, 24):016x}", disk
    check_disk_image(image, first, 24)


def test_fullwork_disk_forced_lba48(qemu: str, work_guests: Path, tmp_path: Path) -> None:
    image = sparse_image(tmp_path / "disk.img", 1 << 20)
    r = boot(qemu, work_guests / "fullwork.elf", "work=disk sectors=8 lba48=1", ide_disk(image))
    assert r.status == status(0), r
    assert r.results()["disk"]["verdict"] == "ok"
    check_disk_image(image, 0, 8)


def test_fullwork_disk_errors(qemu: str, work_guests: Path, tmp_path: Path) -> None:
    small = sparse_image(tmp_path / "small.img", 16 * 512)
    r = boot(qemu, work_guests / "fullwork.elf", "work=disk sectors=17", ide_disk(small))
    assert r.status == status(1) and "work=disk mode=full error=disk-too-small" in r.stdout, r
    r = boot(qemu, work_guests / "fullwork.elf", "work=disk sectors=8")  # microvm has no IDE of its own
    assert r.status == status(1) and "work=disk mode=full error=no-controller" in r.stdout, r


def test_fullwork_console_null_cpu(qemu: str, work_guests: Path) -> None:
    r = boot(qemu, work_guests / "fullwork.elf", "work=console,null,cpu bytes=1000 n=500 loop=100000")
    assert r.status == status(0), r
    assert r.stdout.startswith(console_stream(1000).decode()), r.stdout[:200]
    res = r.results()
    assert res["console"]["bytes"] == "1000" and res["console"]["wsum"] == f"{fnv1a(console_stream(1000)):016x}"
    assert res["null"]["n"] == "500" and res["cpu"]["n"] == "100000"
    assert all(int(res[w]["tsc"]) > 0 for w in ("console", "null", "cpu"))


def test_fullwork_without_work_says_how(qemu: str, work_guests: Path) -> None:
    r = boot(qemu, work_guests / "fullwork.elf", "")
    assert r.status == status(1) and "usage: work=" in r.stdout, r


# --- parawork: virtio-blk and virtio-console on virtio-mmio v2 -----------------------------------


@pytest.mark.parametrize("params", ["sectors=2048", "sectors=300 req=64 seg=4096", "sectors=17 req=5 seg=512"])
def test_parawork_virtio_blk_roundtrip(qemu: str, work_guests: Path, tmp_path: Path, params: str) -> None:
    image = sparse_image(tmp_path / "disk.img", 2 << 20)
    count = int(re.search(r"sectors=(\d+)", params)[1])  # type: ignore[index]
    r = boot(
        qemu,
        work_guests / "parawork.elf",
        f"work=disk lba=1 {params} {virtio_words(qemu, 1)}",
        (*VIRTIO_BASE_ARGS, *virtio_blk(image)),
    )
    assert r.status == status(0), r
    assert re.search(r"^parawork: virtio-mmio 0x[0-9a-f]+ irq \d+: block \(device id 2\) version 2$", r.stdout, re.M), (
        r.stdout
    )
    disk = r.results()["disk"]
    want = f"{disk_checksum(1, count):016x}"
    assert disk["via"] == "virtio" and disk["bytes"] == str(count * 512), disk
    assert disk["wsum"] == want and disk["rsum"] == want and disk["verdict"] == "ok", disk
    check_disk_image(image, 1, count)


@pytest.mark.parametrize("params", ["bytes=100001", "bytes=200000 seg=512"])
def test_parawork_virtio_console(qemu: str, work_guests: Path, tmp_path: Path, params: str) -> None:
    # seg=512: 391 buffers, more than the 256 a queue holds: two batches of notifications
    out = tmp_path / "console.out"
    n = int(re.search(r"bytes=(\d+)", params)[1])  # type: ignore[index]
    r = boot(
        qemu,
        work_guests / "parawork.elf",
        f"work=console {params} {virtio_words(qemu, 1)}",
        (*VIRTIO_BASE_ARGS, *virtio_console(out)),
    )
    assert r.status == status(0), r
    con = r.results()["console"]
    assert con["via"] == "virtio" and con["bytes"] == str(n), con
    data = out.read_bytes()
    assert len(data) == n and data == console_stream(n)
    assert con["wsum"] == f"{fnv1a(data):016x}"


def test_parawork_finds_devices_by_id_in_any_order(qemu: str, work_guests: Path, tmp_path: Path) -> None:
    # blk plugged first, console second; the command line names the console first
    image, out = sparse_image(tmp_path / "disk.img", 1 << 20), tmp_path / "console.out"
    r = boot(
        qemu,
        work_guests / "parawork.elf",
        f"work=console,disk,null,cpu bytes=640 sectors=64 n=50 loop=1000 {virtio_words(qemu, 2, order=(1, 0))}",
        (*VIRTIO_BASE_ARGS, *virtio_blk(image), *virtio_console(out)),
    )
    res = r.results()
    # null defaults to hypercalls, which QEMU does not have: that one fails, the rest must not
    assert r.status == status(1), r
    assert res["console"]["via"] == "virtio"
    assert res["disk"]["verdict"] == "ok" and out.read_bytes() == console_stream(640)
    assert res["null"] == {"mode": "para", "via": "hcall", "error": "not-virtkit"}
    assert res["cpu"]["n"] == "1000"
    assert 'parawork: refusing hypercalls: the hypervisor signature is not "virtkitvirtk"' in r.stdout


def test_parawork_null_via_virtio_kicks(qemu: str, work_guests: Path, tmp_path: Path) -> None:
    r = boot(
        qemu,
        work_guests / "parawork.elf",
        f"work=null via=virtio n=200 {virtio_words(qemu, 1)}",
        (*VIRTIO_BASE_ARGS, *virtio_console(tmp_path / "console.out")),
    )
    assert r.status == status(0), r
    null = r.results()["null"]
    assert null["via"] == "virtio" and null["n"] == "200" and int(null["tsc"]) > 0


def test_parawork_refuses_hypercalls_off_virtkit(qemu: str, work_guests: Path) -> None:
    r = boot(qemu, work_guests / "parawork.elf", "work=disk via=hcall exit=hcall")
    assert r.status == status(1), r
    assert r.results()["disk"] == {"mode": "para", "via": "hcall", "error": "not-virtkit"}
    assert "exit=hcall: no hypercalls here; exiting through port 0xf4" in r.stdout


def test_parawork_virtio_errors(qemu: str, work_guests: Path, tmp_path: Path) -> None:
    image = sparse_image(tmp_path / "disk.img", 1 << 20)
    # nothing named and nothing at virtkit's probe window 0xd0000000
    r = boot(qemu, work_guests / "parawork.elf", "work=disk sectors=8")
    assert r.status == status(1) and r.results()["disk"]["error"] == "no-device", r
    assert "no virtio-mmio device at 0xd0000000" in r.stdout
    # QEMU's default virtio-mmio transport is the legacy version 1, which the driver refuses
    r = boot(qemu, work_guests / "parawork.elf", f"work=disk sectors=8 {virtio_words(qemu, 1)}", virtio_blk(image))
    assert r.status == status(1) and r.results()["disk"]["error"] == "legacy-device", r
    # a disk too small for the request
    r = boot(
        qemu,
        work_guests / "parawork.elf",
        f"work=disk sectors=4096 {virtio_words(qemu, 1)}",
        (*VIRTIO_BASE_ARGS, *virtio_blk(image)),
    )
    assert r.status == status(1) and r.results()["disk"]["error"] == "disk-too-small", r


def test_full_and_para_write_the_same_data(qemu: str, work_guests: Path, tmp_path: Path) -> None:
    full_img = sparse_image(tmp_path / "full.img", 1 << 20)
    para_img = sparse_image(tmp_path / "para.img", 1 << 20)
    full = boot(qemu, work_guests / "fullwork.elf", "work=disk sectors=32", ide_disk(full_img))
    para = boot(
        qemu,
        work_guests / "parawork.elf",
        f"work=disk sectors=32 {virtio_words(qemu, 1)}",
        (*VIRTIO_BASE_ARGS, *virtio_blk(para_img)),
    )
    assert full.status == para.status == status(0), (full, para)
    assert full.results()["disk"]["wsum"] == para.results()["disk"]["wsum"]
    assert full_img.read_bytes() == para_img.read_bytes()
