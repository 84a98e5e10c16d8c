"""The device manager hands out windows and interrupt lines, announces devices and keeps the
map snapshot and migration walk."""

from __future__ import annotations

import pytest

from virtkit.arch import layout
from virtkit.devices.contract import PioDevice
from virtkit.devices.legacy.post import PostPort
from virtkit.devices.manager import DeviceManager, virtio_kernel_cmdline_arg, virtio_mmio_slot
from virtkit.errors import DeviceError


class Port(PioDevice):
    def pio_read(self, offset: int, size: int) -> int:
        return 0

    def pio_write(self, offset: int, size: int, value: int) -> None:
        pass


def manager() -> DeviceManager:
    return DeviceManager(strict=False, irq_line=lambda gsi: lambda level: None)


def test_virtio_slots_are_handed_out_in_order_with_their_own_lines() -> None:
    dm = manager()
    slots = [dm.allocate_virtio_slot() for _ in range(3)]
    assert slots == [(layout.VIRTIO_MMIO_BASE + i * layout.VIRTIO_MMIO_SIZE, 5 + i) for i in range(3)]
    assert virtio_kernel_cmdline_arg(*slots[2]) == f"virtio_mmio.device=4K@{slots[2][0]:#x}:{slots[2][1]}"
    with pytest.raises(DeviceError, match=f"slot {layout.VIRTIO_MMIO_MAX_DEVICES}"):
        virtio_mmio_slot(layout.VIRTIO_MMIO_MAX_DEVICES)


def test_virtio_lines_are_ioapic_pins_no_isa_device_claims() -> None:
    # a 4th virtio device used to get IRQ 8 (the RTC's), and slots past 19 pins KVM's IOAPIC lacks
    from virtkit.devices.legacy.ata import IRQ as ATA_IRQ
    from virtkit.devices.legacy.i8042 import KEYBOARD_IRQ
    from virtkit.devices.legacy.uart import COM1_IRQ

    gsis = [virtio_mmio_slot(i)[1] for i in range(layout.VIRTIO_MMIO_MAX_DEVICES)]
    assert len(set(gsis)) == len(gsis) and all(0 <= g < 24 for g in gsis)
    assert not {0, 2, 8, 12, ATA_IRQ, ATA_IRQ + 1, KEYBOARD_IRQ, COM1_IRQ} & set(gsis)


def test_only_devices_with_state_are_persisted_and_names_are_unique() -> None:
    dm = manager()
    dm.add_port_device("post code", 0x80, 1, PostPort(), state_name="post")
    dm.add_port_device("plain", 0x81, 1, Port())
    assert list(dm.persistent) == ["post"]
    with pytest.raises(DeviceError, match="has no state to persist"):
        dm.add_port_device("plain2", 0x82, 1, Port(), state_name="plain")
    with pytest.raises(DeviceError, match="two devices are named 'post'"):
        dm.add_port_device("post again", 0x83, 1, PostPort(), state_name="post")


def test_closers_run_in_reverse() -> None:
    dm, order = manager(), []
    dm.on_close(lambda: order.append(1))
    dm.on_close(lambda: order.append(2))
    dm.close()
    dm.close()
    assert order == [2, 1]


def test_virtio_needs_configuring_first() -> None:
    from virtkit.devices.virtio import RngDevice
    from virtkit.memory import GuestMemory

    mem = GuestMemory([(0, 1 << 20)])
    try:
        with pytest.raises(DeviceError, match="configure_virtio"):
            manager().add_virtio("virtio-rng", RngDevice(), mem)
    finally:
        mem.close()
