from __future__ import annotations

import signal

import pytest

from virtkit.container.signals import parse_signal, signal_name
from virtkit.errors import ContainerError


@pytest.mark.parametrize(
    ("text", "num"),
    [
        ("TERM", signal.SIGTERM),
        ("SIGKILL", signal.SIGKILL),
        ("hup", signal.SIGHUP),
        ("9", 9),
        ("RTMIN+3", signal.SIGRTMIN + 3),
        ("SIGRTMAX-1", signal.SIGRTMAX - 1),
    ],
)
def test_parse(text: str, num: int) -> None:
    assert parse_signal(text) == num


@pytest.mark.parametrize("text", ["NOPE", "SIGNOPE", "0", "99", "RTMIN+99", ""])
def test_unknown(text: str) -> None:
    with pytest.raises(ContainerError):
        parse_signal(text)


def test_names() -> None:
    assert signal_name(15) == "SIGTERM"
