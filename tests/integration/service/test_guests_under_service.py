"""Every guest kind the service can start runs to a clean end under it, with the real seccomp
filter: full mode (UART, PIT/PIC timer, two vCPUs, a crash, an emulation failure) and para mode
(virtio console through the I/O thread with ioeventfd and irqfd, the hypercalls). A VMM killed
by SIGSYS ends as ``vmm-killed``; every case here asserts the guest's own end instead.

The service's API has no disks, so the disk paths (ATA, virtio-blk, block hypercalls) are covered
by :mod:`virtkit.jail.measure` and ``test_jail.py`` running the VMM directly."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.kvm, pytest.mark.root]

# (VM name, guest, mode, vCPUs, command line, the end's reason, a line its output must have)
ENDING = [
    ("hello", "hello.elf", "full", 1, "", "debug-exit", "hello from virtkit guest"),
    ("hello64", "hello64.elf", "full", 1, "", "debug-exit", "hello from virtkit guest"),
    ("smp", "smp.elf", "full", 2, "rounds=1000", "debug-exit", "smp: 2 cpus"),
    ("hammer", "hammer.elf", "full", 1, "n=2000", "debug-exit", "hammer: done n=2000"),
    ("timer", "trapcost.elf", "full", 1, "phases=pio,mmio,timer n=1000 ticks=20", "debug-exit", "trapcost done"),
    (
        "fullwork",
        "fullwork.elf",
        "full",
        1,
        "work=console,null bytes=4096 n=100",
        "debug-exit",
        "work=null mode=full n=100",
    ),
    ("triplefault", "triplefault.elf", "full", 1, "", "triple-fault", "triplefault: loading a zero-limit IDT"),
    ("badinsn", "badinsn.elf", "full", 1, "", "internal-error", "badinsn: executing lock cmpxchg16b"),
    (
        "para-virtio",
        "parawork.elf",
        "para",
        1,
        "work=console,null,cpu bytes=65536 n=1000 loop=1000",
        "debug-exit",
        "work=cpu mode=para n=1000",
    ),
    (
        "para-hcall",
        "parawork.elf",
        "para",
        1,
        "work=console,null via=hcall bytes=65536 n=1000 exit=hcall",
        "power-off",
        "work=null mode=para via=hcall n=1000",
    ),
    ("para-smp", "smp.elf", "para", 2, "rounds=1000", "debug-exit", "smp: 2 cpus"),
]


@pytest.mark.parametrize(
    ("name", "guest", "mode", "vcpus", "cmdline", "reason", "line"), ENDING, ids=[c[0] for c in ENDING]
)
def test_each_guest_kind_ends_cleanly_under_the_service(
    daemon_factory: Any,
    guests: Path,
    name: str,
    guest: str,
    mode: str,
    vcpus: int,
    cmdline: str,
    reason: str,
    line: str,
) -> None:
    d = daemon_factory()
    d.create(name, guests / guest, mode=mode, vcpus=vcpus, cmdline=cmdline, start=True)
    rec = d.wait_state(name, ("stopped", "failed"), timeout=60)
    end = rec["last_exit"]
    assert end["reason"] == reason, end  # not vmm-killed (SIGSYS), not vmm-error
    assert "SIGSYS" not in end["detail"] and "seccomp" not in end["detail"], end
    assert line in d.call("GET", f"/v1/vms/{name}/logs")["data"]
    assert rec["state"] == ("failed" if end["crash"] else "stopped")


@pytest.mark.parametrize(
    ("mode", "guest", "cmdline"),
    [("full", "counter.elf", ""), ("para", "spin.elf", "cpl=3"), ("para", "parawork.elf", "work=cpu loop=4000000000")],
)
def test_a_running_vm_of_each_mode_answers_every_control_operation(
    daemon_factory: Any, guests: Path, mode: str, guest: str, cmdline: str
) -> None:
    """stats, console input and a stop: every control path of the VMM runs under the filter."""
    d = daemon_factory()
    d.create("vm", guests / guest, mode=mode, cmdline=cmdline, start=True)
    deadline = time.monotonic() + 30
    while not (d.call("GET", "/v1/vms/vm/stats")["vmm"] or {}).get("exits"):
        assert time.monotonic() < deadline, d.call("GET", "/v1/vms/vm")
        time.sleep(0.05)
    d.call("POST", "/v1/vms/vm/console", {"data": "x"})
    assert d.vm("vm")["state"] == "running"
    rec = d.call("POST", "/v1/vms/vm/stop")
    assert rec["state"] == "stopped" and rec["last_exit"]["reason"] == "stopped", rec
