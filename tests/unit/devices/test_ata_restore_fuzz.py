"""A crafted ATA record (within its field bounds) followed by any guest port traffic: nothing
raises out of the controller, reads fit the access size, and no I/O lands outside the image."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtkit import records
from virtkit.devices.disk import SECTOR_SIZE, RawImage
from virtkit.devices.legacy.ata import AtaController
from virtkit.devices.legacy.persist import AtaState
from virtkit.errors import DeviceError

SECTORS = 8
_u8 = st.integers(0, 0xFF)
_state = st.fixed_dictionaries(
    {
        "features": _u8,
        "count": _u8,
        "lba_low": _u8,
        "lba_mid": _u8,
        "lba_high": _u8,
        "hob": st.lists(_u8, min_size=4, max_size=4),
        "device": _u8,
        "status": _u8,
        "error": _u8,
        "control": _u8,
        "buffer": st.sampled_from([b"", bytes(SECTOR_SIZE), bytes(100)]),
        "pos": st.integers(0, 512),
        "remaining": st.integers(0, 65536),
        "lba": st.integers(0, (1 << 48) - 1),
        "writing": st.booleans(),
    }
)
_ops = st.lists(
    st.tuples(st.booleans(), st.integers(0, 8), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1)), max_size=40
)


@settings(max_examples=300, suppress_health_check=list(HealthCheck), deadline=None)
@given(state=_state, ops=_ops, string_bytes=st.integers(0, 1100), read_only=st.booleans())
def test_crafted_state_then_any_traffic_stays_inside_the_image(
    tmp_path_factory: Any,
    state: dict[str, Any],
    ops: list[tuple[bool, int, int, int]],
    string_bytes: int,
    read_only: bool,
) -> None:
    path = Path(tmp_path_factory.mktemp("ata")) / "disk.img"
    path.write_bytes(bytes(SECTORS * SECTOR_SIZE))
    disk = RawImage(path, read_only=read_only)
    try:
        ata = AtaController(disk, lambda level: None)
        try:
            ata.restore(records.parse(AtaState, state, what="ata0"))
        except (DeviceError, records.UntrustedInput):
            return
        for write, offset, size, value in ops:
            if write:
                ata.pio_write(offset, size, value & ((1 << 8 * size) - 1))
            else:
                assert 0 <= ata.pio_read(offset, size) < 1 << 8 * size
        ata.pio_write_string(0, 2, bytes(string_bytes))
        assert len(ata.pio_read_string(0, 2, string_bytes // 2)) == string_bytes // 2 * 2
    finally:
        disk.close()
    assert os.path.getsize(path) == SECTORS * SECTOR_SIZE
