"""Can this host run a guest that saw that CPUID?

A guest reads CPUID once (at boot) and then uses what it was told: AVX2, XSAVE components, RDRAND...
Resuming it on a processor that lacks one of those features ends in #UD at some later, random
moment. So a restore or an incoming migration compares every feature bit the guest saw with what
this host's KVM can virtualize (``KVM_GET_SUPPORTED_CPUID``) and refuses, naming the features, if
any is missing. The restored vCPUs are then given the *saved* CPUID, so the guest keeps seeing
exactly what it saw (never features it did not know about).

Entries are plain tuples ``(function, index, flags, eax, ebx, ecx, edx)`` here, so this module
is hermetic and testable without /dev/kvm.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

CpuidEntry = tuple[int, int, int, int, int, int, int]
_REG: Final = {"eax": 3, "ebx": 4, "ecx": 5, "edx": 6}

#: (function, index, register, mask of bits that are not features: they are filled in per vCPU
#: by virtkit's policy or mirror a control register the guest sets; Intel SDM vol. 2A, CPUID)
FEATURE_REGISTERS: Final[tuple[tuple[int, int, str, int], ...]] = (
    (0x1, 0, "ecx", ~((1 << 27) | (1 << 31))),  # 27 OSXSAVE mirrors CR4; 31 hypervisor is policy
    (0x1, 0, "edx", ~(1 << 28)),  # 28 HTT is set by virtkit for SMP guests
    (0x7, 0, "ebx", ~0),
    (0x7, 0, "ecx", ~(1 << 4)),  # 4 OSPKE mirrors CR4.PKE
    (0x7, 0, "edx", ~0),
    (0x7, 1, "eax", ~0),
    (0xD, 0, "eax", ~0),  # XCR0 components the guest may enable
    (0xD, 0, "edx", ~0),
    (0xD, 1, "eax", ~0),  # XSAVEOPT, XSAVEC, XGETBV1, XSAVES
    (0x8000_0001, 0, "ecx", ~0),
    (0x8000_0001, 0, "edx", ~0),
    (0x8000_0007, 0, "edx", ~0),  # invariant TSC
    (0x8000_0008, 0, "ebx", ~0),
)

#: names of the features a guest most often depends on, for readable refusals
FEATURE_NAMES: Final[dict[tuple[int, int, str, int], str]] = {
    **{
        (0x1, 0, "ecx", b): n
        for b, n in {
            0: "sse3",
            1: "pclmulqdq",
            9: "ssse3",
            12: "fma",
            13: "cx16",
            19: "sse4.1",
            20: "sse4.2",
            21: "x2apic",
            22: "movbe",
            23: "popcnt",
            24: "tsc-deadline",
            25: "aes",
            26: "xsave",
            28: "avx",
            29: "f16c",
            30: "rdrand",
        }.items()
    },
    **{
        (0x1, 0, "edx", b): n
        for b, n in {
            0: "fpu",
            4: "tsc",
            5: "msr",
            6: "pae",
            8: "cx8",
            9: "apic",
            11: "sep",
            13: "pge",
            15: "cmov",
            16: "pat",
            19: "clflush",
            23: "mmx",
            24: "fxsr",
            25: "sse",
            26: "sse2",
        }.items()
    },
    **{
        (0x7, 0, "ebx", b): n
        for b, n in {
            0: "fsgsbase",
            3: "bmi1",
            5: "avx2",
            7: "smep",
            8: "bmi2",
            9: "erms",
            10: "invpcid",
            16: "avx512f",
            18: "rdseed",
            19: "adx",
            20: "smap",
            23: "clflushopt",
            24: "clwb",
            29: "sha",
        }.items()
    },
    **{(0x7, 0, "ecx", b): n for b, n in {2: "umip", 3: "pku", 9: "vaes", 10: "vpclmulqdq", 22: "rdpid"}.items()},
    **{(0x8000_0001, 0, "ecx", b): n for b, n in {0: "lahf_lm", 5: "abm", 8: "prefetchw"}.items()},
    **{
        (0x8000_0001, 0, "edx", b): n
        for b, n in {11: "syscall", 20: "nx", 26: "pdpe1gb", 27: "rdtscp", 29: "lm"}.items()
    },
    (0xD, 1, "eax", 0): "xsaveopt",
    (0xD, 1, "eax", 1): "xsavec",
    (0xD, 1, "eax", 3): "xsaves",
    (0x8000_0007, 0, "edx", 8): "invariant-tsc",
}


def _lookup(entries: Iterable[CpuidEntry]) -> dict[tuple[int, int], CpuidEntry]:
    return {(e[0], e[1]): e for e in entries}


def vendor(entries: Iterable[CpuidEntry]) -> str:
    """The 12-character vendor string of leaf 0 (EBX, EDX, ECX order), "" if absent."""
    leaf0 = _lookup(entries).get((0, 0))
    if leaf0 is None:
        return ""
    return b"".join(r.to_bytes(4, "little") for r in (leaf0[4], leaf0[6], leaf0[5])).decode("latin-1")


def feature_name(function: int, index: int, reg: str, bit: int) -> str:
    name = FEATURE_NAMES.get((function, index, reg, bit))
    where = f"CPUID.{function:#x}.{index}:{reg.upper()}[{bit}]"
    return f"{name} ({where})" if name else where


def missing_features(guest: Sequence[CpuidEntry], host: Sequence[CpuidEntry]) -> list[str]:
    """Features the guest saw that ``host`` (KVM_GET_SUPPORTED_CPUID) cannot provide, by name."""
    g, h = _lookup(guest), _lookup(host)
    missing: list[str] = []
    for function, index, reg, mask in FEATURE_REGISTERS:
        ge = g.get((function, index))
        if ge is None:
            continue
        he = h.get((function, index))
        have = he[_REG[reg]] if he is not None else 0
        lacking = ge[_REG[reg]] & ~have & mask & 0xFFFF_FFFF
        bit = 0
        while lacking:
            if lacking & 1:
                missing.append(feature_name(function, index, reg, bit))
            lacking >>= 1
            bit += 1
    return missing


def check_compatible(guest: Sequence[CpuidEntry], host: Sequence[CpuidEntry]) -> str | None:
    """None if the guest can resume on ``host``; else a one-line reason."""
    gv, hv = vendor(guest), vendor(host)
    if gv and hv and gv != hv:
        return f"the guest ran on a {gv} CPU and this host is {hv}"
    missing = missing_features(guest, host)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        return f"this host's CPU (as KVM exposes it) lacks features the guest saw: {shown}"
    return None
