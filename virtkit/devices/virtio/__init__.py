"""Paravirtualized devices (virtio 1.2), layered like the rest of virtkit, imports pointing down:

    spec.py        numbers from the specification (status bits, feature bits, ring layout)
    queue.py       the split virtqueue, device side (§2.7): VirtQueue, DescriptorChain
    device.py      VirtioDevice: features, queues, config space, the shared drain loop
    interrupt.py   the Interrupt protocol a transport drives; irqfd and IRQ-line implementations
    mmio.py        the virtio-mmio transport, version 2 (§4.2)
    blk/           virtio-blk over a raw image (§5.2)
    console.py     virtio-console, one port (§5.3)
    rng.py         virtio-rng (§5.4)
    net/           virtio-net (§5.1) on a TAP device (imported only by machines with --net)

docs/VIRTIO.md describes the whole and how the device manager wires a device in. State records
are in ``persist.py``. May import: ``virtkit.devices.contract``, ``virtkit.devices.disk``,
``virtkit.memory``, ``virtkit.arch``, ``virtkit.records`` (lazily), ``virtkit.errors``.
"""

from virtkit.devices.virtio.blk import BlockDevice
from virtkit.devices.virtio.console import ConsoleDevice
from virtkit.devices.virtio.device import VirtioDevice
from virtkit.devices.virtio.interrupt import Interrupt, IrqFdInterrupt, IrqLineInterrupt
from virtkit.devices.virtio.mmio import NotifyRegistration, VirtioMmioTransport
from virtkit.devices.virtio.queue import DescriptorChain, VirtQueue
from virtkit.devices.virtio.rng import RngDevice

__all__ = [
    "BlockDevice",
    "ConsoleDevice",
    "DescriptorChain",
    "Interrupt",
    "IrqFdInterrupt",
    "IrqLineInterrupt",
    "NotifyRegistration",
    "RngDevice",
    "VirtQueue",
    "VirtioDevice",
    "VirtioMmioTransport",
]
