"""A container sees and can write only its own cgroup subtree, for run and exec alike (issue §6).

On this host (hybrid: v1 controllers plus cgroup2 at /sys/fs/cgroup/unified) the container's
``/sys/fs/cgroup`` holds one bind mount per hierarchy of the container's own cgroup directory; the
pure v2 case is in test_container_cgroup_v2.py. The configs here have no cgroup namespace, the case
in which a fresh cgroup mount used to expose the hierarchy's root.
"""

from __future__ import annotations

import os
import select
from typing import Any

import pytest

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, cgroups")]

PIDS_LIMIT = 12
# every way a process in the container could try to leave (or move its init out of) its cgroup
ESCAPE = (
    "for f in /sys/fs/cgroup/*/cgroup.procs /sys/fs/cgroup/*/tasks; do "
    "echo 1 > $f; echo $$ > $f; done 2>/dev/null; "
    "echo 1 > /sys/fs/cgroup/pids/../cgroup.procs 2>/dev/null; "
)


def _rw_cgroup_no_namespace(raw: dict[str, Any]) -> None:
    raw["linux"]["namespaces"] = [ns for ns in raw["linux"]["namespaces"] if ns["type"] != "cgroup"]
    for m in raw["mounts"]:
        if m["type"] == "cgroup":
            m["options"] = [o for o in m["options"] if o != "ro"] + ["rw"]
    raw["linux"]["resources"]["pids"] = {"limit": PIDS_LIMIT}


def _in_own_cgroup(pid: int, cgroup_path: str) -> list[str]:
    """Lines of /proc/PID/cgroup (v1 controllers the container has, and cgroup2) outside the container's."""
    bad = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            mine = ctrls == "" or any(
                c in ("memory", "pids", "cpu", "cpuacct", "devices", "freezer") for c in ctrls.split(",")
            )
            if mine and not (path == cgroup_path or path.startswith(cgroup_path + "/")):
                bad.append(line.strip())
    return bad


def _wait_for(rt: Any, cid: str, needle: str, timeout: float = 30.0) -> str:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = rt.logs(cid)
        if needle in log:
            return str(log)
        select.select([], [], [], 0.05)
    raise AssertionError(f"{needle!r} never appeared in the output of {cid}: {rt.logs(cid)!r}")


def _fork_many(n: int) -> str:
    # in a subshell: a shell whose fork fails gives up, and the caller must live on
    return f"(i=0; while [ $i -lt {n} ]; do sleep 300 & i=$((i+1)); done) 2>/dev/null; "


@pytest.mark.parametrize("mode", ["run", "exec"])
def test_writing_cgroup_procs_keeps_everything_in_the_container(rt: Any, bundle: Any, mode: str) -> None:
    """The crun-suite finding: ``echo 1 > /sys/fs/cgroup/pids/cgroup.procs`` from an exec'd process
    moved the init to the hierarchy's root, out of its pids limit."""
    script = (
        (ESCAPE + "echo escaped-tried; " + _fork_many(3 * PIDS_LIMIT) + "echo forked; exec sleep 300")
        if mode == "run"
        else "echo ready; exec sleep 300"
    )
    b = bundle(["sh", "-c", script], edit=_rw_cgroup_no_namespace)
    rec = rt.create("cg", str(b), capture=True)
    rt.start("cg")
    if mode == "exec":
        _wait_for(rt, "cg", "ready")
        status = rt.exec("cg", rt.exec_process("cg", ["sh", "-c", ESCAPE + "exit 0"]))
        assert status == 0
        # the exec'd process is gone; now more processes start, under the limit that must still hold
        rt.exec("cg", rt.exec_process("cg", ["sh", "-c", _fork_many(3 * PIDS_LIMIT)]))  # fails at the limit
    else:
        _wait_for(rt, "cg", "forked")
    pids = rt.processes("cg")
    assert rec.pid in pids
    for pid in pids:
        assert _in_own_cgroup(pid, rec.cgroup_path) == [], pid
    assert len(pids) <= PIDS_LIMIT  # the limit still applies to all of them
    rt.delete("cg", force=True)


def test_the_container_sees_only_its_own_cgroups(run_container: Any, bundle: Any) -> None:
    b = bundle(
        [
            "sh",
            "-c",
            "ls /sys/fs/cgroup; cat /sys/fs/cgroup/pids/pids.max; ls /sys/fs/cgroup/pids | "
            "grep -c '^cgroup.procs$'; echo 1 > /sys/fs/cgroup/pids/cgroup.procs; echo rc=$?",
        ],
        {"linux.resources": {"pids": {"limit": 33}, "devices": [{"allow": False, "access": "rwm"}]}},
    )
    status, out = run_container("view", b)
    assert status == 0, out
    lines = out.split()
    # only the hierarchies the container has a cgroup in; each one its own directory (its limit)
    assert set(lines[: lines.index("33")]) <= {"memory", "cpu", "cpuacct", "pids", "devices", "freezer", "unified"}
    assert "blkio" not in lines and "cpuset" not in lines
    assert lines[lines.index("33") + 1] == "1"
    assert lines[-1] != "rc=0" and "Read-only file system" in out  # the default mount is read-only


def test_delete_force_removes_child_cgroups(rt: Any, bundle: Any) -> None:
    """crun's suite: delete -f failed when the container had made cgroups of its own, and left them."""
    make = (
        "for c in pids memory cpu freezer unified; do mkdir -p /sys/fs/cgroup/$c/child/grand; done; "
        "echo $$ > /sys/fs/cgroup/pids/child/grand/cgroup.procs; "
        "echo $$ > /sys/fs/cgroup/unified/child/cgroup.procs; sleep 300 & echo made; wait"
    )
    b = bundle(["sh", "-c", make], edit=_rw_cgroup_no_namespace)
    rec = rt.create("kids", str(b), capture=True)
    rt.start("kids")
    _wait_for(rt, "kids", "made")
    children = [os.path.join(d, "child") for d in rec.cgroup_dirs if os.path.isdir(os.path.join(d, "child"))]
    assert children, "the container could not make child cgroups"
    assert len(rt.processes("kids")) >= 2  # the processes in the child cgroups are counted too
    rt.delete("kids", force=True)
    assert not any(os.path.exists(d) for d in rec.cgroup_dirs)
