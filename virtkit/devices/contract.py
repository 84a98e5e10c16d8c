"""What a device is to the rest of the VMM: the bus interfaces, persistence, and the optional
abilities a device declares (never found by probing attributes).

* :class:`PioDevice` / :class:`MmioDevice`: a range of ports or of guest-physical addresses; the
  bus calls them with the offset into the range. :class:`StringPio` declares that the device
  moves a whole ``rep ins``/``rep outs`` in one call (ATA's data port).
* :class:`Persistent`: ``save()`` returns the device's *state record*, a frozen, slotted
  dataclass defined next to the device (its folder's ``persist.py``); ``restore(record)`` fills
  the device from one, after checking every value against what the device can hold, and raises
  :class:`~virtkit.errors.DeviceError` on anything else. Snapshot and migration turn records into
  JSON and back with :mod:`virtkit.records` (:func:`record_type` says which class to parse into),
  so a crafted or damaged snapshot is refused in one line and never reaches a device half-checked.
* :class:`QueueReplay`: after a restore, the device has queue notifications to replay (virtio
  transports: a kick consumed before the pause must not be lost).

The record classes are imported only when a device is saved or restored: ``dataclasses`` costs
tens of milliseconds to import, and ``virtkit run`` of a fully virtualized guest never pays it.
This module itself imports nothing but :mod:`abc`.
"""

from __future__ import annotations

import abc


class PioDevice(abc.ABC):
    """A device on the I/O port bus."""

    @abc.abstractmethod
    def pio_read(self, offset: int, size: int) -> int:
        """The value of a ``size``-byte read at ``offset`` into the device's port range."""

    @abc.abstractmethod
    def pio_write(self, offset: int, size: int, value: int) -> None:
        """A ``size``-byte write of ``value`` at ``offset``."""


class StringPio(PioDevice):
    """A port device that serves string I/O (``rep insw``/``rep outsw``) in bulk: one exit, one call."""

    @abc.abstractmethod
    def pio_read_string(self, offset: int, size: int, count: int) -> bytes:
        """``count`` elements of ``size`` bytes read from the port at ``offset``."""

    @abc.abstractmethod
    def pio_write_string(self, offset: int, size: int, data: bytes) -> None:
        """``data`` (whole elements of ``size`` bytes) written to the port at ``offset``."""


class MmioDevice(abc.ABC):
    """A device on the MMIO bus (guest-physical addresses that are not RAM)."""

    @abc.abstractmethod
    def mmio_read(self, offset: int, size: int) -> int: ...

    @abc.abstractmethod
    def mmio_write(self, offset: int, size: int, value: int) -> None: ...


class Persistent(abc.ABC):
    """A device whose state survives a snapshot, a restore and a live migration."""

    @classmethod
    @abc.abstractmethod
    def state_type(cls) -> type:
        """The frozen dataclass :meth:`save` returns and :meth:`restore` takes (imported on call)."""

    @abc.abstractmethod
    def save(self) -> object:
        """The device's state as its state record."""

    @abc.abstractmethod
    def restore(self, state: object) -> None:
        """Fill the device from a record of :meth:`state_type`. Every value is checked against
        what the device can hold; anything else raises DeviceError and changes nothing."""


class QueueReplay(abc.ABC):
    """A device that must look at its queues once the whole machine state is back."""

    @abc.abstractmethod
    def replay_notifications(self) -> None:
        """Serve every queue once, as if the driver had just notified each."""
