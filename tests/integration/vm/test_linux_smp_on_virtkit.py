"""The small test kernel (guests/linux, built by `make setup`) under virtkit, past the point where
QEMU stops on this PVM platform: the kernel's int3 self-test (its `int3` at CPL0 is rejected by
PVM's emulator, and virtkit completes it) and `popcnt`, to both CPUs up; in full mode on a plain
PC, in para mode with KVM's leaves and so kvm-clock (the seed's two modes on a real kernel).

The command line works around what is still missing (docs/LINUX.md, "Measured here"): a preset
delay loop and TSC frequency (no PIT calibration, HPET or PM timer yet), no XSAVE (not completed).
On a VT-x/AMD-V host nothing is completed and the same lines appear at native speed."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from linux_kernels import test_kernel as built_kernel  # noqa: E402 (not collected as a test)

from virtkit.api import VM
from virtkit.doctor import probe

pytestmark = pytest.mark.usefixtures("kvm")

DEADLINE_S = 600  # about 30 s of wall time alone here; generous for a busy 2-core machine
WANTED = (
    "Freeing SMP alternatives memory",  # after alternative_instructions(): the int3 self-test passed
    "smp: Brought up 1 node, 2 CPUs",
)


#: what each mode's log must show: para mode's kernel finds KVM and registers its clock
MODE_WANTED = {"full": (), "para": ("Hypervisor detected: KVM", "kvm-clock: Using msrs")}
#: and what it must not: a fully virtualized kernel sees a bare PC
MODE_UNWANTED = {"full": ("Hypervisor detected", "kvm-clock"), "para": ()}


@pytest.mark.slow
@pytest.mark.timeout(DEADLINE_S + 90)
@pytest.mark.parametrize("mode", ["full", "para"])
def test_the_test_kernel_brings_up_both_cpus_under_virtkit(mode: str) -> None:
    k = built_kernel()
    tsc_khz = int(probe().get("tsc_khz") or 0)
    if tsc_khz <= 0:
        pytest.skip("KVM does not report the TSC frequency")
    cmdline = f"console=ttyS0 lpj={tsc_khz * 4} tsc_early_khz={tsc_khz} no_timer_check noxsave"
    wanted = WANTED + MODE_WANTED[mode]
    with VM(k.vmlinux, memory="256M", vcpus=2, cmdline=cmdline, initrd=str(k.initramfs), mode=mode) as vm:
        vm.start()
        m = vm.machine
        assert m is not None
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline and m.stop_info is None:
            if all(w.encode() in vm.console.output for w in wanted):
                break
            time.sleep(1)
        detail = m.stop_info.detail if m.stop_info is not None else ""
        vm.stop()
        result = vm.wait(30)
    out = result.serial_output
    for w in wanted:
        assert w in out, f"no {w!r} within {DEADLINE_S} s; {detail}\n{out[-3000:]}"
    for u in MODE_UNWANTED[mode]:
        assert u not in out, f"{mode} mode: {u!r} in the log"
    assert "int3 selftest" not in out  # the kernel prints only if its self-test failed
    if probe()["kvm_flavor"] == "pvm":
        # what PVM's emulator rejected and the VMM completed on the way
        assert result.stats.completed.get("int3", 0) >= 1, result.stats.completed
