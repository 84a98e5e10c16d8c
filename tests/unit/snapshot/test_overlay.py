"""Disk overlays (virtkit.snapshot.overlay) and the snapshot document's disk copy field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from virtkit.snapshot import overlay, snapshot
from virtkit.snapshot.format import SnapshotError


def _sparse_image(path: Path) -> bytes:
    """1 MiB with data at 0, 256 KiB and the last 4 KiB; holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(1 << 20)
        for off, byte in ((0, 1), (256 << 10, 2), ((1 << 20) - 4096, 3)):
            f.seek(off)
            f.write(bytes([byte]) * 4096)
    return path.read_bytes()


@pytest.mark.parametrize("reflink", [True, False])
def test_copy_is_identical_and_independent(tmp_path: Path, reflink: bool) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    data = _sparse_image(src)
    method = overlay.copy_image(str(src), str(dst), reflink=reflink)
    assert method in (("reflink", "sparse") if reflink else ("sparse",))
    assert dst.read_bytes() == data
    with open(dst, "r+b") as f:
        f.write(b"clone")
    assert src.read_bytes() == data


def test_sparse_copy_keeps_holes(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    _sparse_image(src)
    overlay.copy_image(str(src), str(dst), reflink=False)
    fd = os.open(dst, os.O_RDONLY)
    try:
        extents = overlay.data_extents(fd, 1 << 20)
    finally:
        os.close(fd)
    if extents == [(0, 1 << 20)]:
        pytest.skip("this filesystem does not report holes")
    assert os.stat(dst).st_blocks * 512 < (1 << 20) // 2


def test_copy_refuses_an_existing_destination(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(b"x" * 512)
    dst.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        overlay.copy_image(str(src), str(dst))
    assert dst.read_bytes() == b"keep"


def test_document_disk_copy_field(document: dict[str, Any]) -> None:
    document["machine"]["disks"] = [
        {"path": "/x/disk.img", "read_only": False, "size": 512, "copy": "disk0-ab.img"},
        {"path": "/x/ro.img", "read_only": True, "size": 1024},
    ]
    snap = snapshot.parse_document(document, "/snap")
    assert snap.disk_copies == ["disk0-ab.img", None] and snap.disk_sizes == [512, 1024]
    document["machine"]["disks"][0]["copy"] = "../../etc/passwd"
    with pytest.raises(SnapshotError, match="is not a file name"):
        snapshot.parse_document(document, "/snap")
