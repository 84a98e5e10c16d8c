"""Paths in the sandbox root (openat2 RESOLVE_IN_ROOT) and the fd table."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from virtkit.sandbox.files import FdTable, OpenFile, Root


def test_join() -> None:
    assert Root.join("/a/b", "../c") == "/a/c"
    assert Root.join("/", "../../x") == "/x"
    assert Root.join("/a", "/b/./c/") == "/b/c"
    assert Root.join("/", "//x") == "/x"


def test_escapes_stay_inside(tmp_path: Path) -> None:
    root_dir, outside = tmp_path / "root", tmp_path / "outside"
    root_dir.mkdir()
    outside.write_text("secret")
    (root_dir / "abs").symlink_to("/outside")
    (root_dir / "rel").symlink_to("../outside")
    (root_dir / "host").symlink_to(outside)
    (root_dir / "outside").write_text("inside")
    root = Root(str(root_dir))
    try:
        for path in ("/abs", "/rel", "/../outside", "/outside"):
            fd = root.open(path, os.O_RDONLY)
            try:
                # absolute and relative symlinks land on the root's own "outside", never tmp's
                assert os.read(fd, 100) == b"inside", path
            finally:
                os.close(fd)
        for path in ("/host", str(outside), "/proc/self/root" + str(outside)):
            with pytest.raises(OSError) as e:
                root.open(path, os.O_RDONLY)  # the host's path does not exist under the root
            assert e.value.errno == errno.ENOENT
    finally:
        root.close()


def test_read_only_root(tmp_path: Path) -> None:
    root = Root(str(tmp_path), readonly=True)
    try:
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_CREAT | os.O_RDONLY):
            with pytest.raises(OSError) as e:
                root.open("/f", flags, 0o644)
            assert e.value.errno == errno.EROFS
        with pytest.raises(OSError):
            root.parent("/f")
        pfd, name = root.parent("/f", write=False)
        os.close(pfd)
        assert name == "f"
    finally:
        root.close()


def test_fd_table_shares_descriptions() -> None:
    r, w = os.pipe()
    t = FdTable()
    fd = t.install(OpenFile(w, "pipe"))
    f = t.get(fd)
    assert f is not None
    assert t.install(f.incref(), exact=7) == 7
    child = t.fork()
    t.set_cloexec(7, True)
    t.exec()
    assert t.get(7) is None and t.get(fd) is f
    t.close_all()
    os.write(w, b"still open")  # the child's table holds the description
    child.close_all()
    with pytest.raises(OSError):
        os.fstat(w)  # the last reference closed the host fd
    assert os.read(r, 100) == b"still open"
    os.close(r)
    assert t.close(3) == -errno.EBADF
