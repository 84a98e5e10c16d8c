"""CPUID compatibility: a guest never resumes on a CPU that lacks what it saw."""

from __future__ import annotations

from virtkit.snapshot.cpucompat import check_compatible, missing_features, vendor

AMD = (0, 0, 0, 0xD, 0x68747541, 0x444D4163, 0x69746E65)  # "AuthenticAMD"
INTEL = (0, 0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69)  # "GenuineIntel"


def leaf(function: int, index: int = 0, eax: int = 0, ebx: int = 0, ecx: int = 0, edx: int = 0):
    return (function, index, 0, eax, ebx, ecx, edx)


def test_vendor_string() -> None:
    assert vendor([AMD]) == "AuthenticAMD"
    assert vendor([INTEL]) == "GenuineIntel"
    assert vendor([]) == ""


def test_same_cpu_is_compatible() -> None:
    cpu = [AMD, leaf(1, ecx=0x7FF8_3203, edx=0x178B_FBFF), leaf(7, ebx=0x219C_91A9)]
    assert check_compatible(cpu, cpu) is None


def test_missing_features_are_named() -> None:
    guest = [AMD, leaf(1, ecx=(1 << 28) | (1 << 0)), leaf(7, ebx=1 << 5)]
    host = [AMD, leaf(1, ecx=1 << 0), leaf(7)]
    assert missing_features(guest, host) == ["avx (CPUID.0x1.0:ECX[28])", "avx2 (CPUID.0x7.0:EBX[5])"]
    reason = check_compatible(guest, host)
    assert reason is not None and "avx" in reason and "avx2" in reason


def test_unnamed_bits_are_located() -> None:
    assert missing_features([leaf(7, edx=1 << 30)], [leaf(7)]) == ["CPUID.0x7.0:EDX[30]"]


def test_policy_and_mirror_bits_do_not_count() -> None:
    # hypervisor (1:ECX[31]), OSXSAVE (1:ECX[27]), HTT (1:EDX[28]) and OSPKE (7:ECX[4]) are set by
    # virtkit or mirror the guest's CR4: they are not features the host must have
    guest = [leaf(1, ecx=(1 << 31) | (1 << 27), edx=1 << 28), leaf(7, ecx=1 << 4)]
    assert missing_features(guest, [leaf(1), leaf(7)]) == []


def test_a_leaf_the_host_lacks_entirely_counts_as_zero() -> None:
    assert missing_features([leaf(0xD, 1, eax=1)], []) == ["xsaveopt (CPUID.0xd.1:EAX[0])"]


def test_features_the_host_has_beyond_the_guest_are_fine() -> None:
    assert check_compatible([leaf(1, ecx=1)], [leaf(1, ecx=0xFFFF_FFFF)]) is None


def test_other_vendor_is_refused() -> None:
    reason = check_compatible([AMD], [INTEL])
    assert reason is not None and "AuthenticAMD" in reason and "GenuineIntel" in reason


def test_long_lists_are_summarised() -> None:
    reason = check_compatible([leaf(7, ebx=0xFFFF_FFFF)], [leaf(7)])
    assert reason is not None and "and 24 more" in reason
