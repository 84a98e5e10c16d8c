"""The memory file: sparse, exact, checked (runs on anonymous memory: no /dev/kvm needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virtkit.memory import GuestMemory
from virtkit.snapshot import memfile
from virtkit.snapshot.format import Fields, SnapshotError

MiB = 1 << 20
CROSS = memfile.CHUNK - 100


@pytest.fixture
def memory() -> GuestMemory:
    mem = GuestMemory([(0, 2 * MiB), (4 * MiB, 3 * MiB)])
    mem.write(0x1000, b"hello")
    mem.write(4 * MiB + CROSS, b"\xff" * 5000)  # crosses a chunk boundary in region 2
    yield mem
    mem.close()


def _write(memory: GuestMemory, path: Path) -> memfile.MemoryImage:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        return memfile.write(memory, fd, path.name)
    finally:
        os.close(fd)


def test_file_is_regions_back_to_back_and_sparse(memory: GuestMemory, tmp_path: Path) -> None:
    path = tmp_path / "memory-x.bin"
    img = _write(memory, path)
    assert img.size == 5 * MiB == path.stat().st_size
    assert img.regions == ((0, 2 * MiB), (4 * MiB, 3 * MiB))
    data = path.read_bytes()
    assert data[0x1000:0x1005] == b"hello"
    assert data[2 * MiB + CROSS : 2 * MiB + CROSS + 5000] == b"\xff" * 5000
    assert img.written == 3 * memfile.CHUNK  # one chunk in region 1, two in region 2
    assert path.stat().st_blocks * 512 < 1 * MiB  # the rest are holes


def test_file_maps_back_as_the_same_memory(memory: GuestMemory, tmp_path: Path) -> None:
    path = tmp_path / "memory-x.bin"
    _write(memory, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        copy = GuestMemory([(0, 2 * MiB), (4 * MiB, 3 * MiB)], fd=fd, shared=False)
    finally:
        os.close(fd)
    try:
        assert copy.read(0x1000, 5) == b"hello"
        copy.write(0x1000, b"HELLO")  # copy-on-write: the file keeps the original
        assert path.read_bytes()[0x1000:0x1005] == b"hello"
    finally:
        copy.close()


def test_json_round_trip_and_verify(memory: GuestMemory, tmp_path: Path) -> None:
    path = tmp_path / "memory-x.bin"
    img = _write(memory, path)
    back = memfile.MemoryImage.from_json(Fields(img.to_json(), "memory"))
    assert back == img
    fd = os.open(path, os.O_RDONLY)
    try:
        memfile.verify(fd, back, str(path))
    finally:
        os.close(fd)


def test_corruption_is_found_and_located(memory: GuestMemory, tmp_path: Path) -> None:
    path = tmp_path / "memory-x.bin"
    img = _write(memory, path)
    with open(path, "r+b") as f:
        f.seek(2 * MiB + 5)  # region 2 starts at file offset 2 MiB, guest address 4 MiB
        f.write(b"X")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(SnapshotError, match="corrupted: checksum mismatch in guest memory at 0x400000"):
            memfile.verify(fd, img, str(path))
    finally:
        os.close(fd)


def test_truncated_and_grown_files_are_refused(memory: GuestMemory, tmp_path: Path) -> None:
    path = tmp_path / "memory-x.bin"
    img = _write(memory, path)
    for size, what in ((img.size - 4096, "truncated"), (img.size + 1, "corrupted")):
        os.truncate(path, size)
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(SnapshotError, match=what):
                memfile.check_size(fd, img, str(path))
        finally:
            os.close(fd)


@pytest.mark.parametrize("name", ["", "../etc/passwd", ".hidden", "a/b"])
def test_memory_file_name_must_be_plain(memory: GuestMemory, tmp_path: Path, name: str) -> None:
    doc = memfile.MemoryImage(name, 4096, ((0, 4096),), memfile.CHUNK, ((0,),)).to_json()
    with pytest.raises(SnapshotError, match="not a plain file name"):
        memfile.MemoryImage.from_json(Fields(doc, "memory"))


def test_inconsistent_sizes_are_refused() -> None:
    doc = memfile.MemoryImage("m.bin", 8192, ((0, 4096),), memfile.CHUNK, ((0,),)).to_json()
    with pytest.raises(SnapshotError, match="not the sum"):
        memfile.MemoryImage.from_json(Fields(doc, "memory"))
    doc = memfile.MemoryImage("m.bin", 4096, ((0, 4096),), memfile.CHUNK, ((0, 1),)).to_json()
    with pytest.raises(SnapshotError, match="crc32 does not match"):
        memfile.MemoryImage.from_json(Fields(doc, "memory"))
