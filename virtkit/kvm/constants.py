"""KVM ioctl numbers, capabilities, exit reasons and flags (linux/kvm.h, asm/kvm.h)."""

from __future__ import annotations

import ctypes as C
import enum

from virtkit.kvm import structs as S

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

KVMIO: Final = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    # include/uapi/asm-generic/ioctl.h: dir:2 | size:14 | type:8 | nr:8
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, t: type[C.Structure] | type[C._SimpleCData]) -> int:  # type: ignore[type-arg]
    return _ioc(_IOC_READ, nr, C.sizeof(t))


def _iow(nr: int, t: type[C.Structure] | type[C._SimpleCData]) -> int:  # type: ignore[type-arg]
    return _ioc(_IOC_WRITE, nr, C.sizeof(t))


def _iowr(nr: int, t: type[C.Structure] | type[C._SimpleCData]) -> int:  # type: ignore[type-arg]
    return _ioc(_IOC_READ | _IOC_WRITE, nr, C.sizeof(t))


# system ioctls (on /dev/kvm)
KVM_GET_API_VERSION: Final = _io(0x00)
KVM_CREATE_VM: Final = _io(0x01)
KVM_GET_MSR_INDEX_LIST: Final = _iowr(0x02, S.kvm_msr_list_of(0))
KVM_CHECK_EXTENSION: Final = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE: Final = _io(0x04)
KVM_GET_SUPPORTED_CPUID: Final = _iowr(0x05, S.kvm_cpuid2_of(0))
# VM ioctls
KVM_CREATE_VCPU: Final = _io(0x41)
KVM_GET_DIRTY_LOG: Final = _iow(0x42, S.kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION: Final = _iow(0x46, S.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR: Final = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR: Final = _iow(0x48, C.c_uint64)
KVM_CREATE_IRQCHIP: Final = _io(0x60)
KVM_IRQ_LINE: Final = _iow(0x61, S.kvm_irq_level)
KVM_GET_IRQCHIP: Final = _iowr(0x62, S.kvm_irqchip)
KVM_SET_IRQCHIP: Final = _ior(0x63, S.kvm_irqchip)  # sic: _IOR in the kernel header
KVM_IRQ_LINE_STATUS: Final = _iowr(0x67, S.kvm_irq_level)
KVM_IRQFD: Final = _iow(0x76, S.kvm_irqfd)
KVM_CREATE_PIT2: Final = _iow(0x77, S.kvm_pit_config)
KVM_IOEVENTFD: Final = _iow(0x79, S.kvm_ioeventfd)
KVM_SET_CLOCK: Final = _iow(0x7B, S.kvm_clock_data)
KVM_GET_CLOCK: Final = _ior(0x7C, S.kvm_clock_data)
KVM_GET_PIT2: Final = _ior(0x9F, S.kvm_pit_state2)
KVM_SET_PIT2: Final = _iow(0xA0, S.kvm_pit_state2)
KVM_ENABLE_CAP: Final = _iow(0xA3, S.kvm_enable_cap)
# vCPU ioctls
KVM_RUN: Final = _io(0x80)
KVM_GET_REGS: Final = _ior(0x81, S.kvm_regs)
KVM_SET_REGS: Final = _iow(0x82, S.kvm_regs)
KVM_GET_SREGS: Final = _ior(0x83, S.kvm_sregs)
KVM_SET_SREGS: Final = _iow(0x84, S.kvm_sregs)
KVM_TRANSLATE: Final = _iowr(0x85, S.kvm_translation)
KVM_GET_MSRS: Final = _iowr(0x88, S.kvm_msrs_of(0))
KVM_SET_MSRS: Final = _iow(0x89, S.kvm_msrs_of(0))
KVM_GET_FPU: Final = _ior(0x8C, S.kvm_fpu)
KVM_SET_FPU: Final = _iow(0x8D, S.kvm_fpu)
KVM_GET_LAPIC: Final = _ior(0x8E, S.kvm_lapic_state)
KVM_SET_LAPIC: Final = _iow(0x8F, S.kvm_lapic_state)
KVM_SET_CPUID2: Final = _iow(0x90, S.kvm_cpuid2_of(0))
KVM_GET_CPUID2: Final = _iowr(0x91, S.kvm_cpuid2_of(0))
KVM_GET_MP_STATE: Final = _ior(0x98, S.kvm_mp_state)
KVM_SET_MP_STATE: Final = _iow(0x99, S.kvm_mp_state)
KVM_GET_VCPU_EVENTS: Final = _ior(0x9F, S.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS: Final = _iow(0xA0, S.kvm_vcpu_events)
KVM_SET_GUEST_DEBUG: Final = _iow(0x9B, S.kvm_guest_debug)
KVM_GET_DEBUGREGS: Final = _ior(0xA1, S.kvm_debugregs)
KVM_SET_DEBUGREGS: Final = _iow(0xA2, S.kvm_debugregs)
KVM_SET_TSC_KHZ: Final = _io(0xA2)
KVM_GET_TSC_KHZ: Final = _io(0xA3)
KVM_GET_XSAVE: Final = _ior(0xA4, S.kvm_xsave)
KVM_SET_XSAVE: Final = _iow(0xA5, S.kvm_xsave)
KVM_GET_XCRS: Final = _ior(0xA6, S.kvm_xcrs)
KVM_SET_XCRS: Final = _iow(0xA7, S.kvm_xcrs)
KVM_KVMCLOCK_CTRL: Final = _io(0xAD)

KVM_API_VERSION: Final = 12
KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1
KVM_IRQFD_FLAG_DEASSIGN: Final = 1 << 0
KVM_IOEVENTFD_FLAG_DATAMATCH: Final = 1 << 0
KVM_IOEVENTFD_FLAG_PIO: Final = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN: Final = 1 << 2
KVM_PIT_SPEAKER_DUMMY: Final = 1


class Cap(enum.IntEnum):
    """KVM_CAP_* numbers virtkit checks (linux/kvm.h)."""

    IRQCHIP = 0
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    MP_STATE = 14
    SYNC_MMU = 16
    IRQ_ROUTING = 25
    IRQFD = 32
    PIT2 = 33
    PIT_STATE2 = 35
    IOEVENTFD = 36
    ADJUST_CLOCK = 39
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    XSAVE = 55
    XCRS = 56
    TSC_CONTROL = 60
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    KVMCLOCK_CTRL = 76
    READONLY_MEM = 81
    MAX_VCPU_ID = 128
    IMMEDIATE_EXIT = 136
    X86_DISABLE_EXITS = 143
    NESTED_STATE = 157


class ExitReason(enum.IntEnum):
    """``kvm_run.exit_reason`` values (KVM_EXIT_*)."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    S390_SIEIC = 13
    S390_RESET = 14
    DCR = 15
    NMI = 16
    INTERNAL_ERROR = 17
    OSI = 18
    PAPR_HCALL = 19
    S390_UCONTROL = 20
    WATCHDOG = 21
    S390_TSCH = 22
    EPR = 23
    SYSTEM_EVENT = 24
    S390_STSI = 25
    IOAPIC_EOI = 26
    HYPERV = 27
    ARM_NISV = 28
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    RISCV_SBI = 35
    RISCV_CSR = 36
    NOTIFY = 37
    LOONGARCH_IOCSR = 38
    MEMORY_FAULT = 39


class InternalError(enum.IntEnum):
    """``kvm_run.internal.suberror`` (KVM_INTERNAL_ERROR_*)."""

    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


class SystemEvent(enum.IntEnum):
    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6


class MpState(enum.IntEnum):
    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4


KVM_EXIT_IO_IN: Final = 0
KVM_EXIT_IO_OUT: Final = 1
