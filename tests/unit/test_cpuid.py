"""CPUID policy: full virtualization hides the hypervisor, paravirtualization announces virtkit."""

from __future__ import annotations

from virtkit.arch import cpuid as P
from virtkit.devices.hypercall import ABI_VERSION
from virtkit.kvm import structs as S
from virtkit.vm import HYPERCALL_ABI_VERSION


def leaf(function: int, **regs: int) -> S.kvm_cpuid_entry2:
    e = S.kvm_cpuid_entry2()
    e.function = function
    for k, v in regs.items():
        setattr(e, k, v)
    return e


HOST = [
    leaf(0, eax=0xD),
    leaf(1, ebx=0x00_02_08_00, ecx=P.ECX_HYPERVISOR | 0x1234, edx=0x100),
    leaf(0xB, edx=7),
    leaf(0x4000_0000, eax=0x4000_0001, ebx=0x4B4D564B),
    leaf(0x4000_0001, eax=0xFF),
]


def by_function(entries: list[S.kvm_cpuid_entry2]) -> dict[int, S.kvm_cpuid_entry2]:
    return {e.function: e for e in entries}


def test_full_virtualization_hides_the_hypervisor() -> None:
    out = by_function(P.build_cpuid(HOST, vcpu_id=0, vcpu_count=1, paravirt=False))
    assert not out[1].ecx & P.ECX_HYPERVISOR
    assert out[1].ecx & 0x1234 == 0x1234  # other feature bits untouched
    assert all(not (0x4000_0000 <= f <= 0x4000_00FF) for f in out)


def test_paravirt_announces_virtkit() -> None:
    out = by_function(
        P.build_cpuid(
            HOST, vcpu_id=0, vcpu_count=1, paravirt=True, paravirt_features=3, hypercall_abi=1, hypercall_port=0xC40
        )
    )
    assert out[1].ecx & P.ECX_HYPERVISOR
    sig = b"".join(getattr(out[0x4000_0000], r).to_bytes(4, "little") for r in ("ebx", "ecx", "edx"))
    assert sig == P.VIRTKIT_SIGNATURE
    assert out[0x4000_0000].eax == P.VIRTKIT_MAX_LEAF
    assert (out[0x4000_0001].eax, out[0x4000_0001].ebx, out[0x4000_0001].ecx) == (3, 1, 0xC40)


def test_each_vcpu_gets_its_own_apic_id() -> None:
    for vid in (0, 1, 5):
        out = by_function(P.build_cpuid(HOST, vcpu_id=vid, vcpu_count=6, paravirt=False))
        assert out[1].ebx >> 24 == vid and (out[1].ebx >> 16) & 0xFF == 6
        assert out[0xB].edx == vid
        assert out[1].edx & P.EDX_HTT


def test_machine_and_device_agree_on_the_abi_version() -> None:
    assert HYPERCALL_ABI_VERSION == ABI_VERSION


def test_paravirt_also_shows_kvms_leaves_one_step_up_for_linux() -> None:
    out = by_function(P.build_cpuid(HOST, vcpu_id=0, vcpu_count=1, paravirt=True))
    base = out[0x4000_0000 + P.KVM_LEAF_OFFSET]
    assert (base.eax, base.ebx) == (0x4000_0101, 0x4B4D564B)  # highest leaf moved with it; "KVMK"
    assert out[0x4000_0101].eax == 0xFF  # KVM's feature bits as KVM reports them
    assert out[0x4000_0000].eax == P.VIRTKIT_MAX_LEAF  # virtkit's own leaves stay first


def test_full_virtualization_shows_no_kvm_leaves_either() -> None:
    out = by_function(P.build_cpuid(HOST, vcpu_id=0, vcpu_count=1, paravirt=False))
    assert all(not (0x4000_0000 <= f <= 0x4000_01FF) for f in out)


def test_an_emulated_cpl0_hides_what_neither_kvm_nor_the_vmm_can_complete() -> None:
    host = [
        leaf(1, ecx=(1 << 13) | (1 << 26) | (1 << 28) | (1 << 22) | (1 << 23)),  # CX16 XSAVE AVX MOVBE POPCNT
        leaf(7, ebx=(1 << 0) | (1 << 10) | (1 << 11) | (1 << 23)),  # FSGSBASE INVPCID RTM CLFLUSHOPT
    ]
    plain = by_function(P.build_cpuid(host, vcpu_id=0, vcpu_count=1, paravirt=False))
    assert plain[1].ecx == host[0].ecx and plain[7].ebx == host[1].ebx  # a VT-x host keeps them all
    hidden = by_function(P.build_cpuid(host, vcpu_id=0, vcpu_count=1, paravirt=False, cpl0_emulated=True))
    assert hidden[1].ecx == (1 << 22) | (1 << 23)  # MOVBE and POPCNT are completed by the VMM: kept
    assert hidden[7].ebx == 1 << 23  # CLFLUSHOPT is completed: kept


def test_an_emulated_cpl0_hides_kvms_vmcall_based_features() -> None:
    host = [leaf(0x4000_0000, eax=0x4000_0001), leaf(0x4000_0001, eax=0x1007EFB)]  # this PVM host's
    out = by_function(P.build_cpuid(host, vcpu_id=0, vcpu_count=1, paravirt=True, cpl0_emulated=True))
    features = out[0x4000_0101].eax
    assert features & 1 and features & (1 << 3) and features & (1 << 6)  # kvmclock(2), PV EOI: MSRs
    assert not features & ((1 << 7) | (1 << 11) | (1 << 13))  # PV unhalt, IPIs, sched yield: vmcall
    vtx = by_function(P.build_cpuid(host, vcpu_id=0, vcpu_count=1, paravirt=True))
    assert vtx[0x4000_0101].eax == 0x1007EFB
