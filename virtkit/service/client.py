"""A client of virtkitd's REST API over its Unix socket (what the CLI uses)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.parse
from typing import Any

from virtkit.errors import VirtkitError

DEFAULT_SOCKET = "/run/virtkitd/api.sock"


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

    def request(
        self, method: str, url: str, body: Any = None, raw: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        conn = _UnixConnection(self.path, self.timeout)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            hdrs = {"Content-Type": "application/json"} if data is not None else {}
            hdrs.update(headers or {})
            try:
                conn.request(method, url, body=data, headers=hdrs)
                resp = conn.getresponse()
                return resp.status, resp.read()
            except (FileNotFoundError, ConnectionRefusedError):
                raise VirtkitError(
                    f"virtkitd is not running (no API socket at {self.path}): start it with "
                    "`virtkitd`, or point VIRTKITD_SOCKET at its socket"
                ) from None
        finally:
            conn.close()

    def call(self, method: str, url: str, body: Any = None) -> Any:
        status, data = self.request(method, url, body)
        if status >= 400:
            try:
                message = json.loads(data)["error"]
            except (ValueError, KeyError, TypeError):
                message = data.decode(errors="replace").strip()[:300]
            raise ApiError(status, message)
        if not data:
            return None
        if url == "/metrics":
            return data.decode()
        return json.loads(data)

    @staticmethod
    def vm_url(name: str, action: str = "") -> str:
        url = "/v1/vms/" + urllib.parse.quote(name, safe="")
        return url + ("/" + action if action else "")


def ps_entries() -> list[dict[str, Any]]:
    """virtkitd's VMs as ``virtkit ps`` entries (id, kind, status, pid, memory, created); none when
    the service is not running, so ``ps`` never fails because of it."""
    import time

    if not os.path.exists(default_socket()):
        return []
    try:
        vms = Client(timeout=5).call("GET", "/v1/vms")
    except (VirtkitError, OSError):
        return []
    return [
        {
            "id": v["name"],
            "kind": "vm",
            "status": v["state"],
            "pid": v["pid"],
            "memory": f"{v['definition']['memory_mib']} MiB",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(v["created"])),
        }
        for v in vms
    ]
