"""Pin every KVM structure size and ioctl number against values compiled from the kernel's
uapi headers (linux/kvm.h, asm/kvm.h; gcc 12, Linux 6.1 headers on Debian 12)."""

from __future__ import annotations

import ctypes as C

import pytest

from virtkit.kvm import constants as K
from virtkit.kvm import structs as S

SIZES = {
    S.kvm_regs: 144,
    S.kvm_sregs: 312,
    S.kvm_segment: 24,
    S.kvm_dtable: 16,
    S.kvm_fpu: 416,
    S.kvm_msr_entry: 16,
    S.kvm_msrs_of(0): 8,
    S.kvm_msr_list_of(0): 4,
    S.kvm_cpuid_entry2: 40,
    S.kvm_cpuid2_of(0): 8,
    S.kvm_userspace_memory_region: 32,
    S.kvm_lapic_state: 1024,
    S.kvm_irqchip: 520,
    S.kvm_pit_config: 64,
    S.kvm_pit_state2: 112,
    S.kvm_vcpu_events: 64,
    S.kvm_mp_state: 4,
    S.kvm_debugregs: 128,
    S.kvm_xsave: 4096,
    S.kvm_xcrs: 392,
    S.kvm_clock_data: 48,
    S.kvm_irq_level: 8,
    S.kvm_irqfd: 32,
    S.kvm_ioeventfd: 64,
    S.kvm_dirty_log: 16,
    S.kvm_enable_cap: 104,
    S.kvm_translation: 24,
    S.kvm_guest_debug: 72,
}


@pytest.mark.parametrize("struct,size", SIZES.items(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_struct_size(struct: type[C.Structure], size: int) -> None:
    assert C.sizeof(struct) == size


def test_kvm_run_layout() -> None:
    assert S.KVM_RUN_SIZE == 2352
    assert S.KVM_RUN_EXIT_REASON_OFFSET == 8
    assert S.KVM_RUN_EXIT_UNION_OFFSET == 32
    assert S.KVM_RUN_IMMEDIATE_EXIT_OFFSET == 1


IOCTLS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_GET_MSR_INDEX_LIST": 0xC004AE02,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0xAE47,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_CREATE_IRQCHIP": 0xAE60,
    "KVM_IRQ_LINE": 0x4008AE61,
    "KVM_IRQ_LINE_STATUS": 0xC008AE67,
    "KVM_GET_IRQCHIP": 0xC208AE62,
    "KVM_SET_IRQCHIP": 0x8208AE63,
    "KVM_IRQFD": 0x4020AE76,
    "KVM_CREATE_PIT2": 0x4040AE77,
    "KVM_IOEVENTFD": 0x4040AE79,
    "KVM_SET_CLOCK": 0x4030AE7B,
    "KVM_GET_CLOCK": 0x8030AE7C,
    "KVM_GET_PIT2": 0x8070AE9F,
    "KVM_SET_PIT2": 0x4070AEA0,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_TRANSLATE": 0xC018AE85,
    "KVM_SET_GUEST_DEBUG": 0x4048AE9B,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_FPU": 0x81A0AE8C,
    "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_GET_LAPIC": 0x8400AE8E,
    "KVM_SET_LAPIC": 0x4400AE8F,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_CPUID2": 0xC008AE91,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    "KVM_GET_DEBUGREGS": 0x8080AEA1,
    "KVM_SET_DEBUGREGS": 0x4080AEA2,
    "KVM_GET_XSAVE": 0x9000AEA4,
    "KVM_SET_XSAVE": 0x5000AEA5,
    "KVM_GET_XCRS": 0x8188AEA6,
    "KVM_SET_XCRS": 0x4188AEA7,
    "KVM_GET_TSC_KHZ": 0xAEA3,
    "KVM_SET_TSC_KHZ": 0xAEA2,
    "KVM_KVMCLOCK_CTRL": 0xAEAD,
    "KVM_ENABLE_CAP": 0x4068AEA3,
}


@pytest.mark.parametrize("name,number", IOCTLS.items())
def test_ioctl_number(name: str, number: int) -> None:
    assert getattr(K, name) == number, f"{name} = {getattr(K, name):#x}, kernel says {number:#x}"


def test_capability_numbers() -> None:
    assert (K.Cap.IRQCHIP, K.Cap.USER_MEMORY, K.Cap.IMMEDIATE_EXIT, K.Cap.IOEVENTFD, K.Cap.IRQFD) == (
        0,
        3,
        0x88,
        0x24,
        0x20,
    )
    assert (K.Cap.MAX_VCPUS, K.Cap.NR_VCPUS, K.Cap.NESTED_STATE, K.Cap.X86_DISABLE_EXITS) == (0x42, 9, 0x9D, 0x8F)


def test_exit_reasons() -> None:
    assert (
        K.ExitReason.IO,
        K.ExitReason.MMIO,
        K.ExitReason.SHUTDOWN,
        K.ExitReason.INTERNAL_ERROR,
        K.ExitReason.SYSTEM_EVENT,
    ) == (2, 6, 8, 17, 24)
