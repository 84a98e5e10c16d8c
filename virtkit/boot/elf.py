"""ELF32/ELF64 executable parsing (System V gABI, "ELF Header" and "Program Header").

Only what a loader needs: the class, machine, entry point and the PT_LOAD segments. Every offset
and size read from the file is checked against the file before use.
"""

from __future__ import annotations

import struct

from virtkit.errors import BootError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

ELF_MAGIC: Final = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB: Final = 1
ET_EXEC: Final = 2
EM_386, EM_X86_64 = 3, 62
PT_LOAD: Final = 1


class Segment:
    """One PT_LOAD program header."""

    __slots__ = ("paddr", "vaddr", "offset", "filesz", "memsz")

    def __init__(self, paddr: int, vaddr: int, offset: int, filesz: int, memsz: int) -> None:
        self.paddr, self.vaddr, self.offset, self.filesz, self.memsz = paddr, vaddr, offset, filesz, memsz


class ElfImage:
    __slots__ = ("bits", "entry", "segments")

    def __init__(self, bits: int, entry: int, segments: tuple[Segment, ...]) -> None:
        self.bits = bits  # 32 or 64
        self.entry = entry
        self.segments = segments


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def parse_elf(data: bytes, name: str) -> ElfImage:
    if not is_elf(data):
        raise BootError(f"{name} is not an ELF file (no \\x7fELF magic): give a Multiboot or ELF64 kernel")
    if len(data) < 52:
        raise BootError(f"{name} is truncated: too short for an ELF header")
    cls, endian = data[4], data[5]
    if endian != ELFDATA2LSB:
        raise BootError(f"{name} is a big-endian ELF file: x86 kernels are little-endian")
    if cls == ELFCLASS32:
        (e_type, e_machine, _v, e_entry, e_phoff, _sh, _fl, _ehs, e_phentsize, e_phnum) = struct.unpack_from(
            "<HHIIIIIHHH", data, 16
        )
        ph_fmt, bits = "<IIIIIIII", 32
    elif cls == ELFCLASS64:
        if len(data) < 64:
            raise BootError(f"{name} is truncated: too short for an ELF64 header")
        (e_type, e_machine, _v, e_entry, e_phoff, _sh, _fl, _ehs, e_phentsize, e_phnum) = struct.unpack_from(
            "<HHIQQQIHHH", data, 16
        )
        ph_fmt, bits = "<IIQQQQQQ", 64
    else:
        raise BootError(f"{name} has an unknown ELF class {cls}")
    if e_type != ET_EXEC:
        raise BootError(
            f"{name} is not an executable ELF file (e_type {e_type}): link it with -static and without -pie"
        )
    if e_machine not in (EM_386, EM_X86_64):
        raise BootError(f"{name} is not an x86 kernel (ELF machine {e_machine})")
    ph_size = struct.calcsize(ph_fmt)
    if e_phnum == 0 or e_phentsize < ph_size or e_phoff + e_phnum * e_phentsize > len(data):
        raise BootError(f"{name} has no valid program header table")
    segments = []
    for i in range(e_phnum):
        fields = struct.unpack_from(ph_fmt, data, e_phoff + i * e_phentsize)
        if bits == 32:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = fields[:6]
        else:
            p_type, _flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = fields[:7]
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz:
            raise BootError(f"{name}: segment {i} has a file size larger than its memory size")
        if p_offset + p_filesz > len(data):
            raise BootError(f"{name}: segment {i} extends past the end of the file (truncated?)")
        segments.append(Segment(p_paddr, p_vaddr, p_offset, p_filesz, p_memsz))
    if not segments:
        raise BootError(f"{name} has no loadable segment")
    return ElfImage(bits, e_entry, tuple(segments))
