"""The failover commands as a user drives them: a running VM snapshotted from another process,
restored, checkpointed and restarted after its VMM is killed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fohelp import VIRTKIT, counts, file_counts, one_line_error, spawn, stop_process, virtkit, wait_for

from virtkit.migration.control import ControlError, request

pytestmark = pytest.mark.usefixtures("kvm")


def _pid(sock: Path) -> int | None:
    """The VMM serving ``sock``, or None while there is none (a stale socket counts as none)."""
    try:
        return int(request(str(sock), "status", timeout=2)["pid"])
    except ControlError:
        return None


def test_snapshot_a_running_vm_through_its_control_socket(counter: Path, tmp_path: Path) -> None:
    sock, log, snap = tmp_path / "vm.sock", tmp_path / "serial.log", tmp_path / "snap"
    vmm = spawn("run", str(counter), "--cmdline", "us=500", "--control", str(sock), "--serial", str(log))
    try:
        wait_for(lambda: len(file_counts(log)) >= 10 and sock.exists(), what="the VM to run")
        p = virtkit("snapshot", "--control", str(sock), str(snap), "--json")
        assert p.returncode == 0, p.stderr
        reply = json.loads(p.stdout)
        assert reply["dir"] == str(snap) and reply["memory_bytes"] == 64 << 20
        assert request(str(sock), "status")["state"] == "running"  # resumed after the snapshot
        at = len(file_counts(log))
        wait_for(lambda: len(file_counts(log)) > at + 5, what="the VM to run on")
        request(str(sock), "stop")
        _, err = vmm.communicate(timeout=10)
        assert vmm.returncode == 130 and b"stopped through the control socket" in err
        assert not sock.exists()  # the socket is removed when the VMM ends
    finally:
        stop_process(vmm)
    info = json.loads(virtkit("snapshot-info", str(snap)).stdout)
    assert info["format_version"] == 1 and info["devices"] == ["i8042", "post", "rtc", "uart0"]
    p = virtkit("restore", str(snap), "--timeout", "0.5")
    assert p.returncode == 124, p.stderr
    # the restored VM picks up exactly where the snapshot was taken
    restored = counts(p.stdout.encode().replace(b"\n", b"\r\n").replace(b"\r\r", b"\r"))
    assert restored and restored == list(range(restored[0], restored[0] + len(restored)))
    assert restored[0] <= max(file_counts(log)) + 1


def test_control_socket_errors(counter: Path, tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"
    one_line_error(virtkit("snapshot", "--control", str(sock), str(tmp_path / "s")), "no control socket at")
    vmm = spawn("run", str(counter), "--control", str(sock), "--serial", "none")
    try:
        wait_for(sock.exists, what="the control socket")
        second = virtkit("run", str(counter), "--control", str(sock), "--serial", "none", "--timeout", "5")
        one_line_error(second, "is in use by a running virtkit")
        with pytest.raises(ControlError, match="unknown command 'frobnicate'"):
            request(str(sock), "frobnicate")
        with pytest.raises(ControlError, match="snapshot needs"):
            request(str(sock), "snapshot")
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
    finally:
        stop_process(vmm)


def test_checkpoint_restart_after_the_vmm_is_killed(counter: Path, tmp_path: Path) -> None:
    sock, ckpt, log = tmp_path / "vm.sock", tmp_path / "ckpt", tmp_path / "serial.log"
    sup = subprocess.Popen(
        [
            *VIRTKIT,
            "run",
            str(counter),
            "--cmdline",
            "us=500",
            "--serial",
            str(log),
            "--control",
            str(sock),
            "--checkpoint-every",
            "200ms",
            "--checkpoint-dir",
            str(ckpt),
            "--restart",
            "on-failure",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: (ckpt / "vm.state").exists() and sock.exists(), what="a first checkpoint")
        vmm_pid = request(str(sock), "status")["pid"]
        assert vmm_pid != sup.pid  # the VMM is the supervisor's child
        before = log.read_bytes()
        os.kill(vmm_pid, signal.SIGKILL)
        wait_for(lambda: _pid(sock) not in (None, vmm_pid), what="the restart")
        wait_for(lambda: len(file_counts(log)) > len(counts(before)) + 20, what="output after the restart")
        request(str(sock), "stop")
        _, err = sup.communicate(timeout=10)
    finally:
        stop_process(sup)
    assert b"was killed by signal 9 (SIGKILL); resuming the VM from its checkpoint" in err, err
    values = _spliced_counts(log.read_bytes())
    # one counter, no reboot: after the restart it resumes from the checkpoint, so the lines printed
    # between the checkpoint and the kill repeat (none, if the kill came right after a checkpoint),
    # and it counts on by one: at most one step back, never a gap, never back to 1
    assert values[0] == 1
    assert values.count(1) == 1, values  # never back to 1: no reboot
    assert values.count(None) <= 1, values  # one kill, one spliced line at most
    cut = values.index(None) if None in values else -1
    candidates: list[list[int]] = [[v for v in values if v is not None]]  # the spliced line dropped (a repeat)...
    if cut > 0:  # ...or read as the line it replaced (no repeat)
        candidates.append([*values[:cut], values[cut - 1] + 1, *values[cut + 1 :]])  # type: ignore[operator]
    assert any(
        _resumes_once(c) or any(_resumes_once(c[:j] + c[j + 1 :]) for j in _wrong_numbers(c)) for c in candidates
    ), values


def _spliced_counts(data: bytes) -> list[int | None]:
    """Counter values of a log that a SIGKILL spliced, None for a line that is not one. The bytes
    the killed VMM sent after the last checkpoint are sent again by the resumed guest, so the line
    cut by the kill reads as a prefix of one line joined to the rest of another ("counnt 503",
    "count 5519"): garbled, or a plausible number that is wrong."""
    out: list[int | None] = []
    for line in data.split(b"\n")[:-1]:  # the last line may still be being printed
        m = re.fullmatch(rb"count (\d+)\r*", line)
        if m:
            out.append(int(m.group(1)))
        elif not line.startswith(b"counter:"):
            out.append(None)
    return out


def _wrong_numbers(values: list[int]) -> list[int]:
    """Indexes of lines that may be the spliced one read as a wrong number ("count 5519"): inside
    the log (never the last line, which would hide a gap) and not the next number after the one
    before it."""
    return [j for j in range(1, len(values) - 1) if values[j] != values[j - 1] + 1]


def _steps(values: list[int]) -> list[int]:
    return [i for i in range(1, len(values)) if values[i] != values[i - 1] + 1]


def _resumes_once(values: list[int]) -> bool:
    """At most one step back (to the checkpoint), never a gap, never back to 1. The caller also
    accepts one line removed: the kill can cut a line, whose start then joins the checkpoint's
    own cut line into one garbled number."""
    steps = _steps(values)
    return len(steps) <= 1 and all(1 < values[i] <= values[i - 1] for i in steps)


def test_restart_needs_no_checkpoint_dir_and_ends_with_the_guest(guests: Path) -> None:
    start = time.monotonic()
    p = virtkit("run", str(guests / "hello.elf"), "--cmdline", "exit=3", "--restart", "on-failure")
    assert p.returncode == 7, p.stderr  # (3 << 1) | 1, as without the supervisor
    assert "hello from virtkit guest" in p.stdout
    assert time.monotonic() - start < 30


def test_clone_command(counter: Path, tmp_path: Path) -> None:
    from fohelp import assert_seamless

    from virtkit import VM, snapshot

    with VM(counter, cmdline="us=500") as vm:
        vm.start()
        wait_for(lambda: len(counts(vm.console.output)) >= 10)
        snapshot.save(vm, tmp_path / "snap", resume=False)
        before = vm.console.output
    p = virtkit(
        "clone",
        str(tmp_path / "snap"),
        "--count",
        "3",
        "--serial-dir",
        str(tmp_path / "logs"),
        "--timeout",
        "0.5",
        "--json",
    )
    assert p.returncode == 124, p.stderr  # every clone ran until the timeout stopped it
    result = json.loads(p.stdout)
    assert result["count"] == 3 and result["exit_codes"] == [124, 124, 124]
    for i in range(3):
        assert_seamless(before, (tmp_path / "logs" / f"clone-{i}.log").read_bytes(), first=1)
