"""A real virtkitd per test: its own state and socket directories and its own cgroup parent, so
tests never see each other's (or a production service's) VMs. At teardown every VM is deleted,
the service stopped, and the test fails if a VMM process or a cgroup outlived it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from glob import glob
from pathlib import Path
from typing import Any

import pytest

from virtkit.service.client import Client


def vmm_pids(state_dir: str) -> list[int]:
    """VMM processes started for this state directory (their command line names the VM's dir)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        vmm = b"virtkit.service.vmm" in cmd or b"hostile_vmm" in cmd  # the daemon names hostile_vmm too
        if vmm and b"--dir" in cmd and any(a.startswith(state_dir.encode()) for a in cmd):
            try:
                if Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            except OSError:
                continue
            out.append(int(name))
    return out


class Daemon:
    def __init__(self, tmp: Path, extra: list[str], env: dict[str, str] | None = None) -> None:
        self.state_dir = str(tmp / "state")
        self.run_dir = tempfile.mkdtemp(prefix="vkd", dir="/tmp")  # short: sun_path holds 108 bytes
        self.socket = os.path.join(self.run_dir, "api.sock")
        self.cgroup_parent = f"virtkitd-test-{os.getpid()}-{tmp.name}"[:60]
        self.extra = extra
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = Client(self.socket, timeout=60)

    def start(self) -> None:
        if os.path.exists(self.socket):
            os.unlink(self.socket)  # left by a service that was SIGKILLed
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "virtkit.service",
                "--state-dir",
                self.state_dir,
                "--run-dir",
                self.run_dir,
                "--cgroup-parent",
                self.cgroup_parent,
                *self.extra,
            ],
            stdin=subprocess.DEVNULL,
            stderr=open(os.path.join(self.run_dir, "virtkitd.log"), "ab"),  # noqa: SIM115
            env=self.env,
        )
        deadline = time.monotonic() + 20
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"virtkitd did not start: {self.log()}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)
        self.proc = None

    def log(self) -> str:
        try:
            return Path(self.run_dir, "virtkitd.log").read_text()[-3000:]
        except OSError:
            return ""

    def call(self, method: str, url: str, body: Any = None) -> Any:
        return self.client.call(method, url, body)

    def create(self, name: str, kernel: Path, **kw: Any) -> dict[str, Any]:
        return self.call("POST", "/v1/vms", {"name": name, "kernel": str(kernel), **kw})  # type: ignore[no-any-return]

    def vm(self, name: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/vms/{name}")  # type: ignore[no-any-return]

    def wait_state(self, name: str, states: tuple[str, ...], timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            rec = self.vm(name)
            if rec["state"] in states:
                return rec
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} stayed {rec['state']} (wanted {states}): {json.dumps(rec)[:500]}")
            time.sleep(0.05)

    def wait_output(self, name: str, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            out = self.call("GET", f"/v1/vms/{name}/logs")["data"]
            if text in out:
                return str(out)
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} never printed {text!r}: {out[-300:]!r}")
            time.sleep(0.05)


def _cgroup_dirs(parent: str) -> list[str]:
    return glob(f"/sys/fs/cgroup/*/{parent}") + glob(f"/sys/fs/cgroup/{parent}")


@pytest.fixture
def daemon_factory(tmp_path: Path, guests: Path, kvm: None) -> Iterator[Any]:
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces, cgroups, setuid")
    made: list[Daemon] = []

    def make(*extra: str, env: dict[str, str] | None = None) -> Daemon:
        d = Daemon(tmp_path, list(extra), env)
        made.append(d)
        d.start()
        return d

    yield make
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            try:
                for vm in d.call("GET", "/v1/vms"):
                    d.call("DELETE", f"/v1/vms/{vm['name']}?force=true")
            except Exception:  # noqa: BLE001 - clean up by hand below
                pass
        d.stop()
    problems = []
    for d in made:
        left = vmm_pids(d.state_dir)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        if left:
            problems.append(f"VMM processes left running: {left}")
        time.sleep(0.1 if left else 0)
        from virtkit.service.cgroups import VmCgroup, remove_parent

        for vmdir in glob(os.path.join(d.state_dir, "vms", "*")):
            cg = VmCgroup(os.path.basename(vmdir), d.cgroup_parent)
            if cg.exists():
                problems.append(f"cgroup left: {cg.rel}")
                cg.kill()
                cg.remove()
        remove_parent(d.cgroup_parent)
        if _cgroup_dirs(d.cgroup_parent):
            problems.append(f"cgroup parent left: {_cgroup_dirs(d.cgroup_parent)}")
        shutil.rmtree(d.run_dir, ignore_errors=True)
    assert not problems, problems
