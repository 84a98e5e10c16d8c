"""The split virtqueue on its own (virtio 1.2 §2.7): layout, chains, indices, notifications."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from virtio_rings import HOLE, INDIRECT, NEXT, WRITE, Allocator, FakeQueue, MiB, make_memory  # type: ignore[import-not-found]

from virtkit.devices.virtio import spec
from virtkit.devices.virtio.queue import ChainError, QueueConfigError, RingCorruptError, VirtQueue
from virtkit.memory import GuestMemory


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = make_memory()
    yield m
    m.close()


def make(mem: GuestMemory, size: int = 16, **kw: bool) -> tuple[VirtQueue, FakeQueue]:
    alloc = Allocator(mem, 0x10_0000, 0x40_0000)
    desc, avail, used = alloc.alloc(16 * size, 4096), alloc.alloc(6 + 2 * size, 4096), alloc.alloc(6 + 8 * size, 4096)
    return VirtQueue(mem, size, desc, avail, used, **kw), FakeQueue(mem, alloc, 0, size, desc, avail, used)


# --- configuration (§2.7: sizes and alignment) ------------------------------------------------------
@pytest.mark.parametrize("size", [0, 3, 100, 65536, 1 << 20])
def test_size_must_be_a_power_of_two_up_to_32768(mem: GuestMemory, size: int) -> None:
    with pytest.raises(QueueConfigError, match="power of two"):
        VirtQueue(mem, size, 0x10000, 0x20000, 0x30000)


def test_size_above_the_offered_maximum_is_refused(mem: GuestMemory) -> None:
    with pytest.raises(QueueConfigError):
        VirtQueue(mem, 512, 0x10000, 0x20000, 0x30000, max_size=256)


def test_largest_queue_is_accepted(mem: GuestMemory) -> None:
    q = VirtQueue(mem, spec.MAX_QUEUE_SIZE, 0x10_0000, 0x20_0000, 0x30_0000)
    assert q.pop_chain() is None


@pytest.mark.parametrize(
    "desc,avail,used,what",
    [
        (0x10008, 0x20000, 0x30000, "descriptor table"),  # 16-byte alignment
        (0x10000, 0x20001, 0x30000, "available ring"),  # 2
        (0x10000, 0x20000, 0x30002, "used ring"),  # 4
    ],
)
def test_misaligned_rings_are_refused(mem: GuestMemory, desc: int, avail: int, used: int, what: str) -> None:
    with pytest.raises(QueueConfigError, match=f"{what}.*aligned"):
        VirtQueue(mem, 16, desc, avail, used)


@pytest.mark.parametrize(
    "desc,avail,used",
    [
        (HOLE, 0x20000, 0x30000),  # in the hole between the RAM regions
        (0x10000, 4 * MiB - 8, 0x30000),  # straddles the end of the first region
        (0x10000, 0x20000, 9 * MiB - 16),  # runs off the end of RAM
        (0x10000, 0x20000, (1 << 64) - 64),  # near the top of the address space
    ],
)
def test_rings_outside_guest_ram_are_refused(mem: GuestMemory, desc: int, avail: int, used: int) -> None:
    with pytest.raises(QueueConfigError, match="not inside guest RAM"):
        VirtQueue(mem, 16, desc, avail, used)


# --- chains ------------------------------------------------------------------------------------------
def test_pop_and_push_a_mixed_chain(mem: GuestMemory) -> None:
    q, drv = make(mem)
    a, b, out = drv.buffer(b"head"), drv.buffer(b"er!"), drv.buffer(8)
    head = drv.add([(a, 4, False), (b, 3, False), (out, 8, True)])
    chain = q.pop_chain()
    assert chain is not None and chain.head == head and chain.fault is None
    assert chain.readable == [(a, 4), (b, 3)] and chain.writable == [(out, 8)]
    assert chain.read_all(limit=64) == b"header!"
    assert chain.read(3, offset=2) == b"ade"
    assert chain.write(b"xyz", offset=5) == 3
    assert mem.read(out, 8) == b"\0" * 5 + b"xyz"
    assert q.pop_chain() is None
    q.push_used(chain.head, 8)
    assert drv.take_used() == [(head, 8)]


def test_chain_helpers_never_cross_into_the_other_direction(mem: GuestMemory) -> None:
    q, drv = make(mem)
    r, w = drv.buffer(b"data"), drv.buffer(4)
    drv.add([(r, 4, False), (w, 4, True)])
    chain = q.pop_chain()
    assert chain is not None
    with pytest.raises(ChainError):
        chain.write(b"12345")  # only 4 writable bytes; the readable buffer is never written
    with pytest.raises(ChainError):
        chain.read(5)
    with pytest.raises(ChainError, match="more than"):
        chain.read_all(limit=3)
    assert mem.read(r, 4) == b"data"


def test_write_status_goes_to_the_last_writable_byte(mem: GuestMemory) -> None:
    q, drv = make(mem)
    w1, w2 = drv.buffer(4), drv.buffer(2)
    drv.add([(w1, 4, True), (w2, 2, True)])
    chain = q.pop_chain()
    assert chain is not None and chain.write_status(0xAB)
    assert mem.read(w2, 2) == b"\0\xab" and mem.read(w1, 4) == bytes(4)


def test_zero_length_descriptors_are_ignored(mem: GuestMemory) -> None:
    q, drv = make(mem)
    w = drv.buffer(4)
    drv.add([(HOLE, 0, False), (w, 4, True)])  # a zero-length buffer may point anywhere: it is never touched
    chain = q.pop_chain()
    assert chain is not None and chain.fault is None and chain.readable == [] and chain.writable == [(w, 4)]


def test_indices_wrap_at_2_to_the_16(mem: GuestMemory) -> None:
    q, drv = make(mem, size=4)
    q.next_avail = q.next_used = q.last_signalled = 0xFFFE
    drv.set_avail_idx(0xFFFE)
    drv.last_used = 0xFFFE
    heads = []
    for i in range(6):
        buf = drv.buffer(1)
        heads.append(drv.add([(buf, 1, True)]))
        chain = q.pop_chain()
        assert chain is not None and chain.head == heads[-1]
        q.push_used(chain.head, 1)
        assert drv.take_used() == [(heads[-1], 1)], i
    assert q.next_avail == q.next_used == 4


def test_indirect_table(mem: GuestMemory) -> None:
    q, drv = make(mem, indirect=True)
    r, w = drv.buffer(b"abc"), drv.buffer(5)
    head = drv.add([(r, 3, False), (w, 5, True)], indirect=True)
    chain = q.pop_chain()
    assert chain is not None and chain.head == head and chain.fault is None
    assert chain.readable == [(r, 3)] and chain.writable == [(w, 5)]


def test_direct_descriptors_followed_by_an_indirect_one(mem: GuestMemory) -> None:
    # §2.7.5.3.2: "zero or more normal chained descriptors followed by a single ... INDIRECT"
    q, drv = make(mem, indirect=True)
    r, w = drv.buffer(b"hdr"), drv.buffer(2)
    table = drv.alloc.alloc(16, 16)
    drv.write_desc(0, w, 2, WRITE, table=table)
    drv.write_desc(0, r, 3, NEXT, 1)
    drv.write_desc(1, table, 16, INDIRECT | WRITE)  # the WRITE flag of an indirect descriptor is ignored
    drv.publish(0)
    chain = q.pop_chain()
    assert chain is not None and chain.readable == [(r, 3)] and chain.writable == [(w, 2)]


# --- notifications (§2.7.7, §2.7.10) ----------------------------------------------------------------
def pump(q: VirtQueue, drv: FakeQueue, n: int) -> None:
    for _ in range(n):
        drv.add([(drv.buffer(1), 1, True)])
        chain = q.pop_chain()
        assert chain is not None
        q.push_used(chain.head, 0)
        drv.take_used()


def test_interrupt_unless_no_interrupt_flag(mem: GuestMemory) -> None:
    q, drv = make(mem)
    assert not q.needs_interrupt()  # nothing used yet
    pump(q, drv, 1)
    assert q.needs_interrupt()
    assert not q.needs_interrupt()  # nothing new since
    drv.avail_flags = spec.VIRTQ_AVAIL_F_NO_INTERRUPT
    pump(q, drv, 1)
    assert not q.needs_interrupt()


def test_event_idx_interrupts_when_used_idx_passes_used_event(mem: GuestMemory) -> None:
    q, drv = make(mem, event_idx=True)
    drv.avail_flags = spec.VIRTQ_AVAIL_F_NO_INTERRUPT  # ignored with EVENT_IDX (§2.7.7.2)
    drv.used_event = 0
    pump(q, drv, 1)
    assert q.needs_interrupt()  # wrote element 0 == used_event
    drv.used_event = 4
    pump(q, drv, 2)  # elements 1, 2
    assert not q.needs_interrupt()
    pump(q, drv, 3)  # elements 3, 4, 5: crossed 4
    assert q.needs_interrupt()
    pump(q, drv, 1)
    assert not q.needs_interrupt()


def test_event_idx_across_the_16_bit_wrap(mem: GuestMemory) -> None:
    q, drv = make(mem, size=4, event_idx=True)
    q.next_avail = q.next_used = q.last_signalled = 0xFFFE
    drv.set_avail_idx(0xFFFE)
    drv.last_used = 0xFFFE
    drv.used_event = 0x0000  # the element written when used.idx goes 0 -> 1
    pump(q, drv, 2)  # 0xFFFE, 0xFFFF
    assert not q.needs_interrupt()
    pump(q, drv, 1)  # 0x0000
    assert q.needs_interrupt()


def test_available_notification_suppression_without_event_idx(mem: GuestMemory) -> None:
    q, drv = make(mem)
    q.disable_notifications()
    assert drv.used_flags == spec.VIRTQ_USED_F_NO_NOTIFY
    assert q.enable_notifications() is False
    assert drv.used_flags == 0
    q.disable_notifications()
    drv.add([(drv.buffer(1), 1, True)])
    assert q.enable_notifications() is True  # a buffer slipped in while notifications were off


def test_available_notification_suppression_with_event_idx(mem: GuestMemory) -> None:
    q, drv = make(mem, event_idx=True)
    pump(q, drv, 3)
    q.disable_notifications()
    assert drv.used_flags == 0  # §2.7.10.2: flags stay 0 with EVENT_IDX
    assert q.enable_notifications() is False
    assert drv.avail_event == 3  # notify me when the driver fills entry 3


def test_save_and_restore(mem: GuestMemory) -> None:
    q, drv = make(mem, event_idx=True, indirect=True)
    pump(q, drv, 5)
    drv.add([(drv.buffer(1), 1, True)])
    state = q.save()
    q2 = VirtQueue.from_state(mem, state)
    assert q2.save() == state
    chain = q2.pop_chain()
    assert chain is not None
    q2.push_used(chain.head, 1)
    assert drv.take_used() == [(chain.head, 1)]


def test_restore_refuses_a_state_that_does_not_fit_this_memory(mem: GuestMemory) -> None:
    q, _ = make(mem)
    state = dataclasses.replace(q.save(), used_ring=HOLE)
    with pytest.raises(QueueConfigError):
        VirtQueue.from_state(mem, state)


# --- hostile rings at the queue level (the device-level consequences are in test_hostile.py) --------
def corrupt(q: VirtQueue, match: str) -> None:
    with pytest.raises(RingCorruptError, match=match):
        q.pop_chain()
    assert q.broken is not None
    assert q.pop_chain() is None and q.enable_notifications() is False and q.pending() == 0


def test_descriptor_loop(mem: GuestMemory) -> None:
    q, drv = make(mem)
    buf = drv.buffer(4)
    drv.write_desc(0, buf, 4, NEXT, 1)
    drv.write_desc(1, buf, 4, NEXT, 0)
    drv.publish(0)
    corrupt(q, "longer than the queue size")


def test_self_loop(mem: GuestMemory) -> None:
    q, drv = make(mem)
    drv.write_desc(5, drv.buffer(4), 4, NEXT, 5)
    drv.publish(5)
    corrupt(q, "longer than the queue size")


def test_loop_inside_an_indirect_table(mem: GuestMemory) -> None:
    q, drv = make(mem, indirect=True)
    table = drv.alloc.alloc(32, 16)
    drv.write_desc(0, drv.buffer(4), 4, NEXT, 1, table=table)
    drv.write_desc(1, drv.buffer(4), 4, NEXT, 0, table=table)
    drv.write_desc(0, table, 32, INDIRECT)
    drv.publish(0)
    corrupt(q, "longer than the queue size")


def test_direct_plus_indirect_longer_than_the_queue(mem: GuestMemory) -> None:
    q, drv = make(mem, size=8, indirect=True)
    table = drv.alloc.alloc(16 * 8, 16)
    for i in range(8):
        drv.write_desc(i, drv.buffer(1), 1, NEXT if i < 7 else 0, i + 1, table=table)
    for i in range(4):
        drv.write_desc(i, drv.buffer(1), 1, NEXT, i + 1)
    drv.write_desc(4, table, 16 * 8, INDIRECT)
    drv.publish(0)
    corrupt(q, "longer than the queue size")


@pytest.mark.parametrize("head", [16, 0xFFFF])
def test_head_outside_the_table(mem: GuestMemory, head: int) -> None:
    q, drv = make(mem)
    drv.publish(head)
    corrupt(q, "outside a table")


def test_next_outside_the_table(mem: GuestMemory) -> None:
    q, drv = make(mem)
    drv.write_desc(0, drv.buffer(4), 4, NEXT, 16)
    drv.publish(0)
    corrupt(q, "outside a table")


@pytest.mark.parametrize("ahead", [17, 0x8000, 0xFFFF])  # 0xFFFF: the driver moved idx backwards by one
def test_avail_idx_too_far_ahead(mem: GuestMemory, ahead: int) -> None:
    q, drv = make(mem)
    drv.set_avail_idx(ahead)
    corrupt(q, "ahead of the device")


@pytest.mark.parametrize(
    "setup,match",
    [
        ("nested", "inside an indirect table"),
        ("next", "NEXT set"),
        ("len24", "whole number"),
        ("len0", "whole number"),
        ("too_long", "longer than the queue size"),
        ("outside", "outside guest RAM"),
        ("overflow", "outside guest RAM"),
    ],
)
def test_bad_indirect_tables(mem: GuestMemory, setup: str, match: str) -> None:
    q, drv = make(mem, indirect=True)
    table = drv.alloc.alloc(16 * 64, 16)
    drv.write_desc(0, drv.buffer(4), 4, table=table)
    addr, length, flags = table, 16, INDIRECT
    if setup == "nested":
        inner = drv.alloc.alloc(16, 16)
        drv.write_desc(0, inner, 16, INDIRECT, table=table)
    elif setup == "next":
        flags |= NEXT
    elif setup == "len24":
        length = 24
    elif setup == "len0":
        length = 0
    elif setup == "too_long":
        length = 16 * 17  # 17 entries for a queue of 16
    elif setup == "outside":
        addr = HOLE
    elif setup == "overflow":
        addr, length = (1 << 64) - 16, 32
    drv.write_desc(0, addr, length, flags, 1)
    drv.write_desc(1, drv.buffer(1), 1)
    drv.publish(0)
    corrupt(q, match)


def test_indirect_without_the_feature(mem: GuestMemory) -> None:
    q, drv = make(mem, indirect=False)
    drv.add([(drv.buffer(4), 4, False)], indirect=True)
    corrupt(q, "without VIRTIO_F_INDIRECT_DESC")


@pytest.mark.parametrize(
    "addr,length,match",
    [
        (HOLE, 16, "outside guest RAM"),
        (4 * MiB - 8, 16, "outside guest RAM"),  # straddles the end of a region
        ((1 << 64) - 8, 16, "wraps past 2\\^64"),
        ((1 << 64) - 1, 0xFFFF_FFFF, "wraps past 2\\^64"),
    ],
)
def test_buffers_outside_guest_ram_fault_the_chain_not_the_queue(
    mem: GuestMemory, addr: int, length: int, match: str
) -> None:
    q, drv = make(mem)
    status = drv.buffer(1)
    drv.add([(addr, length, False), (status, 1, True)])
    chain = q.pop_chain()
    assert chain is not None and chain.fault is not None
    assert chain.fault and __import__("re").search(match, chain.fault)
    with pytest.raises(ChainError):
        chain.read(1)
    with pytest.raises(ChainError):
        chain.writable_views()
    assert chain.write_status(1)  # the status byte itself is fine
    assert mem.read(status, 1) == b"\x01"
    q.push_used(chain.head, 1)
    # the queue is not broken: the next request goes through
    drv.add([(drv.buffer(1), 1, True)])
    nxt = q.pop_chain()
    assert nxt is not None and nxt.fault is None and q.broken is None


def test_status_byte_outside_ram_is_not_written(mem: GuestMemory) -> None:
    q, drv = make(mem)
    drv.add([(drv.buffer(16), 16, False), (HOLE, 1, True)])
    chain = q.pop_chain()
    assert chain is not None and chain.fault is not None
    assert chain.write_status(0) is False


def test_readable_after_writable_faults_the_chain(mem: GuestMemory) -> None:
    q, drv = make(mem)
    drv.add([(drv.buffer(4), 4, True), (drv.buffer(4), 4, False)])
    chain = q.pop_chain()
    assert chain is not None and chain.fault is not None and "follows a device-writable" in chain.fault


def test_chain_longer_than_4_gib_faults(mem: GuestMemory) -> None:
    # 1025 buffers of the whole 4 MiB region each: every one valid, together more than 2^32 bytes
    q, drv = make(mem, size=2048)
    n = (1 << 32) // (4 * MiB) + 1
    for i in range(n):
        drv.write_desc(i, 0, 4 * MiB, NEXT if i < n - 1 else 0, i + 1)
    drv.publish(0)
    chain = q.pop_chain()
    assert chain is not None and chain.fault is not None and "2^32" in chain.fault
