"""`virtkit run` as a user meets it: exit statuses, one-line errors, signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("kvm")

VIRTKIT = [sys.executable, "-m", "virtkit"]


def virtkit(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VIRTKIT, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(p: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("virtkit: error:"), p.stderr
    assert fragment in lines[0]


def test_debug_exit_status_becomes_process_status(guests: Path) -> None:
    p = virtkit("run", str(guests / "hello.elf"), "--cmdline", "exit=5")
    assert p.returncode == 11
    assert "hello from virtkit guest" in p.stdout


def test_stats_table(guests: Path) -> None:
    p = virtkit("run", str(guests / "hello.elf"), "--stats")
    assert p.returncode == 1
    assert "VM exits" in p.stderr and "uart0" in p.stderr and "exits/s" in p.stderr


def test_serial_to_file(guests: Path, tmp_path: Path) -> None:
    out = tmp_path / "serial.log"
    p = virtkit("run", str(guests / "hello.elf"), "--serial", str(out))
    assert p.returncode == 1 and p.stdout == ""
    assert "hello from virtkit guest" in out.read_text()


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["/nonexistent/kernel"], "does not exist"),
        (["/etc/hostname"], "not an ELF file"),
        (["{hello}", "--memory", "0"], "must be positive"),
        (["{hello}", "--memory", "-1"], "not a size"),
        (["{hello}", "--memory", "12XB"], "not a size"),
        (["{hello}", "--memory", "100T"], "more than this host has"),
        (["{hello}", "--memory", "1M"], "too small"),
        (["{hello}", "--vcpus", "0"], "at least 1"),
        (["{hello}", "--vcpus", "100000"], "KVM on this host allows"),
        (["{hello}", "--vcpus", "two"], "not a whole number"),
        (["{hello}", "--timeout", "-3"], "--timeout must be positive"),
        (["{hello}", "--serial", "/nonexistent/dir/log"], "cannot open serial output file"),
        (["{hello}", "--module", "/nonexistent/mod"], "module /nonexistent/mod does not exist"),
    ],
)
def test_bad_input_gets_one_line(guests: Path, args: list[str], fragment: str) -> None:
    args = [a.replace("{hello}", str(guests / "hello.elf")) for a in args]
    assert_one_line_error(virtkit("run", *args), fragment)


def test_elf_without_multiboot_header(guests: Path, tmp_path: Path) -> None:
    # an ELF32 executable that is not a kernel: the Python interpreter's own ELF may be 64-bit,
    # so take the guest build's 32-bit object code and strip the header by linking a plain file
    p = virtkit("run", "/bin/true", "--boot", "multiboot")
    assert_one_line_error(p, "no Multiboot header")


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_host_signals_stop_the_vm_cleanly(guests: Path, sig: int, status: int) -> None:
    proc = subprocess.Popen(
        [*VIRTKIT, "run", str(guests / "spin.elf"), "--cmdline", "cpl=3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a suite started in the background (`make test &`) inherits SIGINT
        # ignored, and an ignored signal stays ignored across exec
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        time.sleep(1.0)  # let it boot (not an assertion on time: any delay works)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:  # a failure must not leave a VMM spinning for the rest of the run
            proc.kill()
            proc.communicate()
    assert proc.returncode == status, err
    assert "Traceback" not in err
    assert "stopped by" in err


def test_doctor_names_the_flavor() -> None:
    p = virtkit("doctor")
    assert p.returncode == 0
    assert "KVM flavor" in p.stdout
    j = virtkit("doctor", "--json")
    import json

    info = json.loads(j.stdout)
    assert info["kvm_usable"] is True and info["kvm_flavor"] in ("pvm", "vmx", "svm", "unknown")
    # what a Linux guest will do on this host, in the text and the JSON alike
    assert info["linux_guests"] and f"Linux guests    {info['linux_guests']}" in p.stdout
    if info["kvm_flavor"] == "pvm":
        assert "SYSCALL" in info["linux_guests"]


@pytest.mark.parametrize("mode", ["full", "para"])
def test_a_reader_that_goes_away_ends_the_vm_quietly(guests: Path, mode: str) -> None:
    """`virtkit run guest | head -2`: a closed stdout is not a guest crash. The VM ends at once
    with the status a shell shows for SIGPIPE, and nothing is said on stderr."""
    p = subprocess.Popen(
        [*VIRTKIT, "run", str(guests / "counter.elf"), "--mode", mode, "--timeout", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert p.stdout is not None and p.stderr is not None
    first = p.stdout.readline()
    assert first.startswith(b"count"), first
    p.stdout.close()  # as `head -1` does once it has its line
    try:
        status = p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise AssertionError("the VM went on running after its reader went away") from None
    err = p.stderr.read().decode()
    p.stderr.close()
    assert status == 141, err
    assert err == ""
