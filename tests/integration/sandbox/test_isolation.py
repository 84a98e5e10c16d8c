"""The sandbox's walls: paths stay inside the root, exceptions become signals, and a hostile
program (random system calls, bad pointers, huge lengths) gets errors while the VMM stays up."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.sandbox.conftest import sandbox


def test_paths_cannot_leave_the_root(sandbox_root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("outside\n")
    links = sandbox_root / "data" / "links"
    links.mkdir(exist_ok=True)
    for name, target in (("abs", str(secret)), ("rel", "../../../../../../" + str(secret)), ("etc", "/etc/passwd")):
        if not (links / name).is_symlink():
            os.symlink(target, links / name)
    attempts = [
        str(secret),
        "/../../../../" + str(secret),
        "/data/links/abs",
        "/data/links/rel",
        "/proc/self/root" + str(secret),
        "/data/links/etc",
    ]
    for path in attempts:
        p = sandbox(sandbox_root, "--", "/bin/cat", path)
        assert p.returncode == 1, (path, p.stdout, p.stderr)
        assert b"outside" not in p.stdout and b"root:" not in p.stdout, path
    # the same names from a shell that cd's around
    p = sandbox(sandbox_root, "--", "/bin/sh", "-c", "cd /data/links && cd ../../../.. && pwd && ls")
    assert p.stdout.split()[0] == b"/"
    assert b"bin" in p.stdout and os.fsencode(tmp_path.name) not in p.stdout


def test_exceptions_become_signals(progs: Path) -> None:
    assert sandbox(progs, "--", "/crash", "segv").returncode == 128 + 11
    assert sandbox(progs, "--", "/crash", "ud").returncode == 128 + 4
    assert sandbox(progs, "--", "/crash", "kernel").returncode == 128 + 11


def _records(calls: list[tuple[int, ...]]) -> bytes:
    return b"".join(struct.pack("<7Q", *c) for c in calls)


def test_bad_pointers_are_efault(progs: Path) -> None:
    kernel_page = 0xFFFF_FF80_0000_0000
    calls = [
        (1, 1, kernel_page, 16, 0, 0, 0),  # write from the VMM's own page
        (1, 1, 0xDEAD_0000, 16, 0, 0, 0),  # write from unmapped memory
        (0, 0, 0x10, 1 << 40, 0, 0, 0),  # read a huge length into page 0
        (63, kernel_page, 0, 0, 0, 0, 0),  # uname into the VMM's page
        (257, (1 << 64) - 100, 0xDEAD_0000, 0, 0, 0, 0),  # openat with an unmapped path
        (999, 0, 0, 0, 0, 0, 0),  # no such call
    ]
    p = sandbox(progs, "--", "/fuzz", stdin=_records(calls))
    assert p.returncode == 0, p.stderr
    lines = p.stderr.decode().splitlines()
    assert lines[:6] == ["1 -14", "1 -14", "0 -14", "63 -14", "257 -14", "999 -38"]
    assert lines[-1] == "survived"


#: calls that would end or block the fuzzer rather than test the VMM
_SKIP = {0, 7, 15, 17, 19, 23, 34, 35, 40, 56, 57, 58, 59, 60, 61, 62, 200, 202, 230, 231, 234, 247, 270, 271, 322, 435}
_values = st.one_of(
    st.integers(0, 2**64 - 1),
    st.sampled_from(
        [0, 1, 2, 3, 4096, 0xFFFF_FFFF, 2**63, 2**64 - 1, 0xDEAD_0000, 0xFFFF_FF80_0000_0000, 0x7FFF_FFFF_E000 - 64]
    ),
)
_call = st.tuples(st.integers(0, 460).filter(lambda n: n not in _SKIP), *(_values,) * 6)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(calls=st.lists(_call, min_size=1, max_size=40))
def test_fuzz_random_system_calls(progs: Path, calls: list[tuple[int, ...]]) -> None:
    p = sandbox(progs, "--read-only", "--", "/fuzz", stdin=_records(calls), timeout=120)
    err = p.stderr.decode(errors="replace")
    assert "Traceback" not in err and "VMM error" not in err, err[-2000:]
    # the program may kill itself (munmap of its own code, a bad arch_prctl...): then a signal; it
    # may also close or replace its own stderr, so "survived" is not required
    assert p.returncode == 0 or p.returncode > 128, (p.returncode, err[-500:])


def test_signal_handlers(progs: Path) -> None:
    p = sandbox(progs, "--", "/signals")
    assert p.returncode == 0, p.stderr
    assert p.stdout == b"self 10 3.0\nchild 3 chld>0 1\nint 2\nepipe -1\n"
    p = sandbox(
        progs, "--", "/bin/sh", "-c", 'trap "echo trapped" USR1; kill -USR1 $$; sleep 30 & kill $!; wait $!; echo $?'
    )
    assert p.stdout == b"trapped\n143\n", p.stderr


def _vmm_threads(pid: int) -> int:
    """The process's threads, without the kernel's per-VM workers (named kvm-*)."""
    count = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                count += not f.read().startswith("kvm-")
        except OSError:
            continue
    return count


def test_ctrl_c_stops_a_foreground_sleep(sandbox_root: Path) -> None:
    import signal
    import subprocess
    import time

    from tests.integration.sandbox.conftest import VIRTKIT

    proc = subprocess.Popen(
        [*VIRTKIT, "sandbox", "--root", str(sandbox_root), "--", "/bin/sh", "-c", "sleep 60; echo not reached"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # wait until sh and its sleep both run: the VMM then has three threads of its own (main +
        # one each); KVM's own workers (kvm-nx-lpage-recovery) are tasks of the process too, and
        # counting them sent the signal before sh had forked, flakily under load
        deadline = time.monotonic() + 60
        while _vmm_threads(proc.pid) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the sandbox did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert b"not reached" not in out
