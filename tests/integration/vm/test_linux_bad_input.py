"""`virtkit run` on crafted Linux kernels and initrds, as a user meets it: every malformed kernel,
initrd or setup header gets one line saying what is wrong, exit status 2, no traceback.

The images are synthetic (tests/unit/boot/linuxbuild.py lays out a setup header field by field,
Documentation/arch/x86/boot.rst), so these run without the test kernel or Debian's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "unit" / "boot"))
from linuxbuild import bzimage, note, vmlinux  # type: ignore[import-not-found]  # noqa: E402

pytestmark = pytest.mark.usefixtures("kvm")

MiB = 1 << 20


def virtkit(*args: str) -> subprocess.CompletedProcess[bytes]:
    # bytes: an argument that is not UTF-8 must reach virtkit as it is
    return subprocess.run([sys.executable, "-m", "virtkit", "run", *args], capture_output=True, timeout=60)


def one_line_error(p: subprocess.CompletedProcess[bytes], fragment: str) -> None:
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("virtkit: error:") and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]


def image(tmp_path: Path, data: bytes, name: str = "bzImage") -> str:
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


@pytest.mark.parametrize(
    "kernel,fragment",
    [
        (bzimage()[:0x1F0], "is not an ELF file, a Linux bzImage or a Multiboot kernel"),  # truncated before the header
        (bzimage()[:0x250], "too short for a boot protocol 2.12 header"),
        (bzimage()[:-64], "is truncated: its header says"),
        (bzimage(magic=b"HdrX"), "no Linux 'HdrS' setup header magic at 0x202"),
        (bzimage(boot_flag=0x1234), "bad boot_flag at 0x1fe (not 0xAA55): the image is damaged"),
        (bzimage(version=0x0204), "boot protocol 2.04: virtkit needs 2.12 or later"),
        (bzimage(version=0x020B), "boot protocol 2.11"),
        (bzimage(xloadflags=0x2), "no 64-bit entry point (XLF_KERNEL_64 clear): it is a 32-bit kernel"),
        (bzimage(loadflags=0), "is a zImage"),
        (bzimage(kernel_alignment=0x30000), "not a power of two"),
        (bzimage(pref_address=0x1_0000_0000), "wants to run at 0x100000000 (pref_address)"),
        (bzimage(init_size=0x1000_0000), "give the VM at least --memory"),
    ],
)
def test_malformed_kernels(tmp_path: Path, kernel: bytes, fragment: str) -> None:
    one_line_error(virtkit(image(tmp_path, kernel), "--memory", "64M"), fragment)


def test_malformed_vmlinux(tmp_path: Path) -> None:
    linux_note = note(b"Linux", 1, b"")
    outside = vmlinux(0x200_0000, 0x100_0000, b"\xf4", 1, notes=linux_note)
    one_line_error(virtkit(image(tmp_path, outside, "vmlinux")), "outside its loadable segments")
    low = vmlinux(0x1000, 0x1000, b"\xf4", 1, notes=linux_note)
    one_line_error(virtkit(image(tmp_path, low, "vmlinux")), "overlaps virtkit's boot structures")
    one_line_error(virtkit(image(tmp_path, low[:40], "vmlinux")), "")  # an ELF header cut short
    no_pvh = vmlinux(0x100_0000, 0x100_0000, b"\xf4", 1, notes=linux_note)
    one_line_error(virtkit(image(tmp_path, no_pvh, "vmlinux"), "--boot", "pvh"), "no XEN_ELFNOTE_PHYS32_ENTRY note")


def test_malformed_initrds(tmp_path: Path) -> None:
    kernel = image(tmp_path, bzimage())
    one_line_error(virtkit(kernel, "--initrd", str(tmp_path / "missing")), "does not exist")
    one_line_error(virtkit(kernel, "--initrd", str(tmp_path)), "is a directory, not a file")
    (tmp_path / "empty").write_bytes(b"")
    one_line_error(virtkit(kernel, "--initrd", str(tmp_path / "empty")), "is empty")
    os.mkfifo(tmp_path / "fifo")  # a plain open() of a FIFO without a writer blocks for ever
    one_line_error(virtkit(kernel, "--initrd", str(tmp_path / "fifo")), "is a FIFO, not a regular file")
    one_line_error(virtkit(kernel, "--initrd", "/dev/zero"), "is a device, not a regular file")
    with open(tmp_path / "huge", "wb") as f:
        f.truncate(65 * MiB)  # sparse: larger than the 64 MiB guest
    one_line_error(virtkit(kernel, "--memory", "64M", "--initrd", str(tmp_path / "huge")), "larger than guest memory")
    with open(tmp_path / "big", "wb") as f:
        f.truncate(50 * MiB)  # fits in RAM, not between the kernel (16 MiB + init_size 4 MiB) and the top
    big = virtkit(kernel, "--memory", "64M", "--initrd", str(tmp_path / "big"))
    one_line_error(big, "give the VM at least --memory")


def test_command_lines_that_cannot_be_given(tmp_path: Path) -> None:
    short = image(tmp_path, bzimage(cmdline_size=16), "short")
    one_line_error(virtkit(short, "--cmdline", "console=ttyS0 earlyprintk"), "accepts at most 16 (cmdline_size)")
    long = "x" * 2048  # a vmlinux (no header to say otherwise) takes COMMAND_LINE_SIZE - 1 = 2047 bytes
    linux = image(tmp_path, vmlinux(0x100_0000, 0x100_0000, b"\xf4", 1, notes=note(b"Linux", 1, b"")), "vmlinux")
    one_line_error(virtkit(linux, "--cmdline", long), "accepts at most 2047")
    one_line_error(virtkit(short, "--cmdline", os.fsdecode(b"a\xff")), "is not UTF-8 text")
