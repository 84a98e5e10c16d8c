"""A snapshot directory is attacker input: odd values and odd files in it end in one SnapshotError
line (or DeviceError), never a traceback, a hang, or a file outside the directory read as guest RAM
or disk. Runs without /dev/kvm."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from virtkit.devices.disk import RawImage
from virtkit.errors import DeviceError, VirtkitError
from virtkit.snapshot import format, load, overlay, snapshot
from virtkit.snapshot.format import SnapshotError
from virtkit.snapshot.snapshot import LoadedSnapshot
from virtkit.vm import DiskSpec

MEMORY = 4 << 20  # as in conftest.make_document
#: how long a call may take before it counts as hung (a deadline on a wait, not a timing claim)
DEADLINE = 60.0


def write_state(directory: Path, doc: dict[str, Any]) -> None:
    directory.mkdir(exist_ok=True)
    (directory / snapshot.STATE_FILE).write_bytes(format.pack(doc))


def _unblock(fifo: Path) -> None:
    """Open the other end of ``fifo`` so that a reader stuck in open() or read() returns."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        try:
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return
    os.close(fd)


def run_bounded(call: Callable[[], object], fifo: Path | None = None) -> BaseException | None:
    """Run ``call`` in a thread; return what it raised. Fails the test if it is still running at the
    deadline (then the FIFO, if any, is opened from this side so the thread can end)."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            call()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            raised.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(DEADLINE)
    if t.is_alive():
        if fifo is not None:
            for _ in range(3):
                _unblock(fifo)
                t.join(5)
        pytest.fail("the call blocked on a file of the snapshot directory")
    return raised[0] if raised else None


# --- values --------------------------------------------------------------------------------------
def test_a_creation_time_too_large_for_a_float_is_refused(tmp_path: Path, document: dict[str, Any]) -> None:
    document["created"] = 10**400  # valid JSON; float() of it raised OverflowError in snapshot-info
    write_state(tmp_path / "s", document)
    with pytest.raises(SnapshotError, match="created"):
        snapshot.describe(tmp_path / "s")


@pytest.mark.parametrize("where", ["memory.file", "disk.path", "disk.copy"])
def test_a_nul_byte_in_a_path_is_refused_when_loading(tmp_path: Path, document: dict[str, Any], where: str) -> None:
    # os functions raise ValueError ("embedded null byte") on these: a traceback in snapshot-info,
    # restore and clone, or in a migration target for the peer's disk path
    disk = {"path": str(tmp_path / "disk.img"), "read_only": False, "size": 512}
    if where == "memory.file":
        document["memory"]["file"] = "memory-a\0b.bin"
    elif where == "disk.path":
        document["machine"]["disks"] = [{**disk, "path": "/tmp/a\0b"}]
    else:
        document["machine"]["disks"] = [{**disk, "copy": "disk0-a\0b.img"}]
    write_state(tmp_path / "s", document)
    with pytest.raises(SnapshotError, match="NUL"):
        load(tmp_path / "s")


# --- files ----------------------------------------------------------------------------------------
def test_a_state_file_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    fifo = tmp_path / "s" / snapshot.STATE_FILE
    os.mkfifo(fifo)
    err = run_bounded(lambda: load(tmp_path / "s"), fifo)
    assert isinstance(err, SnapshotError) and "not a regular file" in str(err)


def test_a_state_file_that_is_a_symlink_is_refused(tmp_path: Path, document: dict[str, Any]) -> None:
    write_state(tmp_path / "elsewhere", document)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / snapshot.STATE_FILE).symlink_to(tmp_path / "elsewhere" / snapshot.STATE_FILE)
    with pytest.raises(SnapshotError, match="symbolic link"):
        load(tmp_path / "s")


def _memory_kinds(tmp_path: Path) -> dict[str, Callable[[Path], None]]:
    other = tmp_path / "host-file"
    other.write_bytes(b"secret".ljust(MEMORY, b"\0"))  # the right size: only its kind is wrong
    return {
        "fifo": lambda p: os.mkfifo(p),
        "symlink to a host file": lambda p: p.symlink_to(other),
        "symlink to a device": lambda p: p.symlink_to("/dev/zero"),
        "directory": lambda p: p.mkdir(),
    }


@pytest.mark.parametrize("kind", ["fifo", "symlink to a host file", "symlink to a device", "directory"])
def test_a_memory_file_that_is_not_a_regular_file_is_refused(
    tmp_path: Path, document: dict[str, Any], kind: str
) -> None:
    # A symlink would map another host file (of the right size) into the guest as its RAM; a FIFO
    # made open() block forever.
    write_state(tmp_path / "s", document)
    snap = load(tmp_path / "s")
    member = Path(snap.memory_path)
    _memory_kinds(tmp_path)[kind](member)
    fds: list[int] = []
    err = run_bounded(lambda: fds.append(snapshot.open_memory(snap)), member if kind == "fifo" else None)
    for fd in fds:
        os.close(fd)
    assert isinstance(err, SnapshotError), err
    assert "regular file" in str(err) or "symbolic link" in str(err)


def test_a_regular_memory_file_still_opens(tmp_path: Path, document: dict[str, Any]) -> None:
    write_state(tmp_path / "s", document)
    snap = load(tmp_path / "s")
    Path(snap.memory_path).write_bytes(bytes(MEMORY))
    os.close(snapshot.open_memory(snap, verify=False))


@pytest.mark.parametrize("kind", ["symlink to a host file", "symlink to a block device", "fifo"])
def test_a_disk_copy_that_is_not_a_regular_file_is_refused(tmp_path: Path, document: dict[str, Any], kind: str) -> None:
    # clone copies the snapshot's disk copy into each clone's overlay: through a symlink it copied
    # any host file (a whole host disk, whose st_size is 0 like a recorded empty disk) to the guest
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    secret = tmp_path / "host-file"
    secret.write_bytes(b"secret".ljust(4096, b"\0"))
    document["machine"]["disks"] = [
        {"path": str(image), "read_only": False, "size": 4096 if kind != "fifo" else 0, "copy": "disk0-x.img"}
    ]
    write_state(tmp_path / "s", document)
    copy = tmp_path / "s" / "disk0-x.img"
    if kind == "symlink to a host file":
        copy.symlink_to(secret)
    elif kind == "symlink to a block device":
        blocks = [p for p in Path("/sys/class/block").iterdir()] if Path("/sys/class/block").exists() else []
        dev = next((Path("/dev") / b.name for b in blocks if (Path("/dev") / b.name).exists()), None)
        if dev is None:
            pytest.skip("no block device node to point at")
        document["machine"]["disks"][0]["size"] = os.path.getsize(dev)
        write_state(tmp_path / "s", document)
        copy.symlink_to(dev)
    else:
        os.mkfifo(copy)
    snap = load(tmp_path / "s")
    err = run_bounded(lambda: snapshot._disk_base(snap, 0, snap.config.disks[0]), copy if kind == "fifo" else None)
    assert isinstance(err, SnapshotError), err


@pytest.mark.parametrize("follow", [False, True])
def test_copy_image_never_blocks_on_a_fifo(tmp_path: Path, follow: bool) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    err = run_bounded(lambda: overlay.copy_image(str(fifo), str(tmp_path / "dst"), follow_symlinks=follow), fifo)
    assert isinstance(err, OSError) and not (tmp_path / "dst").exists()


def test_copy_image_without_following_refuses_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(b"x" * 512)
    (tmp_path / "link").symlink_to(tmp_path / "src")
    with pytest.raises(OSError):
        overlay.copy_image(str(tmp_path / "link"), str(tmp_path / "dst"), follow_symlinks=False)
    assert overlay.copy_image(str(tmp_path / "link"), str(tmp_path / "dst")) in ("reflink", "sparse")


@pytest.mark.parametrize("read_only", [True, False])
def test_a_disk_image_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path, read_only: bool) -> None:
    # a crafted snapshot names the disk path: a read-only FIFO made Machine() block in open()
    fifo = tmp_path / "disk.img"
    os.mkfifo(fifo)
    images: list[RawImage] = []
    err = run_bounded(lambda: images.append(RawImage(fifo, read_only=read_only)), fifo)
    for img in images:
        img.close()
    assert isinstance(err, DeviceError) and "not a regular file or block device" in str(err)


def test_every_error_above_is_a_virtkit_error() -> None:
    assert issubclass(SnapshotError, VirtkitError) and issubclass(DeviceError, VirtkitError)


# --- disk paths recorded in the snapshot ---------------------------------------------------------
def _with_disks(tmp_path: Path, document: dict[str, Any], *disks: dict[str, Any]) -> LoadedSnapshot:
    document["machine"]["disks"] = list(disks)
    write_state(tmp_path / "s", document)
    return load(tmp_path / "s")


def test_a_recorded_disk_path_is_never_attached_on_the_snapshots_word(tmp_path: Path, document: dict[str, Any]) -> None:
    # a crafted vm.state naming a host file as the VM's writable disk: restore named it and opened
    # it read-write for the guest; now the caller names every image and the refusal says which
    snap = _with_disks(tmp_path, document, {"path": "/etc/shadow", "read_only": False, "size": 4096})
    with pytest.raises(SnapshotError, match=r"1 disk\(s\) \(disk 0: writable, 4096 bytes, was '/etc/shadow'\).*--disk"):
        snapshot.attach_disks(snap, None)
    with pytest.raises(SnapshotError, match="--disk"):
        snapshot.RestoredVM(tmp_path / "s")  # before any machine or file is opened
    mine = tmp_path / "mine.img"
    attached = snapshot.attach_disks(snap, [DiskSpec(str(mine))])
    assert [(d.path, d.read_only) for d in attached.config.disks] == [(str(mine), False)]


def test_the_caller_names_every_disk_with_the_recorded_flags(tmp_path: Path, document: dict[str, Any]) -> None:
    snap = _with_disks(
        tmp_path,
        document,
        {"path": "/a", "read_only": False, "size": 4096},
        {"path": "/b", "read_only": True, "size": 4096},
    )
    with pytest.raises(SnapshotError, match="2 disk\\(s\\), 1 given"):
        snapshot.attach_disks(snap, [DiskSpec("x")])
    with pytest.raises(SnapshotError, match="disk 0 .* is writable in the snapshot"):
        snapshot.attach_disks(snap, [DiskSpec("x", read_only=True), DiskSpec("y")])
    attached = snapshot.attach_disks(snap, [DiskSpec("x"), DiskSpec("y")])
    assert [(d.path, d.read_only) for d in attached.config.disks] == [("x", False), ("y", True)]


def test_a_clone_needs_no_name_for_a_disk_the_snapshot_copied(tmp_path: Path, document: dict[str, Any]) -> None:
    snap = _with_disks(
        tmp_path,
        document,
        {"path": "/a", "read_only": False, "size": 4096, "copy": "disk0-x.img"},
        {"path": "/etc/passwd", "read_only": True, "size": 4096},
    )
    with pytest.raises(SnapshotError, match="disk 1: read-only") as err:
        snapshot.attach_disks(snap, None, clone=True)
    assert "disk 0" not in str(err.value)  # copied into the directory: that copy is the base
    only_copies = _with_disks(
        tmp_path, document, {"path": "/a", "read_only": False, "size": 4096, "copy": "disk0-x.img"}
    )
    assert snapshot.attach_disks(only_copies, None, clone=True) is only_copies
    with pytest.raises(SnapshotError, match="--disk"):
        snapshot.attach_disks(only_copies, None)  # a restore resumes the VM on its own image


def test_naming_the_disks_keeps_the_rest_of_the_machine(tmp_path: Path, document: dict[str, Any]) -> None:
    snap = _with_disks(tmp_path, document, {"path": "/a", "read_only": False, "size": 4096})
    attached = snapshot.attach_disks(snap, [DiskSpec("x")])
    for name in type(snap.config).__slots__:
        if name != "disks":
            assert getattr(attached.config, name) == getattr(snap.config, name), name
    assert (attached.memory, attached.image, attached.disk_sizes) == (snap.memory, snap.image, snap.disk_sizes)


def test_a_recorded_bridge_is_never_followed_on_the_snapshots_word(tmp_path: Path, document: dict[str, Any]) -> None:
    from virtkit.devices.virtio.net.tap import NetSpec

    document["machine"]["nets"] = [{"mac": "02:76:6b:00:00:07", "bridge": "prod-br"}]
    write_state(tmp_path / "s", document)
    snap = load(tmp_path / "s")
    with pytest.raises(
        SnapshotError, match=r"1 network card\(s\) \(card 0: MAC 02:76:6b:00:00:07, was on bridge 'prod-br'\)"
    ):
        snapshot.attach_nets(snap, None)
    with pytest.raises(SnapshotError, match="leave out mac="):
        snapshot.attach_nets(snap, [NetSpec(bridge="br0", mac=bytes(6))])
    (card,) = snapshot.attach_nets(snap, [NetSpec(bridge="test-br")]).config.nets
    assert (card.bridge, card.mac) == ("test-br", bytes.fromhex("02766b000007"))  # the guest's MAC kept
