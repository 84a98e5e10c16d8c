"""A sandbox root for the tests: Debian's busybox-static with its applets as symlinks, a few
files, and the C programs of progs/ built with ``gcc -static``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROGS = Path(__file__).resolve().parent / "progs"
BUSYBOX = Path("/bin/busybox")
APPLETS = [
    "sh",
    "echo",
    "cat",
    "wc",
    "ls",
    "sort",
    "sed",
    "find",
    "true",
    "false",
    "sleep",
    "awk",
    "grep",
    "head",
    "tr",
    "touch",
    "mkdir",
    "rm",
    "ln",
]
VIRTKIT = [sys.executable, "-m", "virtkit"]


def sandbox(
    root: Path, *args: str, timeout: float = 60, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``virtkit sandbox --root ROOT [options] -- PROGRAM...``; options are the args before ``--``."""
    return subprocess.run(
        [*VIRTKIT, "sandbox", "--root", str(root), *args], capture_output=True, timeout=timeout, input=stdin
    )


@pytest.fixture(scope="session")
def sandbox_root(tmp_path_factory: pytest.TempPathFactory, kvm: None) -> Path:
    if (
        not BUSYBOX.exists()
        or b"statically linked" not in subprocess.run(["file", "-L", str(BUSYBOX)], capture_output=True).stdout
    ):
        pytest.skip("a static /bin/busybox is needed (apt-get install busybox-static)")
    root = tmp_path_factory.mktemp("sandbox-root")
    (root / "bin").mkdir()
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for a in APPLETS:
        os.symlink("busybox", root / "bin" / a)
    (root / "etc").mkdir()
    (root / "etc" / "motd").write_text("inside the sandbox\n")
    (root / "data").mkdir()
    (root / "data" / "words").write_text("pear\napple\nfig\n")
    (root / "data4k").write_bytes(os.urandom(4096))
    (root / "tmp").mkdir()
    if shutil.which("gcc"):
        for prog in ("bench", "fuzz", "crash", "signals"):
            subprocess.run(["gcc", "-static", "-O2", "-o", str(root / prog), str(PROGS / f"{prog}.c")], check=True)
    return root


@pytest.fixture(scope="session")
def progs(sandbox_root: Path) -> Path:
    if not (sandbox_root / "fuzz").exists():
        pytest.skip("gcc is needed to build the sandbox test programs")
    return sandbox_root
