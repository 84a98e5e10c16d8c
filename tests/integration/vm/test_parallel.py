"""vCPU threads release the GIL in KVM_RUN: Python keeps running, and VMs run side by side."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from virtkit import VM
from virtkit.vm import StopReason

pytestmark = pytest.mark.usefixtures("kvm", "no_leaks")


def _thread_state(native_id: int) -> str:
    with open(f"/proc/self/task/{native_id}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_python_runs_while_a_vcpu_is_in_the_guest(guests: Path) -> None:
    with VM(guests / "spin.elf", cmdline="cpl=3") as vm:
        vm.start()
        assert vm.machine is not None
        while "spin" not in vm.console.output.decode():  # its banner: now it spins without exits
            time.sleep(0.01)
        time.sleep(0.05)
        exits = sum(vm.machine.vcpus[0].stats.exits)
        # the guest makes no exit from here on; if KVM_RUN held the GIL this loop would never end
        total = sum(range(3_000_000))
        assert total > 0
        assert sum(vm.machine.vcpus[0].stats.exits) == exits
        vm.stop()
        assert vm.wait().reason is StopReason.STOPPED


def test_two_vms_in_one_process_run_at_the_same_time(guests: Path) -> None:
    with VM(guests / "spin.elf", cmdline="cpl=3") as a, VM(guests / "spin.elf", cmdline="cpl=3") as b:
        a.start()
        b.start()
        assert a.machine is not None and b.machine is not None
        ids = [a.machine.vcpus[0].thread.native_id, b.machine.vcpus[0].thread.native_id]  # type: ignore[union-attr]
        both_running = 0
        for _ in range(50):
            # a thread blocked on the GIL sleeps (S); both inside KVM_RUN spinning are running (R)
            if all(_thread_state(t) == "R" for t in ids):  # type: ignore[arg-type]
                both_running += 1
            time.sleep(0.01)
        a.stop()
        b.stop()
        a.wait()
        b.wait()
    assert both_running > 0
