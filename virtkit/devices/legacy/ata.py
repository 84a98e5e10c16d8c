"""ATA/IDE disk controller, primary channel, PIO mode: what unmodified drivers know.

Ports 0x1F0-0x1F7 (command block) and 0x3F6 (control block), IRQ 14, one master drive.
Register semantics and the PIO data-in / data-out protocols follow ATA/ATAPI-6 (T13 1410D)
§7 (register descriptions), §8 (commands used: IDENTIFY DEVICE 8.15, READ SECTORS 8.27,
READ SECTOR(S) EXT 8.28, WRITE SECTORS 8.62, WRITE SECTOR(S) EXT 8.63, FLUSH CACHE 8.12/8.13,
SET FEATURES 8.37) and §9.5 (PIO protocols). Only LBA addressing is offered.

A sector moves per exit: ``rep insw``/``rep outsw`` of 256 words arrives as one string-I/O exit
and is served by :meth:`pio_read_string` / :meth:`pio_write_string`.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

from virtkit.devices.contract import Persistent, StringPio
from virtkit.devices.disk import SECTOR_SIZE, RawImage
from virtkit.errors import DeviceError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

    from virtkit.devices.legacy.persist import AtaState

CMD_BASE: Final = 0x1F0
CTRL_PORT: Final = 0x3F6
IRQ: Final = 14

# command block register offsets
DATA, ERROR_FEATURES, SECTOR_COUNT, LBA_LOW, LBA_MID, LBA_HIGH, DEVICE, STATUS_COMMAND = range(8)

ST_ERR, ST_DRQ, ST_DSC, ST_DF, ST_DRDY, ST_BSY = 0x01, 0x08, 0x10, 0x20, 0x40, 0x80
ER_ABRT, ER_IDNF = 0x04, 0x10
DEV_LBA, DEV_SLAVE = 0x40, 0x10
CTL_NIEN, CTL_SRST = 0x02, 0x04

CMD_READ_SECTORS, CMD_READ_SECTORS_EXT = 0x20, 0x24
CMD_WRITE_SECTORS, CMD_WRITE_SECTORS_EXT = 0x30, 0x34
CMD_FLUSH_CACHE, CMD_FLUSH_CACHE_EXT = 0xE7, 0xEA
CMD_IDENTIFY, CMD_SET_FEATURES = 0xEC, 0xEF
CMD_INITIALIZE_PARAMS, CMD_RECALIBRATE = 0x91, 0x10


def _ata_string(text: str, words: int) -> list[int]:
    """ATA strings are space padded with the two bytes of each word swapped (§7.16.7.3)."""
    raw = text.encode("ascii").ljust(words * 2)[: words * 2]
    return [(raw[i] << 8) | raw[i + 1] for i in range(0, len(raw), 2)]


class AtaController(StringPio, Persistent):
    """Register as two windows: the command block (8 ports) and the control port (offset 8)."""

    def __init__(self, disk: RawImage | None, set_irq: Callable[[int], None]) -> None:
        self.disk = disk
        self._set_irq = set_irq
        self._lock = threading.Lock()
        self.features = self.count = self.lba_low = self.lba_mid = self.lba_high = 0
        self.hob = [0, 0, 0, 0]  # previous count, lba low/mid/high (48-bit "high order bytes")
        self.device = 0xA0
        self.status = ST_DRDY | ST_DSC if disk else 0
        self.error = 0
        self.control = 0
        self.buffer = bytearray()
        self.pos = 0
        self.remaining = 0  # sectors still to transfer after the one in the buffer
        self.lba = 0
        self.writing = False
        self._irq_level = 0
        self.sectors_read = self.sectors_written = 0

    # --- port access -----------------------------------------------------------------------------
    def pio_read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == DATA:
                return int.from_bytes(self._take(size), "little")
            if offset == 8:  # alternate status: like status, without acknowledging the interrupt
                return self._status()
            if offset == STATUS_COMMAND:
                self._irq(0)
                return self._status()
            if not self._present():
                return 0
            return {
                ERROR_FEATURES: self.error,
                SECTOR_COUNT: self.count,
                LBA_LOW: self.lba_low,
                LBA_MID: self.lba_mid,
                LBA_HIGH: self.lba_high,
                DEVICE: self.device,
            }.get(offset, 0xFF)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset == DATA:
                self._put(value.to_bytes(size, "little"))
            elif offset == 8:
                self._write_control(value & 0xFF)
            elif offset == DEVICE:
                self.device = value & 0xFF
            elif offset == STATUS_COMMAND:
                self._command(value & 0xFF)
            elif offset in (ERROR_FEATURES, SECTOR_COUNT, LBA_LOW, LBA_MID, LBA_HIGH):
                self._write_taskfile(offset, value & 0xFF)

    def pio_read_string(self, offset: int, size: int, count: int) -> bytes:
        with self._lock:
            if offset != DATA:
                return bytes([self._status() if offset in (8, STATUS_COMMAND) else 0xFF]) * (size * count)
            out = bytearray()
            while len(out) < size * count:
                chunk = self._take(size * count - len(out))
                if not chunk:
                    break
                out += chunk
            return bytes(out).ljust(size * count, b"\xff")

    def pio_write_string(self, offset: int, size: int, data: bytes) -> None:
        with self._lock:
            if offset == DATA:
                view = memoryview(data)
                while view:
                    used = self._put(view)
                    if not used:
                        break
                    view = view[used:]

    # --- registers -------------------------------------------------------------------------------
    def _present(self) -> bool:
        return self.disk is not None and not self.device & DEV_SLAVE

    def _status(self) -> int:
        return self.status if self._present() else 0

    def _write_taskfile(self, offset: int, value: int) -> None:
        if offset == ERROR_FEATURES:
            self.features = value
            return
        index = offset - SECTOR_COUNT
        self.hob[index] = (self.count, self.lba_low, self.lba_mid, self.lba_high)[index]
        if offset == SECTOR_COUNT:
            self.count = value
        elif offset == LBA_LOW:
            self.lba_low = value
        elif offset == LBA_MID:
            self.lba_mid = value
        else:
            self.lba_high = value

    def _write_control(self, value: int) -> None:
        if value & CTL_SRST and not self.control & CTL_SRST:
            self._reset()
        self.control = value
        if value & CTL_NIEN:
            self._irq(0)

    def _reset(self) -> None:
        self.status = ST_DRDY | ST_DSC if self.disk else 0
        self.error = 0x01  # diagnostic: device 0 passed
        self.buffer, self.pos, self.remaining = bytearray(), 0, 0
        self.count, self.lba_low, self.lba_mid, self.lba_high = 1, 1, 0, 0

    def _irq(self, level: int) -> None:
        if level and self.control & CTL_NIEN:
            level = 0
        if level != self._irq_level:
            self._irq_level = level
            self._set_irq(level)

    # --- commands --------------------------------------------------------------------------------
    def _command(self, cmd: int) -> None:
        if not self._present():
            return
        self.error = 0
        self.status = ST_DRDY | ST_DSC
        if cmd in (CMD_READ_SECTORS, CMD_READ_SECTORS_EXT, CMD_WRITE_SECTORS, CMD_WRITE_SECTORS_EXT):
            ext = cmd in (CMD_READ_SECTORS_EXT, CMD_WRITE_SECTORS_EXT)
            self._start_transfer(write=cmd in (CMD_WRITE_SECTORS, CMD_WRITE_SECTORS_EXT), ext=ext)
        elif cmd == CMD_IDENTIFY:
            self.buffer, self.pos, self.remaining, self.writing = bytearray(self._identify()), 0, 0, False
            self.status |= ST_DRQ
            self._irq(1)
        elif cmd in (CMD_FLUSH_CACHE, CMD_FLUSH_CACHE_EXT):
            assert self.disk is not None
            self.disk.flush()
            self._irq(1)
        elif cmd in (CMD_SET_FEATURES, CMD_INITIALIZE_PARAMS, CMD_RECALIBRATE):
            self._irq(1)
        else:
            self._abort()

    def _abort(self, error: int = ER_ABRT) -> None:
        self.error = error
        self.status = ST_DRDY | ST_DSC | ST_ERR
        self.buffer, self.pos, self.remaining = bytearray(), 0, 0
        self._irq(1)

    def _start_transfer(self, *, write: bool, ext: bool) -> None:
        assert self.disk is not None
        if not self.device & DEV_LBA:
            self._abort()  # CHS addressing is not offered (IDENTIFY says LBA only)
            return
        if ext:
            count = (self.hob[0] << 8 | self.count) or 65536
            lba = (
                self.hob[3] << 40
                | self.hob[2] << 32
                | self.hob[1] << 24
                | self.lba_high << 16
                | self.lba_mid << 8
                | self.lba_low
            )
        else:
            count = self.count or 256
            lba = (self.device & 0x0F) << 24 | self.lba_high << 16 | self.lba_mid << 8 | self.lba_low
        if not self.disk.contains(lba, count):
            self._abort(ER_IDNF | ER_ABRT)
            return
        if write and self.disk.read_only:
            self._abort()
            return
        self.lba, self.remaining, self.writing = lba, count, write
        self.buffer = bytearray(SECTOR_SIZE)
        self.pos = 0
        if write:
            self.status |= ST_DRQ  # data-out: the first sector is asked for without an interrupt
        else:
            self._load_next()

    def _load_next(self) -> None:
        assert self.disk is not None
        try:
            self.disk.read_into(self.lba * SECTOR_SIZE, [memoryview(self.buffer)])
        except OSError:
            self._abort(ER_ABRT)  # a host I/O error is the command's failure, not the VMM's
            return
        self.sectors_read += 1
        self.lba += 1
        self.remaining -= 1
        self.pos = 0
        self.status |= ST_DRQ
        self._irq(1)

    def _take(self, n: int) -> bytes:
        """Data-in: up to ``n`` bytes of the current buffer; refills between sectors."""
        if not self.status & ST_DRQ or self.writing:
            return b""
        chunk = bytes(self.buffer[self.pos : self.pos + n])
        self.pos += len(chunk)
        if self.pos >= len(self.buffer):
            if self.remaining > 0:
                self._load_next()
            else:
                self.status &= ~ST_DRQ
        return chunk

    def _put(self, data: bytes | memoryview) -> int:
        """Data-out: accept up to one sector's worth; returns how many bytes were taken."""
        if not self.status & ST_DRQ or not self.writing:
            return 0
        assert self.disk is not None
        n = min(len(data), SECTOR_SIZE - self.pos)
        self.buffer[self.pos : self.pos + n] = data[:n]
        self.pos += n
        if self.pos == SECTOR_SIZE:
            try:
                self.disk.write_from(self.lba * SECTOR_SIZE, [memoryview(self.buffer)])
            except OSError:
                self._abort(ER_ABRT)
                self.writing = False
                return n
            self.sectors_written += 1
            self.lba += 1
            self.remaining -= 1
            self.pos = 0
            if self.remaining == 0:
                self.status &= ~ST_DRQ
                self.writing = False
            self._irq(1)
        return n

    def _identify(self) -> bytes:
        assert self.disk is not None
        sectors = self.disk.sectors
        w = [0] * 256
        w[0] = 0x0040  # fixed device, ATA
        cyls = min(sectors // (16 * 63), 16383)
        w[1], w[3], w[6] = cyls, 16, 63
        w[10:20] = _ata_string("VIRTKIT-0001", 10)
        w[23:27] = _ata_string("0.1", 4)
        w[27:47] = _ata_string("virtkit ATA disk", 20)
        w[47] = 0x8001  # READ/WRITE MULTIPLE: 1 sector
        w[49] = 0x0200  # LBA supported
        w[53] = 0x0006  # words 64-70 and 88 valid
        lba28 = min(sectors, 0x0FFFFFFF)
        w[60], w[61] = lba28 & 0xFFFF, lba28 >> 16
        w[80] = 0x007E  # ATA-1 .. ATA-6
        w[83] = 0x4400  # LBA48 supported (bit 10), bit 14 must be one
        w[86] = 0x0400  # LBA48 enabled
        w[100], w[101], w[102], w[103] = (sectors & 0xFFFF, sectors >> 16 & 0xFFFF, sectors >> 32 & 0xFFFF, 0)
        return struct.pack("<256H", *w)

    # --- persistence -----------------------------------------------------------------------------
    @classmethod
    def state_type(cls) -> type[AtaState]:
        from virtkit.devices.legacy.persist import AtaState

        return AtaState

    def save(self) -> AtaState:
        with self._lock:
            return self.state_type()(
                features=self.features,
                count=self.count,
                lba_low=self.lba_low,
                lba_mid=self.lba_mid,
                lba_high=self.lba_high,
                hob=(self.hob[0], self.hob[1], self.hob[2], self.hob[3]),
                device=self.device,
                status=self.status,
                error=self.error,
                control=self.control,
                buffer=bytes(self.buffer),
                pos=self.pos,
                remaining=self.remaining,
                lba=self.lba,
                writing=self.writing,
            )

    def restore(self, state: object) -> None:
        if not isinstance(state, self.state_type()):
            raise DeviceError("ATA state is not an AtaState")
        # A transfer in progress must be one this controller could have started on this disk:
        # the buffer is one sector (or the IDENTIFY page), the position inside it, and every
        # sector still to move inside the image.
        if not all(0 <= b <= 0xFF for b in state.hob):
            raise DeviceError("ATA state: a high-order task-file byte is not a byte")
        if state.buffer and len(state.buffer) != SECTOR_SIZE or state.pos > len(state.buffer):
            raise DeviceError(f"ATA state: a {len(state.buffer)}-byte transfer buffer at position {state.pos}")
        if state.status & ST_DRQ and state.buffer:
            pending = state.remaining  # from state.lba on, the buffered sector included when writing
            if self.disk is None or not self.disk.contains(state.lba, pending):
                raise DeviceError(f"ATA state: a transfer of {pending} sectors at LBA {state.lba} is outside the disk")
            if state.writing and self.disk.read_only:
                raise DeviceError("ATA state: a write in progress to a read-only disk")
        with self._lock:
            self.features, self.count = state.features, state.count
            self.lba_low, self.lba_mid, self.lba_high = state.lba_low, state.lba_mid, state.lba_high
            self.hob = list(state.hob)
            self.device, self.status, self.error, self.control = state.device, state.status, state.error, state.control
            self.buffer, self.pos, self.remaining = bytearray(state.buffer), state.pos, state.remaining
            self.lba, self.writing = state.lba, state.writing
