"""MC146818 CMOS real-time clock and NVRAM at ports 0x70 (index) / 0x71 (data).

Time registers report the host's real time (UTC) in BCD, 24-hour mode, as a PC BIOS leaves it
(Motorola MC146818A datasheet, "Address Map"). The update-in-progress bit is never set, so a
guest's read loop always sees a consistent time. CMOS bytes 0x15-0x18 and 0x30-0x35 carry the
memory size the way the PC BIOS records it.
"""

from __future__ import annotations

import time

from virtkit.devices.contract import Persistent, PioDevice
from virtkit.errors import DeviceError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

    from virtkit.devices.legacy.persist import RtcState

INDEX_PORT: Final = 0x70
REG_SECONDS, REG_MINUTES, REG_HOURS = 0x00, 0x02, 0x04
REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_CENTURY: Final = 0x32
REG_B_24H: Final = 0x02
REG_D_VRT: Final = 0x80  # valid RAM and time


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


class CmosRtc(PioDevice, Persistent):
    """Occupies two ports: register at 0x70 with length 2."""

    def __init__(self, memory_size: int) -> None:
        self.index = 0
        self.nvram = bytearray(128)
        self.nvram[REG_A] = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate
        self.nvram[REG_B] = REG_B_24H
        self.nvram[REG_D] = REG_D_VRT
        # memory size, as the BIOS stores it: KiB above 1 MiB (max 64 MiB) and 64 KiB above 16 MiB
        ext_kib = min(max(memory_size - (1 << 20), 0) >> 10, 0xFFFF)
        self.nvram[0x15], self.nvram[0x16] = 640 & 0xFF, 640 >> 8
        self.nvram[0x17] = self.nvram[0x30] = ext_kib & 0xFF
        self.nvram[0x18] = self.nvram[0x31] = ext_kib >> 8
        above16 = min(max(memory_size - (16 << 20), 0) >> 16, 0xFFFF)
        self.nvram[0x34], self.nvram[0x35] = above16 & 0xFF, above16 >> 8

    def pio_read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF  # the index register is write-only on real hardware
        reg = self.index
        if reg <= REG_YEAR or reg == REG_CENTURY:
            return self._time_register(reg)
        if reg == REG_C:
            value, self.nvram[REG_C] = self.nvram[REG_C], 0  # reading C acknowledges interrupts
            return value
        return self.nvram[reg]

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.index = value & 0x7F  # bit 7 is the NMI mask, not part of the index
            return
        reg = self.index
        if reg in (REG_C, REG_D) or reg <= REG_YEAR or reg == REG_CENTURY:
            return  # status C/D are read-only; the clock follows the host, writes are dropped
        self.nvram[reg] = value & 0xFF

    def _time_register(self, reg: int) -> int:
        t = time.gmtime()
        binary = bool(self.nvram[REG_B] & 0x04)
        conv = (lambda v: v) if binary else _bcd
        table = {
            REG_SECONDS: t.tm_sec,
            REG_MINUTES: t.tm_min,
            REG_HOURS: t.tm_hour,
            REG_WEEKDAY: (t.tm_wday + 1) % 7 + 1,
            REG_DAY: t.tm_mday,
            REG_MONTH: t.tm_mon,
            REG_YEAR: t.tm_year % 100,
            REG_CENTURY: t.tm_year // 100,
        }
        value = table.get(reg)
        return conv(value) if value is not None else self.nvram[reg]

    @classmethod
    def state_type(cls) -> type[RtcState]:
        from virtkit.devices.legacy.persist import RtcState

        return RtcState

    def save(self) -> RtcState:
        return self.state_type()(index=self.index, nvram=bytes(self.nvram))

    def restore(self, state: object) -> None:
        if not isinstance(state, self.state_type()) or len(state.nvram) != len(self.nvram) or state.index > 0x7F:
            raise DeviceError("CMOS state is not a valid RtcState (128 bytes of NVRAM, index below 0x80)")
        self.index = state.index
        self.nvram[:] = state.nvram
