"""virtio-blk (virtio 1.2 §5.2) over a raw image file.

One request queue. Each request is a chain whose device-readable part is the 16-byte header
(``le32 type; le32 reserved; le64 sector``, §5.2.6) followed, for a write, by the data, and whose
device-writable part is, for a read or GET_ID, the data, followed by the one status byte. The
device never assumes how that is cut into descriptors (§2.7.4.1).

Requests that cannot be carried out complete with VIRTIO_BLK_S_IOERR (or UNSUPP for an unknown
type) and the queue goes on: data in the wrong direction (a read whose data buffers are
device-readable, a write whose data is device-writable), a length that is not whole sectors,
anything past the end of the image, any write on a read-only device (§5.2.6.2), host I/O errors,
and chains whose buffers are bad (outside guest RAM...). The status byte is written only if the
chain's last writable buffer is real guest RAM.
"""

from __future__ import annotations

import os
import struct
from typing import Final

from virtkit.devices.disk import SECTOR_SIZE, RawImage
from virtkit.devices.virtio import spec
from virtkit.devices.virtio.device import VirtioDevice
from virtkit.devices.virtio.queue import ChainError, DescriptorChain, VirtQueue
from virtkit.errors import DeviceError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtkit.devices.virtio.persist import BlockState

# feature bits (§5.2.3)
F_SIZE_MAX: Final = 1 << 1
F_SEG_MAX: Final = 1 << 2
F_RO: Final = 1 << 5
F_BLK_SIZE: Final = 1 << 6
F_FLUSH: Final = 1 << 9

# request types (§5.2.6)
T_IN: Final = 0
T_OUT: Final = 1
T_FLUSH: Final = 4
T_GET_ID: Final = 8

# status byte values (§5.2.6)
S_OK: Final = 0
S_IOERR: Final = 1
S_UNSUPP: Final = 2

HEADER: Final = struct.Struct("<IIQ")  # struct virtio_blk_req up to data[] (§5.2.6)
#: size_max (§5.2.4): the largest data segment a request may have. With seg_max it bounds what one
#: request moves (seg_max * SIZE_MAX, 31.75 MiB with 256-entry queues); Linux honours it as the
#: queue's max_segment_size. Chains describing more are failed requests (queue.py).
SIZE_MAX: Final = 128 << 10
#: VIRTIO_BLK_T_GET_ID data is exactly this long: a NUL-padded ASCII string (§5.2.6, §5.2.6.1)
ID_BYTES: Final = 20
#: struct virtio_blk_config up to num_queues (§5.2.4); the later fields belong to features not offered
CONFIG: Final = struct.Struct("<QII HBB I BBHI BBH")
DEFAULT_QUEUE_SIZE: Final = 256


class BlockDevice(VirtioDevice):
    """A virtio-blk disk backed by a raw image (see :class:`RawImage` for the errors it raises)."""

    device_type = spec.DeviceType.BLOCK

    def __init__(
        self,
        path: str | os.PathLike[str] | RawImage,
        *,
        read_only: bool = False,
        serial: str | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        """``path`` is an image file to open, or an already open :class:`RawImage` shared with
        other front ends (the machine's block hypercalls): the device then does not own it, and
        ``read_only`` follows the image. ``serial`` is what VIRTIO_BLK_T_GET_ID returns
        (/sys/block/vda/serial in Linux); ASCII, at most 20 bytes; the image's file name by default."""
        self._owns_image = not isinstance(path, RawImage)
        self.image = RawImage(path, read_only=read_only) if not isinstance(path, RawImage) else path
        read_only = self.image.read_only
        features = F_FLUSH | F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | (F_RO if read_only else 0)
        try:
            super().__init__([queue_size], features)
        except BaseException:
            if self._owns_image:
                self.image.close()
            raise
        name = self.image.path.name if serial is None else serial
        self.serial = name.encode("ascii", "replace")[:ID_BYTES]
        self.read_only = read_only
        # header, seg_max data segments of at most SIZE_MAX, status byte
        self.max_request_bytes = HEADER.size + max(queue_size - 2, 1) * SIZE_MAX + 1
        self.reads = self.writes = self.flushes = 0
        self.io_errors = 0

    def close(self) -> None:
        if self._owns_image:
            self.image.close()

    def config_space(self) -> bytes:
        # seg_max: a request's data segments plus header and status must fit in one chain of at most
        # Queue Size descriptors (§2.7.5.3.1), which is why it is the queue size minus 2.
        seg_max = self.queue_max_sizes[0] - 2
        return CONFIG.pack(self.image.sectors, SIZE_MAX, seg_max, 0, 0, 0, SECTOR_SIZE, 0, 0, 0, 0, 0, 0, 1)

    def process_queue(self, index: int, queue: VirtQueue) -> None:
        self.drain(index, queue, self._request)

    # --- one request ------------------------------------------------------------------------------
    def _request(self, chain: DescriptorChain) -> int:
        """Carry out one request; returns the used length (§2.7.8): the whole writable part when
        everything was written, otherwise an underestimate."""
        if chain.fault is not None:
            self.request_failed(chain.fault)
            return self._complete(chain, S_IOERR)
        if not chain.writable:
            self.request_failed("request without a device-writable status byte")
            return 0
        try:
            rtype, _, sector = HEADER.unpack(chain.read(HEADER.size))
        except ChainError as e:
            self.request_failed(f"no readable request header: {e}")
            return self._complete(chain, S_IOERR)
        written = 0
        try:
            if rtype == T_IN:
                status, written = self._read(chain, sector)
            elif rtype == T_OUT:
                status = self._write(chain, sector)
            elif rtype == T_FLUSH:
                status = self._flush()
            elif rtype == T_GET_ID:
                status, written = self._get_id(chain)
            else:
                status = S_UNSUPP
        except ChainError as e:
            self.request_failed(str(e))
            status, written = S_IOERR, 0
        except OSError as e:
            self.io_errors += 1
            self.request_failed(f"host I/O error on {self.image.path}: {e.strerror}")
            status, written = S_IOERR, 0
        return self._complete(chain, status, written)

    @staticmethod
    def _complete(chain: DescriptorChain, status: int, written: int = 0) -> int:
        """Store the status byte; ``written`` data bytes went to the start of the writable part."""
        if not chain.write_status(status):
            return 0
        # The used length counts bytes written from the start of the writable part (§2.7.8): the
        # status byte only counts when it directly follows the data; otherwise underestimate.
        return written + 1 if written + 1 == chain.writable_len else written

    def _range(self, sector: int, length: int) -> int | None:
        """Byte offset of ``length`` bytes at ``sector`` if they are whole sectors inside the image."""
        if length % SECTOR_SIZE:
            self.request_failed(f"data length {length} is not a multiple of {SECTOR_SIZE} (§5.2.6.1)")
            return None
        offset = sector * SECTOR_SIZE
        if offset + length > self.image.size:
            self.request_failed(
                f"sectors {sector}+{length // SECTOR_SIZE} are past the end of the disk ({self.image.sectors} sectors)"
            )
            return None
        return offset

    def _read(self, chain: DescriptorChain, sector: int) -> tuple[int, int]:
        # readable: exactly the header; writable: data + status
        if chain.readable_len != HEADER.size:
            self.request_failed("read request with device-readable data buffers")
            return S_IOERR, 0
        length = chain.writable_len - 1
        offset = self._range(sector, length)
        if offset is None:
            return S_IOERR, 0
        self.image.read_into(offset, chain.writable_views(0, length))
        self.reads += 1
        return S_OK, length

    def _write(self, chain: DescriptorChain, sector: int) -> int:
        # readable: header + data; writable: the status byte only
        if self.read_only:
            return S_IOERR  # §5.2.6.2: IOERR for any write when VIRTIO_BLK_F_RO was offered, no data written
        if chain.writable_len != 1:
            self.request_failed("write request with device-writable data buffers")
            return S_IOERR
        length = chain.readable_len - HEADER.size
        offset = self._range(sector, length)
        if offset is None:
            return S_IOERR
        self.image.write_from(offset, chain.readable_views(HEADER.size, length))
        if not self.has_feature(F_FLUSH):
            # Without a negotiated FLUSH, a completed write must already be stable (§5.2.6.2 case 1).
            self.image.flush()
        self.writes += 1
        return S_OK

    def _flush(self) -> int:
        self.image.flush()
        self.flushes += 1
        return S_OK

    def _get_id(self, chain: DescriptorChain) -> tuple[int, int]:
        if chain.writable_len - 1 != ID_BYTES:
            self.request_failed(f"GET_ID data is {chain.writable_len - 1} bytes, not {ID_BYTES} (§5.2.6.1)")
            return S_IOERR, 0
        return S_OK, chain.write(self.serial.ljust(ID_BYTES, b"\0"))

    # --- persistence --------------------------------------------------------------------------------
    def save_device(self) -> BlockState:
        # the image's contents are the image; what is saved lets restore check it is the same disk
        from virtkit.devices.virtio.persist import BlockState

        return BlockState(
            path=str(self.image.path),
            sectors=self.image.sectors,
            read_only=self.read_only,
            serial=self.serial.decode("ascii"),
        )

    def restore_device(self, state: object) -> None:
        from virtkit.devices.virtio.persist import BlockState

        if not isinstance(state, BlockState):
            raise DeviceError(f"saved virtio-blk state is a {type(state).__name__}, not a disk's")
        if state.sectors != self.image.sectors or state.read_only != self.read_only:
            raise DeviceError(
                f"disk image {self.image.path} does not match the saved disk "
                f"({state.sectors} sectors, read_only={state.read_only})"
            )
