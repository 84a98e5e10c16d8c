"""Emulated standard PC devices: 16550A UART, ATA disk, isa-debug-exit, i8042, CMOS RTC, POST
port; their state records are in ``persist.py``.

May import: ``virtkit.devices.contract``, ``virtkit.devices.disk``, ``virtkit.records`` (records
only, lazily), ``virtkit.errors``.
"""
