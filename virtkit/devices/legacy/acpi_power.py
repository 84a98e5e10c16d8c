"""The ACPI power registers of a hardware-reduced platform: sleep control, sleep status, reset.

A platform without the fixed PM1 blocks (FADT flag HW_REDUCED_ACPI) offers sleep states through
two registers the FADT points at (ACPI 6.5 §4.8.3.7, table 5.9 SLEEP_CONTROL_REG and
SLEEP_STATUS_REG), and a reset through RESET_REG with RESET_VALUE (§4.8.3.6, flag
RESET_REG_SUP). OSPM enters S5 ("soft off") by writing ``SLP_TYP << 2 | SLP_EN`` to the sleep
control register (table 4.21: SLP_TYPx bits 2-4, SLP_EN bit 5), SLP_TYP being the first value of
the DSDT's ``\\_S5`` package (§7.4.2). Linux does exactly this for ``poweroff`` on such a platform
(ACPICA ``acpi_hw_extended_sleep``) and writes RESET_VALUE to RESET_REG for ``reboot=acpi``, its
first choice on x86 (``acpi_reboot``).

Here: S5 with SLP_EN stops the machine with :attr:`StopReason.POWER_OFF`; RESET_VALUE written to
the reset register stops it with :attr:`StopReason.RESET`; every other write is ignored (no
other sleep state is offered: the DSDT declares only ``\\_S5``). The sleep status register reads
0: WAK_STS (bit 7) is never set, since nothing here wakes a sleeping machine. No state to save.
"""

from __future__ import annotations

from collections.abc import Callable

from virtkit.devices.contract import PioDevice

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

#: register offsets from the device's first port
SLEEP_CONTROL: Final = 0
SLEEP_STATUS: Final = 1
RESET: Final = 2
#: sleep control register fields (ACPI 6.5 table 4.21)
SLP_TYP_SHIFT: Final = 2
SLP_TYP_MASK: Final = 0x7
SLP_EN: Final = 1 << 5
#: the SLP_TYP the DSDT's \\_S5 package gives (any 3-bit value would do; 5 for S5)
S5_SLP_TYP: Final = 5
#: what the FADT's RESET_VALUE says to write to the reset register
RESET_VALUE: Final = 0x01


class AcpiPowerRegisters(PioDevice):
    """Three byte-wide ports: sleep control (offset 0), sleep status (1), reset (2)."""

    def __init__(self, on_power_off: Callable[[], None], on_reset: Callable[[], None]) -> None:
        self._on_power_off, self._on_reset = on_power_off, on_reset
        #: writes that asked for something this platform does not offer (another SLP_TYP, another
        #: reset value): ignored, counted for tests and diagnosis
        self.ignored_writes = 0

    def pio_read(self, offset: int, size: int) -> int:
        return 0  # sleep status: no wake event; control and reset registers read as 0

    def pio_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == SLEEP_CONTROL:
            if not value & SLP_EN:
                return  # only SLP_EN starts a transition (§4.8.3.7.1)
            if (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLP_TYP:
                self._on_power_off()
                return
            self.ignored_writes += 1
        elif offset == RESET:
            if value == RESET_VALUE:
                self._on_reset()
                return
            self.ignored_writes += 1
        # SLEEP_STATUS: WAK_STS is write-1-to-clear and never set here
