"""The control socket of a running VMM: JSON lines over a Unix stream socket.

``virtkit run --control PATH`` listens on PATH; ``virtkit snapshot --control PATH DIR``,
``virtkit migrate --control PATH --to HOST:PORT`` and :func:`request` talk to it. One request per
line, one reply per line::

    -> {"cmd": "snapshot", "dir": "/var/lib/vm1/snap"}
    <- {"ok": true, "paused_ms": 17.2, "state_bytes": 17380, ...}
    -> {"cmd": "nonsense"}
    <- {"ok": false, "error": "unknown command 'nonsense' (commands: ...)"}

Commands: ``status``, ``pause``, ``resume``, ``snapshot`` (dir, resume=true, sync=false),
``migrate`` (to, downtime_ms, max_rounds), ``stop``. Operations that pause the guest run one at a
time. The socket is created mode 0600: whoever can connect can stop or copy the VM.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
from collections.abc import Callable
from typing import Any

from virtkit import records
from virtkit.errors import ConfigError, VirtkitError
from virtkit.stop import Stop, StopReason
from virtkit.vm import Machine

#: a request line longer than this is refused (the socket is local, but still a parser input)
MAX_LINE = 64 << 10

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(VirtkitError):
    """The control socket is unusable, or a command sent through it failed."""


class ControlServer:
    """Serves one machine's control socket from a daemon thread."""

    def __init__(
        self,
        path: str,
        machine: Machine,
        *,
        on_migrated: Callable[[str], None] | None = None,
        listener: socket.socket | None = None,
        confined: bool = False,
    ) -> None:
        """``listener``: the socket, already bound at ``path`` (by :func:`bind`), for a VMM that
        confines itself before it serves. ``confined``: this process can no longer reach host
        files or the network, so 'snapshot' and 'migrate' are refused (saying why), and the socket
        file is left for the unconfined parent to remove."""
        self.path = path
        self.machine = machine
        self.on_migrated = on_migrated
        self.confined = confined
        self._op_lock = threading.Lock()  # one pausing operation at a time
        self._closing = False
        self._sock = listener if listener is not None else bind(path)
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._conns_lock = threading.Lock()
        self.handlers: dict[str, Handler] = {
            "status": self._status,
            "pause": self._pause,
            "resume": self._resume,
            "snapshot": self._snapshot,
            "migrate": self._migrate,
            "stop": self._stop,
        }
        if confined:
            self.handlers["snapshot"] = self.handlers["migrate"] = self._confined
        self._thread = threading.Thread(target=self._serve, name="vm-control", daemon=True)
        self._thread.start()

    # --- commands --------------------------------------------------------------------------------
    def _status(self, req: dict[str, Any]) -> dict[str, Any]:
        m = self.machine
        state = "stopped" if m.stopping else "paused" if m.paused else "running"
        return {"state": state, "vcpus": m.config.vcpus, "memory": m.config.memory, "pid": os.getpid()}

    def _pause(self, req: dict[str, Any]) -> dict[str, Any]:
        with self._op_lock:
            self.machine.pause()
        return {}

    def _resume(self, req: dict[str, Any]) -> dict[str, Any]:
        with self._op_lock:
            self.machine.resume()
        return {}

    def _snapshot(self, req: dict[str, Any]) -> dict[str, Any]:
        from virtkit.snapshot import save

        directory = req.get("dir")
        if not isinstance(directory, str) or not directory:
            raise ConfigError('snapshot needs "dir": the directory to write')
        with self._op_lock:
            info = save(
                self.machine, directory, resume=bool(req.get("resume", True)), sync=bool(req.get("sync", False))
            )
        return {
            "dir": os.path.abspath(info.directory),
            "state_bytes": info.state_bytes,
            "memory_bytes": info.memory_bytes,
            "memory_written": info.memory_written,
            "paused_ms": info.paused_ns / 1e6,
        }

    def _migrate(self, req: dict[str, Any]) -> dict[str, Any]:
        from virtkit.migration.source import MigrationOptions, migrate

        to = req.get("to")
        if not isinstance(to, str):
            raise ConfigError('migrate needs "to": HOST:PORT of a virtkit migrate-receive')
        opts = MigrationOptions.from_request(req)
        with self._op_lock:
            result = migrate(self.machine, to, opts)
        if result.completed and self.on_migrated is not None:
            self.on_migrated(to)
        return result.to_json()

    def _confined(self, req: dict[str, Any]) -> dict[str, Any]:
        raise ConfigError(
            f"{req.get('cmd')} needs host directories or a network connection, which this "
            "confined VMM (virtkit migrate-receive) cannot reach; start the receiver with "
            "--no-jail to snapshot or migrate the VM it receives"
        )

    def _stop(self, req: dict[str, Any]) -> dict[str, Any]:
        self.machine.request_stop(Stop(StopReason.STOPPED, detail="stopped through the control socket"))
        return {}

    # --- serving ---------------------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._client, args=(conn,), name="vm-control-client", daemon=True)
            with self._conns_lock:
                self._conns.add(conn)
                self._threads.add(t)
            t.start()

    def _client(self, conn: socket.socket) -> None:
        try:
            f = conn.makefile("rb")
            while True:
                line = f.readline(MAX_LINE + 1)
                if not line:
                    return
                reply = self.handle_line(line)
                conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            return
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
            conn.close()

    def handle_line(self, line: bytes) -> dict[str, Any]:
        if len(line) > MAX_LINE:
            return {"ok": False, "error": f"request longer than {MAX_LINE} bytes"}
        # records bounds the nesting before parsing: json.loads of 60,000 '[' raised RecursionError,
        # which ended the client's thread with a traceback instead of a reply
        try:
            req = records.load_object(line, what="request", max_bytes=MAX_LINE)
        except records.UntrustedInput as e:
            return {"ok": False, "error": f"request is not a JSON object on one line: {e}"}
        cmd = req.get("cmd")
        handler = self.handlers.get(cmd) if isinstance(cmd, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown command {cmd!r} (commands: {', '.join(sorted(self.handlers))})"}
        try:
            return {"ok": True, **handler(req)}
        except VirtkitError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # a bug must not kill the control thread or leave the VM paused
            return {"ok": False, "error": f"{cmd} failed: {type(e).__name__}: {e}"}

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        # Shut only the reading side: a client waiting for its next request sees end-of-file,
        # while a reply still being produced (the 'stop' or 'migrate' that ended this VM) goes out.
        with self._conns_lock:
            for c in list(self._conns):
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RD)
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout=5)
        self._thread.join(timeout=2)
        if not self.confined:  # a confined process may not unlink (seccomp would kill it)
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def bind(path: str) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 (a stale one left by a dead VMM is replaced,
    a live one refused)."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ConfigError(f"--control {path} exists and is not a socket: choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # a stale socket left by a VMM that died
        else:
            raise ConfigError(f"--control {path} is in use by a running virtkit")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on --control {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    sock.listen(8)
    return sock


def request(path: str, cmd: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
    """Send one command to the control socket at ``path``; return its reply or raise
    :class:`ControlError` with the server's one-line error."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(
                f"no control socket at {path}: start the VM with `virtkit run --control {path}`"
            ) from None
        except OSError as e:
            raise ControlError(f"cannot connect to {path}: {e.strerror or e}") from None
        try:
            sock.sendall(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
        except OSError as e:  # the VMM went away between accept and our request (BrokenPipe, reset)
            raise ControlError(f"{cmd}: connection to {path} failed: {e.strerror or e}") from None
        f = sock.makefile("rb")
        try:
            line = f.readline(MAX_LINE + 1)
        except TimeoutError:
            raise ControlError(f"{cmd}: no reply from {path} within {timeout:g} s") from None
        except OSError as e:
            raise ControlError(f"{cmd}: connection to {path} failed: {e.strerror or e}") from None
        if not line:
            raise ControlError(f"{cmd}: the VMM at {path} closed the connection without replying")
        # the VMM's guest may have subverted it: its reply is parsed as hostile input
        try:
            reply = records.load_object(line, what=f"reply from {path}", max_bytes=MAX_LINE + 1)
        except records.UntrustedInput as e:
            raise ControlError(f"{cmd}: malformed reply from {path}: {e}") from None
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error", "failed")))
        return reply
    finally:
        sock.close()
