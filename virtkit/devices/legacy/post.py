"""The POST diagnostic port 0x80.

BIOSes write progress codes here and Linux uses it as an I/O delay; it is also the port the
trap-cost guest hammers, because every PC VMM (QEMU included) handles it in userspace, so one
write costs exactly one VM exit on either.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

POST_PORT: Final = 0x80


class PostPort:
    def __init__(self) -> None:
        self.last_code = 0
        self.writes = 0

    def pio_read(self, offset: int, size: int) -> int:
        return self.last_code

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.last_code = value & 0xFF
        self.writes += 1

    def save(self) -> dict[str, object]:
        return {"last_code": self.last_code, "writes": self.writes}

    def restore(self, state: dict[str, object]) -> None:
        self.last_code = int(state["last_code"])  # type: ignore[call-overload]
        self.writes = int(state["writes"])  # type: ignore[call-overload]
