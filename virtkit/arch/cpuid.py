"""CPUID policy: what each vCPU is told about the processor it runs on.

The starting point is ``KVM_GET_SUPPORTED_CPUID`` (what the host and KVM can virtualize). Then:

* **full virtualization**: the guest must not be able to tell it is virtualized. The hypervisor
  present bit (CPUID.1:ECX[31], reserved for hypervisor use; Intel SDM vol. 2A table 3-10) is
  cleared and the hypervisor leaves 0x40000000-0x400000FF are removed, so the guest sees a bare
  processor.
* **paravirtualized**: the guest is told, through the same bit and a virtkit signature leaf (see
  ``docs/HYPERCALLS.md``).

Per vCPU, the APIC ID fields are set so every vCPU has a distinct, correct identity.
"""

from __future__ import annotations

from virtkit.kvm import structs as S

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

LEAF_FEATURES: Final = 0x1
LEAF_EXT_TOPOLOGY: Final = 0xB
LEAF_V2_EXT_TOPOLOGY: Final = 0x1F
HYPERVISOR_LEAF_BASE: Final = 0x4000_0000
HYPERVISOR_LEAF_END: Final = 0x4000_00FF
ECX_HYPERVISOR: Final = 1 << 31
EDX_HTT: Final = 1 << 28

#: signature in leaf 0x40000000 EBX:ECX:EDX for paravirtualized guests (12 bytes)
VIRTKIT_SIGNATURE: Final = b"virtkitvirtk"
#: highest virtkit leaf; 0x40000001 lists the hypercalls and devices on offer
VIRTKIT_MAX_LEAF: Final = 0x4000_0001
#: 0x40000001 EAX feature bits (docs/HYPERCALLS.md)
PV_FEATURE_HYPERCALL: Final = 1 << 0
PV_FEATURE_VIRTIO_MMIO: Final = 1 << 1


def _copy(e: S.kvm_cpuid_entry2) -> S.kvm_cpuid_entry2:
    return S.kvm_cpuid_entry2.from_buffer_copy(e)


def build_cpuid(
    supported: list[S.kvm_cpuid_entry2],
    *,
    vcpu_id: int,
    vcpu_count: int,
    paravirt: bool,
    paravirt_features: int = 0,
    hypercall_abi: int = 0,
    hypercall_port: int = 0,
) -> list[S.kvm_cpuid_entry2]:
    entries: list[S.kvm_cpuid_entry2] = []
    for src in supported:
        if HYPERVISOR_LEAF_BASE <= src.function <= HYPERVISOR_LEAF_END:
            continue  # KVM's own "KVMKVMKVM" leaves: never shown; paravirt adds virtkit's below
        e = _copy(src)
        if e.function == LEAF_FEATURES:
            # EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package
            e.ebx = (e.ebx & 0x0000FFFF) | (vcpu_id << 24) | ((vcpu_count & 0xFF) << 16)
            if vcpu_count > 1:
                e.edx |= EDX_HTT
            if paravirt:
                e.ecx |= ECX_HYPERVISOR
            else:
                e.ecx &= ~ECX_HYPERVISOR & 0xFFFF_FFFF
        elif e.function in (LEAF_EXT_TOPOLOGY, LEAF_V2_EXT_TOPOLOGY):
            e.edx = vcpu_id  # x2APIC ID of this logical processor
        entries.append(e)
    if paravirt:
        sig = VIRTKIT_SIGNATURE
        base = S.kvm_cpuid_entry2()
        base.function = HYPERVISOR_LEAF_BASE
        base.eax = VIRTKIT_MAX_LEAF
        base.ebx = int.from_bytes(sig[0:4], "little")
        base.ecx = int.from_bytes(sig[4:8], "little")
        base.edx = int.from_bytes(sig[8:12], "little")
        features = S.kvm_cpuid_entry2()
        features.function = VIRTKIT_MAX_LEAF
        features.eax = paravirt_features
        features.ebx = hypercall_abi
        features.ecx = hypercall_port
        entries += [base, features]
    return entries
