"""The REST API on a Unix socket: routing, body limits, validation, errors as one-line JSON.

Every request is answered with JSON (``/metrics``: Prometheus text). Input the service refuses
gets a 4xx and ``{"error": "<one line>"}``; a 5xx means a bug in virtkitd (the fuzz test in
``tests/integration/service`` drives every operation of the OpenAPI document and asserts none).
One connection carries one request (HTTP/1.0 semantics), which keeps a slow or hostile client
from holding a server thread beyond its own request; reads time out after :data:`READ_TIMEOUT`
seconds (an idle connection is closed then; a body shorter than its Content-Length is a 400).
At most :data:`MAX_CONNECTIONS` connections are served at once, each by its own thread; one more
gets a JSON 503 at once and is closed. Every answer, HTTP-level errors included (a garbage request
line, a header too long), is JSON, and comes after the request's body was read (up to
:data:`DRAIN_LIMIT` bytes), so a client still sending it reads the answer instead of a broken pipe.

A request body is parsed here, once: bounded (:data:`~virtkit.service.openapi.MAX_BODY` bytes,
nesting depth) before it is decoded, then into its record (:mod:`virtkit.service.model`), which
refuses unknown fields naming the known ones; the service gets the record and answers with
records, written out here as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socketserver
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler
from typing import Any, TypeVar

from virtkit.errors import VirtkitError
from virtkit.records import UntrustedInput, load_object, parse, to_json
from virtkit.service import openapi
from virtkit.service.daemon import Conflict, NotFound, Service
from virtkit.service.metrics import render
from virtkit.service.model import ConsoleInput, VmCreate
from virtkit.service.resources import InsufficientResources
from virtkit.service.store import CorruptRow

R = TypeVar("R")

_NAME = re.compile(openapi.NAME_PATTERN)
#: seconds a connection may take to send each part of its request (line, headers, body)
READ_TIMEOUT = 5.0
#: connections served at once; one more is answered 503
MAX_CONNECTIONS = 64
#: a body this much larger than MAX_BODY is still read (and discarded) before a 413 is sent; past
#: it the connection is closed after the answer
DRAIN_LIMIT = 1 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= 400 else line[:397] + "..."


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.0"
    server_version = "virtkitd/1"
    timeout = READ_TIMEOUT
    _body_read = False
    _answered = False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # events go to the database; access logs are not kept

    def address_string(self) -> str:
        return "unix"

    # --- responses -------------------------------------------------------------------------------
    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """HTTP-level errors (raised by the base class while parsing the request line and headers)
        as JSON like every other answer. A method it does not know is a 405 and an HTTP version it
        does not speak a 400: a 5xx from this API means a bug in virtkitd."""
        self._answered = True
        status = 405 if code == 501 else 400 if code == 505 else code
        text = message or self.responses.get(code, ("error",))[0]
        self.close_connection = True
        if not hasattr(self, "command") or self.command is None:
            self.command = ""  # the request line was unreadable
        if getattr(self, "request_version", "HTTP/1.0") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # answer with a status line and headers all the same
        with contextlib.suppress(OSError):
            self._error(status, text)

    def parse_request(self) -> bool:
        self._answered = False
        ok = super().parse_request()
        if not ok and not self._answered:  # the base class refuses an empty request line silently
            self.send_error(400, "empty request line")
        return ok

    def _drain(self) -> None:
        """Read the rest of the request's body (up to DRAIN_LIMIT), so that the client is not
        still writing when the answer comes and the connection closes."""
        if self._body_read or not hasattr(self, "headers") or self.headers is None:
            return
        self._body_read = True
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return
        left = min(length, DRAIN_LIMIT)
        if length > DRAIN_LIMIT:
            self.close_connection = True
        with contextlib.suppress(OSError, ValueError):
            while left > 0:
                chunk = self.rfile.read1(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self._drain()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        self._send(status, (json.dumps(value) + "\n").encode())

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": _one_line(message)})

    # --- request parsing -------------------------------------------------------------------------
    def _body(self, record: type[R]) -> R:
        """The request's body as a ``record``: 400 with the field named if it does not fit."""
        value = load_object(self._raw_body(), what="the body", max_bytes=openapi.MAX_BODY)
        return parse(record, value, what="body")

    def _raw_body(self) -> bytes:
        ctype = self.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "chunked bodies are not accepted: send Content-Length")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise ApiError(411, "a body is required: send Content-Length and a JSON object")
        try:
            length = int(length_text)
        except ValueError:
            raise ApiError(400, f"Content-Length {length_text!r} is not a number") from None
        if length < 0:
            raise ApiError(400, "Content-Length is negative")
        if length > openapi.MAX_BODY:
            self.close_connection = True
            raise ApiError(413, f"body of {length} bytes is over the limit of {openapi.MAX_BODY}")
        if ctype not in ("application/json", ""):
            raise ApiError(415, f"Content-Type {ctype!r}: send application/json")
        self._body_read = True
        raw = b""
        try:
            while len(raw) < length:
                chunk = self.rfile.read1(length - len(raw))  # what came: a timeout loses nothing
                if not chunk:
                    break
                raw += chunk
        except TimeoutError:
            self.close_connection = True
            raise ApiError(
                400,
                f"the body ended after {len(raw)} of its {length} bytes (Content-Length): "
                f"nothing more came in {self.timeout:g} s",
            ) from None
        if len(raw) < length:
            raise ApiError(400, f"the body ended after {len(raw)} of its {length} bytes (Content-Length)")
        return raw

    @staticmethod
    def _query_int(query: dict[str, list[str]], key: str, default: int, lo: int, hi: int) -> int:
        values = query.get(key)
        if not values:
            return default
        try:
            value = int(values[-1])
        except ValueError:
            raise ApiError(400, f"query parameter {key} must be an integer (got {values[-1][:40]!r})") from None
        if not lo <= value <= hi:
            raise ApiError(400, f"query parameter {key} must be between {lo} and {hi}")
        return value

    @staticmethod
    def _query_bool(query: dict[str, list[str]], key: str) -> bool:
        values = query.get(key)
        if not values:
            return False
        if values[-1].lower() in ("true", "1", "yes"):
            return True
        if values[-1].lower() in ("false", "0", "no"):
            return False
        raise ApiError(400, f"query parameter {key} must be true or false")

    # --- dispatch --------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        try:
            self._route(method)
        except ApiError as e:
            self._error(e.status, str(e))
        except NotFound as e:
            self._error(404, str(e))
        except CorruptRow as e:  # the service's own database: not the client's fault
            self._error(500, f"virtkitd's database: {e}")
        except UntrustedInput as e:
            self._error(400, str(e))
        except (Conflict, InsufficientResources) as e:
            self._error(409, str(e))
        except VirtkitError as e:
            self._error(400, str(e))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        except Exception as e:  # noqa: BLE001 - a bug answers 500 in one line, the service goes on
            sys.stderr.write(f"virtkitd: internal error on {method} {self.path[:200]}: {type(e).__name__}: {e}\n")
            with contextlib.suppress(OSError):
                self._error(500, f"internal error: {type(e).__name__}: {e}")

    def _route(self, method: str) -> None:
        svc = self.server.service
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        # split before decoding: %2F in a name must not become a path separator
        try:
            parts = [urllib.parse.unquote(p, errors="strict") if "%" in p else p for p in url.path.split("/")[1:]]
        except UnicodeDecodeError:
            raise ApiError(400, "the path is not UTF-8 once percent-decoded") from None
        if parts and parts[-1] == "" and len(parts) > 1:
            parts = parts[:-1]

        def allow(*methods: str) -> None:
            if method not in methods:
                raise ApiError(405, f"{method} is not allowed on {url.path[:100]} (allowed: {', '.join(methods)})")

        if parts == ["openapi.json"]:
            allow("GET")
            return self._send(200, openapi.document().encode())
        if parts == ["metrics"]:
            allow("GET")
            return self._send(200, render(svc.metrics_snapshot()).encode(), "text/plain; version=0.0.4")
        if parts[:1] != ["v1"]:
            raise ApiError(404, f"no such endpoint {url.path[:100]!r} (see /openapi.json)")
        rest = parts[1:]
        if rest == ["host"]:
            allow("GET")
            return self._json(200, to_json(svc.host()))
        if rest == ["events"]:
            allow("GET")
            since = self._query_int(query, "offset", 0, 0, 2**62)
            return self._json(200, [to_json(e) for e in svc.events(since=since)])
        if rest == ["vms"]:
            allow("GET", "POST")
            if method == "GET":
                return self._json(200, [to_json(v) for v in svc.vms()])
            return self._json(201, to_json(svc.create(self._body(VmCreate))))
        if len(rest) < 2 or rest[0] != "vms" or len(rest) > 3:
            raise ApiError(404, f"no such endpoint {url.path[:100]!r} (see /openapi.json)")
        name = rest[1]
        if not _NAME.match(name):
            raise ApiError(400, f"VM name {name[:64]!r} must match {openapi.NAME_PATTERN}")
        action = rest[2] if len(rest) == 3 else None
        if action is None:
            allow("GET", "DELETE")
            if method == "GET":
                return self._json(200, to_json(svc.status(name)))
            svc.delete(name, force=self._query_bool(query, "force"))
            return self._send(204, b"")
        if action in ("start", "stop", "kill"):
            allow("POST")
            actions = {"start": svc.start, "stop": svc.stop, "kill": svc.kill}
            return self._json(200, to_json(actions[action](name)))
        if action == "stats":
            allow("GET")
            return self._json(200, to_json(svc.stats(name)))
        if action == "logs":
            allow("GET")
            offset = self._query_int(query, "offset", 0, 0, 2**62)
            limit = self._query_int(query, "limit", 1 << 20, 1, 1 << 20)
            return self._json(200, to_json(svc.logs(name, offset, limit)))
        if action == "events":
            allow("GET")
            since = self._query_int(query, "offset", 0, 0, 2**62)
            return self._json(200, [to_json(e) for e in svc.events(vm=name, since=since)])
        if action == "console":
            allow("POST")
            svc.console_write(name, self._body(ConsoleInput).data)
            return self._send(204, b"")
        raise ApiError(404, f"no such endpoint {url.path[:100]!r} (see /openapi.json)")


_BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s"
)


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 128
    max_connections = MAX_CONNECTIONS

    def __init__(self, path: str, service: Service) -> None:
        self.service = service
        self._active = 0
        self._active_lock = threading.Lock()
        super().__init__(path, Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread per connection, at most ``max_connections`` at once; the overflow is answered
        here, in the accepting thread, without a thread of its own."""
        with self._active_lock:
            busy = self._active >= self.max_connections
            if not busy:
                self._active += 1
        if busy:
            self._busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._active_lock:
                self._active -= 1
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._active -= 1

    def _busy(self, request: Any) -> None:
        body = (
            json.dumps({"error": f"virtkitd is serving {self.max_connections} connections already: retry shortly"})
            + "\n"
        ).encode()
        with contextlib.suppress(OSError):
            request.setblocking(False)
            with contextlib.suppress(OSError):  # what the client sent already, so the close is clean
                request.recv(65536)
            request.send(_BUSY % (len(body), body))
        self.shutdown_request(request)


def serve(service: Service, path: str) -> int:
    """Run until SIGTERM/SIGINT; the VMMs keep running."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    service.start_service()
    # bound and listening under a temporary name, made 0600, and only then renamed into place: a
    # client that sees the socket can connect (between bind and listen it would be refused), and
    # nobody else ever could
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    server = Server(tmp, service)
    os.chmod(tmp, 0o600)
    os.rename(tmp, path)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"virtkitd: serving on {path}", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        service.close()
    return 0
