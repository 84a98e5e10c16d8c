"""Bad input (issue §5): a one-line error, a non-zero status, and nothing left behind.

The leak check of the ``rt`` fixture runs after each test: no mounts, cgroups, network devices,
processes or state directories may remain. The CLI runs in-process (the same code as the binary).
"""

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

from virtkit.cli import main

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, cgroups")]


def _one_line_error(status: int, err: str, *needles: str) -> None:
    assert status != 0
    assert err.startswith("virtkit: error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err


def _state_is_empty(rt: Any) -> None:
    assert rt.dirs.ids() == []
    if os.path.isdir(rt.dirs.root):
        assert [n for n in os.listdir(rt.dirs.root) if n.startswith(".new") or not n.startswith(".")] == []


def test_malformed_config_names_the_field(cli: Any, rt: Any, bundle: Any) -> None:
    b = bundle(["true"], {"linux.resources": {"memory": {"limit": "lots"}}})
    _one_line_error(*cli("create", "m", "--bundle", str(b)), "linux.resources.memory.limit")
    b = bundle(["true"])
    (b / "config.json").write_text((b / "config.json").read_text()[:-10])
    _one_line_error(*cli("create", "m", "--bundle", str(b)), "not valid JSON")
    _state_is_empty(rt)


def test_missing_rootfs(cli: Any, rt: Any, bundle: Any) -> None:
    b = bundle(["true"], {"root.path": "nowhere"})
    _one_line_error(*cli("create", "r", "--bundle", str(b)), "rootfs directory", "does not exist")
    _state_is_empty(rt)


def test_missing_executable(cli: Any, rt: Any, bundle: Any) -> None:
    _one_line_error(*cli("create", "x", "--bundle", str(bundle(["/no/such/program"]))), "no such executable")
    _one_line_error(*cli("create", "x", "--bundle", str(bundle(["nosuchprogram"]))), "not found in $PATH")
    _state_is_empty(rt)


def test_id_taken_and_bad_characters(cli: Any, rt: Any, bundle: Any) -> None:
    b = bundle(["sleep", "30"])
    assert cli("create", "taken", "--bundle", str(b))[0] == 0
    _one_line_error(*cli("create", "taken", "--bundle", str(b)), "already in use")
    assert rt.state("taken")["status"] == "created"  # the first one is untouched
    for bad in ("../escape", "a/b", ".hidden", "with space"):
        _one_line_error(*cli("create", bad, "--bundle", str(b)), "invalid container id")
    assert cli("delete", "taken")[0] == 0
    _state_is_empty(rt)


def test_invalid_transitions(cli: Any, rt: Any, bundle: Any) -> None:
    b = bundle(["sleep", "30"])
    assert cli("create", "t", "--bundle", str(b))[0] == 0
    assert cli("start", "t")[0] == 0
    _one_line_error(*cli("start", "t"), "cannot start container t: it is running")
    _one_line_error(*cli("delete", "t"), "it is running", "--force")
    _one_line_error(*cli("kill", "t", "SIGNOPE"), "unknown signal")
    _one_line_error(*cli("kill", "unknown-id", "KILL"), "does not exist")
    _one_line_error(*cli("exec", "unknown-id", "--", "true"), "does not exist")
    assert cli("delete", "--force", "t")[0] == 0
    _state_is_empty(rt)


@pytest.mark.parametrize(
    ("resources", "needle"),
    [
        ({"cpu": {"quota": 500, "period": 100000}}, "below the kernel's minimum of 1000us"),
        ({"cpu": {"period": 10}}, "outside what the kernel accepts"),
        ({"memory": {"limit": 100}}, "below one page"),
        ({"memory": {"limit": 64 << 20, "swap": 1 << 20}}, "must be at least memory.limit"),
        ({"pids": {"limit": -5}}, "negative"),
    ],
)
def test_limits_below_what_the_kernel_accepts(
    cli: Any, rt: Any, bundle: Any, resources: dict[str, Any], needle: str
) -> None:
    b = bundle(["true"], {"linux.resources": resources})
    _one_line_error(*cli("create", "lim", "--bundle", str(b)), needle)
    _state_is_empty(rt)


def test_limit_the_kernel_itself_refuses(cli: Any, rt: Any, bundle: Any) -> None:
    """A value only the kernel can judge (a CPU list naming CPUs that do not exist) fails cleanly too."""
    b = bundle(["true"], {"linux.resources": {"memory": {"swappiness": 50, "limit": 1 << 40, "swap": 1}}})
    status, err = cli("create", "k", "--bundle", str(b))
    _one_line_error(status, err, "memory")
    _state_is_empty(rt)


# ---- images ---------------------------------------------------------------------------------


def _layer(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = link
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return gzip.compress(buf.getvalue())


def _oci_archive(path: Path, layers: list[bytes], corrupt: bool = False, user: str | None = None) -> Path:
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> dict[str, Any]:
        d = hashlib.sha256(data).hexdigest()
        blobs[d] = data
        return {"digest": f"sha256:{d}", "size": len(data)}

    diff_ids = ["sha256:" + hashlib.sha256(gzip.decompress(x)).hexdigest() for x in layers]
    image_config: dict[str, Any] = {"Cmd": ["sh"], **({"User": user} if user else {})}
    config = blob(json.dumps({"config": image_config, "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode())
    manifest = {
        "schemaVersion": 2,
        "config": config,
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **blob(x)} for x in layers],
    }
    index = {"schemaVersion": 2, "manifests": [blob(json.dumps(manifest).encode())]}
    if corrupt:  # a layer whose content does not match its digest
        first = manifest["layers"][0]["digest"][7:]
        blobs[first] = blobs[first][:-1] + bytes([blobs[first][-1] ^ 1])
    with tarfile.open(path, "w") as tar:
        members = [
            ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
            ("index.json", json.dumps(index).encode()),
            *((f"blobs/sha256/{d}", b) for d, b in blobs.items()),
        ]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    ("layers", "corrupt", "truncate", "needle"),
    [
        ([_layer("etc/ok")], True, False, "digest mismatch"),
        ([_layer("etc/ok")], False, True, "truncated"),
        ([_layer("../../../../tmp/virtkit-escape")], False, False, "escape the rootfs"),
        ([_layer("link", kind=tarfile.SYMTYPE, link="/"), _layer("link/tmp/virtkit-escape")], False, False, "symlink"),
    ],
    ids=["digest", "truncated", "dotdot", "absolute-symlink"],
)
def test_bad_images(
    cli: Any,
    rt: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    layers: list[bytes],
    corrupt: bool,
    truncate: bool,
    needle: str,
) -> None:
    store = tmp_path / "store"
    monkeypatch.setenv("VIRTKIT_IMAGES", str(store))
    archive = _oci_archive(tmp_path / "img.tar", layers, corrupt=corrupt)
    if truncate:  # cut inside the members' data (the tail of a tar is only zero padding)
        with tarfile.open(archive) as tar:
            end = max(m.offset_data + m.size for m in tar.getmembers())
        archive.write_bytes(archive.read_bytes()[: end * 2 // 3])
    _one_line_error(*cli("import", str(archive), "--name", "bad"), needle)
    _one_line_error(*cli("run", "--mode", "container", str(archive), "--", "true"), needle)
    assert not os.path.exists("/tmp/virtkit-escape")
    assert not store.exists() or os.listdir(store) == []
    _state_is_empty(rt)


def test_good_image_runs_with_limits(
    rt: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """An imported image on top of busybox... here a one-layer image holding busybox itself."""
    store = tmp_path / "store"
    monkeypatch.setenv("VIRTKIT_IMAGES", str(store))
    monkeypatch.setenv("VIRTKIT_UNSEALED", "1")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add("/bin/busybox", arcname="bin/busybox")
        for applet in ("sh", "cat", "echo"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    archive = _oci_archive(tmp_path / "bb.tar", [gzip.compress(buf.getvalue())])
    status = main(
        [
            "--root",
            rt.dirs.root,
            "run",
            "--mode",
            "container",
            "--memory",
            "48M",
            "--pids-limit",
            "9",
            "--cpus",
            "0.5",
            str(archive),
            "--",
            "sh",
            "-c",
            "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/pids/pids.max "
            "/sys/fs/cgroup/cpu/cpu.cfs_quota_us; echo changed > /bin/file; exit 3",
        ]
    )
    out = capfd.readouterr().out
    assert status == 3, out
    assert out.split() == [str(48 << 20), "9", "50000"]
    # copy-on-write: the image's rootfs did not change
    assert not (store / "bb" / "rootfs" / "bin" / "file").exists()
    _state_is_empty(rt)


# ---- bundles and state records the CLI must survive ----------------------------------------------


@pytest.mark.parametrize("path", ["/virtkit/a\u0000b", "/", "", "/a/../../b", "/" + "x" * 300, "/cgroup.procs/x"])
def test_bad_cgroups_path_creates_nothing(cli: Any, rt: Any, bundle: Any, path: str) -> None:
    """A cgroupsPath with a NUL byte crashed run with a traceback and left a record that broke
    list, state and delete -f until removed by hand."""
    b = bundle(["true"], {"linux.cgroupsPath": path})
    _one_line_error(*cli("oci", "run", "nul", "--bundle", str(b)))
    _state_is_empty(rt)
    assert cli("list")[0] == 0
    _one_line_error(*cli("state", "nul"), "does not exist")


def _corruptions(good: bytes) -> dict[str, Any]:
    import json

    raw = json.loads(good)

    def hostile(**changes: Any) -> bytes:
        return json.dumps(dict(raw, **changes)).encode()

    return {
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "garbage": os.urandom(64),
        "array": b"[]",
        "deep": b"[" * 50_000 + b"]" * 50_000,
        "wrong-types": hostile(pid="1", status=7),
        "root-cgroup": hostile(cgroup_path="/"),  # delete must never kill the host's processes
        "foreign-mount": hostile(mounts=["/"]),
        "foreign-lease": hostile(lease="/etc/passwd"),
        "foreign-netdev": hostile(netdevs=["lo"]),
        "other-id": hostile(id="someone-else"),
        "no-state-file": None,
        "symlinked-state": "symlink",
    }


@pytest.mark.parametrize("kind", list(_corruptions(b'{"id": "x"}')))
def test_corrupt_state_never_makes_the_cli_unusable(cli: Any, rt: Any, bundle: Any, kind: str, tmp_path: Path) -> None:
    b = bundle(["sleep", "300"])
    assert cli("create", "bad", "--bundle", str(b))[0] == 0
    assert cli("start", "bad")[0] == 0
    rec = rt.dirs.load("bad")
    state = Path(rt.dirs.path("bad", "state.json"))
    content = _corruptions(state.read_bytes())[kind]
    if content is None:
        state.unlink()
    elif content == "symlink":
        target = tmp_path / "elsewhere.json"
        target.write_bytes(state.read_bytes())
        state.unlink()
        os.symlink(target, state)
    else:
        state.write_bytes(content)
    assert cli("create", "good", "--bundle", str(bundle(["true"])))[0] == 0  # others keep working
    status, err = cli("list")
    assert status == 0 and err.count("\n") == 1 and "virtkit: warning: state of container 'bad' is corrupt" in err
    _one_line_error(*cli("state", "bad"), "corrupt", "delete --force bad")
    _one_line_error(*cli("delete", "bad"), "corrupt")
    status, err = cli("delete", "--force", "bad")
    assert status == 0 and "was corrupt" in err, err
    # what the record named is released all the same: the init is gone, its cgroups too
    from virtkit.container.state import process_alive

    assert not process_alive(rec.pid, rec.pid_start)
    assert not any(os.path.exists(d) for d in rec.cgroup_dirs or [])
    assert cli("delete", "good")[0] == 0
    _state_is_empty(rt)


def test_an_image_never_brings_devices_or_setuid_files(
    rt: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The store handed out host devices: a layer's block device node was made with mknod in a
    world-traversable store, and an unprivileged user read the host's disk through it."""
    import stat

    store = tmp_path / "store"
    store.mkdir(mode=0o755)
    os.chmod(store, 0o755)  # an old, world-traversable store
    monkeypatch.setenv("VIRTKIT_IMAGES", str(store))
    major, minor = os.major(os.stat("/").st_dev), os.minor(os.stat("/").st_dev)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tar.gettarinfo("/bin/busybox", arcname="bin/busybox")
        info.mode = 0o4755  # setuid root
        info.uid = info.gid = 0
        with open("/bin/busybox", "rb") as f:
            tar.addfile(info, f)
        for applet in ("sh", "ls", "head", "stat"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        for name, kind, dev in (("disk", tarfile.BLKTYPE, (major, minor)), ("mem", tarfile.CHRTYPE, (1, 1))):
            node = tarfile.TarInfo(name)
            node.type, node.mode = kind, 0o666
            node.devmajor, node.devminor = dev
            tar.addfile(node)
    archive = _oci_archive(tmp_path / "devs.tar", [gzip.compress(buf.getvalue())])
    monkeypatch.setenv("VIRTKIT_UNSEALED", "1")
    assert main(["--root", rt.dirs.root, "import", str(archive), "--name", "devs"]) == 0
    assert "skipped 2 device node(s)" in capfd.readouterr().err
    assert os.stat(store).st_mode & 0o777 == 0o700
    found = [p for p in store.rglob("*") if stat.S_ISBLK(p.lstat().st_mode) or stat.S_ISCHR(p.lstat().st_mode)]
    assert found == []
    assert os.stat(store / "devs" / "rootfs" / "bin" / "busybox").st_mode & 0o7777 == 0o755
    status = main(
        [
            "--root",
            rt.dirs.root,
            "run",
            "--mode",
            "container",
            "devs",
            "--",
            "sh",
            "-c",
            "head -c 1 /disk; head -c 1 /mem; stat -c %a /bin/busybox",
        ]
    )
    out = capfd.readouterr()
    assert status == 0, out.err
    assert out.out.split() == ["755"] and out.err.count("No such file") == 2, out
    _state_is_empty(rt)


def test_an_image_user_other_than_root_can_use_the_rootfs(
    rt: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The overlay's root takes the mode of its upper directory, which lives in the private state
    directory: it must be the image root's mode, not the state directory's 0700."""
    monkeypatch.setenv("VIRTKIT_IMAGES", str(tmp_path / "store"))
    monkeypatch.setenv("VIRTKIT_UNSEALED", "1")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add("/bin/busybox", arcname="bin/busybox")
        for applet in ("sh", "ls", "id"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    archive = _oci_archive(tmp_path / "u.tar", [gzip.compress(buf.getvalue())], user="1000:1000")
    status = main(
        [
            "--root",
            rt.dirs.root,
            "run",
            "--mode",
            "container",
            str(archive),
            "--",
            "sh",
            "-c",
            "id -u; ls / >/dev/null && echo listed",
        ]
    )
    out = capfd.readouterr()
    assert status == 0, out.err
    assert out.out.split() == ["1000", "listed"]
    _state_is_empty(rt)
