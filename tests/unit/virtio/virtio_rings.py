"""Ring-level test helpers: the guest RAM layout of the virtio tests, a bump allocator and the
driver's side of a split virtqueue (§2.7.13, §2.7.14), including the raw operations the
hostile-ring tests use to break the rules."""

from __future__ import annotations

import struct

from virtkit.devices.virtio import spec
from virtkit.memory import GuestMemory

MiB = 1 << 20
NEXT, WRITE, INDIRECT = spec.DescFlag.NEXT, spec.DescFlag.WRITE, spec.DescFlag.INDIRECT

#: guest RAM of every test: 4 MiB at 0, a hole, then 1 MiB at 8 MiB
RAM = [(0, 4 * MiB), (8 * MiB, 1 * MiB)]
HOLE = 5 * MiB  # a guest-physical address that is not RAM


def make_memory() -> GuestMemory:
    return GuestMemory(RAM)


class Allocator:
    """Bump allocator over a range of guest RAM; everything it hands out is zeroed."""

    def __init__(self, mem: GuestMemory, start: int, end: int) -> None:
        self.mem, self.next, self.end = mem, start, end

    def alloc(self, size: int, align: int = 16) -> int:
        gpa = (self.next + align - 1) // align * align
        if gpa + size > self.end:
            raise MemoryError("test allocator exhausted")
        self.next = gpa + size
        self.mem.fill(gpa, size)
        return gpa


Buf = tuple[int, int, bool]  # (gpa, len, device-writable)


class FakeQueue:
    """The driver's side of one split virtqueue (§2.7.13, §2.7.14)."""

    def __init__(
        self, mem: GuestMemory, alloc: Allocator, index: int, size: int, desc: int, avail: int, used: int
    ) -> None:
        self.mem, self.alloc, self.index, self.size = mem, alloc, index, size
        self.desc, self.avail, self.used = desc, avail, used
        self.free = list(range(size))
        self.chains: dict[int, list[int]] = {}
        self.avail_idx = 0
        self.last_used = 0

    # --- raw ring access (for hostile tests) -------------------------------------------------------
    def write_desc(
        self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, *, table: int | None = None
    ) -> None:
        base = self.desc if table is None else table
        self.mem.write(base + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    @property
    def avail_flags(self) -> int:
        return self.mem.read_u16(self.avail)

    @avail_flags.setter
    def avail_flags(self, value: int) -> None:
        self.mem.write_u16(self.avail, value)

    @property
    def used_event(self) -> int:
        return self.mem.read_u16(self.avail + 4 + 2 * self.size)

    @used_event.setter
    def used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * self.size, value)

    @property
    def used_flags(self) -> int:
        return self.mem.read_u16(self.used)

    @property
    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    @property
    def avail_event(self) -> int:
        return self.mem.read_u16(self.used + 4 + 8 * self.size)

    # --- well-behaved operations -------------------------------------------------------------------
    def buffer(self, data: bytes | int) -> int:
        """A guest buffer holding ``data`` (or that many zero bytes)."""
        size = data if isinstance(data, int) else len(data)
        gpa = self.alloc.alloc(max(size, 1))
        if not isinstance(data, int):
            self.mem.write(gpa, data)
        return gpa

    def add(self, bufs: list[Buf], *, indirect: bool = False, publish: bool = True) -> int:
        """Make a chain of ``bufs`` available; returns its head."""
        if indirect:
            table = self.alloc.alloc(16 * len(bufs), align=16)
            for i, (gpa, length, writable) in enumerate(bufs):
                flags = (WRITE if writable else 0) | (NEXT if i < len(bufs) - 1 else 0)
                self.write_desc(i, gpa, length, flags, i + 1, table=table)
            head = self.free.pop(0)
            self.write_desc(head, table, 16 * len(bufs), INDIRECT)
            self.chains[head] = [head]
        else:
            idxs = [self.free.pop(0) for _ in bufs]
            for n, (i, (gpa, length, writable)) in enumerate(zip(idxs, bufs, strict=True)):
                last = n == len(bufs) - 1
                self.write_desc(
                    i, gpa, length, (WRITE if writable else 0) | (0 if last else NEXT), 0 if last else idxs[n + 1]
                )
            head = idxs[0]
            self.chains[head] = idxs
        if publish:
            self.publish(head)
        return head

    def take_used(self) -> list[tuple[int, int]]:
        """The (head, len) pairs the device returned since the last call (§2.7.14)."""
        out = []
        while self.last_used != self.used_idx:
            elem = self.used + 4 + 8 * (self.last_used % self.size)
            head, length = self.mem.read_u32(elem), self.mem.read_u32(elem + 4)
            out.append((head, length))
            self.free.extend(self.chains.pop(head, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out
