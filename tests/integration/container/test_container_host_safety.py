"""A container config must not change the host (issue §5): sysctls, /dev, paths swapped under the runtime.

The ``rt`` fixture checks after every test that nothing leaked and that the host's /dev is as it was
(every node, link and directory with the same inode, mode and device number; /dev/null still 1:3).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, cgroups")]


def _one_line_error(status: int, err: str, *needles: str) -> None:
    assert status != 0
    assert err.startswith("virtkit: error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err


def _sysctl(key: str) -> str:
    with open("/proc/sys/" + key.replace(".", "/")) as f:
        return f.read()


def _no_namespace(kind: str) -> Any:
    def edit(raw: dict[str, Any]) -> None:
        raw["linux"]["namespaces"] = [ns for ns in raw["linux"]["namespaces"] if ns["type"] != kind]
        if kind == "uts":
            raw.pop("hostname", None)

    return edit


# ---- sysctls ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "edit", "needle"),
    [
        ("kernel.core_pattern", "|/tmp/virtkit-pwned %p", None, "not a namespaced sysctl"),
        ("fs.lease-break-time", "7", None, "not a namespaced sysctl"),
        ("kernel.shm_next_id", "7", None, "not a namespaced sysctl"),
        ("fs.mqueue.queues_max", "77", _no_namespace("ipc"), "belongs to the ipc namespace"),
        ("net.ipv4.ping_group_range", "0 0", _no_namespace("network"), "belongs to the network namespace"),
        ("kernel.domainname", "pwned", _no_namespace("uts"), "belongs to the uts namespace"),
    ],
)
def test_sysctls_that_would_change_the_host_are_refused(
    cli: Any, rt: Any, bundle: Any, key: str, value: str, edit: Any, needle: str
) -> None:
    before = _sysctl(key)

    def change(raw: dict[str, Any]) -> None:
        raw["linux"]["sysctl"] = {key: value}
        if edit:
            edit(raw)

    b = bundle(["true"], edit=change)
    _one_line_error(*cli("oci", "run", "s", "--bundle", str(b)), f"linux.sysctl.{key}", needle)
    assert _sysctl(key) == before
    assert rt.dirs.ids() == []


def test_namespaced_sysctls_change_only_the_container(run_container: Any, bundle: Any) -> None:
    keys = {"fs.mqueue.queues_max": "77", "net.ipv4.ping_group_range": "0\t0", "kernel.shmmni": "1234"}
    before = {k: _sysctl(k) for k in keys}
    b = bundle(
        ["sh", "-c", "cat /proc/sys/fs/mqueue/queues_max /proc/sys/net/ipv4/ping_group_range /proc/sys/kernel/shmmni"],
        {"linux.sysctl": keys},
    )
    status, out = run_container("ns-sysctl", b)
    assert status == 0, out
    assert out.split() == ["77", "0", "0", "1234"]
    assert {k: _sysctl(k) for k in keys} == before


@pytest.fixture
def other_netns() -> Any:
    """A network namespace that is not the host's: a sleeping process holds it."""
    p = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    try:
        path = f"/proc/{p.pid}/ns/net"
        deadline = 50
        while os.stat(path).st_ino == os.stat("/proc/self/ns/net").st_ino and deadline:
            deadline -= 1
            threading.Event().wait(0.1)
        yield p.pid
    finally:
        p.kill()
        p.wait()


def test_joined_namespaces_are_checked(cli: Any, rt: Any, bundle: Any, other_netns: int) -> None:
    def join(path: str, kind: str = "network", sysctl: bool = True) -> Any:
        def edit(raw: dict[str, Any]) -> None:
            raw["linux"]["namespaces"] = [ns for ns in raw["linux"]["namespaces"] if ns["type"] != kind]
            raw["linux"]["namespaces"].append({"type": kind, "path": path})
            if sysctl:
                raw["linux"]["sysctl"] = {"net.ipv4.ping_group_range": "0 0"}

        return edit

    before = _sysctl("net.ipv4.ping_group_range")
    own = f"/proc/{os.getpid()}/ns"  # the runtime's (in-process: this test's) own namespaces

    def refused(edit: Any, needle: str) -> None:
        _one_line_error(*cli("oci", "run", "j", "--bundle", str(bundle(["true"], edit=edit))), needle)

    refused(join(f"{own}/net"), "is the host's network namespace")
    refused(join(f"{own}/uts", "uts", sysctl=False), "is the host's uts namespace")
    refused(join("/etc/passwd"), "is not a namespace")
    refused(join(f"{own}/ipc"), "is not a network namespace")
    refused(join("/nonexistent"), "cannot open it")
    assert _sysctl("net.ipv4.ping_group_range") == before
    # another namespace of the right kind is the container's to change
    b = bundle(["cat", "/proc/sys/net/ipv4/ping_group_range"], edit=join(f"/proc/{other_netns}/ns/net"))
    rt.create("joined", str(b), capture=True)
    rt.start("joined")
    assert rt.wait("joined", timeout=60)["exitStatus"] == 0
    assert rt.logs("joined").split() == ["0", "0"]
    rt.delete("joined")
    assert _sysctl("net.ipv4.ping_group_range") == before
    # a net sysctl file acts on the namespace of whoever reads it: read it from inside that one
    inside = subprocess.run(
        ["nsenter", f"--net=/proc/{other_netns}/ns/net", "cat", "/proc/sys/net/ipv4/ping_group_range"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert inside.stdout.split() == ["0", "0"]


# ---- /dev -------------------------------------------------------------------------------------


def _replace_dev(new: dict[str, Any] | None, keep_mqueue: bool = True) -> Any:
    def edit(raw: dict[str, Any]) -> None:
        mounts = [m for m in raw["mounts"] if m["destination"] != "/dev"]
        if not keep_mqueue:
            mounts = [m for m in mounts if m["destination"] != "/dev/mqueue"]
        raw["mounts"] = ([new] if new else []) + mounts

    return edit


def test_devtmpfs_is_refused(cli: Any, rt: Any, bundle: Any) -> None:
    b = bundle(["true"], edit=_replace_dev({"destination": "/dev", "type": "devtmpfs", "source": "devtmpfs"}))
    _one_line_error(*cli("oci", "run", "d", "--bundle", str(b)), "devtmpfs")
    assert rt.dirs.ids() == []


def test_a_bind_of_the_host_dev_is_left_alone(cli: Any, rt: Any, bundle: Any, run_container: Any) -> None:
    """The runtime makes no node, link or directory in a /dev it did not mount itself."""
    host_dev = {"destination": "/dev", "type": "bind", "source": "/dev", "options": ["rbind", "nosuid"]}
    # the default /dev/mqueue mount would need a directory the host's /dev does not have: refused,
    # not created in the host's /dev
    if not os.path.exists("/dev/mqueue"):
        b = bundle(["true"], edit=_replace_dev(host_dev))
        _one_line_error(*cli("oci", "run", "m", "--bundle", str(b)), "/dev/mqueue", "did not make")
    b = bundle(
        ["sh", "-c", "ls -l /dev/null; echo x > /dev/null && echo ok"], edit=_replace_dev(host_dev, keep_mqueue=False)
    )
    status, out = run_container("hostdev", b)
    assert status == 0, out
    assert "ok" in out.split()
    # and devices are not made there either
    b = bundle(
        ["true"],
        edit=_replace_dev(host_dev, keep_mqueue=False),
        changes={"linux.devices": [{"path": "/dev/virtkit-test", "type": "c", "major": 1, "minor": 3}]},
    )
    _one_line_error(*cli("oci", "run", "m", "--bundle", str(b)), "linux.devices needs a tmpfs mounted at /dev")
    assert not os.path.lexists("/dev/virtkit-test")


def test_devices_stay_in_the_runtimes_own_tmpfs(cli: Any, rt: Any, bundle: Any, run_container: Any) -> None:
    def edit(raw: dict[str, Any]) -> None:
        raw["mounts"].append({"destination": "/dev/host", "type": "bind", "source": "/dev", "options": ["rbind"]})

    ok = bundle(
        ["sh", "-c", "ls /dev/host/null >/dev/null && ls -l /dev/virtkit-null /dev/net/virtkit-null"],
        edit=edit,
        changes={
            "linux.devices": [
                {"path": "/dev/virtkit-null", "type": "c", "major": 1, "minor": 3},
                {"path": "/dev/net/virtkit-null", "type": "c", "major": 1, "minor": 3},
            ]
        },
    )
    status, out = run_container("owndev", ok)
    assert status == 0, out
    assert out.count("1,   3") == 2
    # a device path that crosses into the bind of the host's /dev is refused, not made there
    bad = bundle(
        ["true"],
        edit=edit,
        changes={"linux.devices": [{"path": "/dev/host/virtkit-null", "type": "c", "major": 1, "minor": 3}]},
    )
    _one_line_error(*cli("oci", "run", "x", "--bundle", str(bad)), "Invalid cross-device link")
    assert not os.path.lexists("/dev/virtkit-null") and not os.path.lexists("/dev/virtkit-test")


def test_without_a_dev_mount_nothing_is_made_in_the_rootfs(bundle: Any, run_container: Any) -> None:
    b = bundle(["true"], edit=_replace_dev(None, keep_mqueue=False))
    for m in ("/dev/pts", "/dev/shm"):  # they would need mount points in the bundle's own /dev
        b_raw = b / "config.json"
        import json

        raw = json.loads(b_raw.read_text())
        raw["mounts"] = [x for x in raw["mounts"] if x["destination"] != m]
        b_raw.write_text(json.dumps(raw))
    before = sorted(os.listdir(b / "rootfs" / "dev"))
    status, out = run_container("nodev", b)
    assert status == 0, out
    assert sorted(os.listdir(b / "rootfs" / "dev")) == before == []


def test_a_dev_symlinked_out_of_the_rootfs_is_not_followed(cli: Any, rt: Any, bundle: Any, tmp_path: Path) -> None:
    outside = tmp_path / "outside-dev"
    outside.mkdir()
    b = bundle(["true"])
    os.rmdir(b / "rootfs" / "dev")
    os.symlink(str(outside), b / "rootfs" / "dev")  # the host path of a directory outside the rootfs
    status, err = cli("oci", "run", "sym", "--bundle", str(b))
    _one_line_error(status, err)
    assert os.listdir(outside) == []


# ---- paths swapped under the runtime --------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def _exchange(a: str, b: str) -> None:
    _libc.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), RENAME_EXCHANGE)


def test_a_symlink_swapped_in_while_mounting_cannot_redirect_the_mount(rt: Any, bundle: Any, tmp_path: Path) -> None:
    """CVE-2021-30465's race: a path flips between a directory and a symlink to a host directory
    while the runtime mounts a tmpfs there. A mount that followed the symlink would cover the host
    directory in the container's namespace; the bind of that directory made next would then show
    the empty tmpfs instead of its marker file."""
    host = tmp_path / "host-dir"
    host.mkdir()
    (host / "marker").write_text("host")

    def edit(raw: dict[str, Any]) -> None:
        raw["mounts"].append({"destination": "/race", "type": "tmpfs", "source": "tmpfs", "options": ["size=64k"]})
        raw["mounts"].append({"destination": "/view", "type": "bind", "source": str(host), "options": ["rbind"]})

    b = bundle(["sh", "-c", "cat /view/marker"], edit=edit)
    race, other = b / "rootfs" / "race", b / "rootfs" / "race-other"
    race.mkdir()
    (b / "rootfs" / "view").mkdir()
    os.symlink(str(host), other)
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            _exchange(str(race), str(other))

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    outcomes = {"ran": 0, "refused": 0}
    try:
        for i in range(40):
            try:
                rt.create(f"race{i}", str(b), capture=True)
            except Exception as err:  # noqa: BLE001 - the symlink was in place: a clean refusal
                assert "symbolic links" in str(err) or "race" in str(err), err
                outcomes["refused"] += 1
                continue
            rt.start(f"race{i}")
            info = rt.wait(f"race{i}", timeout=60)
            log = rt.logs(f"race{i}")
            rt.delete(f"race{i}")
            assert info["exitStatus"] == 0 and log.strip() == "host", f"run {i}: the mount escaped: {log!r}"
            outcomes["ran"] += 1
    finally:
        stop.set()
        flipper.join()
    assert (host / "marker").read_text() == "host" and sorted(os.listdir(host)) == ["marker"]
    assert outcomes["ran"] + outcomes["refused"] == 40, outcomes
    print("race outcomes:", outcomes)


def test_static_symlinks_out_of_the_rootfs(cli: Any, rt: Any, bundle: Any, tmp_path: Path, run_container: Any) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()

    def edit(raw: dict[str, Any]) -> None:
        raw["mounts"].append({"destination": "/abs/sub", "type": "tmpfs", "source": "tmpfs"})

    b = bundle(["true"], edit=edit)
    os.symlink(str(outside), b / "rootfs" / "abs")  # an absolute host path
    _one_line_error(*cli("oci", "run", "abs", "--bundle", str(b)), "/abs/sub")
    b = bundle(["true"], edit=edit)
    os.symlink("../" * 12 + str(outside).lstrip("/"), b / "rootfs" / "abs")  # climbing out
    _one_line_error(*cli("oci", "run", "up", "--bundle", str(b)), "/abs/sub")
    assert os.listdir(outside) == []
    # masked and read-only paths through links that leave the rootfs are not followed out either
    b = bundle(
        ["sh", "-c", "cat /etc/hostname"],
        changes={"linux.maskedPaths": ["/etc/masked"], "linux.readonlyPaths": ["/etc/ro"]},
    )
    os.symlink(str(outside), b / "rootfs" / "etc" / "masked")
    os.symlink("../" * 12 + str(outside).lstrip("/"), b / "rootfs" / "etc" / "ro")
    status, out = run_container("masks", b)
    assert status == 0, out
    assert os.listdir(outside) == []
