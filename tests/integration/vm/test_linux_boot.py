"""Debian's own cloud kernel (a real bzImage, fetched by tools/fetch-debian-kernel.sh from the
Debian archive with apt-get download) under virtkit: loaded as the Linux boot protocol says,
given the platform tables a Linux kernel looks for, refused with one line when damaged, and run
until it prints on the serial port.

On PVM hosts the kernel's code is instruction-emulated (docs/PLATFORM.md): the test that runs it is
marked ``slow`` and waits on the serial output with a generous deadline, asserting only on the
earliest lines."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from virtkit.api import VM
from virtkit.arch import layout, x86

pytestmark = pytest.mark.usefixtures("kvm")

ROOT = Path(__file__).resolve().parents[3]
VIRTKIT = [sys.executable, "-m", "virtkit"]
ZP = layout.ZERO_PAGE_ADDR


@pytest.fixture(scope="module")
def debian_kernel() -> Path:
    """The cached bzImage (`make setup` fetched it; the script only prints the path then)."""
    p = subprocess.run([str(ROOT / "tools" / "fetch-debian-kernel.sh")], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"cannot get Debian's cloud kernel: {p.stderr.strip()}"
    return Path(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def debian_vmlinux(debian_kernel: Path) -> Path:
    """The same kernel uncompressed, as the script took it out of the bzImage."""
    return debian_kernel.with_name("vmlinux")


def boot_until(kernel: Path, boot: str, cmdline: str, wanted: tuple[str, ...], deadline_s: float) -> str:
    """Boot ``kernel`` and return its serial output once every ``wanted`` line is in it, or once
    it stops, or at the deadline: whichever comes first (the caller asserts)."""
    with VM(kernel, memory="512M", vcpus=2, cmdline=cmdline, boot=boot) as vm:
        vm.start()
        m = vm.machine
        assert m is not None
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline and m.stop_info is None:
            out = vm.console.output
            if all(w.encode() in out for w in wanted):
                break
            time.sleep(1)
        detail = m.stop_info.detail if m.stop_info is not None else ""
        vm.stop()
        result = vm.wait(30)
    out = result.serial_output
    for w in wanted:
        assert w in out, f"no {w!r} on the serial port within {deadline_s:g} s; {detail}\n{out[-3000:]}"
    return out


def virtkit(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VIRTKIT, *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(p: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("virtkit: error:") and "Traceback" not in p.stderr, p.stderr
    assert fragment in lines[0], lines[0]


def test_debian_bzimage_is_loaded_as_the_boot_protocol_says(debian_kernel: Path, tmp_path: Path) -> None:
    image = debian_kernel.read_bytes()
    setup_sects = image[0x1F1] or 4
    syssize = struct.unpack_from("<I", image, 0x1F4)[0]
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"\x07\x07\x01" + bytes(300_000))  # a cpio magic's first bytes, then zeros
    with VM(debian_kernel, memory="256M", vcpus=2, mode="para", cmdline="console=ttyS0", initrd=initrd) as vm:
        m = vm.machine
        assert m is not None
        mem = m.memory
        assert m.boot_protocol == "linux (bzImage, boot protocol 2.15)"
        # the protected-mode part at 1 MiB, byte for byte
        start = (setup_sects + 1) * 512
        assert mem.read(layout.LINUX_LOAD_ADDR, syssize * 16) == image[start : start + syssize * 16]
        # the zero page: the image's setup header, then the loader's fields
        for a, b in ((0x1F1, 0x1FA), (0x1FC, 0x210), (0x22C, 0x26C)):  # what the loader leaves as it was
            assert mem.read(ZP + a, b - a) == image[a:b]
        assert mem.read(ZP + 0x202, 4) == b"HdrS" and mem.read(ZP + 0x210, 1) == b"\xff"
        assert mem.read(mem.read_u32(ZP + 0x228), 14) == b"console=ttyS0\0"  # no virtio_mmio.device=: ACPI
        rd, rd_size = mem.read_u32(ZP + 0x218), mem.read_u32(ZP + 0x21C)
        assert rd_size == 300_003 and rd % 4096 == 0 and mem.read(rd, 3) == b"\x07\x07\x01"
        assert rd + rd_size <= min(256 << 20, struct.unpack_from("<I", image, 0x22C)[0] + 1)
        n = mem.read(ZP + 0x1E8, 1)[0]
        e820 = [struct.unpack("<QQI", mem.read(ZP + 0x2D0 + 20 * i, 20)) for i in range(n)]
        assert e820 == [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (1 << 20, (255 << 20), 1)]
        # the tables the zero page points at: two local APICs, the two virtio devices of para mode
        rsdp = mem.read_u64(ZP + 0x070)
        assert rsdp == layout.ACPI_RSDP_ADDR and mem.read(rsdp, 8) == b"RSD PTR "
        firmware = mem.read(layout.ACPI_TABLES_ADDR, layout.ACPI_TABLES_LIMIT - layout.ACPI_TABLES_ADDR)
        assert firmware.count(b"LNRO0005") == 2 and b"APIC" in firmware and b"FACP" in firmware
        assert mem.read(layout.MPTABLE_ADDR, 4) == b"_MP_"
        # the boot vCPU at the 64-bit entry, RSI -> zero page; every vCPU with the boot MSRs/LINTs
        regs, sregs = m.vcpus[0].fd.get_regs(), m.vcpus[0].fd.get_sregs()
        assert (regs.rip, regs.rsi, sregs.cs.selector, sregs.cs.l) == (0x10_0200, ZP, 0x10, 1)
        assert sregs.tr.selector == layout.LINUX_BOOT_TSS and sregs.efer & x86.EFER_LMA
        for v in m.vcpus:
            msrs = v.fd.get_msrs([x86.MSR_IA32_MISC_ENABLE, x86.MSR_MTRR_DEF_TYPE, x86.MSR_LSTAR])
            assert msrs == {x86.MSR_IA32_MISC_ENABLE: 1, x86.MSR_MTRR_DEF_TYPE: 0x806, x86.MSR_LSTAR: 0}
            lapic = bytes(v.fd.get_lapic().regs)
            assert (struct.unpack_from("<I", lapic, 0x350)[0] >> 8) & 7 == x86.APIC_MODE_EXTINT
            assert (struct.unpack_from("<I", lapic, 0x360)[0] >> 8) & 7 == x86.APIC_MODE_NMI
            assert v.fd.get_xsave().region[6] == x86.MXCSR_INIT  # MXCSR in the legacy XSAVE area


def _patched(src: Path, dst: Path, offset: int, data: bytes) -> str:
    image = bytearray(src.read_bytes())
    image[offset : offset + len(data)] = data
    dst.write_bytes(image)
    return str(dst)


def test_damaged_kernels_and_initrds_get_one_line_errors(debian_kernel: Path, tmp_path: Path) -> None:
    k = str(debian_kernel)
    one_line_error(virtkit("run", _patched(debian_kernel, tmp_path / "old", 0x206, b"\x0b\x02"), "-m", "256M"), "2.11")
    one_line_error(
        virtkit("run", _patched(debian_kernel, tmp_path / "k32", 0x236, b"\x00\x00"), "-m", "256M"),
        "no 64-bit entry point",
    )
    one_line_error(virtkit("run", _patched(debian_kernel, tmp_path / "magic", 0x202, b"HdrX"), "-m", "256M"), "'HdrS'")
    short = tmp_path / "short"
    short.write_bytes(debian_kernel.read_bytes()[: 4 << 20])
    one_line_error(virtkit("run", str(short), "-m", "256M"), "is truncated")
    one_line_error(virtkit("run", k, "-m", "64M"), "give the VM at least --memory")
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(300 << 20)
    one_line_error(virtkit("run", k, "-m", "256M", "--initrd", str(big)), "larger than guest memory")
    with open(big, "wb") as f:
        f.truncate(200 << 20)
    one_line_error(virtkit("run", k, "-m", "256M", "--initrd", str(big)), "only")
    one_line_error(virtkit("run", k, "-m", "256M", "--initrd", "/nonexistent"), "does not exist")
    one_line_error(virtkit("run", k, "--boot", "pvh", "-m", "256M"), "PVH needs an uncompressed vmlinux")


def test_initrd_is_refused_for_multiboot_guests(guests: Path) -> None:
    one_line_error(virtkit("run", str(guests / "hello.elf"), "--initrd", "/etc/hostname"), "--initrd is for Linux")
    hello = str(guests / "hello.elf")
    one_line_error(virtkit("run", hello, "--boot", "linux"), "neither a Linux bzImage nor an ELF64 vmlinux")
    one_line_error(virtkit("run", hello, "--boot", "linux", "--module", "/etc/hostname"), "no Multiboot modules")


def test_stats_say_which_protocol(guests: Path) -> None:
    p = virtkit("run", str(guests / "hello.elf"), "--stats")
    assert "Boot protocol: multiboot" in p.stderr


CMDLINE = "console=ttyS0 earlyprintk=serial nokaslr noxsave"
#: generous deadlines on a busy 2-core PVM machine (measured with 40 % of a core: the bzImage's LZ4
#: decompression alone took about 190 s; a vmlinux printed its banner within 60 s)
BZIMAGE_DEADLINE_S = 900
VMLINUX_DEADLINE_S = 600


@pytest.mark.slow
@pytest.mark.timeout(BZIMAGE_DEADLINE_S + 90)
def test_debian_bzimage_prints_its_first_lines(debian_kernel: Path) -> None:
    # the decompressor's first line (the kernel has no verbose boot output), then the banner and
    # the command line the kernel read through the zero page
    boot_until(
        debian_kernel,
        "auto",
        CMDLINE,
        ("KASLR disabled: 'nokaslr' on cmdline.", "Linux version 6.1", "Command line: " + CMDLINE),
        BZIMAGE_DEADLINE_S,
    )


@pytest.mark.slow
@pytest.mark.timeout(VMLINUX_DEADLINE_S + 90)
@pytest.mark.parametrize("boot", ["linux", "pvh"])
def test_debian_vmlinux_reads_e820_and_acpi(debian_vmlinux: Path, boot: str) -> None:
    # the earliest lines that show each table was read: the e820 map as virtkit wrote it, the
    # RSDP where the zero page / start info says, and the MADT used for SMP (2 vCPUs)
    out = boot_until(
        debian_vmlinux,
        boot,
        CMDLINE,
        (
            "Linux version 6.1",
            "Command line: " + CMDLINE,
            "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
            "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
            "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
            "ACPI: RSDP 0x00000000000E0000",
            "ACPI: Using ACPI (MADT) for SMP configuration information",
            "smpboot: Allowing 2 CPUs",
        ),
        VMLINUX_DEADLINE_S,
    )
    assert "Booting paravirtualized kernel on bare hardware" in out or "smpboot" in out
