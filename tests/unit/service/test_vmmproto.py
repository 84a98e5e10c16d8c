"""What virtkitd reads from a VMM is bounded, deadlined and typed (virtkit.service.vmmproto)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from virtkit.records import UntrustedInput
from virtkit.service import vmmproto
from virtkit.service.model import VmDefinition
from virtkit.service.vmmproto import (
    ExitReport,
    OkReply,
    StatsReply,
    StatusReply,
    VmmUnresponsive,
    parse_exit_report,
    parse_launch_line,
    read_bounded,
    read_exit_report,
    request,
)

GOOD = {"reason": "debug-exit", "exit_status": 1, "detail": "guest wrote 0x0", "crash": False, "ended": 1.0}


def test_a_valid_report_is_a_record() -> None:
    assert parse_exit_report(json.dumps(GOOD).encode(), "r") == ExitReport(
        "debug-exit", 1, "guest wrote 0x0", False, 1.0
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"[1, 2]", "JSON array, not an object"),
        (b"[" * 200_000, "more than the"),  # refused by its size before its depth is looked at
        (b"[" * 10_000, "nested more than"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        (b"x" * (vmmproto.MAX_REPORT + 1), "more than the"),
        (b'{"reason": 5, "exit_status": 1}', "reason must be one of"),
        (json.dumps({**GOOD, "reason": "made-up"}).encode(), "reason must be one of"),
        (json.dumps({**GOOD, "exit_status": 10**400}).encode(), "exit_status is"),
        (json.dumps({**GOOD, "exit_status": "1"}).encode(), "must be an integer"),
        (json.dumps({**GOOD, "crash": 1}).encode(), "must be true or false"),
        (json.dumps({**GOOD, "extra": 1}).encode(), "unknown field"),
        (json.dumps({**GOOD, "detail": "x" * 5000}).encode(), "longer than 4000"),
        (b'{"reason": "stopped", "exit_status": NaN}', "not valid JSON"),
    ],
)
def test_every_other_report_is_refused_in_one_line(data: bytes, message: str) -> None:
    with pytest.raises(UntrustedInput) as e:
        parse_exit_report(data, "the exit report of vm1")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_reading_a_report_from_disk(tmp_path: Path) -> None:
    p = tmp_path / "exit.json"
    assert read_exit_report(str(p), "r") is None  # never written
    p.write_bytes(b"")
    assert read_exit_report(str(p), "r") is None  # opened, never written: no report
    p.write_bytes(json.dumps(GOOD).encode())
    assert read_exit_report(str(p), "r") == parse_exit_report(json.dumps(GOOD).encode(), "r")
    p.write_bytes(b"{" * (64 << 20 >> 4))  # huge: only the cap is read
    with pytest.raises(UntrustedInput, match="more than the"):
        read_exit_report(str(p), "r")


def test_links_fifos_and_devices_are_never_opened_for_reading(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_text("secret")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(UntrustedInput, match="symbolic link"):
        read_bounded(str(link), 0, 100)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(UntrustedInput, match="not a regular file"):
        read_bounded(str(fifo), 0, 100)  # O_NONBLOCK: no writer, no wait
    assert time.monotonic() - t0 < 5
    with pytest.raises(UntrustedInput, match="not a regular file"):
        read_bounded("/dev/zero", 0, 100)
    with pytest.raises(UntrustedInput, match="not a regular file"):
        read_exit_report(str(fifo), "r")


def test_bounded_reads_from_an_offset_and_the_end(tmp_path: Path) -> None:
    p = tmp_path / "log"
    p.write_bytes(b"0123456789")
    assert read_bounded(str(p), 3, 4) == b"3456"
    assert read_bounded(str(p), 0, 3, from_end=True) == b"789"
    assert read_bounded(str(p), 100, 4) == b""


def test_the_launch_line() -> None:
    assert parse_launch_line(b'{"pid": 1234}\n', "l").pid == 1234
    for bad in (b"", b"garbage", b'{"pid": 1}', b'{"pid": "12"}', b'{"pid": 12, "x": 1}', b"[" * 300):
        with pytest.raises(UntrustedInput):
            parse_launch_line(bad, "l")


# --- the control client against a misbehaving server -----------------------------------------------

Behaviour = Callable[[socket.socket], None]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Callable[[Behaviour], str]]:
    socks: list[socket.socket] = []
    stop = threading.Event()

    def start(behave: Behaviour) -> str:
        path = str(tmp_path / f"c{len(socks)}.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(4)
        socks.append(s)

        def loop() -> None:
            while not stop.is_set():
                try:
                    conn, _ = s.accept()
                except OSError:
                    return
                with conn:
                    try:
                        conn.recv(65536)
                        behave(conn)
                    except OSError:
                        pass

        threading.Thread(target=loop, daemon=True).start()
        return path

    yield start
    stop.set()
    for s in socks:
        s.close()


def _endless(conn: socket.socket) -> None:
    chunk = b"x" * 65536
    for _ in range(20_000):  # 1.3 GB at most: the client stops long before
        conn.sendall(chunk)


def _slow(conn: socket.socket) -> None:
    for _ in range(30):
        conn.sendall(b"{")
        time.sleep(0.5)


def _silent(conn: socket.socket) -> None:
    time.sleep(10)


def _close(conn: socket.socket) -> None:
    pass


def _reply(value: object) -> Behaviour:
    def send(conn: socket.socket) -> None:
        conn.sendall(json.dumps(value).encode() + b"\n")

    return send


@pytest.mark.parametrize(
    ("behave", "message"),
    [
        (_endless, "longer than"),
        (_slow, "did not answer within"),
        (_silent, "did not answer within"),
        (_close, "closed the control connection"),
        (_reply([1]), "not an object"),
        (_reply({"ok": True, "stats": {"exits": {"io": "many"}}}), "must be an integer"),
        (_reply({"ok": True, "stats": {"exits": {'a"b\n': 1}}}), "not a plain name"),
        (_reply({"ok": True, "stats": {"total_exits": 10**30}}), "total_exits is"),
        (_reply({"ok": True, "stats": []}), "must be an object"),
        (_reply({"ok": False, "error": "x" * 10_000}), "refused"),
    ],
)
def test_a_stats_request_ends_in_time_with_one_line(
    server: Callable[[Behaviour], str], behave: Behaviour, message: str
) -> None:
    path = server(behave)
    t0 = time.monotonic()
    with pytest.raises(VmmUnresponsive) as e:
        request(path, {"op": "stats"}, StatsReply, deadline=1.5, max_reply=200_000)
    assert time.monotonic() - t0 < 1.5 + 3  # the deadline is for the whole request, not each recv
    assert message in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 600


def test_a_good_reply_is_a_record_with_the_peer_pid(server: Callable[[Behaviour], str]) -> None:
    path = server(
        _reply(
            {
                "ok": True,
                "name": "a",
                "instance": "abc",
                "state": "running",
                "vcpus": 1,
                "memory": 1 << 26,
                "started": 1.0,
            }
        )
    )
    reply, pid = request(path, {"op": "status"}, StatusReply)
    assert reply.instance == "abc" and pid == os.getpid()
    path = server(_reply({"ok": False, "error": "no"}))
    ok, _ = request(path, {"op": "console-write"}, OkReply)
    assert not ok.ok and ok.error == "no"


def test_no_socket_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(VmmUnresponsive, match="cannot be reached"):
        request(str(tmp_path / "none.sock"), {"op": "status"}, StatusReply)


# --- the monitor survives any one VM's end ---------------------------------------------------------


def _svc(tmp_path: Path) -> object:
    from virtkit.service.daemon import Service

    return Service(str(tmp_path / "state"), str(tmp_path / "run"), use_cgroups=False)


def _watch_child(svc: object, name: str, seconds: float) -> int:
    import subprocess

    from virtkit.service.daemon import VmRuntime

    proc = subprocess.Popen(["sleep", str(seconds)])
    svc.store.insert(name, VmDefinition(name=name, kernel="/k", memory_mib=2))  # type: ignore[attr-defined]
    svc.store.update(name, state="running", pid=proc.pid)  # type: ignore[attr-defined]
    svc.runtimes[name] = VmRuntime(name, proc.pid, os.pidfd_open(proc.pid), "i", child=True)  # type: ignore[attr-defined]
    os.write(svc._wake_w, b"x")  # type: ignore[attr-defined]
    return proc.pid


def _wait(cond: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_vm_whose_end_cannot_be_recorded_is_failed_and_the_monitor_goes_on(tmp_path: Path) -> None:
    svc = _svc(tmp_path)
    real_record = svc._record_end  # type: ignore[attr-defined]

    def record(name: str, info: object, **kw: object) -> None:
        if name == "bad":
            raise RuntimeError("boom")
        real_record(name, info, **kw)

    svc._record_end = record  # type: ignore[attr-defined]
    svc._monitor.start()  # type: ignore[attr-defined]
    try:
        (tmp_path / "state" / "vms" / "bad").mkdir()
        (tmp_path / "state" / "vms" / "bad" / "exit.json").write_bytes(b"[" * 200_000)
        _watch_child(svc, "bad", 0)
        _wait(lambda: svc.store.get("bad").state == "failed")  # type: ignore[attr-defined]
        assert "boom" in svc.store.get("bad").last_exit.detail  # type: ignore[attr-defined]
        assert "bad" not in svc.runtimes  # type: ignore[attr-defined]
        (tmp_path / "state" / "vms" / "good").mkdir()
        _watch_child(svc, "good", 0.1)
        _wait(lambda: svc.store.get("good").state == "failed")  # type: ignore[attr-defined]
        assert svc.store.get("good").last_exit.reason == "vmm-error"  # type: ignore[attr-defined]
        assert svc._monitor.is_alive()  # type: ignore[attr-defined]
    finally:
        svc.close()  # type: ignore[attr-defined]


def test_reattach_survives_any_exit_report(tmp_path: Path) -> None:
    svc = _svc(tmp_path)
    try:
        for i, content in enumerate([b"[1]", b"[" * 200_000, bytes(range(256)), b"x" * (1 << 20)]):
            name = f"vm{i}"
            definition = VmDefinition(name=name, kernel="/k", memory_mib=2, restart="on-failure")
            svc.store.insert(name, definition)  # type: ignore[attr-defined]
            svc.store.update(name, state="running", instance="dead")  # type: ignore[attr-defined]
            (tmp_path / "state" / "vms" / name).mkdir()
            (tmp_path / "state" / "vms" / name / "exit.json").write_bytes(content)
        svc.reattach()  # type: ignore[attr-defined]
        for rec in svc.store.all():  # type: ignore[attr-defined]
            assert rec.last_exit.reason == "bad-exit-report", rec
            assert "(while the service was down)" in rec.last_exit.detail
    finally:
        for t in list(svc.timers.values()):  # type: ignore[attr-defined]
            t.cancel()
        svc.close()  # type: ignore[attr-defined]


# --- the stats reply carries what `virtkit run --stats` prints ---------------------------------------


def test_run_stats_cross_to_the_service_with_boot_protocol_and_completions() -> None:
    """A VMM's stats (RunStats.to_dict, as Vmm.stats sends it) parse into VmmStats with the boot
    protocol and the CPL0 completion counts, and `virtkit vm stats` prints both."""
    from virtkit.cli.service import format_stats
    from virtkit.records import load_object, parse
    from virtkit.service.model import VmStats
    from virtkit.stats import RunStats

    run = RunStats(wall_s=2.0)
    run.exits = {"io": 10}
    run.boot_protocol = "linux (bzImage, boot protocol 2.15)"
    run.completed = {"int3": 1, "stac": 40, "clac": 40}
    wire = json.dumps({"ok": True, "stats": run.to_dict()}).encode()
    reply = parse(StatsReply, load_object(wire, what="reply", max_bytes=1 << 20), what="reply")
    assert reply.stats.boot_protocol == "linux (bzImage, boot protocol 2.15)"
    assert reply.stats.completed == {"clac": 40, "int3": 1, "stac": 40}
    text = format_stats(VmStats(name="vm", state="running", pid=7, memory_bytes=1 << 20, vmm=reply.stats))
    assert "boot protocol   linux (bzImage, boot protocol 2.15)" in text
    assert "CPL0 completed  clac 40, stac 40, int3 1" in text


@pytest.mark.parametrize(
    "stats",
    [
        {"boot_protocol": "linux\nforged line"},
        {"boot_protocol": "x" * 121},
        {"completed": {"int3": -1}},
        {"completed": {'a"b': 1}},
        {"completed": {f"k{i}": 1 for i in range(65)}},
    ],
)
def test_hostile_boot_protocol_and_completions_are_refused(stats: dict[str, object]) -> None:
    from virtkit.records import load_object, parse

    wire = json.dumps({"ok": True, "stats": stats}).encode()
    with pytest.raises(UntrustedInput):
        parse(StatsReply, load_object(wire, what="reply", max_bytes=1 << 20), what="reply")


def test_an_exit_report_may_carry_every_stop_reason() -> None:
    """vmmproto's list of reasons is StopReason's values (checked at import): output-closed too."""
    from virtkit.stop import StopReason

    for reason in StopReason:
        assert parse_exit_report(json.dumps({**GOOD, "reason": reason.value}).encode(), "r").reason == reason.value
