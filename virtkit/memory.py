"""Guest memory: host mappings registered with KVM as memory slots.

Every access host code makes to guest-physical memory goes through :class:`GuestMemory`, which
checks that the whole range lies inside one RAM region. Addresses and lengths that come from the
guest (descriptor tables, buffers, boot structures) are hostile by assumption: a failed check
raises :class:`GuestMemoryError`, it never reads or writes outside the guest's RAM.
"""

from __future__ import annotations

import ctypes as C
import mmap
import os
import struct

from virtkit.errors import VirtkitError
from virtkit.host.libc import c_mmap, c_munmap

_MAP_FAILED = C.c_void_p(-1).value
MAP_NORESERVE = 0x4000
MADV_DONTDUMP = 16

_U16, _U32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")


class GuestMemoryError(VirtkitError):
    """A guest-physical range that is not (entirely) guest RAM."""

    exit_status = 1


class MemoryRegion:
    """One contiguous range of guest RAM and the host mapping behind it."""

    __slots__ = ("gpa", "size", "host_addr", "view", "slot")

    def __init__(self, gpa: int, size: int, host_addr: int, view: memoryview, slot: int = -1) -> None:
        self.gpa, self.size, self.host_addr, self.view, self.slot = gpa, size, host_addr, view, slot

    def __repr__(self) -> str:
        return f"MemoryRegion(gpa={self.gpa:#x}, size={self.size:#x}, slot={self.slot})"

    @property
    def end(self) -> int:
        return self.gpa + self.size


def _map(size: int, fd: int = -1, offset: int = 0, *, shared: bool = False) -> int:
    """mmap ``size`` bytes: anonymous when ``fd`` < 0, else the file at ``offset``
    (copy-on-write unless ``shared``)."""
    flags = (mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE) | MAP_NORESERVE
    if fd < 0:
        flags |= mmap.MAP_ANONYMOUS
    addr = c_mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, offset)
    if addr in (None, _MAP_FAILED):
        err = C.get_errno()
        raise GuestMemoryError(f"cannot map {size >> 20} MiB of guest memory: {os.strerror(err)}")
    assert isinstance(addr, int)
    return addr


class GuestMemory:
    """The RAM of one machine, as a list of non-overlapping regions sorted by address."""

    def __init__(self, ranges: list[tuple[int, int]], *, fd: int = -1, shared: bool = False) -> None:
        """Map ``ranges`` of (gpa, size). Anonymous by default; with ``fd``, a file or memfd
        mapped at consecutive offsets (``shared=False`` maps it copy-on-write)."""
        self.regions: list[MemoryRegion] = []
        #: guest-physical page addresses host code wrote (or took a writable view of) since the
        #: last drain; None when not tracking. KVM's dirty log only sees writes made *by the
        #: guest*, so live migration needs this for what devices write into guest RAM.
        self.host_dirty: set[int] | None = None
        offset = 0
        try:
            for gpa, size in sorted(ranges):
                if size <= 0 or size % mmap.PAGESIZE or gpa % mmap.PAGESIZE:
                    raise GuestMemoryError(f"memory range {gpa:#x}+{size:#x} is not page aligned")
                if self.regions and gpa < self.regions[-1].end:
                    raise GuestMemoryError(f"memory range {gpa:#x} overlaps the one before it")
                addr = _map(size, fd, offset, shared=shared)
                if fd >= 0:
                    offset += size
                view = memoryview((C.c_char * size).from_address(addr)).cast("B")
                self.regions.append(MemoryRegion(gpa, size, addr, view))
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def close(self) -> None:
        """Unmap everything. Views handed out before are invalid afterwards."""
        regions, self.regions = self.regions, []
        for r in regions:
            r.view.release()
            c_munmap(r.host_addr, r.size)

    def track_host_writes(self, enabled: bool) -> None:
        self.host_dirty = set() if enabled else None

    def drain_host_dirty(self) -> set[int]:
        """The pages host code may have written since the last drain (empty when not tracking)."""
        dirty = self.host_dirty
        if dirty is None:
            return set()
        self.host_dirty = set()
        return dirty

    def _mark(self, gpa: int, length: int) -> None:
        assert self.host_dirty is not None
        first, last = gpa >> 12, (gpa + max(length, 1) - 1) >> 12
        self.host_dirty.update(page << 12 for page in range(first, last + 1))

    # --- the one bounds check ----------------------------------------------------------------
    def _locate(self, gpa: int, length: int) -> tuple[MemoryRegion, int]:
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"invalid guest range {gpa:#x}+{length:#x}")
        for r in self.regions:
            if r.gpa <= gpa < r.end:
                # written so that a huge length cannot overflow: compare against what is left
                if length > r.end - gpa:
                    break
                return r, gpa - r.gpa
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside guest RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self._locate(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy view of guest RAM (valid while the machine lives). Views are writable, so
        while host writes are tracked the whole range counts as written."""
        r, off = self._locate(gpa, length)
        if self.host_dirty is not None:
            self._mark(gpa, length)
        return r.view[off : off + length]

    def read_view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy, read-only view of guest RAM, which does not count as a host write (unlike
        :meth:`view`): what a migration source reads to send must not mark itself dirty."""
        r, off = self._locate(gpa, length)
        return r.view[off : off + length].toreadonly()

    def read(self, gpa: int, length: int) -> bytes:
        r, off = self._locate(gpa, length)
        return bytes(r.view[off : off + length])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        r, off = self._locate(gpa, length)
        if self.host_dirty is not None:
            self._mark(gpa, length)
        r.view[off : off + length] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        r, off = self._locate(gpa, length)
        if self.host_dirty is not None:
            self._mark(gpa, length)
        C.memset(r.host_addr + off, byte, length)

    def read_u16(self, gpa: int) -> int:
        r, off = self._locate(gpa, 2)
        return int(_U16.unpack_from(r.view, off)[0])

    def read_u32(self, gpa: int) -> int:
        r, off = self._locate(gpa, 4)
        return int(_U32.unpack_from(r.view, off)[0])

    def read_u64(self, gpa: int) -> int:
        r, off = self._locate(gpa, 8)
        return int(_U64.unpack_from(r.view, off)[0])

    def write_u16(self, gpa: int, value: int) -> None:
        r, off = self._locate(gpa, 2)
        if self.host_dirty is not None:
            self._mark(gpa, 2)
        _U16.pack_into(r.view, off, value & 0xFFFF)

    def write_u32(self, gpa: int, value: int) -> None:
        r, off = self._locate(gpa, 4)
        if self.host_dirty is not None:
            self._mark(gpa, 4)
        _U32.pack_into(r.view, off, value & 0xFFFF_FFFF)

    def write_u64(self, gpa: int, value: int) -> None:
        r, off = self._locate(gpa, 8)
        if self.host_dirty is not None:
            self._mark(gpa, 8)
        _U64.pack_into(r.view, off, value & 0xFFFF_FFFF_FFFF_FFFF)
