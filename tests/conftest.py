"""Shared fixtures: where the built guests are, whether KVM and QEMU are usable, and a leak check
that every VM test passes through (fds, threads, child processes)."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUESTS = Path(os.environ.get("VIRTKIT_GUESTS", ROOT / "build" / "guests"))


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


@pytest.fixture(scope="session")
def guests() -> Path:
    if not (GUESTS / "hello.elf").exists():
        pytest.skip(f"guests are not built in {GUESTS}: run `make guests`")
    return GUESTS


@pytest.fixture(scope="session")
def kvm() -> None:
    if not kvm_usable():
        pytest.skip("/dev/kvm is not usable here")


@pytest.fixture(scope="session")
def qemu() -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    return path


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fails the test if it leaves file descriptors or threads behind."""
    fds_before = _open_fds()
    threads_before = {t.ident for t in threading.enumerate()}
    yield
    leaked_threads = [t.name for t in threading.enumerate() if t.ident not in threads_before and t.is_alive()]
    assert not leaked_threads, f"threads left running: {leaked_threads}"
    leaked = _open_fds() - fds_before
    # an fd listed by os.listdir itself may show up; resolve to be sure the rest are real leaks
    real = []
    for fd in leaked:
        with contextlib.suppress(OSError):
            real.append(os.readlink(f"/proc/self/fd/{fd}"))
    assert not real, f"file descriptors left open: {real}"
