"""The POST diagnostic port 0x80.

BIOSes write progress codes here and Linux uses it as an I/O delay; it is also the port the
trap-cost guest hammers, because every PC VMM (QEMU included) handles it in userspace, so one
write costs exactly one VM exit on either.
"""

from __future__ import annotations

from virtkit.devices.contract import Persistent, PioDevice
from virtkit.errors import DeviceError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

    from virtkit.devices.legacy.persist import PostState

POST_PORT: Final = 0x80


class PostPort(PioDevice, Persistent):
    def __init__(self) -> None:
        self.last_code = 0
        self.writes = 0

    def pio_read(self, offset: int, size: int) -> int:
        return self.last_code

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.last_code = value & 0xFF
        self.writes += 1

    @classmethod
    def state_type(cls) -> type[PostState]:
        from virtkit.devices.legacy.persist import PostState

        return PostState

    def save(self) -> PostState:
        return self.state_type()(last_code=self.last_code, writes=self.writes)

    def restore(self, state: object) -> None:
        if not isinstance(state, self.state_type()):
            raise DeviceError("POST port state is not a PostState")
        self.last_code, self.writes = state.last_code, state.writes
