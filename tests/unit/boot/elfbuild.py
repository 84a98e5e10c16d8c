"""Build small synthetic ELF images for loader tests (fakes: unit tests only)."""

from __future__ import annotations

import struct

MB_MAGIC = 0x1BADB002


def multiboot_header(flags: int = 0x3, extra: bytes = b"") -> bytes:
    return struct.pack("<III", MB_MAGIC, flags, (-(MB_MAGIC + flags)) & 0xFFFFFFFF) + extra


def elf(
    bits: int, entry: int, segments: list[tuple[int, bytes, int]], *, machine: int | None = None, etype: int = 2
) -> bytes:
    """segments: (paddr, file bytes, memsz). Segment data follows the headers in order."""
    if bits == 32:
        eh, ph, phfmt = 52, 32, "<IIIIIIII"
    else:
        eh, ph, phfmt = 64, 56, "<IIQQQQQQ"
    machine = machine if machine is not None else (3 if bits == 32 else 62)
    phoff = eh
    data_off = phoff + ph * len(segments)
    headers, blobs = b"", b""
    for paddr, blob, memsz in segments:
        off = data_off + len(blobs)
        if bits == 32:
            headers += struct.pack(phfmt, 1, off, paddr, paddr, len(blob), memsz, 5, 0x1000)
        else:
            headers += struct.pack(phfmt, 1, 5, off, paddr, paddr, len(blob), memsz, 0x1000)
        blobs += blob
    ident = b"\x7fELF" + bytes([1 if bits == 32 else 2, 1, 1]) + bytes(9)
    if bits == 32:
        hdr = ident + struct.pack(
            "<HHIIIIIHHHHHH", etype, machine, 1, entry, phoff, 0, 0, eh, ph, len(segments), 0, 0, 0
        )
    else:
        hdr = ident + struct.pack(
            "<HHIQQQIHHHHHH", etype, machine, 1, entry, phoff, 0, 0, eh, ph, len(segments), 0, 0, 0
        )
    return hdr + headers + blobs
