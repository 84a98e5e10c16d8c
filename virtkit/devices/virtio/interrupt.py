"""The interrupt line a virtio transport drives, and the two ways a KVM machine provides it.

A virtio-mmio device has one interrupt, asserted while any bit of InterruptStatus is set
(§4.2.3.4). The transport knows nothing about KVM; it calls two methods on the object the machine
gives it:

``trigger()``
    every time the device sets a bit in InterruptStatus (a used buffer or a configuration change),
    even if that bit was already set. Edge semantics: one pulse per event.
``set_level(asserted)``
    every time InterruptStatus goes from zero to non-zero (True) or back to zero after the
    driver's InterruptACK (False). Level semantics.

An implementation uses whichever fits and ignores the other:

* :class:`IrqFdInterrupt` (preferred): ``trigger`` writes 1 to an eventfd that the machine has
  bound to the device's GSI with ``VmFd.irqfd(fd, gsi)`` (KVM_IRQFD). KVM injects the interrupt
  without a return to userspace and without the GIL.
* :class:`IrqLineInterrupt` (fallback, no irqfd): drives ``KVM_IRQ_LINE`` through a callable
  such as ``lambda level: vm.irq_line(gsi, level)``. By default it follows the level; with
  ``edge=True`` it pulses 1 then 0 on each trigger instead, for an edge-triggered IOAPIC pin.

Both are called with the device lock held and must not call back into the device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Protocol


class Interrupt(Protocol):
    def trigger(self) -> None: ...

    def set_level(self, asserted: bool) -> None: ...


class IrqFdInterrupt:
    """Edge interrupts through an eventfd registered with KVM_IRQFD."""

    def __init__(self, eventfd: int | None = None) -> None:
        """Use ``eventfd`` (owned by the caller) or, without one, create a non-blocking eventfd that
        :meth:`close` releases. Register ``fileno()`` with ``VmFd.irqfd(fileno, gsi)``."""
        self._owned = eventfd is None
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) if eventfd is None else eventfd

    def fileno(self) -> int:
        return self._fd

    def trigger(self) -> None:
        # BlockingIOError: the counter is saturated, so an interrupt is pending anyway
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(self._fd, 1)

    def set_level(self, asserted: bool) -> None:
        pass  # irqfd injects edges; the level is of no use to it

    def close(self) -> None:
        if self._owned and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


class IrqLineInterrupt:
    """Interrupts through a line-setting callable (KVM_IRQ_LINE)."""

    def __init__(self, set_line: Callable[[int], None], *, edge: bool = False) -> None:
        self._set_line = set_line
        self._edge = edge

    def trigger(self) -> None:
        if self._edge:
            self._set_line(1)
            self._set_line(0)

    def set_level(self, asserted: bool) -> None:
        if not self._edge:
            self._set_line(1 if asserted else 0)
