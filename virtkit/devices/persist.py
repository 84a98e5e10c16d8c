"""State records of the devices at the top of :mod:`virtkit.devices` (see
:class:`virtkit.devices.contract.Persistent`); the legacy PC devices and virtio keep theirs in
their own folders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from virtkit.records import Bounds, Count


@dataclass(frozen=True, slots=True)
class HypercallState:
    """Counters of the hypercall interface: calls by number, errors answered, blocks ignored."""

    calls: Annotated[tuple[Count, ...], Bounds(max_len=64)]
    errors: Count
    bad_blocks: Count
