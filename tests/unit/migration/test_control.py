"""The control socket's line protocol with a hostile peer on either side (no /dev/kvm needed: the
server is given a stand-in machine, which only ``status`` would touch)."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any, cast

import pytest

from virtkit.migration import control
from virtkit.migration.control import ControlError, ControlServer
from virtkit.vm import Machine

DEADLINE = 60.0


@pytest.fixture
def server(tmp_path: Path) -> ControlServer:
    s = ControlServer(str(tmp_path / "ctl"), cast(Machine, object()))
    s.handlers["echo"] = lambda req: {"got": req.get("x")}
    yield s
    s.close()


@pytest.mark.parametrize(
    "line",
    [
        b"[" * 60000 + b"\n",  # RecursionError in json.loads, killed the client thread
        b'{"cmd": "echo", "x": ' + b"[" * 20000 + b"]" * 20000 + b"}\n",
        b'{"cmd": "echo", "x": ' + b'{"a":' * 10000 + b"1" + b"}" * 10000 + b"}\n",
    ],
)
def test_a_deeply_nested_request_gets_an_error_reply(server: ControlServer, line: bytes) -> None:
    reply = server.handle_line(line)
    assert reply["ok"] is False and "nested" in reply["error"]


def test_the_connection_survives_a_hostile_line(server: ControlServer) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(DEADLINE)
        c.connect(server.path)
        f = c.makefile("rb")
        c.sendall(b"[" * 60000 + b"\n")
        assert b'"ok": false' in f.readline()
        c.sendall(b'{"cmd": "echo", "x": 7}\n')
        assert b'"got": 7' in f.readline()


@pytest.mark.parametrize("bad", [b"\xff\xfe{}", b"1e999999", b'{"cmd": NaN}', b"   "])
def test_other_malformed_requests_are_answered(server: ControlServer, bad: bytes) -> None:
    reply = server.handle_line(bad + b"\n")
    assert reply["ok"] is False


def _fake_vmm(path: str, reply: bytes) -> threading.Thread:
    """A 'VMM' that answers any request with ``reply`` (the VMM may be subverted by its guest)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1)

    def serve() -> None:
        with sock:
            sock.settimeout(DEADLINE)
            conn, _ = sock.accept()
            with conn:
                conn.makefile("rb").readline()
                conn.sendall(reply)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize(
    "reply",
    [
        b"[" * 60000 + b"\n",
        b'{"ok": true, "x": ' + b"[" * 20000 + b"]" * 20000 + b"}\n",
        b"\xff\n",
    ],
)
def test_a_hostile_reply_is_a_control_error(tmp_path: Path, reply: bytes) -> None:
    path = str(tmp_path / "ctl")
    t = _fake_vmm(path, reply)
    try:
        with pytest.raises(ControlError, match="malformed reply"):
            control.request(path, "status", timeout=DEADLINE)
    finally:
        t.join(DEADLINE)
        os.unlink(path)


def test_replies_are_plain_json(server: ControlServer) -> None:
    reply: dict[str, Any] = server.handle_line(b'{"cmd": "echo", "x": [1, {"y": "z"}]}\n')
    assert reply == {"ok": True, "got": [1, {"y": "z"}]}
