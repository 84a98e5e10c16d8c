from __future__ import annotations

import pytest

from virtkit.devices.bus import MAX_DISTINCT_UNKNOWN, IoBus, MmioBus, UnknownAccess
from virtkit.devices.contract import MmioDevice, PioDevice, StringPio
from virtkit.errors import DeviceError


class Recorder(PioDevice, MmioDevice):
    def __init__(self) -> None:
        self.log: list[tuple[str, int, int, int]] = []

    def pio_read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size, 0))
        return 0x40 + offset

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))

    mmio_read = pio_read
    mmio_write = pio_write


def test_port_dispatch_gives_offsets() -> None:
    bus, dev = IoBus(), Recorder()
    bus.register(0x3F8, 8, dev, "uart")
    bus.write(0x3FB, 1, 0x80)
    assert bus.read(0x3F8, 1) == 0x40
    assert dev.log == [("w", 3, 1, 0x80), ("r", 0, 1, 0)]


def test_separate_windows_of_one_device() -> None:
    bus, dev = IoBus(), Recorder()
    bus.register(0x60, 1, dev, "kbc data")
    bus.register(0x64, 1, dev, "kbc cmd", offset=4)
    bus.write(0x64, 1, 0xFE)
    assert dev.log == [("w", 4, 1, 0xFE)]


def test_collisions_are_refused_with_both_names() -> None:
    bus = IoBus()
    bus.register(0x3F8, 8, Recorder(), "uart")
    with pytest.raises(DeviceError, match="collide with uart"):
        bus.register(0x3FC, 2, Recorder(), "other")
    mmio = MmioBus()
    mmio.register(0xD000_0000, 0x1000, Recorder(), "virtio0")
    with pytest.raises(DeviceError, match="virtio0"):
        mmio.register(0xD000_0800, 0x1000, Recorder(), "virtio1")


def test_unknown_reads_are_all_ones_and_counted() -> None:
    bus = IoBus()
    assert bus.read(0x200, 1) == 0xFF
    assert bus.read(0x200, 2) == 0xFFFF
    bus.write(0x200, 4, 1)
    assert bus.unknown == {(0x200, False): 2, (0x200, True): 1}


def test_strict_mode_raises() -> None:
    with pytest.raises(UnknownAccess, match="unknown port 0x200"):
        IoBus(strict=True).read(0x200, 1)
    with pytest.raises(UnknownAccess, match="MMIO"):
        MmioBus(strict=True).write(0xC000_0000, 4, 0)


def test_unknown_counts_stay_bounded() -> None:
    bus = MmioBus()
    for i in range(MAX_DISTINCT_UNKNOWN * 3):
        bus.write(0x1_0000_0000 + i * 8, 4, 0)
    assert len(bus.unknown) <= MAX_DISTINCT_UNKNOWN + 1
    assert sum(bus.unknown.values()) == MAX_DISTINCT_UNKNOWN * 3


def test_mmio_access_must_fit_in_the_range() -> None:
    bus, dev = MmioBus(), Recorder()
    bus.register(0x1000, 0x10, dev, "dev")
    assert bus.read(0x100C, 4) == 0x40 + 0xC
    assert bus.read(0x100E, 4) == 0xFFFFFFFF  # straddles the end: nobody owns all of it


def test_a_device_must_declare_the_bus_it_sits_on() -> None:
    class Duck:  # has the methods, does not declare the contract
        def pio_read(self, offset: int, size: int) -> int:
            return 0

        def pio_write(self, offset: int, size: int, value: int) -> None:
            pass

    with pytest.raises(DeviceError, match="is not a port-I/O device"):
        IoBus().register(0x100, 1, Duck(), "duck")  # type: ignore[arg-type]
    with pytest.raises(DeviceError, match="is not an MMIO device"):
        MmioBus().register(0x1000, 1, Duck(), "duck")  # type: ignore[arg-type]


def test_string_io_goes_in_bulk_only_to_devices_that_declare_it() -> None:
    class Fifo(StringPio):
        def __init__(self) -> None:
            self.calls: list[str] = []

        def pio_read(self, offset: int, size: int) -> int:
            self.calls.append("read")
            return 0x11

        def pio_write(self, offset: int, size: int, value: int) -> None:
            self.calls.append("write")

        def pio_read_string(self, offset: int, size: int, count: int) -> bytes:
            self.calls.append(f"read_string {count}")
            return b"\x22" * size * count

        def pio_write_string(self, offset: int, size: int, data: bytes) -> None:
            self.calls.append(f"write_string {len(data)}")

    bus, fifo, plain = IoBus(), Fifo(), Recorder()
    bus.register(0x1F0, 8, fifo, "fifo")
    bus.register(0x300, 1, plain, "plain")
    assert bus.read_string(0x1F0, 2, 256) == b"\x22" * 512
    bus.write_string(0x1F0, 2, b"ab" * 4)
    assert fifo.calls == ["read_string 256", "write_string 8"]
    assert bus.read_string(0x300, 2, 3) == (0x40).to_bytes(2, "little") * 3  # element by element
    assert [c[0] for c in plain.log] == ["r", "r", "r"]
