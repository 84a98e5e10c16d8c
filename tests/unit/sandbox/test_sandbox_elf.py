"""The sandbox's ELF parsing and initial stack (psABI §3.4.1), from bytes alone."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from virtkit.sandbox import elf


def _exe(phdrs: list[tuple[int, ...]], *, e_type: int = elf.ET_EXEC, machine: int = elf.EM_X86_64) -> bytes:
    head = b"\x7fELF" + bytes((2, 1, 1)) + bytes(9)
    head += struct.pack("<HHIQQQIHHHHHH", e_type, machine, 1, 0x401000, 64, 0, 0, 64, 56, len(phdrs), 0, 0, 0)
    return head + b"".join(struct.pack("<IIQQQQQQ", *ph) for ph in phdrs)


LOAD = (elf.PT_LOAD, elf.PF_R | elf.PF_X, 0, 0x400000, 0x400000, 0x200, 0x1000, 0x1000)


def test_parse_load_and_interp() -> None:
    data = _exe([LOAD, (elf.PT_INTERP, elf.PF_R, 0xB0, 0, 0, 11, 11, 1)]).ljust(0xB0, b"\0") + b"/lib/ld.so\0"
    data = data.ljust(0x200, b"\0")
    exe = elf.parse(data, len(data))
    assert exe.entry == 0x401000 and exe.interp == b"/lib/ld.so"
    (seg,) = exe.loads
    assert (seg.vaddr, seg.memsz, seg.prot) == (0x400000, 0x1000, 5)
    assert exe.span == (0x400000, 0x401000)
    assert exe.phdr_address(0) == 0x400040  # the table inside the first segment


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"#!/bin/sh\n", "not an ELF"),
        (_exe([LOAD], machine=3), "not x86-64"),
        (_exe([LOAD], e_type=1), "not an executable"),
        (_exe([LOAD])[:100], "beyond the end"),
        (_exe([(elf.PT_LOAD, 4, 0, 0x400000, 0, 1 << 20, 1 << 20, 0)]), "larger than the file"),
        (_exe([(elf.PT_LOAD, 4, 0, 0x7FFF_FFFF_0000, 0, 0, 1 << 20, 0)]), "outside the user"),
        (_exe([(elf.PT_LOAD, 4, 0x10, 0x400000, 0, 0, 16, 0)]), "page-congruent"),
        (_exe([(elf.PT_INTERP, 4, 0, 0, 0, 1 << 20, 0, 0)]), "PT_INTERP"),
    ],
)
def test_parse_refuses(data: bytes, why: str) -> None:
    with pytest.raises(elf.ElfError, match=why):
        elf.parse(data, len(data))


def test_busybox_is_a_static_executable() -> None:
    path = Path("/bin/busybox")
    if not path.exists():
        pytest.skip("no /bin/busybox")
    data = path.read_bytes()
    exe = elf.parse(data[: 1 << 20], len(data))
    assert exe.type == elf.ET_EXEC and exe.interp is None and len(exe.loads) >= 2


def test_initial_stack_layout() -> None:
    top = 0x7FFF_FFFF_E000
    rsp, blob = elf.build_stack(
        top, [b"prog", b"-x"], [b"A=1"], [(elf.AT_PAGESZ, 4096)], execfn=b"/bin/prog", random16=bytes(range(16))
    )
    assert rsp % 16 == 0 and rsp + len(blob) == top

    def u64(va: int) -> int:
        return int(struct.unpack_from("<Q", blob, va - rsp)[0])

    def cstr(va: int) -> bytes:
        off = va - rsp
        return blob[off : blob.index(b"\0", off)]

    assert u64(rsp) == 2
    assert [cstr(u64(rsp + 8)), cstr(u64(rsp + 16)), u64(rsp + 24)] == [b"prog", b"-x", 0]
    assert [cstr(u64(rsp + 32)), u64(rsp + 40)] == [b"A=1", 0]
    aux, at = {}, rsp + 48
    while True:
        key, val = u64(at), u64(at + 8)
        at += 16
        if key == elf.AT_NULL:
            break
        aux[key] = val
    assert aux[elf.AT_PAGESZ] == 4096
    assert cstr(aux[elf.AT_EXECFN]) == b"/bin/prog" and cstr(aux[elf.AT_PLATFORM]) == b"x86_64"
    off = aux[elf.AT_RANDOM] - rsp
    assert blob[off : off + 16] == bytes(range(16))
