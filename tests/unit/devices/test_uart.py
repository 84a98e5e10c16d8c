"""16550A behaviour that real drivers rely on (PC16550D datasheet §8)."""

from __future__ import annotations

from virtkit.devices.legacy import uart as U


def make() -> tuple[U.Uart16550, bytearray, list[int]]:
    out, irqs = bytearray(), []
    return U.Uart16550(out.extend, irqs.append), out, irqs


def test_transmit_and_line_status() -> None:
    u, out, _ = make()
    for b in b"ok":
        u.pio_write(U.RBR_THR_DLL, 1, b)
    assert out == b"ok"
    assert u.pio_read(U.LSR, 1) & (U.LSR_THRE | U.LSR_TEMT) == U.LSR_THRE | U.LSR_TEMT


def test_divisor_latch_does_not_transmit() -> None:
    u, out, _ = make()
    u.pio_write(U.LCR, 1, U.LCR_DLAB | 3)
    u.pio_write(U.RBR_THR_DLL, 1, 1)
    u.pio_write(U.IER_DLM, 1, 0)
    assert (u.pio_read(U.RBR_THR_DLL, 1), u.pio_read(U.IER_DLM, 1)) == (1, 0)
    u.pio_write(U.LCR, 1, 3)
    assert out == b""


def test_receive_sets_data_ready_and_interrupt() -> None:
    u, _, irqs = make()
    u.pio_write(U.IER_DLM, 1, U.IER_RDI)
    u.receive(b"x")
    assert u.pio_read(U.LSR, 1) & U.LSR_DR
    assert u.pio_read(U.IIR_FCR, 1) & 0x0F == U.IIR_RDI
    assert irqs[-1] == 1
    assert u.pio_read(U.RBR_THR_DLL, 1) == ord("x")
    assert not u.pio_read(U.LSR, 1) & U.LSR_DR
    assert irqs[-1] == 0


def test_thre_interrupt_on_enable_and_cleared_by_iir_read() -> None:
    u, _, irqs = make()
    u.pio_write(U.IER_DLM, 1, U.IER_THRI)
    assert irqs == [1]
    assert u.pio_read(U.IIR_FCR, 1) & 0x0F == U.IIR_THRI
    assert irqs == [1, 0]
    assert u.pio_read(U.IIR_FCR, 1) & 0x0F == U.IIR_NO_INT


def test_irq_gated_by_out2() -> None:
    u, _, irqs = make()
    u.pio_write(U.MCR, 1, 0)
    u.pio_write(U.IER_DLM, 1, U.IER_THRI)
    assert irqs == []


def test_loopback_echoes_and_maps_modem_lines() -> None:
    u, out, _ = make()
    u.pio_write(U.MCR, 1, U.MCR_LOOP | U.MCR_DTR | U.MCR_OUT2)
    u.pio_write(U.RBR_THR_DLL, 1, 0x5A)
    assert out == b""
    assert u.pio_read(U.RBR_THR_DLL, 1) == 0x5A
    assert u.pio_read(U.MSR, 1) == U.MSR_DSR | U.MSR_DCD


def test_rx_fifo_is_bounded_and_reports_overrun() -> None:
    u, _, _ = make()
    u.receive(b"a" * (U.RX_FIFO_LIMIT + 10))
    assert u.pio_read(U.LSR, 1) & U.LSR_OE
    assert not u.pio_read(U.LSR, 1) & U.LSR_OE  # reported once


def test_fifo_enabled_bits_in_iir() -> None:
    u, _, _ = make()
    u.pio_write(U.IIR_FCR, 1, U.FCR_ENABLE)
    assert u.pio_read(U.IIR_FCR, 1) & 0xC0 == 0xC0


def test_save_restore_roundtrip() -> None:
    u, _, _ = make()
    u.pio_write(U.LCR, 1, 0x1B)
    u.pio_write(U.SCR, 1, 0x77)
    u.receive(b"pending")
    v, _, _ = make()
    v.restore(u.save())
    assert v.save() == u.save()
