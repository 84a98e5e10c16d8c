"""The LSTAR wall (docs/LINUX.md): on PVM, SYSCALL from CPL3 reaches the LSTAR target still at
CPL3, and a hardware breakpoint (KVM_SET_GUEST_DEBUG) there, which could let the VMM finish the
switch to CPL0, never fires: breakpoints stop only code the CPL0 emulator runs. Checked with
guests/sysret.c (step 2: SYSCALL to syscall_entry_iret) and, as the control, a breakpoint on
kcall_entry, which the guest reaches at CPL0."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from virtkit import VM
from virtkit.kvm.flavor import kvm_flavor
from virtkit.kvm.structs import KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP
from virtkit.stop import StopReason

pytestmark = pytest.mark.usefixtures("kvm", "no_leaks")


def symbol(elf: Path, name: str) -> int:
    out = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == name:
            return int(parts[0], 16)
    raise AssertionError(f"{name} not in {elf}")


def run_with_breakpoint(elf: Path, address: int) -> object:
    with VM(elf, cmdline="step=2") as vm:
        assert vm.machine is not None
        # DR7 L0 = 1, R/W0 = 00 (instruction), LEN0 = 00 (Intel SDM vol. 3B §18.2.4)
        vm.machine.vcpus[0].fd.set_guest_debug(
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, [address, 0, 0, 0, 0, 0, 0, 1]
        )
        return vm.run(timeout=30)


def test_breakpoint_on_cpl0_code_stops_the_vcpu(guests: Path) -> None:
    elf = guests / "sysret.elf"
    target = symbol(elf, "kcall_entry")
    r = run_with_breakpoint(elf, target)
    assert r.reason is StopReason.ERROR, r.serial_output  # type: ignore[attr-defined]
    assert f"unexpected VM exit DEBUG on vCPU 0: RIP {target:#x} CPL0" in r.detail  # type: ignore[attr-defined]


def test_breakpoint_at_the_lstar_target(guests: Path) -> None:
    elf = guests / "sysret.elf"
    target = symbol(elf, "syscall_entry_iret")
    r = run_with_breakpoint(elf, target)
    if kvm_flavor() == "pvm":
        # the target runs at CPL3, natively: the breakpoint never fires and the guest goes on
        assert "SYSCALL reached LSTAR but at CPL3" in r.serial_output  # type: ignore[attr-defined]
        assert r.reason is StopReason.DEBUG_EXIT  # type: ignore[attr-defined]
    else:
        assert f"unexpected VM exit DEBUG on vCPU 0: RIP {target:#x} CPL0" in r.detail  # type: ignore[attr-defined]
