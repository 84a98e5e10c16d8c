"""Completing, in the VMM, CPL0 instructions that KVM's instruction emulator rejects.

On a PVM host every guest instruction at CPL0 runs through KVM's x86 emulator (docs/PLATFORM.md),
which does not know a handful of instructions a Linux kernel uses. KVM then stops the vCPU with
``KVM_EXIT_INTERNAL_ERROR`` / ``KVM_INTERNAL_ERROR_EMULATION`` and, since Linux 5.14, the
instruction bytes (``kvm_run.emulation_failure``). This module is the hypervisor's half of
trap-and-emulate for those: when the effect of the instruction can be performed *exactly* through
the KVM API, it is performed and the vCPU resumes; otherwise the caller reports the failure as
before. Nothing is guessed: any doubt (an unusual prefix, an address that does not translate, an
accessed/dirty bit that would have to be set, an event already being delivered) refuses.

Completed (Intel SDM vol. 2 for each instruction; AMD APM vol. 3 for RDPRU):

- ``int3``, ``int n``: RIP moves past the instruction and the vector is handed to KVM as an
  injected interrupt (KVM_SET_VCPU_EVENTS), which delivers it through the guest's IDT like the
  instruction would at CPL0 (a software interrupt at CPL0 always passes the gate's DPL check,
  pushes no error code, and saves the RIP of the next instruction: SDM vol. 2A, INT n/INTO/INT3).
- ``xgetbv`` with ECX = 0: EDX:EAX = XCR0 (KVM_GET_XCRS).
- ``clac``/``stac``: RFLAGS.AC cleared / set.
- ``clflush``/``clflushopt``/``clwb``: guest RAM is ordinary coherent host memory, so the only
  architectural effects are the address checks, done here, and RIP.
- ``movbe``: the byte-swapped load or store, through a walk of the guest's page tables.
- ``popcnt``: the count of set bits, flags as the SDM defines them.
- ``lsl`` with a GDT selector: the segment limit and ZF, as the SDM's type and privilege rules say.
- ``wait``/``fwait``: #NM when CR0.MP and CR0.TS are set, otherwise nothing (refused when an x87
  exception is pending: the VMM does not deliver #MF).
- Any of these whose CPUID feature the guest was not given, or ``xgetbv`` with CR4.OSXSAVE clear:
  #UD is injected, as the CPU would raise it.

Not completed (reported): ``invpcid`` when the guest has the feature (its effect is a TLB
invalidation; KVM's shadow MMU syncs unsynchronised page tables on a guest TLB flush and offers
userspace no call that does the same), ``rdpru`` when the guest has it (APERF/MPERF are not
readable through KVM), ``xsave``/``xrstor`` and ``lock cmpxchg16b`` (a locked 16-byte
read-modify-write cannot be made atomic from the VMM while other vCPUs run), anything outside
64-bit mode, anything with RFLAGS.TF set.
"""

from __future__ import annotations

import ctypes as C
from typing import NamedTuple

from virtkit.arch.x86 import CR0_PE, EFER_LMA
from virtkit.kvm import structs as S

# --- architectural bits (Intel SDM vol. 3A §2.3, §2.5, §4.5) ------------------------------------
RFLAGS_TF = 1 << 8
RFLAGS_RF = 1 << 16
RFLAGS_AC = 1 << 18
RFLAGS_ZF = 1 << 6
#: CF PF AF ZF SF OF: the status flags an arithmetic instruction defines
RFLAGS_ARITH = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x800
CR0_WP = 1 << 16
CR4_LA57 = 1 << 12
CR4_PCIDE = 1 << 17
CR4_OSXSAVE = 1 << 18
CR4_SMAP = 1 << 21
PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D, PTE_PS = 1, 2, 4, 1 << 5, 1 << 6, 1 << 7
ADDR_MASK = 0x000F_FFFF_FFFF_F000
VEC_UD = 6
VEC_NM = 7
CR0_MP = 1 << 1
CR0_TS = 1 << 3
#: x87 FPU status word: exception summary, set while an unmasked exception is pending (SDM vol. 1 §8.1.3)
FSW_ES = 1 << 7

# --- struct kvm_vcpu_events byte offsets (include/uapi/asm-x86/kvm.h) ------------------------------
EV_EXC_INJECTED, EV_EXC_NR, EV_EXC_HAS_ERR, EV_EXC_PENDING = 0, 1, 2, 3
EV_INT_INJECTED, EV_INT_NR, EV_INT_SOFT, EV_INT_SHADOW = 8, 9, 10, 11
EV_NMI_INJECTED = 12
EV_FLAGS = 20
KVM_VCPUEVENT_VALID_SHADOW = 0x4

# --- CPUID feature bits: (leaf, subleaf, register, bit) ------------------------------------------
CPUID_CLFSH = (1, 0, "edx", 19)
CPUID_MOVBE = (1, 0, "ecx", 22)
CPUID_POPCNT = (1, 0, "ecx", 23)
CPUID_INVPCID = (7, 0, "ebx", 10)
CPUID_SMAP = (7, 0, "ebx", 20)
CPUID_CLFLUSHOPT = (7, 0, "ebx", 23)
CPUID_CLWB = (7, 0, "ebx", 24)
CPUID_RDPRU = (0x8000_0008, 0, "ebx", 4)

#: the mnemonics this module may complete (or answer with #UD)
COMPLETED = frozenset(
    {
        "int3",
        "int",
        "xgetbv",
        "clac",
        "stac",
        "clflush",
        "clflushopt",
        "clwb",
        "movbe",
        "popcnt",
        "wait",
        "lsl",
        "invpcid",
        "rdpru",
    }
)

#: 64-bit general registers as kvm_regs names, from any of their 64/32/16-bit capstone names
_GPR: dict[str, tuple[str, int]] = {}
for _i, _n in enumerate(("ax", "bx", "cx", "dx", "si", "di", "sp", "bp")):
    _GPR[f"r{_n}"], _GPR[f"e{_n}"], _GPR[_n] = (f"r{_n}", 8), (f"r{_n}", 4), (f"r{_n}", 2)
for _i in range(8, 16):
    _GPR[f"r{_i}"], _GPR[f"r{_i}d"], _GPR[f"r{_i}w"] = (f"r{_i}", 8), (f"r{_i}", 4), (f"r{_i}", 2)


TYPE_CHECKING = False
if TYPE_CHECKING:  # the protocols are for the type checker only: no class creation at start-up
    from typing import Protocol

    class VcpuOps(Protocol):
        """The vCPU calls completion needs (:class:`virtkit.kvm.ioctl.VcpuFd` has them all)."""

        def get_regs(self) -> S.kvm_regs: ...
        def set_regs(self, regs: S.kvm_regs) -> None: ...
        def get_sregs(self) -> S.kvm_sregs: ...
        def get_vcpu_events(self) -> S.kvm_vcpu_events: ...
        def set_vcpu_events(self, events: S.kvm_vcpu_events) -> None: ...
        def get_xcrs(self) -> S.kvm_xcrs: ...
        def get_cpuid2(self) -> list[S.kvm_cpuid_entry2]: ...
        def get_fpu(self) -> S.kvm_fpu: ...

    class MemoryOps(Protocol):
        """Bounds-checked guest-physical access (:class:`virtkit.memory.GuestMemory`)."""

        def read(self, gpa: int, length: int) -> bytes: ...
        def write(self, gpa: int, data: bytes) -> None: ...


class NotExact(Exception):
    """The instruction's effect cannot be performed exactly; the message says why."""


class Outcome(NamedTuple):
    """What :meth:`Completer.complete` did: ``kind`` names the completed instruction (with a
    ``#UD`` suffix when the exception was raised instead); ``kind`` is None and ``reason`` says
    why when nothing was done."""

    kind: str | None
    reason: str = ""


class Completer:
    """Completes rejected CPL0 instructions for one vCPU; caches the vCPU's CPUID.

    Plain classes and named tuples in this module, no dataclasses: the vCPU module imports it
    at start-up (a confined VMM cannot import later), and `virtkit run` keeps start-up short."""

    def __init__(self, vcpu: VcpuOps, memory: MemoryOps) -> None:
        self.vcpu = vcpu
        self.memory = memory
        self._cpuid: dict[tuple[int, int], S.kvm_cpuid_entry2] | None = None
        self._events_dirty = False

    # --- entry point -----------------------------------------------------------------------------
    def complete(self, insn: bytes | None) -> Outcome:
        """Perform the instruction at RIP if it can be done exactly. ``insn`` is the bytes KVM
        reported with the emulation failure (None: read them from guest memory)."""
        try:
            return Outcome(self._complete(insn))
        except NotExact as e:
            return Outcome(None, str(e))

    def _complete(self, insn: bytes | None) -> str:
        regs, sregs = self.vcpu.get_regs(), self.vcpu.get_sregs()
        if not (sregs.cr0 & CR0_PE and sregs.efer & EFER_LMA and sregs.cs.l):
            raise NotExact("only 64-bit mode is handled")
        if sregs.cs.selector & 3:
            raise NotExact(f"CPL{sregs.cs.selector & 3}: only CPL0 instructions are completed")
        if regs.rflags & RFLAGS_TF:
            raise NotExact("RFLAGS.TF is set (a single-step trap would follow)")
        events = self.vcpu.get_vcpu_events()
        raw = events.raw
        if raw[EV_EXC_INJECTED] or raw[EV_EXC_PENDING] or raw[EV_INT_INJECTED] or raw[EV_NMI_INJECTED]:
            raise NotExact("an event is already being delivered")
        if not insn:
            insn = self._fetch(regs.rip, sregs)
        decoded = decode(insn, regs.rip)
        self._events_dirty = False
        kind = self._perform(decoded, regs, sregs, events)
        if raw[EV_INT_SHADOW] and C.c_uint32.from_buffer(events, EV_FLAGS).value & KVM_VCPUEVENT_VALID_SHADOW:
            # an STI / MOV SS shadow covered exactly this instruction, which has now been handled
            raw[EV_INT_SHADOW] = 0
            self._events_dirty = True
        if self._events_dirty:
            self.vcpu.set_vcpu_events(events)
        return kind

    # --- instructions ----------------------------------------------------------------------------
    def _perform(self, d: Decoded, regs: S.kvm_regs, sregs: S.kvm_sregs, events: S.kvm_vcpu_events) -> str:
        m = d.mnemonic
        if m in COMPLETED and d.lock:
            return self._ud(events, m)  # none of them accepts LOCK (SDM vol. 2A §2.1.1)
        if m in ("int3", "int"):
            vector = 3 if m == "int3" else d.imm
            if d.prefixes:
                raise NotExact(f"{m} with prefixes {d.prefixes}")
            self._advance(regs, d)
            events.raw[EV_INT_INJECTED], events.raw[EV_INT_NR], events.raw[EV_INT_SOFT] = 1, vector, 0
            self._events_dirty = True
            return m
        if m == "xgetbv":
            if d.prefixes:
                raise NotExact(f"xgetbv with prefixes {d.prefixes}")
            if not sregs.cr4 & CR4_OSXSAVE:
                return self._ud(events, m)
            if regs.rcx & 0xFFFF_FFFF != 0:
                raise NotExact(f"xgetbv with ECX={regs.rcx & 0xFFFF_FFFF:#x} (only XCR0 is read)")
            xcrs = self.vcpu.get_xcrs()
            values = {int(xcrs.xcrs[i].xcr): int(xcrs.xcrs[i].value) for i in range(min(xcrs.nr_xcrs, 16))}
            if 0 not in values:
                raise NotExact("KVM_GET_XCRS did not report XCR0")
            regs.rax, regs.rdx = values[0] & 0xFFFF_FFFF, values[0] >> 32
            self._advance(regs, d)
            return m
        if m == "wait":
            return self._wait(d, regs, sregs, events)
        if m == "lsl":
            return self._lsl(d, regs, sregs)
        if m in ("clac", "stac"):
            if d.prefixes:
                raise NotExact(f"{m} with prefixes {d.prefixes}")
            if not self._has(CPUID_SMAP):
                return self._ud(events, m)
            regs.rflags = regs.rflags & ~RFLAGS_AC if m == "clac" else regs.rflags | RFLAGS_AC
            self._advance(regs, d)
            return m
        if m in ("clflush", "clflushopt", "clwb"):
            feature = {"clflush": CPUID_CLFSH, "clflushopt": CPUID_CLFLUSHOPT, "clwb": CPUID_CLWB}[m]
            if not self._has(feature):
                return self._ud(events, m)
            linear = self._address(d, regs, sregs)
            self._translate(linear, 1, write=False, regs=regs, sregs=sregs, ram=False)
            self._advance(regs, d)
            return m
        if m == "movbe":
            if not self._has(CPUID_MOVBE):
                return self._ud(events, m)
            return self._movbe(d, regs, sregs)
        if m == "popcnt":
            if not self._has(CPUID_POPCNT):
                return self._ud(events, m)
            return self._popcnt(d, regs, sregs)
        if m == "invpcid":
            if not self._has(CPUID_INVPCID):
                return self._ud(events, m)
            raise NotExact("invpcid: a TLB invalidation of KVM's shadow MMU cannot be done from the VMM")
        if m == "rdpru":
            if not self._has(CPUID_RDPRU):
                return self._ud(events, m)
            raise NotExact("rdpru: APERF/MPERF are not readable through KVM")
        raise NotExact(f"{m} is not an instruction the VMM completes")

    def _wait(self, d: Decoded, regs: S.kvm_regs, sregs: S.kvm_sregs, events: S.kvm_vcpu_events) -> str:
        """WAIT/FWAIT (9B; SDM vol. 2B): #NM when CR0.MP and CR0.TS are both set; otherwise it only
        checks for a pending unmasked x87 exception, and does nothing when there is none. A pending
        one (#MF, or FERR# with CR0.NE clear) is refused, not delivered: the VMM does not model the
        x87 exception path. 9B before an x87 opcode (FINIT = 9B DB E3) is a WAIT of its own."""
        if d.prefixes:
            raise NotExact(f"wait with prefixes {d.prefixes}")
        if sregs.cr0 & CR0_MP and sregs.cr0 & CR0_TS:
            events.raw[EV_EXC_INJECTED], events.raw[EV_EXC_NR], events.raw[EV_EXC_HAS_ERR] = 1, VEC_NM, 0
            self._events_dirty = True
            return "wait(#NM)"
        if self.vcpu.get_fpu().fsw & FSW_ES:
            raise NotExact("wait with an unmasked x87 exception pending (#MF is not delivered by the VMM)")
        self._advance(regs, d)
        return "wait"

    def _lsl(self, d: Decoded, regs: S.kvm_regs, sregs: S.kvm_sregs) -> str:
        """LSL r, r (0F 03; SDM vol. 2A "LSL"): the byte-granular limit of the segment the source
        selector names, if the descriptor is of a type LSL accepts (in IA-32e mode: any code or
        data segment, an LDT, a 64-bit TSS) and visible at CPL0 and the selector's RPL; ZF says
        whether it was loaded, no other flag changes. Linux's paranoid entry (NMI, #DB, #MC)
        reads its CPU number this way, from the limit of the GDT's CPUNODE segment."""
        if set(d.prefixes) - {0x66} or len(d.reg_ops) != 2:
            raise NotExact(f"lsl form not handled ({d.text})")
        name, size = _GPR.get(d.reg_ops[0], ("", 0))
        if not name or size != d.size:
            raise NotExact(f"lsl destination not handled ({d.text})")
        selector = _reg_value(regs, d.reg_ops[1]) & 0xFFFF
        if selector & 4:
            raise NotExact(f"lsl of an LDT selector ({selector:#x})")
        limit = self._segment_limit(selector, regs, sregs)
        if limit is None:
            regs.rflags &= ~RFLAGS_ZF
        else:
            old = int(getattr(regs, name))
            # a 16-bit destination takes the low 16 bits and keeps bits 63:16; wider ones zero-extend
            setattr(regs, name, (old & ~0xFFFF & ((1 << 64) - 1)) | (limit & 0xFFFF) if size == 2 else limit)
            regs.rflags |= RFLAGS_ZF
        self._advance(regs, d)
        return "lsl"

    def _segment_limit(self, selector: int, regs: S.kvm_regs, sregs: S.kvm_sregs) -> int | None:
        """The limit LSL loads for a GDT selector at CPL0, or None where LSL clears ZF."""
        index = selector & ~7
        if index == 0 or index + 7 > sregs.gdt.limit:
            return None  # the null selector, or beyond the table's limit
        linear = sregs.gdt.base + index
        pieces = self._translate(linear, 8, write=False, regs=regs, sregs=sregs, ram=True, implicit=True)
        raw = int.from_bytes(b"".join(self.memory.read(gpa, n) for gpa, n in pieces), "little")
        kind, s_bit, dpl = (raw >> 40) & 0xF, (raw >> 44) & 1, (raw >> 45) & 3
        if not s_bit:
            if kind not in (0x2, 0x9, 0xB):  # LDT, 64-bit TSS available / busy (SDM vol. 3A §3.5)
                return None
            if index + 15 > sregs.gdt.limit:
                raise NotExact(f"a system descriptor at {index:#x} crosses the GDT limit")
        conforming = s_bit and kind & 0b1100 == 0b1100
        if not conforming and (selector & 3) > dpl:
            return None  # CPL is 0, so only the RPL can exceed the DPL
        limit = (raw & 0xFFFF) | ((raw >> 32) & 0xF_0000)
        if raw >> 55 & 1:  # G: 4 KiB granularity
            limit = (limit << 12) | 0xFFF
        return limit

    def _movbe(self, d: Decoded, regs: S.kvm_regs, sregs: S.kvm_sregs) -> str:
        if d.reg is None or d.mem is None or set(d.prefixes) - {0x66, 0x67, 0x64, 0x65}:
            raise NotExact(f"movbe form not handled ({d.text})")
        name, size = _GPR[d.reg]
        if size != d.size:
            raise NotExact(f"movbe operand sizes disagree ({d.text})")
        linear = self._address(d, regs, sregs)
        pieces = self._translate(linear, size, write=d.store, regs=regs, sregs=sregs, ram=True)
        if d.store:
            value = getattr(regs, name) & ((1 << (8 * size)) - 1)
            data = value.to_bytes(size, "big")  # the byte swap: stored most significant first
            pos = 0
            for gpa, n in pieces:
                self.memory.write(gpa, data[pos : pos + n])
                pos += n
        else:
            data = b"".join(self.memory.read(gpa, n) for gpa, n in pieces)
            value = int.from_bytes(data, "big")
            old = getattr(regs, name)
            if size == 2:  # a 16-bit destination keeps bits 63:16; a 32-bit one zero-extends
                value |= old & ~0xFFFF & ((1 << 64) - 1)
            setattr(regs, name, value)
        self._advance(regs, d)
        return "movbe"

    def _popcnt(self, d: Decoded, regs: S.kvm_regs, sregs: S.kvm_sregs) -> str:
        """POPCNT r, r/m (F3 [REX] 0F B8; SDM vol. 2B): the count of set bits of the source into
        the destination; OF SF ZF AF CF PF cleared, then ZF set if the source is 0."""
        if set(d.prefixes) - {0xF3, 0x66, 0x64, 0x65, 0x67} or not d.reg_ops:
            raise NotExact(f"popcnt form not handled ({d.text})")
        name, size = _GPR.get(d.reg_ops[0], ("", 0))
        if not name or size != d.size:
            raise NotExact(f"popcnt destination not handled ({d.text})")
        if len(d.reg_ops) == 2:
            source = _reg_value(regs, d.reg_ops[1])
        elif d.mem is not None:
            pieces = self._translate(self._address(d, regs, sregs), size, write=False, regs=regs, sregs=sregs, ram=True)
            source = int.from_bytes(b"".join(self.memory.read(gpa, n) for gpa, n in pieces), "little")
        else:
            raise NotExact(f"popcnt form not handled ({d.text})")
        count = bin(source).count("1")
        old = int(getattr(regs, name))
        # a 16-bit destination keeps bits 63:16; a 32-bit one zero-extends (SDM vol. 1 §3.4.1.1)
        setattr(regs, name, (old & ~0xFFFF & ((1 << 64) - 1)) | count if size == 2 else count)
        regs.rflags = regs.rflags & ~RFLAGS_ARITH | (RFLAGS_ZF if source == 0 else 0)
        self._advance(regs, d)
        return "popcnt"

    # --- helpers ---------------------------------------------------------------------------------
    def _advance(self, regs: S.kvm_regs, d: Decoded) -> None:
        regs.rip = (regs.rip + d.size_bytes) & ((1 << 64) - 1)
        regs.rflags &= ~RFLAGS_RF  # cleared when an instruction completes (SDM vol. 3A §18.3.1.1)
        self.vcpu.set_regs(regs)

    def _ud(self, events: S.kvm_vcpu_events, what: str) -> str:
        """Raise #UD at this instruction (a fault: RIP stays on it, no error code)."""
        events.raw[EV_EXC_INJECTED], events.raw[EV_EXC_NR], events.raw[EV_EXC_HAS_ERR] = 1, VEC_UD, 0
        self._events_dirty = True
        return f"{what}(#UD)"

    def _has(self, feature: tuple[int, int, str, int]) -> bool:
        if self._cpuid is None:
            self._cpuid = {}
            for e in self.vcpu.get_cpuid2():
                self._cpuid[(int(e.function), int(e.index))] = e
        leaf, sub, reg, bit = feature
        entry = self._cpuid.get((leaf, sub)) or self._cpuid.get((leaf, 0))
        return entry is not None and bool(getattr(entry, reg) >> bit & 1)

    def _address(self, d: Decoded, regs: S.kvm_regs, sregs: S.kvm_sregs) -> int:
        """The linear address of the memory operand (SDM vol. 1 §3.7.5; 64-bit mode: only FS
        and GS have a base)."""
        mem = d.mem
        assert mem is not None
        ea = mem.disp
        if mem.base == "rip":
            ea += regs.rip + d.size_bytes
        elif mem.base:
            ea += _reg_value(regs, mem.base)
        if mem.index_reg:
            ea += _reg_value(regs, mem.index_reg) * mem.scale
        ea &= 0xFFFF_FFFF if 0x67 in d.prefixes else (1 << 64) - 1
        if mem.segment == "fs":
            ea += sregs.fs.base
        elif mem.segment == "gs":
            ea += sregs.gs.base
        return ea & ((1 << 64) - 1)

    def _fetch(self, rip: int, sregs: S.kvm_sregs) -> bytes:
        out = bytearray()
        for gpa, n in self._walk_range(rip, 15, sregs, fetch=True):
            out += self.memory.read(gpa, n)
        return bytes(out)

    def _walk_range(self, linear: int, size: int, sregs: S.kvm_sregs, fetch: bool = False) -> list[tuple[int, int]]:
        pieces: list[tuple[int, int]] = []
        pos = linear
        end = linear + size
        while pos < end:
            try:
                gpa, _ = walk(self.memory, sregs, pos)
            except NotExact:
                if fetch and pieces:
                    break  # an instruction shorter than 15 bytes may end before an unmapped page
                raise
            n = min(end - pos, 0x1000 - (pos & 0xFFF))
            pieces.append((gpa, n))
            pos += n
        return pieces

    def _translate(
        self,
        linear: int,
        size: int,
        *,
        write: bool,
        regs: S.kvm_regs,
        sregs: S.kvm_sregs,
        ram: bool,
        implicit: bool = False,
    ) -> list[tuple[int, int]]:
        """(gpa, length) pieces for a supervisor data access; NotExact where the CPU would fault
        or would set an accessed/dirty bit the VMM cannot set atomically. ``implicit``: a
        descriptor-table access, for which a user page is refused whatever RFLAGS.AC says."""
        if not _canonical(linear, sregs) or not _canonical(linear + size - 1, sregs):
            raise NotExact(f"non-canonical address {linear:#x} (#GP)")
        pieces: list[tuple[int, int]] = []
        pos, end = linear, linear + size
        while pos < end:
            gpa, walked = walk(self.memory, sregs, pos)
            if not walked.accessed:
                raise NotExact(f"the page tables for {pos:#x} have an accessed bit clear")
            if walked.user and implicit:
                raise NotExact(f"an implicit supervisor access to user page {pos:#x} (a descriptor table)")
            if walked.user and sregs.cr4 & CR4_SMAP and not regs.rflags & RFLAGS_AC:
                raise NotExact(f"supervisor access to user page {pos:#x} with SMAP on (#PF)")
            if write and not walked.writable and sregs.cr0 & CR0_WP:
                raise NotExact(f"write to read-only page {pos:#x} (#PF)")
            if write and not walked.dirty:
                raise NotExact(f"the page of {pos:#x} has its dirty bit clear")
            n = min(end - pos, 0x1000 - (pos & 0xFFF))
            if ram:
                try:
                    self.memory.read(gpa, n)
                except Exception:
                    raise NotExact(f"{pos:#x} is not guest RAM (MMIO is not completed)") from None
            pieces.append((gpa, n))
            pos += n
        return pieces


# --- decoding ----------------------------------------------------------------------------------------
class MemOperand(NamedTuple):
    base: str | None
    index_reg: str | None
    scale: int
    disp: int
    segment: str | None


class Decoded(NamedTuple):
    mnemonic: str
    text: str
    size_bytes: int
    prefixes: tuple[int, ...]  # legacy prefixes other than LOCK
    lock: bool
    imm: int = 0
    reg: str | None = None  # the register operand (movbe)
    reg_ops: tuple[str, ...] = ()  # every register operand, in order (popcnt: destination, source)
    mem: MemOperand | None = None
    size: int = 0  # operand size in bytes (movbe)
    store: bool = False  # movbe m, r


_PREFIXES = frozenset({0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67})


#: prefix-free opcodes decoded without capstone: the frequent ones (a Linux kernel runs stac/clac
#: around every user-memory access) stay cheap, and work in a confined VMM that cannot import
#: capstone (SDM vol. 2: INT3 CC, XGETBV 0F 01 D0, CLAC 0F 01 CA, STAC 0F 01 CB, WAIT 9B; APM: RDPRU 0F 01 FD)
_FIXED: dict[bytes, str] = {
    b"\xcc": "int3",
    b"\x0f\x01\xd0": "xgetbv",
    b"\x0f\x01\xca": "clac",
    b"\x0f\x01\xcb": "stac",
    b"\x0f\x01\xfd": "rdpru",
    b"\x9b": "wait",
}


def decode(code: bytes, address: int) -> Decoded:
    """The first instruction of ``code`` (64-bit mode), with what completion needs."""
    if code[:1] == b"\xcd" and len(code) >= 2:  # INT imm8
        return Decoded(mnemonic="int", text=f"int {code[1]:#x}", size_bytes=2, prefixes=(), lock=False, imm=code[1])
    for pattern, name in _FIXED.items():
        if code.startswith(pattern):
            return Decoded(mnemonic=name, text=name, size_bytes=len(pattern), prefixes=(), lock=False)
    try:
        import capstone
        from capstone import x86 as cx
    except ImportError:
        raise NotExact("capstone cannot be imported, so the instruction cannot be decoded") from None

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    insn = next(md.disasm(code[:15], address), None)
    if insn is None:
        raise NotExact(f"bytes {code[:15].hex(' ')} do not decode")
    raw = bytes(insn.bytes)
    prefixes = []
    for b in raw:
        if b not in _PREFIXES:
            break
        prefixes.append(b)
    lock = 0xF0 in prefixes
    legacy = tuple(p for p in prefixes if p != 0xF0)
    reg = None
    mem = None
    imm = 0
    size = 0
    store = False
    reg_ops: list[str] = []
    for i, op in enumerate(insn.operands):
        if op.type == cx.X86_OP_REG:
            reg = insn.reg_name(op.reg)
            reg_ops.append(reg)
            size = size or op.size
        elif op.type == cx.X86_OP_MEM:
            m = op.mem
            mem = MemOperand(
                base=insn.reg_name(m.base) if m.base else None,
                index_reg=insn.reg_name(m.index) if m.index else None,
                scale=m.scale,
                disp=m.disp,
                segment=insn.reg_name(m.segment) if m.segment else None,
            )
            store = i == 0
            size = size or op.size
        elif op.type == cx.X86_OP_IMM:
            imm = op.imm & 0xFF
    return Decoded(
        mnemonic=insn.mnemonic,
        text=f"{insn.mnemonic} {insn.op_str}".strip(),
        size_bytes=insn.size,
        prefixes=legacy,
        lock=lock,
        imm=imm,
        reg=reg,
        reg_ops=tuple(reg_ops),
        mem=mem,
        size=size,
        store=store,
    )


# --- the guest's page tables -------------------------------------------------------------------------
class Walked(NamedTuple):
    """Rights and bits over the whole walk (SDM vol. 3A §4.6: every level must allow)."""

    writable: bool
    user: bool
    accessed: bool
    dirty: bool


def _canonical(linear: int, sregs: S.kvm_sregs) -> bool:
    bits = 57 if sregs.cr4 & CR4_LA57 else 48
    top = linear >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


def walk(memory: MemoryOps, sregs: S.kvm_sregs, linear: int) -> tuple[int, Walked]:
    """Translate a linear address through 4- or 5-level paging (SDM vol. 3A §4.5), reading the
    guest's tables from its RAM. NotExact if an entry is not present or not in RAM."""
    if not sregs.cr0 & (1 << 31):
        return linear, Walked(True, False, True, True)
    levels = 5 if sregs.cr4 & CR4_LA57 else 4
    table = sregs.cr3 & ADDR_MASK
    writable = user = accessed = True
    dirty = False
    for level in range(levels, 0, -1):
        shift = 12 + 9 * (level - 1)
        slot = table + ((linear >> shift) & 0x1FF) * 8
        try:
            entry = int.from_bytes(memory.read(slot, 8), "little")
        except Exception:
            raise NotExact(f"page table entry at {slot:#x} is not in guest RAM") from None
        if not entry & PTE_P:
            raise NotExact(f"{linear:#x} is not mapped (#PF)")
        writable &= bool(entry & PTE_RW)
        user &= bool(entry & PTE_US)
        accessed &= bool(entry & PTE_A)
        leaf = level == 1 or (level in (2, 3) and entry & PTE_PS)
        if leaf:
            dirty = bool(entry & PTE_D)
            page = (entry & ADDR_MASK) & ~((1 << shift) - 1)
            return page | (linear & ((1 << shift) - 1)), Walked(writable, user, accessed, dirty)
        table = entry & ADDR_MASK
    raise AssertionError("unreachable")


def _reg_value(regs: S.kvm_regs, name: str) -> int:
    try:
        full, size = _GPR[name]
    except KeyError:
        raise NotExact(f"address register {name} not handled") from None
    return int(getattr(regs, full)) & ((1 << (8 * size)) - 1)
