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
PT_NOTE: Final = 4
#: bounds on what note parsing reads (hostile images): notes per file, bytes per note segment
MAX_NOTES: Final = 256
MAX_NOTE_SEGMENT: Final = 1 << 20


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


class Note:
    """One ELF note (gABI "Note Section"): owner name, type and descriptor bytes."""

    __slots__ = ("name", "type", "desc")

    def __init__(self, name: bytes, type_: int, desc: bytes) -> None:
        self.name, self.type, self.desc = name, type_, desc


def parse_notes(data: bytes, name: str) -> list[Note]:
    """The notes in the PT_NOTE segments of an ELF file (already accepted by :func:`parse_elf`).
    Bounded: at most MAX_NOTES notes, each segment at most MAX_NOTE_SEGMENT bytes, every size
    checked against its segment."""
    cls = data[4]
    if cls == ELFCLASS64:
        e_phoff, e_phentsize, e_phnum = struct.unpack_from("<Q", data, 32)[0], *struct.unpack_from("<HH", data, 54)
    else:
        e_phoff, e_phentsize, e_phnum = struct.unpack_from("<I", data, 28)[0], *struct.unpack_from("<HH", data, 42)
    notes: list[Note] = []
    for i in range(e_phnum):
        at = e_phoff + i * e_phentsize
        if cls == ELFCLASS64:
            p_type, _f, p_offset, _v, _p, p_filesz = struct.unpack_from("<IIQQQQ", data, at)
        else:
            p_type, p_offset, _v, _p, p_filesz = struct.unpack_from("<IIIII", data, at)
        if p_type != PT_NOTE:
            continue
        if p_filesz > MAX_NOTE_SEGMENT or p_offset + p_filesz > len(data):
            raise BootError(f"{name}: note segment {i} is too large or extends past the end of the file")
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", data, pos)
            name_at = pos + 12
            desc_at = name_at + ((namesz + 3) & ~3)
            nxt = desc_at + ((descsz + 3) & ~3)
            if desc_at + descsz > end:
                raise BootError(f"{name}: a note in segment {i} extends past its segment")
            if len(notes) >= MAX_NOTES:
                raise BootError(f"{name} has more than {MAX_NOTES} ELF notes")
            notes.append(Note(data[name_at : name_at + namesz].rstrip(b"\0"), n_type, data[desc_at : desc_at + descsz]))
            pos = nxt
    return notes
