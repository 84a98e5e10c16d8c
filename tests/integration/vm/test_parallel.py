"""vCPU threads release the GIL in KVM_RUN: Python keeps running, and VMs run side by side."""

from __future__ import annotations

import faulthandler
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from virtkit import VM
from virtkit.stop import StopReason

pytestmark = pytest.mark.usefixtures("kvm", "no_leaks")


def _thread_state(native_id: int) -> str:
    with open(f"/proc/self/task/{native_id}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# spin.c prints this one line (its console ends lines with CRLF), one OUT per byte, then loops without another exit
BANNER = b"spin: looping forever at CPL3\r\n"


def test_python_runs_while_a_vcpu_is_in_the_guest(guests: Path) -> None:
    """The spin guest loops at CPL3 without a single exit, so its vCPU thread never leaves KVM_RUN.
    If KVM_RUN held the GIL, the main thread could not run Python at all meanwhile: so the main
    thread does a fixed amount of Python work and the vCPU thread's CPU clock, read around it,
    must have advanced with no exit in between (both ran, in the same window)."""
    with VM(guests / "spin.elf", cmdline="cpl=3") as vm:
        vm.start()
        machine = vm.machine
        assert machine is not None
        # the banner's last byte is the guest's last exit: after it, the loop never leaves the guest
        _wait_for(lambda: BANNER in vm.console.output, "the whole spin banner")
        vcpu_thread = machine.vcpus[0].thread
        assert vcpu_thread is not None and vcpu_thread.ident is not None
        vcpu_clock = time.pthread_getcpuclockid(vcpu_thread.ident)
        # a held GIL would hang this thread for good, and with it every Python-level timeout:
        # faulthandler's watchdog is a C thread that needs no GIL
        faulthandler.dump_traceback_later(60, exit=True)
        try:
            exits = sum(machine.vcpus[0].stats.exits)
            vcpu_before, main_before = time.clock_gettime(vcpu_clock), time.thread_time()
            work = sum(i * i for i in range(2_000_000))
            vcpu_after, main_after = time.clock_gettime(vcpu_clock), time.thread_time()
        finally:
            faulthandler.cancel_dump_traceback_later()
        assert work == sum(i * i for i in range(2_000_000))
        assert main_after > main_before
        assert sum(machine.vcpus[0].stats.exits) == exits, "the guest made an exit: the window proves nothing"
        assert vcpu_after > vcpu_before, "the vCPU thread did not run while Python did"
        vm.stop()
        assert vm.wait(timeout=30).reason is StopReason.STOPPED


def test_two_vms_in_one_process_run_at_the_same_time(guests: Path) -> None:
    with VM(guests / "spin.elf", cmdline="cpl=3") as a, VM(guests / "spin.elf", cmdline="cpl=3") as b:
        a.start()
        b.start()
        assert a.machine is not None and b.machine is not None
        ids = [a.machine.vcpus[0].thread.native_id, b.machine.vcpus[0].thread.native_id]  # type: ignore[union-attr]
        _wait_for(
            lambda: BANNER in a.console.output and BANNER in b.console.output, "both spin banners"
        )
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
