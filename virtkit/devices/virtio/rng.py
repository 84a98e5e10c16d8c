"""virtio-rng, the entropy device (virtio 1.2 §5.4): one request queue of device-writable buffers,
filled from the host's ``os.urandom``.

At most ``max_request`` bytes go into one buffer (§5.4.6.2 lets the device use less than the whole
buffer), so a guest posting huge buffers cannot make the host generate and copy gigabytes per
request. A buffer with device-readable parts breaks §5.4.6.1 and is returned with length 0.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final

from virtkit.devices.virtio import spec
from virtkit.devices.virtio.device import VirtioDevice
from virtkit.devices.virtio.queue import DescriptorChain, VirtQueue
from virtkit.errors import DeviceError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtkit.devices.virtio.persist import RngState

MAX_REQUEST: Final = 64 * 1024
DEFAULT_QUEUE_SIZE: Final = 256


class RngDevice(VirtioDevice):
    """A virtio entropy source (/dev/hwrng in a Linux guest)."""

    device_type = spec.DeviceType.ENTROPY
    #: any buffer size is fine: the device fills at most ``max_request`` bytes of it
    max_request_bytes = spec.MAX_CHAIN_BYTES

    def __init__(
        self,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_request: int = MAX_REQUEST,
        source: Callable[[int], bytes] = os.urandom,
    ) -> None:
        super().__init__([queue_size])
        self.max_request = max_request
        self._source = source
        self.bytes_out = 0

    def process_queue(self, index: int, queue: VirtQueue) -> None:
        self.drain(index, queue, self._fill)

    def _fill(self, chain: DescriptorChain) -> int:
        if chain.fault is not None or chain.readable or not chain.writable:
            self.request_failed(chain.fault or "entropy request without only device-writable buffers (§5.4.6.1)")
            return 0
        count = min(chain.writable_len, self.max_request)
        written = chain.write(self._source(count))
        self.bytes_out += written
        return written

    def save_device(self) -> RngState:
        from virtkit.devices.virtio.persist import RngState

        return RngState()

    def restore_device(self, state: object) -> None:
        from virtkit.devices.virtio.persist import RngState

        if not isinstance(state, RngState):
            raise DeviceError(f"saved entropy device state is a {type(state).__name__}, not an entropy device's")
