"""process.terminal: a pseudo-terminal made in the container's devpts, handed to a --console-socket
(as containerd expects) or proxied by a runtime in the foreground (oci run, exec -t)."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from virtkit.errors import ConfigError

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, cgroups")]

SCRIPT = "tty; test -t 0 && echo is-a-tty; stty size; echo done"


def _with_terminal(raw: dict[str, Any]) -> None:
    raw["process"]["terminal"] = True
    raw["process"]["consoleSize"] = {"height": 30, "width": 100}


def test_oci_run_in_the_foreground_proxies_the_terminal(rt: Any, bundle: Any) -> None:
    b = bundle(["sh", "-c", SCRIPT], edit=_with_terminal)
    env = {k: v for k, v in os.environ.items() if k != "VIRTKIT_UNSEALED"}
    proc = subprocess.run(
        [sys.executable, "-m", "virtkit", "--root", rt.dirs.root, "oci", "run", "tty1", "--bundle", str(b), "--rm"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    # a terminal turns \n into \r\n on output
    assert proc.stdout.decode().split("\r\n")[:4] == ["/dev/pts/0", "is-a-tty", "30 100", "done"]


def test_console_socket_receives_the_master(rt: Any, bundle: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "console.sock")
    got: list[int] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)

        def accept() -> None:
            conn, _ = server.accept()
            with conn:
                _, fds, _, _ = socket.recv_fds(conn, 1024, 1)
                got.extend(fds)

        t = threading.Thread(target=accept)
        t.start()
        rt.create("tty2", str(bundle(["sh", "-c", SCRIPT], edit=_with_terminal)), console_socket=path)
        t.join(timeout=30)
    assert len(got) == 1
    master = got[0]
    try:
        rt.start("tty2")
        out = b""
        while select.select([master], [], [], 30)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the container's side closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    assert out.decode().split("\r\n")[:4] == ["/dev/pts/0", "is-a-tty", "30 100", "done"]
    rt.wait("tty2", timeout=30)
    rt.delete("tty2")


def test_terminal_needs_a_socket_or_the_foreground(rt: Any, bundle: Any) -> None:
    with pytest.raises(ConfigError, match="--console-socket"):
        rt.create("tty3", str(bundle(["true"], edit=_with_terminal)))
    assert rt.containers() == []


def test_exec_with_a_terminal(rt: Any, bundle: Any, capfd: pytest.CaptureFixture[str]) -> None:
    rt.create("tty4", str(bundle(["sleep", "30"])))
    rt.start("tty4")
    capfd.readouterr()
    assert rt.exec("tty4", rt.exec_process("tty4", ["sh", "-c", "tty; test -t 1 && echo yes"], tty=True)) == 0
    out = capfd.readouterr().out.split("\r\n")
    assert out[0].startswith("/dev/pts/") and out[1] == "yes"
    rt.delete("tty4", force=True)
