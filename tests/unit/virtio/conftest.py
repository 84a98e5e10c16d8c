"""Fixtures for the virtio tests: guest memory shared by devices, images, the fake driver."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def machine() -> Iterator[object]:
    """Guest memory with devices attached through the fake driver (see virtio_driver.Machine)."""
    from virtio_driver import Machine  # type: ignore[import-not-found]

    m = Machine()
    yield m
    m.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A sparse 4 MiB raw image (8192 sectors) with nothing allocated."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    return path
