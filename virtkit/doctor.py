"""``virtkit doctor``: what this host offers a VMM, and what that means for guests.

The KVM *flavor* decides how fast guest kernel code runs:

* ``vmx`` / ``svm`` (kvm_intel / kvm_amd): hardware virtualization; guest code runs natively at
  every privilege level.
* ``pvm`` (kvm_pvm): Pagetable-based Virtual Machine, KVM without hardware virtualization. Guest
  user mode (CPL3) runs natively; guest kernel mode (CPL0) is executed by KVM's instruction
  emulator, roughly a thousand times slower, and the emulator rejects some instructions.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any

from virtkit.kvm.constants import Cap
from virtkit.kvm.flavor import kvm_flavor

_CAPS_USED = (
    Cap.USER_MEMORY,
    Cap.IRQCHIP,
    Cap.PIT2,
    Cap.SET_TSS_ADDR,
    Cap.IMMEDIATE_EXIT,
    Cap.IOEVENTFD,
    Cap.IRQFD,
    Cap.MP_STATE,
    Cap.VCPU_EVENTS,
    Cap.DEBUGREGS,
    Cap.XSAVE,
    Cap.XCRS,
    Cap.ADJUST_CLOCK,
    Cap.GET_TSC_KHZ,
    Cap.READONLY_MEM,
    Cap.X86_DISABLE_EXITS,
    Cap.NESTED_STATE,
)

FLAVOR_MEANING = {
    "vmx": "hardware virtualization (Intel VT-x): guest kernel and user code run natively",
    "svm": "hardware virtualization (AMD-V): guest kernel and user code run natively",
    "pvm": "PVM, no hardware virtualization: guest CPL3 code runs natively, guest CPL0 code is "
    "emulated instruction by instruction (~1000x slower); a Linux kernel boots only partway",
    "unknown": "KVM vendor module not recognised",
}


#: what a Linux guest (``virtkit run bzImage --initrd ...``) does on each flavor (docs/LINUX.md)
LINUX_GUESTS = {
    "vmx": "boots as under Firecracker (bzImage, vmlinux or PVH, ACPI, virtio-mmio): kernel and user "
    "space at native speed (not tested on such a host by virtkit's own suite: docs/PLATFORM.md)",
    "svm": "boots as under Firecracker (bzImage, vmlinux or PVH, ACPI, virtio-mmio): kernel and user "
    "space at native speed (not tested on such a host by virtkit's own suite: docs/PLATFORM.md)",
    "pvm": "kernel code runs emulated (a bzImage's decompressor takes minutes, a vmlinux prints its "
    "banner in seconds, the small test kernel reaches Run /init in about 5 minutes); virtkit "
    "completes the CPL0 instructions the emulator rejects where it can (int3, wait, lsl, stac/clac...) "
    "and hides the rest in CPUID, but /init's first system call cannot reach the kernel: SYSCALL "
    "lands at its target still at CPL3 and the VMM cannot intervene (docs/PLATFORM.md); real "
    "programs run here in the sandbox mode (virtkit sandbox), real kernels' user space does not",
    "unknown": "unknown: try a kernel with --stats",
}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def probe() -> dict[str, Any]:
    """Everything the doctor knows, as a dict (benchmarks record it next to their figures)."""
    from virtkit.errors import KvmError
    from virtkit.kvm.ioctl import Kvm

    flags = _cpu_flags()
    info: dict[str, Any] = {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "cpu_virt_flag": "vmx" if "vmx" in flags else "svm" if "svm" in flags else None,
        "running_under_hypervisor": "hypervisor" in flags,
        "kvm_flavor": kvm_flavor(),
        "kvm_usable": False,
    }
    info["meaning"] = FLAVOR_MEANING[info["kvm_flavor"]]
    info["linux_guests"] = LINUX_GUESTS[info["kvm_flavor"]]
    try:
        with Kvm() as kvm:
            info["kvm_usable"] = True
            info["api_version"] = kvm.api_version()
            info["capabilities"] = {c.name.lower(): kvm.check_extension(c) for c in _CAPS_USED}
            info["max_vcpus"] = kvm.check_extension(Cap.MAX_VCPUS)
            info["recommended_vcpus"] = kvm.check_extension(Cap.NR_VCPUS)
            info["msr_count"] = len(kvm.msr_index_list())
            vm = kvm.create_vm()
            try:
                vcpu = vm.create_vcpu(0)
                try:
                    info["tsc_khz"] = vcpu.get_tsc_khz()
                finally:
                    vcpu.close()
            finally:
                vm.close()
    except KvmError as e:
        info["kvm_error"] = str(e)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_report(as_json: bool = False) -> int:
    info = probe()
    if as_json:
        print(json.dumps(info, indent=2))
        return 0 if info["kvm_usable"] else 1
    ok = "ok" if info["kvm_usable"] else "NOT USABLE"
    print(f"virtkit doctor: {info['host']} (Linux {info['kernel']}, {info['cpu_count']} CPUs, {info['cpu_model']})")
    print(
        f"  /dev/kvm        {ok}"
        + (f": {info['kvm_error']}" if "kvm_error" in info else f" (API {info['api_version']})")
    )
    print(f"  KVM flavor      {info['kvm_flavor']}: {info['meaning']}")
    print(
        f"  CPU virt flag   {info['cpu_virt_flag'] or 'none (no vmx/svm in /proc/cpuinfo)'}"
        + ("; this host is itself a guest of another hypervisor" if info["running_under_hypervisor"] else "")
    )
    if info["kvm_usable"]:
        caps = info["capabilities"]
        have = ", ".join(k for k, v in caps.items() if v)
        missing = ", ".join(k for k, v in caps.items() if not v) or "none"
        print(f"  vCPUs           up to {info['max_vcpus']} per VM (KVM recommends {info['recommended_vcpus']})")
        print(f"  TSC             {info.get('tsc_khz', 0) / 1e6:.3f} GHz")
        print(f"  capabilities    {have}")
        print(f"  missing         {missing}")
        print("  guests          " + _advice(info["kvm_flavor"]))
        print("  Linux guests    " + info["linux_guests"])
    return 0 if info["kvm_usable"] else 1


def _advice(flavor: str) -> str:
    if flavor == "pvm":
        return (
            "do real work at CPL3 (virtkit's guests do); keep CPL0 paths short; expect KVM internal "
            "errors for instructions the emulator lacks (virtkit reports them with a disassembly)"
        )
    if flavor in ("vmx", "svm"):
        return "any x86-64 guest runs at native speed, kernel code included"
    return "unknown KVM flavor: run the test suite to see what works"
