"""Unmodified busybox (Debian's busybox-static) in the sandbox: the milestone checks."""

from __future__ import annotations

from pathlib import Path

from tests.integration.sandbox.conftest import sandbox


def test_echo_and_exit_status(sandbox_root: Path) -> None:
    p = sandbox(sandbox_root, "--", "/bin/busybox", "echo", "hello")
    assert (p.returncode, p.stdout, p.stderr) == (0, b"hello\n", b"")
    assert sandbox(sandbox_root, "--", "/bin/true").returncode == 0
    assert sandbox(sandbox_root, "--", "/bin/false").returncode == 1
    assert sandbox(sandbox_root, "--", "/bin/sh", "-c", "exit 42").returncode == 42


def test_file_tools_over_the_root(sandbox_root: Path) -> None:
    assert sandbox(sandbox_root, "--", "/bin/cat", "/etc/motd").stdout == b"inside the sandbox\n"
    assert sandbox(sandbox_root, "--", "/bin/sort", "/data/words").stdout == b"apple\nfig\npear\n"
    assert sandbox(sandbox_root, "--", "/bin/wc", "-l", "/data/words").stdout.split()[0] == b"3"
    assert sandbox(sandbox_root, "--", "/bin/sed", "s/p/P/g", "/data/words").stdout == b"Pear\naPPle\nfig\n"
    ls = sandbox(sandbox_root, "--", "/bin/ls", "/").stdout.split()
    assert {b"bin", b"etc", b"data", b"tmp"} <= set(ls)
    found = sandbox(sandbox_root, "--", "/bin/find", "/data").stdout.split()
    assert found == [b"/data", b"/data/words"]


def test_pipeline_prints_6(sandbox_root: Path) -> None:
    p = sandbox(sandbox_root, "--", "/bin/sh", "-c", "echo hello | wc -c")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == b"6"


def test_script_with_subshells_substitution_redirections(sandbox_root: Path) -> None:
    script = (
        'x=$(echo abc | tr a-c A-C); echo "x=$x"; '
        "( cd /data && cat words | sort | head -1 ) > /tmp/out; cat /tmp/out; "
        "echo one two | awk '{print $2}'; false || echo fallback; rm /tmp/out; "
        "[ -e /tmp/out ] || echo removed"
    )
    p = sandbox(sandbox_root, "--", "/bin/sh", "-c", script)
    assert p.returncode == 0, p.stderr
    assert p.stdout == b"x=ABC\napple\ntwo\nfallback\nremoved\n"


def test_trace_and_stats(sandbox_root: Path) -> None:
    p = sandbox(sandbox_root, "--trace", "--stats", "--", "/bin/true")
    err = p.stderr.decode()
    assert p.returncode == 0
    assert "[pid 1] exit_group(0) ..." in err
    assert "[pid 1] getuid() = 0" in err
    assert "ENOSYS (Function not implemented)" in err  # rseq: unimplemented calls show
    assert "syscall" in err and "total" in err and "page faults served" in err


def test_read_only_root_refuses_writes(sandbox_root: Path) -> None:
    p = sandbox(sandbox_root, "--read-only", "--", "/bin/sh", "-c", "echo x > /tmp/new")
    assert p.returncode != 0
    assert b"Read-only file system" in p.stderr
    assert not (sandbox_root / "tmp" / "new").exists()


def test_bad_input_is_one_line(sandbox_root: Path, tmp_path: Path) -> None:
    for args, fragment in (
        (["--", "/nothere"], b"cannot run /nothere"),
        (["--memory", "1K", "--", "/bin/true"], b"--memory"),
        ([], b"no program given"),
    ):
        p = sandbox(sandbox_root, *args)
        assert p.returncode == 2, p.stderr
        assert p.stderr.startswith(b"virtkit: error:") and p.stderr.count(b"\n") == 1, p.stderr
        assert fragment in p.stderr
    (tmp_path / "notelf").write_bytes(b"\x7fELF" + bytes(60))
    (tmp_path / "notelf").chmod(0o755)
    p = sandbox(tmp_path, "--", "/notelf")
    assert p.returncode == 2 and b"Traceback" not in p.stderr and b"ELF" in p.stderr


def test_run_mode_sandbox_with_the_busybox_image(tmp_path: Path, sandbox_root: Path) -> None:
    import os
    import subprocess

    from tests.integration.sandbox.conftest import VIRTKIT

    env = {**os.environ, "VIRTKIT_IMAGES": str(tmp_path / "images")}
    cmd = [*VIRTKIT, "run", "--mode", "sandbox", "busybox", "--", "sh", "-c", "echo hello | wc -c; cd /bin && pwd"]
    p = subprocess.run(cmd, capture_output=True, env=env, timeout=120)
    assert (p.returncode, p.stdout) == (0, b"6\n/bin\n"), p.stderr
    # the image's rootfs is read-only in this mode
    p = subprocess.run(
        [*VIRTKIT, "run", "--mode", "sandbox", "busybox", "--", "touch", "/x"], capture_output=True, env=env
    )
    assert p.returncode == 1 and b"Read-only" in p.stderr


def test_register_stub_path(sandbox_root: Path) -> None:
    """The VT-x-style stub (KVM_GET/SET_REGS per call) serves the same programs on PVM."""
    p = sandbox(sandbox_root, "--register-stub", "--", "/bin/sh", "-c", "echo hello | wc -c; exit 7")
    assert (p.returncode, p.stdout.strip()) == (7, b"6"), p.stderr
