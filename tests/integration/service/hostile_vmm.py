"""A test-only VMM entry point whose guest "took it over": ``python -m hostile_vmm --dir VMDIR``.

It is the real VMM (:func:`virtkit.service.vmm.main`) up to and including confinement, so it can do
exactly what a subverted VMM could: write anything to the fds it holds (exit report, serial log,
its stderr), answer its control socket as it likes, exit when it likes. What it does is chosen by
``hostile=<mode>`` on the VM's command line; without one it behaves.

Modes, each modelling one thing the outside review saw or a variant of it:

* exit report, then exit 1: ``report-array`` (JSON, not an object), ``report-deep`` (200,000 ``[``),
  ``report-huge`` (8 MiB), ``report-binary``, ``report-wrong-types``; ``exit-at-once`` (no report);
  with ``-linger`` appended it writes the report and keeps running its guest (for re-attach tests);
* control replies (the guest keeps running): ``reply-endless`` (bytes, no newline, until the
  client goes), ``reply-slow`` (one byte per second), ``reply-wrong`` (wrong types, a fake
  instance id, huge numbers, a "stop" it does not do), ``reply-never`` (reads, never answers),
  ``reply-close`` (closes at once);
* ``log-garbage``: 2 MiB of binary to the serial log, then behaves.
"""

from __future__ import annotations

import json
import os
import socket
import time

from virtkit.service import vmm as real
from virtkit.service.model import VmmDefinition


def _mode(definition: VmmDefinition) -> str:
    for word in definition.cmdline.split():
        if word.startswith("hostile="):
            return word.split("=", 1)[1]
    return ""


REPORTS: dict[str, bytes] = {
    "report-array": b"[1, 2, 3]",
    "report-deep": b"[" * 200_000,
    "report-huge": b'{"reason": "stopped", "detail": "' + b"x" * (8 << 20) + b'"}',
    "report-binary": bytes(range(256)) * 64,
    "report-wrong-types": json.dumps(
        {"reason": 5, "exit_status": "x", "detail": [], "crash": "yes", "ended": None}
    ).encode(),
}


class HostileVmm(real.Vmm):
    def __init__(self, vmdir: str, definition: VmmDefinition) -> None:
        super().__init__(vmdir, definition)
        self.mode = _mode(definition)

    def run(self, probe: str | None = None) -> int:  # after confine(): the guest's turn
        mode = self.mode
        base = mode.removesuffix("-linger")
        if base == "exit-at-once":
            os._exit(0)
        if base in REPORTS:
            os.write(self.report_fd, REPORTS[base])
            if not mode.endswith("-linger"):
                os._exit(1)
        if mode == "log-garbage":
            chunk = bytes(range(256)) * 4096
            for _ in range(2):
                os.write(self.serial.log_fd, chunk)
        return super().run(probe)

    def _serve_client(self, conn: socket.socket) -> None:
        mode = self.mode
        if not mode.startswith("reply-"):
            return super()._serve_client(conn)
        data = conn.recv(65536)
        if mode == "reply-close":
            return None
        if mode == "reply-never":
            time.sleep(3600)
        elif mode == "reply-endless":
            chunk = b"x" * 65536
            while True:  # until the service hangs up (EPIPE ends it)
                conn.sendall(chunk)
        elif mode == "reply-slow":
            while True:
                conn.sendall(b"{")
                time.sleep(1)
        elif mode == "reply-wrong":
            try:
                op = json.loads(data.split(b"\n", 1)[0]).get("op")
            except ValueError:
                op = None
            replies: dict[str, object] = {
                "status": {
                    "ok": True,
                    "name": "x",
                    "instance": "not-the-one",
                    "state": "running",
                    "vcpus": 1,
                    "memory": 1,
                    "started": 1.0,
                },
                "stats": {"ok": True, "stats": {"total_exits": 10**400, "exits": {"io": -5, 'x"}\n': 1}}},
                "console-write": {"ok": "yes"},
                "stop": {"ok": True},  # and does not stop
            }
            conn.sendall(json.dumps(replies.get(str(op), [1, 2])).encode() + b"\n")
        return None


if __name__ == "__main__":
    import sys

    status = real.main(vmm_class=HostileVmm)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
