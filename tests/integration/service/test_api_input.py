"""Bad API input gets a 4xx with a one-line reason and leaves nothing half-made; a fuzzer drives
every operation of the OpenAPI document with generated inputs and finds no 5xx."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtkit.service import openapi

pytestmark = [pytest.mark.kvm, pytest.mark.root]


def _check_error(status: int, data: bytes, expected: int | tuple[int, ...]) -> str:
    codes = expected if isinstance(expected, tuple) else (expected,)
    assert status in codes, (status, data[:300])
    message = json.loads(data)["error"]
    assert message and "\n" not in message and len(message) <= 400
    return str(message)


@pytest.fixture
def d(daemon_factory: Any) -> Any:
    return daemon_factory()


def _nothing_left(d: Any) -> None:
    assert d.call("GET", "/v1/vms") == []
    assert os.listdir(os.path.join(d.state_dir, "vms")) == []


def test_malformed_and_wrong_bodies(d: Any, guests: Path) -> None:
    c = d.client
    kernel = str(guests / "hello.elf")
    cases: list[tuple[bytes, int, str]] = [
        (b"{not json", 400, "the body is not valid JSON"),
        (b"\xff\xfe", 400, "not UTF-8"),
        (b"[" * 60000, 400, "the body is nested more than 32 levels deep"),
        (b'{"name": "a"}', 400, "body.kernel is missing"),
        (
            json.dumps({"name": "a", "kernel": kernel, "colour": "red"}).encode(),
            400,
            "unknown field 'colour' (known: name,",
        ),
        (json.dumps({"name": "a", "kernel": kernel, "cmdline": "a\0b"}).encode(), 400, "body.cmdline"),
        (json.dumps({"name": "a", "kernel": kernel, "vcpus": "2"}).encode(), 400, "must be an integer"),
        (json.dumps({"name": "a", "kernel": kernel, "vcpus": True}).encode(), 400, "must be an integer"),
        (json.dumps({"name": "a", "kernel": kernel, "memory_mib": 10**30}).encode(), 400, "more than 1048576"),
        (json.dumps({"name": "a", "kernel": kernel, "cpus": "0;rm"}).encode(), 400, "does not match"),
        (json.dumps({"name": "a", "kernel": "relative.elf"}).encode(), 400, "absolute path"),
        (json.dumps({"name": "a", "kernel": "/nonexistent"}).encode(), 400, "does not exist"),
        (json.dumps({"name": "a", "kernel": kernel, "memory_mib": 1048576}).encode(), 409, "more than this host"),
        (json.dumps({"name": "a", "kernel": kernel, "cpus": "7"}).encode(), 400, "does not have"),
        (b"1" * 5000, 400, "not valid JSON"),  # past the int conversion limit
        (json.dumps([1, 2]).encode(), 400, "is a JSON array, not an object"),
    ]
    for name in ("../etc", "a/b", "..", ".hidden", "-x", "a\0b", "a b", "x" * 64, ""):
        cases.append((json.dumps({"name": name, "kernel": kernel}).encode(), 400, "does not match"))
    for body, status, text in cases:
        code, data = c.request("POST", "/v1/vms", raw=body)
        msg = _check_error(code, data, status)
        assert text in msg, (body[:60], msg)
    code, data = c.request("POST", "/v1/vms", raw=b"x" * (openapi.MAX_BODY + 1))
    _check_error(code, data, 413)
    code, data = c.request("POST", "/v1/vms", raw=b"{}", headers={"Content-Type": "text/plain"})
    _check_error(code, data, 415)
    for path in ("/v1/vms/..%2F..%2Fetc", "/v1/vms/a%2Fb/start", "/v1/vms/%ff", "/v1/nothing", "/v2/vms"):
        code, data = c.request("GET", path)
        _check_error(code, data, (400, 404))
    code, data = c.request("PUT", "/v1/vms")
    _check_error(code, data, 405)
    code, data = c.request("GET", "/v1/vms/ghost")
    assert "no VM named 'ghost'" in _check_error(code, data, 404)
    _nothing_left(d)


def test_concurrent_create_and_delete_of_one_name(d: Any, guests: Path) -> None:
    kernel = str(guests / "counter.elf")
    results: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        for _ in range(6):
            if i % 2:
                code, data = d.client.request(
                    "POST", "/v1/vms", {"name": "contested", "kernel": kernel, "start": i % 4 == 1}
                )
            else:
                code, data = d.client.request("DELETE", "/v1/vms/contested?force=true")
            with lock:
                results.append(code)
            assert code < 500, data

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) <= {201, 204, 404, 409}
    vms = d.call("GET", "/v1/vms")
    assert len(vms) <= 1  # never two VMs of one name
    from .conftest import vmm_pids

    assert len(vmm_pids(d.state_dir)) == sum(1 for v in vms if v["state"] == "running")
    if vms:
        d.call("DELETE", "/v1/vms/contested?force=true")
    _nothing_left(d)


# --- the fuzzer: inputs generated from the OpenAPI document ----------------------------------------


def _from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    kind = schema.get("type")
    if "enum" in schema:
        s: st.SearchStrategy[Any] = st.sampled_from(schema["enum"])
    elif kind == "string":
        s = st.from_regex(schema["pattern"], fullmatch=True) if "pattern" in schema else st.text(max_size=50)
    elif kind == "integer":
        s = st.integers(schema.get("minimum", -(2**40)), min(schema.get("maximum", 2**40), 4096))
    elif kind == "boolean":
        s = st.booleans()
    elif kind == "object":
        props = schema.get("properties", {})
        s = st.fixed_dictionaries(
            {k: _from_schema(v) for k, v in props.items() if k in schema.get("required", [])},
            optional={
                k: _from_schema(v) for k, v in props.items() if k not in schema.get("required", []) and k != "start"
            },
        )
    else:
        s = st.none()
    return s | st.none() if schema.get("nullable") else s


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _mutated(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A valid object with one field replaced by any JSON value, or an extra field added."""

    def mutate(obj: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
        return {**obj, key: value}

    keys = st.sampled_from([*schema["properties"], "extra"])
    return st.builds(mutate, _from_schema(schema), keys, JSON)


OPERATIONS = [(path, method.upper(), op) for path, item in openapi.SPEC["paths"].items() for method, op in item.items()]
NAME = st.one_of(st.from_regex(openapi.NAME_PATTERN, fullmatch=True), st.text(max_size=70))


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes | None]:
    path, method, op = draw(st.sampled_from(OPERATIONS))
    from urllib.parse import quote

    url = path.replace("{name}", quote(draw(NAME), safe=""))
    query = [
        f"{p['name']}={quote(str(draw(st.one_of(st.integers(-5, 2**63), st.text(max_size=10)))))}"
        for p in op.get("parameters", [])
        if p["in"] == "query" and draw(st.booleans())
    ]
    if query:
        url += "?" + "&".join(query)
    body = None
    schema = (op.get("requestBody") or {}).get("content", {}).get("application/json", {}).get("schema")
    if schema is not None:
        value = draw(st.one_of(_from_schema(schema), _mutated(schema), JSON))
        body = json.dumps(value).encode()
    return method, url, body


def test_the_api_never_answers_5xx_to_generated_input(d: Any) -> None:
    seen: dict[int, int] = {}

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(requests())
    def run(req: tuple[str, str, bytes | None]) -> None:
        method, url, body = req
        code, data = d.client.request(method, url, raw=body)
        seen[code] = seen.get(code, 0) + 1
        assert code < 500, (method, url, body, data[:300])
        if code >= 400 and url != "/metrics":
            _check_error(code, data, code)

    run()
    assert any(400 <= c < 500 for c in seen) and any(c < 300 for c in seen), seen
    for vm in d.call("GET", "/v1/vms"):  # generated creates may have defined VMs (none can start)
        d.call("DELETE", f"/v1/vms/{vm['name']}?force=true")
    _nothing_left(d)


# --- HTTP-level input: short bodies, garbage, slow senders, too many connections --------------------


def _raw(d: Any, data: bytes, *, read_timeout: float = 20) -> tuple[int, dict[str, Any], float]:
    """Send ``data`` as is; (status, JSON body, seconds until the answer)."""
    import socket
    import time

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(read_timeout)
    s.connect(d.socket)
    t0 = time.monotonic()
    try:
        s.sendall(data)
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    elapsed = time.monotonic() - t0
    head, _, body = buf.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    if b"text/plain" in head and status < 400:  # /metrics
        return status, {"text": body.decode()}, elapsed
    assert b"application/json" in head, head  # everything else, and every error
    return status, json.loads(body), elapsed


def test_a_body_shorter_than_its_content_length_is_a_400_not_a_500(d: Any) -> None:
    from virtkit.service.api import READ_TIMEOUT

    status, body, elapsed = _raw(
        d, b'POST /v1/vms HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"name": "x"'
    )
    assert status == 400 and "ended after 12 of its 100 bytes" in body["error"], body
    assert elapsed < READ_TIMEOUT + 10  # within the read timeout (plus a busy machine's slack)
    _nothing_left(d)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"\x00\xff\xfe garbage \x01\r\n\r\n", 400),
        (b"GET /v1/vms HTTP/9.9\r\n\r\n", 400),
        (b"GET /v1/vms HTTP/1.0 extra words\r\n\r\n", 400),
        (b"BREW /v1/vms HTTP/1.0\r\n\r\n", 405),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.0\r\n\r\n", 414),
        (b"GET /v1/vms HTTP/1.0\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", 431),
        (b"GET /v1/vms HTTP/1.0\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    ],
)
def test_http_level_errors_are_json_4xx(d: Any, request_bytes: bytes, status: int) -> None:
    code, body, _ = _raw(d, request_bytes)
    assert code == status, (code, body)
    assert body["error"] and "\n" not in body["error"]


@pytest.mark.parametrize(
    ("path", "length", "status"),
    [
        ("/v1/nothing", 60_000, 404),  # refused by its path: the body is read all the same
        ("/v1/vms/bad%20name/start", 30_000, 400),
        ("/v1/vms", openapi.MAX_BODY + 200_000, 413),  # over the limit, under the drain limit
    ],
)
def test_a_client_still_sending_its_body_reads_the_error(d: Any, path: str, length: int, status: int) -> None:
    """The answer comes after the body was read: a slow sender gets it instead of a broken pipe."""
    import socket
    import time

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(d.socket)
    try:
        s.sendall(
            f"POST {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode()
        )
        sent = 0
        while sent < length:  # in pieces, with pauses, as a client on a loaded machine would
            n = min(8192, length - sent)
            s.sendall(b" " * n)  # raises BrokenPipeError if the server answered and hung up early
            sent += n
            if sent % 65536 < 8192:
                time.sleep(0.05)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    finally:
        s.close()
    head, _, body = buf.partition(b"\r\n\r\n")
    assert int(head.split()[1]) == status, buf[:300]
    assert json.loads(body)["error"]


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_idle_connections_are_capped_with_a_json_503_and_timed_out(d: Any) -> None:
    import socket
    import time

    from virtkit.service.api import MAX_CONNECTIONS, READ_TIMEOUT

    before = _threads(d.proc.pid)
    conns = []
    try:
        for _ in range(MAX_CONNECTIONS + 136):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket)  # blocking: a full backlog waits instead of EAGAIN
            conns.append(s)
        deadline = time.monotonic() + 20
        while _threads(d.proc.pid) < before + MAX_CONNECTIONS and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _threads(d.proc.pid) <= before + MAX_CONNECTIONS + 2  # not one thread per connection
        # the overflow is answered at once, in JSON
        busy = 0
        for s in conns[MAX_CONNECTIONS + 8 :]:
            s.settimeout(10)
            data = s.recv(65536)
            if data.startswith(b"HTTP/1.0 503"):
                assert "retry shortly" in json.loads(data.partition(b"\r\n\r\n")[2])["error"]
                busy += 1
        assert busy >= 100, busy
        # the idle ones are closed after the read timeout, freeing their threads
        t0 = time.monotonic()
        for s in conns[:MAX_CONNECTIONS]:
            s.settimeout(READ_TIMEOUT + 20)
            assert s.recv(65536) == b""
        assert time.monotonic() - t0 < READ_TIMEOUT + 20
    finally:
        for s in conns:
            s.close()
    deadline = time.monotonic() + 20
    while _threads(d.proc.pid) > before + 2:
        assert time.monotonic() < deadline, _threads(d.proc.pid)
        time.sleep(0.05)
    assert d.call("GET", "/v1/vms") == []  # and it serves again


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    """Generated requests at the HTTP level: the operations of the document with bodies whose
    Content-Length may lie (short bodies wait out the read timeout, so they are rare), random
    methods and header values, and random bytes."""
    method, url, body = draw(requests())
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200)) + b"\r\n\r\n"
    method = draw(st.sampled_from([method, method, method, "PATCH", "OPTIONS", "get", "X" * 30]))
    payload = body if body is not None else draw(st.one_of(st.just(b""), st.binary(max_size=100)))
    lie = draw(st.integers(0, 39))
    length = len(payload) + (1 if lie == 0 else -1 if lie == 1 and payload else 0)
    ctype = draw(st.sampled_from(["application/json", "application/json", "text/x"]))
    headers = [f"Content-Length: {length}", f"Content-Type: {ctype}"]
    if draw(st.booleans()):
        junk = draw(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40))
        headers.append(f"X-Junk: {junk}")
    head = f"{method} {url} HTTP/1.0\r\n" + "\r\n".join(headers) + "\r\n\r\n"
    return head.encode() + payload


def test_http_level_fuzz_under_concurrent_load_never_answers_5xx(d: Any) -> None:
    """The generated requests of the fuzzer above at the HTTP level, while other clients keep the
    API busy: every answer is JSON and under 500."""
    stop = threading.Event()
    bad: list[object] = []

    def load() -> None:
        while not stop.is_set():
            code, data = d.client.request("GET", "/v1/vms")
            if code >= 500:
                bad.append(data[:200])

    loaders = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in loaders:
        t.start()
    try:

        @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(raw_requests())
        def run(raw: bytes) -> None:
            code, body, _ = _raw(d, raw)
            assert code < 500, (raw[:200], body)
            if code >= 400:
                assert body["error"] and "\n" not in body["error"]

        run()
    finally:
        stop.set()
        for t in loaders:
            t.join(10)
    assert not bad, bad
    for vm in d.call("GET", "/v1/vms"):
        d.call("DELETE", f"/v1/vms/{vm['name']}?force=true")
    _nothing_left(d)
