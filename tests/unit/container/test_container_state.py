"""The state directory: ids, atomic creation, crash-consistent status."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virtkit.container.state import Record, StateDir, atomic_write, current_status, proc_start_time, validate_id
from virtkit.errors import ContainerError


@pytest.mark.parametrize("cid", ["a", "abc-123", "x.y_z+1", "A" * 1024])
def test_good_ids(cid: str) -> None:
    assert validate_id(cid) == cid


@pytest.mark.parametrize("cid", ["", ".", "..", ".hidden", "a/b", "../x", "a b", "a\nb", "ü", "A" * 1025, "-x"])
def test_bad_ids(cid: str) -> None:
    with pytest.raises(ContainerError, match="invalid container id"):
        validate_id(cid)


def test_create_is_exclusive_and_remove_is_complete(tmp_path: Path) -> None:
    sd = StateDir(str(tmp_path))
    sd.create(Record(id="c1", bundle="/b"))
    assert sd.ids() == ["c1"]
    with pytest.raises(ContainerError, match="already in use"):
        sd.create(Record(id="c1", bundle="/b"))
    rec = sd.load("c1")
    assert rec.status == "creating" and rec.bundle == "/b"
    sd.remove("c1")
    assert sd.ids() == []
    assert os.listdir(tmp_path) == []


def test_sweep_removes_interrupted_leftovers(tmp_path: Path) -> None:
    (tmp_path / ".trash-c1-1-2").mkdir()
    (tmp_path / ".new-c2-999999999-3").mkdir()  # its creator pid does not exist
    StateDir(str(tmp_path)).sweep()
    assert os.listdir(tmp_path) == []


def test_atomic_write_replaces(tmp_path: Path) -> None:
    p = tmp_path / "f"
    atomic_write(str(p), b"one")
    atomic_write(str(p), b"two")
    assert p.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f"]


def test_status_follows_the_processes() -> None:
    me, start = os.getpid(), proc_start_time(os.getpid())
    assert current_status(Record(id="x", bundle="", status="creating", creator_pid=me, creator_start=start)) == \
        "creating"
    # a creator that died half-way: the container is listed as stopped, so it can be deleted
    assert current_status(Record(id="x", bundle="", status="creating", creator_pid=2**22 + 1)) == "stopped"
    assert current_status(Record(id="x", bundle="", status="running", pid=me, pid_start=start)) == "running"
    # the same pid with another start time is another process (pid reuse)
    assert current_status(Record(id="x", bundle="", status="running", pid=me, pid_start=(start or 0) + 1)) == \
        "stopped"


def test_load_unknown_and_corrupt(tmp_path: Path) -> None:
    sd = StateDir(str(tmp_path))
    with pytest.raises(ContainerError, match="does not exist"):
        sd.load("nope")
    sd.create(Record(id="c", bundle="/b"))
    (tmp_path / "c" / "state.json").write_text("{")
    with pytest.raises(ContainerError, match="corrupt"):
        sd.load("c")
