"""ELF64 executables as Linux's ``execve`` loads them, and the initial process stack.

Pure functions over bytes (no guest memory): :func:`parse` reads the header and program headers
of an untrusted file with every offset and count checked; :func:`build_stack` lays out argc,
argv, envp and the auxiliary vector exactly as the kernel's ``create_elf_tables`` does.

References: System V gABI "ELF Header", "Program Header"; System V AMD64 psABI 1.0 §3.4.1
"Initial Stack and Register State" (figure 3.9) and §3.4.3 (auxiliary vector); Linux
include/uapi/linux/auxvec.h and arch/x86/include/uapi/asm/auxvec.h for the AT_* numbers.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

ET_EXEC, ET_DYN = 2, 3
EM_X86_64: Final = 62
PT_LOAD, PT_INTERP, PT_PHDR, PT_GNU_STACK = 1, 3, 6, 0x6474E551
PF_X, PF_W, PF_R = 1, 2, 4
#: like Linux: a program header table larger than this is refused (fs/binfmt_elf.c)
MAX_PHDR_BYTES: Final = 65536
MAX_INTERP: Final = 4096
#: where an ET_DYN main program goes (Linux's ELF_ET_DYN_BASE for x86-64, 2/3 of TASK_SIZE)
DYN_BASE: Final = 0x5555_5555_4000

AT_NULL, AT_PHDR, AT_PHENT, AT_PHNUM, AT_PAGESZ, AT_BASE, AT_FLAGS, AT_ENTRY = 0, 3, 4, 5, 6, 7, 8, 9
AT_UID, AT_EUID, AT_GID, AT_EGID, AT_PLATFORM, AT_HWCAP, AT_CLKTCK = 11, 12, 13, 14, 15, 16, 17
AT_SECURE, AT_RANDOM, AT_HWCAP2, AT_EXECFN = 23, 25, 26, 31


class ElfError(Exception):
    """Not an executable this loader runs; the message says why (ENOEXEC)."""


class Load:
    """One PT_LOAD: where it goes (before the load bias), what of the file, with what rights."""

    __slots__ = ("vaddr", "memsz", "offset", "filesz", "prot")

    def __init__(self, vaddr: int, memsz: int, offset: int, filesz: int, prot: int) -> None:
        self.vaddr, self.memsz, self.offset, self.filesz, self.prot = vaddr, memsz, offset, filesz, prot


class Executable:
    __slots__ = ("type", "entry", "phoff", "phentsize", "phnum", "phdr_vaddr", "loads", "interp")

    def __init__(self) -> None:
        self.type = ET_EXEC
        self.entry = 0
        self.phoff = self.phentsize = self.phnum = 0
        self.phdr_vaddr: int | None = None
        self.loads: list[Load] = []
        self.interp: bytes | None = None

    @property
    def span(self) -> tuple[int, int]:
        """[lowest page, highest end) of the PT_LOAD segments, before the bias."""
        lo = min(seg.vaddr for seg in self.loads) & ~0xFFF
        hi = max(seg.vaddr + seg.memsz for seg in self.loads)
        return lo, (hi + 0xFFF) & ~0xFFF

    def phdr_address(self, bias: int) -> int:
        """AT_PHDR: PT_PHDR's address, else the header table inside the segment that holds it."""
        if self.phdr_vaddr is not None:
            return self.phdr_vaddr + bias
        for seg in self.loads:
            if seg.offset <= self.phoff < seg.offset + seg.filesz:
                return seg.vaddr + (self.phoff - seg.offset) + bias
        return 0


def prot_of(p_flags: int) -> int:
    """PF_* to PROT_* (the same bit values, in a different order)."""
    return (1 if p_flags & PF_R else 0) | (2 if p_flags & PF_W else 0) | (4 if p_flags & PF_X else 0)


def parse(head: bytes, size: int) -> Executable:
    """Parse the ELF header and program headers found in ``head`` (the file's first bytes, at
    least the header table) of a file of ``size`` bytes. Raises ElfError."""
    if head[:4] != b"\x7fELF":
        raise ElfError("not an ELF file")
    if len(head) < 64 or head[4] != 2 or head[5] != 1:
        raise ElfError("not a 64-bit little-endian ELF file")
    e_type, e_machine, _v, e_entry, e_phoff, _sh, _fl, _ehs, e_phentsize, e_phnum = struct.unpack_from(
        "<HHIQQQIHHH", head, 16
    )
    if e_type not in (ET_EXEC, ET_DYN):
        raise ElfError(f"ELF type {e_type} is not an executable")
    if e_machine != EM_X86_64:
        raise ElfError(f"ELF machine {e_machine} is not x86-64")
    if e_phentsize != 56 or not 0 < e_phnum * 56 <= MAX_PHDR_BYTES:
        raise ElfError("bad program header table")
    if e_phoff + e_phnum * 56 > min(len(head), size):
        raise ElfError("program header table beyond the end of the file")
    exe = Executable()
    exe.type, exe.entry, exe.phoff, exe.phentsize, exe.phnum = e_type, e_entry, e_phoff, e_phentsize, e_phnum
    for i in range(e_phnum):
        p_type, p_flags, p_offset, p_vaddr, _pa, p_filesz, p_memsz, _al = struct.unpack_from(
            "<IIQQQQQQ", head, e_phoff + i * 56
        )
        if p_type == PT_LOAD:
            if p_memsz == 0:
                continue
            if p_filesz > p_memsz or p_offset + p_filesz > size:
                raise ElfError(f"segment {i} is larger than the file")
            if (p_vaddr - p_offset) & 0xFFF:
                raise ElfError(f"segment {i} is not page-congruent with its file offset")
            if p_vaddr + p_memsz > 0x7FFF_0000_0000:
                raise ElfError(f"segment {i} lies outside the user address range")
            exe.loads.append(Load(p_vaddr, p_memsz, p_offset, p_filesz, prot_of(p_flags)))
        elif p_type == PT_INTERP:
            if not 1 < p_filesz <= MAX_INTERP or p_offset + p_filesz > min(len(head), size):
                raise ElfError("bad PT_INTERP")
            exe.interp = bytes(head[p_offset : p_offset + p_filesz]).rstrip(b"\0")
        elif p_type == PT_PHDR:
            exe.phdr_vaddr = p_vaddr
    if not exe.loads:
        raise ElfError("no loadable segment")
    return exe


def build_stack(
    top: int,
    argv: list[bytes],
    envp: list[bytes],
    aux: list[tuple[int, int]],
    *,
    execfn: bytes,
    random16: bytes,
    platform: bytes = b"x86_64",
) -> tuple[int, bytes]:
    """The initial stack: returns (rsp, the bytes from rsp up to ``top``).

    ``aux`` holds the value-only entries; this adds AT_PLATFORM, AT_RANDOM and AT_EXECFN (pointers
    into the string area) and AT_NULL. At entry RSP is 16-byte aligned and points at argc."""
    strings = bytearray()
    offsets: list[int] = []

    def put(s: bytes) -> int:
        offsets.append(len(strings))
        strings.extend(s + b"\0")
        return len(strings) - len(s) - 1

    # the string area sits right below top; offsets turn into addresses once its size is known
    arg_offs = [put(a) for a in argv]
    env_offs = [put(e) for e in envp]
    exec_off = put(execfn)
    plat_off = put(platform)
    rand_off = len(strings)
    strings.extend(random16[:16].ljust(16, b"\0"))
    area = (len(strings) + 15) & ~15
    base = top - area
    aux_all = [*aux, (AT_PLATFORM, base + plat_off), (AT_RANDOM, base + rand_off), (AT_EXECFN, base + exec_off)]
    words = [len(argv)]
    words += [base + o for o in arg_offs] + [0]
    words += [base + o for o in env_offs] + [0]
    for k, v in aux_all:
        words += [k, v]
    words += [AT_NULL, 0]
    table = struct.pack(f"<{len(words)}Q", *words)
    rsp = (base - len(table)) & ~15
    pad = base - rsp - len(table)
    return rsp, table + bytes(pad) + bytes(strings).ljust(area, b"\0")
