"""16550A UART (what an unmodified guest's serial driver talks to).

Register map and bits from the TI/National PC16550D datasheet (§8 "Registers"). Transmission is
instantaneous: the transmitter is always empty (LSR.THRE and LSR.TEMT set), which both polled
and interrupt-driven drivers accept. Received bytes wait in a bounded FIFO.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from virtkit.devices.contract import Persistent, PioDevice
from virtkit.errors import DeviceError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

    from virtkit.devices.legacy.persist import UartState

COM1_BASE: Final = 0x3F8
COM1_IRQ: Final = 4
PORT_COUNT: Final = 8

# register offsets (DLAB = LCR bit 7 selects the divisor latch at 0 and 1)
RBR_THR_DLL: Final = 0
IER_DLM: Final = 1
IIR_FCR: Final = 2
LCR: Final = 3
MCR: Final = 4
LSR: Final = 5
MSR: Final = 6
SCR: Final = 7

IER_RDI: Final = 0x01  # received data available
IER_THRI: Final = 0x02  # transmitter holding register empty
IER_RLSI: Final = 0x04  # receiver line status
IER_MSI: Final = 0x08  # modem status

IIR_NO_INT: Final = 0x01
IIR_MSI: Final = 0x00
IIR_THRI: Final = 0x02
IIR_RDI: Final = 0x04
IIR_RLSI: Final = 0x06
IIR_FIFO_ENABLED: Final = 0xC0

LCR_DLAB: Final = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
FCR_ENABLE, FCR_CLEAR_RX = 0x01, 0x02

RX_FIFO_LIMIT: Final = 4096  # bytes buffered from the host before new input is dropped (overrun)


class Uart16550(PioDevice, Persistent):
    """One 16550A. ``output`` receives every transmitted byte; ``set_irq`` drives the IRQ line."""

    def __init__(self, output: Callable[[bytes], None], set_irq: Callable[[int], None] | None = None):
        self._output = output
        self._set_irq = set_irq
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self.ier = 0
        self.lcr = 0x03  # 8N1
        self.mcr = MCR_OUT2
        self.lsr = LSR_THRE | LSR_TEMT
        self.msr = MSR_DCD | MSR_DSR | MSR_CTS
        self.scr = 0
        self.dll, self.dlm = 0x0C, 0x00  # 9600 baud
        self.fcr = 0
        self.thr_interrupt = False  # THRE interrupt pending (cleared by reading IIR or writing THR)
        self._irq_level = 0
        self.bytes_out = 0

    # --- host side ------------------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Queue bytes from the host (stdin or the API) for the guest to read."""
        with self._lock:
            for b in data:
                if len(self._rx) >= RX_FIFO_LIMIT:
                    self.lsr |= LSR_OE
                    break
                self._rx.append(b)
            self._update_irq()

    # --- guest side -----------------------------------------------------------------------------
    def pio_read(self, offset: int, size: int) -> int:
        with self._lock:
            return self._read(offset)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self._write(offset, value & 0xFF)

    def _read(self, offset: int) -> int:
        if offset == RBR_THR_DLL:
            if self.lcr & LCR_DLAB:
                return self.dll
            value = self._rx.popleft() if self._rx else 0
            self._update_irq()
            return value
        if offset == IER_DLM:
            return self.dlm if self.lcr & LCR_DLAB else self.ier
        if offset == IIR_FCR:
            iir = self._iir()
            if iir & 0x0F == IIR_THRI:
                self.thr_interrupt = False  # reading IIR with THRE as the source clears it
                self._update_irq()
            return iir | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            value = self.lsr | (LSR_DR if self._rx else 0)
            self.lsr &= ~LSR_OE  # overrun is reported once
            return value
        if offset == MSR:
            if self.mcr & MCR_LOOP:
                # loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD (PC16550D §8.6.3)
                m = self.mcr
                return ((m & MCR_DTR) << 5) | ((m & MCR_RTS) << 3) | ((m & MCR_OUT1) << 4) | ((m & MCR_OUT2) << 4)
            return self.msr
        return self.scr

    def _write(self, offset: int, value: int) -> None:
        if offset == RBR_THR_DLL:
            if self.lcr & LCR_DLAB:
                self.dll = value
                return
            if self.mcr & MCR_LOOP:
                if len(self._rx) < RX_FIFO_LIMIT:
                    self._rx.append(value)
            else:
                self.bytes_out += 1
                self._output(bytes((value,)))
            # the byte left at once: THR is empty again, which raises THRE if enabled
            self.thr_interrupt = True
            self._update_irq()
        elif offset == IER_DLM:
            if self.lcr & LCR_DLAB:
                self.dlm = value
                return
            enabling_thri = value & IER_THRI and not self.ier & IER_THRI
            self.ier = value & 0x0F
            if enabling_thri:
                self.thr_interrupt = True  # THR is empty: enabling THRI interrupts at once
            self._update_irq()
        elif offset == IIR_FCR:
            self.fcr = value
            if value & FCR_CLEAR_RX:
                self._rx.clear()
            self._update_irq()
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
            self._update_irq()
        elif offset == SCR:
            self.scr = value
        # LSR and MSR are read-only; writes are ignored as on the real part

    def _iir(self) -> int:
        # priority order of PC16550D table 4: line status, received data, THR empty, modem status
        if self.ier & IER_RLSI and self.lsr & LSR_OE:
            return IIR_RLSI
        if self.ier & IER_RDI and self._rx:
            return IIR_RDI
        if self.ier & IER_THRI and self.thr_interrupt:
            return IIR_THRI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        # On a PC the UART's interrupt output reaches the PIC only through MCR.OUT2.
        level = 1 if (self._iir() != IIR_NO_INT and self.mcr & MCR_OUT2) else 0
        if level != self._irq_level:
            self._irq_level = level
            if self._set_irq is not None:
                self._set_irq(level)

    # --- persistence (snapshot/restore) --------------------------------------------------------
    @classmethod
    def state_type(cls) -> type[UartState]:
        from virtkit.devices.legacy.persist import UartState

        return UartState

    def save(self) -> UartState:
        with self._lock:
            return self.state_type()(
                ier=self.ier,
                lcr=self.lcr,
                mcr=self.mcr,
                lsr=self.lsr,
                msr=self.msr,
                scr=self.scr,
                dll=self.dll,
                dlm=self.dlm,
                fcr=self.fcr,
                thr_interrupt=self.thr_interrupt,
                rx=bytes(self._rx),
            )

    def restore(self, state: object) -> None:
        if not isinstance(state, self.state_type()) or len(state.rx) > RX_FIFO_LIMIT:
            raise DeviceError("16550A state is not a valid UartState")
        with self._lock:
            self.ier, self.lcr, self.mcr, self.lsr = state.ier, state.lcr, state.mcr, state.lsr
            self.msr, self.scr, self.dll, self.dlm, self.fcr = state.msr, state.scr, state.dll, state.dlm, state.fcr
            self.thr_interrupt = state.thr_interrupt
            self._rx = deque(state.rx)
            self._irq_level = -1
            self._update_irq()
