#!/usr/bin/env python3
"""Build virtkit's test Linux kernel and busybox initramfs, cached outside the clone.

Called by `make setup` (target `linux`). Standard library only: it runs before the venv exists.

Kernel: Debian's `linux-source-X.Y` tarball, `make tinyconfig`, the fragment guests/linux/virtkit.config
merged on top, `make olddefconfig`, then a check that every fragment line survived (a missing
dependency silently drops an option; this fails loudly instead), then `bzImage` and `vmlinux` built
at nice 19. Initramfs: a gzip'd cpio (newc) with Debian's static busybox and guests/linux/init.

Cache: CACHE/<key>/ where the key names the source package version and the sha256 of everything that
decides the result (the fragment, the init script, this script). A build goes to CACHE/.tmp-*, and
is renamed into place only when complete, under a lock, so concurrent setups and an interrupted
build never leave a half entry. A warm cache costs a few stat() calls.

Output: a JSON file (build/linux.json) with the paths, read by tests/linux_kernels.py.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

HERE = Path(__file__).resolve().parent
FRAGMENT = HERE / "virtkit.config"
INIT = HERE / "init"
DEFAULT_CACHE = Path(os.environ.get("VIRTKIT_KERNEL_CACHE", "/var/cache/virtkit/kernels"))
BUSYBOX = Path("/bin/busybox")
KERNEL_FILES = ("bzImage", "vmlinux", "config")
# busybox applets the initramfs links (the /init script and a shell's basic needs)
APPLETS = (
    "sh", "mount", "umount", "echo", "cat", "ls", "mkdir", "poweroff", "reboot", "uname",
    "grep", "dmesg", "sleep", "ip", "ifconfig", "ping", "head", "tail", "wc", "true", "false",
)  # fmt: skip


class BuildError(Exception):
    """A one-line reason the build cannot go on, with what to do."""


def log(msg: str) -> None:
    print(f"linux: {msg}", flush=True)


def sha256_files(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def dpkg_version(pkg: str) -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=False)
    if r.returncode != 0 or not r.stdout.strip():
        raise BuildError(f"Debian package {pkg} is not installed (make deps installs it)")
    return r.stdout.strip()


def find_source() -> tuple[Path, str, str]:
    """The newest /usr/src/linux-source-X.Y.tar.xz, its package name and version."""
    found = sorted(
        Path("/usr/src").glob("linux-source-*.tar.xz"),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.name)],
    )
    if not found:
        raise BuildError("no /usr/src/linux-source-*.tar.xz: apt-get install linux-source")
    tarball = found[-1]
    pkg = tarball.name.removesuffix(".tar.xz")
    return tarball, pkg, dpkg_version(pkg)


def parse_config(text: str) -> dict[str, str | None]:
    """A .config or fragment as {CONFIG_X: value}, with None for `# CONFIG_X is not set`."""
    out: dict[str, str | None] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := re.fullmatch(r"(CONFIG_\w+)=(.*)", line):
            out[m[1]] = m[2]
        elif m := re.fullmatch(r"# (CONFIG_\w+) is not set", line):
            out[m[1]] = None
    return out


def lost_options(fragment: str, config: str) -> list[str]:
    """The fragment lines that the final .config does not honour."""
    want = parse_config(fragment)
    have = parse_config(config)
    lost = []
    for name, value in want.items():
        got = have.get(name)
        if got != value:
            shown = "not set" if got is None else got
            lost.append(f"{name}={'n' if value is None else value} (got {shown})")
    return lost


class Lock:
    """An exclusive flock on CACHE/.lock, so two setups build one entry once."""

    def __init__(self, cache: Path) -> None:
        self.path = cache / ".lock"
        self.fd = -1

    def __enter__(self) -> Lock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def make_env() -> dict[str, str]:
    """The environment for the kernel's make: without the calling make's MAKEFLAGS (a `make -s`
    above would silence the build's progress lines, and its jobserver is not ours to use)."""
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}


def run_logged(cmd: list[str], cwd: Path, logf: TextIO, what: str) -> None:
    """Run cmd with its output in the build log; on failure show the log's tail."""
    logf.write(f"$ {' '.join(cmd)}\n")
    logf.flush()
    r = subprocess.run(cmd, cwd=cwd, env=make_env(), stdout=logf, stderr=subprocess.STDOUT, check=False)
    if r.returncode != 0:
        raise BuildError(f"{what} failed (exit {r.returncode}); see {logf.name}")


def make_with_progress(cmd: list[str], cwd: Path, logf: TextIO, total_hint: int) -> None:
    """Run the long `make`, printing a progress line each minute (objects built, elapsed)."""
    logf.write(f"$ {' '.join(cmd)}\n")
    logf.flush()
    start = time.monotonic()
    last = start
    built = 0
    with subprocess.Popen(
        cmd, cwd=cwd, env=make_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            if line.lstrip().startswith(("CC ", "AS ")):
                built += 1
            now = time.monotonic()
            if now - last >= 60:
                last = now
                log(f"  {built}/~{total_hint} objects compiled, {(now - start) / 60:.1f} min")
        rc = proc.wait()
    if rc != 0:
        raise BuildError(f"kernel build failed (exit {rc}); see {logf.name}")
    log(f"  compiled {built} objects in {(time.monotonic() - start) / 60:.1f} min")


def build_kernel(cache: Path, jobs: int) -> Path:
    tarball, pkg, version = find_source()
    digest = sha256_files(FRAGMENT, Path(__file__).resolve())[:16]
    key = f"test-{pkg}-{version}-{digest}"
    final = cache / key
    if all((final / f).is_file() for f in KERNEL_FILES):
        return final
    with Lock(cache):
        if all((final / f).is_file() for f in KERNEL_FILES):
            return final
        remove_stale(cache)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache))
        try:
            _build_kernel_in(tmp, tarball, pkg, version, jobs)
            os.rename(tmp / "out", final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log("  removing the build tree")
    shutil.rmtree(tmp, ignore_errors=True)  # ~1 GB of objects: outside the lock, others may go on
    return final


def remove_stale(cache: Path) -> None:
    """Remove what a killed build left (.tmp-* trees); called under the lock, so none is live."""
    for stale in cache.glob(".tmp-*"):
        if stale.is_dir():
            log(f"  removing {stale.name}, left by an interrupted build")
            shutil.rmtree(stale, ignore_errors=True)


def _build_kernel_in(tmp: Path, tarball: Path, pkg: str, version: str, jobs: int) -> None:
    src = tmp / "src"
    out = tmp / "out"
    src.mkdir()
    out.mkdir()
    logpath = tmp.parent / f"{tmp.name.removeprefix('.tmp-')}.log"
    t0 = time.monotonic()
    log(f"building the test kernel from {pkg} {version} (-j{jobs}, nice 19; ~20+ min on 2 cores)")
    log(f"  build log: {logpath}")
    with open(logpath, "w", encoding="utf-8") as logf:
        log(f"  unpacking {tarball}")
        run_logged(["tar", "-xf", str(tarball), "--strip-components=1"], src, logf, "unpacking")
        mk = ["make", "ARCH=x86_64"]
        log("  configuring: tinyconfig + guests/linux/virtkit.config + olddefconfig")
        run_logged([*mk, "tinyconfig"], src, logf, "make tinyconfig")
        merge = ["scripts/kconfig/merge_config.sh", "-m", ".config", str(FRAGMENT)]
        run_logged(merge, src, logf, "merging the config fragment")
        run_logged([*mk, "olddefconfig"], src, logf, "make olddefconfig")
        config = (src / ".config").read_text()
        lost = lost_options(FRAGMENT.read_text(), config)
        if lost:
            raise BuildError("config options did not survive olddefconfig (missing dependency?): " + ", ".join(lost))
        cmd = ["nice", "-n", "19", *mk, f"-j{jobs}", "bzImage", "vmlinux"]
        make_with_progress(cmd, src, logf, total_hint=1100)
    shutil.copyfile(src / "arch/x86/boot/bzImage", out / "bzImage")
    shutil.copyfile(src / "vmlinux", out / "vmlinux")
    shutil.copyfile(src / ".config", out / "config")
    shutil.copyfile(logpath, out / "build.log")
    logpath.unlink()
    seconds = round(time.monotonic() - t0, 1)
    info: dict[str, object] = {
        "source": pkg,
        "version": version,
        "fragment_sha256": sha256_files(FRAGMENT),
        "build_seconds": seconds,
        "jobs": jobs,
    }
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"  done in {seconds / 60:.1f} min")


def cpio_newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A cpio archive in the SVR4 'newc' format (Documentation/driver-api/early-userspace/
    buffer-format.rst): each entry (name, mode, data, rdev) gets a 110-byte ASCII header,
    the NUL-terminated name and the data, each padded to 4 bytes; then the TRAILER!!! entry."""
    buf = io.BytesIO()

    def pad() -> None:
        buf.write(b"\0" * (-buf.tell() % 4))

    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], 1):
        nameb = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF, len(nameb), 0]
        buf.write(b"070701" + "".join(f"{f:08x}" for f in fields).encode())
        buf.write(nameb)
        pad()
        buf.write(data)
        pad()
    return buf.getvalue()


def build_initramfs(cache: Path) -> Path:
    version = dpkg_version("busybox-static")
    digest = sha256_files(INIT, BUSYBOX, Path(__file__).resolve())[:16]
    final = cache / f"initramfs-busybox-{version.replace(':', '_')}-{digest}"
    if (final / "initramfs.cpio.gz").is_file():
        return final
    with Lock(cache):
        if (final / "initramfs.cpio.gz").is_file():
            return final
        log(f"building the busybox initramfs (busybox-static {version})")
        d = stat.S_IFDIR | 0o755
        entries: list[tuple[str, int, bytes, int]] = [
            (n, d, b"", 0) for n in ("bin", "sbin", "dev", "proc", "sys", "tmp", "etc")
        ]
        entries += [
            ("dev/console", stat.S_IFCHR | 0o600, b"", (5 << 8) | 1),
            ("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes(), 0),
            ("init", stat.S_IFREG | 0o755, INIT.read_bytes(), 0),
        ]
        entries += [(f"bin/{a}", stat.S_IFLNK | 0o777, b"busybox", 0) for a in APPLETS]
        blob = gzip.compress(cpio_newc(entries), compresslevel=9, mtime=0)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-initramfs-", dir=cache))
        try:
            (tmp / "initramfs.cpio.gz").write_bytes(blob)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache directory")
    ap.add_argument("--json", type=Path, help="write the artifact paths to this JSON file")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("what", nargs="?", choices=("all", "kernel", "initramfs"), default="all")
    args = ap.parse_args(argv)
    try:
        try:
            args.cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BuildError(
                f"cannot create the kernel cache {args.cache} ({e.strerror}): run as root "
                "or set VIRTKIT_KERNEL_CACHE to a writable directory"
            ) from None
        result: dict[str, dict[str, str]] = {}
        if args.what in ("all", "kernel"):
            k = build_kernel(args.cache, args.jobs)
            result["kernel"] = {f: str(k / f) for f in KERNEL_FILES}
            result["kernel"]["dir"] = str(k)
        if args.what in ("all", "initramfs"):
            i = build_initramfs(args.cache)
            result["initramfs"] = {"cpio_gz": str(i / "initramfs.cpio.gz"), "dir": str(i)}
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmpjson = args.json.with_suffix(".json.tmp")
            tmpjson.write_text(json.dumps(result, indent=1) + "\n")
            os.replace(tmpjson, args.json)
    except BuildError as e:
        print(f"linux: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("linux: interrupted; nothing was cached", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
