"""The host's cgroup layer: layout detection from mountinfo text, control-file parsing, CPU lists,
and where each limit is written per layout, on fake hierarchies in a temporary directory (no
cgroup is made on the host)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from virtkit.host.cgroups import (
    CFS_PERIOD_US,
    CgroupError,
    Group,
    Layout,
    detect,
    parse_cpus,
    read_int,
    read_kv,
    remove_parent,
)

HYBRID = """\
25 22 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
29 25 0:26 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,memory
30 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,cpu,cpuacct
31 25 0:28 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,pids
"""
V2 = "30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
V1 = "\n".join(line for line in HYBRID.splitlines() if "cgroup2" not in line) + "\n"


def test_detect_layouts() -> None:
    h = detect(HYBRID)
    assert h.mode == "hybrid" and h.unified == "/sys/fs/cgroup/unified"
    assert h.v1["cpu"] == h.v1["cpuacct"] == "/sys/fs/cgroup/cpu,cpuacct"
    assert detect(V1).mode == "v1"
    v2 = detect(V2)
    assert v2.mode == "v2" and v2.unified == "/sys/fs/cgroup" and not v2.v1
    with pytest.raises(CgroupError, match="no cgroup filesystem"):
        detect("1 0 8:1 / / rw - ext4 /dev/sda rw\n")


# other programs mount cgroup filesystems for themselves: a jail's private tree, a benchmark's v1 hugetlb
FOREIGN = """\
90 22 0:40 / /tmp/jail/sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
91 22 0:41 / /run/bench/hugetlb rw,relatime - cgroup cgroup rw,hugetlb
92 22 0:42 / /tmp/other-cgroup2 rw,relatime - cgroup2 cgroup2 rw
"""


def test_detect_ignores_other_programs_mounts() -> None:
    assert detect(V2 + FOREIGN) == detect(V2)
    assert detect(FOREIGN + V2).mode == "v2"
    assert detect(HYBRID + FOREIGN) == detect(HYBRID)
    assert "hugetlb" not in detect(FOREIGN + HYBRID).v1
    # a bind of a sub-cgroup is not a hierarchy either
    sub = "93 25 0:28 /virtkit/x /sys/fs/cgroup/pids2 rw - cgroup cgroup rw,pids\n"
    assert detect(V2 + sub) == detect(V2)


def test_detect_falls_back_to_any_mount_when_nothing_is_at_sys_fs_cgroup() -> None:
    only = "92 22 0:42 / /mnt/cg2 rw,relatime - cgroup2 cgroup2 rw\n"
    assert detect(only) == Layout("v2", {}, "/mnt/cg2")


# --- hierarchies that do not matter ----------------------------------------------------------

#: v1 hierarchies of controllers virtkit never uses, mounted where the host's live (this machine
#: mounts blkio, net_cls and perf_event; bench/containers.py mounts hugetlb for crun's runs)
UNUSED_V1 = """\
40 25 0:50 / /sys/fs/cgroup/hugetlb rw,relatime - cgroup cgroup rw,hugetlb
41 25 0:51 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
42 25 0:52 / /sys/fs/cgroup/net_cls,net_prio rw,relatime - cgroup cgroup rw,net_cls,net_prio
43 25 0:53 / /sys/fs/cgroup/perf_event rw,relatime - cgroup cgroup rw,perf_event
44 25 0:54 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
"""


def test_an_unused_v1_hierarchy_does_not_make_a_v2_host_hybrid() -> None:
    # before: any v1 controller at /sys/fs/cgroup counted, and a v2 host with a v1 hugetlb
    # hierarchy was taken for a hybrid one whose limits live in v1 (where it had none)
    assert detect(V2 + UNUSED_V1) == Layout("v2", {}, "/sys/fs/cgroup")
    assert detect(UNUSED_V1 + V2).mode == "v2"


def test_unused_v1_hierarchies_are_left_out_of_a_hybrid_layout() -> None:
    h = detect(HYBRID + UNUSED_V1)
    assert h == detect(HYBRID)
    assert set(h.v1) == {"memory", "cpu", "cpuacct", "pids"}
    assert h.describe() == "cgroup hybrid (cpu,cpuacct,memory,pids) + cgroup2 at /sys/fs/cgroup/unified"


def test_no_hierarchy_that_matters_is_no_layout() -> None:
    only_unused = "\n".join(line for line in UNUSED_V1.splitlines()) + "\n"
    with pytest.raises(CgroupError, match="no cgroup filesystem"):
        detect(only_unused)


def test_mountinfo_lines_that_are_not_mounts_are_skipped() -> None:
    garbage = "\n".join(["", "x", "1 2 3", "a b c d e - cgroup", "1 2 3 4 - cgroup2 x y"]) + "\n"
    assert detect(garbage + V2) == detect(V2)


# --- control files -----------------------------------------------------------------------------


def test_read_int_and_kv(tmp_path: Path) -> None:
    (tmp_path / "n").write_text("42\n")
    (tmp_path / "max").write_text("max\n")
    (tmp_path / "bad").write_text("lots\n")
    (tmp_path / "kv").write_text("usage_usec 10\nweird\nneg -3\nname text\n")
    assert read_int(str(tmp_path / "n")) == 42
    assert read_int(str(tmp_path / "max")) == -1
    assert read_int(str(tmp_path / "bad")) is None
    assert read_int(str(tmp_path / "missing")) is None
    assert read_kv(str(tmp_path / "kv")) == {"usage_usec": 10, "neg": -3}
    assert read_kv(str(tmp_path / "missing")) == {}


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0", {0}), ("0-2", {0, 1, 2}), ("0,2", {0, 2}), (" 1 , 3-4 ,", {1, 3, 4}), ("", set())],
)
def test_parse_cpus(text: str, cpus: set[int]) -> None:
    assert parse_cpus(text) == cpus


@pytest.mark.parametrize("text", ["a", "-1", "3-1", "0-99999999999", "1.5"])
def test_parse_cpus_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpus(text)


# --- where each limit goes --------------------------------------------------------------------

#: the files a new cgroup directory comes with, in the fake (cgroup.kill left out: kernels
#: before 5.14 lack it, and a test adds it)
CONTROL_FILES = (
    "cgroup.procs",
    "cgroup.controllers",
    "cgroup.subtree_control",
    "cgroup.freeze",
    "cpu.shares",
    "cpu.cfs_period_us",
    "cpu.cfs_quota_us",
    "cpu.weight",
    "cpu.max",
    "cpu.stat",
    "memory.max",
    "memory.limit_in_bytes",
    "pids.max",
    "cpuset.cpus",
    "cpuset.mems",
)


@pytest.fixture
def cgroupfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path`` behaving as cgroupfs does where the code relies on it: mkdir makes a cgroup
    with its control files, a write replaces a file's value, and rmdir removes a cgroup that has
    no child cgroup (its control files with it)."""
    real_mkdir, real_rmdir, real_open = os.mkdir, os.rmdir, os.open

    def inside(path: Any) -> bool:
        return isinstance(path, (str, Path)) and tmp_path in Path(path).parents

    def mkdir(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(path, mode, dir_fd=dir_fd)
        if dir_fd is None and inside(path):
            for f in CONTROL_FILES:
                (Path(path) / f).write_text("")

    def rmdir(path: Any, *, dir_fd: int | None = None) -> None:
        p = Path(path)
        if dir_fd is None and inside(path) and p.is_dir() and not any(c.is_dir() for c in p.iterdir()):
            for c in p.iterdir():
                c.unlink()
        real_rmdir(path, dir_fd=dir_fd)

    def open_(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if dir_fd is None and inside(path) and flags & os.O_WRONLY:
            flags |= os.O_TRUNC
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "rmdir", rmdir)
    monkeypatch.setattr(os, "open", open_)
    return tmp_path


def _fake_v1(tmp: Path, path: str = "vm") -> Layout:
    """A v1 host: cpu,cpuacct co-mounted, cpuset, memory, pids; control files made beforehand (a
    real hierarchy has them: nothing here creates one). The parent cpuset has CPUs and nodes."""
    mounts: dict[str, str] = {}
    for hier, ctrls in (("cpu,cpuacct", ("cpu", "cpuacct")), ("cpuset", ("cpuset",)), ("memory",) * 2, ("pids",) * 2):
        root = tmp / hier
        root.mkdir()
        for c in ctrls if isinstance(ctrls, tuple) else (ctrls,):
            mounts[c] = str(root)
    (tmp / "cpuset" / "cpuset.cpus").write_text("0-1\n")
    (tmp / "cpuset" / "cpuset.mems").write_text("0\n")
    return Layout("v1", mounts, None)


V1_VM = ("cpu", "cpuacct", "cpuset", "memory", "pids")


def test_v1_create_starts_a_cpuset_from_its_parent(cgroupfs: Path) -> None:
    tmp_path = cgroupfs
    g = Group(_fake_v1(tmp_path), "/p/vm", V1_VM)
    assert len(g.directories()) == 4  # cpu and cpuacct share one
    made = g.create(())
    assert sorted(made) == sorted(
        str(tmp_path / h / p) for h in ("cpu,cpuacct", "cpuset", "memory", "pids") for p in ("p", "p/vm")
    )
    for level in ("p", "p/vm"):  # every new cpuset level, or the kernel would refuse its tasks
        assert (tmp_path / "cpuset" / level / "cpuset.cpus").read_text() == "0-1"
        assert (tmp_path / "cpuset" / level / "cpuset.mems").read_text() == "0"
    assert (tmp_path / "memory" / "p" / "cpuset.cpus").read_text() == ""  # only the cpuset hierarchy


def test_v1_limits(cgroupfs: Path) -> None:
    tmp_path = cgroupfs
    g = Group(_fake_v1(tmp_path), "/vm", V1_VM)
    g.create(())
    g.set_cpu_weight(100, 1024)
    g.set_cpu_max(50_000, CFS_PERIOD_US)
    g.set_memory_max(64 << 20)
    g.set_pids_max(-1)
    g.set_cpuset("1")
    cpu = tmp_path / "cpu,cpuacct" / "vm"
    assert (cpu / "cpu.shares").read_text() == "1024"
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "50000"
    assert (tmp_path / "memory" / "vm" / "memory.limit_in_bytes").read_text() == str(64 << 20)
    assert (tmp_path / "pids" / "vm" / "pids.max").read_text() == "max"
    assert (tmp_path / "cpuset" / "vm" / "cpuset.cpus").read_text() == "1"
    g.set_cpu_max(None, None)  # nothing asked: nothing written
    g.set_cpu_max(-5, None)
    assert (cpu / "cpu.cfs_quota_us").read_text() == "-1"


def test_v2_limits_in_one_directory(cgroupfs: Path) -> None:
    tmp_path = cgroupfs
    g = Group(Layout("v2", {}, str(tmp_path)), "/vm", V1_VM)
    (tmp_path / "vm").mkdir()
    g.set_cpu_weight(300, 3072)
    g.set_cpu_max(None, None)
    assert (tmp_path / "vm" / "cpu.max").read_text() == f"max {CFS_PERIOD_US}"
    g.set_cpu_max(20_000, 50_000)
    g.set_memory_max(-1)
    g.set_pids_max(7)
    assert (tmp_path / "vm" / "cpu.weight").read_text() == "300"
    assert (tmp_path / "vm" / "cpu.max").read_text() == "20000 50000"
    assert (tmp_path / "vm" / "memory.max").read_text() == "max"
    assert (tmp_path / "vm" / "pids.max").read_text() == "7"


def test_v2_create_enables_what_each_level_offers(cgroupfs: Path) -> None:
    tmp_path = cgroupfs
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids hugetlb\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    (tmp_path / "p").mkdir()  # an existing parent that offers less (its parent enabled less)
    (tmp_path / "p" / "cgroup.controllers").write_text("memory\n")
    (tmp_path / "p" / "cgroup.subtree_control").write_text("")
    g = Group(Layout("v2", {}, str(tmp_path)), "/p/vm", ())
    assert g.create(("cpu", "cpuset", "memory", "pids")) == [str(tmp_path / "p" / "vm")]
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (tmp_path / "p" / "cgroup.subtree_control").read_text() == "+memory"


def test_a_missing_controller_and_a_refusal_are_one_line_errors(tmp_path: Path) -> None:
    g = Group(Layout("v1", {"memory": str(tmp_path)}, None), "/vm", ("memory", "pids"))
    with pytest.raises(CgroupError, match="pids limit 3 needs the pids cgroup controller"):
        g.set_pids_max(3, "pids limit 3")
    with pytest.raises(CgroupError, match=r"the kernel refused memory.limit_in_bytes \(memory.limit_in_bytes = 5\)"):
        g.set_memory_max(5)  # /vm does not exist: the write fails as the kernel's refusal would
    assert "\n" not in str(CgroupError("x"))


def test_create_removes_what_it_made_when_a_level_fails(cgroupfs: Path) -> None:
    tmp_path = cgroupfs
    layout = _fake_v1(tmp_path)
    (tmp_path / "pids" / "p").write_text("")  # a file where a directory must go
    g = Group(layout, "/p/vm", V1_VM)
    with pytest.raises(CgroupError, match="cannot create cgroup"):
        g.create(())
    assert not any((tmp_path / h / "p").is_dir() for h in ("cpu,cpuacct", "cpuset", "memory"))


def test_kill_and_freeze_write_the_files_the_kernel_has(cgroupfs: Path) -> None:
    tmp_path = cgroupfs
    d = tmp_path / "vm"
    d.mkdir()
    g = Group(Layout("v2", {}, str(tmp_path)), "/vm", ())
    assert g.kill() is False  # no cgroup.kill (kernel before 5.14): the caller signals itself
    (d / "cgroup.kill").write_text("")
    assert g.kill() is True and (d / "cgroup.kill").read_text() == "1"
    assert g.freeze(True) is True and (d / "cgroup.freeze").read_text() == "1"
    v1 = Group(Layout("v1", {"memory": str(tmp_path)}, None), "/vm", ("memory",))
    assert v1.freeze(True) is False  # no freezer hierarchy


def test_usage_per_layout(cgroupfs: Path) -> None:
    tmp_path = cgroupfs
    d = tmp_path / "vm"
    d.mkdir()
    (d / "cpu.stat").write_text("usage_usec 1500\nthrottled_usec 7\n")
    (d / "memory.current").write_text("4096\n")
    (d / "memory.events").write_text("oom 2\noom_kill 1\n")
    v2 = Group(Layout("v2", {}, str(tmp_path)), "/vm", ())
    assert (v2.cpu_usage_ns(), v2.cpu_throttled_ns(), v2.memory_usage(), v2.oom_kills()) == (1_500_000, 7000, 4096, 1)
    (tmp_path / "v1").mkdir()
    layout = _fake_v1(tmp_path / "v1")
    g = Group(layout, "/vm", V1_VM)
    g.create(())
    cpu = tmp_path / "v1" / "cpu,cpuacct" / "vm"
    (cpu / "cpuacct.usage").write_text("123\n")
    (cpu / "cpu.stat").write_text("nr_periods 3\nthrottled_time 99\n")
    (tmp_path / "v1" / "memory" / "vm" / "memory.usage_in_bytes").write_text("8192\n")
    assert (g.cpu_usage_ns(), g.cpu_throttled_ns(), g.memory_usage(), g.oom_kills()) == (123, 99, 8192, 0)
    empty = Group(Layout("v1", {}, None), "/vm", V1_VM)
    assert (empty.cpu_usage_ns(), empty.cpu_throttled_ns(), empty.memory_usage()) == (0, 0, 0)


def test_remove_parent_leaves_a_busy_parent(cgroupfs: Path) -> None:
    tmp_path = cgroupfs
    layout = _fake_v1(tmp_path)
    Group(layout, "/p/vm", V1_VM).create(())
    remove_parent("p", layout, V1_VM)  # vm is still in it: rmdir fails, quietly
    assert (tmp_path / "memory" / "p" / "vm").is_dir()
    for h in ("cpu,cpuacct", "cpuset", "memory", "pids"):
        os.rmdir(tmp_path / h / "p" / "vm")
    remove_parent("p", layout, V1_VM)
    assert not any((tmp_path / h / "p").exists() for h in ("cpu,cpuacct", "cpuset", "memory", "pids"))


def test_pids_reads_all_of_a_long_procs_file(cgroupfs: Path) -> None:
    # every process must be found (kill_all signals them where cgroup.kill is missing): more
    # than the 64 KiB a stat file is read up to
    (cgroupfs / "c").mkdir()
    pids = list(range(100_000, 120_000))
    (cgroupfs / "c" / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
    assert Group(Layout("v2", {}, str(cgroupfs)), "/c", ()).pids() == pids
