"""The PVH boot entry: a 32-bit protected-mode entry point named by an ELF note, and the
``hvm_start_info`` record the kernel finds through EBX.

Specs: Xen's xen/include/public/elfnote.h (``XEN_ELFNOTE_PHYS32_ENTRY`` = 18, owner "Xen"),
xen/include/public/arch-x86/hvm/start_info.h (``struct hvm_start_info`` version 1 with the memory
map, ``struct hvm_modlist_entry``, ``struct hvm_memmap_table_entry``) and docs/misc/pvh.pandoc
(the machine state at entry). Linux offers the note when built with CONFIG_PVH.
"""

from __future__ import annotations

import struct

from virtkit.arch import layout
from virtkit.boot.elf import Note
from virtkit.errors import BootError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

XEN_NOTE_OWNER: Final = b"Xen"
XEN_ELFNOTE_PHYS32_ENTRY: Final = 18
START_INFO_MAGIC: Final = 0x336E_C578
START_INFO_VERSION: Final = 1  # version 1 adds memmap_paddr / memmap_entries
START_INFO_SIZE: Final = 56
MODLIST_ENTRY_SIZE: Final = 32
MEMMAP_ENTRY_SIZE: Final = 24
_START_INFO: Final = struct.Struct("<IIIIQQQQII")


def pvh_entry(notes: list[Note], name: str) -> int | None:
    """The 32-bit physical entry point from ``XEN_ELFNOTE_PHYS32_ENTRY``, or None without one."""
    for note in notes:
        if note.name != XEN_NOTE_OWNER or note.type != XEN_ELFNOTE_PHYS32_ENTRY:
            continue
        if len(note.desc) not in (4, 8):
            raise BootError(f"{name}: its XEN_ELFNOTE_PHYS32_ENTRY note has {len(note.desc)} bytes, not 4 or 8")
        entry = int.from_bytes(note.desc, "little")
        if entry >= 1 << 32:
            raise BootError(f"{name}: the PVH entry point {entry:#x} is above 4 GiB; PVH enters in 32-bit mode")
        return entry
    return None


def build_start_info(
    *, e820: list[tuple[int, int, int]], cmdline_addr: int, initrd: tuple[int, int] | None, rsdp_addr: int
) -> bytes:
    """``hvm_start_info`` at ``layout.PVH_START_INFO_ADDR``, followed by the module list (the
    initrd, if any) and the memory map (e820 types, as start_info.h says), as one blob."""
    base = layout.PVH_START_INFO_ADDR
    modlist_addr = base + START_INFO_SIZE
    mods = b""
    if initrd is not None:
        mods = struct.pack("<QQQQ", initrd[0], initrd[1], 0, 0)
    memmap_addr = modlist_addr + len(mods)
    memmap = b"".join(struct.pack("<QQII", a, n, t, 0) for a, n, t in e820)
    head = _START_INFO.pack(
        START_INFO_MAGIC,
        START_INFO_VERSION,
        0,  # flags: no SIF_* apply
        1 if initrd is not None else 0,
        modlist_addr if initrd is not None else 0,
        cmdline_addr,
        rsdp_addr,
        memmap_addr,
        len(e820),
        0,
    )
    blob = head + mods + memmap
    if base + len(blob) > layout.PVH_START_INFO_LIMIT:
        raise BootError("the PVH start info and memory map do not fit their area in low memory")
    return blob
