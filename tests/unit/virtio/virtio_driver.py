"""A small fake virtio *driver* for the tests: it talks to a device only through the virtio-mmio
registers and performs the §3.1.1 initialization sequence, using the rings of virtio_rings.py.

It is deliberately written like a guest driver (it knows nothing of the device's internals).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from virtio_rings import HOLE, INDIRECT, NEXT, RAM, WRITE, Allocator, FakeQueue, MiB, make_memory  # type: ignore[import-not-found]

from virtkit.devices.virtio import spec
from virtkit.devices.virtio.device import VirtioDevice
from virtkit.devices.virtio.mmio import CONFIG_OFFSET, Reg, VirtioMmioTransport
from virtkit.memory import GuestMemory

__all__ = [
    "HOLE",
    "INDIRECT",
    "NEXT",
    "RAM",
    "WRITE",
    "Allocator",
    "FakeDriver",
    "FakeQueue",
    "Machine",
    "MiB",
    "RecordingInterrupt",
    "Rig",
    "make_memory",
]

S = spec.DeviceStatus


@dataclass
class RecordingInterrupt:
    """Implements the transport's Interrupt protocol and remembers every call."""

    triggers: int = 0
    levels: list[bool] = field(default_factory=list)

    def trigger(self) -> None:
        self.triggers += 1

    def set_level(self, asserted: bool) -> None:
        self.levels.append(asserted)

    @property
    def asserted(self) -> bool:
        return bool(self.levels) and self.levels[-1]


class FakeDriver:
    """Drives one device through its virtio-mmio registers."""

    def __init__(self, transport: VirtioMmioTransport, mem: GuestMemory, alloc: Allocator) -> None:
        self.transport, self.mem, self.alloc = transport, mem, alloc
        self.queues: dict[int, FakeQueue] = {}

    def rd(self, reg: int) -> int:
        return self.transport.mmio_read(reg, 4)

    def wr(self, reg: int, value: int) -> None:
        self.transport.mmio_write(reg, 4, value)

    def config(self, offset: int, size: int) -> int:
        return self.transport.mmio_read(CONFIG_OFFSET + offset, size)

    @property
    def status(self) -> int:
        return self.rd(Reg.STATUS)

    def set_status(self, bits: int) -> None:
        self.wr(Reg.STATUS, self.status | bits)

    def device_features(self) -> int:
        features = 0
        for sel in (0, 1):
            self.wr(Reg.DEVICE_FEATURES_SEL, sel)
            features |= self.rd(Reg.DEVICE_FEATURES) << (32 * sel)
        return features

    def negotiate(self, accept: int | None = None, *, drop: int = 0) -> bool:
        """§3.1.1 steps 1-6: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, re-read."""
        self.wr(Reg.STATUS, 0)
        assert self.status == 0
        self.set_status(S.ACKNOWLEDGE)
        self.set_status(S.DRIVER)
        offered = self.device_features()
        features = (offered if accept is None else accept) & ~drop
        for sel in (0, 1):
            self.wr(Reg.DRIVER_FEATURES_SEL, sel)
            self.wr(Reg.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFF_FFFF)
        self.set_status(S.FEATURES_OK)
        return bool(self.status & S.FEATURES_OK)

    def setup_queue(
        self,
        index: int,
        size: int | None = None,
        *,
        desc: int | None = None,
        avail: int | None = None,
        used: int | None = None,
    ) -> FakeQueue:
        """§4.2.3.2: select, check, size, addresses, QueueReady."""
        self.wr(Reg.QUEUE_SEL, index)
        assert self.rd(Reg.QUEUE_READY) == 0
        num_max = self.rd(Reg.QUEUE_NUM_MAX)
        size = num_max if size is None else size
        n = max(size, 1)
        desc = self.alloc.alloc(16 * n, 4096) if desc is None else desc
        avail = self.alloc.alloc(6 + 2 * n, 4096) if avail is None else avail
        used = self.alloc.alloc(6 + 8 * n, 4096) if used is None else used
        self.wr(Reg.QUEUE_NUM, size)
        for reg, value in ((Reg.QUEUE_DESC_LOW, desc), (Reg.QUEUE_DRIVER_LOW, avail), (Reg.QUEUE_DEVICE_LOW, used)):
            self.wr(reg, value & 0xFFFF_FFFF)
            self.wr(reg + 4, value >> 32)
        self.wr(Reg.QUEUE_READY, 1)
        q = FakeQueue(self.mem, self.alloc, index, size, desc, avail, used)
        self.queues[index] = q
        return q

    def init(self, accept: int | None = None, *, drop: int = 0, size: int | None = None) -> list[FakeQueue]:
        """The whole §3.1.1 sequence with every queue the device has; asserts it succeeded."""
        assert self.rd(Reg.MAGIC_VALUE) == 0x74726976 and self.rd(Reg.VERSION) == 2
        assert self.negotiate(accept, drop=drop)
        queues = []
        index = 0
        while True:
            self.wr(Reg.QUEUE_SEL, index)
            if self.rd(Reg.QUEUE_NUM_MAX) == 0:
                break
            queues.append(self.setup_queue(index, size))
            assert self.rd(Reg.QUEUE_READY) == 1
            index += 1
        self.set_status(S.DRIVER_OK)
        assert self.status & S.DRIVER_OK
        return queues

    def kick(self, index: int) -> None:
        self.wr(Reg.QUEUE_NOTIFY, index)

    def ack_interrupts(self) -> int:
        status = self.rd(Reg.INTERRUPT_STATUS)
        self.wr(Reg.INTERRUPT_ACK, status)
        return status

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & S.DEVICE_NEEDS_RESET)


@dataclass
class Rig:
    """A device on its transport, driven by a fake driver, on shared guest memory."""

    device: VirtioDevice
    transport: VirtioMmioTransport
    driver: FakeDriver
    irq: RecordingInterrupt


class Machine:
    """Guest memory shared by several rigs, each with its own slice of RAM for rings and buffers."""

    def __init__(self, mem: GuestMemory | None = None) -> None:
        """Fresh guest memory, or ``mem`` (zeroed here, and left open by close())."""
        self._owns_memory = mem is None
        self.mem = make_memory() if mem is None else mem
        if mem is not None:
            for gpa, size in RAM:
                mem.fill(gpa, size)
        self._next_slice = 0x10_0000  # 1 MiB: below is left alone, so tests can check it is untouched
        self.rigs: list[Rig] = []

    def attach(self, device: VirtioDevice, slice_size: int = 512 * 1024) -> Rig:
        start = self._next_slice
        self._next_slice += slice_size
        assert self._next_slice <= 4 * MiB
        irq = RecordingInterrupt()
        transport = VirtioMmioTransport(device, self.mem, irq)
        rig = Rig(
            device, transport, FakeDriver(transport, self.mem, Allocator(self.mem, start, start + slice_size)), irq
        )
        self.rigs.append(rig)
        return rig

    def close(self) -> None:
        for rig in self.rigs:
            rig.transport.close()
        if self._owns_memory:
            self.mem.close()
