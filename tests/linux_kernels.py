"""Where the test Linux kernel and initramfs are: build/linux.json, written by `make setup`
(guests/linux/build.py), pointing into the cache outside the clone (/var/cache/virtkit/kernels).

Tests use :func:`test_kernel` and skip, with the reason, when setup has not built them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINUX_JSON = ROOT / "build" / "linux.json"
MAX_JSON = 64 * 1024


@dataclass(frozen=True)
class TestKernel:
    bzimage: Path
    vmlinux: Path
    config: Path
    initramfs: Path  # gzip'd cpio; its /init prints INIT_MARKER then powers off


#: the line the initramfs's /init prints once user space runs (guests/linux/init)
INIT_MARKER = "VIRTKIT-INITRAMFS-OK"


def test_kernel(path: Path = LINUX_JSON) -> TestKernel:
    """The built kernel and initramfs, or a pytest skip saying how to build them."""
    if not path.is_file():
        pytest.skip(f"{path} is missing: `make setup` builds the test kernel (about 20 min once)")
    if path.stat().st_size > MAX_JSON:
        pytest.fail(f"{path} is larger than {MAX_JSON} bytes: delete it and rerun `make setup`")
    try:
        data = json.loads(path.read_text())
        k = data["kernel"]
        out = TestKernel(
            bzimage=Path(k["bzImage"]),
            vmlinux=Path(k["vmlinux"]),
            config=Path(k["config"]),
            initramfs=Path(data["initramfs"]["cpio_gz"]),
        )
    except (ValueError, KeyError, TypeError) as e:
        pytest.fail(f"{path} is malformed ({e}): delete it and rerun `make setup`")
    for p in (out.bzimage, out.vmlinux, out.config, out.initramfs):
        if not p.is_file():
            pytest.skip(f"{p} is missing from the kernel cache: rerun `make setup`")
    return out


test_kernel.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test
TestKernel.__test__ = False  # type: ignore[attr-defined]
