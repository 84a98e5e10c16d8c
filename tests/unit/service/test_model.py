"""virtkitd's records (virtkit.service.model) at each of its edges: the HTTP body, the database
row, the VMM's definition.json, the daemon's answers; and the OpenAPI document they generate."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from virtkit.errors import VirtkitError
from virtkit.records import UntrustedInput, json_schema, load_object, parse, to_json
from virtkit.service import openapi
from virtkit.service.model import (
    ConsoleInput,
    ErrorBody,
    Event,
    HostInfo,
    LogChunk,
    VmCreate,
    VmDefinition,
    VmStats,
    VmStatus,
)
from virtkit.service.store import CorruptRow, Store

ROOT = Path(__file__).resolve().parents[3]


def _body(value: object) -> VmCreate:
    """What the API does with a body: bounded decode, then the record."""
    data = value if isinstance(value, bytes) else json.dumps(value).encode()
    return parse(VmCreate, load_object(data, what="the body", max_bytes=openapi.MAX_BODY), what="body")


# --- the HTTP body ---------------------------------------------------------------------------------


def test_a_good_body_becomes_a_definition_with_defaults() -> None:
    req = _body({"name": "web-1", "kernel": "/k", "vcpus": 2, "cpus": "0-1", "start": True})
    assert req.start is True
    assert req.definition() == VmDefinition(name="web-1", kernel="/k", vcpus=2, cpus="0-1")
    assert req.definition().memory_mib == 64 and req.definition().restart == "never"
    assert "start" not in to_json(req.definition())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"name": "a"}, "body.kernel is missing"),
        ({"name": "a", "kernel": "/k", "colour": "red"}, "body has unknown field 'colour' (known: name, kernel, "),
        ({"name": "a", "kernel": "/k", "vcpus": 1.5}, "body.vcpus must be an integer, not a number"),
        ({"name": "a", "kernel": "/k", "vcpus": False}, "body.vcpus must be an integer, not a boolean"),
        ({"name": "a", "kernel": "/k", "vcpus": "2"}, "body.vcpus must be an integer, not a string"),
        ({"name": "a", "kernel": "/k", "vcpus": 0}, "body.vcpus is 0, less than 1"),
        ({"name": "a", "kernel": "/k", "memory_mib": 10**30}, "more than 1048576"),
        ({"name": "a/b", "kernel": "/k"}, "body.name 'a/b' does not match"),
        ({"name": "x" * 64, "kernel": "/k"}, "does not match"),
        ({"name": "a", "kernel": "/k", "mode": "x"}, "body.mode must be one of 'full', 'para'"),
        ({"name": "a", "kernel": ""}, "body.kernel is shorter than 1"),
        ({"name": "a", "kernel": "/k\0"}, "body.kernel '/k\\x00' does not match"),
        ({"name": "a", "kernel": "/k", "cmdline": "x" * 1025}, "body.cmdline is longer than 1024"),
        ({"name": "a", "kernel": "/k", "cpus": "0;rm"}, "body.cpus '0;rm' does not match"),
        ({"name": "a", "kernel": "/k", "start": "yes"}, "body.start must be true or false"),
        ([1, 2], "the body is a JSON array, not an object"),
        (b"[" * 100, "the body is nested more than 32 levels deep"),
        (b'{"name": "a", "cmdline": "' + b"x" * (64 << 10) + b'"}', "more than the 65536 allowed"),
    ],
)
def test_a_bad_body_is_refused_in_one_line_naming_the_field(value: object, message: str) -> None:
    with pytest.raises(UntrustedInput) as e:
        _body(value)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_console_input_refuses_nul_and_oversize() -> None:
    assert parse(ConsoleInput, {"data": "ls\n"}, what="body").data == "ls\n"
    for bad in ({"data": "a\0"}, {"data": "x" * 4097}, {"data": 1}, {}):
        with pytest.raises(UntrustedInput, match="body"):
            parse(ConsoleInput, bad, what="body")


# --- the OpenAPI document --------------------------------------------------------------------------

#: what each operation reads and answers: written here, independently of openapi.py, so a schema
#: the document publishes for a body can only be the one its record parses
BODIES: dict[tuple[str, str, str], object] = {
    ("/v1/host", "get", "200"): HostInfo,
    ("/v1/vms", "get", "200"): [VmStatus],
    ("/v1/vms", "post", "request"): VmCreate,
    ("/v1/vms", "post", "201"): VmStatus,
    ("/v1/vms/{name}", "get", "200"): VmStatus,
    ("/v1/vms/{name}/start", "post", "200"): VmStatus,
    ("/v1/vms/{name}/stop", "post", "200"): VmStatus,
    ("/v1/vms/{name}/kill", "post", "200"): VmStatus,
    ("/v1/vms/{name}/stats", "get", "200"): VmStats,
    ("/v1/vms/{name}/logs", "get", "200"): LogChunk,
    ("/v1/vms/{name}/console", "post", "request"): ConsoleInput,
    ("/v1/vms/{name}/events", "get", "200"): [Event],
    ("/v1/events", "get", "200"): [Event],
}


def _expected(spec: object) -> dict[str, Any]:
    if isinstance(spec, list):
        return {"type": "array", "items": json_schema(spec[0])}
    return json_schema(spec)  # type: ignore[arg-type]


def _json_bodies(doc: dict[str, Any]) -> Iterator[tuple[tuple[str, str, str], dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None:
                yield (path, method, "request"), body["schema"]
            for status, answer in op["responses"].items():
                content = answer.get("content", {}).get("application/json")
                if content is not None:
                    yield (path, method, status), content["schema"]


@pytest.mark.parametrize("source", ["generated", "docs/openapi.json"])
def test_every_body_schema_in_the_document_is_its_records(source: str) -> None:
    doc = json.loads(openapi.document() if source == "generated" else (ROOT / "docs" / "openapi.json").read_text())
    seen = set()
    for key, schema in _json_bodies(doc):
        if key[0] == "/openapi.json":
            continue
        if int(key[2]) >= 400 if key[2].isdigit() else False:
            assert schema == json_schema(ErrorBody), key
            continue
        assert key in BODIES, f"{key}: a body with no record in this test"
        assert schema == _expected(BODIES[key]), key
        seen.add(key)
    assert seen == set(BODIES), set(BODIES) - seen


def test_request_schemas_refuse_unknown_fields_and_say_what_is_required() -> None:
    create = json.loads(openapi.document())["paths"]["/v1/vms"]["post"]["requestBody"]["content"]
    schema = create["application/json"]["schema"]
    assert schema["additionalProperties"] is False and schema["required"] == ["name", "kernel"]
    assert schema["properties"]["mode"]["enum"] == ["full", "para"]
    assert schema["properties"]["cpu_quota_pct"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 6400,
        "nullable": True,
        "default": None,
        "description": "hard cap in percent of one CPU (150 = one and a half CPUs)",
    }


# --- the database row ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("definition", '{"name": "a", "kernel": "/k", "evil": 1}', "'a'.definition has unknown field 'evil'"),
        ("definition", '{"name": "a", "kernel": "/k", "vcpus": "2"}', "'a'.definition.vcpus must be an integer"),
        ("definition", '{"name": "a", "kernel": "/k", "vcpus": 1000}', "vcpus is 1000, more than 64"),
        ("definition", "[" * 100, "nested more than 32"),
        ("definition", '{"name": "' + "x" * (64 << 10) + '"}', "more than the 65536 allowed"),
        ("definition", "not json", "is not valid JSON"),
        ("state", "exploded", "'a'.state must be one of"),
        ("pid", "twelve", "'a'.pid must be an integer, not a string"),
        ("last_exit", '{"reason": "nope"}', "'a'.last_exit.reason must be one of"),
    ],
)
def test_a_row_that_does_not_fit_is_one_line_naming_the_vm_and_field(
    tmp_path: Path, column: str, value: str, message: str
) -> None:
    s = Store(str(tmp_path / "db"))
    try:
        s.insert("a", VmDefinition(name="a", kernel="/k"))
        s.insert("b", VmDefinition(name="b", kernel="/k"))
        with s.lock:
            s.db.execute(f"UPDATE vms SET {column} = ? WHERE name = 'a'", (value,))
        with pytest.raises(CorruptRow) as e:
            s.get("a")
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
        with pytest.raises(CorruptRow):
            s.all()
        bad: list[str] = []
        assert [r.name for r in s.all(on_corrupt=lambda name, err: bad.append(name))] == ["b"]
        assert bad == ["a"] and s.names() == ["a", "b"]
    finally:
        s.close()


def test_an_event_row_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    s = Store(str(tmp_path / "db"))
    try:
        s.event("a", "created", "x" * (1 << 20))  # cut when written
        assert len(s.events()[0].detail) == 64 << 10
        with s.lock:
            s.db.execute("INSERT INTO events (ts, vm, kind, detail) VALUES (1, 'a', 'KIND; drop', '')")
        with pytest.raises(CorruptRow, match="kind"):
            s.events()
    finally:
        s.close()


def test_a_corrupt_vm_is_listed_nowhere_but_can_be_deleted_with_force(tmp_path: Path) -> None:
    from virtkit.service.daemon import Service

    svc = Service(str(tmp_path / "state"), str(tmp_path / "run"), use_cgroups=False)
    try:
        kernel = tmp_path / "k"
        kernel.write_bytes(b"\x7fELF")
        svc.create(VmCreate(name="a", kernel=str(kernel)))
        with svc.store.lock:
            svc.store.db.execute("UPDATE vms SET definition = '{}' WHERE name = 'a'")
        with pytest.raises(CorruptRow, match="delete the VM"):
            svc.status("a")
        svc.reattach()  # survives it
        assert svc.host().vms == {"corrupt": 1}
        with pytest.raises(CorruptRow):
            svc.delete("a")
        svc.delete("a", force=True)
        assert svc.store.names() == [] and svc.vms() == []
    finally:
        svc.close()


# --- the VMM's definition.json ---------------------------------------------------------------------


def test_the_vmm_reads_back_exactly_what_the_service_wrote(tmp_path: Path) -> None:
    from virtkit.service.daemon import Service
    from virtkit.service.vmm import DEFINITION, read_definition

    svc = Service(str(tmp_path / "state"), str(tmp_path / "run"), use_cgroups=False)
    try:
        kernel = tmp_path / "k"
        kernel.write_bytes(b"\x7fELF")
        svc.create(VmCreate(name="a", kernel=str(kernel), memory_mib=3, cmdline="x=1", mode="para"))
        written = svc.vmm_definition(svc.get("a"), "0123abcd", None)
        (tmp_path / DEFINITION).write_text(json.dumps(to_json(written)))
        got = read_definition(str(tmp_path))
        assert got == written and got.memory == 3 << 20 and got.jail.uid >= 400_000 and got.mode == "para"
    finally:
        svc.close()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            {"name": "a", "kernel": "/k", "memory": 1 << 26, "disks": [{"path": "/d", "ro": True}]},
            "disks[0] has unknown",
        ),
        ({"name": "a", "kernel": "/k", "memory": 1 << 26, "vcpus": "2"}, "definition.json.vcpus must be an integer"),
        ({"name": "a", "kernel": "/k", "memory": 1}, "definition.json.memory is 1, less than"),
        ({"name": "a", "kernel": "/k", "memory": 1 << 26, "jail": {"uid": 0}}, "jail.uid is 0, less than 1"),
        ({"name": "a", "kernel": "/k", "memory": 1 << 26, "cgroups": ["/x"] * 17}, "cgroups is longer than 16"),
        ("x" * (1 << 17), "more than the 65536 allowed"),
    ],
)
def test_a_bad_definition_is_refused_before_anything_runs(tmp_path: Path, content: object, message: str) -> None:
    from virtkit.service.vmm import DEFINITION, main

    (tmp_path / DEFINITION).write_text(content if isinstance(content, str) else json.dumps(content))
    r, w = os.pipe()
    saved = os.dup(2)
    os.dup2(w, 2)
    try:
        status = main(["--dir", str(tmp_path), "--no-jail"])
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(w)
    err = os.read(r, 65536).decode()
    os.close(r)
    assert status == 2 and message in err and err.count("\n") == 1, err


def test_a_definition_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    from virtkit.service.vmm import DEFINITION, read_definition

    os.mkfifo(tmp_path / DEFINITION)  # would block a plain open()
    with pytest.raises(UntrustedInput, match="not a regular file"):
        read_definition(str(tmp_path))


# --- the API and the client, in process ------------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    import tempfile

    from virtkit.service.api import Server
    from virtkit.service.client import Client
    from virtkit.service.daemon import Service

    svc = Service(str(tmp_path / "state"), str(tmp_path / "run"), use_cgroups=False)
    sock = os.path.join(tempfile.mkdtemp(prefix="vkm", dir="/tmp"), "api.sock")
    server = Server(sock, svc)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield Client(sock, timeout=10), tmp_path
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
        os.unlink(sock)
        os.rmdir(os.path.dirname(sock))
        svc.close()


def test_the_client_gets_records_back_from_the_api(api: tuple[Any, Path]) -> None:
    from virtkit.service.client import ApiError

    c, tmp = api
    kernel = tmp / "k"
    kernel.write_bytes(b"\x7fELF")
    rec = c.create(VmCreate(name="a", kernel=str(kernel), cpu_quota_pct=50))
    assert isinstance(rec, VmStatus) and rec.state == "created" and rec.definition.cpu_quota_pct == 50
    assert c.vms() == [rec] and c.vm("a") == rec
    assert [e.kind for e in c.events("a")] == ["created"] and c.events()[0].vm == "a"
    assert c.logs("a") == LogChunk(offset=0, next=0, data="")
    st = c.stats("a")
    assert st.state == "created" and st.vmm is None and st.memory_bytes == 64 << 20
    host = c.host()
    assert host.vms == {"created": 1} and host.cores >= 1 and len(host.load_average) == 3
    assert 'virtkit_vm_up{vm="a"} 0' in c.metrics()
    with pytest.raises(ApiError) as e:
        c.call("POST", "/v1/vms", {"name": "b", "kernel": str(kernel), "colour": "red"})
    assert e.value.status == 400 and "body has unknown field 'colour' (known: name" in str(e.value)
    with pytest.raises(ApiError, match="a VM named 'a' exists already"):
        c.create(VmCreate(name="a", kernel=str(kernel)))
    with pytest.raises(ApiError, match="created, not running") as e:
        c.action("a", "stop")
    assert e.value.status == 409
    c.delete("a")
    assert c.vms() == []


def _one_answer(body: bytes, status: int = 200) -> tuple[str, threading.Thread]:
    """A fake virtkitd that answers one request with ``body``."""
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="vkf", dir="/tmp"), "api.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        head = f"HTTP/1.0 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        with contextlib.suppress(OSError):
            conn.sendall(head.encode() + body)
        conn.close()
        listener.close()

    t = threading.Thread(target=serve)
    t.start()
    return path, t


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"name": "a"}', "state is missing"),
        (b"[" * 1000, "nested more than 32"),
        (b'{"name": "a", "state": "running", "pid": -1}', "pid is -1"),
        (b"\xff", "not UTF-8"),
    ],
)
def test_the_client_refuses_an_answer_that_does_not_fit(body: bytes, message: str) -> None:
    from virtkit.service.client import Client

    path, t = _one_answer(body)
    try:
        with pytest.raises(VirtkitError, match=message) as e:
            Client(path, timeout=10).vm("a")
        assert "\n" not in str(e.value)
    finally:
        t.join()
        os.unlink(path)
        os.rmdir(os.path.dirname(path))


def test_the_client_ignores_fields_a_newer_daemon_adds() -> None:
    from virtkit.service.client import Client

    log = {"offset": 0, "next": 2, "data": "hi", "new_field": {"x": 1}}
    path, t = _one_answer(json.dumps(log).encode())
    try:
        assert Client(path, timeout=10).logs("a") == LogChunk(offset=0, next=2, data="hi")
    finally:
        t.join()
        os.unlink(path)
        os.rmdir(os.path.dirname(path))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--vcpus", "0"], "virtkit: error: --vcpus is 0, less than 1\n"),
        (["--cpu-quota", "9999"], "virtkit: error: --cpu-quota is 9999, more than 6400\n"),
        (["--cpus", "0;x"], "virtkit: error: --cpus '0;x' does not match"),
    ],
)
def test_vm_create_refuses_a_bad_flag_before_it_calls_the_daemon(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from virtkit.cli import main

    monkeypatch.setenv("VIRTKITD_SOCKET", "/nonexistent/api.sock")  # were it called, the error would say so
    assert main(["vm", "create", "x", "--kernel", "/k", *flags]) == 2
    assert capsys.readouterr().err.startswith(message)
