"""The state record of a virtio-net card (see :class:`virtkit.devices.contract.Persistent`).

It identifies the card, so a snapshot is not restored into a machine whose card has another MAC;
the rings' state is in the generic :class:`~virtkit.devices.virtio.persist.DeviceState` around it.
Frames waiting for receive buffers are not saved (a network may lose frames), nor is the TAP: the
restored machine makes its own TAP from its own ``--net`` option (docs/DEVICES.md, "Network").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from virtkit.records import Bounds


@dataclass(frozen=True, slots=True)
class NetState:
    #: "aa:bb:cc:dd:ee:ff"; the device parses it and refuses a multicast or malformed address
    mac: Annotated[str, Bounds(max_len=17)]
    link_up: bool
