"""Lifecycle and the OCI state machine, with real containers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from virtkit.errors import ContainerError

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, cgroups")]


def test_create_start_stop_delete(rt: Any, bundle: Any, tmp_path: Path) -> None:
    b = bundle(["sleep", "30"])
    pid_file = tmp_path / "pid"
    rec = rt.create("life", str(b), pid_file=str(pid_file), capture=True)
    st = rt.state("life")
    assert st["status"] == "created" and st["pid"] == rec.pid > 0
    assert st["bundle"] == str(b) and st["ociVersion"].startswith("1.")
    assert int(pid_file.read_text()) == rec.pid
    assert [s["id"] for s in rt.containers()] == ["life"]
    rt.start("life")
    assert rt.state("life")["status"] == "running"
    with pytest.raises(ContainerError, match="it is running"):
        rt.start("life")
    with pytest.raises(ContainerError, match="use 'delete --force'"):
        rt.delete("life")
    assert rt.processes("life") == [rec.pid]
    rt.kill("life", "KILL")
    info = rt.wait("life", timeout=30)
    assert info["exitStatus"] == 137 and info["signal"] == 9
    st = rt.state("life")
    assert st["status"] == "stopped" and st["pid"] == 0 and st["exitStatus"] == 137
    with pytest.raises(ContainerError, match="it is stopped"):
        rt.start("life")
    with pytest.raises(ContainerError, match="it is stopped"):
        rt.kill("life", "TERM")
    rt.delete("life")
    assert rt.containers() == []
    with pytest.raises(ContainerError, match="does not exist"):
        rt.state("life")


def test_delete_created_container_kills_its_init(rt: Any, bundle: Any) -> None:
    rt.create("c", str(bundle(["true"])))
    rt.delete("c")
    assert rt.containers() == []


def test_delete_force_running(rt: Any, bundle: Any) -> None:
    rt.create("f", str(bundle(["sh", "-c", "sleep 30 & sleep 30 & sleep 30"])))
    rt.start("f")
    rt.delete("f", force=True)


def test_exit_status_and_output(run_container: Any, bundle: Any) -> None:
    status, out = run_container("x", bundle(["sh", "-c", "echo out; echo err >&2; exit 42"]))
    assert status == 42
    assert "out" in out and "err" in out


def test_id_taken(rt: Any, bundle: Any) -> None:
    b = bundle(["true"])
    rt.create("dup", str(b))
    with pytest.raises(ContainerError, match="already in use"):
        rt.create("dup", str(b))
    rt.delete("dup")


def test_exec_joins_the_container(rt: Any, bundle: Any, capfd: pytest.CaptureFixture[str]) -> None:
    rt.create("e", str(bundle(["sleep", "30"], {"hostname": "exechost"})))
    rt.start("e")
    p = rt.exec_process(
        "e", ["sh", "-c", "hostname; echo $FOO; pwd; id -u; echo $$"], env=["FOO=bar"], cwd="/tmp", user="1000:1000"
    )
    capfd.readouterr()
    assert rt.exec("e", p) == 0
    out = capfd.readouterr().out.split()
    assert out[:4] == ["exechost", "bar", "/tmp", "1000"]
    assert int(out[4]) > 1  # a new process in the container's PID namespace (PID 1 is the init)
    assert rt.exec("e", rt.exec_process("e", ["sh", "-c", "exit 3"])) == 3
    with pytest.raises(ContainerError, match="executable file not found"):
        rt.exec("e", rt.exec_process("e", ["no-such-binary"]))
    assert len(rt.processes("e")) == 1  # exec'd processes are gone, init remains
    rt.delete("e", force=True)


def test_pid_one_forwarding_and_trap(rt: Any, bundle: Any) -> None:
    """A PID 1 that handles TERM gets it from 'kill' (the kernel drops unhandled ones for PID 1)."""
    b = bundle(["sh", "-c", "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.05; done"])
    rt.create("sig", str(b), capture=True)
    rt.start("sig")
    _wait_for_log(rt, "sig", "ready")
    rt.kill("sig", "TERM")
    info = rt.wait("sig", timeout=30)
    assert info["exitStatus"] == 7
    assert "got-term" in rt.logs("sig")
    rt.delete("sig")


def test_pid_one_reaps_orphans(rt: Any, bundle: Any) -> None:
    """Orphans are reparented to the container's PID 1, and killed with it."""
    b = bundle(["sh", "-c", "(sleep 30 &) ; echo spawned; exec sleep 30"])
    rt.create("orph", str(b), capture=True)
    rt.start("orph")
    _wait_for_log(rt, "orph", "spawned")
    pids = rt.processes("orph")
    assert len(pids) == 2
    ppids = {int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) for p in pids}
    init = rt.state("orph")["pid"]
    assert init in ppids  # the orphaned sleep's parent is the container's init
    rt.delete("orph", force=True)


def _wait_for_log(rt: Any, cid: str, text: str) -> None:
    import select

    for _ in range(2000):
        if text in rt.logs(cid):
            return
        select.select([], [], [], 0.01)
    raise AssertionError(f"{text!r} never appeared in the output of {cid}")


@pytest.mark.parametrize("crash_in", ["apply", "handshake"])
def test_a_create_that_crashes_stays_listed_and_deletable(rt: Any, bundle: Any, crash_in: str) -> None:
    """Crash consistency: the runtime dies half-way through create (after its cgroups exist, or
    after the container's processes exist); the container is listed as stopped, and delete
    releases everything (the fixture then checks no cgroup, mount or process is left)."""
    from virtkit.container import cgroups as cgmod
    from virtkit.container import runtime as rtmod

    b = bundle(["sleep", "30"])
    child = os.fork()
    if child == 0:  # the runtime that will crash: a forked copy of this process
        try:
            if crash_in == "apply":
                cgmod.Cgroup.apply = lambda self, res: os._exit(9)  # type: ignore[method-assign]
            else:
                original = rtmod.Runtime._handshake

                def crash_after_pid(self: Any, rec: Any, chan: Any, *args: Any) -> None:
                    msg = chan.recv(timeout=30)  # the init's pid: processes exist now
                    assert msg and "pid" in msg
                    os._exit(9)

                rtmod.Runtime._handshake = crash_after_pid  # type: ignore[method-assign]
                del original
            rt.create("crash", str(b))
        finally:
            os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 9
    states = rt.containers()
    assert [(s["id"], s["status"]) for s in states] == [("crash", "stopped")]
    rec = rt.dirs.load("crash")
    assert rec.status == "creating" and rec.cgroup_dirs
    rt.delete("crash")
    assert rt.containers() == []
    assert not any(os.path.exists(d) for d in rec.cgroup_dirs)


def test_hooks(rt: Any, bundle: Any, tmp_path: Path) -> None:
    """createRuntime runs once the namespaces exist, before pivot_root (here it finds the init's
    network namespace); poststart after start; poststop after delete; each gets the state on stdin.
    A failing hook fails create, cleanly."""

    def hook(name: str, extra: str = "") -> dict[str, Any]:
        out = tmp_path / f"{name}.json"
        return {"path": "/bin/sh", "args": ["sh", "-c", f"cat > {out}{extra}"]}

    def edit(raw: dict[str, Any]) -> None:
        raw["hooks"] = {
            "createRuntime": [
                hook(
                    "create",
                    f"; test -e /proc/$(sed 's/.*\"pid\": *\\([0-9]*\\).*/\\1/' {tmp_path}/create.json)/ns/net",
                )
            ],
            "poststart": [hook("poststart")],
            "poststop": [hook("poststop")],
        }

    rt.create("hooked", str(bundle(["sleep", "30"], edit=edit)))
    created = json.loads((tmp_path / "create.json").read_text())
    assert created["id"] == "hooked" and created["status"] == "creating" and created["pid"] > 0
    rt.start("hooked")
    assert json.loads((tmp_path / "poststart.json").read_text())["status"] == "running"
    rt.delete("hooked", force=True)
    assert json.loads((tmp_path / "poststop.json").read_text())["status"] == "stopped"

    def failing(raw: dict[str, Any]) -> None:
        raw["hooks"] = {"createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", "echo no way >&2; exit 3"]}]}

    with pytest.raises(ContainerError, match="hook /bin/sh failed with status 3: no way"):
        rt.create("badhook", str(bundle(["true"], edit=failing)))
    assert rt.containers() == []
