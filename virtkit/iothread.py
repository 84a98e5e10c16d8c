"""One I/O thread per machine: it waits on eventfds (virtio queue notifications signalled by
KVM through ioeventfd) and runs their handlers, so a guest's notify write never leaves the kernel.

The thread sleeps in ``select`` (no GIL held) until an eventfd fires; :meth:`IoThread.stop` wakes
it through its own eventfd and joins it.
"""

from __future__ import annotations

import os
import selectors
import threading
from collections.abc import Callable


class IoThread:
    def __init__(self, name: str, on_error: Callable[[BaseException], None]) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._sel.register(self._wake, selectors.EVENT_READ, None)
        self._fds: list[int] = []
        #: fds the thread watches but does not own (a TAP): their handler reads them itself
        self._readers: set[int] = set()
        self._on_error = on_error
        self._name = name
        self._thread: threading.Thread | None = None
        #: held while a handler runs; pause() takes it so no device touches guest memory meanwhile
        self._busy = threading.Lock()
        self.events = 0

    def new_eventfd(self, handler: Callable[[], None]) -> int:
        """An eventfd whose every signal runs ``handler`` in the I/O thread (before start())."""
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds.append(fd)
        self._sel.register(fd, selectors.EVENT_READ, handler)
        return fd

    def add_reader(self, fd: int, handler: Callable[[], None]) -> None:
        """Run ``handler`` in the I/O thread whenever ``fd`` is readable (before start()). The
        handler must read what is there (the selector is level-triggered); the caller keeps
        ``fd`` open until after :meth:`stop`, and closes it."""
        self._readers.add(fd)
        self._sel.register(fd, selectors.EVENT_READ, handler)

    def start(self) -> None:
        if (self._fds or self._readers) and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        try:
            while True:
                for key, _ in self._sel.select():
                    if key.data is None:
                        return  # stop() was called
                    if key.fd not in self._readers:
                        try:
                            os.eventfd_read(key.fd)
                        except BlockingIOError:
                            continue
                    self.events += 1
                    with self._busy:
                        key.data()
        except BaseException as e:  # a handler failed: the machine decides what that means
            self._on_error(e)

    def pause(self) -> None:
        """Return once no handler runs, and keep it so until :meth:`resume` (snapshots)."""
        self._busy.acquire()

    def resume(self) -> None:
        self._busy.release()

    def stop(self) -> None:
        """Stop the thread (if running) and close every eventfd. Idempotent."""
        if self._wake < 0:
            return
        if self._thread is not None:
            os.eventfd_write(self._wake, 1)
            self._thread.join(timeout=5)
            self._thread = None
        self._sel.close()
        for fd in [*self._fds, self._wake]:
            os.close(fd)
        self._fds = []
        self._readers = set()
        self._wake = -1
