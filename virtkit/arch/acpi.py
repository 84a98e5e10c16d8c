"""ACPI tables for Linux guests: RSDP, XSDT, FADT (hardware-reduced), MADT and a DSDT.

Spec: ACPI 6.5 — §5.2.5.3 (RSDP), §5.2.6 (system description table header), §5.2.8 (XSDT),
§5.2.9 (FADT, table 5.9; flags HW_REDUCED_ACPI and RESET_REG_SUP, table 5.10; RESET_REG,
SLEEP_CONTROL_REG and SLEEP_STATUS_REG as generic addresses, §5.2.3.2), §7.4.2 (the \\_S5 sleep
package), §5.2.12 (MADT: processor local APIC
§5.2.12.2, I/O APIC §5.2.12.3, local APIC NMI §5.2.12.7), §19/§20 (AML: §20.2.4 package length,
§20.2.5 named objects), §6.4 (resource descriptors: I/O port §6.4.2.5, fixed memory 32
§6.4.3.4, extended interrupt §6.4.3.6, end tag §6.4.2.9).

The tables are built as bytes from a :class:`Platform`, the inventory the device manager hands
over (so a device added to the machine is described to the guest without touching this file). The
DSDT's AML is produced by the few encoders below, enough for devices with a _HID, a _UID and a
_CRS of I/O ports, fixed memory windows and interrupts, and the \\_S5 package; nothing else is
generated.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from virtkit.arch import layout

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

OEM_ID: Final = b"VIRTKT"
OEM_TABLE_ID: Final = b"VIRTKIT "
CREATOR_ID: Final = b"VKIT"
HEADER_SIZE: Final = 36
RSDP_SIZE: Final = 36
FADT_SIZE: Final = 276
FADT_REVISION: Final = 6
FADT_MINOR: Final = 5
FADT_HW_REDUCED_ACPI: Final = 1 << 20
FADT_RESET_REG_SUP: Final = 1 << 10
#: generic address structure (§5.2.3.2): address space ID of system I/O, byte access size
GAS_SYSTEM_IO: Final = 1
GAS_ACCESS_BYTE: Final = 1
#: IA-PC boot architecture flags (table 5.11): LEGACY_DEVICES, 8042, VGA Not Present
IAPC_LEGACY_DEVICES: Final = 1 << 0
IAPC_8042: Final = 1 << 1
IAPC_VGA_NOT_PRESENT: Final = 1 << 2
MADT_PCAT_COMPAT: Final = 1 << 0
MADT_LAPIC: Final = 0
MADT_IOAPIC: Final = 1
MADT_LAPIC_NMI: Final = 4
LAPIC_ENABLED: Final = 1 << 0
#: MADT local APIC NMI: all processors (UID 0xFF), LINT1, flags 0 (conforms to the bus)
ALL_PROCESSORS: Final = 0xFF
#: the in-kernel IOAPIC's pins (KVM: KVM_IOAPIC_NUM_PINS)
IOAPIC_PINS: Final = 24
VIRTIO_MMIO_HID: Final = "LNRO0005"  # Linux drivers/virtio/virtio_mmio.c, virtio_mmio_acpi_match


class IoPorts(NamedTuple):
    base: int
    length: int  # how many ports (not `count`: a tuple has a method of that name)


class MmioWindow(NamedTuple):
    base: int
    size: int


class DeviceInfo(NamedTuple):
    """One device as the DSDT describes it. ``hid``: an EISA id ("PNP0501") or a string id
    ("LNRO0005"); ``name``: its 4-character ACPI name."""

    name: str
    hid: str
    uid: int
    ports: tuple[IoPorts, ...] = ()
    mmio: tuple[MmioWindow, ...] = ()
    irqs: tuple[int, ...] = ()
    edge: bool = True


class PowerRegisters(NamedTuple):
    """The hardware-reduced power registers the FADT points at (byte-wide I/O ports) and the
    values that go with them: RESET_VALUE, and the SLP_TYP of \\_S5 (soft off)."""

    sleep_control_port: int
    sleep_status_port: int
    reset_port: int
    reset_value: int
    s5_slp_typ: int


class Platform(NamedTuple):
    """What the tables describe: the vCPUs (APIC IDs 0..vcpus-1), the IOAPIC, the devices, and
    the power registers if the machine has them (without, the guest finds no way to power off
    or reset through ACPI)."""

    vcpus: int
    devices: tuple[DeviceInfo, ...]
    power: PowerRegisters | None = None

    @property
    def ioapic_id(self) -> int:
        """One past the last local APIC ID (Intel MP spec 1.4 convention; unique among APICs)."""
        return self.vcpus


def serial_port(name: str, uid: int, base: int, irq: int) -> DeviceInfo:
    """A 16550A UART (PNP0501: "16550A-compatible COM port") with 8 ports and an ISA IRQ."""
    return DeviceInfo(name, "PNP0501", uid, ports=(IoPorts(base, 8),), irqs=(irq,))


def ps2_controller(data_port: int, command_port: int, irq: int) -> DeviceInfo:
    """The i8042 keyboard controller (PNP0303: IBM enhanced keyboard) at its two ports."""
    return DeviceInfo("PS2K", "PNP0303", 0, ports=(IoPorts(data_port, 1), IoPorts(command_port, 1)), irqs=(irq,))


def virtio_mmio_device(index: int, base: int, size: int, gsi: int) -> DeviceInfo:
    """A virtio-mmio transport (virtio 1.2 §4.2) as Linux's virtio_mmio driver matches it in ACPI:
    _HID LNRO0005, its register window and its (edge-triggered) interrupt."""
    return DeviceInfo(f"VR{index:02X}", VIRTIO_MMIO_HID, index, mmio=(MmioWindow(base, size),), irqs=(gsi,))


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` sum to zero modulo 256 (ACPI 6.5 §5.2.6, "Checksum")."""
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the 36-byte header (§5.2.6) and ``body``, checksummed."""
    length = HEADER_SIZE + len(body)
    head = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1)
    table = bytearray(head + body)
    table[9] = checksum(table)
    return bytes(table)


def rsdp(xsdt_addr: int) -> bytes:
    """The root system description pointer, revision 2 (§5.2.5.3): both checksums."""
    raw = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, 0, RSDP_SIZE, xsdt_addr, 0))
    raw[8] = checksum(raw[:20])
    raw[32] = checksum(raw)
    return bytes(raw)


def xsdt(tables: list[int]) -> bytes:
    return sdt(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in tables))


def gas_io(port: int) -> bytes:
    """A generic address structure (§5.2.3.2) for one byte-wide I/O port."""
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, 8, 0, GAS_ACCESS_BYTE, port)


def fadt(dsdt_addr: int, power: PowerRegisters | None = None) -> bytes:
    """A hardware-reduced FADT (§5.2.9, §4.1): no PM blocks, no SCI, no FACS; the DSDT by X_DSDT;
    with ``power``, RESET_REG (flag RESET_REG_SUP) and the sleep control and status registers."""
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(offset: int, fmt: str, *values: int) -> None:
        struct.pack_into(fmt, body, offset - HEADER_SIZE, *values)

    def put_bytes(offset: int, data: bytes) -> None:
        body[offset - HEADER_SIZE : offset - HEADER_SIZE + len(data)] = data

    flags = FADT_HW_REDUCED_ACPI
    put(40, "<I", dsdt_addr if dsdt_addr < 1 << 32 else 0)
    put(109, "<H", IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT)
    if power is not None:
        flags |= FADT_RESET_REG_SUP
        put_bytes(116, gas_io(power.reset_port))  # RESET_REG
        put(128, "<B", power.reset_value)  # RESET_VALUE
        put_bytes(244, gas_io(power.sleep_control_port))  # SLEEP_CONTROL_REG
        put_bytes(256, gas_io(power.sleep_status_port))  # SLEEP_STATUS_REG
    put(112, "<I", flags)
    put(131, "<B", FADT_MINOR)
    put(140, "<Q", dsdt_addr)
    put_bytes(268, b"virtkit\0")  # Hypervisor Vendor Identity
    return sdt(b"FACP", FADT_REVISION, bytes(body))


def madt(platform: Platform) -> bytes:
    """Local APIC address and flags, one enabled local APIC per vCPU, the IOAPIC (GSI base 0),
    and LINT1 as NMI on every processor (§5.2.12)."""
    body = bytearray(struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT))
    for cpu in range(platform.vcpus):
        body += struct.pack("<BBBBI", MADT_LAPIC, 8, cpu & 0xFF, cpu & 0xFF, LAPIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IOAPIC, 12, platform.ioapic_id & 0xFF, 0, layout.IOAPIC_ADDR, 0)
    body += struct.pack("<BBBHB", MADT_LAPIC_NMI, 6, ALL_PROCESSORS, 0, 1)
    return sdt(b"APIC", 5, bytes(body))


# --- AML (ACPI 6.5 §20) ----------------------------------------------------------------------------
AML_ZERO: Final = 0x00
AML_ONE: Final = 0x01
AML_NAME_OP: Final = 0x08
AML_BYTE_PREFIX: Final = 0x0A
AML_WORD_PREFIX: Final = 0x0B
AML_DWORD_PREFIX: Final = 0x0C
AML_STRING_PREFIX: Final = 0x0D
AML_QWORD_PREFIX: Final = 0x0E
AML_SCOPE_OP: Final = 0x10
AML_BUFFER_OP: Final = 0x11
AML_PACKAGE_OP: Final = 0x12
AML_EXT_PREFIX: Final = 0x5B
AML_DEVICE_OP: Final = 0x82
AML_ROOT_CHAR: Final = 0x5C


def aml_pkg_length(payload_len: int) -> bytes:
    """PkgLength (§20.2.4): the encoded length counts itself. One byte up to 63; then a lead byte
    with the count of following bytes in bits 6-7 and the low 4 bits of the length."""
    for extra in range(4):
        total = payload_len + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0xF)]
            out += [(total >> (4 + 8 * i)) & 0xFF for i in range(extra)]
            return bytes(out)
    raise ValueError(f"AML package of {payload_len} bytes is too long")


def aml_nameseg(name: str) -> bytes:
    """A NameSeg (§20.2.2): 4 characters, A-Z, 0-9 or '_' (not a digit first), '_'-padded."""
    seg = name.upper().ljust(4, "_")
    if len(seg) != 4 or not all(c.isascii() and (c.isupper() or c.isdigit() or c == "_") for c in seg):
        raise ValueError(f"{name!r} is not an ACPI name segment")
    if seg[0].isdigit():
        raise ValueError(f"{name!r}: an ACPI name segment cannot start with a digit")
    return seg.encode()


def aml_integer(value: int) -> bytes:
    """The shortest integer encoding (§20.2.3: ZeroOp, OneOp, Byte/Word/DWord/QWordConst)."""
    if value == 0:
        return bytes([AML_ZERO])
    if value == 1:
        return bytes([AML_ONE])
    for prefix, fmt, limit in (
        (AML_BYTE_PREFIX, "<B", 0xFF),
        (AML_WORD_PREFIX, "<H", 0xFFFF),
        (AML_DWORD_PREFIX, "<I", 0xFFFF_FFFF),
    ):
        if 0 <= value <= limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    return bytes([AML_QWORD_PREFIX]) + struct.pack("<Q", value)


def aml_string(text: str) -> bytes:
    raw = text.encode("ascii")
    if b"\0" in raw:
        raise ValueError("an AML string cannot contain NUL")
    return bytes([AML_STRING_PREFIX]) + raw + b"\0"


def eisa_id(text: str) -> int:
    """EISAID("PNP0501") (§19.6.35): three letters in 5 bits each and four hex digits, stored
    big-endian in a 32-bit integer."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError(f"{text!r} is not an EISA id")
    letters = ((ord(text[0]) & 0x1F) << 10) | ((ord(text[1]) & 0x1F) << 5) | (ord(text[2]) & 0x1F)
    value = (letters << 16) | int(text[3:], 16)
    return int.from_bytes(value.to_bytes(4, "big"), "little")


def aml_name(name: str, value: bytes) -> bytes:
    """Name(NAME, value) (§20.2.5.1 DefName)."""
    return bytes([AML_NAME_OP]) + aml_nameseg(name) + value


def aml_device(name: str, body: bytes) -> bytes:
    """Device(NAME) { body } (§20.2.5.2 DefDevice)."""
    inner = aml_nameseg(name) + body
    return bytes([AML_EXT_PREFIX, AML_DEVICE_OP]) + aml_pkg_length(len(inner)) + inner


def aml_scope(path: str, body: bytes) -> bytes:
    """Scope(\\PATH) { body } with a one-segment root path (§20.2.5.1 DefScope)."""
    inner = bytes([AML_ROOT_CHAR]) + aml_nameseg(path) + body
    return bytes([AML_SCOPE_OP]) + aml_pkg_length(len(inner)) + inner


def aml_buffer(data: bytes) -> bytes:
    """Buffer(n) { data } (§20.2.5.4 DefBuffer)."""
    inner = aml_integer(len(data)) + data
    return bytes([AML_BUFFER_OP]) + aml_pkg_length(len(inner)) + inner


def aml_package(elements: list[bytes]) -> bytes:
    """Package(n) { elements } (§20.2.5.4 DefPackage: PkgLength, NumElements as one byte)."""
    if len(elements) > 0xFF:
        raise ValueError("an AML package holds at most 255 elements")
    inner = bytes([len(elements)]) + b"".join(elements)
    return bytes([AML_PACKAGE_OP]) + aml_pkg_length(len(inner)) + inner


def aml_sleep_package(slp_typ: int) -> bytes:
    """The \\_S5 object (§7.4.2): Package { SLP_TYPa, SLP_TYPb, reserved, reserved }. On a
    hardware-reduced platform OSPM writes SLP_TYPa to the sleep control register; b is unused."""
    if not 0 <= slp_typ <= 7:
        raise ValueError(f"SLP_TYP {slp_typ} does not fit the 3 bits of the sleep control register")
    return aml_name("_S5", aml_package([aml_integer(slp_typ), aml_integer(slp_typ), aml_integer(0), aml_integer(0)]))


def res_io(base: int, count: int) -> bytes:
    """I/O port descriptor (§6.4.2.5): 16-bit decode, fixed base, alignment 1."""
    return struct.pack("<BBHHBB", 0x47, 0x01, base, base, 1, count)


def res_memory32_fixed(base: int, size: int, writable: bool = True) -> bytes:
    """Fixed memory range 32-bit descriptor (§6.4.3.4)."""
    return struct.pack("<BHBII", 0x86, 9, 1 if writable else 0, base, size)


def res_interrupt(irqs: tuple[int, ...], *, edge: bool) -> bytes:
    """Extended interrupt descriptor (§6.4.3.6): consumer, active high, exclusive."""
    flags = 0x01 | (0x02 if edge else 0)
    return struct.pack(f"<BHBB{len(irqs)}I", 0x89, 2 + 4 * len(irqs), flags, len(irqs), *irqs)


def res_end() -> bytes:
    """End tag (§6.4.2.9), checksum 0: "treated as if the checksum operation succeeded"."""
    return bytes([0x79, 0x00])


def resource_template(device: DeviceInfo) -> bytes:
    data = b"".join(res_io(p.base, p.length) for p in device.ports)
    data += b"".join(res_memory32_fixed(m.base, m.size) for m in device.mmio)
    if device.irqs:
        data += res_interrupt(device.irqs, edge=device.edge)
    return aml_buffer(data + res_end())


def aml_for_device(device: DeviceInfo) -> bytes:
    hid = device.hid
    is_eisa = len(hid) == 7 and hid[:3].isalpha() and all(c in "0123456789ABCDEF" for c in hid[3:])
    body = aml_name("_HID", aml_integer(eisa_id(hid)) if is_eisa else aml_string(hid))
    body += aml_name("_UID", aml_integer(device.uid))
    body += aml_name("_CRS", resource_template(device))
    return aml_device(device.name, body)


def dsdt(platform: Platform) -> bytes:
    """Every device of ``platform`` under \\_SB, and \\_S5 if the platform can power off, as a
    DSDT of revision 2 (64-bit integers)."""
    body = b"".join(aml_for_device(d) for d in platform.devices)
    sleep = aml_sleep_package(platform.power.s5_slp_typ) if platform.power is not None else b""
    return sdt(b"DSDT", 2, sleep + aml_scope("_SB", body))


def build_tables(platform: Platform, base: int = layout.ACPI_TABLES_ADDR) -> list[tuple[int, bytes]]:
    """Every table, as (guest-physical address, bytes), laid out from ``base`` (the RSDP first,
    at ``layout.ACPI_RSDP_ADDR``), each 16-byte aligned, within ``layout.ACPI_TABLES_LIMIT``."""
    if base != layout.ACPI_RSDP_ADDR:
        raise ValueError("the RSDP must be at layout.ACPI_RSDP_ADDR: the zero page points there")
    out: list[tuple[int, bytes]] = []
    cursor = base + RSDP_SIZE

    def place(blob: bytes) -> int:
        nonlocal cursor
        addr = (cursor + 15) & ~15
        if addr + len(blob) > layout.ACPI_TABLES_LIMIT:
            raise ValueError(f"the ACPI tables do not fit below {layout.ACPI_TABLES_LIMIT:#x}")
        out.append((addr, blob))
        cursor = addr + len(blob)
        return addr

    dsdt_addr = place(dsdt(platform))
    fadt_addr = place(fadt(dsdt_addr, platform.power))
    madt_addr = place(madt(platform))
    xsdt_addr = place(xsdt([fadt_addr, madt_addr]))
    out.insert(0, (base, rsdp(xsdt_addr)))
    return out
