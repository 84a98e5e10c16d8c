"""What the process sees: namespaces, rootfs, mounts, /dev, hostname, env, cwd, user, rlimits."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, cgroups")]


def test_hostname_env_cwd_user_rlimits(run_container: Any, bundle: Any) -> None:
    b = bundle(
        ["sh", "-c", "hostname; echo $GREETING; pwd; id -u; id -g; id -G; ulimit -n; umask"],
        {
            "hostname": "box1",
            "process.cwd": "/tmp",
            "process.env": ["PATH=/bin:/usr/bin", "GREETING=hello"],
            "process.user": {"uid": 1000, "gid": 1001, "additionalGids": [1002], "umask": 63},
            "process.rlimits": [{"type": "RLIMIT_NOFILE", "soft": 321, "hard": 321}],
        },
    )
    status, out = run_container("iso", b)
    assert status == 0, out
    assert out.split() == ["box1", "hello", "/tmp", "1000", "1001", "1001", "1002", "321", "0077"]


def test_pid_and_net_namespaces(run_container: Any, bundle: Any) -> None:
    script = "echo $$; ls /sys/class/net; cat /sys/class/net/lo/operstate"
    status, out = run_container("ns", bundle(["sh", "-c", script]))
    assert status == 0, out
    lines = out.split()
    assert lines[0] == "1"  # the container's process is PID 1 of its namespace
    assert lines[1:-1] == ["lo"]  # nothing but loopback
    assert lines[-1] == "unknown"  # lo is up (its operstate reads "unknown" when up)


def test_rootfs_is_pivoted_not_chrooted(run_container: Any, bundle: Any) -> None:
    # after pivot_root and the detach of the old root, the host's / is not in the mount table
    status, out = run_container("pivot", bundle(["sh", "-c", "cat /proc/self/mountinfo | awk '{print $5}'"]))
    assert status == 0
    points = out.split()
    assert points[0] == "/"
    assert not any(p.startswith("/work") or p.startswith("/root") or p == "/run/virtkit" for p in points)


def test_minimal_dev(run_container: Any, bundle: Any) -> None:
    status, out = run_container(
        "dev",
        bundle(
            [
                "sh",
                "-c",
                "ls /dev; ls -l /dev/null /dev/zero /dev/ptmx; echo x > /dev/null && head -c 4 /dev/zero | wc -c",
            ]
        ),
    )
    assert status == 0, out
    for node in (
        "null",
        "zero",
        "full",
        "random",
        "urandom",
        "tty",
        "ptmx",
        "pts",
        "shm",
        "fd",
        "stdin",
        "stdout",
        "stderr",
    ):
        assert node in out.split()
    assert "sda" not in out and "vda" not in out
    assert out.strip().endswith("4")


def test_device_cgroup_denies_host_disk(run_container: Any, bundle: Any) -> None:
    """CAP_MKNOD is in Docker's set: the device cgroup is what stops a container reading the disk."""
    major, minor = os.major(os.stat("/").st_dev), os.minor(os.stat("/").st_dev)
    b = bundle(["sh", "-c", f"mknod /tmp/disk b {major} {minor} && head -c 1 /tmp/disk"])
    status, out = run_container("mknod", b)
    assert status != 0
    assert "Operation not permitted" in out


def test_bind_mounts_and_readonly_root(run_container: Any, bundle: Any, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in.txt").write_text("from-host")
    mounts_extra = [
        {"destination": "/data", "type": "bind", "source": str(shared), "options": ["rbind", "ro"]},
        {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]},
    ]

    def edit(raw: dict[str, Any]) -> None:
        raw["mounts"].extend(mounts_extra)
        raw["root"]["readonly"] = True

    b = bundle(
        ["sh", "-c", "cat /data/in.txt; touch /data/x 2>&1; touch /etc/x 2>&1; echo ok > /scratch/y && cat /scratch/y"],
        edit=edit,
    )
    status, out = run_container("mnt", b)
    assert status == 0, out
    assert "from-host" in out
    assert out.count("Read-only file system") == 2
    assert out.strip().endswith("ok")
    assert not (shared / "x").exists()


def test_masked_and_readonly_paths(run_container: Any, bundle: Any) -> None:
    candidates = ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/interrupts")
    masked = [p for p in candidates if os.path.exists(p)]
    assert masked, "none of the masked /proc files exists on this kernel"
    reads = "; ".join(f"wc -c < {p}" for p in masked)
    writes = "echo 1 > /proc/sys/kernel/domainname 2>&1; echo 1 > /proc/sys/vm/overcommit_memory 2>&1; true"
    b = bundle(["sh", "-c", f"{reads}; ls /sys/firmware | wc -l; {writes}"])
    status, out = run_container("mask", b)
    assert status == 0, out
    lines = out.splitlines()
    assert lines[: len(masked) + 1] == ["0"] * (len(masked) + 1)
    assert sum("Read-only file system" in line for line in lines) == 2


def test_user_namespace(run_container: Any, bundle: Any) -> None:
    from virtkit.container.spec import default_spec

    rootless = default_spec(rootless=True)

    def edit(raw: dict[str, Any]) -> None:
        raw["linux"]["namespaces"] = rootless["linux"]["namespaces"]
        raw["linux"]["uidMappings"] = rootless["linux"]["uidMappings"]
        raw["linux"]["gidMappings"] = rootless["linux"]["gidMappings"]
        raw["mounts"] = rootless["mounts"]

    b = bundle(["sh", "-c", "id -u; cat /proc/self/uid_map; cat /proc/self/gid_map"], edit=edit)
    os.chown(b / "rootfs", 100000, 100000)
    for d in (b, *b.parents):  # the mapped root (host uid 100000) must be able to walk to the rootfs
        if str(d) in ("/", "/tmp"):
            break
        os.chmod(d, os.stat(d).st_mode | 0o055)
    status, out = run_container("userns", b)
    assert status == 0, out
    assert out.split() == ["0", "0", "100000", "65536", "0", "100000", "65536"]


def test_fds_are_closed_before_exec(rt: Any, bundle: Any, run_container: Any) -> None:
    leak = os.open("/dev/null", os.O_RDONLY)  # inheritable fd in the runtime
    os.set_inheritable(leak, True)
    try:
        status, out = run_container("fds", bundle(["sh", "-c", "ls /proc/self/fd"]))
    finally:
        os.close(leak)
    assert status == 0
    assert sorted(int(x) for x in out.split()) == [0, 1, 2, 3]  # 3 is ls's own directory fd


def test_bridge_network(rt: Any, bundle: Any) -> None:
    """--net bridge: eth0 with an address, a default route via the bridge, and both gone on delete."""
    b = bundle(["sh", "-c", "ip -o -4 addr show eth0; ping -c 1 -W 5 10.87.0.1 >/dev/null && echo reached"])
    rt.create("net", str(b), capture=True, net="bridge")
    address = rt.state("net")["address"]
    rec = rt.dirs.load("net")
    assert os.path.exists(f"/sys/class/net/{rec.netdevs[0]}")
    rt.start("net")
    assert rt.wait("net", timeout=60)["exitStatus"] == 0
    out = rt.logs("net")
    assert f"inet {address}/16" in out and "reached" in out
    rt.delete("net")
    assert not os.path.exists(f"/sys/class/net/{rec.netdevs[0]}")
    from virtkit.container.network import LEASES

    assert os.stat(LEASES).st_mode & 0o777 == 0o700


def test_masked_directories_read_as_empty_for_any_user(run_container: Any, bundle: Any) -> None:
    b = bundle(["sh", "-c", "ls -A /sys/firmware | wc -l"], {"process.user": {"uid": 1000, "gid": 1000}})
    status, out = run_container("mask-user", b)
    assert status == 0, out
    assert out.split() == ["0"]
