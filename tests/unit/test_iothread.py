"""The machine's I/O thread: eventfds it owns, and fds it only watches (a TAP)."""

from __future__ import annotations

import os
import threading

from virtkit.iothread import IoThread

DEADLINE = 30.0


def test_a_watched_fd_runs_its_handler_and_stays_open() -> None:
    errors: list[BaseException] = []
    thread = IoThread("test-io", errors.append)
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    got: list[bytes] = []
    seen = threading.Event()

    def on_readable() -> None:
        got.append(os.read(r, 100))  # the handler reads what is there (level-triggered)
        seen.set()

    try:
        thread.add_reader(r, on_readable)
        thread.start()  # starts with only a watched fd, no eventfd
        os.write(w, b"frame")
        assert seen.wait(DEADLINE)
        assert got == [b"frame"] and errors == []
    finally:
        thread.stop()
    os.fstat(r)  # stop() closed its own eventfds, not the fd it was only watching
    os.close(r)
    os.close(w)
