"""Every fixed guest-physical address virtkit uses, in one place.

Low memory (below 1 MiB) holds what virtkit itself builds for the guest; kernels load at or
above 1 MiB (the Multiboot convention, and where QEMU's loader puts them too). The ranges below
are reported to the guest as *reserved* in the Multiboot memory map, so a guest that honours the
map never overwrites them.

    0x0000_0000  real-mode IVT / BDA            (reserved, left zero)
    0x0000_0500  GDT built by virtkit           (direct 64-bit entry and AP bring-up)
    0x0000_1000  boot stack, grows down from BOOT_STACK_TOP
    0x0000_9000  PML4, PDPT, 4 page directories (direct 64-bit entry: identity map of 4 GiB)
    0x0001_0000  Multiboot information, memory map, command line, module list
    0x0008_0000  end of what virtkit writes; 0x8_0000-0x9_FFFF left to the guest (conventional RAM)
    0x000A_0000  legacy VGA/BIOS hole           (reserved in the map; backed by RAM)

Linux guests (boot/linux.py, boot/pvh.py) use the same GDT page and page tables, and also:

    0x0000_0580  IDT (one null gate) and 0x600 the TSS that TR points at
    0x0000_7000  zero page (struct boot_params) or PVH hvm_start_info, memory map, module list
    0x0002_0000  kernel command line (up to LINUX_CMDLINE_MAX bytes)
    0x0009_FC00  EBDA (reserved from here to 1 MiB in the e820 map)
    0x000E_0000  ACPI: RSDP, then DSDT, FADT, MADT, XSDT (ACPI 6.5 §5.2.5.1: RSDP search area)
    0x000F_0000  MP floating pointer and configuration table (Intel MP spec 1.4 §4: BIOS ROM area)
    top of low RAM, below the kernel's initrd_addr_max: the initrd

and report to the kernel (e820): RAM 0..EBDA, reserved EBDA..1 MiB, RAM 1 MiB..the MMIO hole,
RAM above 4 GiB.
    0x0010_0000  kernel image (typical Multiboot link address)
    0xC000_0000  start of the 32-bit MMIO hole: nothing is RAM from here to 4 GiB
    0xD000_0000  virtio-mmio device window      (paravirtualized devices, one 4 KiB page each)
    0xFEC0_0000  IOAPIC                         (in-kernel irqchip)
    0xFEE0_0000  local APIC                     (in-kernel irqchip)
    0x1_0000_0000 RAM above the hole, for guests larger than MMIO_HOLE_START
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

PAGE_SIZE: Final = 0x1000
MiB: Final = 1 << 20
GiB: Final = 1 << 30

# --- structures virtkit writes into low memory -----------------------------------------------
#: Global descriptor table for the direct 64-bit entry (Intel SDM vol. 3A §3.4.5).
GDT_ADDR: Final = 0x500
#: Interrupt descriptor table: none is built; the guest installs its own (IDTR limit 0 at entry).
BOOT_STACK_TOP: Final = 0x8FF0
#: Page tables for the direct 64-bit entry: PML4, one PDPT, four page directories of 2 MiB pages.
PML4_ADDR: Final = 0x9000
PDPT_ADDR: Final = 0xA000
PD_ADDR: Final = 0xB000  # four consecutive pages: 0xB000..0xEFFF map 0..4 GiB
IDENTITY_MAP_BYTES: Final = 4 * GiB
#: Multiboot information structure and what it points to (Multiboot 0.6.96 §3.3).
MBI_ADDR: Final = 0x1_0000
MBI_LIMIT: Final = 0x8_0000  # everything the loader writes for the MBI ends below this
#: First byte a kernel image or module may occupy.
KERNEL_MIN_ADDR: Final = 0x10_0000
#: Lowest address virtkit reserves for its own structures (the IVT/BDA page below it is reserved too).
LOADER_RESERVED_START: Final = 0x0
LOADER_RESERVED_END: Final = MBI_LIMIT

# --- Linux guests (Documentation/arch/x86/boot.rst, zero-page.rst; Xen start_info.h) -----------
#: IDT loaded at entry for Linux: one all-zero gate (the kernel loads its own before it enables
#: interrupts; until then an exception is a triple fault, which virtkit reports).
LINUX_IDT_ADDR: Final = 0x580
#: 64-bit TSS (Intel SDM vol. 3A §8.7) that TR holds at entry; 104 bytes, all zero.
LINUX_TSS_ADDR: Final = 0x600
LINUX_TSS_SIZE: Final = 0x68
#: struct boot_params (the "zero page"), one page; RSI points here at the 64-bit entry.
ZERO_PAGE_ADDR: Final = 0x7000
#: PVH: struct hvm_start_info, then its memory map and module list, from the same page on.
PVH_START_INFO_ADDR: Final = ZERO_PAGE_ADDR
PVH_START_INFO_LIMIT: Final = 0x8000  # the boot stack (below BOOT_STACK_TOP) is above
#: the kernel command line (boot.rst "cmd_line_ptr"); bounded by the kernel's cmdline_size too.
LINUX_CMDLINE_ADDR: Final = 0x2_0000
LINUX_CMDLINE_MAX: Final = 0x1_0000
#: Extended BIOS Data Area: the last KiB of base memory. From here to 1 MiB the e820 map says
#: reserved: the firmware area, where the ACPI and MP tables are.
EBDA_START: Final = 0x9_FC00
#: ACPI tables; the RSDP is also found by a scan of 0xE0000-0xFFFFF (ACPI 6.5 §5.2.5.1).
ACPI_TABLES_ADDR: Final = 0xE_0000
ACPI_RSDP_ADDR: Final = ACPI_TABLES_ADDR
ACPI_TABLES_LIMIT: Final = 0xF_0000
#: MP floating pointer, then the MP configuration table: in the BIOS ROM area 0xF0000-0xFFFFF,
#: one of the places a kernel searches (Intel MP spec 1.4 §4; Linux smp_scan_config). The EBDA's
#: single KiB would hold only a few dozen processor entries.
MPTABLE_ADDR: Final = 0xF_0000
MPTABLE_LIMIT: Final = 0x10_0000
#: APIC IDs in the MADT's local APIC entries and the MP table are 8 bits, 0xFF is broadcast,
#: and the IOAPIC takes the ID after the last vCPU.
LINUX_MAX_VCPUS: Final = 254
#: where the protected-mode part of a bzImage (or a vmlinux) loads: 1 MiB, the boot protocol's
#: default for a bzImage (boot.rst "LOADING THE REST OF THE KERNEL").
LINUX_LOAD_ADDR: Final = 0x10_0000

# --- the legacy PC hole between 640 KiB and 1 MiB ----------------------------------------------
LOW_MEMORY_END: Final = 0xA_0000  # "mem_lower" ends here: 640 KiB
LEGACY_HOLE_END: Final = 0x10_0000

# --- the 32-bit MMIO hole --------------------------------------------------------------------
MMIO_HOLE_START: Final = 0xC000_0000
MMIO_HOLE_END: Final = 0x1_0000_0000
#: virtio-mmio devices: one 4 KiB window each, from here up (virtio 1.2 §4.2.2).
VIRTIO_MMIO_BASE: Final = 0xD000_0000
VIRTIO_MMIO_SIZE: Final = 0x1000
#: Interrupt lines (IOAPIC pins = GSIs) handed to virtio-mmio devices, in slot order: every pin of
#: KVM's 24-pin IOAPIC (KVM_IOAPIC_NUM_PINS) that no ISA device of the PC claims. Left out: 0 PIT,
#: 1 keyboard, 2 cascade, 3 COM2, 4 COM1, 8 RTC, 12 PS/2 mouse, 14 and 15 the ATA channels: a Linux
#: guest's drivers for those take their lines edge-triggered and unshared, so a virtio device
#: there would fail to get its interrupt.
VIRTIO_GSIS: Final = (5, 6, 7, 9, 10, 11, 13, 16, 17, 18, 19, 20, 21, 22, 23)
#: one virtio-mmio slot per line
VIRTIO_MMIO_MAX_DEVICES: Final = len(VIRTIO_GSIS)
IOAPIC_ADDR: Final = 0xFEC0_0000
LAPIC_ADDR: Final = 0xFEE0_0000
#: KVM needs three pages for the real-mode TSS on VT-x (KVM_SET_TSS_ADDR); put them in the hole.
KVM_TSS_ADDR: Final = 0xFFFB_D000
KVM_IDENTITY_MAP_ADDR: Final = 0xFFFB_C000

# --- paravirtual interface (docs/HYPERCALLS.md) ----------------------------------------------
#: the hypercall doorbell: a 32-bit OUT of a hypercall block's guest-physical address. Port I/O
#: exits from CPL0 and from CPL3 (IOPL=3) on every KVM flavor, unlike VMCALL (see the doc).
HYPERCALL_PORT: Final = 0x0C40
HYPERCALL_PORT_COUNT: Final = 4

# --- ACPI hardware-reduced power registers (devices/legacy/acpi_power.py) ---------------------
#: three byte-wide I/O ports: the FADT's SLEEP_CONTROL_REG, SLEEP_STATUS_REG and RESET_REG
#: (ACPI 6.5 §4.8.3.7, §4.8.3.6, table 5.9). Any free ports would do; these are next to no
#: legacy PC device, and the FADT tells the guest where they are.
ACPI_POWER_PORT: Final = 0x0C48
ACPI_POWER_PORT_COUNT: Final = 3
ACPI_SLEEP_CONTROL_PORT: Final = ACPI_POWER_PORT
ACPI_SLEEP_STATUS_PORT: Final = ACPI_POWER_PORT + 1
ACPI_RESET_PORT: Final = ACPI_POWER_PORT + 2

# --- x86 segment selectors in the boot GDT ---------------------------------------------------
GDT_NULL: Final = 0
GDT_CODE64: Final = 0x08
GDT_DATA: Final = 0x10
GDT_CODE32: Final = 0x18
GDT_TSS: Final = 0x20  # a 64-bit TSS descriptor takes two slots (0x20 and 0x28)
#: the Linux 64-bit boot protocol's selectors (boot.rst "64-bit BOOT PROTOCOL": __BOOT_CS 0x10,
#: __BOOT_DS 0x18) and the TSS after them
LINUX_BOOT_CS: Final = 0x10
LINUX_BOOT_DS: Final = 0x18
LINUX_BOOT_TSS: Final = 0x20
#: PVH entry (Xen docs/misc/pvh.pandoc): a flat 32-bit code and data segment and a 32-bit TSS
PVH_BOOT_CS: Final = 0x08
PVH_BOOT_DS: Final = 0x10
PVH_BOOT_TSS: Final = 0x18

# --- memory sizes ----------------------------------------------------------------------------
MIN_MEMORY: Final = 2 * MiB  # room for low memory structures and a small kernel
DEFAULT_MEMORY: Final = 64 * MiB


def low_ram_end(memory_size: int) -> int:
    """End of the RAM below the 32-bit MMIO hole."""
    return min(memory_size, MMIO_HOLE_START)


def ram_ranges(memory_size: int) -> list[tuple[int, int]]:
    """Guest-physical RAM as (start, size) ranges for a machine with ``memory_size`` bytes.

    RAM fills from 0 up to the MMIO hole; what does not fit continues at 4 GiB.
    """
    if memory_size <= MMIO_HOLE_START:
        return [(0, memory_size)]
    return [(0, MMIO_HOLE_START), (MMIO_HOLE_END, memory_size - MMIO_HOLE_START)]
