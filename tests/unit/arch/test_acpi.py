"""ACPI and MP tables (arch/acpi.py, arch/mptable.py), parsed back as a kernel would read them:
signatures, lengths, checksums, the pointers between tables, one local APIC per vCPU; and the
DSDT's AML disassembled and recompiled by ACPICA's iasl."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from virtkit.arch import acpi, layout, mptable
from virtkit.devices.manager import DeviceManager

VIRTIO = tuple(acpi.virtio_mmio_device(i, layout.VIRTIO_MMIO_BASE + i * 0x1000, 0x1000, 5 + i) for i in range(3))
DEVICES = (acpi.serial_port("COM1", 0, 0x3F8, 4), acpi.ps2_controller(0x60, 0x64, 1), *VIRTIO)


def tables(vcpus: int = 2, devices: tuple[acpi.DeviceInfo, ...] = DEVICES) -> dict[int, bytes]:
    return dict(acpi.build_tables(acpi.Platform(vcpus=vcpus, devices=devices)))


def read_table(blobs: dict[int, bytes], addr: int) -> bytes:
    data = blobs[addr]
    length = struct.unpack_from("<I", data, 4)[0]
    assert length == len(data)
    assert sum(data) % 256 == 0, f"{data[:4]!r} checksum"
    return data


def walk(blobs: dict[int, bytes]) -> dict[bytes, bytes]:
    """Follow RSDP -> XSDT -> tables -> DSDT, checking every checksum and length on the way."""
    rsdp = blobs[layout.ACPI_RSDP_ADDR]
    assert rsdp[:8] == b"RSD PTR " and len(rsdp) == 36 and rsdp[15] == 2
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    assert struct.unpack_from("<I", rsdp, 20)[0] == 36
    xsdt = read_table(blobs, struct.unpack_from("<Q", rsdp, 24)[0])
    assert xsdt[:4] == b"XSDT"
    found = {b"XSDT": xsdt}
    for (addr,) in struct.iter_unpack("<Q", xsdt[36:]):
        table = read_table(blobs, addr)
        found[table[:4]] = table
    fadt = found[b"FACP"]
    dsdt = read_table(blobs, struct.unpack_from("<Q", fadt, 140)[0])
    assert struct.unpack_from("<I", fadt, 40)[0] == struct.unpack_from("<Q", fadt, 140)[0]
    found[b"DSDT"] = dsdt
    return found


def test_tables_link_up_with_checksums() -> None:
    found = walk(tables())
    assert sorted(found) == [b"APIC", b"DSDT", b"FACP", b"XSDT"]
    fadt = found[b"FACP"]
    assert len(fadt) == 276 and fadt[8] == 6 and fadt[131] == 5  # FADT 6.5
    assert struct.unpack_from("<I", fadt, 112)[0] & acpi.FADT_HW_REDUCED_ACPI
    assert all(addr < layout.ACPI_TABLES_LIMIT for addr in tables())


@pytest.mark.parametrize("vcpus", [1, 2, 8, 254])
def test_madt_has_one_local_apic_per_vcpu_and_the_ioapic(vcpus: int) -> None:
    madt = walk(tables(vcpus))[b"APIC"]
    assert struct.unpack_from("<II", madt, 36) == (layout.LAPIC_ADDR, acpi.MADT_PCAT_COMPAT)
    entries, pos = [], 44
    while pos < len(madt):
        kind, length = madt[pos], madt[pos + 1]
        assert length >= 2
        entries.append((kind, madt[pos : pos + length]))
        pos += length
    assert pos == len(madt)
    lapics = [e for k, e in entries if k == acpi.MADT_LAPIC]
    assert len(lapics) == vcpus
    assert [(e[2], e[3], struct.unpack_from("<I", e, 4)[0]) for e in lapics] == [(i, i, 1) for i in range(vcpus)]
    (ioapic,) = [e for k, e in entries if k == acpi.MADT_IOAPIC]
    assert (ioapic[2], *struct.unpack_from("<II", ioapic, 4)) == (vcpus, layout.IOAPIC_ADDR, 0)
    (nmi,) = [e for k, e in entries if k == acpi.MADT_LAPIC_NMI]
    assert nmi[2] == 0xFF and nmi[5] == 1  # all processors, LINT1


def test_dsdt_describes_every_device() -> None:
    dsdt = walk(tables())[b"DSDT"]
    assert dsdt.count(b"LNRO0005") == 3
    assert struct.pack("<I", acpi.eisa_id("PNP0501")) in dsdt and struct.pack("<I", acpi.eisa_id("PNP0303")) in dsdt
    for i in range(3):  # each window as a Memory32Fixed descriptor, each GSI as an interrupt descriptor
        assert acpi.res_memory32_fixed(layout.VIRTIO_MMIO_BASE + i * 0x1000, 0x1000) in dsdt
        assert acpi.res_interrupt((5 + i,), edge=True) in dsdt
    assert acpi.res_io(0x3F8, 8) in dsdt


def test_aml_encodings() -> None:
    assert acpi.eisa_id("PNP0501") == 0x0105D041  # as iasl encodes EISAID("PNP0501")
    assert acpi.aml_pkg_length(0) == b"\x01" and acpi.aml_pkg_length(62) == b"\x3f"
    assert acpi.aml_pkg_length(63) == bytes([0x40 | (65 & 0xF), 65 >> 4])  # two bytes, counts itself
    assert acpi.aml_pkg_length(4000) == bytes([0x40 | (4002 & 0xF), 4002 >> 4])
    assert acpi.aml_pkg_length(5000) == bytes([0x80 | (5003 & 0xF), (5003 >> 4) & 0xFF, 5003 >> 12])
    assert acpi.aml_pkg_length(0x10000) == bytes([0x80 | (0x10003 & 0xF), 0x00, 0x10])
    assert acpi.aml_integer(0) == b"\x00" and acpi.aml_integer(1) == b"\x01"
    assert acpi.aml_integer(0x3F8) == b"\x0b\xf8\x03" and acpi.aml_integer(0xD000_0000) == b"\x0c\x00\x00\x00\xd0"
    with pytest.raises(ValueError):
        acpi.aml_nameseg("TOOLONG")
    with pytest.raises(ValueError):
        acpi.aml_nameseg("1ABC")


def test_iasl_disassembles_and_recompiles_the_dsdt(tmp_path: Path) -> None:
    iasl = shutil.which("iasl")
    assert iasl is not None, "iasl (Debian acpica-tools) is missing: run `make setup`"
    many = tuple(acpi.virtio_mmio_device(i, layout.VIRTIO_MMIO_BASE + i * 0x1000, 0x1000, 5 + i) for i in range(20))
    dsdt = walk(tables(devices=DEVICES[:2] + many))[b"DSDT"]
    (tmp_path / "dsdt.aml").write_bytes(dsdt)
    dis = subprocess.run([iasl, "-d", "dsdt.aml"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert dis.returncode == 0, dis.stdout + dis.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert dsl.count('Name (_HID, "LNRO0005")') == 20
    assert 'Name (_HID, EisaId ("PNP0501")' in dsl and 'Name (_HID, EisaId ("PNP0303")' in dsl
    assert "Device (VR13)" in dsl and "Memory32Fixed (ReadWrite," in dsl and "0xD0013000" in dsl
    assert "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )" in dsl
    assert "IO (Decode16," in dsl and "0x03F8," in dsl
    comp = subprocess.run([iasl, "-p", "again", "dsdt.dsl"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert comp.returncode == 0, comp.stdout + comp.stderr
    assert "0 Errors" in comp.stdout


def test_mptable() -> None:
    platform = acpi.Platform(vcpus=3, devices=DEVICES)
    (fp_addr, fp), (table_addr, table) = mptable.build_mptable(platform, (5, 6, 20))
    assert fp_addr == layout.MPTABLE_ADDR and fp[:4] == b"_MP_" and sum(fp) % 256 == 0
    assert struct.unpack_from("<I", fp, 4)[0] == table_addr and fp[8] == 1 and fp[9] == 4
    assert table[:4] == b"PCMP" and sum(table) % 256 == 0
    length, _rev, _ck = struct.unpack_from("<HBB", table, 4)
    count, lapic = struct.unpack_from("<HI", table, 34)
    assert length == len(table) and lapic == layout.LAPIC_ADDR
    pos, kinds = 44, []
    for _ in range(count):
        kinds.append(table[pos])
        pos += 20 if table[pos] == mptable.ENTRY_PROCESSOR else 8
    assert pos == len(table)
    assert kinds.count(mptable.ENTRY_PROCESSOR) == 3 and kinds.count(mptable.ENTRY_IOAPIC) == 1
    assert kinds.count(mptable.ENTRY_IO_INTERRUPT) == 16 + 1  # ISA 0-15 and GSI 20
    assert kinds.count(mptable.ENTRY_LOCAL_INTERRUPT) == 2
    assert table[44 + 3] == mptable.CPU_ENABLED | mptable.CPU_BOOTSTRAP and table[64 + 3] == mptable.CPU_ENABLED


class _Port:
    def pio_read(self, offset: int, size: int) -> int:
        return 0

    def pio_write(self, offset: int, size: int, value: int) -> None:
        pass


def test_device_manager_describes_what_is_registered() -> None:
    from virtkit.devices.contract import PioDevice

    PioDevice.register(_Port)
    dm = DeviceManager(strict=False, irq_line=lambda gsi: lambda level: None)
    dm.add_port_device("uart", 0x3F8, 8, _Port(), guest_info=acpi.serial_port("COM1", 0, 0x3F8, 4))  # type: ignore[arg-type]
    dm.add_port_device("post", 0x80, 1, _Port())  # type: ignore[arg-type]
    placed = dict(dm.platform_tables(2))
    found = walk(placed)
    assert b"PNP" not in found[b"DSDT"] and struct.pack("<I", acpi.eisa_id("PNP0501")) in found[b"DSDT"]
    assert placed[layout.MPTABLE_ADDR][:4] == b"_MP_"
    with pytest.raises(Exception, match="describe at most 254"):
        dm.platform(255)


POWER = acpi.PowerRegisters(
    sleep_control_port=0xC48, sleep_status_port=0xC49, reset_port=0xC4A, reset_value=0x01, s5_slp_typ=5
)


def test_fadt_points_at_the_power_registers() -> None:
    """RESET_REG_SUP, RESET_REG / RESET_VALUE and the sleep registers (ACPI 6.5 table 5.9) as
    byte-wide system I/O generic addresses; none of them without power registers."""
    fadt = walk(dict(acpi.build_tables(acpi.Platform(vcpus=1, devices=DEVICES, power=POWER))))[b"FACP"]
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags == acpi.FADT_HW_REDUCED_ACPI | acpi.FADT_RESET_REG_SUP
    assert struct.unpack_from("<BBBBQ", fadt, 116) == (1, 8, 0, 1, 0xC4A)
    assert fadt[128] == 0x01
    assert struct.unpack_from("<BBBBQ", fadt, 244) == (1, 8, 0, 1, 0xC48)
    assert struct.unpack_from("<BBBBQ", fadt, 256) == (1, 8, 0, 1, 0xC49)
    bare = walk(tables())[b"FACP"]
    assert struct.unpack_from("<I", bare, 112)[0] == acpi.FADT_HW_REDUCED_ACPI
    assert bare[116:129] == bytes(13) and bare[244:268] == bytes(24)


def test_s5_package_only_with_power_registers() -> None:
    with_power = walk(dict(acpi.build_tables(acpi.Platform(vcpus=1, devices=DEVICES, power=POWER))))[b"DSDT"]
    # Name(_S5_, Package(4){5, 5, 0, 0}): NameOp, name, PackageOp, PkgLength 8 (counts itself), 4 elements
    assert bytes([0x08]) + b"_S5_" + bytes([0x12, 0x08, 0x04, 0x0A, 5, 0x0A, 5, 0, 0]) in with_power
    assert b"_S5_" not in walk(tables())[b"DSDT"]
    with pytest.raises(ValueError, match="3 bits"):
        acpi.aml_sleep_package(8)


def test_iasl_reads_the_fadt_power_registers_and_the_s5_package(tmp_path: Path) -> None:
    iasl = shutil.which("iasl")
    assert iasl is not None, "iasl (Debian acpica-tools) is missing: run `make setup`"
    found = walk(dict(acpi.build_tables(acpi.Platform(vcpus=2, devices=DEVICES, power=POWER))))
    (tmp_path / "facp.dat").write_bytes(found[b"FACP"])
    (tmp_path / "dsdt.aml").write_bytes(found[b"DSDT"])
    for name in ("facp.dat", "dsdt.aml"):
        dis = subprocess.run([iasl, "-d", name], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert dis.returncode == 0, dis.stdout + dis.stderr
    facp = (tmp_path / "facp.dsl").read_text()
    assert "Reset Register Supported (V2) : 1" in facp and "Hardware Reduced (V5) : 1" in facp
    registers = (("Reset Register", "C4A"), ("Sleep Control Register", "C48"), ("Sleep Status Register", "C49"))
    for register, port in registers:
        block = facp[facp.index(f"{register} : [Generic Address Structure]") :]
        assert "Space ID : 01 [SystemIO]" in block[:400], register
        assert f"Address : 0000000000000{port}" in block[:400], register
    assert "Value to cause reset : 01" in facp
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert "Name (_S5, Package (0x04)" in dsl
    comp = subprocess.run([iasl, "-p", "again", "dsdt.dsl"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert comp.returncode == 0 and "0 Errors" in comp.stdout, comp.stdout + comp.stderr


def test_the_device_manager_hands_the_power_registers_to_the_tables() -> None:
    from virtkit.devices.contract import PioDevice

    PioDevice.register(_Port)
    dm = DeviceManager(strict=False, irq_line=lambda gsi: lambda level: None)
    dm.add_power_registers("acpi power", 0xC48, 3, _Port(), POWER)  # type: ignore[arg-type]
    fadt = walk(dict(dm.platform_tables(1)))[b"FACP"]
    assert struct.unpack_from("<I", fadt, 112)[0] & acpi.FADT_RESET_REG_SUP
    with pytest.raises(Exception, match="already has"):
        dm.add_power_registers("again", 0xD00, 3, _Port(), POWER)  # type: ignore[arg-type]
    other = DeviceManager(strict=False, irq_line=lambda gsi: lambda level: None)
    with pytest.raises(Exception, match="outside its ports"):
        other.add_power_registers("acpi power", 0xD00, 3, _Port(), POWER)  # type: ignore[arg-type]
