"""Path resolution inside a rootfs (by the kernel, openat2) and mount option parsing; no mounts are made."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtkit.container.rootfs import MountOptions, make_target, open_in_root, split_options
from virtkit.errors import ContainerError
from virtkit.host import mounts


@pytest.fixture
def root(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    fd = os.open(r, os.O_PATH | os.O_DIRECTORY)
    yield r, fd
    os.close(fd)


def _where(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def test_symlinks_resolve_inside_the_root(root: tuple[Path, int], tmp_path: Path) -> None:
    r, fd = root
    os.symlink("/etc", r / "abs")  # absolute link: relative to the rootfs, not the host
    os.symlink("../../../../..", r / "up")
    os.symlink(str(tmp_path), r / "host")  # the host path of a directory outside the root
    assert _where(open_in_root(fd, "/abs")) == str(r / "etc")
    assert _where(open_in_root(fd, "/up/etc")) == str(r / "etc")
    assert _where(open_in_root(fd, "../../etc")) == str(r / "etc")
    with pytest.raises(FileNotFoundError):  # inside the root, tmp_path's path does not exist
        open_in_root(fd, "/host")


def test_magic_links_are_refused(root: tuple[Path, int]) -> None:
    r, fd = root
    os.symlink("/proc/self/root", r / "procroot")  # resolved in the root: there is no /proc there...
    (r / "proc").mkdir()
    with pytest.raises(FileNotFoundError):
        open_in_root(fd, "/procroot/etc")
    with pytest.raises(OSError):  # ...and a real /proc magic link is never followed
        mounts.openat2(os.open("/", os.O_PATH), "proc/self/root/etc", os.O_PATH, mounts.RESOLVE_NO_MAGICLINKS)


def test_symlink_loop(root: tuple[Path, int]) -> None:
    r, fd = root
    os.symlink("loop", r / "loop")
    with pytest.raises(OSError) as info:
        open_in_root(fd, "/loop/x")
    assert info.value.errno == 40  # ELOOP


def test_make_target_creates_inside_and_through_symlinks(root: tuple[Path, int], tmp_path: Path) -> None:
    r, fd = root
    writable = {mounts.mount_id(fd)}
    os.symlink(str(tmp_path / "outside"), r / "abs")  # absolute: means root/<tmp_path>/outside
    assert _where(make_target(fd, "/new/dir", directory=True, writable=writable)) == str(r / "new/dir")
    assert _where(make_target(fd, "/etc/file", directory=False, writable=writable)) == str(r / "etc/file")
    assert (r / "etc/file").is_file()
    # the link names a host directory: inside the root it points at nothing, and nothing is created
    # on the host for it (nor is the link replaced)
    with pytest.raises(OSError):
        make_target(fd, "/abs/x", directory=True, writable=writable)
    assert not (tmp_path / "outside").exists() and os.path.islink(r / "abs")
    os.symlink("/srv", r / "srvlink")
    (r / "srv").mkdir()
    assert _where(make_target(fd, "/srvlink/x", directory=True, writable=writable)) == str(r / "srv/x")


def test_make_target_refuses_a_dangling_symlink_it_would_have_to_replace(root: tuple[Path, int]) -> None:
    r, fd = root
    os.symlink("/nowhere", r / "dangling")
    (r / "nowhere").mkdir()
    assert _where(make_target(fd, "/dangling/x", directory=True, writable={mounts.mount_id(fd)})) == str(
        r / "nowhere/x"
    )
    os.rmdir(r / "nowhere/x")
    os.rmdir(r / "nowhere")
    # the link now points at nothing: the runtime does not replace it, nor follow it out
    with pytest.raises(OSError):
        make_target(fd, "/dangling", directory=True, writable={mounts.mount_id(fd)})
    assert os.path.islink(r / "dangling")


def test_make_target_creates_nothing_on_a_mount_it_did_not_make(root: tuple[Path, int]) -> None:
    r, fd = root
    existing = make_target(fd, "/etc", directory=True, writable=set())  # existing: fine without rights
    os.close(existing)
    with pytest.raises(ContainerError, match="mount the runtime did not make"):
        make_target(fd, "/etc/newdir", directory=True, writable=set())
    assert not (r / "etc/newdir").exists()


def test_split_options() -> None:
    o = split_options(("nosuid", "ro", "mode=755", "rslave", "size=64k", "tmpcopyup", "sync"))
    assert o.attr_set == mounts.MOUNT_ATTR_NOSUID | mounts.MOUNT_ATTR_RDONLY
    assert (o.propagation, o.propagation_recursive) == (mounts.MS_SLAVE, True)
    assert o.data == ("mode=755", "size=64k") and o.sb_flags == ("sync",)
    assert not o.bind
    o = split_options(("ro", "rw", "rbind"))
    assert o.bind and o.recursive
    assert o.attr_set == 0 and o.attr_clr == mounts.MOUNT_ATTR_RDONLY  # the later option wins
    o = split_options(("noatime", "strictatime"))
    assert o.attr_set == mounts.MOUNT_ATTR_STRICTATIME and o.attr_clr == mounts.MOUNT_ATTR__ATIME
    assert split_options(()) == MountOptions()
    with pytest.raises(ContainerError, match="remount"):
        split_options(("remount", "ro"))
