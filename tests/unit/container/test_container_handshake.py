"""The runtime's side of the create handshake, with a scripted channel (no processes)."""

from __future__ import annotations

from typing import Any

import pytest

from virtkit.container.config import parse_config
from virtkit.container.runtime import Runtime
from virtkit.container.spec import default_spec
from virtkit.container.state import Record
from virtkit.errors import ContainerError


class ScriptedChannel:
    def __init__(self, messages: list[dict[str, Any] | None]) -> None:
        self.messages = list(messages)
        self.sent: list[dict[str, Any]] = []

    def recv(self, timeout: float | None = None) -> dict[str, Any] | None:
        return self.messages.pop(0)

    def send(self, **msg: Any) -> None:
        self.sent.append(msg)


@pytest.mark.parametrize("order", [["pid", "ready"], ["ready", "pid"]])
def test_ready_before_pid_still_waits_for_the_pid(tmp_path: Any, order: list[str]) -> None:
    """The init may report ready before setup reports its pid: create must have both."""
    msgs = {"pid": {"pid": 4242}, "ready": {"ready": True}}
    chan = ScriptedChannel([msgs[o] for o in order])
    rec = Record(id="c", bundle="/b", cgroup_path="/virtkit/c")
    Runtime(str(tmp_path))._handshake(rec, chan, parse_config(default_spec()), None)  # type: ignore[arg-type]
    assert rec.pid == 4242
    assert chan.messages == []


def test_hooks_wait_for_the_pid(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    monkeypatch.setattr(Runtime, "_run_hooks", lambda self, hooks, rec: seen.append(rec.pid))
    chan = ScriptedChannel([{"hooks": True}, {"pid": 7}, {"ready": True}])
    rec = Record(id="c", bundle="/b", cgroup_path="/virtkit/c")
    Runtime(str(tmp_path))._handshake(rec, chan, parse_config(default_spec()), None)  # type: ignore[arg-type]
    assert seen == [7] and chan.sent == [{"go": True}]


@pytest.mark.parametrize(
    ("messages", "text"),
    [
        ([{"error": "mount proc on /proc: Permission denied"}], "cannot create container c: mount proc"),
        ([{"pid": 1}, None], "its init exited during setup"),
    ],
)
def test_errors_end_the_handshake(tmp_path: Any, messages: list[Any], text: str) -> None:
    with pytest.raises(ContainerError, match=text):
        Runtime(str(tmp_path))._handshake(
            Record(id="c", bundle="/b", cgroup_path="/x"), ScriptedChannel(messages), parse_config(default_spec()), None
        )  # type: ignore[arg-type]
