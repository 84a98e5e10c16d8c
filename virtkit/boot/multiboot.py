"""Multiboot (version 1, spec 0.6.96) kernel loading and boot information.

§3.1: the header lies in the first 8192 bytes, 32-bit aligned; magic + flags + checksum sum to 0.
§3.3: the boot information structure (MBI) the kernel finds through EBX at entry.
"""

from __future__ import annotations

import struct

from virtkit.arch import layout
from virtkit.errors import BootError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

HEADER_MAGIC: Final = 0x1BADB002
HEADER_SEARCH: Final = 8192

# header flags (§3.1.2)
F_PAGE_ALIGN: Final = 1 << 0
F_MEMORY_INFO: Final = 1 << 1
F_VIDEO_MODE: Final = 1 << 2
F_ADDRESS_FIELDS: Final = 1 << 16
_SUPPORTED_REQUIRED: Final = F_PAGE_ALIGN | F_MEMORY_INFO | F_VIDEO_MODE

# MBI flags (§3.3)
MBI_MEM: Final = 1 << 0
MBI_CMDLINE: Final = 1 << 2
MBI_MODS: Final = 1 << 3
MBI_MMAP: Final = 1 << 6
MBI_LOADER_NAME: Final = 1 << 9

MMAP_AVAILABLE: Final = 1
MMAP_RESERVED: Final = 2
MBI_SIZE: Final = 88  # through the VBE fields; we fill the first 72 bytes
LOADER_NAME: Final = b"virtkit\0"


class MultibootHeader:
    """The header (§3.1.1); the address fields only matter when flag bit 16 is set."""

    __slots__ = ("offset", "flags", "header_addr", "load_addr", "load_end_addr", "bss_end_addr", "entry_addr")

    def __init__(
        self,
        offset: int,
        flags: int,
        header_addr: int = 0,
        load_addr: int = 0,
        load_end_addr: int = 0,
        bss_end_addr: int = 0,
        entry_addr: int = 0,
    ) -> None:
        self.offset, self.flags = offset, flags
        self.header_addr, self.load_addr, self.load_end_addr = header_addr, load_addr, load_end_addr
        self.bss_end_addr, self.entry_addr = bss_end_addr, entry_addr

    @property
    def page_align_modules(self) -> bool:
        return bool(self.flags & F_PAGE_ALIGN)

    @property
    def has_address_fields(self) -> bool:
        return bool(self.flags & F_ADDRESS_FIELDS)


def find_header(data: bytes) -> MultibootHeader | None:
    limit = min(len(data), HEADER_SEARCH) - 12
    for off in range(0, limit + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic != HEADER_MAGIC or (magic + flags + checksum) & 0xFFFF_FFFF:
            continue
        if flags & F_ADDRESS_FIELDS:
            if off + 32 > len(data):
                raise BootError("the Multiboot header's address fields are cut off (truncated file?)")
            return MultibootHeader(off, flags, *struct.unpack_from("<IIIII", data, off + 12))
        return MultibootHeader(off, flags)
    return None


def check_required_flags(header: MultibootHeader, name: str) -> None:
    unknown = header.flags & 0xFFFF & ~_SUPPORTED_REQUIRED
    if unknown:
        raise BootError(f"{name} requires Multiboot features virtkit does not provide (flags {unknown:#x})")


class Module:
    """A loaded module as the MBI lists it (§3.3, mods_addr)."""

    __slots__ = ("start", "end", "string")

    def __init__(self, start: int, end: int, string: str) -> None:
        self.start, self.end, self.string = start, end, string


def memory_map(ram: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(base, length, type) entries: RAM as available, virtkit's low structures and the legacy
    hole as reserved (§3.3 'mmap_*')."""
    entries: list[tuple[int, int, int]] = []
    for base, size in ram:
        end = base + size
        if base == 0:
            entries.append((0, layout.LOADER_RESERVED_END, MMAP_RESERVED))
            entries.append(
                (layout.LOADER_RESERVED_END, layout.LOW_MEMORY_END - layout.LOADER_RESERVED_END, MMAP_AVAILABLE)
            )
            entries.append((layout.LOW_MEMORY_END, layout.LEGACY_HOLE_END - layout.LOW_MEMORY_END, MMAP_RESERVED))
            if end > layout.LEGACY_HOLE_END:
                entries.append((layout.LEGACY_HOLE_END, end - layout.LEGACY_HOLE_END, MMAP_AVAILABLE))
        else:
            entries.append((base, size, MMAP_AVAILABLE))
    return entries


def build_mbi(ram: list[tuple[int, int]], cmdline: str, modules: list[Module]) -> bytes:
    """The MBI and everything it points to, laid out from ``layout.MBI_ADDR``."""
    blob = bytearray(MBI_SIZE)

    def place(data: bytes, align: int = 8) -> int:
        while len(blob) % align:
            blob.append(0)
        addr = layout.MBI_ADDR + len(blob)
        blob.extend(data)
        return addr

    cmdline_addr = place(cmdline.encode() + b"\0")
    name_addr = place(LOADER_NAME)
    mmap = b"".join(struct.pack("<IQQI", 20, b, n, t) for b, n, t in memory_map(ram))
    mmap_addr = place(mmap)
    mod_strings = [place(m.string.encode() + b"\0") for m in modules]
    mods = b"".join(struct.pack("<IIII", m.start, m.end, s, 0) for m, s in zip(modules, mod_strings, strict=False))
    mods_addr = place(mods) if modules else 0
    low_ram = ram[0][1]
    # mem_lower: KiB from 0 (max 640); mem_upper: KiB from 1 MiB to the first hole
    mem_lower = layout.LOW_MEMORY_END >> 10
    mem_upper = max(low_ram - layout.LEGACY_HOLE_END, 0) >> 10
    flags = MBI_MEM | MBI_CMDLINE | MBI_MMAP | MBI_LOADER_NAME | (MBI_MODS if modules else 0)
    struct.pack_into(
        "<IIIIIII", blob, 0, flags, mem_lower, mem_upper, 0xFFFFFFFF, cmdline_addr, len(modules), mods_addr
    )
    struct.pack_into("<II", blob, 44, len(mmap), mmap_addr)
    struct.pack_into("<I", blob, 64, name_addr)
    if layout.MBI_ADDR + len(blob) > layout.MBI_LIMIT:
        raise BootError(
            "the command line and module strings are too long for the boot information area "
            f"({layout.MBI_LIMIT - layout.MBI_ADDR} bytes)"
        )
    return bytes(blob)
