"""Which pages the source sends again: what the guest wrote (KVM's log) and what host code wrote
into guest RAM, including a write that lands after the drain that first reported its page."""

from __future__ import annotations

from typing import cast

from virtkit.memory import GuestMemory
from virtkit.vm import Machine

MiB = 1 << 20


class _NoGuestWrites:
    def get_dirty_log(self, slot: int, npages: int) -> bytes:
        return bytes((npages + 7) // 8)


class _Machine:
    """Just what Machine.dirty_pages() reads: guest memory and a VM whose dirty log is empty."""

    def __init__(self) -> None:
        self.memory = GuestMemory([(0, 2 * MiB)])
        for slot, r in enumerate(self.memory.regions):
            r.slot = slot
        self.memory.track_host_writes(True)
        self.vm = _NoGuestWrites()
        self._host_dirty_before: set[int] = set()

    def dirty(self) -> list[int]:
        return Machine.dirty_pages(cast(Machine, self))


def test_a_device_write_that_lands_after_a_drain_is_sent_again() -> None:
    m = _Machine()
    buffer = m.memory.view(0x5000, 4096)  # a device takes a view: the page is marked now...
    assert m.dirty() == [0x5000]  # ...a pre-copy round sends it, before the data is there
    buffer[:4] = b"data"  # the disk read lands
    assert m.dirty() == [0x5000]  # the next round sends it again, with the data
    assert m.dirty() == []  # and then it is clean
    m.memory.close()


def test_reading_to_send_is_not_a_write() -> None:
    m = _Machine()
    m.memory.read_view(0, 2 * MiB)
    assert m.dirty() == []
    m.memory.close()
