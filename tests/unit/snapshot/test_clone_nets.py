"""How `virtkit clone --net` hands the host side of the snapshot's network cards to each clone
(snapshot.clone_nets): once per card for every clone, or once per card per clone; never one MAC
twice on a bridge, never one TAP name for every clone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from virtkit.devices.virtio.net.tap import NetSpec
from virtkit.snapshot.format import SnapshotError
from virtkit.snapshot.snapshot import clone_nets

MACS = (bytes.fromhex("02766b000001"), bytes.fromhex("02766b000002"))


def snap(cards: int) -> object:
    return SimpleNamespace(config=SimpleNamespace(nets=tuple(NetSpec(bridge="old", mac=MACS[i]) for i in range(cards))))


def test_once_per_card_goes_to_every_clone_on_no_bridge() -> None:
    given = [NetSpec(), NetSpec()]
    assert clone_nets(snap(2), given, 3) == [tuple(given)] * 3  # type: ignore[arg-type]


def test_once_per_card_per_clone_in_order() -> None:
    given = [NetSpec(bridge=f"br{i}") for i in range(4)]  # 2 clones x 2 cards
    assert clone_nets(snap(2), given, 2) == [tuple(given[:2]), tuple(given[2:])]  # type: ignore[arg-type]


def test_a_single_clone_may_use_a_bridge() -> None:
    given = [NetSpec(bridge="br0", name="vk-tap-one")]
    assert clone_nets(snap(1), given, 1) == [tuple(given)]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cards", "given", "count", "message"),
    [
        (
            1,
            [NetSpec(bridge="br0")],
            2,
            "clone-0 and clone-1 would both put card 0 (MAC 02:76:6b:00:00:01) on bridge br0",
        ),
        (1, [NetSpec(bridge="br0"), NetSpec(bridge="br0")], 2, "clone-0 and clone-1 would both put card 0"),
        (2, [NetSpec(), NetSpec(bridge="br")] * 2, 2, "both put card 1 (MAC 02:76:6b:00:00:02)"),
        (1, [NetSpec(name="vk-tap-x")], 3, "would name every clone's TAP the same"),
        (1, [], 2, "give --net tap[,bridge=BR] once per card (1, the same for every clone)"),
        (2, [NetSpec()] * 3, 2, "or once per card per clone (4, clone 0's first), got 3"),
    ],
)
def test_refusals_are_one_line(cards: int, given: list[NetSpec], count: int, message: str) -> None:
    with pytest.raises(SnapshotError) as e:
        clone_nets(snap(cards), given, count)  # type: ignore[arg-type]
    assert message in str(e.value) and "\n" not in str(e.value)
