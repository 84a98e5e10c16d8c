"""State records of the legacy PC devices (see :class:`virtkit.devices.contract.Persistent`).

Each field's bounds are what the register can hold on the real part; :mod:`virtkit.records`
refuses anything else before a device sees it. What depends on more than one field (the ATA
transfer position against its buffer, the sector range against the disk) is checked by the
device's ``restore``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from virtkit.records import U8, Bounds, Count


@dataclass(frozen=True, slots=True)
class UartState:
    """16550A registers (PC16550D §8) and the bytes waiting in the receive FIFO."""

    ier: Annotated[int, Bounds(lo=0, hi=0x0F)]
    lcr: U8
    mcr: Annotated[int, Bounds(lo=0, hi=0x1F)]
    lsr: U8
    msr: U8
    scr: U8
    dll: U8
    dlm: U8
    fcr: U8
    thr_interrupt: bool
    rx: Annotated[bytes, Bounds(max_len=4096)]  # uart.RX_FIFO_LIMIT, pinned by a unit test


@dataclass(frozen=True, slots=True)
class I8042State:
    config: U8
    output: U8 | None
    #: the command waiting for its data byte: 0x60 (write config) or 0xD1 (write output port)
    pending_cmd: U8 | None


@dataclass(frozen=True, slots=True)
class RtcState:
    index: Annotated[int, Bounds(lo=0, hi=0x7F)]
    nvram: Annotated[bytes, Bounds(min_len=128, max_len=128)]


@dataclass(frozen=True, slots=True)
class PostState:
    last_code: U8
    writes: Count


@dataclass(frozen=True, slots=True)
class AtaState:
    """Task-file registers (ATA/ATAPI-6 §7) and the PIO transfer in progress."""

    features: U8
    count: U8
    lba_low: U8
    lba_mid: U8
    lba_high: U8
    #: the previous count and LBA bytes (48-bit commands' "high order bytes")
    hob: tuple[U8, U8, U8, U8]
    device: U8
    status: U8
    error: U8
    control: U8
    #: the sector (or IDENTIFY page) being transferred, and the position in it
    buffer: Annotated[bytes, Bounds(max_len=512)]
    pos: Annotated[int, Bounds(lo=0, hi=512)]
    #: sectors still to transfer from ``lba`` on (a sector being written included)
    remaining: Annotated[int, Bounds(lo=0, hi=65536)]
    lba: Annotated[int, Bounds(lo=0, hi=(1 << 48) - 1)]
    writing: bool
