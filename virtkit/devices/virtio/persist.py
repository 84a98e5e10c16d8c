"""State records of the virtio layer: a split virtqueue, a device, its virtio-mmio transport, and
each device type's own part (see :class:`virtkit.devices.contract.Persistent`).

Bounds are those of the registers and ring indices (virtio 1.2 §2.7, §4.2.2); whether a queue's
rings lie in guest RAM is checked when the queue is rebuilt (:meth:`VirtQueue.from_state`), and
whether the device part matches the device by the device's ``restore``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from virtkit.devices.virtio.net.persist import NetState
from virtkit.records import U16, U32, U64, Bounds, Count

#: 1 to spec.MAX_QUEUE_SIZE entries (§2.7); a unit test pins the two together
QueueSize = Annotated[int, Bounds(lo=1, hi=32768)]
#: no device of ours has more queues than this
MAX_QUEUES = 16
Reason = Annotated[str, Bounds(max_len=1000)]


@dataclass(frozen=True, slots=True)
class QueueState:
    """One enabled split virtqueue: its configuration and the device's ring indices."""

    size: QueueSize
    max_size: QueueSize
    desc_table: U64
    avail_ring: U64
    used_ring: U64
    event_idx: bool
    indirect: bool
    next_avail: U16
    next_used: U16
    last_signalled: U16
    unsignalled: U32
    broken: Reason | None


@dataclass(frozen=True, slots=True)
class ConsoleState:
    cols: U16
    rows: U16
    #: host input waiting for receive buffers (console.INPUT_LIMIT at most, checked by the device)
    input: Annotated[bytes, Bounds(max_len=1 << 20)]


@dataclass(frozen=True, slots=True)
class BlockState:
    """What identifies the disk, so a restore onto another image is refused (the data is the image)."""

    path: Annotated[str, Bounds(max_len=4096)]
    sectors: Count
    read_only: bool
    serial: Annotated[str, Bounds(max_len=20)]


@dataclass(frozen=True, slots=True)
class RngState:
    """The entropy device keeps nothing across a snapshot."""


#: the device types' own records; their shapes differ, so a parse can only fit one
Specific = ConsoleState | BlockState | RngState | NetState


@dataclass(frozen=True, slots=True)
class DeviceState:
    """The transport-independent part of a virtio device (§2.1 status aside)."""

    type: U16
    acked_features: U64
    active: bool
    queues: Annotated[tuple[QueueState | None, ...], Bounds(max_len=MAX_QUEUES)]
    specific: Specific


@dataclass(frozen=True, slots=True)
class QueueRegsState:
    """What the driver wrote into one queue's virtio-mmio registers (§4.2.2)."""

    num: U32
    desc: U64
    driver: U64
    device: U64
    ready: bool


@dataclass(frozen=True, slots=True)
class TransportState:
    """A virtio-mmio register window (§4.2.2) and the device behind it."""

    status: Annotated[int, Bounds(lo=0, hi=0xFF)]
    device_features_sel: U32
    driver_features_sel: U32
    driver_features: U64
    unknown_features_written: bool
    queue_sel: U32
    shm_sel: U32
    interrupt_status: Annotated[int, Bounds(lo=0, hi=0x3)]
    config_generation: U32
    needs_reset_reason: Reason | None
    queues: Annotated[tuple[QueueRegsState, ...], Bounds(max_len=MAX_QUEUES)]
    device: DeviceState
