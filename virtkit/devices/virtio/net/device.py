"""virtio-net (virtio 1.2 §5.1): one receive queue (0) and one transmit queue (1), a MAC address and
a link status in the configuration space, frames to and from a host :class:`FrameBackend` (a TAP
device, ``tap.py``).

Features offered: VIRTIO_NET_F_MAC and VIRTIO_NET_F_STATUS (plus VERSION_1, INDIRECT_DESC and
EVENT_IDX, which every virtkit device offers). No checksum or segmentation offload is offered, in
either direction: every frame is a plain Ethernet frame of at most :data:`MAX_FRAME` bytes, so the
``virtio_net_hdr`` (§5.1.6, 12 bytes with VERSION_1) carries nothing. MRG_RXBUF is not offered:
each received frame goes into one receive chain (§5.1.6.3.1 asks the driver for buffers of at
least 1526 bytes in that case; Linux posts 1518 + 12).

The guest is hostile: a transmit chain must be device-readable only, hold a header and a frame of
14 to MAX_FRAME bytes, and have a header that asks for no offload the device did not offer; a
receive chain must be device-writable only (§5.1.6.3.1, §5.1.6.2.1). Anything else is a failed
request (returned with length 0, counted), and the queue goes on. Chains describing more than
:data:`MAX_CHAIN` bytes are faulted by the queue itself (queue.py).

Frames from the host that arrive while the driver has posted no receive buffers wait in a bounded
backlog (:data:`RX_BACKLOG` frames, about 380 KiB at most); when it is full, the newest frame is
dropped and counted, as a NIC drops on a full ring. The backend's fd is always read to the end, so
a guest that never posts buffers cannot make the I/O thread spin. Frames that arrive while the
driver has not set DRIVER_OK are dropped.
"""

from __future__ import annotations

import collections
import logging
import struct
from typing import Final, Protocol

from virtkit.devices.virtio import spec
from virtkit.devices.virtio.device import VirtioDevice
from virtkit.devices.virtio.queue import DescriptorChain, VirtQueue
from virtkit.errors import DeviceError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtkit.devices.virtio.net.persist import NetState

log = logging.getLogger(__name__)

# feature bits (§5.1.3)
F_CSUM: Final = 1 << 0
F_GUEST_CSUM: Final = 1 << 1
F_MAC: Final = 1 << 5
F_MRG_RXBUF: Final = 1 << 15
F_STATUS: Final = 1 << 16

#: config status bit (§5.1.4)
S_LINK_UP: Final = 1

RECEIVEQ: Final = 0
TRANSMITQ: Final = 1

#: struct virtio_net_hdr with VERSION_1 (§5.1.6): flags, gso_type, hdr_len, gso_size, csum_start,
#: csum_offset, num_buffers
HEADER: Final = struct.Struct("<BBHHHHH")
HDR_F_NEEDS_CSUM: Final = 1
GSO_NONE: Final = 0
#: struct virtio_net_config up to status (§5.1.4): the later fields need features not offered
CONFIG: Final = struct.Struct("<6sH")

ETH_HEADER: Final = 14
#: the largest frame without offloads: 1500 bytes of payload, the Ethernet header and one VLAN tag
MAX_FRAME: Final = 1500 + ETH_HEADER + 4
#: the most one chain may describe in all: a receive buffer up to 64 KiB and its header is sane (a
#: driver expecting big packets posts such); anything bigger is a faulted request (queue.py)
MAX_CHAIN: Final = HEADER.size + 64 * 1024
#: frames held for a driver with no receive buffers posted
RX_BACKLOG: Final = 256
#: frames taken from the backend in one call, so one busy TAP cannot hold the device lock forever
RX_BUDGET: Final = 64
DEFAULT_QUEUE_SIZE: Final = 256


class FrameBackend(Protocol):
    """Where frames go and come from (the TAP device; a list in the unit tests)."""

    def send(self, frame: bytes) -> bool:
        """Hand one Ethernet frame to the host; False if it was dropped (host queue full...)."""

    def recv(self) -> bytes | None:
        """The next frame from the host, or None when there is none now (never blocks)."""

    def close(self) -> None:
        """Release the host side (remove the TAP). Idempotent."""


def parse_mac(text: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` as 6 bytes; DeviceError unless it is a unicast address."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts):
        raise DeviceError(f"MAC address {text!r} is not six hex pairs like 02:76:6b:00:00:01")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise DeviceError(f"MAC address {text} is a multicast address: the low bit of the first byte must be 0")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class NetDevice(VirtioDevice):
    """A virtio network card whose frames go to and come from ``backend``."""

    device_type = spec.DeviceType.NET
    max_request_bytes = MAX_CHAIN

    def __init__(
        self,
        backend: FrameBackend,
        mac: bytes,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        rx_backlog: int = RX_BACKLOG,
    ) -> None:
        if len(mac) != 6 or mac[0] & 1:
            raise DeviceError(f"virtio-net needs a 6-byte unicast MAC address, got {mac.hex(':')}")
        super().__init__([queue_size, queue_size], F_MAC | F_STATUS)
        self.backend = backend
        self.mac = bytes(mac)
        self.link_up = True
        self._backlog: collections.deque[bytes] = collections.deque()
        self.rx_backlog = rx_backlog
        self.rx_frames = self.tx_frames = 0
        self.rx_bytes = self.tx_bytes = 0
        #: frames from the host dropped: backlog full, device not live, or larger than MAX_FRAME
        self.rx_dropped = 0
        #: take the MAC of a restored state instead of refusing a different one: for a card whose
        #: MAC nobody chose (a migration receiver's, built before the VM arrives)
        self.adopt_saved_mac = False
        #: frames from the guest the backend did not take (its queue full, host error)
        self.tx_dropped = 0

    # --- host side -----------------------------------------------------------------------------------
    def backend_readable(self) -> None:
        """The backend has frames: take up to RX_BUDGET of them and deliver what the driver has
        buffers for. Runs on the I/O thread; safe from any thread."""
        with self.lock:
            for _ in range(RX_BUDGET):
                frame = self.backend.recv()
                if frame is None:
                    break
                self._accept(frame)
            if self._backlog:
                try:
                    self.notify(RECEIVEQ)
                except Exception as e:  # noqa: BLE001 - a host thread must not die of a guest's ring
                    self.events.internal_error(e)

    def _accept(self, frame: bytes) -> None:
        usable = self.active and ETH_HEADER <= len(frame) <= MAX_FRAME
        if usable and len(self._backlog) < self.rx_backlog:
            self._backlog.append(frame)
        else:  # not live, not a frame we could deliver, or the backlog is full: dropped
            self.rx_dropped += 1

    @property
    def pending_frames(self) -> int:
        return len(self._backlog)

    def close(self) -> None:
        self.backend.close()

    # --- guest side ----------------------------------------------------------------------------------
    def config_space(self) -> bytes:
        return CONFIG.pack(self.mac, S_LINK_UP if self.link_up else 0)

    def on_reset(self) -> None:
        self._backlog.clear()

    def process_queue(self, index: int, queue: VirtQueue) -> None:
        if index == RECEIVEQ:
            self.drain(index, queue, self._receive, more=lambda: bool(self._backlog))
        else:
            self.drain(index, queue, self._transmit)

    def _receive(self, chain: DescriptorChain) -> int:
        """Put the oldest waiting frame, after its header, into a receive chain (§5.1.6.4)."""
        if chain.fault is not None or chain.readable or not chain.writable:
            self.request_failed(chain.fault or "receive buffer that is not only device-writable (§5.1.6.3.1)")
            return 0
        frame = self._backlog.popleft()
        if HEADER.size + len(frame) > chain.writable_len:
            # the driver's buffers are too small for this frame: it is lost, the buffer goes back empty
            self.rx_dropped += 1
            self.request_failed(
                f"receive buffer of {chain.writable_len} bytes is too small for a {len(frame)}-byte frame (§5.1.6.3.1)"
            )
            return 0
        # §5.1.6.4: no offload negotiated, so flags 0 and GSO_NONE; num_buffers is 1 without MRG_RXBUF
        written = chain.write(HEADER.pack(0, GSO_NONE, 0, 0, 0, 0, 1))
        written += chain.write(frame, HEADER.size)
        self.rx_frames += 1
        self.rx_bytes += len(frame)
        return written

    def _transmit(self, chain: DescriptorChain) -> int:
        """Send one frame from a transmit chain (§5.1.6.2); transmit buffers get length 0 back."""
        if chain.fault is not None or chain.writable:
            self.request_failed(chain.fault or "transmit buffer with device-writable parts (§5.1.6.2.1)")
            return 0
        length = chain.readable_len - HEADER.size
        if not ETH_HEADER <= length <= MAX_FRAME:
            self.request_failed(
                f"transmit frame of {length} bytes is not an Ethernet frame of {ETH_HEADER} to {MAX_FRAME} bytes"
            )
            return 0
        flags, gso_type, *_ = HEADER.unpack(chain.read(HEADER.size))
        if flags & HDR_F_NEEDS_CSUM or gso_type != GSO_NONE:
            # §5.1.6.2.1: the driver must not ask for an offload that was not negotiated
            self.request_failed(f"transmit header asks for an offload not negotiated (flags {flags}, gso {gso_type})")
            return 0
        frame = chain.read(length, HEADER.size)
        if self.backend.send(frame):
            self.tx_frames += 1
            self.tx_bytes += length
        else:
            self.tx_dropped += 1
        return 0

    # --- persistence -----------------------------------------------------------------------------------
    def save_device(self) -> NetState:
        # Frames in the backlog are not saved: a network may lose frames, and a restored VM's peers
        # retransmit as they would after any loss. What is saved identifies the card.
        from virtkit.devices.virtio.net.persist import NetState

        return NetState(mac=format_mac(self.mac), link_up=self.link_up)

    def restore_device(self, state: object) -> None:
        from virtkit.devices.virtio.net.persist import NetState

        if not isinstance(state, NetState):
            raise DeviceError(f"saved virtio-net state is a {type(state).__name__}, not a network card's")
        try:
            mac = parse_mac(state.mac)
        except DeviceError as e:
            raise DeviceError(f"saved virtio-net state: {e}") from None
        if mac != self.mac and self.adopt_saved_mac:
            self.mac = mac
        elif mac != self.mac:
            raise DeviceError(
                f"saved network card has MAC {state.mac}, this one {format_mac(self.mac)}: "
                "give the same mac= to --net when restoring"
            )
        self.link_up = state.link_up
        self._backlog.clear()
