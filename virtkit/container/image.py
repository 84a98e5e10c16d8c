"""Images without a registry: the built-in busybox image, OCI layouts, ``docker save`` archives.

An image store is a directory (default ``/var/lib/virtkit/images``, mode 0700) with one directory
per image::

    STORE/NAME/rootfs/        the unpacked layers (shared, read-only by convention)
    STORE/NAME/image.json     {"name", "digest", "source", "config": {Env, Cmd, Entrypoint, WorkingDir, User}}

Containers run on an overlayfs over ``rootfs`` (copy-on-write: the image is never written).

**An image is hostile input.** Whoever made it chooses every byte, so the importer:

* parses index.json, manifests, configs and manifest.json as bounded, typed records
  (:mod:`virtkit.records`), and checks every blob against its digest and size;
* streams each layer (decompression and tar in stream mode, never a whole layer in memory), with
  one budget for the whole image: inflated bytes (``VIRTKIT_IMAGE_MAX_BYTES``, default 8 GiB),
  entries, path and link-target lengths, directory depth, tar header sizes;
* requires ``rootfs.diff_ids`` in the image config, one per layer, and checks each against the
  sha256 of the layer as inflated (the OCI layout's blob digest covers the compressed bytes);
* refuses what could write outside the rootfs: absolute or ``..`` member names, members below a
  symlink (every parent is opened with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` and
  everything is created with ``*at`` calls relative to it), hard links out of the rootfs or to a
  directory, sparse members;
* never creates a device node: character and block devices are skipped (counted in image.json and
  reported), as Docker does for rootless; the store is not a place to hand out host devices;
* clears setuid and setgid bits (and sticky bits on files) deliberately, see :func:`safe_mode`;
* applies whiteouts (``.wh.NAME`` deletes NAME, ``.wh..wh..opq`` empties a directory, per the OCI
  image-spec layer.md "Whiteouts") without following symlinks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Annotated, Any, Protocol

from virtkit.errors import ConfigError, ContainerError
from virtkit.records import Bounds, UntrustedInput, load_json, load_object, parse

DEFAULT_STORE = "/var/lib/virtkit/images"
BUSYBOX_BINARY = "/bin/busybox"
WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"

MEDIA_LAYER_TAR = ("application/vnd.oci.image.layer.v1.tar", "application/vnd.docker.image.rootfs.diff.tar")
MEDIA_LAYER_GZIP = ("application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.docker.image.rootfs.diff.tar.gzip")
MEDIA_LAYER_ZSTD = ("application/vnd.oci.image.layer.v1.tar+zstd",)
MEDIA_INDEX = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")

#: inflated bytes an import may write, over all its layers (``VIRTKIT_IMAGE_MAX_BYTES`` overrides)
DEFAULT_MAX_BYTES = 8 << 30
MAX_ENTRIES = 1_000_000  # tar members over all layers
MAX_PATH = 4096  # a member's name or a link's target, in bytes
MAX_NAME = 255
MAX_DEPTH = 256  # directory levels below the rootfs
MAX_TAR_HEADER = 1 << 20  # a pax or GNU long-name header (read whole by tarfile)
MAX_JSON = 4 << 20  # index.json, a manifest, an image config
MAX_LAYERS = 1024
MAX_INDEX_NESTING = 4
CHUNK = 1 << 20

DIGEST = r"sha256:[0-9a-f]{64}"
_DIGEST_RE = re.compile(DIGEST)


class ImageError(ContainerError):
    """An image cannot be imported (truncated, digest mismatch, unsafe layer, over a limit...)."""


def store_dir(store: str | None = None) -> str:
    return os.path.abspath(store or os.environ.get("VIRTKIT_IMAGES") or DEFAULT_STORE)


def ensure_store(store: str | None = None) -> str:
    """The store directory, made if needed; only root may enter it (0700), an old one's mode fixed."""
    d = store_dir(store)
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"the image store {d} is not a directory")
    if stat.S_IMODE(st.st_mode) != 0o700 and st.st_uid == os.geteuid():
        os.chmod(d, 0o700)
    return d


def max_bytes() -> int:
    value = os.environ.get("VIRTKIT_IMAGE_MAX_BYTES")
    if not value:
        return DEFAULT_MAX_BYTES
    try:
        from virtkit.units import parse_size

        return int(parse_size(value, what="VIRTKIT_IMAGE_MAX_BYTES"))
    except (ValueError, ConfigError):
        raise ConfigError(f"VIRTKIT_IMAGE_MAX_BYTES={value!r} is not a size (e.g. 8G)") from None


# --------------------------------------------------------------------------------------------
# the records an image is made of (only the fields virtkit reads; others are ignored)


@dataclass(frozen=True, slots=True)
class Platform:
    architecture: Annotated[str, Bounds(max_len=64)] | None = None
    os: Annotated[str, Bounds(max_len=64)] | None = None


@dataclass(frozen=True, slots=True)
class Descriptor:
    digest: Annotated[str, Bounds(pattern=DIGEST)]
    size: Annotated[int, Bounds(lo=0, hi=2**62)]
    mediaType: Annotated[str, Bounds(max_len=256)] | None = None  # noqa: N815 - the image-spec's names
    annotations: Annotated[dict[str, str], Bounds(max_len=256)] | None = None
    platform: Platform | None = None


@dataclass(frozen=True, slots=True)
class Index:
    manifests: Annotated[tuple[Descriptor, ...], Bounds(max_len=MAX_LAYERS)]
    mediaType: Annotated[str, Bounds(max_len=256)] | None = None  # noqa: N815


@dataclass(frozen=True, slots=True)
class Manifest:
    mediaType: Annotated[str, Bounds(max_len=256)] | None = None  # noqa: N815
    config: Descriptor | None = None
    layers: Annotated[tuple[Descriptor, ...], Bounds(max_len=MAX_LAYERS)] = ()
    manifests: Annotated[tuple[Descriptor, ...], Bounds(max_len=MAX_LAYERS)] | None = None


@dataclass(frozen=True, slots=True)
class ContainerConfig:
    Env: Annotated[tuple[str, ...], Bounds(max_len=4096)] | None = None
    Cmd: Annotated[tuple[str, ...], Bounds(max_len=4096)] | None = None
    Entrypoint: Annotated[tuple[str, ...], Bounds(max_len=4096)] | None = None
    WorkingDir: Annotated[str, Bounds(max_len=MAX_PATH)] | None = None
    User: Annotated[str, Bounds(max_len=256)] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items() if v is not None
        }


@dataclass(frozen=True, slots=True)
class RootFS:
    diff_ids: Annotated[tuple[str, ...], Bounds(max_len=MAX_LAYERS)]
    type: Annotated[str, Bounds(max_len=64)] = "layers"


@dataclass(frozen=True, slots=True)
class ImageConfig:
    rootfs: RootFS
    config: ContainerConfig | None = None


@dataclass(frozen=True, slots=True)
class DockerEntry:
    Config: Annotated[str, Bounds(max_len=MAX_PATH)]
    Layers: Annotated[tuple[str, ...], Bounds(max_len=MAX_LAYERS)] = ()


@dataclass(frozen=True, slots=True)
class StoreMeta:
    """``image.json`` of the store, read back (the store is root's, but reads stay bounded)."""

    name: Annotated[str, Bounds(max_len=1024)]
    digest: Annotated[str, Bounds(max_len=128)] | None = None
    source: Annotated[str, Bounds(max_len=MAX_PATH)] | None = None
    config: ContainerConfig | None = None
    skipped_devices: Annotated[int, Bounds(lo=0)] = 0


def _record(cls: type[Any], data: bytes, what: str) -> Any:
    try:
        return parse(cls, load_object(data, what=what, max_bytes=MAX_JSON), what=what, unknown="ignore")
    except UntrustedInput as err:
        raise ImageError(f"{err}; refusing the image") from None


# --------------------------------------------------------------------------------------------
# overlayfs


def mount_overlay(lower: str, upper: str, work: str, target: str) -> None:
    from virtkit.host import mounts

    for d in (work, target):
        os.makedirs(d, mode=0o700, exist_ok=True)
    # the merged root takes the upper directory's mode: the image's own root is traversable by every
    # user of the container (the state directory above it keeps host users out)
    os.makedirs(upper, exist_ok=True)
    root_mode = stat.S_IMODE(os.stat(lower).st_mode)
    os.chmod(upper, root_mode)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    try:
        mounts.mount("overlay", target, "overlay", 0, opts)
    except OSError as err:
        raise ContainerError(f"cannot mount the overlay rootfs on {target}: {err.strerror}") from None


# --------------------------------------------------------------------------------------------
# the built-in image


def build_busybox(rootfs: str, binary: str = BUSYBOX_BINARY) -> None:
    """A busybox rootfs: the static binary plus one symlink per applet (``busybox --install -s``)."""
    if not os.path.exists(binary):
        raise ContainerError(f"{binary} is missing: install Debian's busybox-static ('make deps' does)")
    tmp = rootfs + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "root",
        "var/tmp",
        "home",
        "run",
    ):
        os.makedirs(os.path.join(tmp, d), exist_ok=True)
    os.chmod(tmp, 0o755)
    os.chmod(os.path.join(tmp, "tmp"), 0o1777)
    shutil.copy2(binary, os.path.join(tmp, "bin/busybox"))
    out = subprocess.run([binary, "--list-full"], capture_output=True, text=True, check=True).stdout
    for applet in out.split():
        link = os.path.join(tmp, applet.lstrip("/"))
        if applet.rstrip("/").endswith("/busybox") or os.path.lexists(link):
            continue
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink("/bin/busybox", link)
    files = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n",
        "etc/group": "root:x:0:\nnogroup:x:65534:\n",
        "etc/hosts": "127.0.0.1\tlocalhost\n",
        "etc/hostname": "virtkit\n",
    }
    for name, text in files.items():
        with open(os.path.join(tmp, name), "w") as f:
            f.write(text)
    shutil.rmtree(rootfs, ignore_errors=True)
    os.rename(tmp, rootfs)


def ensure_busybox(store: str | None = None) -> str:
    """The built-in image's directory (made on first use)."""
    root = os.path.join(ensure_store(store), "busybox")
    if not os.path.isfile(os.path.join(root, "image.json")):
        os.makedirs(root, mode=0o700, exist_ok=True)
        build_busybox(os.path.join(root, "rootfs"))
        meta = {
            "name": "busybox",
            "digest": None,
            "source": BUSYBOX_BINARY,
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["sh"],
                "WorkingDir": "/",
            },
        }
        _write_json(os.path.join(root, "image.json"), meta)
    return root


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.rename(tmp, path)


# --------------------------------------------------------------------------------------------
# streams: counted, hashed, capped


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Counted:
    """A reader that hashes and counts what passes through it, and refuses to pass more than
    ``limit`` bytes (the reading stops there, with an ImageError naming ``what``)."""

    def __init__(self, source: _Readable, limit: int, what: str, prefix: bytes = b"") -> None:
        self.source = source
        self.limit = limit
        self.what = what
        self.count = 0
        self.sha = hashlib.sha256()
        self._prefix = prefix

    def read(self, n: int = -1, /) -> bytes:
        want = CHUNK if n is None or n < 0 else n
        if self._prefix:
            data, self._prefix = self._prefix[:want], self._prefix[want:]
        else:
            data = self.source.read(min(want, self.limit - self.count + 1))
        self.count += len(data)
        if self.count > self.limit:
            raise ImageError(
                f"{self.what} is larger than {self.limit} bytes; refusing the image "
                "(VIRTKIT_IMAGE_MAX_BYTES sets the limit for inflated layers)"
            )
        self.sha.update(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


@dataclass(slots=True)
class Budget:
    """What one import may still write: inflated bytes and tar entries, over all its layers."""

    bytes_left: int = field(default_factory=max_bytes)
    entries_left: int = MAX_ENTRIES
    skipped_devices: list[str] = field(default_factory=list)


def _decompressor(raw: _Counted, media_type: str | None, what: str) -> _Readable:
    head = raw.read(4)
    raw_stream = _Counted(raw, 2**63, what, prefix=head)  # puts the peeked bytes back, hashes nothing twice
    if head[:2] == b"\x1f\x8b" or media_type in MEDIA_LAYER_GZIP:
        return gzip.GzipFile(fileobj=typing.cast(IO[bytes], raw_stream), mode="rb")
    if head == b"\x28\xb5\x2f\xfd" or media_type in MEDIA_LAYER_ZSTD:
        try:
            import zstandard
        except ImportError:
            raise ImageError(
                f"{what} is zstd-compressed and the 'zstandard' module is not installed (pip install zstandard)"
            ) from None
        reader: _Readable = zstandard.ZstdDecompressor().stream_reader(
            typing.cast(IO[bytes], raw_stream), read_across_frames=True
        )
        return reader
    return raw_stream


# --------------------------------------------------------------------------------------------
# layers


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a pax or GNU long-name header whole into memory: bound it first."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if (
            self.type
            in (
                tarfile.XHDTYPE,
                tarfile.XGLTYPE,
                tarfile.SOLARIS_XHDTYPE,
                tarfile.GNUTYPE_LONGNAME,
                tarfile.GNUTYPE_LONGLINK,
            )
            and self.size > MAX_TAR_HEADER
        ):
            raise ImageError(f"a tar header of {self.size} bytes (more than {MAX_TAR_HEADER}); refusing the image")
        return super()._proc_member(tarfile_)  # type: ignore[misc, no-any-return]


def safe_mode(m: tarfile.TarInfo) -> int:
    """The permission bits an entry gets in the store, chosen on purpose.

    setuid and setgid are dropped everywhere: an image is imported by root into a store that
    containers (and, through a bind mount or a careless chmod, users) can reach, and a setuid-root
    file from a stranger's image is a privilege escalation waiting to be found. (Containers run
    with no_new_privs by default, where the bits would be ignored anyway.) The sticky bit is kept on
    directories, where it protects /tmp-like directories, and dropped on files, where it means
    nothing. This is applied after the owner is set, so it does not depend on chown(2) clearing the
    bits as a side effect."""
    if m.isdir():
        return m.mode & 0o1777
    return m.mode & 0o777


def _split(name: str, what: str, kind: str = "entry") -> list[str]:
    if "\0" in name:
        raise ImageError(f"{what}: {kind} {name[:80]!r} contains a NUL byte; refusing the image")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts or (kind == "entry" and name.startswith("/")):
        raise ImageError(f"{what}: {kind} {name[:80]!r} would escape the rootfs; refusing the image")
    if len(name.encode()) > MAX_PATH or any(len(p.encode()) > MAX_NAME for p in parts) or len(parts) > MAX_DEPTH:
        raise ImageError(
            f"{what}: {kind} {name[:80]!r} is longer or deeper than a filesystem allows; refusing the image"
        )
    return parts


_STRICT = 0  # set at first use (libc import is lazy: the image module is used without containers too)


def _strict() -> int:
    global _STRICT
    if not _STRICT:
        from virtkit.host import mounts

        _STRICT = (
            mounts.RESOLVE_BENEATH | mounts.RESOLVE_NO_SYMLINKS | mounts.RESOLVE_NO_MAGICLINKS | mounts.RESOLVE_NO_XDEV
        )
    return _STRICT


def _open_dir(root_fd: int, parts: list[str], what: str, name: str, create: bool) -> int:
    """An O_PATH fd of the directory ``parts`` below the rootfs, made if missing (when ``create``);
    a symlink anywhere on the way refuses the image."""
    from virtkit.host import mounts

    cur = os.dup(root_fd)
    try:
        for p in parts:
            try:
                nxt = mounts.openat2(cur, p, os.O_PATH | os.O_DIRECTORY, _strict())
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(p, 0o755, dir_fd=cur)
                nxt = mounts.openat2(cur, p, os.O_PATH | os.O_DIRECTORY, _strict())
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
                    raise ImageError(
                        f"{what}: {name[:80]!r} goes through the symlink or file {p!r}; refusing the image"
                    ) from None
                raise
            os.close(cur)
            cur = nxt
        return cur
    except BaseException:
        os.close(cur)
        raise


def _remove_at(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd`` (a directory tree too) without following symlinks."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _copy(src: IO[bytes], fd: int, size: int, what: str) -> None:
    left = size
    while left > 0:
        data = src.read(min(CHUNK, left))
        if not data:
            raise ImageError(f"{what} is truncated")
        left -= len(data)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]


def _apply_entry(
    tar: tarfile.TarFile, m: tarfile.TarInfo, root_fd: int, what: str, budget: Budget, skipped: set[str]
) -> None:
    parts = _split(m.name, what)
    if not parts:
        return  # the rootfs itself ("./"): it keeps the store's mode
    name, parent_parts = parts[-1], parts[:-1]
    if name.startswith(WHITEOUT_PREFIX):
        try:
            parent = _open_dir(root_fd, parent_parts, what, m.name, create=False)
        except FileNotFoundError:
            return  # nothing there to delete
        try:
            if name == OPAQUE:
                for child in _list(parent):
                    _remove_at(parent, child)
            elif not name.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):  # .wh..wh.* is aufs metadata
                target = name[len(WHITEOUT_PREFIX) :]
                if target in ("", ".", ".."):
                    raise ImageError(f"{what}: whiteout {m.name[:80]!r} names no file; refusing the image")
                _remove_at(parent, target)
        finally:
            os.close(parent)
        return
    if m.ischr() or m.isblk():
        # never a device node from an image: skipped, counted, reported (Docker does so for rootless)
        budget.skipped_devices.append("/" + "/".join(parts))
        skipped.add("/".join(parts))
        return
    if m.issparse():
        raise ImageError(f"{what}: {m.name[:80]!r} is a sparse file, which virtkit does not import; refusing the image")
    if not (m.isdir() or m.isreg() or m.issym() or m.islnk() or m.isfifo()):
        return  # tar's own metadata (volume labels...): nothing to create
    parent = _open_dir(root_fd, parent_parts, what, m.name, create=True)
    try:
        existing = None
        with contextlib.suppress(FileNotFoundError):
            existing = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if existing is not None and not (m.isdir() and stat.S_ISDIR(existing.st_mode)):
            _remove_at(parent, name)
        if m.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                os.mkdir(name, 0o700, dir_fd=parent)
        elif m.isreg():
            fd = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent
            )
            try:
                src = tar.extractfile(m)
                if src is None:  # pragma: no cover - isreg() members always have a reader
                    raise ImageError(f"{what}: {m.name[:80]!r} cannot be read")
                _copy(src, fd, m.size, f"{what}: {m.name[:80]!r}")
            finally:
                os.close(fd)
        elif m.issym():
            if "\0" in m.linkname or len(m.linkname.encode()) > MAX_PATH:
                raise ImageError(f"{what}: symlink {m.name[:80]!r} has an impossible target; refusing the image")
            os.symlink(m.linkname, name, dir_fd=parent)
        elif m.islnk():
            tparts = _split(m.linkname, what, "hard link target")
            if "/".join(tparts) in skipped:
                return  # a link to a device node that was skipped
            if not tparts:
                raise ImageError(f"{what}: hard link {m.name[:80]!r} points at the rootfs itself; refusing the image")
            tdir = _open_dir(root_fd, tparts[:-1], what, m.linkname, create=False)
            try:
                tst = os.stat(tparts[-1], dir_fd=tdir, follow_symlinks=False)
                if stat.S_ISDIR(tst.st_mode):
                    raise ImageError(f"{what}: hard link {m.name[:80]!r} points at a directory; refusing the image")
                os.link(tparts[-1], name, src_dir_fd=tdir, dst_dir_fd=parent, follow_symlinks=False)
            finally:
                os.close(tdir)
            return  # a hard link shares its target's owner, mode and times
        else:  # a FIFO: an inert file, kept
            os.mkfifo(name, 0o600, dir_fd=parent)
        # owner first, then the mode chosen on purpose (safe_mode), then the times
        with contextlib.suppress(PermissionError):
            os.chown(name, m.uid, m.gid, dir_fd=parent, follow_symlinks=False)
        if not m.issym():
            os.chmod(name, safe_mode(m), dir_fd=parent)
            os.utime(name, (m.mtime, m.mtime), dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(parent)


def _list(dir_fd: int) -> list[str]:
    from virtkit.host import mounts

    fd = mounts.openat2(dir_fd, ".", os.O_RDONLY | os.O_DIRECTORY, _strict())
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class LayerResult:
    compressed_digest: str
    compressed_size: int
    diff_id: str  # sha256 of the layer as inflated


def apply_layer(
    fileobj: _Readable,
    rootfs: str,
    what: str = "layer",
    media_type: str | None = None,
    budget: Budget | None = None,
    compressed_limit: int = 2**62,
) -> LayerResult:
    """Stream one layer tar (plain, gzip or zstd) onto ``rootfs``, applying whiteouts; return the
    digests of what was read (the caller checks them against the image's)."""
    budget = budget if budget is not None else Budget()
    raw = _Counted(fileobj, compressed_limit, what)
    try:
        inflated = _Counted(_decompressor(raw, media_type, what), budget.bytes_left, f"{what}, inflated,")
        root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        skipped: set[str] = set()
        try:
            with tarfile.open(fileobj=inflated, mode="r|", tarinfo=_BoundedTarInfo) as tar:  # type: ignore[call-overload]
                while True:
                    m = tar.next()
                    if m is None:
                        break
                    tar.members.clear()  # stream mode keeps every header otherwise
                    budget.entries_left -= 1
                    if budget.entries_left < 0:
                        raise ImageError(f"{what}: the image has more than {MAX_ENTRIES} files; refusing it")
                    _apply_entry(tar, m, root_fd, what, budget, skipped)
            inflated.drain()  # the tar's trailing blocks count in its digest
            raw.drain()
        finally:
            os.close(root_fd)
        budget.bytes_left -= inflated.count
        return LayerResult(raw.digest(), raw.count, inflated.digest())
    except ImageError:
        raise
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib_errors()) as err:
        raise ImageError(f"{what} is truncated or not a valid tar archive: {err}") from None
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ImageError(f"no space left to unpack {what}: {err.strerror}") from None
        raise ImageError(f"{what} is truncated or cannot be unpacked: {err.strerror or err}") from None
    except Exception as err:  # zstandard.ZstdError and friends: a damaged stream  # noqa: BLE001
        raise ImageError(f"{what} is truncated or not a valid compressed layer: {err}") from None


def zlib_errors() -> type[Exception]:
    import zlib

    return zlib.error


# --------------------------------------------------------------------------------------------
# sources: an OCI layout directory, or a docker-save/OCI archive (tar)


class _Source:
    def open(self, name: str) -> tuple[IO[bytes], int]:
        """A stream of member ``name`` and its size."""
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def read(self, name: str, limit: int = MAX_JSON) -> bytes:
        f, size = self.open(name)
        with f:
            if size > limit:
                raise ImageError(f"image member {name} is {size} bytes, more than the {limit} allowed")
            data = f.read(limit + 1)
        if len(data) != size:
            raise ImageError(f"image member {name} is truncated")
        return data

    def close(self) -> None:
        pass


def _member_parts(name: str) -> list[str]:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts or not parts or "\0" in name:
        raise ImageError(f"image refers to {name[:80]!r}, outside the image; refusing it")
    return parts


class _DirSource(_Source):
    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def open(self, name: str) -> tuple[IO[bytes], int]:
        from virtkit.host import mounts

        try:
            # no symlink, no other filesystem: a blob that points at /dev/sda or a FIFO is refused
            fd = mounts.openat2(self.fd, "/".join(_member_parts(name)), os.O_RDONLY | os.O_NONBLOCK, _strict())
        except FileNotFoundError:
            raise ImageError(f"image is missing {name} (truncated or not an image)") from None
        except OSError as err:
            raise ImageError(f"image member {name} cannot be read ({err.strerror}); refusing the image") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ImageError(f"image member {name} is not a regular file; refusing the image")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size

    def exists(self, name: str) -> bool:
        try:
            f, _ = self.open(name)
        except ImageError:
            return False
        f.close()
        return True

    def close(self) -> None:
        os.close(self.fd)


def _member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


class _TarSource(_Source):
    def __init__(self, path: str) -> None:
        try:
            # open for the whole import: members are read on demand
            self.tar = tarfile.open(path, "r:*", tarinfo=_BoundedTarInfo)  # noqa: SIM115
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ImageError(f"{path} is truncated or not an image archive: {err}") from None
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            count = 0
            while True:
                m = self.tar.next()
                if m is None:
                    break
                count += 1
                if count > 100_000:
                    raise ImageError(f"{path} has more than 100000 members; it is not an image")
                if m.isreg():  # blobs are regular files; links inside the archive are not followed
                    self.members[_member_name(m.name)] = m
        except (tarfile.TarError, EOFError, OSError) as err:
            self.tar.close()
            raise ImageError(f"{path} is truncated or not an image archive: {err}") from None
        except BaseException:
            self.tar.close()
            raise

    def open(self, name: str) -> tuple[IO[bytes], int]:
        m = self.members.get(_member_name(name))
        if m is None:
            raise ImageError(f"image archive is missing {name} (truncated or not an image)")
        f = self.tar.extractfile(m)
        if f is None:  # pragma: no cover - regular members always have a reader
            raise ImageError(f"image archive member {name} cannot be read")
        return f, m.size

    def exists(self, name: str) -> bool:
        return _member_name(name) in self.members

    def close(self) -> None:
        self.tar.close()


def _blob_name(digest: str) -> str:
    if not _DIGEST_RE.fullmatch(digest):
        raise ImageError(f"unsupported or malformed digest {digest[:80]!r}")
    return f"blobs/sha256/{digest[7:]}"


def _verified(src: _Source, desc: Descriptor, what: str) -> bytes:
    data = src.read(_blob_name(desc.digest))
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != desc.digest:
        raise ImageError(f"{what} digest mismatch: expected {desc.digest}, got {got}; the image is corrupt")
    if len(data) != desc.size:
        raise ImageError(f"{what} is {len(data)} bytes, its descriptor says {desc.size}; the image is corrupt")
    return data


@dataclass(frozen=True, slots=True)
class _Layer:
    name: str  # member name in the source
    media_type: str | None
    what: str
    digest: str | None  # of the blob as stored (OCI); docker-save archives have none
    size: int | None
    diff_id: str


def _diff_ids(config: ImageConfig, count: int) -> tuple[str, ...]:
    ids = config.rootfs.diff_ids
    if len(ids) != count:
        raise ImageError(
            f"the image config lists {len(ids)} rootfs.diff_ids for {count} layers: every layer must "
            "have one (it is how its content is verified); refusing the image"
        )
    for d in ids:
        if not _DIGEST_RE.fullmatch(d):
            raise ImageError(f"rootfs.diff_ids holds {d[:80]!r}, not a sha256 digest; refusing the image")
    return ids


def _layers_oci(src: _Source, ref: str | None) -> tuple[list[_Layer], ImageConfig, str]:
    index = _record(Index, src.read("index.json"), "index.json")
    if not index.manifests:
        raise ImageError("index.json lists no manifests")
    chosen = index.manifests[0]
    if ref:
        for m in index.manifests:
            if (m.annotations or {}).get("org.opencontainers.image.ref.name") == ref:
                chosen = m
                break
        else:
            raise ImageError(f"no manifest tagged {ref!r} in the image")
    manifest = _record(Manifest, _verified(src, chosen, "manifest"), "manifest")
    for _ in range(MAX_INDEX_NESTING):
        if manifest.mediaType not in MEDIA_INDEX and manifest.manifests is None:
            break
        for m in manifest.manifests or ():
            plat = m.platform or Platform()
            if plat.architecture in (None, "amd64") and plat.os in (None, "linux"):
                manifest = _record(Manifest, _verified(src, m, "manifest"), "manifest")
                break
        else:
            raise ImageError("the image has no linux/amd64 manifest")
    else:
        raise ImageError(f"the image's indexes nest more than {MAX_INDEX_NESTING} deep; refusing it")
    if manifest.config is None:
        raise ImageError("the manifest names no image config; refusing the image")
    config = _record(ImageConfig, _verified(src, manifest.config, "image config"), "image config")
    ids = _diff_ids(config, len(manifest.layers))
    layers = [
        _Layer(_blob_name(d.digest), d.mediaType, f"layer {i} ({d.digest[:19]})", d.digest, d.size, ids[i])
        for i, d in enumerate(manifest.layers)
    ]
    return layers, config, chosen.digest


def _layers_docker(src: _Source) -> tuple[list[_Layer], ImageConfig, str]:
    try:
        entries = load_json(src.read("manifest.json"), what="manifest.json", max_bytes=MAX_JSON)
    except UntrustedInput as err:
        raise ImageError(f"{err}; refusing the image") from None
    if not isinstance(entries, list) or not entries:
        raise ImageError("manifest.json of the docker archive is empty or not a list")
    try:
        entry = parse(DockerEntry, entries[0], what="manifest.json[0]", unknown="ignore")
    except UntrustedInput as err:
        raise ImageError(f"{err}; refusing the image") from None
    config_data = src.read(entry.Config)
    digest = "sha256:" + hashlib.sha256(config_data).hexdigest()
    base = os.path.basename(entry.Config).split(".")[0]
    if (entry.Config.startswith("blobs/sha256/") or len(base) == 64) and base != digest[7:]:
        raise ImageError(f"image config digest mismatch: expected sha256:{base[:64]}, got {digest}")
    config = _record(ImageConfig, config_data, "image config")
    ids = _diff_ids(config, len(entry.Layers))
    layers = [_Layer(name, None, f"layer {i} ({name[:40]})", None, None, ids[i]) for i, name in enumerate(entry.Layers)]
    return layers, config, digest


def _check_blob(src: _Source, layer: _Layer) -> None:
    f, size = src.open(layer.name)
    with f:
        if layer.size is not None and size != layer.size:
            raise ImageError(f"{layer.what} is {size} bytes, its descriptor says {layer.size}; the image is corrupt")
        blob = _Counted(f, size, layer.what)
        blob.drain()
    if blob.count != size:
        raise ImageError(f"{layer.what} is truncated")
    if blob.digest() != layer.digest:
        raise ImageError(
            f"{layer.what} digest mismatch: expected {layer.digest}, got {blob.digest()}; the image is corrupt"
        )


def import_image(path: str, name: str | None = None, store: str | None = None, ref: str | None = None) -> str:
    """Import an OCI layout directory, an OCI archive or a ``docker save`` archive; return its directory."""
    if not os.path.exists(path):
        raise ConfigError(f"image {path} does not exist")
    src: _Source = _DirSource(path) if os.path.isdir(path) else _TarSource(path)
    try:
        return _import(src, path, name, store, ref)
    finally:
        src.close()


def _import(src: _Source, path: str, name: str | None, store: str | None, ref: str | None) -> str:
    if src.exists("index.json"):
        layers, config, digest = _layers_oci(src, ref)
    elif src.exists("manifest.json"):
        layers, config, digest = _layers_docker(src)
    else:
        raise ImageError(
            f"{path} is neither an OCI image layout nor a docker-save archive (no index.json or manifest.json)"
        )
    name = name or os.path.basename(path.rstrip("/")).split(".")[0] or digest[7:19]
    from virtkit.container.state import remove_tree, validate_id

    try:
        validate_id(name)
    except ContainerError:
        raise ConfigError(f"invalid image name {name!r}: use letters, digits and _ . + -") from None
    root = os.path.join(ensure_store(store), name)
    tmp = root + ".importing"
    remove_tree(tmp)
    os.mkdir(tmp, 0o700)
    os.mkdir(os.path.join(tmp, "rootfs"), 0o755)
    budget = Budget()
    try:
        for layer in layers:
            if layer.digest is not None:
                # the stored blob is checked before anything reads it as gzip or tar: a tampered blob
                # never reaches the decompressor or the extractor (one more streaming read of a local file)
                _check_blob(src, layer)
            f, size = src.open(layer.name)
            with f:
                if layer.size is not None and size != layer.size:
                    raise ImageError(
                        f"{layer.what} is {size} bytes, its descriptor says {layer.size}; the image is corrupt"
                    )
                got = apply_layer(
                    f, os.path.join(tmp, "rootfs"), layer.what, layer.media_type, budget, compressed_limit=size
                )
            if got.compressed_size != size:
                raise ImageError(f"{layer.what} is truncated")
            if layer.digest is not None and got.compressed_digest != layer.digest:
                raise ImageError(
                    f"{layer.what} digest mismatch: expected {layer.digest}, got "
                    f"{got.compressed_digest}; the image is corrupt"
                )
            if got.diff_id != layer.diff_id:
                raise ImageError(
                    f"{layer.what} digest mismatch: its content is {got.diff_id}, the image config "
                    f"says {layer.diff_id}; the image is corrupt"
                )
        meta = StoreMeta(name, digest, os.path.abspath(path), config.config, len(budget.skipped_devices))
        _write_json(
            os.path.join(tmp, "image.json"),
            {**dataclasses.asdict(meta), "config": (config.config.as_dict() if config.config else {})},
        )
        remove_tree(root)
        os.rename(tmp, root)
    except BaseException:
        remove_tree(tmp)
        raise
    if budget.skipped_devices:
        import sys

        shown = ", ".join(budget.skipped_devices[:5]) + (" ..." if len(budget.skipped_devices) > 5 else "")
        print(
            f"virtkit: warning: image {name}: skipped {len(budget.skipped_devices)} device node(s) "
            f"({shown}); images never bring device nodes",
            file=sys.stderr,
        )
    return root


def _meta(root: str) -> StoreMeta:
    from virtkit.container.state import read_small

    try:
        data = read_small(os.path.join(root, "image.json"), MAX_JSON)
        return parse(
            StoreMeta,
            load_object(data, what=f"{root}/image.json", max_bytes=MAX_JSON),
            what="image.json",
            unknown="ignore",
        )
    except (OSError, UntrustedInput) as err:
        raise ImageError(f"image {os.path.basename(root)} in the store is damaged ({err}); import it again") from None


def resolve(image: str, store: str | None = None) -> tuple[str, dict[str, Any]]:
    """IMAGE as the CLI takes it -> (rootfs directory, image config). ``busybox`` is built in; a path
    to a rootfs directory is used as is; a path to an image (layout or archive) is imported."""
    if image == "busybox":
        root = ensure_busybox(store)
    elif "/" not in image and image not in (".", "..") and os.path.isdir(os.path.join(store_dir(store), image)):
        root = os.path.join(store_dir(store), image)
    elif os.path.exists(image):
        if (
            os.path.isdir(image)
            and not os.path.exists(os.path.join(image, "index.json"))
            and not os.path.exists(os.path.join(image, "manifest.json"))
        ):
            return os.path.abspath(image), {}
        root = import_image(image, store=store)
    else:
        raise ConfigError(
            f"unknown image {image!r}: use 'busybox', an image name from 'virtkit images', "
            "or a path to an OCI layout, a docker-save archive or a rootfs directory"
        )
    meta = _meta(root)
    return os.path.join(root, "rootfs"), meta.config.as_dict() if meta.config else {}


def list_images(store: str | None = None) -> Iterator[dict[str, Any]]:
    base = store_dir(store)
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return
    for n in names:
        if n.endswith(".importing"):
            continue
        try:
            meta = _meta(os.path.join(base, n))
        except ImageError:
            continue
        yield {
            "name": meta.name,
            "digest": meta.digest,
            "source": meta.source or "",
            "skipped_devices": meta.skipped_devices,
        }
