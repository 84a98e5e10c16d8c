"""virtio-blk (virtio 1.2 §5.2) over a raw image: requests, sparseness, read-only, image errors."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest
from virtio_driver import FakeQueue, Machine, Rig  # type: ignore[import-not-found]

from virtkit.devices.virtio.blk import BlockDevice
from virtkit.devices.virtio.blk import device as blk
from virtkit.errors import DeviceError

SECTOR = 512


def disk(machine: Machine, path: Path, **kw: object) -> tuple[Rig, FakeQueue]:
    rig = machine.attach(BlockDevice(path, **kw), slice_size=1 << 20)  # type: ignore[arg-type]
    (q,) = rig.driver.init()
    return rig, q


def request(
    rig: Rig,
    q: FakeQueue,
    rtype: int,
    sector: int = 0,
    *,
    out: bytes = b"",
    in_len: int = 0,
    split: int = 0,
    indirect: bool = False,
) -> tuple[int, bytes, int]:
    """Submit one request; returns (status, data read, used length). ``split`` cuts the data into
    pieces of that many bytes, to show the device does not care about the descriptor layout."""
    hdr = q.buffer(struct.pack("<IIQ", rtype, 0, sector))
    bufs: list[tuple[int, int, bool]] = [(hdr, 16, False)]
    step = split or max(len(out), in_len, 1)
    for i in range(0, len(out), step):
        piece = out[i : i + step]
        bufs.append((q.buffer(piece), len(piece), False))
    data = []
    for i in range(0, in_len, step):
        n = min(step, in_len - i)
        data.append((q.buffer(n), n))
        bufs.append((data[-1][0], n, True))
    status = q.buffer(b"\xff")
    bufs.append((status, 1, True))
    head = q.add(bufs, indirect=indirect)
    rig.driver.kick(0)
    used = q.take_used()
    assert [h for h, _ in used] == [head]
    mem = rig.transport.memory
    return mem.read(status, 1)[0], b"".join(mem.read(g, n) for g, n in data), used[0][1]


def test_config_space(machine: Machine, image: Path) -> None:
    rig, _ = disk(machine, image)
    assert rig.driver.config(0, 4) | rig.driver.config(4, 4) << 32 == 8192  # capacity in sectors
    assert rig.driver.config(12, 4) == 254  # seg_max: queue size minus header and status
    assert rig.driver.config(20, 4) == 512  # blk_size
    features = rig.driver.device_features()
    assert features & blk.F_FLUSH and features & blk.F_SEG_MAX and not features & blk.F_RO


@pytest.mark.parametrize("split,indirect", [(0, False), (SECTOR, False), (1000, False), (SECTOR, True)])
def test_write_read_round_trip(machine: Machine, image: Path, split: int, indirect: bool) -> None:
    rig, q = disk(machine, image)
    data = os.urandom(4 * SECTOR)
    assert request(rig, q, blk.T_OUT, 10, out=data, split=split, indirect=indirect)[::2] == (blk.S_OK, 1)
    status, got, used = request(rig, q, blk.T_IN, 10, in_len=4 * SECTOR, split=split, indirect=indirect)
    assert (status, got, used) == (blk.S_OK, data, 4 * SECTOR + 1)
    with open(image, "rb") as f:
        f.seek(10 * SECTOR)
        assert f.read(4 * SECTOR) == data
    assert rig.device.reads == 1 and rig.device.writes == 1  # type: ignore[attr-defined]


def test_last_sector_and_past_the_end(machine: Machine, image: Path) -> None:
    rig, q = disk(machine, image)
    assert request(rig, q, blk.T_OUT, 8191, out=b"z" * SECTOR)[0] == blk.S_OK
    assert request(rig, q, blk.T_IN, 8191, in_len=2 * SECTOR)[0] == blk.S_IOERR  # runs past the end
    assert request(rig, q, blk.T_OUT, 8192, out=b"z" * SECTOR)[0] == blk.S_IOERR
    assert request(rig, q, blk.T_IN, (1 << 64) - 1, in_len=SECTOR)[0] == blk.S_IOERR
    assert image.stat().st_size == 4 << 20  # never extended


def test_partial_sectors_are_refused(machine: Machine, image: Path) -> None:
    rig, q = disk(machine, image)
    assert request(rig, q, blk.T_OUT, 0, out=b"x" * 100)[0] == blk.S_IOERR
    assert request(rig, q, blk.T_IN, 0, in_len=100)[0] == blk.S_IOERR
    assert rig.device.failed_requests == 2


def test_flush(machine: Machine, image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs: list[int] = []
    monkeypatch.setattr(os, "fdatasync", syncs.append)
    rig, q = disk(machine, image)
    assert request(rig, q, blk.T_OUT, 0, out=b"x" * SECTOR)[0] == blk.S_OK
    assert syncs == []  # FLUSH negotiated: the guest decides when
    assert request(rig, q, blk.T_FLUSH)[0] == blk.S_OK
    assert len(syncs) == 1


def test_writes_are_stable_when_flush_is_not_negotiated(
    machine: Machine, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs: list[int] = []
    monkeypatch.setattr(os, "fdatasync", syncs.append)
    rig = machine.attach(BlockDevice(image), slice_size=1 << 20)
    (q,) = rig.driver.init(drop=blk.F_FLUSH)
    assert request(rig, q, blk.T_OUT, 0, out=b"x" * SECTOR)[0] == blk.S_OK
    assert len(syncs) == 1  # §5.2.6.2: writethrough without FLUSH


def test_get_id(machine: Machine, image: Path) -> None:
    rig, q = disk(machine, image)
    status, ident, used = request(rig, q, blk.T_GET_ID, in_len=20)
    assert (status, ident, used) == (blk.S_OK, b"disk.img".ljust(20, b"\0"), 21)
    assert request(rig, q, blk.T_GET_ID, in_len=8)[0] == blk.S_IOERR  # §5.2.6.1: exactly 20 bytes


def test_get_id_of_20_characters_has_no_terminator(machine: Machine, image: Path) -> None:
    rig, q = disk(machine, image, serial="0123456789abcdefghijKLMN")
    assert request(rig, q, blk.T_GET_ID, in_len=20)[1] == b"0123456789abcdefghij"


def test_unknown_request_type_is_unsupported(machine: Machine, image: Path) -> None:
    rig, q = disk(machine, image)
    for rtype in (2, 11, 13, 0xFFFF_FFFF):  # legacy SCSI, discard and write zeroes are not offered
        assert request(rig, q, rtype)[0] == blk.S_UNSUPP


def test_read_only(machine: Machine, image: Path) -> None:
    image.write_bytes(b"R" * SECTOR + bytes(len(image.read_bytes()) - SECTOR))
    rig, q = disk(machine, image, read_only=True)
    assert rig.device.acked_features & blk.F_RO
    assert request(rig, q, blk.T_OUT, 0, out=b"W" * SECTOR)[0] == blk.S_IOERR  # §5.2.6.2
    assert request(rig, q, blk.T_IN, 0, in_len=SECTOR)[:2] == (blk.S_OK, b"R" * SECTOR)
    assert request(rig, q, blk.T_FLUSH)[0] == blk.S_OK
    assert image.read_bytes()[:SECTOR] == b"R" * SECTOR


def test_sparse_image_stays_sparse(machine: Machine, image: Path) -> None:
    rig, q = disk(machine, image)
    assert os.stat(image).st_blocks == 0
    # a guest zeroing its disk (mkfs, dd if=/dev/zero) does not allocate it
    assert request(rig, q, blk.T_OUT, 0, out=bytes(64 * 1024), split=8192)[0] == blk.S_OK
    assert os.stat(image).st_blocks == 0
    # one 4 KiB piece of data among zeros allocates only that piece (give or take filesystem rounding)
    payload = bytes(32 * 1024) + b"D" * 4096 + bytes(28 * 1024)
    assert request(rig, q, blk.T_OUT, 256, out=payload)[0] == blk.S_OK
    assert 0 < os.stat(image).st_blocks * 512 <= 16 * 1024
    assert request(rig, q, blk.T_IN, 256, in_len=len(payload))[1] == payload


def test_zeros_over_data_are_written(machine: Machine, image: Path) -> None:
    rig, q = disk(machine, image)
    assert request(rig, q, blk.T_OUT, 0, out=b"\x01" * 8192)[0] == blk.S_OK
    assert request(rig, q, blk.T_OUT, 0, out=bytes(8192))[0] == blk.S_OK
    assert request(rig, q, blk.T_IN, 0, in_len=8192)[1] == bytes(8192)


def test_write_straddling_data_and_hole(machine: Machine, image: Path) -> None:
    rig, q = disk(machine, image)
    assert request(rig, q, blk.T_OUT, 8, out=b"\x02" * 4096)[0] == blk.S_OK  # bytes 4096..8191
    # zeros from 0 to 12 KiB: the data block must become zeros, the holes around it stay holes
    assert request(rig, q, blk.T_OUT, 0, out=bytes(12 * 1024))[0] == blk.S_OK
    assert request(rig, q, blk.T_IN, 0, in_len=12 * 1024)[1] == bytes(12 * 1024)
    assert os.stat(image).st_blocks * 512 <= 8 * 1024


def test_host_io_errors_become_ioerr(machine: Machine, image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig, q = disk(machine, image)

    def failing(*args: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", failing)
    assert request(rig, q, blk.T_IN, 0, in_len=SECTOR)[0] == blk.S_IOERR
    assert rig.device.io_errors == 1 and rig.transport.internal_errors == 0  # type: ignore[attr-defined]


def test_short_image_read_is_an_error(machine: Machine, image: Path) -> None:
    rig, q = disk(machine, image)
    os.truncate(image, SECTOR)  # shrunk behind the device's back
    assert request(rig, q, blk.T_IN, 4, in_len=SECTOR)[0] == blk.S_IOERR


# --- configuration errors: one-line DeviceError messages -----------------------------------------
def test_missing_image(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match=r"^disk image .*nope.img does not exist$"):
        BlockDevice(tmp_path / "nope.img")


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="is a directory"):
        BlockDevice(tmp_path)


def test_size_must_be_whole_sectors(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(b"x" * 1000)
    with pytest.raises(DeviceError, match=r"1000 bytes, not a multiple of 512.*truncate -s 1024"):
        BlockDevice(path)


def test_read_only_image_opened_for_writing(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def open_readonly_fs(path: str, flags: int, *args: int) -> int:
        if flags & os.O_RDWR:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_readonly_fs)
    with pytest.raises(DeviceError, match=r"is read-only \(Read-only file system\); attach it read-only"):
        BlockDevice(image)
    BlockDevice(image, read_only=True).close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_permissions(image: Path) -> None:
    image.chmod(0o444)
    with pytest.raises(DeviceError, match="is read-only"):
        BlockDevice(image)
    image.chmod(0)
    with pytest.raises(DeviceError, match="cannot open disk image .*Permission denied"):
        BlockDevice(image, read_only=True)


def test_an_image_is_used_by_one_writer(image: Path) -> None:
    first = BlockDevice(image)
    try:
        with pytest.raises(DeviceError, match="in use"):
            BlockDevice(image)
        with pytest.raises(DeviceError, match="in use"):
            BlockDevice(image, read_only=True)
    finally:
        first.close()
    BlockDevice(image).close()
    a, b = BlockDevice(image, read_only=True), BlockDevice(image, read_only=True)  # readers share
    a.close()
    b.close()


def test_bad_queue_size(image: Path) -> None:
    with pytest.raises(DeviceError, match="power of two"):
        BlockDevice(image, queue_size=100)
    BlockDevice(image).close()  # the failed attempt did not keep the image open (or locked)


def test_save_restore_checks_the_disk(machine: Machine, image: Path, tmp_path: Path) -> None:
    rig, q = disk(machine, image)
    request(rig, q, blk.T_OUT, 0, out=b"s" * SECTOR)
    state = rig.transport.save()
    other = tmp_path / "other.img"
    other.write_bytes(bytes(SECTOR))
    small = machine.attach(BlockDevice(other))
    with pytest.raises(DeviceError, match="does not match the saved disk"):
        small.transport.restore(state)


def test_used_length_never_claims_unwritten_bytes(machine: Machine, image: Path) -> None:
    rig, q = disk(machine, image)
    # a failed read: the data buffers were not written, so only an underestimate (0) is allowed
    status, _, used = request(rig, q, blk.T_IN, 1 << 40, in_len=SECTOR)
    assert (status, used) == (blk.S_IOERR, 0)
