"""Emulated standard PC devices: 16550A UART, isa-debug-exit, i8042, CMOS RTC, POST port."""
