"""A confined VMM runs its guest and can do nothing else: each layer of the jail shown on its own.

The VMM is run in the foreground (``--wait``), as the service would start it but with a test hook
(``--probe``) that makes it try a forbidden thing right after its guest started. Under the full
jail seccomp kills it (SIGSYS, status 159) or, for path lookups, refuses with EACCES; with
seccomp off (``--no-seccomp``) the namespaces, empty root, rlimits and dropped credentials still
stop every attempt, each with its own error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kvm, pytest.mark.root]

SIGSYS_STATUS = 128 + signal.SIGSYS
STOPPED_STATUS = 130  # the probe stops the VM when it survives


@pytest.fixture
def vmdir(tmp_path: Path, guests: Path, kvm: None) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces, pivot_root, setuid")
    return tmp_path


def define(vmdir: Path, kernel: Path, **extra: object) -> None:
    d = {
        "name": "jailtest",
        "instance": "0",
        "kernel": str(kernel),
        "memory": 64 << 20,
        "vcpus": 1,
        "cmdline": "",
        "jail": {"uid": 299999, "gid": 299999},
    }
    d.update(extra)
    (vmdir / "definition.json").write_text(json.dumps(d))


def vmm(vmdir: Path, *flags: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "virtkit.service.vmm", "--dir", str(vmdir), "--wait", *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_confined_vmm_runs_its_guest(vmdir: Path, guests: Path) -> None:
    define(vmdir, guests / "hello.elf")
    r = vmm(vmdir)
    assert r.returncode == 1, r.stderr  # debug-exit value 0 -> (0 << 1) | 1
    assert "hello from virtkit guest" in (vmdir / "serial.log").read_text()
    report = json.loads((vmdir / "exit.json").read_text())
    assert report["reason"] == "debug-exit" and report["exit_status"] == 1


def test_guest_crash_is_reported_from_inside_the_jail(vmdir: Path, guests: Path) -> None:
    define(vmdir, guests / "triplefault.elf")
    r = vmm(vmdir)
    assert r.returncode == 125, r.stderr
    report = json.loads((vmdir / "exit.json").read_text())
    assert report["reason"] == "triple-fault" and report["crash"] and "RIP" in report["detail"]


@pytest.mark.parametrize("probe", ["socket-inet", "socket-unix", "exec", "fork", "ptrace", "host-processes"])
def test_seccomp_kills_a_vmm_that_steps_outside_its_allow_list(vmdir: Path, guests: Path, probe: str) -> None:
    define(vmdir, guests / "counter.elf")
    r = vmm(vmdir, "--probe", probe)
    assert r.returncode == SIGSYS_STATUS, (r.returncode, r.stderr)
    assert f"probe {probe}:" not in r.stderr  # it never got to report a result


def test_host_files_cannot_be_opened(vmdir: Path, guests: Path) -> None:
    define(vmdir, guests / "counter.elf")
    r = vmm(vmdir, "--probe", "open-host-file")
    assert r.returncode == STOPPED_STATUS, r.stderr
    assert "probe open-host-file: denied: Permission denied" in r.stderr  # seccomp: EACCES


@pytest.mark.parametrize(
    ("probe", "outcome"),
    [
        ("open-host-file", "denied: No such file or directory"),  # empty root: /etc/passwd is not there
        ("exec", "denied: No such file or directory"),  # nor is /bin/true
        ("socket-inet", "denied: Network is unreachable"),  # own network namespace: no interface up
        ("fork", "denied: Resource temporarily unavailable"),  # RLIMIT_NPROC of the VM's own uid
        ("host-processes", "can see 0 other processes"),  # own PID namespace: nothing else is visible
        ("ptrace", "ptrace returned -1"),  # no CAP_SYS_PTRACE, and PID 1 is itself
    ],
)
def test_each_other_layer_stops_it_without_seccomp(vmdir: Path, guests: Path, probe: str, outcome: str) -> None:
    define(vmdir, guests / "counter.elf")
    r = vmm(vmdir, "--no-seccomp", "--probe", probe)
    assert r.returncode == STOPPED_STATUS, (r.returncode, r.stderr)
    assert f"probe {probe}: {outcome}" in r.stderr


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def test_a_running_vmm_is_confined(vmdir: Path, guests: Path) -> None:
    define(vmdir, guests / "counter.elf")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "virtkit.service.vmm", "--dir", str(vmdir), "--wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert launcher.stdout is not None
        pid = json.loads(launcher.stdout.readline())["pid"]
        deadline = time.monotonic() + 20
        # the filter goes on in the main thread first, the guest's threads start after it: wait for
        # both (on a busy machine the threads may lag the filter by a while)
        while (
            _status(pid).get("Seccomp") != "2" or int(_status(pid).get("Threads", "0")) < 3
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
        st = _status(pid)
        assert st["Seccomp"] == "2"  # filter mode
        assert st["NoNewPrivs"] == "1"
        assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == int(st["CapBnd"], 16) == 0
        assert st["Uid"].split() == ["299999"] * 4 and st["Gid"].split() == ["299999"] * 4
        assert st["NSpid"].split()[-1] == "1"  # PID 1 of its own PID namespace
        for ns in ("mnt", "pid", "net", "ipc", "uts"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        assert int(st["Threads"]) >= 3  # vCPU, watchdog, control
        for task in os.listdir(f"/proc/{pid}/task"):  # each of them runs under the filter too
            with open(f"/proc/{pid}/task/{task}/status") as f:
                assert "Seccomp:\t2" in f.read(), task
    finally:
        launcher.send_signal(signal.SIGTERM)  # forwarded: the VMM stops its guest and exits
        assert launcher.wait(timeout=20) == STOPPED_STATUS
        launcher.stdout.close()  # type: ignore[union-attr]
        launcher.stderr.close()  # type: ignore[union-attr]


def test_a_para_vmm_has_no_spare_thread_either(vmdir: Path, guests: Path) -> None:
    """Para mode runs one more thread (virtio's I/O thread); its limit grows by exactly that one."""
    define(vmdir, guests / "spin.elf", mode="para", cmdline="cpl=3")
    r = vmm(vmdir, "--no-seccomp", "--probe", "fork")
    assert r.returncode == STOPPED_STATUS, (r.returncode, r.stderr)
    assert "probe fork: denied: Resource temporarily unavailable" in r.stderr


def test_a_para_vmm_runs_its_virtio_guest_under_the_filter(vmdir: Path, guests: Path) -> None:
    define(vmdir, guests / "parawork.elf", mode="para", cmdline="work=console,null,cpu bytes=65536 n=1000 loop=1000")
    r = vmm(vmdir)
    assert r.returncode == 1, (r.returncode, r.stderr)  # debug-exit 0, not 159 (SIGSYS)
    assert "work=console mode=para via=virtio" in (vmdir / "serial.log").read_text()


@pytest.mark.parametrize(
    ("guest", "mode", "cmdline", "line"),
    [
        ("parawork.elf", "para", "work=disk sectors=64 irq=1", "work=disk mode=para via=virtio"),  # blk, irqfd
        ("parawork.elf", "para", "work=disk via=hcall sectors=64", "work=disk mode=para via=hcall"),
        ("fullwork.elf", "full", "work=disk sectors=64", "work=disk mode=full"),  # ATA PIO
    ],
)
def test_disk_guests_run_under_the_filter(
    vmdir: Path, guests: Path, guest: str, mode: str, cmdline: str, line: str
) -> None:
    """The service's API has no disks yet; its VMM has. Every disk path under the real filter."""
    disk = vmdir / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    define(vmdir, guests / guest, mode=mode, cmdline=cmdline, disks=[{"path": str(disk)}])
    r = vmm(vmdir)
    assert r.returncode == 1, (r.returncode, r.stderr)  # debug-exit 0: every check of the guest passed
    out = (vmdir / "serial.log").read_text()
    assert line in out and " ok" in out, out[-500:]
