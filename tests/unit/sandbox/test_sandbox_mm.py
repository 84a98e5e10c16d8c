"""A sandboxed program's memory map: mmap placement, munmap, mprotect, brk, demand paging."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from virtkit.memory import GuestMemory
from virtkit.sandbox.mm import MAP_ANONYMOUS, MAP_FIXED, MAP_PRIVATE, MMAP_TOP, Memory
from virtkit.sandbox.paging import PROT_READ, PROT_WRITE, Fault, FrameAllocator

ANON = MAP_PRIVATE | MAP_ANONYMOUS
RW = PROT_READ | PROT_WRITE


@pytest.fixture
def mm() -> Iterator[Memory]:
    mem = GuestMemory([(0, 8 << 20)])
    frames = FrameAllocator(mem, 0x10000, 8 << 20)
    yield Memory(frames, frames.alloc(table=True))
    mem.close()


def test_mmap_top_down_and_demand_paged(mm: Memory) -> None:
    a = mm.mmap(0, 8192, RW, ANON, None, 0)
    b = mm.mmap(0, 4096, RW, ANON, None, 0)
    assert a == MMAP_TOP - 8192 and b == a - 4096
    assert mm.space.pages == 0  # nothing populated until touched
    assert mm.fault(a + 5, 2)  # a write fault in the mapping: served
    assert mm.space.pages == 1
    assert not mm.fault(a - 0x100000, 2)  # outside every mapping: SIGSEGV
    mm.space.write(a + 4096, b"x")  # the VMM's own accesses populate too
    assert mm.space.pages == 2


def test_bad_arguments(mm: Memory) -> None:
    assert mm.mmap(0, 0, RW, ANON, None, 0) == -errno.EINVAL
    assert mm.mmap(0, 4096, RW, MAP_ANONYMOUS, None, 0) == -errno.EINVAL  # neither shared nor private
    assert mm.mmap(0x1001, 4096, RW, ANON | MAP_FIXED, None, 0) == -errno.EINVAL
    assert mm.mmap(0, 1 << 62, RW, ANON, None, 0) == -errno.EINVAL
    assert mm.unmap(0x1001, 10) == -errno.EINVAL


def test_munmap_splits_and_mprotect(mm: Memory) -> None:
    a = mm.mmap(0x1000_0000, 3 * 4096, RW, ANON | MAP_FIXED, None, 0)
    mm.space.write(a, b"abc")
    assert mm.unmap(a + 4096, 4096) == 0
    assert [(v.start - a, v.end - a) for v in mm.vmas] == [(0, 4096), (8192, 12288)]
    assert mm.protect(a, 3 * 4096, PROT_READ) == -errno.ENOMEM  # the hole in the middle
    assert mm.protect(a, 4096, PROT_READ) == 0
    with pytest.raises(Fault):
        mm.space.write(a, b"x")
    assert mm.space.read(a, 3) == b"abc"


def test_brk(mm: Memory) -> None:
    mm.brk_start = mm.brk = 0x60_0000
    assert mm.set_brk(0x60_2000) == 0x60_2000
    mm.space.write(0x60_1FF0, b"heap")
    assert mm.set_brk(0x50_0000) == 0x60_2000  # below the start: refused, the old break stays
    assert mm.set_brk(0x60_1000) == 0x60_1000
    with pytest.raises(Fault):
        mm.space.read(0x60_1FF0, 4)


def test_madv_dontneed_zeroes_anonymous_pages(mm: Memory) -> None:
    a = mm.mmap(0, 2 * 4096, RW, ANON, None, 0)
    mm.space.write(a, b"data")
    assert mm.discard(a, 8192) == 0
    assert mm.space.read(a, 4) == bytes(4)  # faulted in again, zeroed
    assert mm.discard(a + 1, 10) == -errno.EINVAL
