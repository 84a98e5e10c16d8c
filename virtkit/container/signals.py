"""Signal names as the OCI runtime CLI takes them: ``TERM``, ``SIGTERM``, ``15``, ``RTMIN+3``."""

from __future__ import annotations

import signal

from virtkit.errors import ContainerError


def parse_signal(text: str) -> int:
    raw = text.strip()
    if raw.isdigit():
        num = int(raw)
        if 0 < num < signal.NSIG:
            return num
        raise ContainerError(f"signal number {num} does not exist (1..{signal.NSIG - 1})")
    name = raw.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    for base, value in (("SIGRTMIN", signal.SIGRTMIN), ("SIGRTMAX", signal.SIGRTMAX)):
        if name.startswith(base) and name != base:
            offset = name[len(base) :]
            if offset[:1] in "+-" and offset[1:].isdigit():
                num = value + int(offset)
                if signal.SIGRTMIN <= num <= signal.SIGRTMAX:
                    return num
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ContainerError(f"unknown signal {text!r}: use a name like TERM, KILL, HUP or a number") from None


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        if signal.SIGRTMIN < num <= signal.SIGRTMAX:
            return f"SIGRTMIN+{num - signal.SIGRTMIN}"
        return str(num)
