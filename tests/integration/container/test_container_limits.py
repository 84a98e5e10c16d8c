"""cgroup limits enforced by the kernel: memory (OOM reported), pids (fork bomb), CPU quota."""

from __future__ import annotations

import os
import select
from typing import Any

import pytest

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, cgroups")]

MiB = 1 << 20


def test_memory_hog_is_oom_killed_and_reported(rt: Any, bundle: Any) -> None:
    # dd's 256 MiB buffer, filled from /dev/zero, cannot fit in 32 MiB (no swap: memory+swap = memory)
    b = bundle(
        ["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"],
        {"linux.resources": {"memory": {"limit": 32 * MiB, "swap": 32 * MiB}}},
    )
    rt.create("hog", str(b), capture=True)
    rt.start("hog")
    info = rt.wait("hog", timeout=60)
    assert info["signal"] == 9 and info["exitStatus"] == 137
    assert info["oomKilled"] is True
    st = rt.state("hog")
    assert st["status"] == "stopped" and st["oomKilled"] is True
    stats = rt.stats("hog")
    assert stats["memory"]["oomKills"] >= 1
    assert stats["memory"]["usage"]["limit"] == 32 * MiB
    rt.delete("hog")


def test_oom_event(rt: Any, bundle: Any) -> None:
    b = bundle(
        ["sh", "-c", "sleep 0.3; dd if=/dev/zero of=/dev/null bs=256M count=1; sleep 30"],
        {"linux.resources": {"memory": {"limit": 32 * MiB, "swap": 32 * MiB}}},
    )
    rt.create("ev", str(b))
    rt.start("ev")
    kinds = []
    for event in rt.events("ev", interval=0.05):
        kinds.append(event["type"])
        if event["type"] == "oom":
            break
    assert kinds[0] == "stats" and kinds[-1] == "oom"
    rt.delete("ev", force=True)


def test_fork_bomb_is_stopped_by_pids_limit(rt: Any, bundle: Any) -> None:
    # a shell that forks 60 sleepers; the limit lets 16 tasks exist, so fork fails and the rest is refused
    script = "i=0; while [ $i -lt 60 ]; do sleep 30 & i=$((i+1)); done; echo forked; exec sleep 30"
    b = bundle(["sh", "-c", script], {"linux.resources": {"pids": {"limit": 16}}})
    rt.create("bomb", str(b), capture=True)
    rt.start("bomb")
    for _ in range(3000):
        if "forked" in rt.logs("bomb") or rt.state("bomb")["status"] == "stopped":
            break
        select.select([], [], [], 0.01)
    stats = rt.stats("bomb")
    assert stats["pids"]["limit"] == 16
    assert stats["pids"]["current"] <= 16
    assert len(rt.processes("bomb")) <= 16
    assert "can't fork" in rt.logs("bomb") or "Resource temporarily unavailable" in rt.logs("bomb")
    rt.delete("bomb", force=True)


def test_cpu_quota_holds_a_busy_loop_near_its_share(rt: Any, bundle: Any) -> None:
    """20% of one CPU: the loop is throttled, and its CPU time stays well under the time it ran.
    (A ratio of two clocks, not an absolute time: it holds on a slow or busy machine.)"""
    import time

    b = bundle(
        ["sh", "-c", "while :; do :; done"],
        {"linux.resources": {"cpu": {"quota": 20000, "period": 100000, "shares": 512}}},
    )
    rt.create("cpu", str(b))
    rt.start("cpu")
    t0 = time.monotonic()
    u0 = rt.stats("cpu")["cpu"]["usage"]["total"]
    select.select([], [], [], 1.0)
    elapsed = time.monotonic() - t0
    stats = rt.stats("cpu")
    used = (stats["cpu"]["usage"]["total"] - u0) / 1e9
    assert stats["cpu"]["throttling"]["throttledPeriods"] > 0
    assert used / elapsed < 0.35, f"used {used:.3f}s of CPU in {elapsed:.3f}s with a 20% quota"
    assert used > 0
    rt.delete("cpu", force=True)


def test_every_cgroup_is_removed_on_delete(rt: Any, bundle: Any) -> None:
    b = bundle(["sleep", "30"], {"linux.resources": {"memory": {"limit": 64 * MiB}, "pids": {"limit": 50}}})
    rec = rt.create("cg", str(b))
    dirs = list(rec.cgroup_dirs)
    assert dirs and all(os.path.isdir(d) for d in dirs)
    with open(os.path.join([d for d in dirs if "/memory/" in d][0], "memory.limit_in_bytes")) as f:
        assert int(f.read()) == 64 * MiB
    rt.start("cg")
    rt.delete("cg", force=True)
    assert not any(os.path.exists(d) for d in dirs)
