"""Guest frames and the 4-level page tables of a sandboxed program, edited by the VMM.

The sandbox VM has no kernel: the VMM owns every page table. Guest-physical memory is one RAM
region handed out page by page by :class:`FrameAllocator`; an :class:`AddressSpace` is a PML4
plus the tables under it, all in guest RAM, and every guest-virtual pointer a program passes to
a system call is translated through them here (:meth:`AddressSpace.read`/``write``), so a pointer
into unmapped memory or a huge length becomes EFAULT, never an access outside the program's pages.

Encodings: Intel SDM vol. 3A §4.5 (4-level paging, table 4-14 to 4-20: P, R/W, U/S, A, D, XD).

Shadow paging (PVM) and host edits: KVM shadows the guest's page tables and is not told when host
code writes them; measured here, an entry the VMM rewrote in place stayed cached by KVM even
across a CR3 reload (docs/SANDBOX.md, "Memory"). So the VMM only ever *adds* entries in place
(not present -> present, which KVM reads afresh on the fault). An edit that removes or narrows
a present entry copies the tables on its path into new frames first (copy-on-write of the page
tables, up to a new PML4), and the vCPU loads the new CR3: KVM builds new shadow pages for the new
frames. A frame that ever held a page table is never made a page table again ("tainted"): KVM may
still hold a stale shadow page for it; it can still hold program data, whose writes KVM traps.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator

from virtkit.errors import VirtkitError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Final

    from virtkit.memory import GuestMemory

PAGE: Final = 4096
PTE_P: Final = 1 << 0
PTE_W: Final = 1 << 1
PTE_U: Final = 1 << 2
PTE_A: Final = 1 << 5
PTE_D: Final = 1 << 6
PTE_NX: Final = 1 << 63
ADDR_MASK: Final = 0x000F_FFFF_FFFF_F000
#: the lower canonical half: what a program may map (Linux's TASK_SIZE for 4-level paging)
USER_TOP: Final = 0x0000_7FFF_FFFF_F000
#: PML4 slot of the VMM's own pages (descriptor tables, stubs): the last one, shared by all spaces
KERNEL_SLOT: Final = 511
KERNEL_BASE: Final = 0xFFFF_FF80_0000_0000

# PROT_* (asm-generic/mman-common.h)
PROT_READ: Final = 1
PROT_WRITE: Final = 2
PROT_EXEC: Final = 4

_Q = struct.Struct("<Q")


class OutOfMemory(VirtkitError):
    """The sandbox used all the guest RAM it was given (its memory limit)."""


class Fault(Exception):
    """A guest pointer that does not reach mapped memory with the access asked for (EFAULT)."""


def pte_flags(prot: int, user: bool = True) -> int:
    """The page-table entry bits for PROT_* ``prot`` (PROT_NONE: not present)."""
    if not prot & (PROT_READ | PROT_WRITE | PROT_EXEC):
        return 0
    flags = PTE_P | (PTE_U if user else 0)
    if prot & PROT_WRITE:
        flags |= PTE_W
    if not prot & PROT_EXEC:
        flags |= PTE_NX
    return flags


def split(va: int) -> tuple[int, int, int, int]:
    """The four table indices (PML4, PDPT, PD, PT) of a virtual address."""
    return (va >> 39) & 511, (va >> 30) & 511, (va >> 21) & 511, (va >> 12) & 511


class FrameAllocator:
    """4 KiB guest-physical frames from ``[start, end)`` of the RAM region at gpa 0.

    ``free`` frames never held a page table; ``retired`` ones did (tainted: data only)."""

    def __init__(self, mem: GuestMemory, start: int, end: int) -> None:
        self.mem = mem
        self.next = start
        self.end = end
        self.free: list[int] = []
        self.retired: list[int] = []
        self.tainted: set[int] = set()
        self.lock = threading.Lock()

    @property
    def in_use(self) -> int:
        return (self.next - self.end + self.end - (len(self.free) + len(self.retired)) * PAGE) // PAGE

    def alloc(self, zero: bool = True, table: bool = False) -> int:
        with self.lock:
            if not table and self.retired:
                gpa = self.retired.pop()
            elif self.free:
                gpa = self.free.pop()
            elif self.next < self.end:
                gpa = self.next
                self.next += PAGE
            else:
                raise OutOfMemory(
                    f"the sandbox used all of its {self.end >> 20} MiB of guest memory: give it more with --memory"
                )
            if table:
                self.tainted.add(gpa)
        if zero:
            self.mem.fill(gpa, PAGE)
        return gpa

    def release(self, gpa: int) -> None:
        with self.lock:
            (self.retired if gpa in self.tainted else self.free).append(gpa)


class AddressSpace:
    """One program's page tables. ``kernel_pdpt`` is the VMM's shared upper slot."""

    def __init__(self, frames: FrameAllocator, kernel_pdpt: int) -> None:
        self.frames = frames
        self.mem = frames.mem
        self.ram = frames.mem.regions[0].view
        self.pml4 = frames.alloc(table=True)
        #: tables made since the guest last ran with this space: KVM has not shadowed them yet,
        #: so they may be edited in place (the run loop clears this before KVM_RUN)
        self.fresh: set[int] = {self.pml4}
        self.kernel_pdpt = kernel_pdpt
        _Q.pack_into(self.ram, self.pml4 + KERNEL_SLOT * 8, kernel_pdpt | PTE_P | PTE_W | PTE_U)
        #: user pages mapped (leaf entries present), for accounting
        self.pages = 0
        #: called with (va, write) when a VMM access finds no page; True if it mapped one
        self.fault_in: Callable[[int, bool], bool] | None = None

    # --- walking ---------------------------------------------------------------------------
    def _copy_table(self, table: int) -> int:
        new = self.frames.alloc(zero=False, table=True)
        self.ram[new : new + PAGE] = self.ram[table : table + PAGE]
        self.fresh.add(new)
        self.frames.release(table)
        return new

    def _entry_addr(self, va: int, create: bool, cow: bool = False) -> int:
        """The guest-physical address of the PT entry for ``va`` (0 if a table is missing).
        With ``cow`` every table on the path is one KVM has not shadowed (copied if need be),
        so the entry may be narrowed or removed (see the module docstring)."""
        ram = self.ram
        if cow and self.pml4 not in self.fresh:
            self.pml4 = self._copy_table(self.pml4)
        table = self.pml4
        for shift in (39, 30, 21):
            at = table + ((va >> shift) & 511) * 8
            e = _Q.unpack_from(ram, at)[0]
            if not e & PTE_P:
                if not create:
                    return 0
                new = self.frames.alloc(table=True)
                self.fresh.add(new)
                # intermediate entries allow everything; the leaf decides (SDM §4.6)
                e = new | PTE_P | PTE_W | PTE_U
                _Q.pack_into(ram, at, e)
            elif cow and (e & ADDR_MASK) not in self.fresh:
                e = self._copy_table(e & ADDR_MASK) | (e & ~ADDR_MASK)
                _Q.pack_into(ram, at, e)
            table = e & ADDR_MASK
        return table + ((va >> 12) & 511) * 8

    def entry(self, va: int) -> int:
        """The leaf entry for any lower-half ``va``, the VMM's own pages above USER_TOP included."""
        at = self._entry_addr(va, False)
        return _Q.unpack_from(self.ram, at)[0] if at else 0

    def lookup(self, va: int) -> int:
        """The leaf entry for ``va`` (0 when unmapped)."""
        if not 0 <= va < USER_TOP:
            return 0
        at = self._entry_addr(va, False)
        return _Q.unpack_from(self.ram, at)[0] if at else 0

    def map_page(self, va: int, gpa: int, flags: int) -> None:
        at = self._entry_addr(va, True)
        old = _Q.unpack_from(self.ram, at)[0]
        if old & ADDR_MASK:
            at = self._entry_addr(va, True, cow=True)
            self.frames.release(old & ADDR_MASK)
        else:
            self.pages += 1
        _Q.pack_into(self.ram, at, gpa | flags)

    def set_entry(self, va: int, entry: int) -> None:
        """Rewrite the leaf of ``va`` (same frame, other rights) safely under shadow paging."""
        at = self._entry_addr(va, True, cow=True)
        _Q.pack_into(self.ram, at, entry)

    def map_kernel_page(self, va: int, gpa: int, flags: int) -> None:
        """Map a VMM page in the shared kernel slot (visible in every address space). Only
        before any vCPU runs: the slot is never edited afterwards."""
        at = self._entry_addr(va, True)
        _Q.pack_into(self.ram, at, gpa | flags)

    def populate(self, va: int, prot: int) -> int:
        """Give ``va``'s page a fresh zeroed frame (demand paging); returns the frame."""
        gpa = self.frames.alloc()
        flags = pte_flags(prot)
        # PROT_NONE pages keep no frame: a populated page is one the program may touch
        self.map_page(va & ~0xFFF, gpa, flags or PTE_NX)
        return gpa

    def unmap_range(self, start: int, end: int) -> int:
        """Drop the leaf entries in ``[start, end)``; returns how many were present."""
        n = 0
        va = start
        ram = self.ram
        while va < end:
            at = self._entry_addr(va, False)
            if not at:
                va = (va | 0x1F_FFFF) + 1  # no page table here: skip its 2 MiB
                continue
            e = _Q.unpack_from(ram, at)[0]
            if e & ADDR_MASK:
                at = self._entry_addr(va, False, cow=True)
                self.frames.release(e & ADDR_MASK)
                _Q.pack_into(ram, at, 0)
                n += 1
            va += PAGE
        self.pages -= n
        return n

    def protect_range(self, start: int, end: int, prot: int) -> None:
        """Rewrite the permission bits of the populated pages in ``[start, end)``."""
        flags = pte_flags(prot)
        va = start
        ram = self.ram
        while va < end:
            at = self._entry_addr(va, False)
            if not at:
                va = (va | 0x1F_FFFF) + 1
                continue
            e = _Q.unpack_from(ram, at)[0]
            if e & ADDR_MASK and (e & ~ADDR_MASK & ~(PTE_A | PTE_D)) != flags:
                # PROT_NONE keeps the frame but clears P (the entry still remembers the frame)
                at = self._entry_addr(va, False, cow=True)
                _Q.pack_into(ram, at, (e & ADDR_MASK) | (flags or PTE_NX))
            va += PAGE

    def clone(self) -> AddressSpace:
        """A copy for fork(): every populated page copied into a new frame (no sharing)."""
        child = AddressSpace(self.frames, self.kernel_pdpt)
        for va, e in self.leaves():
            gpa = self.frames.alloc(zero=False)
            src = e & ADDR_MASK
            self.ram[gpa : gpa + PAGE] = self.ram[src : src + PAGE]
            child.map_page(va, gpa, e & ~ADDR_MASK)
        return child

    def _leaf_tables(self, tables: list[int] | None = None) -> Iterator[tuple[int, int]]:
        """(va base, gpa) of every present page table (level 1) of the user half; the tables above
        them (PDPTs, PDs) are appended to ``tables`` when it is given."""
        ram = self.ram
        unpack = _Q.unpack_from
        for i4 in range(256):
            e4 = unpack(ram, self.pml4 + i4 * 8)[0]
            if not e4 & PTE_P:
                continue
            t3 = e4 & ADDR_MASK
            if tables is not None:
                tables.append(t3)
            for i3 in range(512):
                e3 = unpack(ram, t3 + i3 * 8)[0]
                if not e3 & PTE_P:
                    continue
                t2 = e3 & ADDR_MASK
                if tables is not None:
                    tables.append(t2)
                for i2 in range(512):
                    e2 = unpack(ram, t2 + i2 * 8)[0]
                    if e2 & PTE_P:
                        yield (i4 << 39) | (i3 << 30) | (i2 << 21), e2 & ADDR_MASK

    def leaves(self) -> list[tuple[int, int]]:
        """(va, entry) of every leaf that holds a frame, in address order."""
        out: list[tuple[int, int]] = []
        for base, t1 in self._leaf_tables():
            for i1, e1 in enumerate(struct.unpack_from("<512Q", self.ram, t1)):
                if e1 & ADDR_MASK:
                    out.append((base | (i1 << 12), e1))
        return out

    def destroy(self) -> None:
        """Release every frame of this space (leaves and tables) into quarantine."""
        release = self.frames.release
        tables: list[int] = [self.pml4]
        for _, t1 in self._leaf_tables(tables):
            for e1 in struct.unpack_from("<512Q", self.ram, t1):
                if e1 & ADDR_MASK:
                    release(e1 & ADDR_MASK)
            tables.append(t1)
        for table in tables:
            release(table)
        self.pages = 0

    # --- guest pointers --------------------------------------------------------------------
    def _frame(self, va: int, write: bool) -> int:
        """The frame behind ``va`` for a VMM access on the program's behalf, or Fault."""
        e = self.lookup(va)
        if not e & PTE_P or not e & PTE_U or (write and not e & PTE_W):
            # a page of a mapping not touched yet: the owner may populate it (demand paging)
            if self.fault_in is None or not self.fault_in(va, write):
                raise Fault(va)
            e = self.lookup(va)
            if not e & PTE_P or not e & PTE_U or (write and not e & PTE_W):
                raise Fault(va)
        return e & ADDR_MASK

    def read(self, va: int, length: int) -> bytes:
        if length < 0 or va < 0 or va + length > USER_TOP:
            raise Fault(va)
        out = bytearray()
        ram = self.ram
        while length:
            off = va & 0xFFF
            n = min(length, PAGE - off)
            gpa = self._frame(va, False) + off
            out += ram[gpa : gpa + n]
            va += n
            length -= n
        return bytes(out)

    def write(self, va: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        if va < 0 or va + length > USER_TOP:
            raise Fault(va)
        ram = self.ram
        # check every page first so that a failed write changes nothing
        frames = [self._frame(p, True) for p in range(va & ~0xFFF, va + length, PAGE)]
        pos = 0
        for i, gpa in enumerate(frames):
            off = va & 0xFFF if i == 0 else 0
            n = min(length - pos, PAGE - off)
            ram[gpa + off : gpa + off + n] = data[pos : pos + n]
            pos += n

    def read_u64(self, va: int) -> int:
        return int(_Q.unpack(self.read(va, 8))[0])

    def write_u64(self, va: int, value: int) -> None:
        self.write(va, _Q.pack(value & 0xFFFF_FFFF_FFFF_FFFF))

    def read_cstr(self, va: int, limit: int = 4096) -> bytes:
        """A NUL-terminated string of at most ``limit`` bytes (ENAMETOOLONG beyond: Fault)."""
        out = bytearray()
        while len(out) < limit:
            off = va & 0xFFF
            n = min(PAGE - off, limit - len(out))
            gpa = self._frame(va, False) + off
            chunk = self.ram[gpa : gpa + n]
            nul = bytes(chunk).find(b"\0")
            if nul >= 0:
                out += chunk[:nul]
                return bytes(out)
            out += chunk
            va += n
        raise Fault(va)
