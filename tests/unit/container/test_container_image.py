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
    apply_layer(io.BytesIO(layer(("d", "etc", None), ("f", "etc/a", b"a"), ("f", "etc/b", b"b"),
                                 ("d", "var/cache", None), ("f", "var/cache/x", b"x"), ("l", "bin", "usr/bin"))),
                str(root))
    apply_layer(io.BytesIO(gzip.compress(layer(("f", "etc/.wh.a", b""), ("f", "var/cache/.wh..wh..opq", b""),
                                               ("f", "var/cache/y", b"y"), ("f", "etc/b", b"B"),
                                               ("h", "etc/c", "etc/b")))), str(root))
    assert not (root / "etc/a").exists()
    assert (root / "etc/b").read_bytes() == b"B"
    assert sorted(os.listdir(root / "var/cache")) == ["y"]
    assert os.readlink(root / "bin") == "usr/bin"
    assert os.stat(root / "etc/c").st_ino == os.stat(root / "etc/b").st_ino


@pytest.mark.parametrize("entries", [
    [("f", "../evil", b"x")],
    [("f", "/abs/evil", b"x")],
    [("f", "a/../../evil", b"x")],
    [("l", "link", "/etc"), ("f", "link/passwd", b"x")],  # through a symlink the layer made
    [("h", "hl", "../../etc/passwd")],
    [("l", "out", "/"), ("h", "hl", "out/etc/passwd")],
], ids=["dotdot", "absolute", "nested-dotdot", "via-symlink", "hardlink-dotdot", "hardlink-via-symlink"])
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


def make_oci_layout(path: Path) -> Path:
    path.mkdir()
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    l1 = layer(("d", "bin", None), ("f", "bin/hello", b"#!/bin/sh\necho hi\n"), ("f", "etc/gone", b"x"))
    l2 = gzip.compress(layer(("f", "etc/.wh.gone", b""), ("f", "etc/motd", b"welcome")))
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/bin", "A=1"], "Cmd": ["/bin/hello"], "WorkingDir": "/tmp"},
              "rootfs": {"type": "layers", "diff_ids": []}}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           **_blob(path, json.dumps(config).encode())},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **_blob(path, l1)},
                           {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_blob(path, l2)}]}
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **_blob(path, json.dumps(manifest).encode()),
         "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}
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
    config = json.dumps({"config": {"Cmd": ["cat", "/hello.txt"]}, "rootfs": {"type": "layers",
                                                                               "diff_ids": [diff_id]}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    with tarfile.open(path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add(config_name, config)
        add("abc/layer.tar", l1)
        add("manifest.json", json.dumps([{"Config": config_name, "RepoTags": ["x:latest"],
                                          "Layers": ["abc/layer.tar"]}]).encode())
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
