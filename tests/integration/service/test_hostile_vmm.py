"""virtkitd against VMMs whose guest took them over (``hostile_vmm.py``: built and confined like the
real VMM, then misbehaving in one chosen way). For each: the service stays up, keeps serving a
well-behaved VM next to it, records the bad VM's end in one line, and can always kill and delete
it within a deadline; and a restarted service starts whatever the bad VMM left behind."""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from virtkit.service.client import ApiError

from .conftest import vmm_pids

pytestmark = [pytest.mark.kvm, pytest.mark.root]

HERE = Path(__file__).resolve().parent
#: what one API call may take at most, whatever a VMM does (stats and console: 2-5 s deadlines;
#: stop: its 10 s grace, then a kill)
CALL_DEADLINE = 30.0


@pytest.fixture
def hd(daemon_factory: Any) -> Any:
    return daemon_factory("--vmm-module", "hostile_vmm", "--backoff", "0.05", env={"PYTHONPATH": str(HERE)})


def _good_neighbour(d: Any, guests: Path) -> None:
    d.create("good", guests / "counter.elf", start=True)
    d.wait_output("good", "count 1")


def _still_serves(d: Any) -> None:
    """The service answers, and the well-behaved VM's VMM answers through it."""
    deadline = time.monotonic() + 20
    while True:
        st = d.call("GET", "/v1/vms/good/stats")
        if (st["vmm"] or {}).get("total_exits", 0) > 0:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.1)
    assert d.vm("good")["state"] == "running"
    assert d.proc.poll() is None, d.log()


def _timed(fn: Any, *args: Any) -> Any:
    t0 = time.monotonic()
    out = fn(*args)
    assert time.monotonic() - t0 < CALL_DEADLINE, fn
    return out


def _one_line(text: str) -> None:
    assert text and "\n" not in text and len(text) <= 2000, text


@pytest.mark.parametrize("mode", ["report-array", "report-deep", "report-huge", "report-binary", "report-wrong-types"])
def test_an_unreadable_exit_report_is_a_crash_and_the_monitor_goes_on(hd: Any, guests: Path, mode: str) -> None:
    d = hd
    _good_neighbour(d, guests)
    d.create("bad", guests / "counter.elf", cmdline=f"hostile={mode}", start=True)
    rec = d.wait_state("bad", ("failed",))
    end = rec["last_exit"]
    assert end["reason"] == "bad-exit-report" and end["crash"], end
    assert end["detail"].startswith("the VMM wrote an unreadable exit report: "), end
    _one_line(end["detail"])
    _still_serves(d)
    # the monitor is alive: another VM's end is still noticed
    d.create("next", guests / "hello.elf", start=True)
    assert d.wait_state("next", ("stopped",))["last_exit"]["reason"] == "debug-exit"
    _timed(d.call, "DELETE", "/v1/vms/bad")
    assert d.call("GET", "/v1/host")["vcpus_used"] == 1  # only good's reservation is held


def test_a_vmm_that_exits_at_once_is_a_crash(hd: Any, guests: Path) -> None:
    d = hd
    d.create("bad", guests / "counter.elf", cmdline="hostile=exit-at-once", start=True)
    end = d.wait_state("bad", ("failed",))["last_exit"]
    assert end["reason"] == "vmm-error" and "without an exit report" in end["detail"], end


def test_restart_on_failure_with_a_poisoned_report_restarts_and_can_be_killed(hd: Any, guests: Path) -> None:
    d = hd
    _good_neighbour(d, guests)
    d.create("bad", guests / "counter.elf", cmdline="hostile=report-deep", restart="on-failure", start=True)
    deadline = time.monotonic() + 60
    while d.vm("bad")["restarts"] < 3:
        assert time.monotonic() < deadline, d.call("GET", "/v1/vms/bad/events")
        time.sleep(0.05)
    events = d.call("GET", "/v1/vms/bad/events")
    failed = [e["detail"] for e in events if e["kind"] == "failed"]
    assert len(failed) >= 3 and all("unreadable exit report" in f for f in failed), failed
    rec = _timed(d.call, "POST", "/v1/vms/bad/kill")  # running or waiting to restart: it ends
    assert d.wait_state("bad", ("stopped",))["state"] == "stopped", rec
    _timed(d.call, "DELETE", "/v1/vms/bad?force=true")
    _still_serves(d)
    assert len(vmm_pids(d.state_dir)) == 1


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.parametrize("mode", ["reply-endless", "reply-slow", "reply-wrong", "reply-never", "reply-close"])
def test_a_vmm_that_answers_badly_cannot_hang_or_bloat_the_service(hd: Any, guests: Path, mode: str) -> None:
    d = hd
    _good_neighbour(d, guests)
    d.create("bad", guests / "counter.elf", cmdline=f"hostile={mode}", start=True)
    d.wait_output("bad", "count 1")
    st = _timed(d.call, "GET", "/v1/vms/bad/stats")
    assert st["vmm"] is None and st["state"] == "running", st
    _one_line(st["vmm_error"])
    with pytest.raises(ApiError) as e:
        _timed(d.call, "POST", "/v1/vms/bad/console", {"data": "x"})
    assert e.value.status == 409
    _one_line(str(e.value))
    assert "virtkit_vm_up" in _timed(d.call, "GET", "/metrics")
    _still_serves(d)
    assert _rss_mib(d.proc.pid) < 200, _rss_mib(d.proc.pid)
    # a stop that the VMM ignores or stalls, and a kill and a forced delete meanwhile: the VM's lock
    # is never held across its VMM's I/O, so neither waits for the stop
    stopped: list[Any] = []
    stopper = threading.Thread(target=lambda: stopped.append(d.call("POST", "/v1/vms/bad/stop")))
    stopper.start()
    time.sleep(0.5)
    pid = d.vm("bad")["pid"]
    t0 = time.monotonic()
    try:
        d.call("POST", "/v1/vms/bad/kill")
    except ApiError as err:
        assert err.status == 409  # the stop's own kill came first
    assert time.monotonic() - t0 < 15
    stopper.join(CALL_DEADLINE)
    assert not stopper.is_alive()
    assert stopped and stopped[0]["state"] == "stopped", stopped
    assert pid not in vmm_pids(d.state_dir)
    _timed(d.call, "DELETE", "/v1/vms/bad?force=true")
    _still_serves(d)


@pytest.mark.parametrize("mode", ["reply-never", "reply-endless"])
def test_a_forced_delete_of_a_stalling_vmm_is_prompt(hd: Any, guests: Path, mode: str) -> None:
    d = hd
    d.create("bad", guests / "counter.elf", cmdline=f"hostile={mode}", start=True)
    d.wait_output("bad", "count 1")
    threading.Thread(target=lambda: d.client.request("GET", "/v1/vms/bad/stats"), daemon=True).start()
    t0 = time.monotonic()
    _timed(d.call, "DELETE", "/v1/vms/bad?force=true")
    assert time.monotonic() - t0 < 15
    assert d.call("GET", "/v1/vms") == [] and vmm_pids(d.state_dir) == []


@pytest.mark.parametrize(
    "mode", ["report-deep-linger", "report-binary-linger", "reply-wrong", "reply-never", "reply-endless"]
)
def test_virtkitd_starts_whatever_a_vmm_left_behind(hd: Any, guests: Path, mode: str) -> None:
    """The service is down while a bad VMM writes its report (and dies) or while it answers the
    re-attach probe badly: the service starts, records the VM's end, and nothing is left running."""
    d = hd
    d.create("bad", guests / "counter.elf", cmdline=f"hostile={mode}", start=True)
    d.wait_output("bad", "count 1")
    pid = d.vm("bad")["pid"]
    d.stop(signal.SIGKILL)
    if mode.endswith("-linger"):
        os.kill(pid, signal.SIGKILL)  # its poisoned report is its last word
    d.start()
    rec = d.wait_state("bad", ("failed",))
    assert "while the service was down" in rec["last_exit"]["detail"], rec
    if mode.endswith("-linger"):
        assert rec["last_exit"]["reason"] == "bad-exit-report", rec
    deadline = time.monotonic() + 10
    while pid in vmm_pids(d.state_dir):  # one that answered badly was not taken for the VM's VMM
        assert time.monotonic() < deadline
        time.sleep(0.05)
    d.create("after", guests / "hello.elf", start=True)
    assert d.wait_state("after", ("stopped",))["last_exit"]["reason"] == "debug-exit"
    d.stop()
    d.start()  # and again, with the failed record in place
    assert d.vm("bad")["state"] == "failed"


def test_a_huge_binary_serial_log_is_served_bounded(hd: Any, guests: Path) -> None:
    d = hd
    d.create("bad", guests / "counter.elf", cmdline="hostile=log-garbage", start=True)
    deadline = time.monotonic() + 30
    while "count 1" not in d.call("GET", f"/v1/vms/bad/logs?offset={2 << 20}")["data"]:  # after the garbage
        assert time.monotonic() < deadline
        time.sleep(0.1)
    out = _timed(d.call, "GET", "/v1/vms/bad/logs?limit=1048576")
    assert out["next"] - out["offset"] == 1 << 20 and isinstance(out["data"], str)
    d.call("POST", "/v1/vms/bad/kill")


def test_the_vmm_cannot_touch_what_the_service_later_reads(hd: Any, guests: Path) -> None:
    """The VM's directory (exit report, serial log, definition) is root's alone: the VMM's uid can
    neither create nor replace a file there, so it cannot plant a link or a FIFO for the service.
    The database is 0600, the state and run directories 0700."""
    d = hd
    d.create("vm", guests / "counter.elf", start=True)
    d.wait_output("vm", "count 1")
    pid = d.vm("vm")["pid"]
    vmm_uid = os.stat(f"/proc/{pid}").st_uid
    assert vmm_uid != 0
    vmdir = Path(d.state_dir, "vms", "vm")
    for p in (Path(d.state_dir), Path(d.state_dir, "vms"), vmdir, Path(d.run_dir)):
        st = p.stat()
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700, (p, oct(st.st_mode))
    for f in vmdir.iterdir():
        st = f.lstat()
        assert st.st_uid == 0 and stat.S_ISREG(st.st_mode) or stat.S_ISSOCK(st.st_mode), f
        assert st.st_mode & 0o002 == 0, f
    for f in Path(d.state_dir).glob("virtkitd.db*"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_looser_modes_left_by_an_older_service_are_tightened(daemon_factory: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "vms").mkdir(parents=True)
    state.chmod(0o755)
    (state / "vms").chmod(0o777)
    (state / "virtkitd.db").touch()
    (state / "virtkitd.db").chmod(0o644)
    d = daemon_factory()
    assert d.state_dir == str(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "vms").stat().st_mode) == 0o700
    for f in state.glob("virtkitd.db*"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    d.call("GET", "/v1/vms")
