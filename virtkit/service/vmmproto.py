"""What virtkitd reads from a VMM, and the one way it reads it.

A VMM runs a guest, and a guest may have taken it over: everything a VMM process writes is hostile
input to the service (docs/SECURITY.md, "virtkitd versus its VMMs"). That is three things:

* the **exit report** (``exit.json`` in the VM's directory, written through an fd the VMM opened
  before confinement): :func:`read_exit_report` opens it without following links or blocking,
  insists on a regular file, reads at most :data:`MAX_REPORT` bytes and parses an
  :class:`ExitReport`; anything else is an :class:`~virtkit.records.UntrustedInput` the caller
  records as "the VMM wrote an unreadable exit report: <reason>" and treats as a crash;
* **control replies** on the VMM's socket: :func:`request` has one total deadline for connect,
  send and the whole reply (not per ``recv``), stops reading at :data:`MAX_REPLY` bytes, and parses
  the line into the record the operation answers with (:class:`StatusReply`, :class:`StatsReply`,
  :class:`ConsoleReadReply`, :class:`OkReply`); any failure is one :class:`VmmUnresponsive` line;
* **files it fills**: the serial log and its stderr log are read with :func:`read_bounded`
  (``O_NOFOLLOW | O_NONBLOCK``, a regular file, a bounded read from an offset).

The launcher's ``{"pid": N}`` line is parsed into a :class:`LaunchReply` by the same rules.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import Annotated, Final, Literal, TypeVar

from virtkit.errors import VirtkitError
from virtkit.records import DESCRIPTION, Bounds, UntrustedInput, load_object, parse

#: an exit report is a few hundred bytes (the detail is cut at 4000 characters)
MAX_REPORT: Final = 16 << 10
#: a control reply: a stats reply is a few KiB, a console read 64 KiB of base64
MAX_REPLY: Final = 256 << 10
#: the whole of one control request, connect to the end of the reply
REQUEST_DEADLINE: Final = 5.0
#: the launcher's line
MAX_LAUNCH_LINE: Final = 256

_NAME = r"[A-Za-z0-9_.:-]{1,64}"
#: a boot protocol's description (loader.EntryState.protocol): printable, no control characters
_PROTOCOL = r"^[A-Za-z0-9 _.,:()+-]*$"
_BIG = float(2**63)

R = TypeVar("R")


class VmmUnresponsive(VirtkitError):
    """A VMM did not answer a control request well within its deadline (one line, no traceback)."""


# --- records ---------------------------------------------------------------------------------------


#: the :class:`virtkit.stop.StopReason` values an exit report may carry (the service's
#: ``model.ExitReason`` adds its own conclusions to these)
StopReasonName = Literal[
    "debug-exit",
    "reset",
    "power-off",
    "halted",
    "triple-fault",
    "internal-error",
    "fail-entry",
    "unknown-access",
    "timeout",
    "stopped",
    "output-closed",
    "error",
]


def _same_as_stop_reasons() -> None:
    """The list above is :class:`virtkit.stop.StopReason`'s values, written out because a type
    checker needs a literal list: checked here at import, so the two cannot drift apart (a new
    stop reason the service does not know fails every service test at once)."""
    from typing import get_args

    from virtkit.stop import StopReason

    here, there = set(get_args(StopReasonName)), {r.value for r in StopReason}
    if here != there:
        raise ImportError(
            f"vmmproto.StopReasonName and virtkit.stop.StopReason differ: "
            f"{sorted(there - here)} missing here, {sorted(here - there)} unknown there"
        )


_same_as_stop_reasons()


@dataclass(frozen=True, slots=True)
class ExitReport:
    reason: StopReasonName
    exit_status: Annotated[int, Bounds(lo=0, hi=255)]
    detail: Annotated[str, Bounds(max_len=4000)] = ""
    crash: bool = False
    ended: Annotated[float, Bounds(lo=0, hi=_BIG)] = 0.0


@dataclass(frozen=True, slots=True)
class LaunchReply:
    pid: Annotated[int, Bounds(lo=2, hi=2**22)]  # PID_MAX_LIMIT


@dataclass(frozen=True, slots=True)
class OkReply:
    ok: bool
    error: Annotated[str, Bounds(max_len=1000)] | None = None


@dataclass(frozen=True, slots=True)
class StatusReply:
    ok: Literal[True]
    name: Annotated[str, Bounds(max_len=64)] | None
    instance: Annotated[str, Bounds(max_len=64)] | None
    state: Literal["running", "paused", "stopping"] = "running"
    vcpus: Annotated[int, Bounds(lo=0, hi=1024)] = 0
    memory: Annotated[int, Bounds(lo=0, hi=2**50)] = 0
    started: Annotated[float, Bounds(lo=0, hi=_BIG)] = 0.0


#: port and MMIO addresses a stats reply may list per kind
_COUNTS: Final = 4096


@dataclass(frozen=True, slots=True)
class VmmStats:
    """What ``op: stats`` reports (:meth:`virtkit.service.vmm.Vmm.stats`)."""

    wall_s: Annotated[float, Bounds(lo=0, hi=_BIG)] = 0.0
    guest_s: Annotated[float, Bounds(lo=0, hi=_BIG)] = 0.0
    vmm_s: Annotated[float, Bounds(lo=0, hi=_BIG)] = 0.0
    exits: Annotated[dict[str, int], Bounds(max_len=64)] | None = None
    total_exits: Annotated[int, Bounds(lo=0, hi=2**63)] = 0
    exits_per_second: Annotated[float, Bounds(lo=0, hi=_BIG)] = 0.0
    pio: Annotated[dict[str, int], Bounds(max_len=_COUNTS)] | None = None
    mmio: Annotated[dict[str, int], Bounds(max_len=_COUNTS)] | None = None
    unknown_pio: Annotated[dict[str, int], Bounds(max_len=_COUNTS)] | None = None
    unknown_mmio: Annotated[dict[str, int], Bounds(max_len=_COUNTS)] | None = None
    kicks: Annotated[int, Bounds(lo=0, hi=2**63)] = 0
    tsc_khz: Annotated[int, Bounds(lo=0, hi=2**40)] = 0
    first_output_s: Annotated[float, Bounds(lo=0, hi=_BIG)] | None = None
    device_exits: Annotated[dict[str, int], Bounds(max_len=64)] | None = None
    serial_bytes: Annotated[int, Bounds(lo=0, hi=2**63)] = 0
    uptime_s: Annotated[float, Bounds(lo=0, hi=_BIG)] = 0.0
    boot_protocol: Annotated[str, Bounds(max_len=120, pattern=_PROTOCOL)] = field(
        default="", metadata={DESCRIPTION: 'how the kernel was booted, e.g. "linux (bzImage, boot protocol 2.15)"'}
    )
    completed: Annotated[dict[str, int], Bounds(max_len=64)] | None = field(
        default=None,
        metadata={DESCRIPTION: "CPL0 instructions KVM's emulator rejected and the VMM completed, by kind (PVM hosts)"},
    )

    def __post_init__(self) -> None:
        import re

        # names become metric labels and table rows: short, plain, counts never negative
        for name in ("exits", "device_exits", "pio", "mmio", "unknown_pio", "unknown_mmio", "completed"):
            for key, n in (getattr(self, name) or {}).items():
                if not re.fullmatch(_NAME, key):
                    raise UntrustedInput(f"stats.{name} has a key {key[:40]!r} that is not a plain name")
                if not 0 <= n < 2**63:
                    raise UntrustedInput(f"stats.{name}.{key} is {n}, out of range")


@dataclass(frozen=True, slots=True)
class StatsReply:
    ok: Literal[True]
    stats: VmmStats


@dataclass(frozen=True, slots=True)
class ConsoleReadReply:
    ok: Literal[True]
    offset: Annotated[int, Bounds(lo=0, hi=2**62)]
    next: Annotated[int, Bounds(lo=0, hi=2**62)]
    data: Annotated[str, Bounds(max_len=(MAX_REPLY // 4) * 3)]


def parse_exit_report(data: bytes, what: str) -> ExitReport:
    return parse(ExitReport, load_object(data, what=what, max_bytes=MAX_REPORT), what=what)


def parse_launch_line(data: bytes, what: str) -> LaunchReply:
    line = data.split(b"\n", 1)[0]
    return parse(LaunchReply, load_object(line, what=what, max_bytes=MAX_LAUNCH_LINE), what=what)


# --- files -----------------------------------------------------------------------------------------


def read_bounded(path: str, offset: int, limit: int, *, from_end: bool = False) -> bytes:
    """Up to ``limit`` bytes of the regular file ``path`` from ``offset`` (or the last ``limit``
    bytes with ``from_end``). Never follows a symlink, never blocks on a FIFO or device: those
    raise :class:`UntrustedInput`. A missing file raises FileNotFoundError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        if e.errno == 40:  # ELOOP: a symlink
            raise UntrustedInput(f"{os.path.basename(path)} is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedInput(f"{os.path.basename(path)} is not a regular file")
        if from_end:
            offset = max(0, st.st_size - limit)
        out = bytearray()
        while len(out) < limit:
            chunk = os.pread(fd, limit - len(out), offset + len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


def read_exit_report(path: str, what: str) -> ExitReport | None:
    """The exit report at ``path``; None if there is none (missing or empty: the VMM never wrote
    one). Raises :class:`UntrustedInput` for anything that is not a valid report."""
    try:
        data = read_bounded(path, 0, MAX_REPORT + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UntrustedInput(f"{what} cannot be read: {e.strerror}") from None
    if not data.strip():
        return None
    return parse_exit_report(data, what)


# --- control requests ------------------------------------------------------------------------------


def request(
    path: str,
    req: dict[str, object],
    reply: type[R],
    *,
    deadline: float = REQUEST_DEADLINE,
    max_reply: int = MAX_REPLY,
    what: str = "the VMM",
) -> tuple[R, int]:
    """One request on a VMM's control socket: (the reply as a ``reply`` record, the VMM's pid from
    SO_PEERCRED). Everything, connect included, within ``deadline`` seconds; at most
    ``max_reply`` bytes are read. Raises :class:`VmmUnresponsive` (one line) on any failure: no
    answer, a slow or endless one, one that is not a JSON object of the expected shape, or an
    ``ok: false`` where a record with ``ok: true`` was expected."""
    import json

    end = time.monotonic() + deadline
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            s.settimeout(deadline)
            s.connect(path)
            pid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            _send_all(s, json.dumps(req).encode() + b"\n", end)
            line = _read_line(s, end, max_reply, what)
        except TimeoutError:
            raise VmmUnresponsive(f"{what} did not answer within {deadline:g} s") from None
        except OSError as e:
            raise VmmUnresponsive(f"{what} cannot be reached: {e.strerror or e}") from None
    finally:
        s.close()
    try:
        value = load_object(line, what=f"{what}'s reply", max_bytes=max_reply)
        if value.get("ok") is False and reply is not OkReply:
            err = value.get("error")
            raise VmmUnresponsive(f"{what} refused: {str(err)[:200] if isinstance(err, str) else 'no reason'}")
        return parse(reply, value, what=f"{what}'s reply"), pid
    except UntrustedInput as e:
        raise VmmUnresponsive(str(e)) from None


def _remaining(end: float) -> float:
    left = end - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _send_all(s: socket.socket, data: bytes, end: float) -> None:
    view = memoryview(data)
    while view:
        s.settimeout(_remaining(end))
        n = s.send(view)
        view = view[n:]


def _read_line(s: socket.socket, end: float, cap: int, what: str) -> bytes:
    buf = bytearray()
    while True:
        s.settimeout(_remaining(end))
        chunk = s.recv(min(65536, cap + 1 - len(buf)))
        if not chunk:
            raise VmmUnresponsive(f"{what} closed the control connection without a full reply")
        nl = chunk.find(b"\n")
        if nl >= 0:
            buf += chunk[:nl]
            return bytes(buf)
        buf += chunk
        if len(buf) > cap:
            raise VmmUnresponsive(f"{what}'s reply is longer than {cap} bytes")
