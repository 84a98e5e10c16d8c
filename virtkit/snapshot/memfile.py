"""The memory file: guest RAM as raw bytes, regions back to back, sparse where RAM is zero.

The file is laid out exactly as :class:`virtkit.memory.GuestMemory` maps a file: region after
region at consecutive offsets. So a restore passes the file to ``Machine(memory_fd=...,
memory_shared=False)`` and the kernel maps it copy-on-write (``MAP_PRIVATE``): nothing is read up
front, the guest faults pages in from the page cache as it touches them, and its writes go to
private copies that never reach the file. That is why a 64 MiB guest resumes in milliseconds, and
why N clones share one file.

Chunks of :data:`CHUNK` bytes that are all zero are not written (the file gets a hole there, which
reads back as zeros), so a mostly idle guest's file takes little disk. Each chunk's CRC-32 is
recorded in the state file; a restore does not read the memory file, so it cannot check them
then, but ``virtkit restore --verify`` (and :func:`verify`) does.
"""

from __future__ import annotations

import ctypes as C
import mmap
import os
import zlib
from dataclasses import dataclass
from typing import Any, Final

from virtkit.host.libc import c_memcmp
from virtkit.memory import GuestMemory
from virtkit.snapshot.format import Fields, SnapshotError

CHUNK: Final = 256 << 10
_ZERO = C.create_string_buffer(CHUNK)
_ZERO_CRC: dict[int, int] = {}


def _zero_crc(n: int) -> int:
    if n not in _ZERO_CRC:
        _ZERO_CRC[n] = zlib.crc32(bytes(n))
    return _ZERO_CRC[n]


@dataclass(frozen=True, slots=True)
class MemoryImage:
    """What the state file says about the memory file."""

    file: str  # name inside the snapshot directory
    size: int  # bytes: the sum of the regions
    regions: tuple[tuple[int, int], ...]  # (guest-physical address, size), in file order
    chunk: int
    crc32: tuple[tuple[int, ...], ...]  # per region, per chunk
    written: int = 0  # bytes actually stored (the rest are holes)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "size": self.size,
            "regions": [list(r) for r in self.regions],
            "chunk": self.chunk,
            "crc32": [list(c) for c in self.crc32],
            "written": self.written,
        }

    @classmethod
    def from_json(cls, f: Fields) -> MemoryImage:
        name = f.string("file")
        if not name or "/" in name or name.startswith("."):
            raise SnapshotError(f"snapshot memory file name {name!r} is not a plain file name")
        regions = []
        for r in f.array("regions"):
            if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and x >= 0 for x in r)):
                raise SnapshotError("snapshot field memory.regions is malformed")
            regions.append((r[0], r[1]))
        chunk = f.integer("chunk")
        if chunk <= 0 or chunk % mmap.PAGESIZE:
            raise SnapshotError(f"snapshot memory chunk size {chunk} is invalid")
        crcs = []
        for (_, size), c in zip(regions, f.array("crc32"), strict=False):
            if not (isinstance(c, list) and len(c) == -(-size // chunk) and all(isinstance(x, int) for x in c)):
                raise SnapshotError("snapshot field memory.crc32 does not match the regions")
            crcs.append(tuple(c))
        if len(crcs) != len(regions):
            raise SnapshotError("snapshot field memory.crc32 does not match the regions")
        size = f.integer("size")
        if size != sum(s for _, s in regions):
            raise SnapshotError("snapshot memory size is not the sum of its regions")
        return cls(name, size, tuple(regions), chunk, tuple(crcs), f.integer("written") if f.has("written") else 0)


def write(memory: GuestMemory, fd: int, name: str) -> MemoryImage:
    """Write all of ``memory`` into the empty file ``fd``; zero chunks become holes."""
    regions, crcs = [], []
    offset = written = 0
    for r in memory.regions:
        region_crcs = []
        run_start = -1  # start (within the region) of a run of non-zero chunks to write at once
        for start in range(0, r.size, CHUNK):
            n = min(CHUNK, r.size - start)
            if c_memcmp(r.host_addr + start, _ZERO, n) == 0:
                region_crcs.append(_zero_crc(n))
                if run_start >= 0:
                    written += _pwrite_all(fd, r.view[run_start:start], offset + run_start)
                    run_start = -1
                continue
            region_crcs.append(zlib.crc32(r.view[start : start + n]))
            if run_start < 0:
                run_start = start
        if run_start >= 0:
            written += _pwrite_all(fd, r.view[run_start : r.size], offset + run_start)
        regions.append((r.gpa, r.size))
        crcs.append(tuple(region_crcs))
        offset += r.size
    os.ftruncate(fd, offset)  # the tail may be a hole: give the file its full length
    return MemoryImage(name, offset, tuple(regions), CHUNK, tuple(crcs), written)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> int:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
    return done


def check_size(fd: int, img: MemoryImage, source: str) -> None:
    size = os.fstat(fd).st_size
    if size < img.size:
        raise SnapshotError(f"{source} is truncated: {size} of {img.size} bytes")
    if size > img.size:
        raise SnapshotError(f"{source} is corrupted: {size} bytes, expected {img.size}")


def verify(fd: int, img: MemoryImage, source: str) -> None:
    """Read the whole memory file and compare every chunk's CRC-32 with the state file's."""
    check_size(fd, img, source)
    if img.size == 0:
        return
    with mmap.mmap(fd, img.size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        view = memoryview(m)
        try:
            offset = 0
            for (gpa, size), crcs in zip(img.regions, img.crc32, strict=True):
                for i, want in enumerate(crcs):
                    start = offset + i * img.chunk
                    n = min(img.chunk, size - i * img.chunk)
                    if zlib.crc32(view[start : start + n]) != want:
                        raise SnapshotError(
                            f"{source} is corrupted: checksum mismatch in guest memory at {gpa + i * img.chunk:#x}"
                        )
                offset += size
        finally:
            view.release()
