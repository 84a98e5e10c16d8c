"""Fixtures for container integration tests: real namespaces, cgroups and mounts (root only).

Every test gets a private state root and a fresh busybox bundle; at teardown every container
left is force-deleted and the test fails if anything outlived it: mounts, cgroup directories,
network devices, processes (container processes or our own children).
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from glob import glob
from pathlib import Path
from typing import Any

import pytest

ROOT_REASON = "needs root: namespaces, cgroups and mounts"


# Other work runs on the same machine at the same time (other test suites make network namespaces,
# jails, devices): the checks look only at what can be ours.
_BASE = tempfile.gettempdir()


def _mounts() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        points = {line.split()[4] for line in f}
    return {p for p in points if "virtkit" in p or p.startswith(os.path.join(_BASE, "pytest-of-"))}


def _cgroups() -> set[str]:
    # containers live under .../virtkit/ (other virtkit parts use other names, e.g. virtkitd-*), with
    # any child cgroups they made below them
    out: set[str] = set()
    for top in glob("/sys/fs/cgroup/*/virtkit") + glob("/sys/fs/cgroup/virtkit"):
        out.update(d for d, _, _ in os.walk(top))
    return out


def _netdevs() -> set[str]:
    return {n for n in os.listdir("/sys/class/net") if n == "virtkit0" or re.fullmatch(r"vk[0-9a-f]{8}", n)}


def _contained_processes() -> set[int]:
    """Our children, and processes whose root is one of our test rootfs (container processes)."""
    me = os.getpid()
    out = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2 :].split()
            if fields[0] == b"Z":
                continue
            if int(fields[1]) == me:
                out.add(pid)
                continue
            root = os.readlink(f"/proc/{pid}/root")
            # a pivoted container shows its rootfs path as the host sees it (or "/" when detached)
            if root.startswith(os.path.join(_BASE, "pytest-of-")) or "virtkit" in root:
                out.add(pid)
        except (OSError, ValueError):
            continue
    return out


#: parts of the host's /dev that change on their own (terminals, other programs' shared memory)
_DEV_VOLATILE = ("pts", "shm", "mqueue", "hugepages")


def host_dev() -> dict[str, tuple[int, int, int]]:
    """The host's /dev: path -> (inode, mode, device number), for every node, link and directory."""
    out = {}
    for dirpath, dirs, files in os.walk("/dev"):
        rel = os.path.relpath(dirpath, "/dev")
        if rel.split("/")[0] in _DEV_VOLATILE:
            dirs[:] = []
            continue
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(path)
                out[path] = (st.st_ino, st.st_mode, st.st_rdev)
    return out


def assert_host_dev_unchanged(before: dict[str, tuple[int, int, int]]) -> None:
    import stat

    st = os.lstat("/dev/null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3), "the host's /dev/null is not 1:3 any more"
    after = host_dev()
    changed = {p: (before.get(p), after.get(p)) for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    assert not changed, f"the host's /dev changed (path: (before, after) inode, mode, rdev): {changed}"


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.skip(ROOT_REASON)
    from virtkit.container.image import BUSYBOX_BINARY, ensure_busybox

    if not os.path.exists(BUSYBOX_BINARY):
        pytest.skip(f"{BUSYBOX_BINARY} is missing: install busybox-static ('make deps' does)")

    return Path(ensure_busybox(str(tmp_path_factory.mktemp("images")))) / "rootfs"


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Any]:
    if os.geteuid() != 0:
        pytest.skip(ROOT_REASON)
    from virtkit.container.runtime import Runtime

    before = (_mounts(), _cgroups(), _netdevs(), _contained_processes())
    dev_before = host_dev()
    runtime = Runtime(str(tmp_path / "run"))
    yield runtime
    left = runtime.dirs.ids()
    for cid in left:
        with contextlib.suppress(Exception):  # clean as much as possible, then report
            runtime.delete(cid, force=True)
    after = (_mounts(), _cgroups(), _netdevs(), _contained_processes())
    leaked = {
        what: sorted(map(str, a - b))
        for what, b, a in zip(("mounts", "cgroups", "netdevs", "processes"), before, after, strict=True)
        if a - b
    }
    assert not left, f"containers left behind: {left}"
    assert not leaked, f"left behind: {leaked}"
    assert_host_dev_unchanged(dev_before)
    assert (
        not [n for n in os.listdir(runtime.dirs.root) if not n.startswith(".")]
        if os.path.isdir(runtime.dirs.root)
        else True
    )


@pytest.fixture
def bundle(tmp_path: Path, busybox_rootfs: Path) -> Callable[..., Path]:
    """bundle(args, **changes) -> a bundle directory with a private copy of the busybox rootfs.

    ``changes`` are dotted paths into the default spec, e.g. ``{"process.cwd": "/tmp"}``."""
    import json

    from virtkit.container.spec import default_spec

    counter = iter(range(1000))

    def make(
        args: list[str], changes: dict[str, Any] | None = None, edit: Callable[[dict[str, Any]], None] | None = None
    ) -> Path:
        b = tmp_path / f"bundle{next(counter)}"
        b.mkdir()
        shutil.copytree(busybox_rootfs, b / "rootfs", symlinks=True)
        raw = copy.deepcopy(default_spec(args))
        for path, value in (changes or {}).items():
            cur = raw
            keys = path.split(".")
            for k in keys[:-1]:
                cur = cur.setdefault(k, {})
            cur[keys[-1]] = value
        if edit:
            edit(raw)
        (b / "config.json").write_text(json.dumps(raw))
        return b

    return make


@pytest.fixture
def run_container(rt: Any) -> Callable[..., tuple[int, str]]:
    """run_container(cid, bundle) -> (exit status, captured stdout+stderr); the container is deleted."""

    def go(cid: str, b: Path, timeout: float = 60) -> tuple[int, str]:
        rt.create(cid, str(b), capture=True)
        try:
            rt.start(cid)
            info = rt.wait(cid, timeout=timeout)
            return info["exitStatus"], rt.logs(cid)
        finally:
            rt.delete(cid, force=True)

    return go


@pytest.fixture
def cli(rt: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """The virtkit CLI called in-process against ``rt``'s state root: (status, stderr)."""
    from virtkit.cli import main

    monkeypatch.setenv("VIRTKIT_UNSEALED", "1")  # in-process: do not re-exec pytest

    def call(*argv: str) -> tuple[int, str]:
        status = main(["--root", rt.dirs.root, *argv])
        return status, capsys.readouterr().err

    return call
