"""Port-I/O and MMIO address dispatch.

A vCPU exit names a port or a guest-physical address; the bus finds the device that owns it and
calls it with the offset into the device's range. Accesses nobody owns are *unknown*: reads give
all-ones (what an empty ISA/PCI bus returns), writes are dropped, and both are counted so that
``--stats`` shows them. In strict mode an unknown access stops the machine instead.
"""

from __future__ import annotations

import bisect

from virtkit.devices.contract import MmioDevice, PioDevice, StringPio
from virtkit.errors import DeviceError


class UnknownAccess(Exception):
    """Raised by a bus in strict mode; the vCPU loop turns it into a machine stop."""

    def __init__(self, space: str, addr: int, size: int, is_write: bool) -> None:
        super().__init__(f"guest {'wrote' if is_write else 'read'} {size} byte(s) at unknown {space} {addr:#x}")
        self.space, self.addr, self.size, self.is_write = space, addr, size, is_write


#: distinct unknown addresses remembered one by one; beyond this they are counted under address -1,
#: so a guest sweeping the address space cannot make the VMM's statistics grow without bound
MAX_DISTINCT_UNKNOWN = 1024


def _count_unknown(counts: dict[tuple[int, bool], int], addr: int, is_write: bool) -> None:
    key = (addr, is_write)
    if key not in counts and len(counts) >= MAX_DISTINCT_UNKNOWN:
        key = (-1, is_write)
    counts[key] = counts.get(key, 0) + 1


class _Range:
    __slots__ = ("base", "length", "name")

    def __init__(self, base: int, length: int, name: str) -> None:
        self.base, self.length, self.name = base, length, name


class _MmioRange(_Range):
    __slots__ = ("device",)

    def __init__(self, base: int, length: int, device: MmioDevice, name: str) -> None:
        super().__init__(base, length, name)
        self.device = device


class IoBus:
    """The 64 KiB x86 I/O port space."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        #: port -> (device, base port): one entry per port, a constant-time lookup on the exit path
        self._ports: dict[int, tuple[PioDevice, int]] = {}
        self._ranges: list[_Range] = []
        self.unknown: dict[tuple[int, bool], int] = {}

    def register(self, base: int, length: int, device: PioDevice, name: str, *, offset: int = 0) -> None:
        """Give ports ``base``..``base+length-1`` to ``device``; it sees offsets from ``offset`` up
        (so one device can own separate port windows, like the i8042 at 0x60 and 0x64)."""
        if not isinstance(device, PioDevice):
            raise DeviceError(f"{name}: {type(device).__name__} is not a port-I/O device")
        if base < 0 or length <= 0 or base + length > 0x10000:
            raise DeviceError(f"{name}: port range {base:#x}+{length} is outside the I/O space")
        for r in self._ranges:
            if base < r.base + r.length and r.base < base + length:
                raise DeviceError(
                    f"{name}: ports {base:#x}-{base + length - 1:#x} collide with "
                    f"{r.name} at {r.base:#x}-{r.base + r.length - 1:#x}"
                )
        self._ranges.append(_Range(base, length, name))
        for port in range(base, base + length):
            self._ports[port] = (device, base - offset)

    def devices(self) -> list[tuple[int, int, str]]:
        return sorted((r.base, r.length, r.name) for r in self._ranges)

    def read(self, port: int, size: int) -> int:
        entry = self._ports.get(port)
        if entry is None:
            return self._unknown(port, size, False)
        return entry[0].pio_read(port - entry[1], size)

    def write(self, port: int, size: int, value: int) -> None:
        entry = self._ports.get(port)
        if entry is None:
            self._unknown(port, size, True)
            return
        entry[0].pio_write(port - entry[1], size, value)

    def read_string(self, port: int, size: int, count: int) -> bytes:
        """``rep ins``: ``count`` elements at once. Devices with a data FIFO (ATA) declare
        :class:`StringPio` and move a whole sector per exit; others are read element by element."""
        entry = self._ports.get(port)
        if entry is not None and isinstance(entry[0], StringPio):
            return entry[0].pio_read_string(port - entry[1], size, count)
        return b"".join(self.read(port, size).to_bytes(size, "little") for _ in range(count))

    def write_string(self, port: int, size: int, data: bytes) -> None:
        """``rep outs``: the counterpart of :meth:`read_string`."""
        entry = self._ports.get(port)
        if entry is not None and isinstance(entry[0], StringPio):
            entry[0].pio_write_string(port - entry[1], size, data)
            return
        for i in range(0, len(data), size):
            self.write(port, size, int.from_bytes(data[i : i + size], "little"))

    def _unknown(self, port: int, size: int, is_write: bool) -> int:
        _count_unknown(self.unknown, port, is_write)
        if self.strict:
            raise UnknownAccess("port", port, size, is_write)
        return (1 << (8 * size)) - 1


class MmioBus:
    """Guest-physical addresses that are not RAM."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self._bases: list[int] = []
        self._ranges: list[_MmioRange] = []
        self.unknown: dict[tuple[int, bool], int] = {}

    def register(self, base: int, length: int, device: MmioDevice, name: str) -> None:
        if not isinstance(device, MmioDevice):
            raise DeviceError(f"{name}: {type(device).__name__} is not an MMIO device")
        if base < 0 or length <= 0:
            raise DeviceError(f"{name}: invalid MMIO range {base:#x}+{length}")
        for r in self._ranges:
            if base < r.base + r.length and r.base < base + length:
                raise DeviceError(
                    f"{name}: MMIO {base:#x}+{length:#x} collides with {r.name} at {r.base:#x}+{r.length:#x}"
                )
        i = bisect.bisect(self._bases, base)
        self._bases.insert(i, base)
        self._ranges.insert(i, _MmioRange(base, length, device, name))

    def devices(self) -> list[tuple[int, int, str]]:
        return [(r.base, r.length, r.name) for r in self._ranges]

    def _find(self, addr: int, size: int) -> _MmioRange | None:
        i = bisect.bisect(self._bases, addr) - 1
        if i >= 0:
            r = self._ranges[i]
            if addr + size <= r.base + r.length:
                return r
        return None

    def read(self, addr: int, size: int) -> int:
        r = self._find(addr, size)
        if r is None:
            return self._unknown(addr, size, False)
        return r.device.mmio_read(addr - r.base, size)

    def write(self, addr: int, size: int, value: int) -> None:
        r = self._find(addr, size)
        if r is None:
            self._unknown(addr, size, True)
            return
        r.device.mmio_write(addr - r.base, size, value)

    def _unknown(self, addr: int, size: int, is_write: bool) -> int:
        _count_unknown(self.unknown, addr, is_write)
        if self.strict:
            raise UnknownAccess("MMIO address", addr, size, is_write)
        return (1 << (8 * size)) - 1
