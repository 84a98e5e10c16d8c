from __future__ import annotations

from virtkit.devices.legacy.debug_exit import DebugExit
from virtkit.devices.legacy.i8042 import I8042
from virtkit.devices.legacy.rtc import REG_B, REG_D, REG_SECONDS, CmosRtc


def test_debug_exit_status_matches_qemu() -> None:
    seen: list[tuple[int, int]] = []
    d = DebugExit(lambda v, s: seen.append((v, s)))
    d.pio_write(0, 1, 0)
    d.pio_write(0, 1, 0x21)
    d.pio_write(0, 4, 0x80)
    assert seen == [(0, 1), (0x21, 0x43), (0x80, 0x01)]  # (v << 1) | 1, truncated to 8 bits


def test_i8042_reset_paths() -> None:
    resets: list[int] = []
    k = I8042(lambda: resets.append(1))
    k.pio_write(4, 1, 0xAA)
    assert k.pio_read(4, 1) & 1 and k.pio_read(0, 1) == 0x55
    k.pio_write(4, 1, 0xFE)
    assert resets == [1]
    k.pio_write(4, 1, 0xD1)
    k.pio_write(0, 1, 0xFE)  # output port bit 0 clear: reset
    assert resets == [1, 1]


def test_rtc_reports_bcd_time_and_valid_ram() -> None:
    r = CmosRtc(64 << 20)
    r.pio_write(0, 1, 0x80 | REG_D)  # NMI-disable bit must not leak into the index
    assert r.pio_read(1, 1) == 0x80
    r.pio_write(0, 1, REG_B)
    assert r.pio_read(1, 1) & 0x02  # 24-hour mode
    r.pio_write(0, 1, REG_SECONDS)
    sec = r.pio_read(1, 1)
    assert sec >> 4 <= 5 and sec & 0xF <= 9  # BCD


def test_rtc_memory_size_bytes() -> None:
    r = CmosRtc(64 << 20)
    ext_kib = r.nvram[0x17] | r.nvram[0x18] << 8
    assert ext_kib == (63 << 20) >> 10


def test_acpi_power_registers() -> None:
    """S5 with SLP_EN powers off, RESET_VALUE on the reset register resets; any other write
    (SLP_EN clear, another sleep type, another reset value, the status register) does nothing."""
    from virtkit.devices.legacy.acpi_power import (
        RESET,
        RESET_VALUE,
        S5_SLP_TYP,
        SLEEP_CONTROL,
        SLEEP_STATUS,
        SLP_EN,
        AcpiPowerRegisters,
    )

    events: list[str] = []
    dev = AcpiPowerRegisters(lambda: events.append("off"), lambda: events.append("reset"))
    dev.pio_write(SLEEP_CONTROL, 1, S5_SLP_TYP << 2)  # SLP_EN clear
    dev.pio_write(SLEEP_CONTROL, 1, (3 << 2) | SLP_EN)  # S3: not offered
    dev.pio_write(SLEEP_STATUS, 1, 0x80)  # WAK_STS write-1-to-clear
    dev.pio_write(RESET, 1, RESET_VALUE + 1)
    assert events == [] and dev.ignored_writes == 2
    assert dev.pio_read(SLEEP_STATUS, 1) == 0
    dev.pio_write(SLEEP_CONTROL, 1, (S5_SLP_TYP << 2) | SLP_EN | 0x100)  # bits above the byte are not the register's
    assert events == ["off"]
    dev.pio_write(RESET, 1, RESET_VALUE)
    assert events == ["off", "reset"]
