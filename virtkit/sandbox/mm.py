"""A program's memory map: its mappings (VMAs), brk, mmap/munmap/mprotect, page faults, loading.

Anonymous memory (heap, stack, anonymous mmap) is demand-paged: a mapping only records its range
and rights; the first touch faults (#PF reaches the VMM through the fault stub) and
:meth:`Memory.fault` gives the page a zeroed frame. File mappings are copied in when mapped
(private semantics; a writable shared file mapping is refused). Numbers follow Linux x86-64:
errno values from asm-generic/errno-base.h, flags from asm-generic/mman-common.h.
"""

from __future__ import annotations

import bisect
import errno
import os

from virtkit.sandbox import cpu, elf
from virtkit.sandbox.paging import (
    ADDR_MASK,
    PAGE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    USER_TOP,
    AddressSpace,
    FrameAllocator,
    OutOfMemory,
    pte_flags,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_GROWSDOWN, MAP_NORESERVE, MAP_POPULATE, MAP_FIXED_NOREPLACE = 0x100, 0x4000, 0x8000, 0x100000
STACK_TOP: Final = 0x7FFF_FFFF_E000
STACK_SIZE: Final = 8 << 20
MMAP_TOP: Final = 0x7FFF_F000_0000
MMAP_BOTTOM: Final = 0x1000_0000
#: how far the break may grow above its start
MAX_HEAP: Final = 64 << 30
#: bound on one file mapping the VMM copies in (bytes)
MAX_FILE_MAP: Final = 1 << 30


def page_up(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


class Vma:
    __slots__ = ("start", "end", "prot", "name")

    def __init__(self, start: int, end: int, prot: int, name: str = "") -> None:
        self.start, self.end, self.prot, self.name = start, end, prot, name

    def __repr__(self) -> str:
        return f"Vma({self.start:#x}-{self.end:#x} {self.prot} {self.name})"


class Memory:
    """The VMAs and page tables of one process."""

    def __init__(self, frames: FrameAllocator, kernel_pdpt: int, space: AddressSpace | None = None) -> None:
        self.frames = frames
        self.space = space or AddressSpace(frames, kernel_pdpt)
        self.space.fault_in = self._fault_in
        self.vmas: list[Vma] = []
        self.brk_start = self.brk = 0
        #: guest-physical address of the fast system-call data page (0: none)
        self.sysdata = 0

    def map_fast_stub(self) -> None:
        """The per-process stub page (user, executable) and its data page (cpu.FAST_*)."""
        code = self.frames.alloc()
        self.frames.mem.write(code, cpu.FAST_STUB)
        self.space.map_page(cpu.FAST_STUB_VA, code, pte_flags(PROT_READ | PROT_EXEC))
        self._insert(Vma(cpu.FAST_STUB_VA, cpu.FAST_STUB_VA + PAGE, PROT_READ | PROT_EXEC, "vmm"))
        self.sysdata = self.frames.alloc()
        self.space.map_page(cpu.FAST_DATA_VA, self.sysdata, pte_flags(PROT_READ | PROT_WRITE))

    # --- the map ---------------------------------------------------------------------------
    def find(self, va: int) -> Vma | None:
        i = bisect.bisect_right([v.start for v in self.vmas], va) - 1
        if i >= 0 and self.vmas[i].start <= va < self.vmas[i].end:
            return self.vmas[i]
        return None

    def _insert(self, vma: Vma) -> None:
        bisect.insort(self.vmas, vma, key=lambda v: v.start)

    def _carve(self, start: int, end: int) -> list[Vma]:
        """Remove [start, end) from the VMA list (splitting at the edges); returns the pieces."""
        out: list[Vma] = []
        keep: list[Vma] = []
        for v in self.vmas:
            if v.end <= start or v.start >= end:
                keep.append(v)
                continue
            if v.start < start:
                keep.append(Vma(v.start, start, v.prot, v.name))
            if v.end > end:
                keep.append(Vma(end, v.end, v.prot, v.name))
            out.append(Vma(max(v.start, start), min(v.end, end), v.prot, v.name))
        keep.sort(key=lambda v: v.start)
        self.vmas = keep
        return out

    def is_free(self, start: int, end: int) -> bool:
        return all(v.end <= start or v.start >= end for v in self.vmas)

    def _gap(self, length: int, top: int = MMAP_TOP) -> int:
        """The highest free range of ``length`` bytes below ``top`` (top-down like Linux)."""
        end = top
        for v in reversed(self.vmas):
            if v.start >= end:
                continue
            if v.end <= end - length:
                return end - length
            end = min(end, v.start)
        if end - length >= MMAP_BOTTOM:
            return end - length
        return -1

    # --- demand paging ---------------------------------------------------------------------
    def _fault_in(self, va: int, write: bool) -> bool:
        """Populate the page at ``va`` if its mapping allows the access (VMM or CPU access)."""
        v = self.find(va)
        if v is None or not v.prot & PROT_READ and not v.prot & PROT_EXEC or (write and not v.prot & PROT_WRITE):
            return False
        e = self.space.lookup(va)
        if e & ADDR_MASK:
            return False  # present with other rights: a real protection fault
        self.space.populate(va, v.prot)
        return True

    def fault(self, cr2: int, error_code: int) -> bool:
        """A #PF from the program: True if it was served (resume), False for SIGSEGV."""
        if error_code & 1:  # the page was present: a protection violation
            return False
        if not 0 <= cr2 < USER_TOP:
            return False
        v = self.find(cr2)
        if v is None:
            return False
        if error_code & 0x10 and not v.prot & PROT_EXEC:
            return False
        return self._fault_in(cr2, bool(error_code & 2))

    # --- system calls ------------------------------------------------------------------------
    def mmap(self, addr: int, length: int, prot: int, flags: int, fd: int | None, offset: int) -> int:
        """Returns the address or -errno. ``fd`` is a host fd (file mappings) or None."""
        if length <= 0 or length > USER_TOP or offset & 0xFFF or addr & 0xFFF and flags & MAP_FIXED:
            return -errno.EINVAL
        if not flags & (MAP_SHARED | MAP_PRIVATE):
            return -errno.EINVAL
        length = page_up(length)
        if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
            if addr & 0xFFF or addr + length > USER_TOP or addr < PAGE:
                return -errno.EINVAL
            if flags & MAP_FIXED_NOREPLACE and not self.is_free(addr, addr + length):
                return -errno.EEXIST
            start = addr
        else:
            start = -1
            hint_ok = addr and not addr & 0xFFF and addr >= MMAP_BOTTOM and addr + length <= USER_TOP
            if hint_ok and self.is_free(addr, addr + length):
                start = addr
            if start < 0:
                start = self._gap(length)
            if start < 0:
                return -errno.ENOMEM
        size = 0
        if fd is not None:
            if flags & MAP_SHARED and prot & PROT_WRITE:
                return -errno.ENODEV  # no shared writable file mappings (docs/SANDBOX.md)
            try:
                size = max(0, min(length, os.fstat(fd).st_size - offset, MAX_FILE_MAP))
            except OSError as e:
                return -(e.errno or errno.EIO)
        self.unmap(start, length)
        self._insert(Vma(start, start + length, prot, "file" if fd is not None else "anon"))
        if fd is not None and size:
            try:
                self._fill(start, fd, offset, size, prot)
            except OSError as e:
                self.unmap(start, length)
                return -(e.errno or errno.EIO)
            except OutOfMemory:
                self.unmap(start, length)
                return -errno.ENOMEM
        return start

    def _fill(self, start: int, fd: int, offset: int, size: int, prot: int) -> None:
        """Give the pages of [start, start+size) frames holding the file's bytes at ``offset``."""
        sp = self.space
        mem = self.frames.mem
        flags = pte_flags(prot)
        for off in range(0, size, PAGE):
            data = os.pread(fd, min(PAGE, size - off), offset + off)
            va = start + off
            e = sp.lookup(va)
            if e & ADDR_MASK:
                gpa = e & ADDR_MASK
            else:
                gpa = self.frames.alloc()
                sp.map_page(va, gpa, flags)
            mem.write(gpa, data)
            if len(data) < PAGE:
                break

    def unmap(self, addr: int, length: int) -> int:
        if addr & 0xFFF or length <= 0 or addr + length > USER_TOP:
            return -errno.EINVAL
        end = page_up(addr + length)
        if self._carve(addr, end):
            self.space.unmap_range(addr, end)
        return 0

    def discard(self, addr: int, length: int) -> int:
        """MADV_DONTNEED: the populated pages of anonymous mappings in the range go away, so the
        next touch faults in a zeroed page. File mappings keep their (copied-in) contents."""
        if addr & 0xFFF or length < 0 or addr + length > USER_TOP:
            return -errno.EINVAL
        end = page_up(addr + length)
        for v in self.vmas:
            if v.start < end and v.end > addr and v.name != "file" and v.name != "elf" and v.name != "vmm":
                self.space.unmap_range(max(v.start, addr), min(v.end, end))
        return 0

    def protect(self, addr: int, length: int, prot: int) -> int:
        if addr & 0xFFF or length < 0 or addr + length > USER_TOP:
            return -errno.EINVAL
        end = page_up(addr + length)
        if end == addr:
            return 0
        covered = sum(min(v.end, end) - max(v.start, addr) for v in self.vmas if v.start < end and v.end > addr)
        if covered != end - addr:
            return -errno.ENOMEM
        pieces = self._carve(addr, end)
        for p in pieces:
            self._insert(Vma(p.start, p.end, prot, p.name))
        self.space.protect_range(addr, end, prot)
        return 0

    def set_brk(self, new: int) -> int:
        """brk(2): the new break, or the old one when the request cannot be met."""
        if new < self.brk_start or new > self.brk_start + MAX_HEAP:
            return self.brk
        old_end, new_end = page_up(self.brk), page_up(new)
        if new_end > old_end:
            if not self.is_free(old_end, new_end):
                return self.brk
            heap = next((v for v in self.vmas if v.name == "heap"), None)
            if heap is not None and heap.end == old_end:
                heap.end = new_end
            else:
                self._insert(Vma(old_end, new_end, PROT_READ | PROT_WRITE, "heap"))
        elif new_end < old_end:
            self.unmap(new_end, old_end - new_end)
        self.brk = new
        return new

    # --- loading ---------------------------------------------------------------------------
    def load(self, exe: elf.Executable, fd: int, bias: int) -> None:
        """Map the PT_LOAD segments of ``exe`` (file ``fd``) at ``bias``; zero-fill the BSS."""
        for seg in exe.loads:
            start = (seg.vaddr + bias) & ~0xFFF
            end = page_up(seg.vaddr + bias + seg.memsz)
            for p in self._carve(start, end):
                # segments sharing a page (old linkers): the page gets the union of the rights
                seg.prot |= p.prot
            self._insert(Vma(start, end, seg.prot, "elf"))
            seg_start = seg.vaddr + bias
            file_end, mem_end = seg_start + seg.filesz, seg_start + seg.memsz
            flags = pte_flags(seg.prot)
            mem = self.frames.mem
            for va in range(start, end, PAGE):
                e = self.space.lookup(va)
                if e & ADDR_MASK:
                    gpa = e & ADDR_MASK
                    self.space.set_entry(va, gpa | flags)
                else:
                    gpa = self.frames.alloc()
                    self.space.map_page(va, gpa, flags)
                lo, hi = max(va, seg_start), min(va + PAGE, file_end)
                if hi > lo:
                    data = os.pread(fd, hi - lo, seg.offset + (lo - seg_start))
                    if len(data) != hi - lo:
                        raise elf.ElfError("the file is shorter than its program headers say")
                    mem.write(gpa + (lo - va), data)
                # the BSS part of a page that also holds file bytes (or another segment) is zeroed
                zlo, zhi = max(va, file_end), min(va + PAGE, mem_end)
                if zhi > zlo:
                    mem.fill(gpa + (zlo - va), zhi - zlo)

    def clone(self) -> Memory:
        child = Memory(self.frames, self.space.kernel_pdpt, self.space.clone())
        child.vmas = [Vma(v.start, v.end, v.prot, v.name) for v in self.vmas]
        child.brk_start, child.brk = self.brk_start, self.brk
        if self.sysdata:
            child.sysdata = child.space.entry(cpu.FAST_DATA_VA) & ADDR_MASK
        return child

    def destroy(self) -> None:
        self.space.destroy()
        self.vmas = []
