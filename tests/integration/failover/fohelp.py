"""Helpers for the failover tests: reading the counter guest's output, driving virtkit processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

COUNTER = "counter.elf"
VIRTKIT = [sys.executable, "-m", "virtkit"]
# "\r*": a guest resumed from a checkpoint taken between its "\r" and "\n" sends the "\r" again,
# so a line cut by a kill at that point reads "count N\r\r\n" in the log (nothing is lost)
_COUNT = re.compile(rb"count (\d+)\r*\n")
_BANNER = re.compile(rb"^counter: dirtying [^\n]*\n")
_CLONE = re.compile(rb"counter: clone \d+\r\n")  # a clone telling its number (CMOS 0x50)


def counts(output: bytes) -> list[int]:
    """The counter values in ``output`` (complete lines only)."""
    return [int(m.group(1)) for m in _COUNT.finditer(output)]


def assert_seamless(before: bytes, after: bytes, *, first: int | None = None) -> None:
    """``before`` then ``after`` must read as one uninterrupted counter: every line once, in order,
    even if the cut fell in the middle of a line."""
    joined = before + after
    values = counts(joined)
    assert values, joined[-200:]
    start = values[0] if first is None else first
    assert values == list(range(start, start + len(values))), (
        f"gap or repeat around the cut: ...{before[-40:]!r} | {after[:40]!r}..."
    )
    # and nothing but counter lines (no half line repeated or lost at the cut)
    complete = joined[: joined.rfind(b"\n") + 1]  # the last line may still be being printed
    rest = _COUNT.sub(b"", _CLONE.sub(b"", _BANNER.sub(b"", complete)))
    assert rest == b"", rest[:200]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def file_counts(path: Path) -> list[int]:
    try:
        return counts(path.read_bytes())
    except FileNotFoundError:
        return []


def virtkit(*args: str, timeout: float = 30, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VIRTKIT, *args], capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload,no-any-return]


def spawn(*args: str, netns: str | None = None, **kw: object) -> subprocess.Popen[bytes]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.Popen([*prefix, *VIRTKIT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]


def one_line_error(p: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("virtkit: error:"), p.stderr
    assert fragment in lines[0], lines[0]


def stop_process(p: subprocess.Popen[bytes], timeout: float = 10) -> tuple[bytes, bytes]:
    if p.poll() is None:
        p.terminate()
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        return p.communicate()


def env_without_debug() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "VIRTKIT_DEBUG"}


def make_key(path: Path) -> Path:
    """A migration key at ``path`` (mode 0600), as `virtkit migrate-keygen` writes it."""
    from virtkit.migration.keys import generate

    if not path.exists():
        generate(str(path))
    return path


def tcp_established(port: int) -> bool:
    """A TCP connection to local ``port`` is established (in this network namespace)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # 01: ESTABLISHED
                return True
    return False


class FileWatch:
    """inotify on one file: every open, read, write or attribute change of it from now on, by any
    process (the evidence that a receiver never touched a path an attacker named)."""

    IN_ACCESS, IN_MODIFY, IN_ATTRIB, IN_OPEN = 0x1, 0x2, 0x4, 0x20

    def __init__(self, path: Path) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        mask = self.IN_ACCESS | self.IN_MODIFY | self.IN_ATTRIB | self.IN_OPEN
        assert self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask) >= 0

    def events(self) -> int:
        """How many events arrived since the watch began (and close it)."""
        total = 0
        try:
            while True:
                total += len(os.read(self.fd, 65536)) // 16  # struct inotify_event, no name for a file
        except BlockingIOError:
            pass
        finally:
            os.close(self.fd)
        return total
