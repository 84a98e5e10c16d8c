"""Where a guest's serial output goes: captured for the API, and optionally copied to a stream."""

from __future__ import annotations

import contextlib
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import BinaryIO

#: bytes of output kept for ``RunResult.serial_output``; beyond it the oldest half is dropped,
#: so a guest printing forever cannot exhaust the host's memory
CAPTURE_LIMIT = 16 << 20


class Console:
    def __init__(self, tee: BinaryIO | None = None, *, capture: bool = True) -> None:
        self._tee = tee
        #: called once, from the writing thread, when the tee's reader has gone away (EPIPE):
        #: `virtkit run guest | head -2` then ends the VM quietly, as other tools end on SIGPIPE
        self.on_closed: Callable[[], None] | None = None
        self._capture = capture
        self._buf = bytearray()
        self._lock = threading.Lock()
        self.dropped = 0
        #: perf_counter_ns() of the first byte the guest sent (for time-to-first-output figures)
        self.first_byte_ns: int | None = None

    def write(self, data: bytes) -> None:
        with self._lock:
            if self.first_byte_ns is None:
                self.first_byte_ns = time.perf_counter_ns()
            if self._capture:
                self._buf += data
                if len(self._buf) > CAPTURE_LIMIT:
                    cut = len(self._buf) - CAPTURE_LIMIT // 2
                    del self._buf[:cut]
                    self.dropped += cut
            if self._tee is not None:
                # Flushed at once, not at the end of the line: what the guest has sent must be out
                # of this process before anything else happens, or a snapshot taken mid-line and a
                # VMM killed before the newline would lose that line for good (the restored guest
                # does not send it again). One write per UART byte is cheap next to its VM exit.
                try:
                    self._tee.write(data)
                    self._tee.flush()
                except BrokenPipeError:
                    self._tee = None  # nobody reads any more: stop copying, keep capturing
                    if self.on_closed is not None:
                        self.on_closed()

    def flush(self) -> None:
        with self._lock:
            if self._tee is not None:
                with contextlib.suppress(BrokenPipeError, ValueError):
                    self._tee.flush()

    @property
    def output(self) -> bytes:
        with self._lock:
            return bytes(self._buf)
