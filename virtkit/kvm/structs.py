"""ctypes mirrors of the KVM uapi structures virtkit uses (x86-64).

Field names follow the kernel headers so that the C and Python can be read side by side.
"""

from __future__ import annotations

import ctypes as C

u8, u16, u32, u64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64
s32 = C.c_int32


class kvm_regs(C.Structure):
    _fields_ = [
        (n, u64)
        for n in (
            "rax",
            "rbx",
            "rcx",
            "rdx",
            "rsi",
            "rdi",
            "rsp",
            "rbp",
            "r8",
            "r9",
            "r10",
            "r11",
            "r12",
            "r13",
            "r14",
            "r15",
            "rip",
            "rflags",
        )
    ]


class kvm_segment(C.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(C.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(C.Structure):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(C.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_msr_entry(C.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


def kvm_msrs_of(n: int) -> type[C.Structure]:
    """``struct kvm_msrs`` followed by ``n`` entries (a flexible array member in C)."""

    class kvm_msrs(C.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * n)]

    return kvm_msrs


def kvm_msr_list_of(n: int) -> type[C.Structure]:
    class kvm_msr_list(C.Structure):
        _fields_ = [("nmsrs", u32), ("indices", u32 * n)]

    return kvm_msr_list


class kvm_cpuid_entry2(C.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


def kvm_cpuid2_of(n: int) -> type[C.Structure]:
    class kvm_cpuid2(C.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * n)]

    return kvm_cpuid2


class kvm_userspace_memory_region(C.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_dirty_log(C.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_irq_level(C.Structure):
    _fields_ = [("irq", u32), ("level", u32)]  # irq is a union with status in the kernel


class kvm_irqchip(C.Structure):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", u8 * 512)]


class kvm_pit_config(C.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_pit_state2(C.Structure):
    _fields_ = [("channels", u8 * (24 * 3)), ("flags", u32), ("reserved", u32 * 9)]


class kvm_lapic_state(C.Structure):
    _fields_ = [("regs", u8 * 1024)]


class kvm_vcpu_events(C.Structure):
    _fields_ = [("raw", u8 * 64)]  # saved and restored whole; virtkit never edits fields


class kvm_mp_state(C.Structure):
    _fields_ = [("mp_state", u32)]


class kvm_debugregs(C.Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class kvm_xsave(C.Structure):
    _fields_ = [("region", u32 * 1024)]


class kvm_xcr(C.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(C.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * 16), ("padding", u64 * 16)]


class kvm_clock_data(C.Structure):
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64), ("host_tsc", u64), ("pad", u32 * 4)]


class kvm_irqfd(C.Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


class kvm_ioeventfd(C.Structure):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", s32), ("flags", u32), ("pad", u8 * 36)]


class kvm_enable_cap(C.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_guest_debug(C.Structure):
    """KVM_SET_GUEST_DEBUG: control flags, then (x86) DR0-DR7 in ``debugreg``."""

    _fields_ = [("control", u32), ("pad", u32), ("debugreg", u64 * 8)]


#: kvm_guest_debug.control bits (include/uapi/linux/kvm.h, asm-x86/kvm.h)
KVM_GUESTDBG_ENABLE = 0x1
KVM_GUESTDBG_USE_HW_BP = 0x20000


class kvm_translation(C.Structure):
    _fields_ = [
        ("linear_address", u64),
        ("physical_address", u64),
        ("valid", u8),
        ("writeable", u8),
        ("usermode", u8),
        ("pad", u8 * 5),
    ]


# --- struct kvm_run: only the header and the exit-union offsets are needed, since the run loop
# --- reads the shared page with struct.unpack_from (cheaper than ctypes attribute access).
KVM_RUN_SIZE = 2352
KVM_RUN_IMMEDIATE_EXIT_OFFSET = 1
KVM_RUN_EXIT_REASON_OFFSET = 8
KVM_RUN_EXIT_UNION_OFFSET = 32  # io / mmio / internal / system_event ... all start here
