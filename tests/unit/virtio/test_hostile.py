"""Hostile rings, end to end through the transport (the policy is in docs/VIRTIO.md).

Every case ends one of two ways: the request fails (blk status IOERR, or the chain returned with
length 0) and the queue goes on, or the device is marked DEVICE_NEEDS_RESET (§2.1.2) with a
configuration change interrupt and the offending queue stops. Either way nothing raises into the
VMM, nothing outside guest RAM is touched, and other queues and devices keep working.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from virtio_driver import HOLE, INDIRECT, NEXT, WRITE, FakeQueue, Machine, MiB, Rig  # type: ignore[import-not-found]

from virtkit.devices.virtio import spec
from virtkit.devices.virtio.blk import BlockDevice
from virtkit.devices.virtio.blk import device as blk
from virtkit.devices.virtio.console import ConsoleDevice
from virtkit.devices.virtio.mmio import Reg
from virtkit.devices.virtio.rng import RngDevice

S = spec.DeviceStatus


def rng_works(rig: Rig) -> None:
    q = rig.driver.queues[0]
    head = q.add([(q.buffer(8), 8, True)])
    rig.driver.kick(0)
    assert q.take_used() == [(head, 8)]


def blk_read(rig: Rig, q: FakeQueue, sector: int = 0) -> int:
    hdr = q.buffer(struct.pack("<IIQ", blk.T_IN, 0, sector))
    status = q.buffer(b"\xff")
    q.add([(hdr, 16, False), (q.buffer(512), 512, True), (status, 1, True)])
    rig.driver.kick(0)
    q.take_used()
    return rig.transport.memory.read(status, 1)[0]


@pytest.fixture
def rigs(machine: Machine, image: Path) -> tuple[Rig, FakeQueue, Rig]:
    """A disk with a queue of 16 and, next to it, an entropy device that must stay healthy."""
    disk = machine.attach(BlockDevice(image, queue_size=16))
    (q,) = disk.driver.init()
    rng = machine.attach(RngDevice())
    rng.driver.init()
    return disk, q, rng


def assert_broken(disk: Rig, q: FakeQueue, rng: Rig, match: str) -> None:
    assert disk.driver.needs_reset, "device should be marked DEVICE_NEEDS_RESET"
    assert disk.transport.needs_reset_reason is not None and match in disk.transport.needs_reset_reason
    # §2.1.2: with DRIVER_OK set, NEEDS_RESET comes with a configuration change notification
    assert disk.driver.rd(Reg.INTERRUPT_STATUS) & spec.InterruptReason.CONFIG_CHANGE
    assert disk.transport.internal_errors == 0
    # the stopped queue is not touched again
    used_before = q.used_idx
    disk.transport.notify(0)
    assert q.used_idx == used_before
    rng_works(rng)
    # and a reset brings the device back
    (q2,) = disk.driver.init()
    assert blk_read(disk, q2) == blk.S_OK and not disk.driver.needs_reset


# --- cases that break the device ------------------------------------------------------------------
def loop(q: FakeQueue) -> None:
    buf = q.buffer(16)
    q.write_desc(0, buf, 16, NEXT, 1)
    q.write_desc(1, buf, 16, NEXT, 2)
    q.write_desc(2, buf, 16, NEXT, 0)
    q.publish(0)


def longer_than_queue(q: FakeQueue) -> None:
    table = q.alloc.alloc(16 * 16, 16)
    for i in range(16):
        q.write_desc(i, q.buffer(1), 1, NEXT if i < 15 else 0, i + 1, table=table)
    q.write_desc(0, q.buffer(16), 16, NEXT, 1)  # one direct descriptor + 16 indirect ones: 17 > 16
    q.write_desc(1, table, 16 * 16, INDIRECT)
    q.publish(0)


def indirect(
    length_entries: int = 2, *, addr_offset: int = 0, length_extra: int = 0, nested: bool = False, flags: int = 0
) -> Callable[[FakeQueue], None]:
    def build(q: FakeQueue) -> None:
        table = q.alloc.alloc(16 * 64, 16)
        q.write_desc(0, q.buffer(16), 16, NEXT, 1, table=table)
        if nested:
            q.write_desc(1, q.alloc.alloc(16, 16), 16, INDIRECT, table=table)
        else:
            q.write_desc(1, q.buffer(1), 1, WRITE, table=table)
        q.write_desc(0, table + addr_offset, 16 * length_entries + length_extra, INDIRECT | flags, 1)
        q.write_desc(1, q.buffer(1), 1, WRITE)
        q.publish(0)

    return build


def test_an_indirect_table_needs_no_16_byte_alignment(rigs: tuple[Rig, FakeQueue, Rig]) -> None:
    """§2.7.5.3 asks an indirect table for whole descriptors only; Linux's kmalloc'd tables are
    8-byte aligned (found when a Linux guest's first virtio-blk read reset the device)."""
    disk, q, _ = rigs
    table = q.alloc.alloc(16 * 4, 16) + 8
    hdr, data, status = q.buffer(struct.pack("<IIQ", blk.T_IN, 0, 0)), q.buffer(512), q.buffer(b"\xff")
    q.write_desc(0, hdr, 16, NEXT, 1, table=table)
    q.write_desc(1, data, 512, WRITE | NEXT, 2, table=table)
    q.write_desc(2, status, 1, WRITE, table=table)
    q.write_desc(0, table, 16 * 3, INDIRECT)
    q.publish(0)
    disk.driver.kick(0)
    q.take_used()
    assert disk.transport.memory.read(status, 1)[0] == blk.S_OK
    assert not disk.driver.needs_reset


def avail_idx_ahead(q: FakeQueue) -> None:
    q.set_avail_idx(q.avail_idx + 17)  # 16 outstanding is the most a queue of 16 can hold


def head_out_of_range(q: FakeQueue) -> None:
    q.publish(16)


def next_out_of_range(q: FakeQueue) -> None:
    q.write_desc(0, q.buffer(16), 16, NEXT, 999)
    q.publish(0)


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (loop, "longer than the queue size"),
        (longer_than_queue, "longer than the queue size"),
        (indirect(17), "longer than the queue size"),  # too long for a queue of 16
        (indirect(nested=True), "inside an indirect table"),  # nested
        (indirect(length_extra=8), "whole number"),  # length not a multiple of 16
        (indirect(flags=NEXT), "NEXT set"),
        (avail_idx_ahead, "ahead of the device"),
        (head_out_of_range, "outside a table"),
        (next_out_of_range, "outside a table"),
    ],
    ids=[
        "loop",
        "chain>size",
        "indirect-too-long",
        "indirect-nested",
        "indirect-len",
        "indirect+next",
        "avail-idx",
        "head",
        "next",
    ],
)
def test_corrupt_ring_marks_the_device_broken(
    rigs: tuple[Rig, FakeQueue, Rig], corrupt: Callable[[FakeQueue], None], match: str
) -> None:
    disk, q, rng = rigs
    assert blk_read(disk, q) == blk.S_OK
    corrupt(q)
    disk.driver.kick(0)
    assert_broken(disk, q, rng, match)


def test_indirect_table_outside_ram(rigs: tuple[Rig, FakeQueue, Rig]) -> None:
    disk, q, rng = rigs
    q.write_desc(0, HOLE, 32, INDIRECT)
    q.publish(0)
    disk.driver.kick(0)
    assert_broken(disk, q, rng, "outside guest RAM")


def test_indirect_without_negotiating_it(machine: Machine, image: Path) -> None:
    disk = machine.attach(BlockDevice(image, queue_size=16))
    (q,) = disk.driver.init(drop=spec.F_INDIRECT_DESC)
    rng = machine.attach(RngDevice())
    rng.driver.init()
    q.add([(q.buffer(16), 16, False), (q.buffer(1), 1, True)], indirect=True)
    disk.driver.kick(0)
    assert_broken(disk, q, rng, "VIRTIO_F_INDIRECT_DESC")


@pytest.mark.parametrize("size", [3, 12, 32, 65536], ids=["3", "12", "above-num-max", "above-32768"])
def test_bad_queue_size_marks_the_device_broken(machine: Machine, size: int) -> None:
    rig = machine.attach(RngDevice(queue_size=16))
    rig.driver.negotiate()
    rig.driver.setup_queue(0, size, desc=0x20_0000, avail=0x20_1000, used=0x20_2000)
    assert rig.driver.rd(Reg.QUEUE_READY) == 0  # the queue was never enabled
    assert rig.driver.needs_reset and "power of two" in rig.transport.needs_reset_reason
    rig.driver.set_status(S.DRIVER_OK)  # a driver that goes on anyway is told, and gets nothing served
    assert rig.driver.rd(Reg.INTERRUPT_STATUS) == spec.InterruptReason.CONFIG_CHANGE
    (q,) = rig.driver.init()  # after reset, a correct setup works
    rng_works(rig)


@pytest.mark.parametrize("where", ["desc", "avail", "used"])
def test_misaligned_rings_mark_the_device_broken(machine: Machine, where: str) -> None:
    rig = machine.attach(RngDevice())
    rig.driver.negotiate()
    addrs = {"desc": 0x20_0000, "avail": 0x20_1000, "used": 0x20_2000}
    addrs[where] += {"desc": 8, "avail": 1, "used": 2}[where]
    rig.driver.setup_queue(0, 16, **addrs)
    assert rig.driver.rd(Reg.QUEUE_READY) == 0
    assert rig.driver.needs_reset and "aligned" in rig.transport.needs_reset_reason
    assert rig.irq.triggers == 0  # before DRIVER_OK: no configuration change interrupt (§2.1.2)


@pytest.mark.parametrize("where", ["desc", "avail", "used"])
def test_rings_outside_ram_mark_the_device_broken(machine: Machine, where: str) -> None:
    rig = machine.attach(RngDevice())
    rig.driver.negotiate()
    addrs = {"desc": 0x20_0000, "avail": 0x20_1000, "used": 0x20_2000}
    addrs[where] = {"desc": HOLE, "avail": 9 * MiB - 2, "used": (1 << 64) - 4096}[where]
    rig.driver.setup_queue(0, 16, **addrs)
    assert rig.driver.needs_reset and "not inside guest RAM" in rig.transport.needs_reset_reason


def test_a_broken_queue_leaves_the_other_queue_working(machine: Machine) -> None:
    out = bytearray()
    rig = machine.attach(ConsoleDevice(out.extend))
    rx, tx = rig.driver.init()
    loop(tx)
    rig.driver.kick(1)
    assert rig.driver.needs_reset
    rx.add([(rx.buffer(8), 8, True)])
    rig.driver.kick(0)
    rig.device.receive(b"still")  # the receive queue is intact and keeps serving
    assert [n for _, n in rx.take_used()] == [5]
    rig.transport.mmio_write(0x100 + 8, 4, ord("!"))  # and so does the emergency write
    assert out == b"!" and rig.transport.internal_errors == 0


def test_a_broken_receiveq_leaves_transmit_working(machine: Machine) -> None:
    out = bytearray()
    rig = machine.attach(ConsoleDevice(out.extend))
    rx, tx = rig.driver.init()
    rx.set_avail_idx(0x9000)
    rig.device.receive(b"input")  # host input meets a corrupt ring: no exception in the host thread
    assert rig.driver.needs_reset
    tx.add([(tx.buffer(b"out"), 3, False)])
    rig.driver.kick(1)
    assert out == b"out"


# --- cases that fail one request --------------------------------------------------------------------
def blk_chain(q: FakeQueue, bufs: list[tuple[int, int, bool]]) -> int:
    status = q.buffer(b"\xff")
    q.add([*bufs, (status, 1, True)])
    return status


@pytest.mark.parametrize(
    "case", ["data-in-hole", "data-past-ram", "data-straddles-region", "header-in-hole", "overflow", "huge-len"]
)
def test_buffers_outside_ram_fail_the_request(rigs: tuple[Rig, FakeQueue, Rig], case: str) -> None:
    disk, q, rng = rigs
    hdr = q.buffer(struct.pack("<IIQ", blk.T_IN, 0, 0))
    data = {
        "data-in-hole": (HOLE, 512),
        "data-past-ram": (9 * MiB - 256, 512),
        "data-straddles-region": (4 * MiB - 256, 512),
        "header-in-hole": (q.buffer(512), 512),
        "overflow": ((1 << 64) - 256, 512),
        "huge-len": (q.buffer(512), 0xFFFF_FFFF),
    }[case]
    first = (HOLE, 16, False) if case == "header-in-hole" else (hdr, 16, False)
    status = blk_chain(q, [first, (*data, True)])
    disk.driver.kick(0)
    assert q.take_used()[0][1] == 0  # used length: nothing claimed
    assert disk.transport.memory.read(status, 1)[0] == blk.S_IOERR
    assert disk.device.failed_requests == 1 and not disk.driver.needs_reset
    assert blk_read(disk, q) == blk.S_OK  # the queue goes on
    rng_works(rng)


def test_writable_buffer_where_the_device_must_read(rigs: tuple[Rig, FakeQueue, Rig], image: Path) -> None:
    disk, q, rng = rigs
    hdr = q.buffer(struct.pack("<IIQ", blk.T_OUT, 0, 0))
    data = q.buffer(b"W" * 512)
    status = blk_chain(q, [(hdr, 16, False), (data, 512, True)])  # write data marked device-writable
    disk.driver.kick(0)
    q.take_used()
    assert disk.transport.memory.read(status, 1)[0] == blk.S_IOERR
    assert image.read_bytes()[:512] == bytes(512)  # nothing was written to the disk
    assert blk_read(disk, q) == blk.S_OK


def test_header_in_a_writable_buffer(rigs: tuple[Rig, FakeQueue, Rig]) -> None:
    disk, q, rng = rigs
    hdr = q.buffer(struct.pack("<IIQ", blk.T_IN, 0, 0))
    status = blk_chain(q, [(hdr, 16, True), (q.buffer(512), 512, True)])
    disk.driver.kick(0)
    q.take_used()
    assert disk.transport.memory.read(status, 1)[0] == blk.S_IOERR


def test_device_never_writes_into_a_readable_buffer(rigs: tuple[Rig, FakeQueue, Rig], image: Path) -> None:
    disk, q, rng = rigs
    with open(image, "r+b") as f:
        f.write(b"S" * 512)
    hdr = q.buffer(struct.pack("<IIQ", blk.T_IN, 0, 0))
    data = q.buffer(b"r" * 512)
    status = blk_chain(q, [(hdr, 16, False), (data, 512, False)])  # read target marked device-readable
    disk.driver.kick(0)
    q.take_used()
    assert disk.transport.memory.read(status, 1)[0] == blk.S_IOERR
    assert disk.transport.memory.read(data, 512) == b"r" * 512  # refused: left as it was
    rq = rng.driver.queues[0]
    ro = rq.buffer(b"keep")
    rq.add([(ro, 4, False)])
    rng.driver.kick(0)
    assert rq.take_used()[0][1] == 0 and rng.transport.memory.read(ro, 4) == b"keep"


def test_readable_after_writable_fails_the_request(rigs: tuple[Rig, FakeQueue, Rig]) -> None:
    disk, q, rng = rigs
    hdr = q.buffer(struct.pack("<IIQ", blk.T_IN, 0, 0))
    q.add([(q.buffer(512), 512, True), (hdr, 16, False), (q.buffer(1), 1, True)])
    disk.driver.kick(0)
    assert q.take_used()[0][1] == 0 and disk.device.failed_requests == 1
    assert blk_read(disk, q) == blk.S_OK


def test_request_without_a_status_byte(rigs: tuple[Rig, FakeQueue, Rig]) -> None:
    disk, q, rng = rigs
    head = q.add([(q.buffer(struct.pack("<IIQ", blk.T_IN, 0, 0)), 16, False)])
    disk.driver.kick(0)
    assert q.take_used() == [(head, 0)] and "status byte" in (disk.device.last_failure or "")
    assert blk_read(disk, q) == blk.S_OK


def test_status_byte_outside_ram(rigs: tuple[Rig, FakeQueue, Rig]) -> None:
    disk, q, rng = rigs
    hdr = q.buffer(struct.pack("<IIQ", blk.T_IN, 0, 0))
    head = q.add([(hdr, 16, False), (q.buffer(512), 512, True), (HOLE, 1, True)])
    disk.driver.kick(0)
    assert q.take_used() == [(head, 0)]
    assert blk_read(disk, q) == blk.S_OK


def test_rings_overlapping_each_other_do_not_hurt_the_host(machine: Machine) -> None:
    # The driver only hurts itself when its rings overlap: the device still only writes the used ring.
    rig = machine.attach(RngDevice(queue_size=16))
    rig.driver.negotiate()
    base = 0x30_0000
    q = rig.driver.setup_queue(0, 16, desc=base, avail=base, used=base)
    rig.driver.set_status(S.DRIVER_OK)
    q.set_avail_idx(1)
    rig.driver.kick(0)
    assert rig.transport.internal_errors == 0


# --- what one request may move ----------------------------------------------------------------------
def test_one_console_request_cannot_stream_more_than_its_bound(machine: Machine) -> None:
    """63 descriptors each covering all of a 4 MiB RAM region used to stream 252 MiB to the host
    from one request (4.2 GB with 64 MiB of RAM). Overlapping buffers make the guest's RAM size
    no bound at all: the device's request bound is."""
    out = bytearray()
    rig = machine.attach(ConsoleDevice(out.extend))
    _, tx = rig.driver.init()
    head = tx.add([(0, 4 * MiB, False)] * 63)
    rig.driver.kick(1)
    assert tx.take_used() == [(head, 0)]
    assert out == b"" and rig.device.failed_requests == 1
    assert "most this device takes in one request" in (rig.device.last_failure or "")
    tx.add([(tx.buffer(b"ok"), 2, False)])  # the queue goes on
    rig.driver.kick(1)
    assert out == b"ok" and not rig.driver.needs_reset


def test_every_device_bounds_its_requests(image: Path) -> None:
    """No device may leave a request unbounded, except one that bounds its own work (rng fills
    at most max_request bytes of any buffer)."""
    assert ConsoleDevice(lambda b: None).max_request_bytes <= 1 << 20
    disk = BlockDevice(image)
    try:
        assert disk.max_request_bytes == blk.HEADER.size + (256 - 2) * blk.SIZE_MAX + 1 <= 32 << 20
    finally:
        disk.close()
    assert RngDevice().max_request <= 64 << 10


def test_a_disk_request_beyond_seg_max_times_size_max_fails(rigs: tuple[Rig, FakeQueue, Rig]) -> None:
    disk, q, rng = rigs
    assert disk.driver.config(8, 4) == blk.SIZE_MAX  # size_max is offered to the driver (§5.2.4)
    hdr = q.buffer(struct.pack("<IIQ", blk.T_IN, 0, 0))
    bound = disk.device.max_request_bytes  # 16 + 14 * SIZE_MAX + 1 with this 16-entry queue
    assert bound < 3 * MiB  # so the data buffers below are guest RAM: only the bound can refuse them
    # at the bound: header, 14 data segments of SIZE_MAX, status
    data = 2 * MiB  # past both rigs' slices (1-2 MiB), inside the 4 MiB region
    status = blk_chain(q, [(hdr, 16, False), *[(data + i * blk.SIZE_MAX, blk.SIZE_MAX, True) for i in range(14)]])
    disk.driver.kick(0)
    assert disk.transport.memory.read(status, 1)[0] == blk.S_OK
    assert q.take_used()[0][1] == bound - 16
    # one sector more than the bound
    status = blk_chain(q, [(hdr, 16, False), (data, bound - 17 + 512, True)])
    disk.driver.kick(0)
    assert q.take_used()[-1][1] == 0
    assert disk.transport.memory.read(status, 1)[0] == blk.S_IOERR
    assert "most this device takes in one request" in (disk.device.last_failure or "")
    assert blk_read(disk, q) == blk.S_OK
