"""Where the guest kernels that ship with virtkit are built (``make guests``)."""

from __future__ import annotations

import os
from pathlib import Path

from virtkit.errors import ConfigError


def guests_dir(override: str | None = None) -> Path:
    """``override``, else $VIRTKIT_GUESTS, else build/guests in the source tree."""
    path = Path(
        override or os.environ.get("VIRTKIT_GUESTS") or Path(__file__).resolve().parent.parent / "build" / "guests"
    )
    if not (path / "hello.elf").exists():
        raise ConfigError(f"no built guests in {path}: run `make guests` (or `make setup`) first")
    return path
