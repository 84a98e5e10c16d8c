"""Image import: layers in order, whiteouts, gzip, digests, and refusal of unsafe archives."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from virtkit.container.image import ImageError, apply_layer, import_image, resolve


def layer(*entries: tuple[str, str, Any]) -> bytes:
    """entries: (kind, name, payload): kind f=file (bytes), d=dir, l=symlink (target), h=hardlink (target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for kind, name, payload in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if kind == "f":
                info.size = len(payload)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(payload))
                continue
            if kind == "d":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "l":
                info.type, info.linkname = tarfile.SYMTYPE, payload
            elif kind == "h":
                info.type, info.linkname = tarfile.LNKTYPE, payload
            tar.addfile(info)
    return buf.getvalue()


def test_layers_and_whiteouts(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    apply_layer(
        io.BytesIO(
            layer(
                ("d", "etc", None),
                ("f", "etc/a", b"a"),
                ("f", "etc/b", b"b"),
                ("d", "var/cache", None),
                ("f", "var/cache/x", b"x"),
                ("l", "bin", "usr/bin"),
            )
        ),
        str(root),
    )
    apply_layer(
        io.BytesIO(
            gzip.compress(
                layer(
                    ("f", "etc/.wh.a", b""),
                    ("f", "var/cache/.wh..wh..opq", b""),
                    ("f", "var/cache/y", b"y"),
                    ("f", "etc/b", b"B"),
                    ("h", "etc/c", "etc/b"),
                )
            )
        ),
        str(root),
    )
    assert not (root / "etc/a").exists()
    assert (root / "etc/b").read_bytes() == b"B"
    assert sorted(os.listdir(root / "var/cache")) == ["y"]
    assert os.readlink(root / "bin") == "usr/bin"
    assert os.stat(root / "etc/c").st_ino == os.stat(root / "etc/b").st_ino


@pytest.mark.parametrize(
    "entries",
    [
        [("f", "../evil", b"x")],
        [("f", "/abs/evil", b"x")],
        [("f", "a/../../evil", b"x")],
        [("l", "link", "/etc"), ("f", "link/passwd", b"x")],  # through a symlink the layer made
        [("h", "hl", "../../etc/passwd")],
        [("l", "out", "/"), ("h", "hl", "out/etc/passwd")],
    ],
    ids=["dotdot", "absolute", "nested-dotdot", "via-symlink", "hardlink-dotdot", "hardlink-via-symlink"],
)
def test_escapes_are_refused(tmp_path: Path, entries: list[tuple[str, str, Any]]) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    with pytest.raises(ImageError, match="escape|symlink"):
        apply_layer(io.BytesIO(layer(*entries)), str(root))
    assert not (tmp_path / "evil").exists()


def test_truncated_layer(tmp_path: Path) -> None:
    data = gzip.compress(layer(("f", "big", os.urandom(20000))))
    with pytest.raises(ImageError, match="truncated"):
        apply_layer(io.BytesIO(data[: len(data) // 2]), str(tmp_path))


def _blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs/sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_oci_layout(path: Path) -> Path:
    path.mkdir()
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    l1 = layer(("d", "bin", None), ("f", "bin/hello", b"#!/bin/sh\necho hi\n"), ("f", "etc/gone", b"x"))
    l2 = gzip.compress(layer(("f", "etc/.wh.gone", b""), ("f", "etc/motd", b"welcome")))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin", "A=1"], "Cmd": ["/bin/hello"], "WorkingDir": "/tmp"},
        "rootfs": {"type": "layers", "diff_ids": [_sha(l1), _sha(gzip.decompress(l2))]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **_blob(path, json.dumps(config).encode())},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", **_blob(path, l1)},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_blob(path, l2)},
        ],
    }
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **_blob(path, json.dumps(manifest).encode()),
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    (path / "index.json").write_text(json.dumps(index))
    return path


def test_import_oci_layout(tmp_path: Path) -> None:
    src = make_oci_layout(tmp_path / "img")
    root = Path(import_image(str(src), name="hello", store=str(tmp_path / "store")))
    assert (root / "rootfs/bin/hello").exists()
    assert (root / "rootfs/etc/motd").read_text() == "welcome"
    assert not (root / "rootfs/etc/gone").exists()
    rootfs, cfg = resolve("hello", store=str(tmp_path / "store"))
    assert rootfs == str(root / "rootfs")
    assert cfg["Cmd"] == ["/bin/hello"] and cfg["WorkingDir"] == "/tmp"


def test_import_oci_archive_and_digest_mismatch(tmp_path: Path) -> None:
    src = make_oci_layout(tmp_path / "img")
    archive = tmp_path / "img.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname=".")
    import_image(str(archive), name="fromtar", store=str(tmp_path / "store"))
    # corrupt one layer blob in place: its content no longer matches its name
    blobs = sorted((src / "blobs/sha256").iterdir(), key=lambda p: p.stat().st_size)
    biggest = blobs[-1]
    biggest.write_bytes(biggest.read_bytes()[:-1] + b"!")
    with pytest.raises(ImageError, match="digest mismatch"):
        import_image(str(src), name="bad", store=str(tmp_path / "store"))
    assert not (tmp_path / "store/bad").exists()
    assert not (tmp_path / "store/bad.importing").exists()


def test_truncated_archive(tmp_path: Path) -> None:
    src = make_oci_layout(tmp_path / "img")
    archive = tmp_path / "img.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname=".")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated|missing"):
        import_image(str(archive), name="cut", store=str(tmp_path / "store"))
    assert not (tmp_path / "store/cut").exists()


def make_docker_save(path: Path, corrupt: bool = False) -> Path:
    l1 = layer(("f", "hello.txt", b"docker"))
    diff_id = "sha256:" + hashlib.sha256(l1 if not corrupt else b"other").hexdigest()
    config = json.dumps(
        {"config": {"Cmd": ["cat", "/hello.txt"]}, "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    with tarfile.open(path, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add(config_name, config)
        add("abc/layer.tar", l1)
        add(
            "manifest.json",
            json.dumps([{"Config": config_name, "RepoTags": ["x:latest"], "Layers": ["abc/layer.tar"]}]).encode(),
        )
    return path


def test_import_docker_save(tmp_path: Path) -> None:
    root = Path(import_image(str(make_docker_save(tmp_path / "d.tar")), name="d", store=str(tmp_path / "s")))
    assert (root / "rootfs/hello.txt").read_bytes() == b"docker"
    with pytest.raises(ImageError, match="digest mismatch"):
        import_image(str(make_docker_save(tmp_path / "bad.tar", corrupt=True)), name="bad", store=str(tmp_path / "s"))


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("")
    with pytest.raises(ImageError, match="neither an OCI image layout nor a docker-save"):
        import_image(str(tmp_path / "x"), store=str(tmp_path / "s"))


def test_zstd_layer_without_module_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real = builtins.__import__

    def no_zstd(name: str, *a: Any, **k: Any) -> Any:
        if name == "zstandard":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_zstd)
    with pytest.raises(ImageError, match="zstd"):
        apply_layer(io.BytesIO(b"\x28\xb5\x2f\xfd" + b"\0" * 16), str(tmp_path))


def test_zstd_layer(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    data = zstandard.ZstdCompressor().compress(layer(("f", "z", b"zstd!")))
    apply_layer(io.BytesIO(data), str(tmp_path))
    assert (tmp_path / "z").read_bytes() == b"zstd!"


# ---- hostile images ---------------------------------------------------------------------------


def node(name: str, kind: bytes, mode: int = 0o644, **attrs: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = kind, mode
    for k, v in attrs.items():
        setattr(info, k, v)
    return info


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def write_layout(
    path: Path,
    layers: list[bytes],
    *,
    diff_ids: list[str] | None = None,
    media: str = "application/vnd.oci.image.layer.v1.tar+gzip",
) -> Path:
    """An OCI layout holding ``layers`` (as stored: compressed or not), diff_ids computed unless given."""
    path.mkdir(exist_ok=True)
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    if diff_ids is None:
        diff_ids = [_sha(gzip.decompress(x) if x[:2] == b"\x1f\x8b" else x) for x in layers]
    config = {"config": {"Cmd": ["sh"]}, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    manifest = {
        "schemaVersion": 2,
        "config": _blob(path, json.dumps(config).encode()),
        "layers": [{"mediaType": media, **_blob(path, x)} for x in layers],
    }
    index = {"schemaVersion": 2, "manifests": [_blob(path, json.dumps(manifest).encode())]}
    (path / "index.json").write_text(json.dumps(index))
    return path


def test_device_nodes_are_never_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import stat

    major, minor = os.major(os.stat("/").st_dev), os.minor(os.stat("/").st_dev)
    layer0 = tar_of(
        (node("dev", tarfile.DIRTYPE, 0o755), None),
        (node("dev/disk", tarfile.BLKTYPE, 0o666, devmajor=major, devminor=minor), None),
        (node("dev/null", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3), None),
        (node("dev/mem", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=1), None),
        (node("disk-again", tarfile.LNKTYPE, linkname="dev/disk"), None),
        (node("fifo", tarfile.FIFOTYPE, 0o4666), None),
        (node("ok", tarfile.REGTYPE), b"ok"),
    )
    root = Path(
        import_image(
            str(write_layout(tmp_path / "img", [gzip.compress(layer0)])), name="devs", store=str(tmp_path / "store")
        )
    )
    rootfs = root / "rootfs"
    found = [p for p in rootfs.rglob("*") if stat.S_ISBLK(p.lstat().st_mode) or stat.S_ISCHR(p.lstat().st_mode)]
    assert found == []
    assert not (rootfs / "disk-again").exists()
    assert stat.S_ISFIFO((rootfs / "fifo").lstat().st_mode) and (rootfs / "fifo").lstat().st_mode & 0o7777 == 0o666
    assert (rootfs / "ok").read_bytes() == b"ok"
    err = capsys.readouterr().err
    assert "skipped 3 device node(s)" in err and "/dev/disk" in err
    assert json.loads((root / "image.json").read_text())["skipped_devices"] == 3


def test_setuid_setgid_are_cleared_on_purpose(tmp_path: Path) -> None:
    layer0 = tar_of(
        (node("su", tarfile.REGTYPE, 0o4755), b"x"),
        (node("sg", tarfile.REGTYPE, 0o2755), b"x"),
        (node("sticky-file", tarfile.REGTYPE, 0o1644), b"x"),
        (node("tmp", tarfile.DIRTYPE, 0o1777), None),
        (node("sgdir", tarfile.DIRTYPE, 0o2775), None),
        (node("link-to-su", tarfile.LNKTYPE, linkname="su"), None),
    )
    root = tmp_path / "rootfs"
    root.mkdir()
    apply_layer(io.BytesIO(layer0), str(root))
    modes = {n: os.lstat(root / n).st_mode & 0o7777 for n in ("su", "sg", "sticky-file", "tmp", "sgdir", "link-to-su")}
    assert modes == {"su": 0o755, "sg": 0o755, "sticky-file": 0o644, "tmp": 0o1777, "sgdir": 0o775, "link-to-su": 0o755}
    # owned by root as in the archive: the bits are dropped by safe_mode, not by chown(2) as a side effect
    assert os.lstat(root / "su").st_uid == 0


def _big_layer(path: Path, size: int, compression: str) -> str:
    """A layer holding one file of ``size`` zero bytes (a few hundred KiB compressed); its diff_id."""
    sha = hashlib.sha256()
    with open(path, "wb") as raw:
        if compression == "zstd":
            zstandard = pytest.importorskip("zstandard")
            out: Any = zstandard.ZstdCompressor(level=1).stream_writer(raw)
        else:
            out = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1)
        with out:

            def put(data: bytes) -> None:
                sha.update(data)
                out.write(data)

            info = tarfile.TarInfo("big")
            info.size = size
            put(info.tobuf())
            zero = bytes(1 << 20)
            for _ in range(size >> 20):
                put(zero)
            put(bytes(2 * tarfile.BLOCKSIZE))
    return "sha256:" + sha.hexdigest()


def _docker_save(path: Path, layer: bytes, diff_id: str) -> Path:
    config = json.dumps({"config": {"Cmd": ["sh"]}, "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in (
            ("c.json", config),
            ("l/layer.tar", layer),
            ("manifest.json", json.dumps([{"Config": "c.json", "Layers": ["l/layer.tar"]}]).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


IMPORT_AND_REPORT = """
import json, sys
from virtkit.container.image import ImageError, import_image
try:
    import_image(sys.argv[1], name="big", store=sys.argv[2])
    result = "ok"
except ImageError as err:
    result = str(err)
with open("/proc/self/status") as f:
    hwm = [int(line.split()[1]) for line in f if line.startswith("VmHWM:")][0]
print(json.dumps({"result": result, "peak_kib": hwm}))
"""


@pytest.mark.parametrize(
    ("fmt", "limit"),
    [("oci-gzip", None), ("oci-zstd", None), ("docker-gzip", None), ("docker-gzip", "64M")],
    ids=["oci-gzip", "oci-zstd", "docker-gzip", "over-the-limit"],
)
def test_a_layer_that_inflates_to_hundreds_of_mib(tmp_path: Path, fmt: str, limit: str | None) -> None:
    """docker-save and zstd layers used to be inflated whole in memory (and the compressed copy kept):
    384 MiB of content took over 768 MiB of RSS. Now every layer streams through a capped reader."""
    import subprocess
    import sys

    size = 384 << 20
    kind, compression = fmt.split("-")
    diff_id = _big_layer(tmp_path / "layer", size, compression)
    blob = (tmp_path / "layer").read_bytes()
    if kind == "oci":
        media = "application/vnd.oci.image.layer.v1.tar+" + compression
        image = write_layout(tmp_path / "img", [blob], diff_ids=[diff_id], media=media)
    else:
        image = _docker_save(tmp_path / "img.tar", blob, diff_id)
    env = dict(os.environ)
    if limit:
        env["VIRTKIT_IMAGE_MAX_BYTES"] = limit
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_AND_REPORT, str(image), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    report = json.loads(out.stdout)
    assert report["peak_kib"] < 160 << 10, report  # the interpreter and its imports are some 40 MiB
    if limit:
        assert "larger than 67108864 bytes" in report["result"]
        assert os.listdir(tmp_path / "store") == []
    else:
        assert report["result"] == "ok", report
        assert os.path.getsize(tmp_path / "store/big/rootfs/big") == size


@pytest.mark.parametrize("diff_ids", [[], ["sha256:" + "0" * 64], None], ids=["none", "wrong", "malformed"])
def test_diff_ids_are_required_and_checked(tmp_path: Path, diff_ids: list[str] | None) -> None:
    layer0 = gzip.compress(tar_of((node("f", tarfile.REGTYPE), b"content")))
    ids = diff_ids if diff_ids is not None else ["md5:abc"]
    with pytest.raises(ImageError, match="diff_ids|digest mismatch|sha256 digest") as info:
        import_image(
            str(write_layout(tmp_path / "img", [layer0], diff_ids=ids)), name="x", store=str(tmp_path / "store")
        )
    assert "\n" not in str(info.value)
    assert not (tmp_path / "store").exists() or os.listdir(tmp_path / "store") == []


def test_docker_save_without_diff_ids_is_refused(tmp_path: Path) -> None:
    l1 = tar_of((node("f", tarfile.REGTYPE), b"x"))
    config = json.dumps({"config": {"Cmd": ["sh"]}, "rootfs": {"type": "layers"}}).encode()
    path = tmp_path / "d.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (
            ("c.json", config),
            ("l/layer.tar", l1),
            ("manifest.json", json.dumps([{"Config": "c.json", "Layers": ["l/layer.tar"]}]).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ImageError, match="rootfs"):
        import_image(str(path), name="d", store=str(tmp_path / "s"))


def test_blob_size_must_match_its_descriptor(tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "img", [gzip.compress(tar_of((node("f", tarfile.REGTYPE), b"x")))])
    index = json.loads((layout / "index.json").read_text())
    mpath = layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]
    manifest = json.loads(mpath.read_text())
    manifest["layers"][0]["size"] += 1
    index["manifests"][0] = {**_blob(layout, json.dumps(manifest).encode())}
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(ImageError, match="descriptor says"):
        import_image(str(layout), name="x", store=str(tmp_path / "store"))


@pytest.mark.parametrize(
    ("members", "needle"),
    [
        ([(node("a" * 300, tarfile.REGTYPE), b"x")], "longer or deeper"),
        ([(node("/".join(["d"] * 300), tarfile.REGTYPE), b"x")], "longer or deeper"),
        ([(node("x" * 5000, tarfile.REGTYPE), b"x")], "longer or deeper"),
        ([(node("s", tarfile.SYMTYPE, linkname="y" * 5000), None)], "impossible target"),
        ([(node("d", tarfile.DIRTYPE), None), (node("h", tarfile.LNKTYPE, linkname="d"), None)], "directory"),
        ([(node("d", tarfile.DIRTYPE), None), (node("d/.wh..", tarfile.REGTYPE), b"")], "names no file"),
        ([(node("l", tarfile.SYMTYPE, linkname="/"), None), (node("l/.wh.etc", tarfile.REGTYPE), b"")], "symlink"),
    ],
    ids=["long-name", "deep", "long-path", "long-link", "hardlink-to-dir", "whiteout-dotdot", "whiteout-via-link"],
)
def test_limits_and_unsafe_entries(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], needle: str
) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    with pytest.raises(ImageError, match=needle):
        apply_layer(io.BytesIO(tar_of(*members)), str(root))


def test_a_huge_tar_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """tarfile reads a pax header whole: 2 GiB of it would be 2 GiB of memory."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 2 << 30
    data = header.tobuf(format=tarfile.USTAR_FORMAT) + b"x" * 4096  # the rest is never read
    with pytest.raises(ImageError, match="tar header of 2147483648 bytes"):
        apply_layer(io.BytesIO(data), str(tmp_path))


def test_too_many_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from virtkit.container import image

    monkeypatch.setattr(image, "MAX_ENTRIES", 50)
    members = [(node(f"f{i}", tarfile.REGTYPE), b"") for i in range(60)]
    with pytest.raises(ImageError, match="more than 50 files"):
        apply_layer(io.BytesIO(tar_of(*members)), str(tmp_path), budget=image.Budget(entries_left=50))


def test_a_symlink_is_replaced_not_written_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("keep")
    root = tmp_path / "rootfs"
    root.mkdir()
    apply_layer(io.BytesIO(tar_of((node("f", tarfile.SYMTYPE, linkname=str(outside)), None))), str(root))
    apply_layer(io.BytesIO(tar_of((node("f", tarfile.REGTYPE), b"new"))), str(root))
    assert outside.read_text() == "keep"
    assert not os.path.islink(root / "f") and (root / "f").read_bytes() == b"new"


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_layout_blobs_must_be_regular_files(tmp_path: Path, kind: str) -> None:
    layout = write_layout(tmp_path / "img", [gzip.compress(tar_of((node("f", tarfile.REGTYPE), b"x")))])
    index = json.loads((layout / "index.json").read_text())
    blob = layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]
    blob.unlink()
    if kind == "symlink":
        os.symlink("/dev/zero", blob)
    else:
        os.mkfifo(blob)  # a plain open would wait for a writer forever
    with pytest.raises(ImageError, match="cannot be read|not a regular file"):
        import_image(str(layout), name="x", store=str(tmp_path / "store"))


@pytest.mark.parametrize(
    "index",
    [
        b"[" * 10_000,
        b'{"manifests": "x"}',
        b'{"manifests": [{"digest": 5}]}',
        b'{"manifests": [{"digest": "sha256:../../etc/passwd", "size": 1}]}',
        b" " * (5 << 20),
    ],
    ids=["deep", "wrong-type", "bad-digest-type", "digest-path", "huge"],
)
def test_hostile_index_json(tmp_path: Path, index: bytes) -> None:
    layout = write_layout(tmp_path / "img", [gzip.compress(tar_of((node("f", tarfile.REGTYPE), b"x")))])
    (layout / "index.json").write_bytes(index)
    with pytest.raises(ImageError) as info:
        import_image(str(layout), name="x", store=str(tmp_path / "store"))
    assert "\n" not in str(info.value)


def test_store_directories_are_private(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir(mode=0o755)
    os.chmod(store, 0o755)
    import_image(
        str(write_layout(tmp_path / "img", [gzip.compress(tar_of((node("f", tarfile.REGTYPE), b"x")))])),
        name="x",
        store=str(store),
    )
    assert os.stat(store).st_mode & 0o777 == 0o700
    assert os.stat(store / "x").st_mode & 0o777 == 0o700


def test_zstd_multi_frame_layer(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    data = tar_of((node("a", tarfile.REGTYPE), b"A" * 5000), (node("b", tarfile.REGTYPE), b"B"))
    c = zstandard.ZstdCompressor()
    frames = c.compress(data[:2048]) + c.compress(data[2048:])
    got = apply_layer(io.BytesIO(frames), str(tmp_path))
    assert (tmp_path / "b").read_bytes() == b"B"
    assert got.diff_id == _sha(data)
