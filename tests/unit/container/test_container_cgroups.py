"""A container's cgroup: OCI resources to limit files, stats, child cgroups, on fake hierarchies in a
temporary directory (layout detection and the files themselves: tests/unit/host/test_host_cgroups.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtkit.container.cgroups import Cgroup, shares_to_weight
from virtkit.container.config import Cpu, Memory, Resources
from virtkit.errors import ContainerError
from virtkit.host.cgroups import Layout, detect

HYBRID = """\
25 22 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
29 25 0:26 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,memory
30 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,cpu,cpuacct
31 25 0:28 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,pids
"""
V2 = "30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def test_co_mounted_controllers_share_a_directory() -> None:
    cg = Cgroup(detect(HYBRID), "/virtkit/c1")
    dirs = cg.directories()
    assert "/sys/fs/cgroup/cpu,cpuacct/virtkit/c1" in dirs
    assert len(dirs) == len(set(dirs)) == 4  # memory, cpu+cpuacct, pids, unified


def test_shares_to_weight() -> None:
    assert shares_to_weight(2) == 1
    assert shares_to_weight(1024) == 39
    assert shares_to_weight(262144) == 10000


@pytest.mark.parametrize(
    ("res", "msg"),
    [
        (Resources(cpu=Cpu(quota=500)), "below the kernel's minimum of 1000us"),
        (Resources(cpu=Cpu(period=100)), "outside what the kernel accepts"),
        (Resources(cpu=Cpu(shares=1)), "below the kernel's minimum of 2"),
        (Resources(memory=Memory(limit=100)), "below one page"),
        (Resources(memory=Memory(limit=-5)), "negative"),
        (Resources(pids_limit=-7), "negative"),
    ],
)
def test_limits_the_kernel_refuses(res: Resources, msg: str) -> None:
    with pytest.raises(ContainerError, match=msg):
        Cgroup(Layout("v2", {}, "/nonexistent"), "/x").apply(res)


V1_FILES = {
    "memory": ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"),
    "cpu": ("cpu.cfs_quota_us", "cpu.cfs_period_us", "cpu.shares"),
    "cpuacct": (),
    "pids": ("pids.max",),
    "devices": ("devices.allow", "devices.deny"),
}


def _fake_v1(tmp: Path) -> Layout:
    """Control files exist beforehand in a real hierarchy: the runtime never creates them."""
    mounts = {}
    for ctrl, files in V1_FILES.items():
        d = tmp / ctrl / "virtkit" / "c"
        d.mkdir(parents=True)
        for f in files:
            (d / f).write_text("")
        mounts[ctrl] = str(tmp / ctrl)
    return Layout("v1", mounts, None)


def test_v1_files(tmp_path: Path) -> None:
    cg = Cgroup(_fake_v1(tmp_path), "/virtkit/c")
    base = tmp_path
    cg.apply(
        Resources(
            memory=Memory(limit=64 << 20, swap=64 << 20), cpu=Cpu(shares=512, quota=50000, period=100000), pids_limit=10
        )
    )
    assert (base / "memory/virtkit/c/memory.limit_in_bytes").read_text() == str(64 << 20)
    assert (base / "memory/virtkit/c/memory.memsw.limit_in_bytes").read_text() == str(64 << 20)
    assert (base / "cpu/virtkit/c/cpu.cfs_quota_us").read_text() == "50000"
    assert (base / "cpu/virtkit/c/cpu.cfs_period_us").read_text() == "100000"
    assert (base / "cpu/virtkit/c/cpu.shares").read_text() == "512"
    assert (base / "pids/virtkit/c/pids.max").read_text() == "10"
    # devices: deny everything, then the default allowlist (a plain file keeps only the last write)
    assert (base / "devices/virtkit/c/devices.allow").read_text() == "c 10:200 rwm"


def test_v2_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from virtkit.container import devices

    attached: list[tuple[str, int]] = []
    monkeypatch.setattr(devices, "attach", lambda d, rules: attached.append((d, len(rules))))
    d = tmp_path / "virtkit" / "c"
    d.mkdir(parents=True)
    for f in ("memory.max", "memory.swap.max", "cpu.weight", "cpu.max", "pids.max"):
        (d / f).write_text("")
    cg = Cgroup(Layout("v2", {}, str(tmp_path)), "/virtkit/c")
    cg.apply(Resources(memory=Memory(limit=32 << 20, swap=48 << 20), cpu=Cpu(shares=1024, quota=20000), pids_limit=-1))
    assert (d / "memory.max").read_text() == str(32 << 20)
    assert (d / "memory.swap.max").read_text() == str(16 << 20)
    assert (d / "cpu.weight").read_text() == "39"
    assert (d / "cpu.max").read_text() == "20000 100000"
    assert (d / "pids.max").read_text() == "max"
    # v2 has no devices controller: the rules go to a BPF program on the directory
    assert attached == [(str(d), 1 + 12)]


def test_v2_stats_and_oom(tmp_path: Path) -> None:
    d = tmp_path / "c"
    d.mkdir()
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (d / "memory.current").write_text("1048576\n")
    (d / "memory.max").write_text("max\n")
    (d / "cpu.stat").write_text("usage_usec 2000\nuser_usec 1500\nsystem_usec 500\nnr_throttled 4\n")
    (d / "pids.current").write_text("3\n")
    (d / "pids.max").write_text("20\n")
    cg = Cgroup(Layout("v2", {}, str(tmp_path)), "/c")
    assert cg.oom_kills() == 1
    s = cg.stats()
    assert s["memory"]["usage"]["usage"] == 1048576
    assert s["memory"]["usage"]["limit"] == -1
    assert s["cpu"]["usage"]["total"] == 2_000_000
    assert s["cpu"]["throttling"]["throttledPeriods"] == 4
    assert s["pids"] == {"current": 3, "limit": 20}


def _tree(tmp_path: Path) -> Path:
    """A container cgroup with child cgroups it made itself (plain directories stand in for them)."""
    top = tmp_path / "virtkit" / "c"
    for sub in ("", "a", "a/b", "a/b/c", "d"):
        (top / sub).mkdir(parents=True, exist_ok=True)
    (top / "cgroup.procs").write_text("10\n")
    (top / "a" / "b" / "c" / "cgroup.procs").write_text("12\n13\n")
    (top / "d" / "cgroup.procs").write_text("")
    return top


def test_pids_include_child_cgroups(tmp_path: Path) -> None:
    _tree(tmp_path)
    cg = Cgroup(Layout("v2", {}, str(tmp_path)), "/virtkit/c")
    assert cg.pids() == [10, 12, 13]


def test_remove_takes_child_cgroups_depth_first(tmp_path: Path) -> None:
    top = _tree(tmp_path)
    for f in top.rglob("cgroup.procs"):  # a real cgroupfs has no removable files; the fake must be empty
        f.unlink()
    cg = Cgroup(Layout("v2", {}, str(tmp_path)), "/virtkit/c")
    assert cg.remove() == []
    assert not top.exists() and (tmp_path / "virtkit").exists()


def test_plan_refuses_a_path_through_a_control_file(tmp_path: Path) -> None:
    (tmp_path / "cgroup.procs").write_text("")
    with pytest.raises(ContainerError, match="control file"):
        Cgroup(Layout("v2", {}, str(tmp_path)), "/cgroup.procs/x").plan()
