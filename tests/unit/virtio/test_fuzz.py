"""Fuzzing the device side with random rings and random register traffic (hypothesis).

The oracle: nothing raises, no internal error is caught at the transport boundary, the only guest
bytes that change are in the used ring or in buffers the driver marked device-writable, and after
a reset the device serves a well-formed request again.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from virtio_driver import HOLE, INDIRECT, NEXT, RAM, WRITE, Machine, MiB, Rig, make_memory  # type: ignore[import-not-found]

from virtkit.devices.virtio import spec
from virtkit.devices.virtio.blk import BlockDevice
from virtkit.devices.virtio.blk import device as blk
from virtkit.devices.virtio.console import ConsoleDevice
from virtkit.devices.virtio.device import VirtioDevice
from virtkit.devices.virtio.mmio import CONFIG_OFFSET, Reg
from virtkit.devices.virtio.rng import RngDevice
from virtkit.memory import GuestMemory

QSIZE = 8
SLICE = 0x10_0000  # the first rig's slice: rings and indirect tables live here, buffers elsewhere
TABLES = (SLICE + 0x8000, SLICE + 0x9000)  # two indirect tables of up to QSIZE + 2 entries
DATA = 0x20_0000  # 64 KiB of buffers, filled with a pattern
DESC = struct.Struct("<QIHH")

# addresses a buffer may have: in the data area, at region edges, in the hole, past RAM, near 2^64
buffer_addr = st.one_of(
    st.integers(DATA, DATA + 0xFFFF),
    st.sampled_from(
        [
            0,
            4 * MiB - 1,
            4 * MiB - 512,
            4 * MiB,
            HOLE,
            8 * MiB,
            9 * MiB - 1,
            9 * MiB,
            (1 << 64) - 1,
            (1 << 64) - 512,
            1 << 63,
        ]
    ),
)
# an indirect descriptor points at one of the tables, or somewhere it must not (misaligned, outside)
indirect_addr = st.sampled_from([*TABLES, TABLES[0] + 8, HOLE, (1 << 64) - 16])
length = st.one_of(st.sampled_from([0, 1, 15, 16, 17, 512, 513, 4096, 0xFFFF_FFFF]), st.integers(0, 0x4000))
flags = st.one_of(st.sampled_from([0, WRITE, NEXT, NEXT | WRITE]), st.integers(0, 7), st.integers(0, 0xFFFF))
nxt = st.integers(0, QSIZE + 2)


@st.composite
def descriptor(draw: st.DrawFn) -> tuple[int, int, int, int]:
    f = draw(flags)
    addr = draw(indirect_addr if f & INDIRECT else buffer_addr)
    return (
        addr,
        draw(length) if not f & INDIRECT else draw(st.sampled_from([16, 32, 48, 24, 0, 16 * (QSIZE + 1)])),
        f,
        draw(nxt),
    )


rings = st.fixed_dictionaries(
    {
        "table": st.lists(descriptor(), min_size=QSIZE, max_size=QSIZE),
        "indirect": st.lists(st.lists(descriptor(), max_size=QSIZE + 2), min_size=2, max_size=2),
        # mostly valid heads and a consistent avail idx, so that many chains get as far as the device
        "heads": st.lists(
            st.one_of(st.integers(0, QSIZE - 1), st.integers(0, QSIZE + 1)), min_size=1, max_size=QSIZE + 2
        ),
        "avail_idx": st.one_of(st.none(), st.just(None), st.integers(0, 0xFFFF)),
        "features": st.sets(st.sampled_from([spec.F_EVENT_IDX, spec.F_INDIRECT_DESC])),
        "used_event": st.integers(0, 0xFFFF),
        "input": st.binary(max_size=64),
        "sector": st.sampled_from([0, 1, 7, 8191, 8192, 1 << 40]),
        "rtype": st.sampled_from([blk.T_IN, blk.T_OUT, blk.T_FLUSH, blk.T_GET_ID, 3]),
    }
)


class RamWatch:
    """Which guest bytes changed between take() and changed(). The copies go into buffers allocated
    once: a fresh 5 MiB object per snapshot would cost more in page faults than the fuzzing itself."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.before = [bytearray(size) for _, size in RAM]
        self.after = [bytearray(size) for _, size in RAM]

    def take(self) -> None:
        for buf, (gpa, size) in zip(self.before, RAM, strict=True):
            buf[:] = self.mem.view(gpa, size)

    def changed(self) -> list[int]:
        out = []
        for a, b, (base, size) in zip(self.before, self.after, RAM, strict=True):
            b[:] = self.mem.view(base, size)
            if a == b:
                continue
            for off in range(0, size, 4096):
                if a[off : off + 4096] != b[off : off + 4096]:
                    out.extend(base + off + i for i in range(4096) if a[off + i] != b[off + i])
        return out


def writable_ranges(mem: GuestMemory, table: list[tuple[int, int, int, int]]) -> list[tuple[int, int]]:
    """Every buffer any descriptor (direct, or in a table an indirect descriptor points to) marks
    device-writable: the device may write there and nowhere else but the used ring."""
    ranges = []
    for addr, size, f, _ in table:
        if f & INDIRECT:
            if addr % 16 == 0 and size % 16 == 0 and mem.contains(addr, size):
                for i in range(size // 16):
                    a, n, g, _ = DESC.unpack(mem.read(addr + 16 * i, 16))
                    if g & WRITE and not g & INDIRECT:
                        ranges.append((a, n))
        elif f & WRITE:
            ranges.append((addr, size))
    return ranges


def make_device(kind: str, image: Path) -> VirtioDevice:
    if kind == "blk":
        return BlockDevice(image, queue_size=QSIZE)
    if kind == "console":
        return ConsoleDevice(lambda data: None, queue_size=QSIZE)
    return RngDevice(queue_size=QSIZE)


def well_formed_request_works(rig: Rig, kind: str) -> None:
    queues = rig.driver.init()
    q = queues[-1] if kind == "console" else queues[0]
    if kind == "blk":
        hdr, status = q.buffer(struct.pack("<IIQ", blk.T_IN, 0, 0)), q.buffer(b"\xff")
        q.add([(hdr, 16, False), (q.buffer(512), 512, True), (status, 1, True)])
    else:
        q.add([(q.buffer(4), 4, kind == "rng")])
    rig.driver.kick(q.index)
    assert len(q.take_used()) == 1
    if kind == "blk":
        assert rig.transport.memory.read(status, 1) == b"\0"


# One guest memory and one image for all examples (zeroed / reused): mapping and faulting in fresh
# RAM for every example would dominate the run time.
@pytest.fixture(scope="module")
def ram() -> Iterator[GuestMemory]:
    mem = make_memory()
    yield mem
    mem.close()


@pytest.fixture(scope="module")
def watch(ram: GuestMemory) -> RamWatch:
    return RamWatch(ram)


@pytest.fixture(scope="module")
def fuzz_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = tmp_path_factory.mktemp("fuzz") / "fuzz.img"
    with open(image, "wb") as f:
        f.write(b"\x11" * 4096)
        f.truncate(4 << 20)
    return image


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["rng", "blk", "console"]), r=rings)
def test_random_rings(ram: GuestMemory, watch: RamWatch, fuzz_image: Path, kind: str, r: dict) -> None:  # type: ignore[type-arg]
    machine = Machine(ram)
    try:
        rig = machine.attach(make_device(kind, fuzz_image))
        run_random_rings(machine, rig, watch, kind, r)
    finally:
        machine.close()


def run_random_rings(machine: Machine, rig: Rig, watch: RamWatch, kind: str, r: dict) -> None:  # type: ignore[type-arg]
    mem, drv = machine.mem, rig.driver
    accept = spec.F_VERSION_1 | sum(r["features"])
    queues = drv.init(accept=accept, size=QSIZE)
    assert all(q.desc < DATA for q in queues)
    mem.write(DATA, b"\xa5" * 0x10000)
    for t, entries in zip(TABLES, r["indirect"], strict=True):
        for i, d in enumerate(entries):
            mem.write(t + 16 * i, DESC.pack(*d))
    for q in queues:
        for i, d in enumerate(r["table"]):
            q.write_desc(i, *d)
        for head in r["heads"]:
            q.publish(head)
        if r["avail_idx"] is not None:
            q.set_avail_idx(r["avail_idx"])
        q.used_event = r["used_event"]
        if kind == "blk":  # most heads should at least carry a plausible header
            hdr = struct.pack("<IIQ", r["rtype"], 0, r["sector"])
            for d in r["table"]:
                if not d[2] & (WRITE | INDIRECT) and DATA <= d[0] <= DATA + 0x10000 - 16:
                    mem.write(d[0], hdr)
    # every queue got the same table, so its writable buffers plus each used ring is the allowed set
    allowed = [(q.used, 6 + 8 * QSIZE) for q in queues] + writable_ranges(mem, r["table"])
    watch.take()

    for q in queues:
        drv.kick(q.index)
        rig.transport.notify(q.index)
    if kind == "console":
        rig.device.receive(r["input"])  # type: ignore[attr-defined]
    drv.kick(QSIZE)  # no such queue
    rig.transport.mmio_read(CONFIG_OFFSET, 4)

    assert rig.transport.internal_errors == 0
    # what happened, for --hypothesis-show-statistics: every outcome should be reached
    event("device needs reset" if drv.needs_reset else "device healthy")
    event("some request failed" if rig.device.failed_requests else "no request failed")
    event("some chain used" if any(q.used_idx for q in queues) else "no chain used")
    for gpa in watch.changed():
        assert any(start <= gpa < start + size for start, size in allowed), f"device wrote {gpa:#x}"
    drv.wr(Reg.STATUS, 0)
    well_formed_request_works(rig, kind)


registers = st.sampled_from([int(r) for r in Reg] + [0x0F8, 0x03C, 0x100, 0x104, 0x108])
accesses = st.lists(
    st.tuples(
        st.booleans(),
        registers,
        st.sampled_from([1, 2, 4, 8]),
        st.one_of(st.integers(0, 16), st.integers(0, 0xFFFF_FFFF)),
    ),
    max_size=60,
)


@settings(max_examples=100, deadline=None)
@given(kind=st.sampled_from(["rng", "console"]), ops=accesses)
def test_random_register_traffic(ram: GuestMemory, kind: str, ops: list[tuple[bool, int, int, int]]) -> None:
    machine = Machine(ram)
    try:
        rig = machine.attach(make_device(kind, Path("unused")))
        for is_write, offset, size, value in ops:
            if is_write:
                rig.transport.mmio_write(offset, size, value)
            else:
                rig.transport.mmio_read(offset, size)
        for q in range(3):
            rig.transport.notify(q)
        assert rig.transport.internal_errors == 0
        rig.driver.wr(Reg.STATUS, 0)
        well_formed_request_works(rig, kind)
    finally:
        machine.close()
