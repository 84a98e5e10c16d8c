"""ATA PIO protocol as an unmodified driver drives it (ATA/ATAPI-6 §9.5)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from virtkit.devices import disk as D
from virtkit.devices.legacy import ata as A
from virtkit.errors import DeviceError


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(b"".join(bytes([i % 251]) * 512 for i in range(64)))
    return p


def make(path: Path, read_only: bool = False) -> tuple[A.AtaController, list[int]]:
    irqs: list[int] = []
    return A.AtaController(D.RawImage(str(path), read_only=read_only), irqs.append), irqs


def issue(c: A.AtaController, cmd: int, lba: int, count: int) -> None:
    c.pio_write(A.DEVICE, 1, 0xE0 | (lba >> 24 & 0xF))
    c.pio_write(A.SECTOR_COUNT, 1, count)
    c.pio_write(A.LBA_LOW, 1, lba & 0xFF)
    c.pio_write(A.LBA_MID, 1, lba >> 8 & 0xFF)
    c.pio_write(A.LBA_HIGH, 1, lba >> 16 & 0xFF)
    c.pio_write(A.STATUS_COMMAND, 1, cmd)


def test_identify_reports_capacity_and_lba48(image: Path) -> None:
    c, irqs = make(image)
    c.pio_write(A.DEVICE, 1, 0xA0)
    c.pio_write(A.STATUS_COMMAND, 1, A.CMD_IDENTIFY)
    assert c.pio_read(A.STATUS_COMMAND, 1) & A.ST_DRQ and irqs == [1, 0]
    words = struct.unpack("<256H", c.pio_read_string(A.DATA, 2, 256))
    assert words[60] | words[61] << 16 == 64
    assert words[83] & (1 << 10) and words[49] & (1 << 9)
    assert b"".join(struct.pack(">H", w) for w in words[27:47]).strip() == b"virtkit ATA disk"
    assert not c.pio_read(A.STATUS_COMMAND, 1) & A.ST_DRQ


def test_read_sectors_word_by_word_and_by_string(image: Path) -> None:
    c, _ = make(image)
    issue(c, A.CMD_READ_SECTORS, 3, 2)
    first = b"".join(c.pio_read(A.DATA, 2).to_bytes(2, "little") for _ in range(256))
    second = c.pio_read_string(A.DATA, 2, 256)
    assert first == bytes([3]) * 512 and second == bytes([4]) * 512
    assert not c.pio_read(A.STATUS_COMMAND, 1) & A.ST_DRQ


def test_write_sectors_then_read_back(image: Path) -> None:
    c, irqs = make(image)
    issue(c, A.CMD_WRITE_SECTORS, 10, 2)
    assert c.pio_read(8, 1) & A.ST_DRQ and irqs == []  # first sector asked for without an IRQ
    c.pio_write_string(A.DATA, 2, b"\xab" * 1024)
    assert not c.pio_read(A.STATUS_COMMAND, 1) & A.ST_DRQ
    with open(image, "rb") as f:
        f.seek(10 * 512)
        assert f.read(1024) == b"\xab" * 1024


def test_lba48_read(image: Path) -> None:
    c, _ = make(image)
    c.pio_write(A.DEVICE, 1, 0x40)
    for reg, (hi, lo) in ((A.SECTOR_COUNT, (0, 1)), (A.LBA_LOW, (0, 63)), (A.LBA_MID, (0, 0)), (A.LBA_HIGH, (0, 0))):
        c.pio_write(reg, 1, hi)
        c.pio_write(reg, 1, lo)
    c.pio_write(A.STATUS_COMMAND, 1, A.CMD_READ_SECTORS_EXT)
    assert c.pio_read_string(A.DATA, 2, 256) == bytes([63]) * 512


@pytest.mark.parametrize("lba,count", [(64, 1), (63, 2), (0x0FFFFFFF, 1)])
def test_out_of_range_is_aborted(image: Path, lba: int, count: int) -> None:
    c, _ = make(image)
    issue(c, A.CMD_READ_SECTORS, lba, count)
    assert c.pio_read(A.STATUS_COMMAND, 1) & A.ST_ERR
    assert c.pio_read(A.ERROR_FEATURES, 1) & A.ER_IDNF


def test_read_only_disk_refuses_writes(image: Path) -> None:
    c, _ = make(image, read_only=True)
    issue(c, A.CMD_WRITE_SECTORS, 0, 1)
    assert c.pio_read(A.STATUS_COMMAND, 1) & A.ST_ERR
    assert c.pio_read(A.ERROR_FEATURES, 1) & A.ER_ABRT


def test_unknown_command_aborts_and_slave_is_absent(image: Path) -> None:
    c, _ = make(image)
    c.pio_write(A.STATUS_COMMAND, 1, 0x99)
    assert c.pio_read(A.STATUS_COMMAND, 1) & A.ST_ERR
    c.pio_write(A.DEVICE, 1, 0xB0)
    assert c.pio_read(A.STATUS_COMMAND, 1) == 0


def test_data_port_without_a_command_reads_nothing(image: Path) -> None:
    c, _ = make(image)
    assert c.pio_read_string(A.DATA, 2, 4) == b"\xff" * 8
    c.pio_write_string(A.DATA, 2, b"junk")  # ignored, never written to disk
    assert c.sectors_written == 0


def test_bad_images(tmp_path: Path) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(DeviceError, match="not a multiple of 512"):
        D.RawImage(str(odd))
    with pytest.raises(DeviceError, match="does not exist"):
        D.RawImage(str(tmp_path / "missing.img"))
    ro = tmp_path / "ro.img"
    ro.write_bytes(bytes(512))
    os.chmod(ro, 0o444)
    if os.geteuid() != 0:  # root opens anything for writing
        with pytest.raises(DeviceError, match="permission denied"):
            D.RawImage(str(ro))
    assert D.RawImage(str(ro), read_only=True).sectors == 1


def test_read_only_image_write_raises(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    p.write_bytes(bytes(1024))
    d = D.RawImage(str(p), read_only=True)
    with pytest.raises(OSError, match="read-only"):
        d.write_from(0, [memoryview(b"x" * 512)])
    d.close()
