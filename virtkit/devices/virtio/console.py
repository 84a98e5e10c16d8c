"""virtio-console (virtio 1.2 §5.3), a single port: receiveq 0 and transmitq 1 (§5.3.2).

Bytes the guest transmits go to a host callable (``output``), streamed in bounded pieces so that
a huge transmit buffer never turns into one huge host allocation. Host input (``receive``) waits in
a bounded buffer until the driver has posted receive buffers, and is copied into them in order.
VIRTIO_CONSOLE_F_EMERG_WRITE is offered: a write to ``emerg_wr`` in the configuration space prints
one byte even before the queues exist (§5.3.5.1). With a ``size``, VIRTIO_CONSOLE_F_SIZE is
offered and :meth:`ConsoleDevice.resize` announces a new size with a configuration change (§5.3.6).

A receive buffer that is device-readable, or a transmit buffer that is device-writable, breaks
§5.3.6.1: that request is returned unused (length 0) and counted in ``failed_requests``.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Final

from virtkit.devices.virtio import spec
from virtkit.devices.virtio.device import VirtioDevice
from virtkit.devices.virtio.queue import DescriptorChain, VirtQueue
from virtkit.errors import DeviceError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtkit.devices.virtio.persist import ConsoleState

log = logging.getLogger(__name__)

F_SIZE: Final = 1 << 0
F_MULTIPORT: Final = 1 << 1
F_EMERG_WRITE: Final = 1 << 2

RECEIVEQ: Final = 0
TRANSMITQ: Final = 1

#: struct virtio_console_config { le16 cols; le16 rows; le32 max_nr_ports; le32 emerg_wr; } (§5.3.4)
CONFIG: Final = struct.Struct("<HHII")
EMERG_WR_OFFSET: Final = 8
#: host input kept while the guest has no receive buffers; beyond it, input is dropped and counted
INPUT_LIMIT: Final = 64 * 1024
#: largest single piece handed to the output callable
OUTPUT_CHUNK: Final = 64 * 1024
DEFAULT_QUEUE_SIZE: Final = 256


class ConsoleDevice(VirtioDevice):
    """A virtio console (hvc0 in a Linux guest)."""

    device_type = spec.DeviceType.CONSOLE

    def __init__(
        self,
        output: Callable[[bytes], None],
        *,
        size: tuple[int, int] | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        input_limit: int = INPUT_LIMIT,
    ) -> None:
        """``output`` receives what the guest writes; ``size`` is (columns, rows) if known."""
        super().__init__([queue_size, queue_size], F_EMERG_WRITE | (F_SIZE if size is not None else 0))
        self._output = output
        self._size = size or (0, 0)
        self._input = bytearray()
        self.input_limit = input_limit
        self.bytes_in = self.bytes_out = 0
        self.input_dropped = 0

    # --- host side ---------------------------------------------------------------------------------
    def receive(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes were accepted (the rest is dropped
        when the guest does not read and the buffer is full). Safe from any thread."""
        with self.lock:
            room = max(0, self.input_limit - len(self._input))
            accepted = data[:room]
            self._input += accepted
            self.input_dropped += len(data) - len(accepted)
            try:
                self.notify(RECEIVEQ)
            except Exception as e:  # noqa: BLE001 - a host thread must not die of a guest's ring
                self.events.internal_error(e)
            return len(accepted)

    def resize(self, cols: int, rows: int) -> None:
        """The host terminal changed size: update the configuration and tell the driver."""
        with self.lock:
            self._size = (cols & 0xFFFF, rows & 0xFFFF)
            self.events.signal_config()

    @property
    def pending_input(self) -> int:
        return len(self._input)

    # --- guest side --------------------------------------------------------------------------------
    def config_space(self) -> bytes:
        return CONFIG.pack(self._size[0], self._size[1], 0, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        if offset == EMERG_WR_OFFSET and data:
            self._emit(data[:1])  # the lower byte written to emerg_wr (§5.3.5.1)

    def process_queue(self, index: int, queue: VirtQueue) -> None:
        if index == RECEIVEQ:
            self.drain(index, queue, self._fill_receive, more=lambda: bool(self._input))
        else:
            self.drain(index, queue, self._transmit)

    def _fill_receive(self, chain: DescriptorChain) -> int:
        if chain.fault is not None or chain.readable:
            self.request_failed(chain.fault or "device-readable buffer in the receiveq (§5.3.6.1)")
            return 0
        count = min(len(self._input), chain.writable_len)
        chain.write(memoryview(self._input)[:count])
        del self._input[:count]
        self.bytes_in += count
        return count

    def _transmit(self, chain: DescriptorChain) -> int:
        if chain.fault is not None or chain.writable:
            self.request_failed(chain.fault or "device-writable buffer in the transmitq (§5.3.6.1)")
            return 0
        for piece in chain.iter_readable(OUTPUT_CHUNK):
            self._emit(piece)
        return 0  # nothing written into the chain

    def _emit(self, data: bytes) -> None:
        try:
            self._output(data)
        except OSError as e:  # a closed terminal or pipe: the guest's output is lost, not the VMM
            log.warning("virtio-console output failed: %s", e)
        self.bytes_out += len(data)

    def save_device(self) -> ConsoleState:
        from virtkit.devices.virtio.persist import ConsoleState

        return ConsoleState(cols=self._size[0], rows=self._size[1], input=bytes(self._input))

    def restore_device(self, state: object) -> None:
        from virtkit.devices.virtio.persist import ConsoleState

        if not isinstance(state, ConsoleState):
            raise DeviceError(f"saved console state is a {type(state).__name__}, not a console's")
        if len(state.input) > self.input_limit:
            raise DeviceError(
                f"saved console input is {len(state.input)} bytes, more than the {self.input_limit} this console holds"
            )
        self._size = (state.cols, state.rows)
        self._input = bytearray(state.input)
