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
    assert (
        current_status(Record(id="x", bundle="", status="creating", creator_pid=me, creator_start=start)) == "creating"
    )
    # a creator that died half-way: the container is listed as stopped, so it can be deleted
    assert current_status(Record(id="x", bundle="", status="creating", creator_pid=2**22 + 1)) == "stopped"
    assert current_status(Record(id="x", bundle="", status="running", pid=me, pid_start=start)) == "running"
    # the same pid with another start time is another process (pid reuse)
    assert current_status(Record(id="x", bundle="", status="running", pid=me, pid_start=(start or 0) + 1)) == "stopped"


def test_load_unknown_and_corrupt(tmp_path: Path) -> None:
    sd = StateDir(str(tmp_path))
    with pytest.raises(ContainerError, match="does not exist"):
        sd.load("nope")
    sd.create(Record(id="c", bundle="/b"))
    (tmp_path / "c" / "state.json").write_text("{")
    with pytest.raises(ContainerError, match="corrupt"):
        sd.load("c")


def _record_dir(tmp_path: Path, cid: str = "c") -> tuple[StateDir, Path]:
    sd = StateDir(str(tmp_path))
    sd.create(Record(id=cid, bundle="/b"))
    return sd, tmp_path / cid / "state.json"


def _good(cid: str = "c", **changes: object) -> bytes:
    import json

    raw = json.loads(Record(id=cid, bundle="/b", status="running", pid=123, cgroup_path="/virtkit/c").to_json())
    raw.update(changes)
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "not valid JSON"),
        (b'{"id": "c", "bund', "not valid JSON"),  # a write cut short
        (b"[1, 2]", "not an object"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[" * 100_000, "nested"),
        (b" " * (2 << 20), "bytes"),  # larger than any record
        (_good(pid="123"), "pid must be an integer"),
        (_good(pid=-1), "pid is -1"),
        (_good(pid=2**40), "pid is"),
        (_good(status="zombie"), "status"),
        (_good(id="other"), "id 'other'"),
        (_good(id="../x"), "id"),
        (_good(cgroup_path="/"), "cgroup_path"),
        (_good(cgroup_path="/a/../../b"), "cgroup_path"),
        (_good(cgroup_path="/virtkit/c\u0000"), "cgroup_path"),
        (_good(mounts=["/"]), "mount"),
        (_good(mounts=["/proc"]), "mount"),
        (_good(netdevs=["eth0"]), "network device"),
        (_good(lease="/etc/passwd"), "lease"),
        (_good(lease="/run/virtkit-net/../../etc/passwd"), "lease"),
        (_good(cgroup_made=["/sys/fs/cgroup/pids/../.."]), "cgroup directory"),
        (_good(annotations={"a": 1}), "annotations"),
    ],
)
def test_corrupt_and_hostile_records_are_refused(tmp_path: Path, content: bytes, why: str) -> None:
    from virtkit.container.state import CorruptState

    sd, state = _record_dir(tmp_path)
    state.write_bytes(content)
    with pytest.raises(CorruptState) as info:
        sd.load("c")
    msg = str(info.value)
    assert "\n" not in msg and "delete --force c" in msg
    assert why in msg, msg
    assert sd.ids() == ["c"]  # still listed, so it can be named and deleted


def test_a_good_record_round_trips_and_old_records_still_load(tmp_path: Path) -> None:
    import json

    sd, state = _record_dir(tmp_path)
    state.write_bytes(_good())
    assert sd.load("c").pid == 123
    old = json.loads(_good())
    for k in ("cgroup_made", "lease", "address"):
        del old[k]
    old["extra"] = {"cgroup_made": ["/sys/fs/cgroup/pids/virtkit/c"], "address": "10.87.0.7"}
    state.write_text(json.dumps(old))
    rec = sd.load("c")
    assert rec.cgroup_made == ["/sys/fs/cgroup/pids/virtkit/c"] and rec.address == "10.87.0.7"


def test_state_file_that_is_a_symlink_or_missing(tmp_path: Path) -> None:
    from virtkit.container.state import CorruptState

    sd, state = _record_dir(tmp_path)
    (tmp_path / "elsewhere.json").write_bytes(_good())
    state.unlink()
    with pytest.raises(CorruptState, match="no state.json"):
        sd.load("c")
    os.symlink(tmp_path / "elsewhere.json", state)
    with pytest.raises(CorruptState):
        sd.load("c")
    os.unlink(state)
    os.mkfifo(state)  # would block a plain open-and-read forever
    with pytest.raises(CorruptState, match="not a regular file"):
        sd.load("c")


def test_remove_does_not_follow_symlinks_out(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep")
    root = tmp_path / "run"
    sd = StateDir(str(root))
    sd.create(Record(id="c", bundle="/b"))
    os.symlink(victim, root / "c" / "link")
    os.symlink(victim / "precious", root / "c" / "file-link")
    sd.remove("c")
    assert (victim / "precious").read_text() == "keep"
    assert os.listdir(root) == []
    # a container "directory" that is a symlink: the link goes, its target stays
    os.symlink(victim, root / "d")
    sd.remove("d")
    assert not os.path.lexists(root / "d") and (victim / "precious").exists()


def test_state_root_is_private(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    sd = StateDir(str(root))
    sd.create(Record(id="c", bundle="/b"))
    assert os.stat(root).st_mode & 0o777 == 0o700  # an existing root's mode is fixed too
    assert os.stat(root / "c").st_mode & 0o777 == 0o700


@pytest.mark.parametrize(
    "content", [b"", b"{", b'{"exitStatus": "0"}', b'{"exitStatus": 999}', b"[]", b'{"signal": -9}']
)
def test_exit_info_that_cannot_be_trusted_is_none(tmp_path: Path, content: bytes) -> None:
    sd, _ = _record_dir(tmp_path)
    (tmp_path / "c" / "exit.json").write_bytes(content)
    assert sd.exit_info("c") is None
    (tmp_path / "c" / "exit.json").write_bytes(b'{"exitStatus": 3, "signal": null, "oomKilled": true}')
    assert sd.exit_info("c") == {"exitStatus": 3, "signal": None, "oomKilled": True}
