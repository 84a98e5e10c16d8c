"""x86 descriptor and page-table encodings, and the CPU state each boot protocol starts in.

References: Intel SDM vol. 3A §3.4.5 (segment descriptors), §4.5 (4-level paging),
§7.2.3 / §8.2.3 (TSS descriptors), §9.8.5 (initializing IA-32e mode), §10.5.1 (LVT), vol. 4
(MSRs); Multiboot 0.6.96 §3.2 (machine state at entry); Linux Documentation/arch/x86/boot.rst
"64-bit BOOT PROTOCOL"; Xen docs/misc/pvh.pandoc (PVH entry state).
"""

from __future__ import annotations

import struct

from virtkit.arch import layout
from virtkit.kvm import structs as S

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

# CR0, CR4, EFER bits (SDM vol. 3A §2.5, §2.2.1)
CR0_PE: Final = 1 << 0
CR0_ET: Final = 1 << 4
CR0_NE: Final = 1 << 5
CR0_PG: Final = 1 << 31
CR4_PAE: Final = 1 << 5
EFER_LME: Final = 1 << 8
EFER_LMA: Final = 1 << 10
RFLAGS_RESERVED: Final = 1 << 1  # bit 1 always reads 1
RFLAGS_IF: Final = 1 << 9

# page-table entry bits (SDM vol. 3A §4.5, table 4-15ff)
PTE_PRESENT: Final = 1 << 0
PTE_WRITE: Final = 1 << 1
PTE_PS: Final = 1 << 7  # 2 MiB page in a page-directory entry

MULTIBOOT_BOOTLOADER_MAGIC: Final = 0x2BADB002

# MSRs (Intel SDM vol. 4, table 2-2) the Linux entry sets (as a BIOS leaves them after reset)
MSR_IA32_SYSENTER_CS: Final = 0x174
MSR_IA32_SYSENTER_ESP: Final = 0x175
MSR_IA32_SYSENTER_EIP: Final = 0x176
MSR_IA32_MISC_ENABLE: Final = 0x1A0
MSR_MTRR_DEF_TYPE: Final = 0x2FF
MSR_STAR: Final = 0xC000_0081
MSR_LSTAR: Final = 0xC000_0082
MSR_CSTAR: Final = 0xC000_0083
MSR_SYSCALL_MASK: Final = 0xC000_0084
MSR_KERNEL_GS_BASE: Final = 0xC000_0102
MISC_ENABLE_FAST_STRING: Final = 1 << 0
MTRR_DEF_TYPE_ENABLE: Final = 1 << 11  # MTRRs enabled (E)
MTRR_TYPE_WRBACK: Final = 6

# local APIC registers (SDM vol. 3A §11.4.1 table 11-1, offsets in the KVM_GET_LAPIC page)
APIC_LVT_LINT0: Final = 0x350
APIC_LVT_LINT1: Final = 0x360
APIC_DELIVERY_MASK: Final = 0x700
APIC_MODE_NMI: Final = 0x4
APIC_MODE_EXTINT: Final = 0x7

# FPU/SSE state after FNINIT (SDM vol. 1 §8.1.5 table 8-1) and the MXCSR reset value (§10.2.3)
FPU_CONTROL_INIT: Final = 0x37F
MXCSR_INIT: Final = 0x1F80

#: system-segment types (SDM vol. 3A table 3-2): 32/64-bit TSS, busy (as TR holds it once loaded)
TSS_TYPE_BUSY: Final = 0xB


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Encode a code/data segment descriptor. ``flags`` holds the access byte in bits 0-7 and
    the G/DB/L/AVL nibble in bits 12-15 (SDM vol. 3A figure 3-8)."""
    return (
        ((base & 0xFF000000) << 32)
        | ((flags & 0xF0FF) << 40)
        | ((limit & 0xF0000) << 32)
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0x0000FFFF)
    )


#: The boot GDT (selectors in layout.GDT_*). Access 0x9B = present, DPL0, code, execute/read, accessed;
#: 0x93 = present, DPL0, data, read/write, accessed. 0xA0__ = G + L (64-bit code); 0xC0__ = G + DB.
BOOT_GDT: Final = (
    0,  # 0x00 null
    gdt_entry(0xA09B, 0, 0xFFFFF),  # 0x08 64-bit code
    gdt_entry(0xC093, 0, 0xFFFFF),  # 0x10 data (flat 4 GiB)
    gdt_entry(0xC09B, 0, 0xFFFFF),  # 0x18 32-bit code (flat 4 GiB)
)


#: The Linux 64-bit boot protocol's GDT: __BOOT_CS (0x10) flat 64-bit code, __BOOT_DS (0x18) flat
#: data (boot.rst "64-bit BOOT PROTOCOL"), then a 64-bit TSS descriptor (two slots, 0x20/0x28).
def linux_gdt() -> tuple[int, ...]:
    low, high = tss64_descriptor(layout.LINUX_TSS_ADDR, layout.LINUX_TSS_SIZE - 1)
    return (0, 0, gdt_entry(0xA09B, 0, 0xFFFFF), gdt_entry(0xC093, 0, 0xFFFFF), low, high)


#: The PVH entry's GDT (pvh.pandoc): flat 32-bit code (0x08) and data (0x10), a 32-bit TSS (0x18)
#: with base 0 and limit 0x67.
PVH_GDT: Final = (
    0,
    gdt_entry(0xC09B, 0, 0xFFFFF),
    gdt_entry(0xC093, 0, 0xFFFFF),
    gdt_entry(0x0089, 0, 0x67),  # present, DPL0, available 32-bit TSS, byte granular
)


def tss64_descriptor(base: int, limit: int) -> tuple[int, int]:
    """The two 8-byte halves of a 64-bit available TSS descriptor (SDM vol. 3A §8.2.3, fig. 8-4)."""
    low = gdt_entry(0x0089, base & 0xFFFF_FFFF, limit)
    return low, base >> 32


def segment_from_gdt(selector: int, entry: int) -> S.kvm_segment:
    """The hidden part of a segment register as the CPU would load it from ``entry``."""
    seg = S.kvm_segment()
    seg.base = ((entry >> 16) & 0xFFFFFF) | (((entry >> 56) & 0xFF) << 24)
    limit = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16)
    seg.g = (entry >> 55) & 1
    seg.limit = (limit << 12) | 0xFFF if seg.g else limit
    seg.selector = selector
    seg.type = (entry >> 40) & 0xF
    seg.s = (entry >> 44) & 1
    seg.dpl = (entry >> 45) & 3
    seg.present = (entry >> 47) & 1
    seg.avl = (entry >> 52) & 1
    seg.l = (entry >> 53) & 1
    seg.db = (entry >> 54) & 1
    return seg


def gdt_bytes(gdt: tuple[int, ...] = BOOT_GDT) -> bytes:
    return struct.pack(f"<{len(gdt)}Q", *gdt)


def task_register(selector: int, entry: int, high: int = 0) -> S.kvm_segment:
    """TR as LTR leaves it: the descriptor's base and limit, type busy (SDM vol. 3A §7.2.4)."""
    tr = segment_from_gdt(selector, entry)
    tr.base |= high << 32
    tr.type = TSS_TYPE_BUSY
    return tr


def identity_page_tables() -> list[tuple[int, bytes]]:
    """PML4, PDPT and four page directories mapping the first 4 GiB with 2 MiB pages.

    Returned as (guest-physical address, bytes) pairs to write into guest memory.
    """
    pml4 = struct.pack("<Q", layout.PDPT_ADDR | PTE_PRESENT | PTE_WRITE).ljust(4096, b"\0")
    pdpt = b"".join(struct.pack("<Q", (layout.PD_ADDR + i * 4096) | PTE_PRESENT | PTE_WRITE) for i in range(4)).ljust(
        4096, b"\0"
    )
    pds = struct.pack("<2048Q", *(((i << 21) | PTE_PRESENT | PTE_WRITE | PTE_PS) for i in range(2048)))
    return [(layout.PML4_ADDR, pml4), (layout.PDPT_ADDR, pdpt), (layout.PD_ADDR, pds)]


#: entry modes: Multiboot, virtkit's direct 64-bit entry, Linux's 64-bit boot protocol, PVH
ENTRY_MODES: Final = ("protected32", "long64", "linux64", "pvh32")


class EntryState:
    """Where and how the boot vCPU starts. ``protocol``: what the loader detected, for --stats
    and errors (e.g. "linux (bzImage)")."""

    __slots__ = ("mode", "rip", "rax", "rbx", "rsp", "rsi", "protocol")

    def __init__(
        self,
        mode: str,
        rip: int,
        rax: int = MULTIBOOT_BOOTLOADER_MAGIC,
        rbx: int = 0,
        rsp: int = 0,
        rsi: int = 0,
        protocol: str = "",
    ) -> None:
        if mode not in ENTRY_MODES:
            raise ValueError(f"unknown entry mode {mode!r}")
        self.mode = mode
        self.rip, self.rax, self.rbx, self.rsp, self.rsi = rip, rax, rbx, rsp, rsi
        self.protocol = protocol or mode

    @property
    def is_linux(self) -> bool:
        """A Linux protocol: the guest gets the boot MSR/LAPIC/FPU state (every guest gets the
        ACPI and MP tables)."""
        return self.mode in ("linux64", "pvh32")


def apply_entry_state(regs: S.kvm_regs, sregs: S.kvm_sregs, entry: EntryState) -> None:
    """Fill the boot vCPU's registers for ``entry`` (SDM vol. 3A §9.8.5; Multiboot §3.2;
    boot.rst "64-bit BOOT PROTOCOL"; pvh.pandoc)."""
    if entry.mode == "linux64":
        _linux64_state(regs, sregs, entry)
        return
    if entry.mode == "pvh32":
        _pvh32_state(regs, sregs, entry)
        return
    code_sel = layout.GDT_CODE64 if entry.mode == "long64" else layout.GDT_CODE32
    code = segment_from_gdt(code_sel, BOOT_GDT[code_sel >> 3])
    data = segment_from_gdt(layout.GDT_DATA, BOOT_GDT[layout.GDT_DATA >> 3])
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.gdt.base, sregs.gdt.limit = layout.GDT_ADDR, len(BOOT_GDT) * 8 - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    if entry.mode == "long64":
        sregs.cr3 = layout.PML4_ADDR
        sregs.cr4 = CR4_PAE
        sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
        sregs.efer = EFER_LME | EFER_LMA
    else:
        sregs.cr0 = CR0_PE | CR0_ET
        sregs.cr4 = 0
        sregs.efer = 0
    regs.rip = entry.rip
    regs.rax = entry.rax
    regs.rbx = entry.rbx
    regs.rsp = entry.rsp
    regs.rflags = RFLAGS_RESERVED  # IF clear: both protocols start with interrupts disabled


def _linux64_state(regs: S.kvm_regs, sregs: S.kvm_sregs, entry: EntryState) -> None:
    # boot.rst: 64-bit mode, paging on, the kernel/zero page/cmdline identity mapped, a GDT with
    # __BOOT_CS/__BOOT_DS flat, CS = __BOOT_CS, DS/ES/SS = __BOOT_DS, interrupts off, RSI = the
    # zero page. TR and IDTR are loaded too: VM entry on VT-x requires a usable TR.
    gdt = linux_gdt()
    code = segment_from_gdt(layout.LINUX_BOOT_CS, gdt[layout.LINUX_BOOT_CS >> 3])
    data = segment_from_gdt(layout.LINUX_BOOT_DS, gdt[layout.LINUX_BOOT_DS >> 3])
    tss = layout.LINUX_BOOT_TSS >> 3
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = task_register(layout.LINUX_BOOT_TSS, gdt[tss], gdt[tss + 1])
    sregs.gdt.base, sregs.gdt.limit = layout.GDT_ADDR, len(gdt) * 8 - 1
    sregs.idt.base, sregs.idt.limit = layout.LINUX_IDT_ADDR, 7
    sregs.cr3 = layout.PML4_ADDR
    sregs.cr4 = CR4_PAE
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
    sregs.efer = EFER_LME | EFER_LMA
    regs.rip, regs.rsi, regs.rsp = entry.rip, entry.rsi, entry.rsp
    regs.rax = regs.rbx = 0
    regs.rflags = RFLAGS_RESERVED


def _pvh32_state(regs: S.kvm_regs, sregs: S.kvm_sregs, entry: EntryState) -> None:
    # pvh.pandoc: 32-bit protected mode, paging off; CS flat 32-bit code, DS/ES/SS flat data;
    # TR a 32-bit TSS with base 0 and limit 0x67; CR0 = PE (+ET), CR4 = 0; IF/TF/VM clear;
    # EBX = the physical address of hvm_start_info.
    code = segment_from_gdt(layout.PVH_BOOT_CS, PVH_GDT[layout.PVH_BOOT_CS >> 3])
    data = segment_from_gdt(layout.PVH_BOOT_DS, PVH_GDT[layout.PVH_BOOT_DS >> 3])
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = task_register(layout.PVH_BOOT_TSS, PVH_GDT[layout.PVH_BOOT_TSS >> 3])
    sregs.gdt.base, sregs.gdt.limit = layout.GDT_ADDR, len(PVH_GDT) * 8 - 1
    sregs.idt.base, sregs.idt.limit = layout.LINUX_IDT_ADDR, 7
    sregs.cr0 = CR0_PE | CR0_ET
    sregs.cr4 = 0
    sregs.efer = 0
    regs.rip, regs.rbx = entry.rip, entry.rbx
    regs.rax = regs.rsi = regs.rsp = 0
    regs.rflags = RFLAGS_RESERVED


def linux_boot_msrs() -> dict[int, int]:
    """The MSRs a Linux kernel expects as firmware leaves them: the system-call MSRs cleared, fast
    strings on, MTRRs enabled with write-back as the default type (no variable ranges: all RAM is
    WB; the MMIO hole's type comes from the guest's PAT/page tables)."""
    return {
        MSR_IA32_SYSENTER_CS: 0,
        MSR_IA32_SYSENTER_ESP: 0,
        MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0,
        MSR_LSTAR: 0,
        MSR_CSTAR: 0,
        MSR_KERNEL_GS_BASE: 0,
        MSR_SYSCALL_MASK: 0,
        MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_DEF_TYPE_ENABLE | MTRR_TYPE_WRBACK,
    }


def _set_delivery_mode(regs: bytearray, offset: int, mode: int) -> None:
    value = int.from_bytes(regs[offset : offset + 4], "little")
    value = (value & ~APIC_DELIVERY_MASK) | (mode << 8)
    regs[offset : offset + 4] = value.to_bytes(4, "little")


def lapic_with_lint(state: S.kvm_lapic_state) -> S.kvm_lapic_state:
    """``state`` with LINT0 delivering ExtINT (the 8259's output, virtual-wire mode) and LINT1
    delivering NMI (SDM vol. 3A §10.5.1; Intel MP spec 1.4 §3.6.2.2), as a PC BIOS leaves them."""
    regs = bytearray(bytes(state.regs))
    _set_delivery_mode(regs, APIC_LVT_LINT0, APIC_MODE_EXTINT)
    _set_delivery_mode(regs, APIC_LVT_LINT1, APIC_MODE_NMI)
    out = S.kvm_lapic_state()
    out.regs[:] = list(regs)
    return out


def fpu_init_state() -> S.kvm_fpu:
    """x87 and SSE state after FNINIT and reset: FCW 0x37F (all exceptions masked, 64-bit
    precision), MXCSR 0x1F80 (all SIMD exceptions masked)."""
    fpu = S.kvm_fpu()
    fpu.fcw = FPU_CONTROL_INIT
    fpu.mxcsr = MXCSR_INIT
    return fpu
