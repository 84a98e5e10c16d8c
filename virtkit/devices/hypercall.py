"""The hypercall interface of paravirtualized guests (ABI version 1, docs/HYPERCALLS.md).

A guest fills a 64-byte *hypercall block* in its own RAM and writes the block's guest-physical
address to the doorbell port (a 32-bit ``out``). The VMM reads the block, runs the call, writes
``ret`` and ``value`` back, and the guest continues after the ``out``. One exit per call, from
kernel or user mode, on VT-x, AMD-V and PVM alike.

    offset  field        meaning
    0       u32 nr       hypercall number (Hypercall)
    4       u32 abi      ABI version the guest speaks (1)
    8       u64 args[5]  arguments
    48      s64 ret      0, or a negative HcError
    56      u64 value    result value

Every argument is hostile: guest ranges are checked by GuestMemory, lengths are bounded, and an
unknown number or ABI version is an error code, never an exception in the VMM.
"""

from __future__ import annotations

import enum
import os
import struct
import time
from collections.abc import Callable

from virtkit.devices.contract import Persistent, PioDevice
from virtkit.devices.disk import SECTOR_SIZE, RawImage
from virtkit.errors import DeviceError
from virtkit.memory import GuestMemory, GuestMemoryError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

    from virtkit.devices.persist import HypercallState

ABI_VERSION: Final = 1
BLOCK_SIZE: Final = 64
#: reading the doorbell port returns this: "VK" and the ABI version, so a guest can probe it
PORT_SIGNATURE: Final = 0x564B_0000 | ABI_VERSION
MAX_CONSOLE_WRITE: Final = 1 << 20
MAX_BLOCK_SECTORS: Final = 2048  # 1 MiB per call
_BLOCK = struct.Struct("<II5Q")
_RESULT = struct.Struct("<qQ")


class Hypercall(enum.IntEnum):
    QUERY = 0  # -> value: bitmap of supported hypercalls (bit n = number n)
    CONSOLE_WRITE = 1  # (gpa, len) -> value: bytes written
    BLOCK_INFO = 2  # () -> value: capacity in sectors; args[0] ignored; ret -ENODEV if no disk
    BLOCK_READ = 3  # (sector, gpa, count) -> value: sectors read
    BLOCK_WRITE = 4  # (sector, gpa, count) -> value: sectors written
    BLOCK_FLUSH = 5  # ()
    TIME_WALLCLOCK = 6  # -> value: nanoseconds since the Unix epoch (host clock)
    TIME_MONOTONIC = 7  # -> value: nanoseconds of a monotonic clock
    YIELD = 8  # give the host CPU away once
    POWER_OFF = 9  # (status) -> does not return: the VM ends, exit status = status & 0xFF
    NULL = 10  # does nothing: the cost of the round trip itself


class HcError(enum.IntEnum):
    EINVAL = -1  # bad argument
    EFAULT = -2  # guest range outside guest RAM
    ENOSYS = -3  # unknown hypercall number or ABI version
    EIO = -4  # host I/O error
    EROFS = -5  # write to a read-only disk
    E2BIG = -6  # length above the per-call bound
    ENODEV = -7  # no such device


class HypercallDevice(PioDevice, Persistent):
    """Sits on the I/O bus at ``layout.HYPERCALL_PORT``."""

    def __init__(
        self,
        memory: GuestMemory,
        console: Callable[[bytes], None],
        *,
        disk: RawImage | None = None,
        power_off: Callable[[int], None],
    ) -> None:
        self.memory = memory
        self.console = console
        self.disk = disk
        self.power_off = power_off
        self.calls = [0] * len(Hypercall)
        self.errors = 0
        self.bad_blocks = 0
        self._handlers: dict[int, Callable[[tuple[int, ...]], tuple[int, int]]] = {
            Hypercall.QUERY: self._query,
            Hypercall.CONSOLE_WRITE: self._console_write,
            Hypercall.BLOCK_INFO: self._block_info,
            Hypercall.BLOCK_READ: self._block_read,
            Hypercall.BLOCK_WRITE: self._block_write,
            Hypercall.BLOCK_FLUSH: self._block_flush,
            Hypercall.TIME_WALLCLOCK: lambda a: (0, time.time_ns()),
            Hypercall.TIME_MONOTONIC: lambda a: (0, time.monotonic_ns()),
            Hypercall.YIELD: self._yield,
            Hypercall.POWER_OFF: self._power_off,
            Hypercall.NULL: lambda a: (0, 0),
        }

    def pio_read(self, offset: int, size: int) -> int:
        return PORT_SIGNATURE & ((1 << (8 * size)) - 1)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if size != 4 or offset != 0:
            self.bad_blocks += 1  # not a doorbell write: nothing to answer, nothing to do
            return
        self.call(value)

    def call(self, gpa: int) -> None:
        try:
            if gpa % 8:
                raise GuestMemoryError("misaligned hypercall block")
            # The whole block, result fields included, must be guest RAM before the call runs: a
            # block whose arguments fit but whose ret/value do not would otherwise have its effect
            # (a disk write, a power-off) and then fail to report it, outside any error path.
            block = self.memory.read(gpa, BLOCK_SIZE)
            nr, abi, *args = _BLOCK.unpack_from(block)
        except GuestMemoryError:
            self.bad_blocks += 1  # the block itself is not guest RAM: nowhere to report to
            return
        handler = self._handlers.get(nr) if abi == ABI_VERSION else None
        if handler is None:
            ret, value = int(HcError.ENOSYS), 0
        else:
            self.calls[nr] += 1
            try:
                ret, value = handler(tuple(args))
            except GuestMemoryError:
                ret, value = int(HcError.EFAULT), 0
            except OSError:
                ret, value = int(HcError.EIO), 0
        if ret < 0:
            self.errors += 1
        self.memory.write(gpa + 48, _RESULT.pack(int(ret), value & 0xFFFF_FFFF_FFFF_FFFF))

    # --- handlers: each returns (ret, value) ----------------------------------------------------
    def _query(self, a: tuple[int, ...]) -> tuple[int, int]:
        return 0, sum(1 << int(h) for h in self._handlers)

    def _console_write(self, a: tuple[int, ...]) -> tuple[int, int]:
        gpa, length = a[0], a[1]
        if length > MAX_CONSOLE_WRITE:
            return HcError.E2BIG, 0
        self.console(bytes(self.memory.view(gpa, length)))
        return 0, length

    def _block_info(self, a: tuple[int, ...]) -> tuple[int, int]:
        if self.disk is None:
            return HcError.ENODEV, 0
        return 0, self.disk.sectors | (1 << 63 if self.disk.read_only else 0)

    def _block_rw(self, a: tuple[int, ...], write: bool) -> tuple[int, int]:
        if self.disk is None:
            return HcError.ENODEV, 0
        sector, gpa, count = a[0], a[1], a[2]
        if count > MAX_BLOCK_SECTORS:
            return HcError.E2BIG, 0
        if not self.disk.contains(sector, count):
            return HcError.EINVAL, 0
        view = self.memory.view(gpa, count * SECTOR_SIZE)  # raises -> EFAULT before any I/O
        if write:
            if self.disk.read_only:
                return HcError.EROFS, 0
            self.disk.write_from(sector * SECTOR_SIZE, [view])
        else:
            self.disk.read_into(sector * SECTOR_SIZE, [view])
        return 0, count

    def _block_read(self, a: tuple[int, ...]) -> tuple[int, int]:
        return self._block_rw(a, write=False)

    def _block_write(self, a: tuple[int, ...]) -> tuple[int, int]:
        return self._block_rw(a, write=True)

    def _block_flush(self, a: tuple[int, ...]) -> tuple[int, int]:
        if self.disk is None:
            return HcError.ENODEV, 0
        self.disk.flush()
        return 0, 0

    def _yield(self, a: tuple[int, ...]) -> tuple[int, int]:
        os.sched_yield()
        return 0, 0

    def _power_off(self, a: tuple[int, ...]) -> tuple[int, int]:
        self.power_off(a[0] & 0xFF)
        return 0, 0

    @classmethod
    def state_type(cls) -> type[HypercallState]:
        from virtkit.devices.persist import HypercallState

        return HypercallState

    def save(self) -> HypercallState:
        return self.state_type()(calls=tuple(self.calls), errors=self.errors, bad_blocks=self.bad_blocks)

    def restore(self, state: object) -> None:
        # one counter per call number, each a count: a short list would raise IndexError on the
        # vCPU thread at the next call (seen with a crafted snapshot)
        if (
            not isinstance(state, self.state_type())
            or len(state.calls) != len(Hypercall)
            or any(c < 0 for c in state.calls)
        ):
            raise DeviceError(f"hypercall state is not {len(Hypercall)} call counters")
        self.calls, self.errors, self.bad_blocks = list(state.calls), state.errors, state.bad_blocks
