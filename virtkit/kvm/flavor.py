"""Which KVM this host has: the module that provides /dev/kvm decides how guest CPL0 code runs.

``vmx`` (Intel VT-x) and ``svm`` (AMD-V) run guest kernel code in hardware; ``pvm`` (the
paravirtual KVM of docs/PLATFORM.md) runs guest CPL3 code natively and emulates CPL0 code
instruction by instruction. Read from /sys/module, which a VMM sees until it is confined (it opens
/dev/kvm and builds its vCPUs before that)."""

from __future__ import annotations

import os

_MODULES = (("kvm_pvm", "pvm"), ("kvm_intel", "vmx"), ("kvm_amd", "svm"))
_cached: str | None = None


def kvm_flavor() -> str:
    """``pvm``, ``vmx``, ``svm`` or ``unknown``; probed once per process."""
    global _cached
    if _cached is None:
        _cached = next((flavor for module, flavor in _MODULES if os.path.isdir(f"/sys/module/{module}")), "unknown")
    return _cached


def cpl0_emulated() -> bool:
    """True where guest kernel code is instruction-emulated (PVM)."""
    return kvm_flavor() == "pvm"
