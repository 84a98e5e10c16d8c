"""The test kernel and initramfs `make setup` builds (guests/linux/build.py), checked under QEMU's
TCG, which stands in for a host where guest kernel code runs at full speed: it must bring up 2 CPUs,
unpack the initramfs and run its /init, which prints the marker line. This proves the cached
artifacts, independent of virtkit's Linux loader (tested with the boot protocols)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from linux_kernels import INIT_MARKER, test_kernel  # noqa: E402

pytestmark = pytest.mark.qemu


def line_done(buf: bytearray, marker: bytes) -> bool:
    at = buf.find(marker)
    return at >= 0 and buf.find(b"\n", at) >= 0


def watch(cmd: list[str], until: str, timeout: float) -> str:
    """Run cmd, return its output once a whole line containing ``until`` arrived (or the deadline
    passed); always killed."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert p.stdout is not None
    buf = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while p.poll() is None and time.monotonic() < deadline and not line_done(buf, until.encode()):
            ready, _, _ = select.select([p.stdout], [], [], 0.2)
            if ready:
                buf += os.read(p.stdout.fileno(), 65536)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
    return bytes(buf).decode(errors="replace")


def test_config_kept_the_fragment() -> None:
    k = test_kernel()
    config = k.config.read_text()
    for line in ("CONFIG_PVH=y", "CONFIG_SMP=y", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y", "CONFIG_KVM_GUEST=y"):
        assert line in config.splitlines()
    assert "CONFIG_PCI=y" in config.splitlines()  # 6.1 loads no DSDT without it (guests/linux/virtkit.config)


def test_kernel_runs_init_from_the_initramfs_under_tcg(qemu: str) -> None:
    k = test_kernel()
    cmd = [qemu, "-M", "pc", "-accel", "tcg", "-smp", "2", "-m", "256", "-nodefaults", "-no-reboot", "-nographic"]
    cmd += ["-serial", "stdio", "-kernel", str(k.vmlinux), "-initrd", str(k.initramfs)]
    cmd += ["-append", "console=ttyS0 panic=-1 virtkit.test=1"]
    out = watch(cmd, until=INIT_MARKER, timeout=240)  # ~5 s alone; a busy 2-core machine is slower
    assert "Command line: console=ttyS0 panic=-1 virtkit.test=1" in out, out[-3000:]
    assert "smpboot: Total of 2 processors activated" in out, out[-3000:]
    assert "Unpacking initramfs" in out and "Run /init as init process" in out, out[-3000:]
    assert f"{INIT_MARKER} kernel=6." in out and "cpus=2" in out, out[-3000:]
