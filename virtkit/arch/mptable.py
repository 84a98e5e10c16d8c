"""The Intel MultiProcessor Specification 1.4 tables: the MP floating pointer structure and the
MP configuration table (processors, the ISA bus, the IOAPIC, interrupt assignments).

Spec: Intel MP spec 1.4 — §4.1 (floating pointer, "_MP_"), §4.2 (configuration table header,
"PCMP"), §4.3.1 processor entries, §4.3.2 bus entries, §4.3.3 I/O APIC entries, §4.3.4 I/O
interrupt assignment entries, §4.3.5 local interrupt assignment entries; table 4-1 for the
entry types. Kernels that parse it (CONFIG_X86_MPPARSE) find the floating pointer in the BIOS ROM
area 0xF0000-0xFFFFF (``layout.MPTABLE_ADDR``).
"""

from __future__ import annotations

import struct

from virtkit.arch import layout
from virtkit.arch.acpi import Platform, checksum

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

SPEC_REV: Final = 4  # version 1.4
FLOATING_SIZE: Final = 16
HEADER_SIZE: Final = 44
ENTRY_PROCESSOR: Final = 0
ENTRY_BUS: Final = 1
ENTRY_IOAPIC: Final = 2
ENTRY_IO_INTERRUPT: Final = 3
ENTRY_LOCAL_INTERRUPT: Final = 4
CPU_ENABLED: Final = 1 << 0
CPU_BOOTSTRAP: Final = 1 << 1
IOAPIC_ENABLED: Final = 1 << 0
INT_TYPE_INT: Final = 0  # vectored interrupt, vector from the APIC redirection table
INT_TYPE_NMI: Final = 1
INT_TYPE_EXTINT: Final = 3  # from the 8259A
#: polarity and trigger mode "conforms to the specification of the bus" (table 4-10)
FLAGS_CONFORM: Final = 0
LAPIC_VERSION: Final = 0x14  # an integrated local APIC (version 1xh)
IOAPIC_VERSION: Final = 0x11
#: CPU signature family 6 and feature flags FPU | APIC (§4.3.1, table 4-5): a plain P6-class
#: processor; the kernel reads the real ones through CPUID
CPU_SIGNATURE: Final = 0x600
CPU_FEATURES: Final = (1 << 0) | (1 << 9)
ISA_BUS_ID: Final = 0
ISA_IRQS: Final = 16
OEM_ID: Final = b"VIRTKIT "
PRODUCT_ID: Final = b"VIRTKIT PC  "


def _processor(apic_id: int) -> bytes:
    flags = CPU_ENABLED | (CPU_BOOTSTRAP if apic_id == 0 else 0)
    return struct.pack("<BBBBII8x", ENTRY_PROCESSOR, apic_id, LAPIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES)


def _io_interrupt(bus_irq: int, ioapic_id: int, pin: int) -> bytes:
    return struct.pack("<BBHBBBB", ENTRY_IO_INTERRUPT, INT_TYPE_INT, FLAGS_CONFORM, ISA_BUS_ID, bus_irq, ioapic_id, pin)


def config_table(platform: Platform, extra_gsis: tuple[int, ...] = ()) -> bytes:
    """The configuration table: a processor per vCPU (APIC ID = vCPU index, the first the
    bootstrap processor), an ISA bus, the IOAPIC, ISA IRQs 0-15 on IOAPIC pins 0-15 (KVM's
    default GSI routing: GSI n is pin n), any device GSI above 15 likewise, and LINT0 = ExtINT,
    LINT1 = NMI on every local APIC (the virtual-wire setup of §3.6.2.2)."""
    ioapic = platform.ioapic_id
    entries = [_processor(cpu) for cpu in range(platform.vcpus)]
    entries.append(struct.pack("<BB6s", ENTRY_BUS, ISA_BUS_ID, b"ISA   "))
    entries.append(struct.pack("<BBBBI", ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, IOAPIC_ENABLED, layout.IOAPIC_ADDR))
    entries += [_io_interrupt(irq, ioapic, irq) for irq in range(ISA_IRQS)]
    entries += [_io_interrupt(gsi, ioapic, gsi) for gsi in sorted(set(extra_gsis)) if ISA_IRQS <= gsi < 0x100]
    for int_type, lint in ((INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)):
        entries.append(
            struct.pack("<BBHBBBB", ENTRY_LOCAL_INTERRUPT, int_type, FLAGS_CONFORM, ISA_BUS_ID, 0, 0xFF, lint)
        )
    body = b"".join(entries)
    head = bytearray(
        struct.pack(
            "<4sHBB8s12sIHHIHBx",
            b"PCMP",
            HEADER_SIZE + len(body),
            SPEC_REV,
            0,
            OEM_ID,
            PRODUCT_ID,
            0,
            0,
            len(entries),
            layout.LAPIC_ADDR,
            0,
            0,
        )
    )
    table = head + body
    table[7] = checksum(table)
    return bytes(table)


def floating_pointer(table_addr: int) -> bytes:
    """The 16-byte floating pointer (§4.1): length 1 paragraph, feature byte 1 = 0 (a
    configuration table is present), IMCR not present (virtual-wire mode)."""
    raw = bytearray(struct.pack("<4sIBBB5B", b"_MP_", table_addr, 1, SPEC_REV, 0, 0, 0, 0, 0, 0))
    raw[10] = checksum(raw)
    return bytes(raw)


def build_mptable(platform: Platform, extra_gsis: tuple[int, ...] = ()) -> list[tuple[int, bytes]]:
    """The floating pointer at ``layout.MPTABLE_ADDR`` and the configuration table after it."""
    table_addr = layout.MPTABLE_ADDR + FLOATING_SIZE
    table = config_table(platform, extra_gsis)
    if table_addr + len(table) > layout.MPTABLE_LIMIT:
        raise ValueError(f"the MP table ({len(table)} bytes) does not fit below {layout.MPTABLE_LIMIT:#x}")
    return [(layout.MPTABLE_ADDR, floating_pointer(table_addr)), (table_addr, table)]
