"""podman drives virtkit: ``podman --runtime virtkit-runtime`` runs, execs, logs, stops, removes,
lists and inspects containers, with a bind mount, a named volume, a memory limit and a terminal.

podman (Debian's 4.3, with conmon) is the client; virtkit is only its OCI runtime. Everything
podman keeps is private to the test: its storage (``--root``, vfs driver), run state
(``--runroot``, ``--tmpdir``), network configs and events log (a containers.conf of its own). The
image is made here, from busybox-static (``podman import`` of a rootfs tarball): no registry.

This host's root lacks CAP_SYS_RESOURCE (its hard nofile limit is 20000), so the containers.conf
sets podman's default ulimits below it, as docs/PLATFORM.md says.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

PODMAN = shutil.which("podman")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: podman's rootful mode"),
    pytest.mark.skipif(PODMAN is None, reason="podman is not installed ('make deps' installs Debian's podman)"),
]

_CGROUP_ROOT = "/sys/fs/cgroup"


def _libpod_cgroups() -> set[str]:
    out: set[str] = set()
    for top, dirs, _ in os.walk(_CGROUP_ROOT):
        for d in dirs:
            if d.startswith("libpod"):
                out.add(os.path.join(top, d))
    return out


class Podman:
    """podman with private state, using ``runtime`` as its OCI runtime."""

    def __init__(self, base: Path, runtime: str) -> None:
        self.base = base
        conf = base / "containers.conf"
        (base / "networks").mkdir()
        conf.write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n'
            "[network]\n"
            f'network_config_dir = "{base / "networks"}"\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{base / "events.log"}"\n'
        )
        self.env = {k: v for k, v in os.environ.items() if k != "VIRTKIT_UNSEALED"}
        self.env["CONTAINERS_CONF"] = str(conf)
        self.cmd = [
            str(PODMAN),
            "--root",
            str(base / "storage"),
            "--runroot",
            str(base / "runroot"),
            "--tmpdir",
            str(base / "tmp"),
            "--storage-driver",
            "vfs",
            "--runtime",
            runtime,
        ]

    def __call__(
        self, *argv: str, check: bool = True, timeout: float = 120, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        proc = subprocess.run([*self.cmd, *argv], text=True, timeout=timeout, env=self.env, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(argv)} -> {proc.returncode}: {proc.stderr}")
        return proc

    def inspect(self, name: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(self("inspect", name).stdout)
        return data[0]


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    from virtkit.container.image import BUSYBOX_BINARY, ensure_busybox

    if not os.path.exists(BUSYBOX_BINARY):
        pytest.skip(f"{BUSYBOX_BINARY} is missing: install busybox-static ('make deps' does)")
    base = tmp_path_factory.mktemp("podman")
    runtime = Path(sys.executable).parent / "virtkit-runtime"
    if not runtime.exists():  # a checkout used without pip install: the same entry point
        runtime = base / "virtkit-runtime"
        runtime.write_text(f"#!{sys.executable}\nfrom virtkit.cli import runtime\nruntime()\n")
        runtime.chmod(0o755)
    cgroups_before = _libpod_cgroups()
    pm = Podman(base, str(runtime))
    rootfs = Path(ensure_busybox(str(base / "images"))) / "rootfs"
    with tarfile.open(base / "busybox.tar", "w") as tar:
        tar.add(rootfs, arcname=".")
    pm("import", str(base / "busybox.tar"), "localhost/vk-busybox:latest")
    try:
        yield pm
    finally:
        with contextlib.suppress(Exception):
            pm("rm", "--all", "--force", "--time", "0", check=False)
        with contextlib.suppress(Exception):
            pm("volume", "rm", "--all", "--force", check=False)
        with contextlib.suppress(Exception):
            pm("rmi", "--all", "--force", check=False)
        # podman leaves the cgroup it made for conmon (libpod_parent/conmon); remove what appeared.
        # A stray directory on /sys/fs/cgroup's tmpfs (not a mounted hierarchy) looks like one to
        # podman, which then writes a 'tasks' file there: that litter is podman's, remove it too
        for d in sorted(_libpod_cgroups() - cgroups_before, key=lambda p: -p.count("/")):
            top = os.path.join(_CGROUP_ROOT, os.path.relpath(d, _CGROUP_ROOT).split("/")[0])
            for sub, _, files in sorted(os.walk(d), key=lambda t: -t[0].count("/")):
                if not os.path.ismount(top):
                    for f in files:
                        with contextlib.suppress(OSError):
                            os.unlink(os.path.join(sub, f))
                with contextlib.suppress(OSError):
                    os.rmdir(sub)
        subprocess.run(["umount", "-R", str(base)], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)
    leaked = _libpod_cgroups() - cgroups_before
    assert not leaked, f"cgroups left behind: {sorted(leaked)}"


@pytest.fixture
def name(request: pytest.FixtureRequest, podman: Podman) -> Iterator[str]:
    n = "vk-" + request.node.name.replace("_", "-")[:40]
    yield n
    podman("rm", "--force", "--time", "0", n, check=False)


def _wait(predicate: Callable[[], bool], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


IMAGE = "localhost/vk-busybox:latest"


def test_run_exit_status_and_output(podman: Podman, name: str) -> None:
    proc = podman("run", "--name", name, "--net", "none", IMAGE, "sh", "-c", "echo out-line; exit 3", check=False)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "out-line\n"
    state = podman.inspect(name)["State"]
    assert state["Status"] == "exited" and state["ExitCode"] == 3
    podman("rm", name)
    assert podman("ps", "-a", "--format", "{{.Names}}").stdout.split() == []


def test_run_rm_removes_the_container(podman: Podman, name: str) -> None:
    proc = podman("run", "--rm", "--name", name, "--net", "none", IMAGE, "true", check=False)
    assert proc.returncode == 0, proc.stderr
    assert name not in podman("ps", "-a", "--format", "{{.Names}}").stdout.split()


def test_detached_exec_logs_stop(podman: Podman, name: str) -> None:
    script = "echo started; trap 'echo got-term; exit 0' TERM; while true; do sleep 0.1; done"
    podman("run", "-d", "--name", name, "--net", "none", IMAGE, "sh", "-c", script)
    assert _wait(lambda: "started" in podman("logs", name).stdout)
    ps = podman("ps", "--format", "json").stdout
    entry = next(c for c in json.loads(ps) if name in c["Names"])
    assert entry["State"] == "running"
    info = podman.inspect(name)
    assert info["State"]["Status"] == "running" and info["State"]["Pid"] > 0
    assert info["OCIRuntime"].endswith("virtkit-runtime")
    # exec: exit status, stdin, environment, working directory, user
    assert podman("exec", name, "sh", "-c", "exit 5", check=False).returncode == 5
    assert podman("exec", "-i", name, "cat", input="via-stdin").stdout == "via-stdin"
    out = podman("exec", "-e", "K=v", "-w", "/tmp", "-u", "1000", name, "sh", "-c", "echo $K; pwd; id -u").stdout
    assert out == "v\n/tmp\n1000\n"
    top = podman("top", name, "pid", "args").stdout
    assert "while true" in top
    podman("stop", "--time", "10", name)
    state = podman.inspect(name)["State"]
    assert state["Status"] == "exited" and state["ExitCode"] == 0
    assert podman("logs", name).stdout == "started\ngot-term\n"
    podman("rm", name)


def test_bind_mount_and_named_volume(podman: Podman, name: str, tmp_path: Path) -> None:
    host = tmp_path / "data"
    host.mkdir()
    (host / "in.txt").write_text("from-host\n")
    podman("volume", "create", "vkvol")
    try:
        script = "cat /data/in.txt; echo from-container > /data/out.txt; echo kept > /vol/v.txt"
        podman("run", "--rm", "--net", "none", "-v", f"{host}:/data", "-v", "vkvol:/vol", IMAGE, "sh", "-c", script)
        assert (host / "out.txt").read_text() == "from-container\n"
        out = podman(
            "run",
            "--rm",
            "--net",
            "none",
            "-v",
            "vkvol:/vol:ro",
            IMAGE,
            "sh",
            "-c",
            "cat /vol/v.txt; touch /vol/x 2>/dev/null || echo read-only",
        )
        assert out.stdout == "kept\nread-only\n"
        ro = podman("run", "--rm", "--net", "none", "-v", f"{host}:/data:ro", IMAGE, "touch", "/data/new", check=False)
        assert ro.returncode != 0 and not (host / "new").exists()
    finally:
        podman("volume", "rm", "--force", "vkvol", check=False)


def test_memory_limit(podman: Podman, name: str) -> None:
    script = (
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max;"
        "dd if=/dev/zero of=/dev/shm/fill bs=1M count=96 2>/dev/null; echo dd=$?"
    )
    proc = podman(
        "run", "--name", name, "--net", "none", "--memory", "32m", "--memory-swap", "32m", IMAGE, "sh", "-c", script
    )
    lines = proc.stdout.split()
    assert lines[0] == str(32 << 20)
    assert lines[1] == "dd=137", proc.stdout  # the OOM killer stopped the writer at the limit
    assert podman.inspect(name)["HostConfig"]["Memory"] == 32 << 20


def test_terminal(podman: Podman, name: str) -> None:
    """-it: the container's process gets a terminal (conmon passes it a console socket)."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child becomes podman on a fresh terminal
        os.execvpe(
            podman.cmd[0],
            [*podman.cmd, "run", "--rm", "-it", "--net", "none", IMAGE, "sh", "-c", "tty; echo tty-ok"],
            podman.env,
        )
    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "/dev/pts/0" in text and "tty-ok" in text
