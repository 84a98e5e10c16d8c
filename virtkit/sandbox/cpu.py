"""The few pages of "kernel" a sandbox VM has, all written by the VMM, and the vCPU state.

There is no guest kernel. In the last PML4 slot (shared by every address space) the VMM maps:

- the IDT: vectors 0-31 as 64-bit interrupt gates to one stub each (DPL0, ``int3`` DPL3);
- the fault stubs: ``out %al, $0xC0+vector`` then ``hlt``; the VMM reads the exception frame on
  the CPL0 stack and decides (serve a page fault, or a signal); ``iretq`` at FAULT_IRET resumes;
- the system-call stub (user-executable, because PVM runs the LSTAR target at CPL3):
  ``out %al, $0xBF`` then ``sysretq``. On PVM the VMM resumes the program at RCX itself (the stub
  runs at CPL3, where ``sysretq`` would fault); at a real CPL0 (VT-x) the stub's ``sysretq`` does it;
- per vCPU slot: a GDT (kernel code/data, the SYSRET user layout, a TSS), a TSS whose I/O bitmap
  is all zero (so the CPL3 ``out`` is allowed: PVM does not honour IOPL at CPL3) and a CPL0 stack.

No stub touches a register: ``out %al, imm8`` reads AL and nothing else.
References: Intel SDM vol. 3A §6.14.1 (64-bit IDT gates), §8.7 (64-bit TSS), §19.5.2 (I/O
permission bit map), §5.8.8 (SYSCALL/SYSRET and STAR/LSTAR/SFMASK); docs/PLATFORM.md
("Privilege transitions").
"""

from __future__ import annotations

import struct

from virtkit.arch.x86 import (
    MSR_CSTAR,
    MSR_KERNEL_GS_BASE,
    MSR_LSTAR,
    MSR_STAR,
    MSR_SYSCALL_MASK,
    fpu_init_state,
    gdt_entry,
    segment_from_gdt,
    task_register,
    tss64_descriptor,
)
from virtkit.kvm import structs as S
from virtkit.sandbox.paging import KERNEL_BASE, PTE_NX, PTE_P, PTE_U, PTE_W, AddressSpace, FrameAllocator

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

    from virtkit.kvm.ioctl import Kvm, VcpuFd

#: the port the system-call stub writes; fault stubs write FAULT_PORT_BASE + vector
SYSCALL_PORT: Final = 0xBF
FAULT_PORT_BASE: Final = 0xC0
IDT_VA: Final = KERNEL_BASE
FAULT_STUBS_VA: Final = KERNEL_BASE + 0x1000
#: ``iretq`` in the fault-stub page: the VMM points RIP here to resume after a served fault
FAULT_IRET_VA: Final = FAULT_STUBS_VA + 0x400
SYSCALL_STUB_VA: Final = KERNEL_BASE + 0x2000
#: where the stub's ``sysretq`` sits (RIP after its ``out``)
SYSRET_VA: Final = SYSCALL_STUB_VA + 2
CPU_SLOTS_VA: Final = KERNEL_BASE + 0x10_0000
CPU_SLOT_SIZE: Final = 0x8000
MAX_CPU_SLOTS: Final = 256

# GDT selectors: SYSCALL loads CS=0x08/SS=0x10, SYSRET loads SS=0x18+8=0x20|3, CS=0x18+16=0x28|3
KERNEL_CS: Final = 0x08
KERNEL_DS: Final = 0x10
USER_DS: Final = 0x23
USER_CS: Final = 0x2B
TSS_SEL: Final = 0x30
TSS_OFFSET: Final = 0x80
TSS_SIZE: Final = 0x68
IOMAP_BYTES: Final = 0x2000
CPL0_STACK_TOP: Final = 0x6000

#: exceptions that push an error code (SDM vol. 3A table 6-1)
ERROR_CODE_VECTORS: Final = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})

CR0: Final = 0x8001_0033  # PE MP ET NE WP PG
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE = 1 << 5, 1 << 9, 1 << 10, 1 << 18
EFER: Final = (1 << 0) | (1 << 8) | (1 << 10) | (1 << 11)  # SCE LME LMA NXE
#: RFLAGS bits SYSCALL clears (Linux's choice: TF DF IF AC NT)
SFMASK: Final = 0x47700
RFLAGS_USER: Final = 0x202

GDT: Final = (
    0,
    gdt_entry(0xA09B, 0, 0xFFFFF),  # 0x08 kernel code, 64-bit
    gdt_entry(0xC093, 0, 0xFFFFF),  # 0x10 kernel data
    gdt_entry(0xC0FB, 0, 0xFFFFF),  # 0x18 user code, 32-bit (SYSRET's base; never loaded)
    gdt_entry(0xC0F3, 0, 0xFFFFF),  # 0x20 user data (0x23)
    gdt_entry(0xA0FB, 0, 0xFFFFF),  # 0x28 user code, 64-bit (0x2b)
)


def gate(handler: int, dpl: int = 0) -> bytes:
    """A 64-bit interrupt gate to ``handler`` in the kernel code segment (SDM figure 6-8)."""
    attr = 0x8E | (dpl << 5)
    low = (handler & 0xFFFF) | (KERNEL_CS << 16) | (attr << 40) | (((handler >> 16) & 0xFFFF) << 48)
    return struct.pack("<QQ", low, handler >> 32)


def fault_stubs() -> bytes:
    """Vector ``v``'s stub at offset 8*v: ``out %al, $(0xC0+v)``; ``hlt``; then ``iretq``."""
    page = bytearray(b"\xf4" * 4096)
    for v in range(32):
        page[8 * v : 8 * v + 3] = bytes((0xE6, FAULT_PORT_BASE + v, 0xF4))
    off = FAULT_IRET_VA - FAULT_STUBS_VA
    page[off : off + 2] = b"\x48\xcf"
    return bytes(page)


#: ``out %al, $0xBF``; ``sysretq``
SYSCALL_STUB: Final = bytes((0xE6, SYSCALL_PORT, 0x48, 0x0F, 0x07))

#: The fast path where the stub runs at CPL3 (PVM): a per-process page pair above the stack. The
#: stub stores the call's registers in the data page after it, exits once, and returns by itself,
#: so the VMM needs neither KVM_GET_REGS nor KVM_SET_REGS (docs/SANDBOX.md, "How a system call
#: travels"). The data page lies above USER_TOP: no system call can unmap it or point into it.
FAST_PORT: Final = 0xBE
FAST_STUB_VA: Final = 0x7FFF_FFFF_E000
FAST_DATA_VA: Final = 0x7FFF_FFFF_F000
#: data page layout: rax(nr, then the result) rdi rsi rdx r10 r8 r9 rcx r11, saved rsp; a
#: 16-byte stack at its end for the popfq
FAST_STUB: Final = bytes.fromhex(
    "488905f90f0000"  # mov %rax, D+0(%rip)
    "48893dfa0f0000"  # mov %rdi, D+8(%rip)
    "488935fb0f0000"  # mov %rsi, D+16(%rip)
    "488915fc0f0000"  # mov %rdx, D+24(%rip)
    "4c8915fd0f0000"  # mov %r10, D+32(%rip)
    "4c8905fe0f0000"  # mov %r8,  D+40(%rip)
    "4c890dff0f0000"  # mov %r9,  D+48(%rip)
    "48890d00100000"  # mov %rcx, D+56(%rip)
    "4c891d01100000"  # mov %r11, D+64(%rip)
    "e6be"  # out %al, $0xBE            <- the one exit
    "48892500100000"  # mov %rsp, D+72(%rip)
    "488d25b11f0000"  # lea D+4096(%rip), %rsp
    "4153"  # push %r11
    "9d"  # popfq                        (the program's RFLAGS)
    "488b25ef0f0000"  # mov D+72(%rip), %rsp
    "488b05a00f0000"  # mov D+0(%rip), %rax   (the result)
    "ffe1"  # jmp *%rcx                   (back to the program)
)


def idt() -> bytes:
    return b"".join(gate(FAULT_STUBS_VA + 8 * v, 3 if v == 3 else 0) for v in range(32)).ljust(4096, b"\0")


def tss(rsp0: int) -> bytes:
    """A 64-bit TSS with RSP0 and an all-zero I/O bitmap right after it, then the 0xFF end byte."""
    head = struct.pack("<IQQQQQQQQQQQQHH", 0, rsp0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, TSS_SIZE)
    assert len(head) == TSS_SIZE
    return head + bytes(IOMAP_BYTES) + b"\xff"


class Kernel:
    """The shared kernel slot: its page tables, IDT and stubs, and per-vCPU slots."""

    def __init__(self, frames: FrameAllocator) -> None:
        self.frames = frames
        mem = frames.mem
        self.pdpt = frames.alloc()
        # a throwaway space to reach the shared slot's tables through the common code
        self._space = AddressSpace(frames, self.pdpt)
        for va, data, flags in (
            (IDT_VA, idt(), PTE_P | PTE_NX),
            (FAULT_STUBS_VA, fault_stubs(), PTE_P),
            (SYSCALL_STUB_VA, SYSCALL_STUB.ljust(4096, b"\xf4"), PTE_P | PTE_U),
        ):
            gpa = frames.alloc()
            mem.write(gpa, data)
            self._space.map_kernel_page(va, gpa, flags)
        self.slots_built = 0

    def slot_va(self, index: int) -> int:
        return CPU_SLOTS_VA + index * CPU_SLOT_SIZE

    def build_slot(self, index: int) -> None:
        """GDT + TSS (+ I/O bitmap) and a CPL0 stack for vCPU slot ``index``."""
        if index >= MAX_CPU_SLOTS:
            raise ValueError("too many vCPU slots")
        base = self.slot_va(index)
        low, high = tss64_descriptor(base + TSS_OFFSET, TSS_SIZE + IOMAP_BYTES)
        gdt = struct.pack(f"<{len(GDT) + 2}Q", *GDT, low, high)
        blob = gdt.ljust(TSS_OFFSET, b"\0") + tss(base + CPL0_STACK_TOP)
        for i in range(CPL0_STACK_TOP // 4096):
            gpa = self.frames.alloc()
            chunk = blob[i * 4096 : (i + 1) * 4096]
            if chunk:
                self.frames.mem.write(gpa, chunk)
            self._space.map_kernel_page(base + i * 4096, gpa, PTE_P | PTE_W | PTE_NX)


def user_segments(sregs: S.kvm_sregs) -> None:
    """CS/SS/DS/ES as a CPL3 program has them (FS/GS keep their bases)."""
    sregs.cs = segment_from_gdt(USER_CS, GDT[USER_CS >> 3])
    data = segment_from_gdt(USER_DS, GDT[USER_DS >> 3])
    sregs.ss = data
    sregs.ds = data
    sregs.es = data


def init_vcpu(
    kvm: Kvm, vcpu: VcpuFd, kernel: Kernel, slot: int, cr3: int, *, fresh: bool = True, fast: bool = False
) -> None:
    """Long mode at CPL3 with this slot's descriptor tables, SYSCALL enabled, SSE/AVX usable.
    ``fresh``: the vCPU never ran (KVM refuses a CPUID change after the first KVM_RUN)."""
    cpuid = kvm.supported_cpuid()
    if fresh:
        vcpu.set_cpuid2(cpuid)
    xsave = any(e.function == 1 and e.ecx & (1 << 26) for e in cpuid)
    sregs = vcpu.get_sregs()
    base = kernel.slot_va(slot)
    low, high = tss64_descriptor(base + TSS_OFFSET, TSS_SIZE + IOMAP_BYTES)
    sregs.tr = task_register(TSS_SEL, low, high)
    sregs.gdt.base, sregs.gdt.limit = base, (len(GDT) + 2) * 8 - 1
    sregs.idt.base, sregs.idt.limit = IDT_VA, 32 * 16 - 1
    sregs.ldt.unusable = 1
    user_segments(sregs)
    for seg in (sregs.fs, sregs.gs):
        seg.selector, seg.base, seg.limit, seg.type, seg.present, seg.dpl, seg.s = 0, 0, 0xFFFFFFFF, 3, 1, 3, 1
        seg.db, seg.g, seg.l, seg.unusable = 1, 1, 0, 0
    sregs.cr0 = CR0
    sregs.cr3 = cr3
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | (CR4_OSXSAVE if xsave else 0)
    sregs.efer = EFER
    vcpu.set_sregs(sregs)
    if xsave:
        xcrs = S.kvm_xcrs()
        xcrs.nr_xcrs = 1
        xcrs.xcrs[0].xcr = 0
        xcrs.xcrs[0].value = 0x7  # x87, SSE, AVX
        vcpu.set_xcrs(xcrs)
    vcpu.set_fpu(fpu_init_state())
    vcpu.set_msrs(
        {
            MSR_STAR: (0x18 << 48) | (KERNEL_CS << 32),
            MSR_LSTAR: FAST_STUB_VA if fast else SYSCALL_STUB_VA,
            MSR_CSTAR: FAST_STUB_VA if fast else SYSCALL_STUB_VA,
            # the fast stub restores RFLAGS itself, where CPL3 popfq cannot set IF back: clear nothing
            MSR_SYSCALL_MASK: 0 if fast else SFMASK,
            MSR_KERNEL_GS_BASE: 0,
        }
    )
