"""guests/linux/build.py's pure parts: the config check that fails loudly when an option of the
fragment did not survive olddefconfig, and the cpio (newc) writer of the initramfs."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "guests" / "linux" / "build.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("linux_build", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["linux_build"] = mod
    spec.loader.exec_module(mod)
    return mod


build = load()


def test_parse_config_reads_values_and_not_set_lines() -> None:
    text = '# comment\nCONFIG_A=y\nCONFIG_B="x y"\n# CONFIG_C is not set\nCONFIG_D=0x10\n'
    assert build.parse_config(text) == {"CONFIG_A": "y", "CONFIG_B": '"x y"', "CONFIG_C": None, "CONFIG_D": "0x10"}


def test_lost_options_names_every_option_that_did_not_survive() -> None:
    fragment = "CONFIG_SMP=y\nCONFIG_ACPI=y\n# CONFIG_PCI is not set\nCONFIG_NR_CPUS=8\n"
    config = "CONFIG_SMP=y\nCONFIG_PCI=y\nCONFIG_NR_CPUS=64\n"
    assert build.lost_options(fragment, config) == [
        "CONFIG_ACPI=y (got not set)",
        "CONFIG_PCI=n (got y)",
        "CONFIG_NR_CPUS=8 (got 64)",
    ]
    assert build.lost_options(fragment, "CONFIG_SMP=y\nCONFIG_ACPI=y\nCONFIG_NR_CPUS=8\n") == []


def test_the_repo_fragment_parses_and_asks_for_what_the_tests_need() -> None:
    frag = build.parse_config(build.FRAGMENT.read_text())
    for name in ("CONFIG_PVH", "CONFIG_SMP", "CONFIG_X86_MPPARSE", "CONFIG_ACPI", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
                 "CONFIG_VIRTIO_BLK", "CONFIG_VIRTIO_NET", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_BLK_DEV_INITRD",
                 "CONFIG_KVM_GUEST", "CONFIG_BINFMT_SCRIPT",
                 "CONFIG_PCI",  # 6.1's ACPICA loads no DSDT without it (guests/linux/virtkit.config)
                 "CONFIG_HZ_100", "CONFIG_NO_HZ_IDLE"):  # fmt: skip
        assert frag.get(name) == "y", name


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio (Debian package) is not installed")
def test_cpio_newc_is_read_back_by_gnu_cpio(tmp_path: Path) -> None:
    import stat

    blob = build.cpio_newc(
        [
            ("bin", stat.S_IFDIR | 0o755, b"", 0),
            ("bin/hello", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n", 0),
            ("bin/sh", stat.S_IFLNK | 0o777, b"busybox", 0),
            ("dev/console", stat.S_IFCHR | 0o600, b"", (5 << 8) | 1),
        ]
    )
    assert len(blob) % 4 == 0 and blob.startswith(b"070701")
    listing = subprocess.run(["cpio", "-itv"], input=blob, capture_output=True, check=True).stdout.decode()
    lines = listing.splitlines()
    assert [ln.split()[-1] if "->" not in ln else ln.split()[-3] for ln in lines] == [
        "bin",
        "bin/hello",
        "bin/sh",
        "dev/console",
    ]
    assert "bin/sh -> busybox" in listing
    assert any(ln.startswith("crw-------") and "5," in ln for ln in lines), listing
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "bin/hello"], input=blob, cwd=out, check=True)
    assert (out / "bin" / "hello").read_bytes() == b"#!/bin/sh\necho hi\n"


def test_a_cache_it_cannot_create_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert build.main(["--cache", str(blocker / "sub"), "initramfs"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "VIRTKIT_KERNEL_CACHE" in err


def test_initramfs_is_cached_and_reused(tmp_path: Path) -> None:
    if not build.BUSYBOX.is_file():
        pytest.skip("busybox-static is not installed")
    first = build.build_initramfs(tmp_path)
    blob = (first / "initramfs.cpio.gz").read_bytes()
    assert build.build_initramfs(tmp_path) == first
    assert (first / "initramfs.cpio.gz").read_bytes() == blob  # reproducible: gzip mtime 0
    assert not list(tmp_path.glob(".tmp-*"))
