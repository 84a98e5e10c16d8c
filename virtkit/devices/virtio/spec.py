"""Numbers from the virtio 1.2 specification (OASIS, virtio-v1.2-cs01), in one place.

Every constant names the section it comes from. Nothing here has behaviour: the queue, the
transport and the devices import these instead of repeating a magic number.
"""

from __future__ import annotations

import enum
from typing import Final


class DeviceStatus(enum.IntFlag):
    """The device status field (§2.1), in the order a driver normally sets the bits (§3.1.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    #: set by the device when it hit an error it cannot recover from without a reset (§2.1.2)
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class DeviceType(enum.IntEnum):
    """Virtio device IDs (§5: §5.2.1 block, §5.3.1 console, §5.4.1 entropy)."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4


# --- device-independent feature bits (§6 "Reserved Feature Bits") ------------------------------
#: VIRTQ_DESC_F_INDIRECT may be used (§2.7.5.3); called VIRTIO_RING_F_INDIRECT_DESC before 1.1
F_INDIRECT_DESC: Final = 1 << 28
#: used_event / avail_event replace the ring flags for notification suppression (§2.7.7, §2.7.10)
F_EVENT_IDX: Final = 1 << 29
#: compliance with virtio 1.x: a modern (non-legacy) driver MUST accept it (§6)
F_VERSION_1: Final = 1 << 32
F_ACCESS_PLATFORM: Final = 1 << 33
F_RING_PACKED: Final = 1 << 34
F_IN_ORDER: Final = 1 << 35
F_NOTIFICATION_DATA: Final = 1 << 38
F_RING_RESET: Final = 1 << 40

# --- split virtqueue layout (§2.7) -------------------------------------------------------------
#: Queue Size is a power of 2 and at most 32768 (§2.7)
MAX_QUEUE_SIZE: Final = 32768
#: minimum alignment of each part (§2.7, table "Virtqueue Part / Alignment / Size")
DESC_TABLE_ALIGN: Final = 16
AVAIL_RING_ALIGN: Final = 2
USED_RING_ALIGN: Final = 4
#: struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; } (§2.7.5)
DESC_SIZE: Final = 16
#: struct virtq_used_elem { le32 id; le32 len; } (§2.7.8)
USED_ELEM_SIZE: Final = 8
#: a descriptor chain may not describe more than 2^32 bytes in total (§2.7.5.2)
MAX_CHAIN_BYTES: Final = 1 << 32


def desc_table_size(queue_size: int) -> int:
    return DESC_SIZE * queue_size


def avail_ring_size(queue_size: int) -> int:
    # flags, idx, ring[queue_size], used_event: 6 + 2 * Queue Size (§2.7)
    return 6 + 2 * queue_size


def used_ring_size(queue_size: int) -> int:
    # flags, idx, ring[queue_size] of 8-byte elements, avail_event: 6 + 8 * Queue Size (§2.7)
    return 6 + USED_ELEM_SIZE * queue_size


class DescFlag(enum.IntFlag):
    """virtq_desc.flags (§2.7.5)."""

    NEXT = 1
    WRITE = 2
    INDIRECT = 4


#: avail.flags bit: the driver does not want used buffer notifications (§2.7.7)
VIRTQ_AVAIL_F_NO_INTERRUPT: Final = 1
#: used.flags bit: the device does not want available buffer notifications (§2.7.10)
VIRTQ_USED_F_NO_NOTIFY: Final = 1


class InterruptReason(enum.IntFlag):
    """Bits of the virtio-mmio InterruptStatus register (§4.2.2)."""

    USED_BUFFER = 1
    CONFIG_CHANGE = 2


def feature_bits(features: int) -> list[int]:
    """The bit numbers set in ``features``, for messages and logs."""
    return [bit for bit in range(features.bit_length()) if features >> bit & 1]
