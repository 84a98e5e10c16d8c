"""A host signal (Ctrl-C, SIGTERM) at any moment of a machine's start: never a half-started
machine whose vCPUs nothing stops (seen under load: `virtkit run` interrupted in Machine.start
hung with a vCPU spinning in the guest)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from virtkit import VM
from virtkit.vcpu import Vcpu

pytestmark = pytest.mark.usefixtures("kvm", "no_leaks")


def test_ctrl_c_while_the_vcpus_start_arrives_once_all_run_and_the_vm_stops(
    guests: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[int] = []
    real_start = Vcpu.start

    def start_and_interrupt(self: Vcpu) -> None:
        real_start(self)
        started.append(self.id)
        if len(started) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # between the first vCPU and the second

    monkeypatch.setattr(Vcpu, "start", start_and_interrupt)
    # Ctrl-C as Python handles it by default, whatever this process inherited (a suite started in
    # the background runs with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    vm = VM(guests / "spin.elf", cmdline="cpl=3", vcpus=2)
    try:
        with pytest.raises(KeyboardInterrupt):
            vm.start()
        assert started == [0, 1]  # held back until every vCPU ran
        assert vm.machine is not None and vm.machine._watchdog is not None
    finally:
        signal.signal(signal.SIGINT, previous)
        vm.close()  # must return: every vCPU thread is known and stopped
    assert not [t for t in threading.enumerate() if t.name.startswith("vcpu")]


def test_the_vcpu_threads_never_take_the_hosts_stop_signals(guests: Path) -> None:
    with VM(guests / "spin.elf", cmdline="cpl=3", vcpus=2) as vm:
        vm.start()
        assert vm.machine is not None
        for v in vm.machine.vcpus:
            assert v.thread is not None and v.thread.native_id is not None
            with open(f"/proc/self/task/{v.thread.native_id}/status") as f:
                blocked = int(next(x for x in f if x.startswith("SigBlk:")).split()[1], 16)
            assert blocked & (1 << (signal.SIGINT - 1)) and blocked & (1 << (signal.SIGTERM - 1))
        vm.stop()
