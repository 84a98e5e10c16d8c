"""The virtkit binary driven like runc: separate processes for each verb (the real, sealed path)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, cgroups")]


def vk(rt: Any, *argv: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "VIRTKIT_UNSEALED"}
    proc = subprocess.run(
        [sys.executable, "-m", "virtkit", "--root", rt.dirs.root, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        **kw,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"virtkit {' '.join(argv)} -> {proc.returncode}: {proc.stderr}")
    return proc


def test_runc_style_lifecycle(rt: Any, bundle: Any, tmp_path: Path) -> None:
    b = bundle(["sh", "-c", "echo hello-from-container; sleep 30"])
    vk(rt, "create", "cli1", "--bundle", str(b), "--pid-file", str(tmp_path / "pid"), "--capture")
    state = json.loads(vk(rt, "state", "cli1").stdout)
    assert state["status"] == "created" and state["pid"] == int((tmp_path / "pid").read_text())
    vk(rt, "start", "cli1")
    assert json.loads(vk(rt, "state", "cli1").stdout)["status"] == "running"
    listing = vk(rt, "list").stdout
    assert "cli1" in listing and "running" in listing
    table = vk(rt, "ps").stdout.splitlines()
    assert table[0].split()[:4] == ["ID", "KIND", "STATUS", "PID"] and "container" in table[1]
    assert json.loads(vk(rt, "ps", "cli1", "--format", "json").stdout) == [state["pid"]]
    ev = json.loads(vk(rt, "events", "cli1", "--stats").stdout)
    assert ev["type"] == "stats" and ev["data"]["pids"]["current"] == 1
    assert "memory" in vk(rt, "stats", "cli1").stdout
    out = vk(rt, "exec", "cli1", "--", "sh", "-c", "echo exec-ok; exit 4", check=False)
    assert out.returncode == 4 and "exec-ok" in out.stdout
    for _ in range(500):
        if "hello-from-container" in vk(rt, "logs", "cli1").stdout:
            break
        select.select([], [], [], 0.02)
    assert "hello-from-container" in vk(rt, "logs", "cli1").stdout
    vk(rt, "kill", "cli1", "KILL")
    for _ in range(500):
        if json.loads(vk(rt, "state", "cli1").stdout)["status"] == "stopped":
            break
        select.select([], [], [], 0.02)
    vk(rt, "delete", "cli1")
    assert vk(rt, "list", "-q").stdout == ""


def test_oci_run_forwards_signals_and_returns_the_status(rt: Any, bundle: Any) -> None:
    b = bundle(["sh", "-c", "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.05; done"])
    env = {k: v for k, v in os.environ.items() if k != "VIRTKIT_UNSEALED"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtkit", "--root", rt.dirs.root, "oci", "run", "fw", "--bundle", str(b), "--rm"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 7, err
    assert "got-term" in out
    assert rt.dirs.ids() == []  # --rm


def test_oci_run_detached_and_logs(rt: Any, bundle: Any) -> None:
    b = bundle(["sh", "-c", "echo detached-output"])
    # runc's run --detach leaves the container the caller's stdio; --capture keeps it for 'logs'
    vk(rt, "oci", "run", "det", "--bundle", str(b), "--detach", "--capture")
    for _ in range(500):
        if json.loads(vk(rt, "state", "det").stdout)["status"] == "stopped":
            break
        select.select([], [], [], 0.02)
    st = json.loads(vk(rt, "state", "det").stdout)
    # as with runc, a detached init is reaped by the caller's subreaper (or PID 1), which alone
    # learns its exit status: the state says stopped, without one
    assert st["status"] == "stopped" and "exitStatus" not in st
    assert vk(rt, "logs", "det").stdout == "detached-output\n"
    vk(rt, "delete", "det")


def test_run_mode_container_busybox(rt: Any, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "VIRTKIT_UNSEALED"}
    env["VIRTKIT_IMAGES"] = str(tmp_path / "images")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "virtkit",
            "--root",
            rt.dirs.root,
            "run",
            "--mode",
            "container",
            "--memory",
            "64M",
            "--pids-limit",
            "20",
            "--name",
            "bb",
            "busybox",
            "--",
            "sh",
            "-c",
            "hostname; cat /sys/fs/cgroup/pids/pids.max",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["bb", "20"]
    assert rt.dirs.ids() == []
