"""x86 descriptor and page-table encodings, and the CPU state each boot protocol starts in.

References: Intel SDM vol. 3A §3.4.5 (segment descriptors), §4.5 (4-level paging),
§9.8.5 (initializing IA-32e mode); Multiboot 0.6.96 §3.2 (machine state at entry).
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


def gdt_bytes() -> bytes:
    return struct.pack(f"<{len(BOOT_GDT)}Q", *BOOT_GDT)


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


class EntryState:
    """Where and how the boot vCPU starts."""

    __slots__ = ("mode", "rip", "rax", "rbx", "rsp")

    def __init__(self, mode: str, rip: int, rax: int = MULTIBOOT_BOOTLOADER_MAGIC, rbx: int = 0, rsp: int = 0) -> None:
        self.mode = mode  # "protected32" (Multiboot) or "long64" (direct 64-bit entry)
        self.rip, self.rax, self.rbx, self.rsp = rip, rax, rbx, rsp


def apply_entry_state(regs: S.kvm_regs, sregs: S.kvm_sregs, entry: EntryState) -> None:
    """Fill the boot vCPU's registers for ``entry`` (SDM vol. 3A §9.8.5; Multiboot §3.2)."""
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
