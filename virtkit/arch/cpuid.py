"""CPUID policy: what each vCPU is told about the processor it runs on.

The starting point is ``KVM_GET_SUPPORTED_CPUID`` (what the host and KVM can virtualize). Then:

* **full virtualization**: the guest must not be able to tell it is virtualized. The hypervisor
  present bit (CPUID.1:ECX[31], reserved for hypervisor use; Intel SDM vol. 2A table 3-10) is
  cleared and the hypervisor leaves 0x40000000-0x400000FF are removed, so the guest sees a bare
  processor.
* **paravirtualized**: the guest is told, through the same bit and a virtkit signature leaf (see
  ``docs/HYPERCALLS.md``), and it also gets KVM's own leaves (``KVMKVMKVM`` and its feature bits:
  kvmclock, PV EOI, steal time, PV unhalt...), moved up to 0x40000100: a Linux guest looks for
  KVM's signature at every 0x100 step from 0x40000000 (``hypervisor_cpuid_base()``), so it finds
  them there and uses its paravirtual clock and friends, all served by KVM in the kernel, while
  virtkit's own guests still find virtkit at 0x40000000.
* **CPL0 emulated** (PVM hosts): features whose instructions a guest kernel would run at CPL0 but
  that neither KVM's emulator nor the VMM's completion (``virtkit/cpl0.py``) can perform are
  hidden, so the kernel takes its other path: CMPXCHG16B, XSAVE (and what needs it: AVX...),
  FSGSBASE, INVPCID, TSX, RDPRU. On PVM the guest's CPL3 code still sees the host's own CPUID
  (docs/PLATFORM.md); this only steers the kernel. KVM's paravirtual features that work through
  the ``vmcall`` hypercall (PV unhalt, PV IPIs, PV sched yield) are hidden too: at CPL0 on PVM a
  ``vmcall`` never completes (measured: the vCPU stays on the instruction, and no exit reaches the
  VMM), while the MSR-based ones (kvmclock, PV EOI, steal time, async PF) work.

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
#: where KVM's leaves (0x40000000-0x400000FF as KVM_GET_SUPPORTED_CPUID reports them) are shown
#: to a paravirtualized guest, next to virtkit's
KVM_LEAF_OFFSET: Final = 0x100

#: KVM's paravirtual features a guest uses through ``vmcall`` (Documentation/virt/kvm/x86/cpuid.rst:
#: KVM_FEATURE_PV_UNHALT 7, KVM_FEATURE_PV_SEND_IPI 11, KVM_FEATURE_PV_SCHED_YIELD 13)
KVM_HYPERCALL_FEATURES: Final = (1 << 7) | (1 << 11) | (1 << 13)

#: (leaf, subleaf, register, bit) of what is hidden when CPL0 is emulated, with the instruction
#: that could not run (Intel SDM vol. 2A, CPUID; AMD APM vol. 3 for RDPRU)
CPL0_UNCOMPLETABLE: Final = (
    (0x1, 0, "ecx", 13, "cmpxchg16b"),  # CX16: a locked 16-byte RMW, not atomic from the VMM
    (0x1, 0, "ecx", 26, "xsave/xrstor"),  # XSAVE
    (0x1, 0, "ecx", 27, "xsave/xrstor"),  # OSXSAVE
    (0x1, 0, "ecx", 12, "xsave/xrstor"),  # FMA: AVX state needs XSAVE
    (0x1, 0, "ecx", 28, "xsave/xrstor"),  # AVX
    (0x1, 0, "ecx", 29, "xsave/xrstor"),  # F16C
    (0x7, 0, "ebx", 0, "rdfsbase/wrfsbase"),  # FSGSBASE
    (0x7, 0, "ebx", 4, "xbegin/xend"),  # HLE
    (0x7, 0, "ebx", 5, "xsave/xrstor"),  # AVX2
    (0x7, 0, "ebx", 10, "invpcid"),  # INVPCID
    (0x7, 0, "ebx", 11, "xbegin/xend"),  # RTM
    (0x7, 0, "ebx", 16, "xsave/xrstor"),  # AVX512F
    (0x8000_0008, 0, "ebx", 4, "rdpru"),  # RDPRU
)


def _copy(e: S.kvm_cpuid_entry2) -> S.kvm_cpuid_entry2:
    return S.kvm_cpuid_entry2.from_buffer_copy(e)


def build_cpuid(
    supported: list[S.kvm_cpuid_entry2],
    *,
    vcpu_id: int,
    vcpu_count: int,
    paravirt: bool,
    cpl0_emulated: bool = False,
    paravirt_features: int = 0,
    hypercall_abi: int = 0,
    hypercall_port: int = 0,
) -> list[S.kvm_cpuid_entry2]:
    """The CPUID table of vCPU ``vcpu_id`` (see the module docstring for the policy)."""
    entries: list[S.kvm_cpuid_entry2] = []
    kvm_leaves: list[S.kvm_cpuid_entry2] = []
    for src in supported:
        if HYPERVISOR_LEAF_BASE <= src.function <= HYPERVISOR_LEAF_END:
            # KVM's own "KVMKVMKVM" leaves: hidden in full mode; moved up beside virtkit's in para
            kvm = _copy(src)
            kvm.function += KVM_LEAF_OFFSET
            if src.function == HYPERVISOR_LEAF_BASE:
                kvm.eax = max(kvm.eax, HYPERVISOR_LEAF_BASE) + KVM_LEAF_OFFSET  # its highest leaf, moved too
            elif src.function == HYPERVISOR_LEAF_BASE + 1 and cpl0_emulated:
                kvm.eax &= ~KVM_HYPERCALL_FEATURES & 0xFFFF_FFFF
            kvm_leaves.append(kvm)
            continue
        e = _copy(src)
        if cpl0_emulated:
            for leaf, sub, reg, bit, _insn in CPL0_UNCOMPLETABLE:
                if e.function == leaf and e.index == sub:
                    setattr(e, reg, getattr(e, reg) & ~(1 << bit) & 0xFFFF_FFFF)
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
        entries += [base, features, *kvm_leaves]
    return entries
