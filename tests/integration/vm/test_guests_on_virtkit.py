"""The shipped guests on real KVM through the Python API: how each one ends, and what it says."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtkit import VM
from virtkit.kvm.constants import ExitReason
from virtkit.kvm.flavor import kvm_flavor
from virtkit.stop import StopReason

pytestmark = pytest.mark.usefixtures("kvm", "no_leaks")


def run(kernel: Path, timeout: float = 20, **kw: object) -> object:
    with VM(kernel, **kw) as vm:  # type: ignore[arg-type]
        return vm.run(timeout=timeout)


def test_hello_multiboot(guests: Path) -> None:
    r = run(guests / "hello.elf", cmdline="exit=3 greeting")
    assert r.reason is StopReason.DEBUG_EXIT
    assert r.exit_code == (3 << 1) | 1
    assert "hello from virtkit guest" in r.serial_output
    assert "exit=3 greeting" in r.serial_output
    assert r.stats.exits["io"] >= len("hello from virtkit guest")


def test_hello_direct64(guests: Path) -> None:
    r = run(guests / "hello64.elf", boot="direct64")
    assert r.reason is StopReason.DEBUG_EXIT and r.exit_code == 1
    assert "hello from virtkit guest" in r.serial_output


def test_triple_fault_is_reported(guests: Path) -> None:
    r = run(guests / "triplefault.elf")
    assert r.reason is StopReason.TRIPLE_FAULT
    assert r.exit_code == 125 and r.crashed
    assert "triple fault" in r.detail and "RIP 0x" in r.detail


def test_hlt_with_interrupts_disabled_ends_the_vm(guests: Path) -> None:
    r = run(guests / "hltcli.elf")
    assert r.reason is StopReason.HALTED and r.exit_code == 0


def test_i8042_reset_ends_the_vm(guests: Path) -> None:
    r = run(guests / "reset.elf")
    assert r.reason is StopReason.RESET and r.exit_code == 0


@pytest.mark.parametrize("cpl", [0, 3])
def test_timeout_stops_a_spinning_guest(guests: Path, cpl: int) -> None:
    r = run(guests / "spin.elf", timeout=0.5, cmdline=f"cpl={cpl}")
    assert r.reason is StopReason.TIMEOUT and r.exit_code == 124


def test_unknown_ports_are_counted(guests: Path) -> None:
    r = run(guests / "hammer.elf")
    assert r.reason is StopReason.DEBUG_EXIT and r.exit_code == 1
    pio, mmio = sum(r.stats.unknown_pio.values()), sum(r.stats.unknown_mmio.values())
    assert pio > 0 and mmio > 0
    assert pio + mmio >= 100_000


def test_strict_mode_stops_on_unknown_access(guests: Path) -> None:
    r = run(guests / "hammer.elf", strict=True)
    assert r.reason is StopReason.UNKNOWN_ACCESS and r.exit_code == 126
    assert "unknown port" in r.detail


def test_emulation_failure_is_reported_with_disassembly(guests: Path) -> None:
    r = run(guests / "badinsn.elf")
    if kvm_flavor() == "pvm":
        # neither PVM's CPL0 emulator nor virtkit/cpl0.py performs lock cmpxchg16b:
        # KVM_EXIT_INTERNAL_ERROR, reported with the instruction and why the VMM did not complete it
        assert r.reason is StopReason.INTERNAL_ERROR
        assert "cmpxchg16b" in r.detail and "CPL0" in r.detail
        assert "not completed by the VMM" in r.detail
        assert r.exit_code == 125
    else:
        # with CX16 the instruction just works (exit value 1); without it, #UD with no IDT
        assert "badinsn: executing lock cmpxchg16b" in r.serial_output


def test_smp_guest_runs_both_vcpus_at_once(guests: Path) -> None:
    # the ping-pong at CPL3 makes no exits: it completes only if both vCPUs are inside KVM_RUN at
    # the same time, i.e. the GIL is released and the threads really run in parallel
    r = run(guests / "smp.elf", vcpus=2, cmdline="rounds=200000", timeout=60)
    assert "smp: cpu1 online" in r.serial_output, r.serial_output
    assert "pingpong rounds=200000 ok" in r.serial_output
    assert r.exit_code == 1


def test_vm_can_be_built_and_closed_many_times(guests: Path) -> None:
    for _ in range(10):
        r = run(guests / "hello.elf")
        assert r.exit_code == 1


def test_without_in_kernel_irqchip_hlt_exits_to_the_vmm(guests: Path) -> None:
    from virtkit.vm import Machine, MachineConfig

    out = bytearray()
    m = Machine(MachineConfig(irqchip=False), out.extend)
    try:
        m.load(str(guests / "hltcli.elf"))
        m.start()
        stop = m.wait(20)
        hlt_exits = m.vcpu_stats()[0].exits[ExitReason.HLT]
    finally:
        m.close()
    assert stop.reason is StopReason.HALTED
    assert "interrupts disabled" in stop.detail
    assert hlt_exits == 1  # the HLT reached the VMM itself: no in-kernel LAPIC swallowed it


def test_memory_does_not_grow_over_many_vms(guests: Path) -> None:
    def rss_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    for _ in range(3):  # warm up caches, imports and allocator arenas
        run(guests / "hello.elf")
    before = rss_kib()
    for _ in range(20):
        assert run(guests / "hello.elf").exit_code == 1
    grown = rss_kib() - before
    # each VM has 64 MiB of guest RAM: a leak of even one VM's memory would show as far more
    assert grown < 8 * 1024, f"RSS grew by {grown} KiB over 20 VMs"


@pytest.mark.parametrize("eventfds", [True, False])
def test_para_machine_announces_its_devices_and_cleans_up(guests: Path, tmp_path: Path, eventfds: bool) -> None:
    from virtkit.vm import DiskSpec, Machine, MachineConfig

    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    out = bytearray()
    m = Machine(MachineConfig(paravirt=True, disks=(DiskSpec(str(img)),), eventfds=eventfds), out.extend)
    try:
        m.load(str(guests / "hello.elf"))
        m.start()
        stop = m.wait(20)
        paths = dict(m.virtio_paths)
        names = [name for _, _, name in m.mmio_bus.devices()]
    finally:
        m.close()
    assert stop.exit_status == 1
    assert names == ["virtio-console", "virtio-blk", "virtio-rng"]
    assert b"virtio_mmio.device=4K@0xd0001000:6" in out  # the guest saw its device list
    assert paths == (
        {"notify": "ioeventfd", "interrupt": "irqfd"} if eventfds else {"notify": "mmio-exit", "interrupt": "irq-line"}
    )
