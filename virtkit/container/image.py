"""Images without a registry: the built-in busybox image, OCI layouts, ``docker save`` archives.

An image store is a directory (default ``/var/lib/virtkit/images``) with one directory per image::

    STORE/NAME/rootfs/        the unpacked layers (shared, read-only by convention)
    STORE/NAME/image.json     {"name", "digest", "config": {Env, Cmd, Entrypoint, WorkingDir, User}}

Containers run on an overlayfs over ``rootfs`` (copy-on-write: the image is never written).

Layer extraction refuses what could write outside the rootfs: absolute or ``..`` member names,
members below a symlink, and hard links to outside; whiteouts (``.wh.NAME``) delete, opaque markers
(``.wh..wh..opq``) empty a directory, per the OCI image-spec layer.md "Whiteouts".
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from typing import IO, Any

from virtkit.errors import ConfigError, ContainerError

DEFAULT_STORE = "/var/lib/virtkit/images"
BUSYBOX_BINARY = "/bin/busybox"
WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"

MEDIA_LAYER_TAR = ("application/vnd.oci.image.layer.v1.tar", "application/vnd.docker.image.rootfs.diff.tar")
MEDIA_LAYER_GZIP = ("application/vnd.oci.image.layer.v1.tar+gzip",
                    "application/vnd.docker.image.rootfs.diff.tar.gzip")
MEDIA_LAYER_ZSTD = ("application/vnd.oci.image.layer.v1.tar+zstd",)
MEDIA_INDEX = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")


class ImageError(ContainerError):
    """An image cannot be imported (truncated, digest mismatch, unsafe layer...)."""


def store_dir(store: str | None = None) -> str:
    return os.path.abspath(store or os.environ.get("VIRTKIT_IMAGES") or DEFAULT_STORE)


# --------------------------------------------------------------------------------------------
# overlayfs


def mount_overlay(lower: str, upper: str, work: str, target: str) -> None:
    from virtkit.container import libc

    for d in (upper, work, target):
        os.makedirs(d, exist_ok=True)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    try:
        libc.mount("overlay", target, "overlay", 0, opts)
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
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root", "var/tmp",
              "home", "run"):
        os.makedirs(os.path.join(tmp, d), exist_ok=True)
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
    root = os.path.join(store_dir(store), "busybox")
    if not os.path.isfile(os.path.join(root, "image.json")):
        os.makedirs(root, exist_ok=True)
        build_busybox(os.path.join(root, "rootfs"))
        meta = {"name": "busybox", "digest": None, "source": BUSYBOX_BINARY,
                "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                           "Cmd": ["sh"], "WorkingDir": "/"}}
        _write_json(os.path.join(root, "image.json"), meta)
    return root


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.rename(tmp, path)


# --------------------------------------------------------------------------------------------
# layers


def _open_layer(data: IO[bytes], media_type: str | None, what: str) -> IO[bytes]:
    head = data.read(4)
    data.seek(0)
    if head[:2] == b"\x1f\x8b" or (media_type in MEDIA_LAYER_GZIP):
        return gzip.GzipFile(fileobj=data)  # type: ignore[return-value]
    if head == b"\x28\xb5\x2f\xfd" or media_type in MEDIA_LAYER_ZSTD:
        try:
            import zstandard
        except ImportError:
            raise ImageError(f"{what} is zstd-compressed and the 'zstandard' module is not installed "
                             "(pip install zstandard)") from None
        return io.BytesIO(zstandard.ZstdDecompressor().stream_reader(data).read())
    return data


def _check_member(m: tarfile.TarInfo, rootfs: str, what: str) -> str:
    name = m.name
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        raise ImageError(f"{what}: entry {name!r} would escape the rootfs; refusing the image")
    dest = os.path.join(rootfs, *parts) if parts else rootfs
    # no member may be written through a symlink an earlier member created
    cur = rootfs
    for p in parts[:-1]:
        cur = os.path.join(cur, p)
        if os.path.islink(cur):
            raise ImageError(f"{what}: entry {name!r} goes through the symlink {p!r}; refusing the image")
    if m.islnk():
        target = [p for p in m.linkname.split("/") if p not in ("", ".")]
        if ".." in target:
            raise ImageError(f"{what}: hard link {name!r} -> {m.linkname!r} escapes the rootfs; refusing the image")
        cur = rootfs
        for p in target:
            cur = os.path.join(cur, p)
            if os.path.islink(cur):
                raise ImageError(f"{what}: hard link {name!r} -> {m.linkname!r} goes through a symlink; "
                                 "refusing the image")
    return dest


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def apply_layer(fileobj: IO[bytes], rootfs: str, what: str = "layer", media_type: str | None = None) -> None:
    """Unpack one layer tar onto ``rootfs``, applying whiteouts."""
    stream = _open_layer(fileobj, media_type, what)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for m in tar:
                dest = _check_member(m, rootfs, what)
                base = os.path.basename(dest)
                parent = os.path.dirname(dest)
                if base == OPAQUE:
                    if os.path.isdir(parent):
                        for child in os.listdir(parent):
                            _remove(os.path.join(parent, child))
                    continue
                if base.startswith(WHITEOUT_PREFIX):
                    _remove(os.path.join(parent, base[len(WHITEOUT_PREFIX):]))
                    continue
                if os.path.lexists(dest) and not (m.isdir() and os.path.isdir(dest) and not os.path.islink(dest)):
                    _remove(dest)
                os.makedirs(parent, exist_ok=True)
                if m.isdir():
                    os.makedirs(dest, exist_ok=True)
                    os.chmod(dest, m.mode & 0o7777)
                elif m.isreg():
                    src = tar.extractfile(m)
                    assert src is not None
                    with open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
                    os.chmod(dest, m.mode & 0o7777)
                elif m.issym():
                    os.symlink(m.linkname, dest)
                elif m.islnk():
                    target = os.path.join(rootfs, *[p for p in m.linkname.split("/") if p not in ("", ".")])
                    os.link(target, dest, follow_symlinks=False)
                elif m.ischr() or m.isblk() or m.isfifo():
                    kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
                    try:
                        os.mknod(dest, kind | (m.mode & 0o7777), os.makedev(m.devmajor, m.devminor))
                    except PermissionError:
                        continue
                else:
                    continue
                with contextlib.suppress(PermissionError):
                    os.lchown(dest, m.uid, m.gid)
                if not m.issym():
                    os.utime(dest, (m.mtime, m.mtime))
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as err:
        if isinstance(err, ImageError):
            raise
        raise ImageError(f"{what} is truncated or not a valid tar archive: {err}") from None


# --------------------------------------------------------------------------------------------
# sources: an OCI layout directory, or a docker-save/OCI archive (tar)


class _Source:
    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def open(self, name: str) -> IO[bytes]:
        return io.BytesIO(self.read(name))

    def exists(self, name: str) -> bool:
        raise NotImplementedError


class _DirSource(_Source):
    def __init__(self, path: str) -> None:
        self.path = path

    def _p(self, name: str) -> str:
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ImageError(f"image refers to {name!r}, outside the image; refusing it")
        return os.path.join(self.path, *parts)

    def read(self, name: str) -> bytes:
        try:
            with open(self._p(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ImageError(f"image is missing {name} (truncated or not an image)") from None

    def open(self, name: str) -> IO[bytes]:
        try:
            return open(self._p(name), "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            raise ImageError(f"image is missing {name} (truncated or not an image)") from None

    def exists(self, name: str) -> bool:
        return os.path.exists(self._p(name))


def _member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


class _TarSource(_Source):
    def __init__(self, path: str) -> None:
        try:
            # open for the whole import: members are read on demand (closed with the process)
            self.tar = tarfile.open(path, "r:*")  # noqa: SIM115
            self.members = {_member_name(m.name): m for m in self.tar.getmembers()}
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ImageError(f"{path} is truncated or not an image archive: {err}") from None

    def read(self, name: str) -> bytes:
        m = self.members.get(_member_name(name))
        if m is None:
            raise ImageError(f"image archive is missing {name} (truncated or not an image)")
        try:
            f = self.tar.extractfile(m)
            assert f is not None
            data = f.read()
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ImageError(f"image archive member {name} is truncated: {err}") from None
        if len(data) != m.size:
            raise ImageError(f"image archive member {name} is truncated")
        return data

    def exists(self, name: str) -> bool:
        return _member_name(name) in self.members


def _blob_name(digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
        raise ImageError(f"unsupported or malformed digest {digest!r}")
    return f"blobs/sha256/{hexd}"


def _verified(src: _Source, digest: str, what: str) -> bytes:
    data = src.read(_blob_name(digest))
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != digest:
        raise ImageError(f"{what} digest mismatch: expected {digest}, got {got}; the image is corrupt")
    return data


def _layers_oci(src: _Source, ref: str | None) -> tuple[list[tuple[bytes, str | None, str]], dict[str, Any], str]:
    index = json.loads(src.read("index.json"))
    manifests = index.get("manifests") or []
    if not manifests:
        raise ImageError("index.json lists no manifests")
    chosen = manifests[0]
    if ref:
        for m in manifests:
            if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == ref:
                chosen = m
                break
        else:
            raise ImageError(f"no manifest tagged {ref!r} in the image")
    manifest = json.loads(_verified(src, chosen["digest"], "manifest"))
    while manifest.get("mediaType") in MEDIA_INDEX or "manifests" in manifest:
        for m in manifest["manifests"]:
            plat = m.get("platform") or {}
            if plat.get("architecture") in (None, "amd64") and plat.get("os") in (None, "linux"):
                manifest = json.loads(_verified(src, m["digest"], "manifest"))
                break
        else:
            raise ImageError("the image has no linux/amd64 manifest")
    config = json.loads(_verified(src, manifest["config"]["digest"], "image config"))
    layers = []
    for i, layer in enumerate(manifest.get("layers") or []):
        data = _verified(src, layer["digest"], f"layer {i}")
        layers.append((data, layer.get("mediaType"), f"layer {i} ({layer['digest'][:19]})"))
    return layers, config, chosen["digest"]


def _layers_docker(src: _Source) -> tuple[list[tuple[bytes, str | None, str]], dict[str, Any], str]:
    manifest = json.loads(src.read("manifest.json"))
    if not isinstance(manifest, list) or not manifest:
        raise ImageError("manifest.json of the docker archive is empty")
    entry = manifest[0]
    config_name = entry["Config"]
    config_data = src.read(config_name)
    digest = "sha256:" + hashlib.sha256(config_data).hexdigest()
    if config_name.startswith("blobs/sha256/") or len(os.path.basename(config_name).split(".")[0]) == 64:
        expect = os.path.basename(config_name).split(".")[0]
        if expect != digest[7:]:
            raise ImageError(f"image config digest mismatch: expected sha256:{expect}, got {digest}")
    config: dict[str, Any] = json.loads(config_data)
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    layers: list[tuple[bytes, str | None, str]] = []
    for i, name in enumerate(entry.get("Layers") or []):
        data = src.read(name)
        what = f"layer {i} ({name})"
        raw = data
        if raw[:2] == b"\x1f\x8b":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as err:
                raise ImageError(f"{what} is truncated: {err}") from None
        if i < len(diff_ids):
            got = "sha256:" + hashlib.sha256(raw).hexdigest()
            if got != diff_ids[i]:
                raise ImageError(f"{what} digest mismatch: expected {diff_ids[i]}, got {got}; the image is corrupt")
        layers.append((data, None, what))
    return layers, config, digest


def import_image(path: str, name: str | None = None, store: str | None = None, ref: str | None = None) -> str:
    """Import an OCI layout directory, an OCI archive or a ``docker save`` archive; return its directory."""
    if not os.path.exists(path):
        raise ConfigError(f"image {path} does not exist")
    src: _Source = _DirSource(path) if os.path.isdir(path) else _TarSource(path)
    if src.exists("index.json"):
        layers, config, digest = _layers_oci(src, ref)
    elif src.exists("manifest.json"):
        layers, config, digest = _layers_docker(src)
    else:
        raise ImageError(f"{path} is neither an OCI image layout nor a docker-save archive "
                         "(no index.json or manifest.json)")
    name = name or os.path.basename(path.rstrip("/")).split(".")[0] or digest[7:19]
    from virtkit.container.state import validate_id

    try:
        validate_id(name)
    except ContainerError:
        raise ConfigError(f"invalid image name {name!r}: use letters, digits and _ . + -") from None
    root = os.path.join(store_dir(store), name)
    tmp = root + ".importing"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "rootfs"))
    try:
        for data, media, what in layers:
            apply_layer(io.BytesIO(data), os.path.join(tmp, "rootfs"), what, media)
        _write_json(os.path.join(tmp, "image.json"),
                    {"name": name, "digest": digest, "source": os.path.abspath(path),
                     "config": config.get("config") or {}})
        shutil.rmtree(root, ignore_errors=True)
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def resolve(image: str, store: str | None = None) -> tuple[str, dict[str, Any]]:
    """IMAGE as the CLI takes it -> (rootfs directory, image config). ``busybox`` is built in; a path
    to a rootfs directory is used as is; a path to an image (layout or archive) is imported."""
    if image == "busybox":
        root = ensure_busybox(store)
    elif os.path.isdir(os.path.join(store_dir(store), image)) and "/" not in image:
        root = os.path.join(store_dir(store), image)
    elif os.path.exists(image):
        if os.path.isdir(image) and not os.path.exists(os.path.join(image, "index.json")) and \
                not os.path.exists(os.path.join(image, "manifest.json")):
            return os.path.abspath(image), {}
        root = import_image(image, store=store)
    else:
        raise ConfigError(f"unknown image {image!r}: use 'busybox', an image name from 'virtkit images', "
                          "or a path to an OCI layout, a docker-save archive or a rootfs directory")
    with open(os.path.join(root, "image.json")) as f:
        meta = json.load(f)
    return os.path.join(root, "rootfs"), meta.get("config") or {}


def list_images(store: str | None = None) -> Iterator[dict[str, Any]]:
    base = store_dir(store)
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return
    for n in names:
        try:
            with open(os.path.join(base, n, "image.json")) as f:
                yield json.load(f)
        except (OSError, ValueError):
            continue
