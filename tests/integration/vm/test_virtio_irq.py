"""virtio used-ring interrupts reach a guest through KVM's in-kernel irqchip, end to end.

parawork with ``irq=1`` routes the virtio-blk device's pin through the I/O APIC to its local APIC,
masks the pin on the 8259, and halts (``sti; hlt``) after every request until the used index moves,
so the disk workload completes only if the interrupts arrive; the guest counts them in ``irqs=``.
Both ways a machine drives the line are covered: irqfd (eventfds on, the default) and the
``KVM_IRQ_LINE`` fallback (eventfds off), which pulses the edge-triggered pin from userspace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("kvm", "no_leaks")

SECTORS, REQ = 64, 8
CMDLINE = f"work=disk sectors={SECTORS} req={REQ} via=virtio irq=1"
REQUESTS = 2 * -(-SECTORS // REQ)  # written, then read back


@pytest.fixture
def parawork(guests: Path) -> Path:
    path = guests / "parawork.elf"
    if not path.exists():
        pytest.skip(f"{path} is not built: run `make guests`")
    return path


def check_disk_line(output: str) -> int:
    """The guest's disk line: data intact; returns its interrupt count."""
    m = re.search(r"^work=disk mode=para via=virtio .*$", output.replace("\r", ""), re.M)
    assert m, output
    words = m.group(0).split()
    fields = dict(w.split("=", 1) for w in words if "=" in w)
    assert words[-1] == "ok", output
    assert fields["wsum"] == fields["rsum"], output
    assert int(fields["bytes"]) == SECTORS * 512
    return int(fields["irqs"])


@pytest.mark.parametrize("eventfds", [True, False], ids=["irqfd", "irq-line"])
def test_blk_interrupts_reach_the_guest(parawork: Path, tmp_path: Path, eventfds: bool) -> None:
    from virtkit.vm import DiskSpec, Machine, MachineConfig

    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    out = bytearray()
    m = Machine(MachineConfig(paravirt=True, disks=(DiskSpec(str(img)),), eventfds=eventfds), out.extend)
    try:
        m.load(str(parawork), cmdline=CMDLINE)  # the machine appends virtio_mmio.device=...
        m.start()
        stop = m.wait(60)
        paths = dict(m.virtio_paths)
    finally:
        m.close()
    output = out.decode(errors="replace")
    assert paths["interrupt"] == ("irqfd" if eventfds else "irq-line")
    assert "irq=1: virtio-blk pin 6 -> I/O APIC" in output, output
    assert stop.exit_status == 1, output  # debug-exit value 0: every workload checked out
    assert check_disk_line(output) >= REQUESTS


def test_blk_interrupts_through_the_vm_api(parawork: Path, tmp_path: Path) -> None:
    from virtkit import VM

    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    with VM(parawork, mode="para", disks=[str(img)], cmdline=CMDLINE) as vm:
        r = vm.run(timeout=60)
    assert r.exit_code == 1, r.serial_output
    assert check_disk_line(r.serial_output) >= REQUESTS
