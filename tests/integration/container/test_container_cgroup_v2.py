"""Pure cgroup v2, on a hybrid host: in a private mount namespace the v1 hierarchies are unmounted
and cgroup2 is mounted at /sys/fs/cgroup, so the runtime sees the layout most hosts have today.

Only the controllers this host attaches to cgroup2 can be used there (here none of memory, pids,
cpu), so this checks detection, cgroup placement, the container's own cgroup2 mount, cgroup.kill,
the BPF device filter (cgroup v2 has no devices controller) and removal; the limits' v2 files are
checked by the unit tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, cgroups")]

SCRIPT = r"""
import json, os, subprocess, sys, tempfile, time
subprocess.run(["umount", "-l", "/sys/fs/cgroup"], check=True)
subprocess.run(["mount", "-t", "cgroup2", "cgroup2", "/sys/fs/cgroup"], check=True)
# another program's cgroup v1 mount elsewhere (a jail's private tree, a benchmark's hugetlb): on a
# busy machine there are such mounts, and they must not make the runtime think the host is hybrid
foreign = tempfile.mkdtemp()
subprocess.run(["mount", "-t", "cgroup", "-o", "pids", "cgroup", foreign], check=True)
from virtkit.container.runtime import Runtime
rt = Runtime(sys.argv[1])
out = {"mode": rt.layout.mode}
rec = rt.create("v2", sys.argv[2], capture=True)
out["dirs"] = rec.cgroup_dirs
out["in_cgroup"] = rt.processes("v2") == [rec.pid]
rt.start("v2")
out["exit"] = rt.wait("v2", timeout=60)
out["log"] = rt.logs("v2")
rt.delete("v2")
out["removed"] = not any(os.path.exists(d) for d in rec.cgroup_dirs)
rec = rt.create("v2kill", sys.argv[3])
rt.start("v2kill")
rt.delete("v2kill", force=True)  # cgroup.kill
out["killed_removed"] = not any(os.path.exists(d) for d in rec.cgroup_dirs)
rt.create("v2dev", sys.argv[4], capture=True)
rt.start("v2dev")
out["dev_exit"] = rt.wait("v2dev", timeout=60)["exitStatus"]
out["dev_log"] = rt.logs("v2dev")
rt.delete("v2dev")
# no cgroup namespace, a writable cgroup mount: the escape attempt, then child cgroups, then delete -f
rec = rt.create("v2esc", sys.argv[5], capture=True)
rt.start("v2esc")
deadline = time.monotonic() + 30
while "made" not in rt.logs("v2esc") and time.monotonic() < deadline:
    time.sleep(0.05)
out["esc_log"] = rt.logs("v2esc")
rt.exec("v2esc", rt.exec_process("v2esc", ["sh", "-c", "echo 1 > /sys/fs/cgroup/cgroup.procs"]))
out["esc_cgroups"] = {}
for pid in rt.processes("v2esc"):
    with open(f"/proc/{pid}/cgroup") as f:
        out["esc_cgroups"][pid] = [l.strip()[3:] for l in f if l.startswith("0::")]
out["esc_path"] = rec.cgroup_path
out["esc_init"] = rec.pid
rt.delete("v2esc", force=True)
out["esc_removed"] = not any(os.path.exists(d) for d in rec.cgroup_dirs)
subprocess.run(["umount", foreign], check=True)
print(json.dumps(out))
"""


def test_pure_v2_lifecycle(rt: Any, bundle: Any, tmp_path: Path) -> None:
    from virtkit.host.cgroups import detect

    if detect().unified is None:  # what the runtime itself finds, not a guess at the host's mounts
        pytest.skip("no cgroup2 hierarchy on this host")
    b = bundle(["sh", "-c", "cat /proc/self/cgroup; ls /sys/fs/cgroup | grep -c cgroup.procs"])
    k = bundle(["sh", "-c", "sleep 30 & sleep 30"])
    # no v1 devices controller here: only the BPF device filter on the cgroup2 directory can refuse
    major, minor = os.major(os.stat("/").st_dev), os.minor(os.stat("/").st_dev)
    d = bundle(["sh", "-c", f"echo ok > /dev/null && mknod /tmp/disk b {major} {minor} && head -c 1 /tmp/disk"])

    def escape(raw: dict[str, Any]) -> None:
        raw["linux"]["namespaces"] = [ns for ns in raw["linux"]["namespaces"] if ns["type"] != "cgroup"]
        for m in raw["mounts"]:
            if m["type"] == "cgroup":
                m["options"] = [o for o in m["options"] if o != "ro"] + ["rw"]

    e = bundle(
        [
            "sh",
            "-c",
            "echo 1 > /sys/fs/cgroup/cgroup.procs; echo $$ > /sys/fs/cgroup/cgroup.procs; "
            "mkdir -p /sys/fs/cgroup/child/grand && echo $$ > /sys/fs/cgroup/child/grand/cgroup.procs; "
            "sleep 300 & echo made; wait",
        ],
        edit=escape,
    )
    proc = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-c",
            SCRIPT,
            rt.dirs.root,
            str(b),
            str(k),
            str(d),
            str(e),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, VIRTKIT_UNSEALED="1"),
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mode"] == "v2"
    assert len(out["dirs"]) == 1 and out["dirs"][0].startswith("/sys/fs/cgroup/virtkit/")
    assert out["in_cgroup"]
    assert out["exit"]["exitStatus"] == 0
    # with a cgroup namespace the container sees its own cgroup as the root, and its own directory
    lines = out["log"].splitlines()
    assert "0::/" in lines  # (the v1 hierarchies still exist in the kernel, so they are listed too)
    assert lines[-1] == "1"
    assert out["removed"] and out["killed_removed"]
    assert out["dev_exit"] != 0 and "Operation not permitted" in out["dev_log"], out["dev_log"]
    # every process stayed in the container's own subtree, and delete -f took the child cgroups too
    assert "made" in out["esc_log"], out["esc_log"]
    assert str(out["esc_init"]) in out["esc_cgroups"] and len(out["esc_cgroups"]) >= 2
    for pid, paths in out["esc_cgroups"].items():
        assert paths and all(p == out["esc_path"] or p.startswith(out["esc_path"] + "/") for p in paths), (pid, paths)
    assert out["esc_removed"]
