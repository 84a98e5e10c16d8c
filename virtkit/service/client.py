"""A client of virtkitd's REST API over its Unix socket (what the CLI uses).

The daemon is a peer like any other: its answers are read up to :data:`MAX_RESPONSE` bytes,
decoded with the nesting bounded (:func:`virtkit.records.load_json`) and parsed into the same
records the daemon answers with (:mod:`virtkit.service.model`). Fields a newer daemon adds are
ignored; a missing or mistyped one is one :class:`~virtkit.errors.VirtkitError` line.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.parse
from typing import Any, Final, TypeVar

from virtkit.errors import VirtkitError
from virtkit.records import UntrustedInput, load_json, parse, to_json
from virtkit.service.model import ErrorBody, Event, HostInfo, LogChunk, VmCreate, VmStats, VmStatus

DEFAULT_SOCKET = "/run/virtkitd/api.sock"
#: the largest answer read: a log chunk is at most 1 MiB of text (6 MiB as escaped JSON), a VM
#: list or 1000 events far less
MAX_RESPONSE: Final = 16 << 20

R = TypeVar("R")


def default_socket() -> str:
    return os.environ.get("VIRTKITD_SOCKET", DEFAULT_SOCKET)


class ApiError(VirtkitError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.exit_status = 1 if status >= 500 else 2


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


class Client:
    def __init__(self, path: str | None = None, timeout: float = 60.0) -> None:
        self.path = path or default_socket()
        self.timeout = timeout

    # --- the wire --------------------------------------------------------------------------------
    def request(
        self, method: str, url: str, body: Any = None, raw: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """(status, body of at most MAX_RESPONSE + 1 bytes) of one request: what tests of the
        API's input use to send anything at all."""
        conn = _UnixConnection(self.path, self.timeout)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            hdrs = {"Content-Type": "application/json"} if data is not None else {}
            hdrs.update(headers or {})
            try:
                conn.request(method, url, body=data, headers=hdrs)
                resp = conn.getresponse()
                return resp.status, resp.read(MAX_RESPONSE + 1)
            except (FileNotFoundError, ConnectionRefusedError):
                raise VirtkitError(
                    f"virtkitd is not running (no API socket at {self.path}): start it with "
                    "`virtkitd`, or point VIRTKITD_SOCKET at its socket"
                ) from None
        finally:
            conn.close()

    def call(self, method: str, url: str, body: Any = None) -> Any:
        """The answer to one request as a bounded JSON value (None for an empty body; text for
        ``/metrics``); an error status is an :class:`ApiError` with the daemon's one line. The typed
        methods below parse this further into records; tests and scripts use it as it is."""
        status, data = self.request(method, url, body)
        what = f"virtkitd's answer to {method} {url[:100]}"
        if status >= 400:
            try:
                message = parse(ErrorBody, load_json(data, what=what, max_bytes=MAX_RESPONSE), what=what).error
            except UntrustedInput:
                message = " ".join(data[:300].decode(errors="replace").split())
            raise ApiError(status, message)
        if not data:
            return None
        if url == "/metrics":
            if len(data) > MAX_RESPONSE:
                raise VirtkitError(f"{what} is longer than {MAX_RESPONSE} bytes")
            return data.decode(errors="replace")
        return load_json(data, what=what, max_bytes=MAX_RESPONSE)

    def _record(self, record: type[R], method: str, url: str, body: Any = None) -> R:
        return parse(record, self.call(method, url, body), what=f"virtkitd's answer to {method}", unknown="ignore")

    def _records(self, record: type[R], url: str) -> list[R]:
        value = self.call("GET", url)
        if not isinstance(value, list):
            raise UntrustedInput(f"virtkitd's answer to GET {url[:100]} is not an array")
        return [parse(record, v, what=f"virtkitd's answer to GET[{i}]", unknown="ignore") for i, v in enumerate(value)]

    @staticmethod
    def vm_url(name: str, action: str = "") -> str:
        url = "/v1/vms/" + urllib.parse.quote(name, safe="")
        return url + ("/" + action if action else "")

    # --- the API, typed --------------------------------------------------------------------------
    def create(self, request: VmCreate) -> VmStatus:
        return self._record(VmStatus, "POST", "/v1/vms", to_json(request))

    def vms(self) -> list[VmStatus]:
        return self._records(VmStatus, "/v1/vms")

    def vm(self, name: str) -> VmStatus:
        return self._record(VmStatus, "GET", self.vm_url(name))

    def action(self, name: str, action: str) -> VmStatus:
        """``start``, ``stop`` or ``kill``."""
        return self._record(VmStatus, "POST", self.vm_url(name, action))

    def delete(self, name: str, force: bool = False) -> None:
        self.call("DELETE", self.vm_url(name) + ("?force=true" if force else ""))

    def stats(self, name: str) -> VmStats:
        return self._record(VmStats, "GET", self.vm_url(name, "stats"))

    def logs(self, name: str, offset: int = 0) -> LogChunk:
        return self._record(LogChunk, "GET", self.vm_url(name, "logs") + f"?offset={offset}")

    def console(self, name: str, data: str) -> None:
        self.call("POST", self.vm_url(name, "console"), {"data": data})

    def events(self, name: str | None = None) -> list[Event]:
        return self._records(Event, self.vm_url(name, "events") if name is not None else "/v1/events")

    def host(self) -> HostInfo:
        return self._record(HostInfo, "GET", "/v1/host")

    def metrics(self) -> str:
        return str(self.call("GET", "/metrics"))


def ps_entries() -> list[dict[str, Any]]:
    """virtkitd's VMs as ``virtkit ps`` entries (id, kind, status, pid, memory, created); none when
    the service is not running, so ``ps`` never fails because of it."""
    import time

    if not os.path.exists(default_socket()):
        return []
    try:
        vms = Client(timeout=5).vms()
    except (VirtkitError, OSError):
        return []
    return [
        {
            "id": v.name,
            "kind": "vm",
            "status": v.state,
            "pid": v.pid,
            "memory": f"{v.definition.memory_mib} MiB",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(v.created)),
        }
        for v in vms
    ]
