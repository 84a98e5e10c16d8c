"""Dynamic programs through their own PT_INTERP loader, from the sandbox root: a small C program
and the host's CPython with its libraries copied (hard-linked) into the root."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.sandbox.conftest import sandbox

LIBS = Path("/lib/x86_64-linux-gnu")
LOADER = Path("/lib64/ld-linux-x86-64.so.2")


def _place(src: Path, root: Path) -> None:
    """``src`` at the same path under ``root``: a hard link when possible, else a copy."""
    dst = root / src.relative_to("/")
    dst.parent.mkdir(parents=True, exist_ok=True)
    real = src.resolve()
    try:
        os.link(real, dst)
    except OSError:
        shutil.copy2(real, dst)


def _libs_of(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    return [Path(w) for line in out.splitlines() for w in line.split() if w.startswith("/")]


@pytest.fixture(scope="module")
def dyn_root(tmp_path_factory: pytest.TempPathFactory, kvm: None) -> Path:
    if not shutil.which("gcc") or not LOADER.exists():
        pytest.skip("gcc and the glibc loader are needed")
    root = tmp_path_factory.mktemp("dyn-root")
    src = root / "d.c"
    src.write_text(
        "#include <stdio.h>\n#include <stdlib.h>\n"
        "int main(int c, char **v) { char *p = malloc(1 << 20); p[12345] = 7;"
        ' printf("dynamic %s %d\\n", c > 1 ? v[1] : "-", p[12345]); return 0; }\n'
    )
    (root / "bin").mkdir()
    subprocess.run(["gcc", "-O2", "-o", str(root / "bin" / "d"), str(src)], check=True)
    for lib in _libs_of(root / "bin" / "d"):
        _place(lib, root)
    return root


def test_dynamic_c_program(dyn_root: Path) -> None:
    p = sandbox(dyn_root, "--", "/bin/d", "linked")
    assert (p.returncode, p.stdout) == (0, b"dynamic linked 7\n"), p.stderr


def test_cpython(tmp_path: Path, kvm: None) -> None:
    python = Path("/usr/bin/python3.11")
    stdlib = Path("/usr/lib/python3.11")
    if not python.exists() or not stdlib.is_dir():
        pytest.skip("Debian's python3.11 is needed")
    root = tmp_path / "root"
    _place(python, root)
    for lib in _libs_of(python):
        _place(lib, root)
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [d for d in dirnames if d not in ("test", "idlelib", "tkinter", "lib2to3")]
        for name in filenames:
            _place(Path(dirpath) / name, root)
    p = sandbox(
        root, "--read-only", "--", "/usr/bin/python3.11", "-c", "import json, hashlib; print(sum(range(10**6)))"
    )
    assert (p.returncode, p.stdout) == (0, b"499999500000\n"), p.stderr[-2000:]
