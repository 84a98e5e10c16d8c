"""The hypercall ABI against a real GuestMemory, including hostile blocks."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtkit.devices.disk import RawImage
from virtkit.devices.hypercall import ABI_VERSION, BLOCK_SIZE, PORT_SIGNATURE, HcError, Hypercall, HypercallDevice
from virtkit.memory import GuestMemory

MiB = 1 << 20
BLOCK = 0x1000


class Env:
    def __init__(self, disk: RawImage | None = None) -> None:
        self.mem = GuestMemory([(0, 2 * MiB)])
        self.out = bytearray()
        self.powered: list[int] = []
        self.dev = HypercallDevice(self.mem, self.out.extend, disk=disk, power_off=self.powered.append)

    def call(self, nr: int, *args: int, abi: int = ABI_VERSION, at: int = BLOCK) -> tuple[int, int]:
        a = list(args) + [0] * (5 - len(args))
        self.mem.write(at, struct.pack("<II5Qq Q".replace(" ", ""), nr, abi, *a, 12345, 0))
        self.dev.pio_write(0, 4, at)
        ret, value = struct.unpack("<qQ", self.mem.read(at + 48, 16))
        return ret, value


@pytest.fixture
def env() -> Env:
    e = Env()
    yield e
    e.mem.close()


def test_query_lists_every_call(env: Env) -> None:
    ret, value = env.call(Hypercall.QUERY)
    assert ret == 0 and all(value >> int(h) & 1 for h in Hypercall)
    assert env.dev.pio_read(0, 4) == PORT_SIGNATURE


def test_console_write(env: Env) -> None:
    env.mem.write(0x8000, b"para hello\n")
    assert env.call(Hypercall.CONSOLE_WRITE, 0x8000, 11) == (0, 11)
    assert bytes(env.out) == b"para hello\n"


@pytest.mark.parametrize(
    "gpa,length,err",
    [
        (2 * MiB - 4, 8, HcError.EFAULT),  # runs off the end of RAM
        (1 << 63, 4, HcError.EFAULT),  # nowhere near RAM
        (0x8000, (1 << 64) - 1, HcError.E2BIG),  # absurd length: refused before any allocation
        (0x8000, 2 * MiB, HcError.E2BIG),  # above the per-call bound
    ],
)
def test_console_write_refuses_bad_ranges(env: Env, gpa: int, length: int, err: HcError) -> None:
    assert env.call(Hypercall.CONSOLE_WRITE, gpa, length) == (err, 0)
    assert env.out == b""


def test_unknown_number_and_abi(env: Env) -> None:
    assert env.call(999)[0] == HcError.ENOSYS
    assert env.call(Hypercall.NULL, abi=7)[0] == HcError.ENOSYS
    assert env.call(Hypercall.NULL) == (0, 0)


def test_block_outside_ram_or_misaligned_is_ignored(env: Env) -> None:
    env.dev.pio_write(0, 4, 0xFFFF_FFF0)  # no RAM there: nothing written anywhere
    env.dev.pio_write(0, 4, BLOCK + 4)  # misaligned
    env.dev.pio_write(0, 1, BLOCK)  # not a 32-bit doorbell
    assert env.dev.bad_blocks == 3


def test_power_off_and_clocks(env: Env) -> None:
    env.call(Hypercall.POWER_OFF, 0x1_07)
    assert env.powered == [7]
    ret, wall = env.call(Hypercall.TIME_WALLCLOCK)
    assert ret == 0 and wall > 1_600_000_000 * 10**9
    _, m1 = env.call(Hypercall.TIME_MONOTONIC)
    _, m2 = env.call(Hypercall.TIME_MONOTONIC)
    assert m2 >= m1


def test_block_io(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(8 * 512))
    disk = RawImage(str(img))
    e = Env(disk)
    try:
        assert e.call(Hypercall.BLOCK_INFO) == (0, 8)
        e.mem.write(0x10000, b"\x5a" * 1024)
        assert e.call(Hypercall.BLOCK_WRITE, 2, 0x10000, 2) == (0, 2)
        assert e.call(Hypercall.BLOCK_READ, 2, 0x20000, 2) == (0, 2)
        assert e.mem.read(0x20000, 1024) == b"\x5a" * 1024
        assert e.call(Hypercall.BLOCK_READ, 7, 0x20000, 2)[0] == HcError.EINVAL  # past the end
        assert e.call(Hypercall.BLOCK_READ, 0, 2 * MiB - 512, 2)[0] == HcError.EFAULT
        assert e.call(Hypercall.BLOCK_READ, 0, 0x20000, 1 << 40)[0] == HcError.E2BIG
        assert e.call(Hypercall.BLOCK_FLUSH) == (0, 0)
    finally:
        e.mem.close()
        disk.close()
    ro = Env(RawImage(str(img), read_only=True))
    try:
        assert ro.call(Hypercall.BLOCK_WRITE, 0, 0x10000, 1)[0] == HcError.EROFS
        assert ro.call(Hypercall.BLOCK_INFO)[1] >> 63 == 1
    finally:
        ro.mem.close()


def test_block_calls_without_a_disk(env: Env) -> None:
    assert env.call(Hypercall.BLOCK_READ, 0, 0x10000, 1)[0] == HcError.ENODEV


@settings(max_examples=300, deadline=None)
@given(nr=st.integers(0, 2**32 - 1), args=st.lists(st.integers(0, 2**64 - 1), min_size=5, max_size=5))
def test_random_blocks_never_raise(nr: int, args: list[int]) -> None:
    e = Env()
    try:
        if nr == Hypercall.YIELD:
            nr = Hypercall.NULL
        ret, _ = e.call(nr, *args)
        assert ret <= 0
    finally:
        e.mem.close()


@pytest.mark.parametrize("tail", range(0, BLOCK_SIZE + 8, 8))
@pytest.mark.parametrize("nr", [Hypercall.CONSOLE_WRITE, Hypercall.BLOCK_WRITE, Hypercall.POWER_OFF, Hypercall.NULL])
def test_a_block_at_the_end_of_ram_runs_only_if_it_fits_whole(tmp_path: Path, nr: Hypercall, tail: int) -> None:
    """A block whose arguments are in RAM but whose ret/value are not used to run the call and then
    raise GuestMemoryError on the vCPU thread: now it is ignored and counted, with no effect."""
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4 * 512))
    disk = RawImage(str(img))
    e = Env(disk)
    try:
        at = 2 * MiB - tail  # the block's last byte is at 2 MiB - tail + 63
        e.mem.write(0x8000, b"\xaa" * 512)
        args = {
            Hypercall.CONSOLE_WRITE: (0x8000, 4),
            Hypercall.BLOCK_WRITE: (0, 0x8000, 1),
            Hypercall.POWER_OFF: (3,),
            Hypercall.NULL: (),
        }[nr]
        words = [*args] + [0] * (5 - len(args))
        block = struct.pack("<II5Q", nr, ABI_VERSION, *words)
        fits = tail >= BLOCK_SIZE
        if tail >= len(block):
            e.mem.write(at, block)
        elif tail:
            e.mem.write(at, block[:tail])
        e.dev.pio_write(0, 4, at)  # must not raise, whatever fits
        effect = bool(e.out) or bool(e.powered) or img.read_bytes()[:512] != bytes(512)
        assert effect == (fits and nr is not Hypercall.NULL)
        assert e.dev.bad_blocks == (0 if fits else 1)
        if fits:
            assert struct.unpack("<q", e.mem.read(at + 48, 8))[0] == 0
    finally:
        e.mem.close()
        disk.close()
