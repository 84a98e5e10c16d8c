"""Page tables the VMM edits for a sandboxed program: mapping, guest pointers, and the
copy-on-write of table paths that keeps KVM's shadow MMU from using stale entries."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from virtkit.memory import GuestMemory
from virtkit.sandbox.paging import (
    ADDR_MASK,
    KERNEL_BASE,
    PROT_READ,
    PROT_WRITE,
    PTE_NX,
    PTE_P,
    PTE_U,
    PTE_W,
    AddressSpace,
    Fault,
    FrameAllocator,
    OutOfMemory,
    pte_flags,
)


@pytest.fixture
def frames() -> Iterator[FrameAllocator]:
    mem = GuestMemory([(0, 4 << 20)])
    yield FrameAllocator(mem, 0x10000, 4 << 20)
    mem.close()


def test_flags() -> None:
    assert pte_flags(0) == 0
    assert pte_flags(PROT_READ) == PTE_P | PTE_U | PTE_NX
    assert pte_flags(PROT_READ | PROT_WRITE | 4) == PTE_P | PTE_U | PTE_W


def test_pointers_cross_pages_and_fault(frames: FrameAllocator) -> None:
    sp = AddressSpace(frames, frames.alloc(table=True))
    for va in (0x10000, 0x11000):
        sp.map_page(va, frames.alloc(), pte_flags(PROT_READ | PROT_WRITE))
    sp.write(0x10FFE, b"abcd")
    assert sp.read(0x10FFE, 4) == b"abcd"
    assert sp.read_cstr(0x10FFE) == b"abcd"
    with pytest.raises(Fault):
        sp.read(0x11FFE, 4)  # runs into the unmapped page after
    with pytest.raises(Fault):
        sp.read(KERNEL_BASE, 8)  # the VMM's half is never a program pointer
    with pytest.raises(Fault):
        sp.read(0x10000, 1 << 62)
    sp.map_page(0x20000, frames.alloc(), pte_flags(PROT_READ))
    with pytest.raises(Fault):
        sp.write(0x1FFFF, b"xy")  # the second page is read-only: nothing written at all
    assert sp.read(0x11FFF, 1) == b"\0"


def test_narrowing_an_entry_copies_the_table_path(frames: FrameAllocator) -> None:
    sp = AddressSpace(frames, frames.alloc(table=True))
    sp.map_page(0x400000, frames.alloc(), pte_flags(PROT_READ | PROT_WRITE))
    sp.fresh.clear()  # the guest ran: KVM may have shadowed every table
    old_root = sp.pml4
    sp.map_page(0x401000, frames.alloc(), pte_flags(PROT_READ))  # adding in place is fine
    assert sp.pml4 == old_root
    sp.protect_range(0x400000, 0x401000, PROT_READ)
    assert sp.pml4 != old_root  # a new root for the vCPU to load
    assert sp.lookup(0x400000) & PTE_W == 0
    assert sp.lookup(0x401000) & PTE_P  # the rest of the space survives the copy
    assert old_root in frames.tainted and old_root in frames.retired
    # a frame that held a table is handed out for data only, never as a table again
    reused = frames.alloc()
    assert reused in frames.tainted
    assert frames.alloc(table=True) not in frames.retired


def test_unmap_and_clone(frames: FrameAllocator) -> None:
    sp = AddressSpace(frames, frames.alloc(table=True))
    sp.map_page(0x600000, frames.alloc(), pte_flags(PROT_READ | PROT_WRITE))
    sp.write(0x600000, b"parent")
    child = sp.clone()
    child.write(0x600000, b"child!")
    assert sp.read(0x600000, 6) == b"parent" and child.read(0x600000, 6) == b"child!"
    assert sp.lookup(0x600000) & ADDR_MASK != child.lookup(0x600000) & ADDR_MASK
    assert sp.unmap_range(0x600000, 0x602000) == 1
    with pytest.raises(Fault):
        sp.read(0x600000, 1)


def test_out_of_memory_is_an_error_not_a_crash(frames: FrameAllocator) -> None:
    with pytest.raises(OutOfMemory, match="--memory"):
        for _ in range(2000):
            frames.alloc(zero=False)
