"""Debug-exit port, compatible with QEMU's ``isa-debug-exit`` device.

A guest write of value ``v`` ends the machine with exit status ``(v << 1) | 1``, exactly as QEMU
computes it, so a test guest reports its result the same way under both VMMs.
"""

from __future__ import annotations

from collections.abc import Callable

from virtkit.devices.contract import PioDevice

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

DEBUG_EXIT_PORT: Final = 0xF4
PORT_COUNT: Final = 4  # QEMU's iosize=0x04


class DebugExit(PioDevice):
    def __init__(self, on_exit: Callable[[int, int], None]) -> None:
        """``on_exit(value, status)`` is called from the vCPU thread that wrote the port."""
        self._on_exit = on_exit

    def pio_read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self._on_exit(value, ((value << 1) | 1) & 0xFF)
