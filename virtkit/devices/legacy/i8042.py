"""The i8042 keyboard controller, as far as guests use it to reset the machine.

No keyboard is attached. What matters is the reset line: command 0xFE pulses it (IBM PC/AT
Technical Reference, "Keyboard Controller Commands"), which is how Linux, Windows and most hobby
kernels reboot; a write of the output port with bit 0 clear does the same.
"""

from __future__ import annotations

from collections.abc import Callable

from virtkit.devices.contract import Persistent, PioDevice
from virtkit.errors import DeviceError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

    from virtkit.devices.legacy.persist import I8042State

DATA_PORT: Final = 0x60
COMMAND_PORT: Final = 0x64
#: the keyboard interrupt line of a PC (ISA IRQ 1); this model never raises it (no keyboard)
KEYBOARD_IRQ: Final = 1

STATUS_OBF: Final = 0x01  # output buffer full
STATUS_SYS: Final = 0x04  # system flag: POST passed

CMD_READ_CONFIG: Final = 0x20
CMD_WRITE_CONFIG: Final = 0x60
CMD_SELF_TEST: Final = 0xAA
CMD_WRITE_OUTPUT_PORT: Final = 0xD1
CMD_PULSE_RESET: Final = 0xFE


class I8042(PioDevice, Persistent):
    """Occupies port 0x60 (offset 0) and 0x64 (offset 4): register it as 0x60+5."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self.config = 0x45
        self._output: int | None = None
        self._pending_cmd: int | None = None

    def pio_read(self, offset: int, size: int) -> int:
        if offset == 0:
            value, self._output = self._output, None
            return value if value is not None else 0
        if offset == 4:
            return STATUS_SYS | (STATUS_OBF if self._output is not None else 0)
        return 0xFF

    def pio_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 4:
            self._command(value)
        elif offset == 0:
            cmd, self._pending_cmd = self._pending_cmd, None
            if cmd == CMD_WRITE_CONFIG:
                self.config = value
            elif cmd == CMD_WRITE_OUTPUT_PORT and not value & 0x01:
                self._on_reset()

    def _command(self, cmd: int) -> None:
        if cmd == CMD_PULSE_RESET:
            self._on_reset()
        elif cmd == CMD_READ_CONFIG:
            self._output = self.config
        elif cmd in (CMD_WRITE_CONFIG, CMD_WRITE_OUTPUT_PORT):
            self._pending_cmd = cmd
        elif cmd == CMD_SELF_TEST:
            self._output = 0x55

    @classmethod
    def state_type(cls) -> type[I8042State]:
        from virtkit.devices.legacy.persist import I8042State

        return I8042State

    def save(self) -> I8042State:
        return self.state_type()(config=self.config, output=self._output, pending_cmd=self._pending_cmd)

    def restore(self, state: object) -> None:
        if not isinstance(state, self.state_type()):
            raise DeviceError("i8042 state is not an I8042State")
        if state.pending_cmd not in (None, CMD_WRITE_CONFIG, CMD_WRITE_OUTPUT_PORT):
            raise DeviceError(f"i8042 state: no command {state.pending_cmd:#x} waits for a data byte")
        self.config, self._output, self._pending_cmd = state.config, state.output, state.pending_cmd
