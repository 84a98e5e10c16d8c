from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtkit.arch import layout
from virtkit.memory import GuestMemory, GuestMemoryError

MiB = 1 << 20


@pytest.fixture
def mem() -> GuestMemory:
    m = GuestMemory([(0, 4 * MiB), (8 * MiB, 1 * MiB)])
    yield m
    m.close()


def test_roundtrip_and_widths(mem: GuestMemory) -> None:
    mem.write(0x1000, b"hello")
    assert mem.read(0x1000, 5) == b"hello"
    mem.write_u64(0x2000, 0x1122334455667788)
    assert mem.read_u32(0x2000) == 0x55667788
    assert mem.read_u16(0x2006) == 0x1122
    mem.write_u32(8 * MiB, 0xDEADBEEF)
    assert mem.read(8 * MiB, 4) == bytes.fromhex("efbeadde")


def test_view_is_zero_copy(mem: GuestMemory) -> None:
    v = mem.view(0x3000, 4)
    v[:] = b"abcd"
    assert mem.read(0x3000, 4) == b"abcd"


@pytest.mark.parametrize(
    "gpa,length",
    [
        (4 * MiB, 1),  # just past the first region
        (4 * MiB - 2, 4),  # straddles the end of a region
        (6 * MiB, 1),  # in the hole between regions
        (9 * MiB, 1),  # past the end of RAM
        (-1, 1),  # negative address
        (0, -1),  # negative length
        (0x1000, 1 << 64),  # absurd length
        ((1 << 64) - 1, 2),  # address arithmetic that would wrap in C
    ],
)
def test_out_of_bounds_is_refused(mem: GuestMemory, gpa: int, length: int) -> None:
    with pytest.raises(GuestMemoryError):
        mem.read(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.view(gpa, length)
    assert not mem.contains(gpa, length)


@given(gpa=st.integers(min_value=-(1 << 65), max_value=1 << 65), length=st.integers(min_value=-10, max_value=1 << 40))
def test_any_range_is_inside_or_refused(gpa: int, length: int) -> None:
    m = GuestMemory([(0, 2 * MiB)])
    try:
        inside = gpa >= 0 and length >= 0 and gpa + length <= 2 * MiB and gpa < 2 * MiB
        if inside:
            assert len(m.view(gpa, length)) == length
        else:
            with pytest.raises(GuestMemoryError):
                m.view(gpa, length)
    finally:
        m.close()


def test_unaligned_region_is_refused() -> None:
    with pytest.raises(GuestMemoryError):
        GuestMemory([(0, 4097)])


def test_ram_ranges_split_around_the_mmio_hole() -> None:
    assert layout.ram_ranges(64 * MiB) == [(0, 64 * MiB)]
    big = 4 << 30
    assert layout.ram_ranges(big) == [(0, layout.MMIO_HOLE_START), (layout.MMIO_HOLE_END, big - layout.MMIO_HOLE_START)]


def test_host_writes_are_tracked_for_migration(mem: GuestMemory) -> None:
    mem.write(0x1000, b"x")
    assert mem.drain_host_dirty() == set()  # not tracking
    mem.track_host_writes(True)
    mem.write(0x1FFF, b"ab")  # straddles two pages
    mem.write_u32(0x5000, 1)
    mem.view(0x8000, 0x2000)  # a writable view counts as written
    mem.read(0xA000, 16)  # reads do not
    seen = mem.read_view(0xB000, 0x1000)  # nor a read-only view (what a migration source sends)
    assert seen.readonly
    with pytest.raises(TypeError):
        seen[0] = 1
    assert mem.drain_host_dirty() == {0x1000, 0x2000, 0x5000, 0x8000, 0x9000}
    assert mem.drain_host_dirty() == set()
    mem.track_host_writes(False)
    mem.write(0x1000, b"y")
    assert mem.drain_host_dirty() == set()
