"""Loading a state file: every field checked before any KVM object exists."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from virtkit.snapshot import format, load, snapshot
from virtkit.snapshot.format import SnapshotError

MEMORY = 4 << 20  # as in conftest.make_document


def write_state(directory: Path, doc: dict[str, Any]) -> None:
    directory.mkdir(exist_ok=True)
    (directory / snapshot.STATE_FILE).write_bytes(format.pack(doc))


def test_well_formed_document_loads(tmp_path: Path, document: dict[str, Any]) -> None:
    write_state(tmp_path / "s", document)
    snap = load(tmp_path / "s")
    assert snap.config.memory == MEMORY and snap.config.vcpus == 1
    assert snap.image.vcpus[0].msrs == {0x10: 42, 0xC0000080: 0x500}
    assert snap.image.devices["uart0"]["rx"] == b"ab"
    assert snap.memory_path == str(tmp_path / "s" / "memory-test.bin")


def test_two_vcpus(tmp_path: Path, document_factory: Callable[..., dict[str, Any]]) -> None:
    write_state(tmp_path / "s", document_factory(vcpus=2))
    assert [v.id for v in load(tmp_path / "s").image.vcpus] == [0, 1]


def _broken(document: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(document)
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    "path,value,message",
    [
        (["machine"], KeyError, "state.machine is missing"),
        (["machine", "vcpus"], "1", "not an integer"),
        (["machine", "vcpus"], 2, "1 vCPU states for a 2-vCPU machine"),
        (["machine", "memory"], MEMORY * 2, "covers"),
        (["vcpus", 0, "regs"], b"\0" * 10, "is 10 bytes, expected 144"),
        (["vcpus", 0, "lapic"], "AAAA", "not a byte string"),
        (["vcpus", 0, "id"], 3, "vcpus[0].id is 3, expected 0"),
        (["vcpus", 0, "mp_state"], 99, "not an MP state"),
        (["vcpus", 0, "msrs"], [[1, -1]], "not an MSR index/value pair"),
        (["vcpus", 0, "cpuid"], [[1, 2, 3]], "not a CPUID entry"),
        (["vm", "ioapic"], KeyError, "vm.ioapic is missing"),
        (["memory", "file"], "../x", "not a plain file name"),
        (["devices"], [], "devices is not an object"),
    ],
)
def test_malformed_fields_are_refused_by_name(
    tmp_path: Path, document: dict[str, Any], path: list[Any], value: Any, message: str
) -> None:
    write_state(tmp_path / "s", _broken(document, path, value))
    with pytest.raises(SnapshotError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load(tmp_path / "s")


def test_irqchip_ids_must_match_their_slot(tmp_path: Path, document: dict[str, Any]) -> None:
    document["vm"]["pic_master"], document["vm"]["ioapic"] = document["vm"]["ioapic"], document["vm"]["pic_master"]
    write_state(tmp_path / "s", document)
    with pytest.raises(SnapshotError, match="holds irqchip 2, expected 0"):
        load(tmp_path / "s")


def test_missing_directory_and_missing_state(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SnapshotError, match="holds no snapshot"):
        load(tmp_path / "empty")


def test_truncated_state_file_on_disk(tmp_path: Path, document: dict[str, Any]) -> None:
    write_state(tmp_path / "s", document)
    p = tmp_path / "s" / snapshot.STATE_FILE
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(SnapshotError, match=r"vm\.state is truncated"):
        load(tmp_path / "s")
