"""virtkit-runtime driven in the dialect crun's suite, conmon and containerd use (runc(8), crun(1),
runtime-spec runtime.md): one process per verb, global flags first, stdio inherited by the container,
the init handed to the caller's subreaper, exit status 1 on failure."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, cgroups")]


@pytest.fixture(scope="module")
def runtime_bin(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The ``virtkit-runtime`` console script of this environment, or the same entry point written
    as a two-line script (a checkout used without ``pip install``)."""
    installed = Path(sys.executable).parent / "virtkit-runtime"
    if installed.exists():
        return str(installed)
    script = tmp_path_factory.mktemp("bin") / "virtkit-runtime"
    script.write_text(f"#!{sys.executable}\nfrom virtkit.cli import runtime\nruntime()\n")
    script.chmod(0o755)
    return str(script)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("VIRTKIT_UNSEALED", "LISTEN_FDS", "LISTEN_PID")}


def oci(rt: Any, runtime_bin: str, *argv: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    """One runtime call; a container started with ``--detach`` holds the caller's stdio, so those
    calls pass ``stdout``/``stderr`` files instead of pipes."""
    kw.setdefault("capture_output", "stdout" not in kw)
    proc = subprocess.run(
        [runtime_bin, "--cgroup-manager", "cgroupfs", "--root", rt.dirs.root, *argv],
        text=True,
        timeout=60,
        env=kw.pop("env", _env()),
        **kw,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"virtkit-runtime {' '.join(argv)} -> {proc.returncode}: {proc.stderr}")
    return proc


def wait_status(rt: Any, runtime_bin: str, cid: str, want: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        st: dict[str, Any] = json.loads(oci(rt, runtime_bin, "state", cid).stdout)
        if st["status"] == want or time.monotonic() > deadline:
            return st
        select.select([], [], [], 0.02)


def detached_run(rt: Any, runtime_bin: str, tmp_path: Path, *argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    with open(tmp_path / "detach.err", "w+") as err:
        proc = oci(rt, runtime_bin, "run", "--detach", *argv, stdout=subprocess.DEVNULL, stderr=err, check=False, **kw)
        err.seek(0)
        assert proc.returncode == 0, err.read()
    return proc


def test_run_detach_pause_update_kill_delete(
    rt: Any, runtime_bin: str, bundle: Callable[..., Path], tmp_path: Path
) -> None:
    b = bundle(["sleep", "60"])
    # crun's suite: --config names the file, relative to the working directory; root.path stays
    # relative to the bundle
    (b / "cfg").mkdir()
    (b / "config.json").rename(b / "cfg" / "c.json")
    pid_file = tmp_path / "pid"
    detached_run(rt, runtime_bin, tmp_path, "--config", "cfg/c.json", "--pid-file", str(pid_file), "d1", cwd=b)
    st = json.loads(oci(rt, runtime_bin, "state", "d1").stdout)
    assert st["status"] == "running" and st["pid"] == int(pid_file.read_text()) and st["ociVersion"]
    assert json.loads(oci(rt, runtime_bin, "ps", "--format", "json", "d1").stdout) == [st["pid"]]
    assert "d1" in oci(rt, runtime_bin, "list", "-q").stdout.split()

    oci(rt, runtime_bin, "pause", "d1")
    assert json.loads(oci(rt, runtime_bin, "state", "d1").stdout)["status"] == "paused"
    again = oci(rt, runtime_bin, "pause", "d1", check=False)
    assert again.returncode == 1 and "it is paused" in again.stderr
    oci(rt, runtime_bin, "resume", "d1")
    assert json.loads(oci(rt, runtime_bin, "state", "d1").stdout)["status"] == "running"

    oci(rt, runtime_bin, "update", "--memory", "64M", "--pids-limit", "50", "d1")
    stats = rt.stats("d1")
    assert stats["memory"]["usage"]["limit"] == 64 << 20 and stats["pids"]["limit"] == 50
    resources = tmp_path / "r.json"
    resources.write_text(json.dumps({"pids": {"limit": 20}}))
    oci(rt, runtime_bin, "update", "--resources", str(resources), "d1")
    assert rt.stats("d1")["pids"]["limit"] == 20
    bad = oci(rt, runtime_bin, "update", "--cpu-quota", "10", "d1", check=False)
    assert bad.returncode == 1 and "below the kernel's minimum" in bad.stderr and bad.stderr.count("\n") == 1

    running = oci(rt, runtime_bin, "delete", "d1", check=False)
    assert running.returncode == 1 and "it is running" in running.stderr
    oci(rt, runtime_bin, "kill", "d1", "SIGKILL")
    assert wait_status(rt, runtime_bin, "d1", "stopped")["status"] == "stopped"
    oci(rt, runtime_bin, "delete", "d1")
    gone = oci(rt, runtime_bin, "state", "d1", check=False)
    assert gone.returncode == 1 and "does not exist" in gone.stderr
    oci(rt, runtime_bin, "delete", "--force", "d1")  # already gone: still success


def test_foreground_run_deletes_unless_keep(rt: Any, runtime_bin: str, bundle: Callable[..., Path]) -> None:
    b = bundle(["sh", "-c", "echo out-line; echo err-line >&2; exit 3"])
    proc = oci(rt, runtime_bin, "run", "--bundle", str(b), "f1", check=False)
    assert proc.returncode == 3 and proc.stdout == "out-line\n" and proc.stderr == "err-line\n"
    assert rt.dirs.ids() == []
    proc = oci(rt, runtime_bin, "run", "--keep", "--bundle", str(b), "f2", check=False)
    assert proc.returncode == 3
    assert json.loads(oci(rt, runtime_bin, "state", "f2").stdout)["status"] == "stopped"
    oci(rt, runtime_bin, "delete", "f2")


def test_create_start_exit_status_reaches_the_callers_subreaper(
    rt: Any, runtime_bin: str, bundle: Callable[..., Path], tmp_path: Path
) -> None:
    """conmon and containerd-shim are child subreapers: after 'create' the init must be their
    child, so that they can wait for it and read its exit status (the runtime keeps no monitor)."""
    b = bundle(["sh", "-c", "exit 7"])
    pid_file = tmp_path / "pid"
    shim = f"""
import ctypes, os, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
base = [{runtime_bin!r}, "--root", {rt.dirs.root!r}]
subprocess.run(base + ["create", "--bundle", {str(b)!r}, "--pid-file", {str(pid_file)!r}, "s1"], check=True)
pid = int(open({str(pid_file)!r}).read())
subprocess.run(base + ["start", "s1"], check=True)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""
    proc = subprocess.run([sys.executable, "-c", shim], capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "7"
    assert json.loads(oci(rt, runtime_bin, "state", "s1").stdout)["status"] == "stopped"
    oci(rt, runtime_bin, "delete", "s1")


def test_preserve_fds_and_listen_fds(rt: Any, runtime_bin: str, bundle: Callable[..., Path], tmp_path: Path) -> None:
    out = tmp_path / "fd3.txt"
    b = bundle(["sh", "-c", "echo via-fd3 $LISTEN_FDS $LISTEN_PID >&3"])
    cmd = f"exec 3>{out}; exec {runtime_bin} --root {rt.dirs.root} run --preserve-fds 1 --bundle {b} p1"
    proc = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "via-fd3\n"
    # without --preserve-fds the descriptor does not reach the container
    proc = subprocess.run(
        ["/bin/sh", "-c", cmd.replace("--preserve-fds 1 ", "")], capture_output=True, text=True, timeout=60, env=_env()
    )
    assert proc.returncode != 0 and out.read_text() == ""
    # systemd socket activation: LISTEN_FDS=1 passes fd 3 on with LISTEN_PID=1 (as runc)
    env = _env() | {"LISTEN_FDS": "1"}
    proc = subprocess.run(
        ["/bin/sh", "-c", cmd.replace("--preserve-fds 1 ", "")], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "via-fd3 1 1\n"


def test_exec_in_the_dialect(rt: Any, runtime_bin: str, bundle: Callable[..., Path], tmp_path: Path) -> None:
    b = bundle(["sleep", "60"])
    detached_run(rt, runtime_bin, tmp_path, "--bundle", str(b), "e1")
    process = {
        "args": ["sh", "-c", "echo $FOO; pwd; id -u; exit 5"],
        "env": ["PATH=/bin:/usr/bin", "FOO=bar"],
        "cwd": "/tmp",
        "user": {"uid": 1000, "gid": 1000},
    }
    (tmp_path / "process.json").write_text(json.dumps(process))
    proc = oci(rt, runtime_bin, "exec", "--process", str(tmp_path / "process.json"), "e1", check=False)
    assert proc.returncode == 5 and proc.stdout == "bar\n/tmp\n1000\n", proc.stderr
    # crun's suite passes the command right after the id, options before it
    proc = oci(rt, runtime_bin, "exec", "--cwd", "/etc", "--env", "A=b", "e1", "sh", "-c", "echo $A; pwd")
    assert proc.stdout == "b\n/etc\n"
    proc = oci(rt, runtime_bin, "exec", "--cap", "CAP_SYS_ADMIN", "e1", "grep", "CapEff", "/proc/self/status")
    assert int(proc.stdout.split()[1], 16) & (1 << 21)  # CAP_SYS_ADMIN is bit 21
    # detached: the pid file names the process as the host sees it, and it is in the container
    pid_file = tmp_path / "exec.pid"
    with open(tmp_path / "exec.err", "w") as err:
        oci(
            rt,
            runtime_bin,
            "exec",
            "--detach",
            "--pid-file",
            str(pid_file),
            "e1",
            "sleep",
            "30",
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    pid = int(pid_file.read_text())
    init = json.loads(oci(rt, runtime_bin, "state", "e1").stdout)["pid"]
    assert os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{init}/ns/pid")
    assert pid in rt.processes("e1")
    oci(rt, runtime_bin, "delete", "--force", "e1")


def test_cgroup_manager_disabled(rt: Any, runtime_bin: str, bundle: Callable[..., Path]) -> None:
    b = bundle(["sh", "-c", "echo no-cgroup"])
    proc = subprocess.run(
        [
            runtime_bin,
            "--cgroup-manager",
            "disabled",
            "--root",
            rt.dirs.root,
            "run",
            "--keep",
            "--bundle",
            str(b),
            "n1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert proc.returncode == 0 and proc.stdout == "no-cgroup\n", proc.stderr
    assert rt.dirs.load("n1").cgroup_path == ""
    oci(rt, runtime_bin, "delete", "n1")


def test_cpuset_and_default_devices(rt: Any, runtime_bin: str, bundle: Callable[..., Path]) -> None:
    """crun's suite: cpusets on a v1 host, and a deny-all device list with one allow (runc and crun
    still allow the minimal /dev then: their default allowlist comes after the config's rules)."""
    resources = {
        "cpu": {"cpus": "0"},
        "devices": [
            {"allow": False, "access": "rwm"},
            {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
        ],
    }
    b = bundle(
        [
            "sh",
            "-c",
            "grep Cpus_allowed_list /proc/self/status; head -c 3 /dev/zero | wc -c;"
            "mknod /dev/xmem c 1 1 2>/dev/null;"
            "head -c 1 /dev/xmem >/dev/null 2>&1 && echo mem-read || echo mem-denied",
        ],
        {"linux.resources": resources},
    )
    proc = oci(rt, runtime_bin, "run", "--bundle", str(b), "c1")
    lines = proc.stdout.split("\n")
    assert lines[0].split() == ["Cpus_allowed_list:", "0"], proc.stderr
    assert lines[1].strip() == "3"  # /dev/zero: from the default allowlist
    assert lines[2] == "mem-denied"  # /dev/mem (1:1): in neither list


def test_delete_regex_and_no_exec_when_paused(
    rt: Any, runtime_bin: str, bundle: Callable[..., Path], tmp_path: Path
) -> None:
    b = bundle(["sleep", "60"])
    for cid in ("rx-1", "rx-2", "keep-1"):
        detached_run(rt, runtime_bin, tmp_path, "--bundle", str(b), cid)
    oci(rt, runtime_bin, "pause", "keep-1")
    # the new process would join the frozen cgroup and freeze before it starts: refused at once
    paused = oci(rt, runtime_bin, "exec", "keep-1", "true", check=False)
    assert paused.returncode == 1 and "it is paused" in paused.stderr
    oci(rt, runtime_bin, "delete", "--force", "--regex", "^rx-")
    assert rt.dirs.ids() == ["keep-1"]
    oci(rt, runtime_bin, "delete", "--force", "keep-1")  # a paused container is killed too
    assert rt.dirs.ids() == []
