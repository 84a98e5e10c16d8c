"""Build synthetic Linux kernel images for loader tests: a bzImage whose setup header is laid
out field by field as Documentation/arch/x86/boot.rst gives it, and an ELF64 vmlinux with notes
(fakes: unit tests only)."""

from __future__ import annotations

import struct

XLF_KERNEL_64 = 1
LOADED_HIGH = 1


def bzimage(
    *,
    payload: bytes = b"\xf4" * 0x600,
    setup_sects: int = 4,
    version: int = 0x020F,
    magic: bytes = b"HdrS",
    boot_flag: int = 0xAA55,
    loadflags: int = LOADED_HIGH,
    xloadflags: int = XLF_KERNEL_64 | 0x2,
    relocatable: int = 1,
    kernel_alignment: int = 0x20_0000,
    pref_address: int = 0x100_0000,
    init_size: int = 0x40_0000,
    cmdline_size: int = 0x7FF,
    initrd_addr_max: int = 0x7FFF_FFFF,
) -> bytes:
    payload = payload.ljust((len(payload) + 15) & ~15, b"\0")
    setup = bytearray(((setup_sects or 4) + 1) * 512)  # boot.rst: 0 means 4
    setup[0x1F1] = setup_sects
    struct.pack_into("<I", setup, 0x1F4, len(payload) // 16)  # syssize
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200:0x202] = bytes([0xEB, 0x6A])  # jmp: the header ends at 0x202 + 0x6a = 0x26c
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)  # code32_start
    struct.pack_into("<II", setup, 0x22C, initrd_addr_max, kernel_alignment)
    setup[0x234] = relocatable
    setup[0x235] = 21  # min_alignment (2 MiB)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + payload


def note(owner: bytes, n_type: int, desc: bytes) -> bytes:
    name = owner + b"\0"
    pad = lambda b: b.ljust((len(b) + 3) & ~3, b"\0")  # noqa: E731
    return struct.pack("<III", len(name), len(desc), n_type) + pad(name) + pad(desc)


def vmlinux(entry: int, paddr: int, code: bytes, memsz: int, notes: bytes = b"", vaddr: int | None = None) -> bytes:
    """An ELF64 executable with one PT_LOAD segment and, if ``notes``, a PT_NOTE segment."""
    vaddr = paddr if vaddr is None else vaddr
    phnum = 2 if notes else 1
    data_off = 64 + 56 * phnum
    phdrs = struct.pack("<IIQQQQQQ", 1, 5, data_off, vaddr, paddr, len(code), memsz, 0x1000)
    if notes:
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, data_off + len(code), 0, 0, len(notes), len(notes), 4)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    hdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, 64, 0, 0, 64, 56, phnum, 0, 0, 0)
    return hdr + phdrs + code + notes
