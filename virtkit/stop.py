"""Why a machine stopped: the reason, the status the guest asked for, and a readable detail.

Its own module so that everything that can end a machine (a vCPU thread, a device, the I/O
thread, a control socket) can say why without importing the machine itself.
"""

from __future__ import annotations

import enum


class StopReason(enum.Enum):
    DEBUG_EXIT = "debug-exit"  # the guest wrote the isa-debug-exit port
    RESET = "reset"  # i8042 reset line or a KVM reset event
    POWER_OFF = "power-off"  # a KVM shutdown system event
    HALTED = "halted"  # every vCPU halted with interrupts disabled
    TRIPLE_FAULT = "triple-fault"
    INTERNAL_ERROR = "internal-error"  # KVM could not emulate an instruction (common on PVM)
    FAIL_ENTRY = "fail-entry"
    UNKNOWN_ACCESS = "unknown-access"  # strict mode: an access to a port/address nobody owns
    TIMEOUT = "timeout"
    STOPPED = "stopped"  # the host asked (Ctrl-C, SIGTERM, Machine.stop)
    OUTPUT_CLOSED = "output-closed"  # the reader of the serial output went away (`| head`)
    ERROR = "error"  # the VMM failed (a device raised, an ioctl failed)

    @property
    def is_crash(self) -> bool:
        return self in (StopReason.TRIPLE_FAULT, StopReason.INTERNAL_ERROR, StopReason.FAIL_ENTRY, StopReason.ERROR)


class Stop:
    """Why a machine stopped, with the status the guest asked for and a readable detail."""

    __slots__ = ("reason", "exit_status", "detail", "vcpu")

    def __init__(
        self, reason: StopReason, exit_status: int | None = None, detail: str = "", vcpu: int | None = None
    ) -> None:
        self.reason = reason
        self.exit_status = exit_status  # debug-exit: (value << 1) | 1; power-off hypercall: its status
        self.detail, self.vcpu = detail, vcpu

    def __repr__(self) -> str:
        return f"Stop({self.reason.value}, status={self.exit_status}, {self.detail!r})"
