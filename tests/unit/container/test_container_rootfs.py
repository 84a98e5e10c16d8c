"""Path resolution inside a rootfs and mount option parsing (no mounts are made)."""

from __future__ import annotations

import os
from pathlib import Path

from virtkit.container import libc
from virtkit.container.rootfs import parse_options, secure_join


def test_secure_join_stays_inside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    os.symlink("/etc", root / "abs")  # absolute link: relative to the rootfs, not the host
    os.symlink("../../../../..", root / "up")
    os.symlink("loop", root / "loop")
    assert secure_join(str(root), "/abs/passwd") == str(root / "etc" / "passwd")
    assert secure_join(str(root), "/up/etc") == str(root / "etc")
    assert secure_join(str(root), "../../x") == str(root / "x")
    assert secure_join(str(root), "/new/dir") == str(root / "new" / "dir")


def test_secure_join_symlink_loop(tmp_path: Path) -> None:
    import pytest

    from virtkit.errors import ContainerError

    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(ContainerError, match="too many symlinks"):
        secure_join(str(tmp_path), "/loop/x")


def test_parse_options() -> None:
    flags, prop, data = parse_options(("nosuid", "ro", "mode=755", "rslave", "size=64k", "tmpcopyup"))
    assert flags == libc.MS_NOSUID | libc.MS_RDONLY
    assert prop == libc.MS_SLAVE | libc.MS_REC
    assert data == ["mode=755", "size=64k"]
    flags, _, _ = parse_options(("ro", "rw", "rbind"))
    assert flags == libc.MS_BIND | libc.MS_REC
