"""config.json parsing: a valid spec round-trips; each bad field is named in the error."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from virtkit.container.config import load_bundle, parse_config
from virtkit.container.spec import default_spec
from virtkit.errors import ConfigError


def test_default_spec_parses() -> None:
    cfg = parse_config(default_spec(["sh", "-c", "true"]))
    assert cfg.process.args == ("sh", "-c", "true")
    assert cfg.process.no_new_privileges
    assert cfg.process.capabilities is not None
    assert "CAP_SYS_ADMIN" not in cfg.process.capabilities.bounding
    assert {ns.type for ns in cfg.linux.namespaces} == {"pid", "network", "ipc", "uts", "mount", "cgroup"}
    assert "/proc/kcore" in cfg.linux.masked_paths
    assert "/proc/sys" in cfg.linux.readonly_paths
    assert cfg.linux.seccomp is not None


def test_rootless_spec_has_user_namespace_and_maps() -> None:
    cfg = parse_config(default_spec(rootless=True))
    assert cfg.linux.namespace("user") is not None
    assert cfg.linux.uid_mappings and cfg.linux.gid_mappings


def _set(raw: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    cur: Any = raw
    for k in keys[:-1]:
        cur = cur[int(k)] if isinstance(cur, list) else cur.setdefault(k, {})
    last = keys[-1]
    if value is _DELETE:
        del cur[last]
    elif isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value


_DELETE = object()

BAD_FIELDS = [
    ("ociVersion", "2.0.0", "ociVersion"),
    ("ociVersion", _DELETE, "ociVersion"),
    ("root", _DELETE, "root"),
    ("root.path", 5, "root.path"),
    ("process", _DELETE, "process"),
    ("process.args", [], "process.args"),
    ("process.args", "sh", "process.args"),
    ("process.args.0", 1, "process.args[0]"),
    ("process.cwd", "relative", "process.cwd"),
    ("process.env", ["NOEQUALS"], "process.env[0]"),
    ("process.user.uid", -1, "process.user.uid"),
    ("process.user.uid", "0", "process.user.uid"),
    ("process.terminal", "yes", "process.terminal"),
    ("process.consoleSize", {"height": 24}, "process.consoleSize.width"),
    ("process.capabilities.bounding", ["CAP_NOPE"], "process.capabilities.bounding[0]"),
    ("process.rlimits", [{"type": "RLIMIT_BOGUS", "soft": 1, "hard": 1}], "process.rlimits[0].type"),
    ("process.rlimits", [{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 1}], "process.rlimits[0]"),
    ("mounts.0.destination", "proc", "mounts[0].destination"),
    ("linux.namespaces", [{"type": "nope"}], "linux.namespaces[0].type"),
    ("linux.namespaces", [{"type": "pid"}, {"type": "pid"}], "linux.namespaces[1].type"),
    ("linux.resources.memory", {"limit": "64M"}, "linux.resources.memory.limit"),
    ("linux.resources.memory", {"swappiness": 200}, "linux.resources.memory.swappiness"),
    ("linux.resources.pids", {"limit": True}, "linux.resources.pids.limit"),
    ("linux.resources.cpu", {"quota": 1.5}, "linux.resources.cpu.quota"),
    ("linux.resources.devices", [{"allow": True, "access": "x"}], "linux.resources.devices[0].access"),
    ("linux.uidMappings", [{"containerID": 0, "hostID": 1000, "size": 1}], "linux.uidMappings"),
    ("linux.seccomp", {"defaultAction": "SCMP_ACT_NOPE"}, "linux.seccomp.defaultAction"),
    (
        "linux.seccomp",
        {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": [], "action": "SCMP_ACT_ALLOW"}]},
        "linux.seccomp.syscalls[0].names",
    ),
    (
        "linux.seccomp",
        {
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                {"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 9, "value": 0, "op": "SCMP_CMP_EQ"}]}
            ],
        },
        "linux.seccomp.syscalls[0].args[0].index",
    ),
    ("linux.sysctl", {"../x": "1"}, "linux.sysctl"),
    ("linux.sysctl", {"net.ipv4.ip_forward": 1}, "linux.sysctl.net.ipv4.ip_forward"),
    ("linux.cgroupsPath", "../escape", "linux.cgroupsPath"),
    ("linux.cgroupsPath", "/a/../../b", "linux.cgroupsPath"),
    ("linux.cgroupsPath", "/", "linux.cgroupsPath"),
    ("linux.cgroupsPath", "", "linux.cgroupsPath"),
    ("linux.cgroupsPath", "/virtkit/a\u0000b", "linux.cgroupsPath"),
    ("linux.cgroupsPath", "/virtkit/a\0b", "linux.cgroupsPath"),
    ("linux.cgroupsPath", "system.slice:virtkit:x", "linux.cgroupsPath"),
    ("linux.cgroupsPath", "/" + "x" * 256, "linux.cgroupsPath"),
    ("process.args.0", "sh\0-c", "process.args[0]"),
    ("process.env.0", "A=b\0c", "process.env[0]"),
    ("process.cwd", "/tmp\0", "process.cwd"),
    ("hostname", "a\0b", "hostname"),
    ("hostname", "h" * 65, "hostname"),
    ("mounts.0.destination", "/proc\0x", "mounts[0].destination"),
    ("mounts.0.destination", "/", "mounts[0].destination"),
    ("mounts.0.destination", "/a/../../etc", "mounts[0].destination"),
    ("mounts.0.source", "pr\0c", "mounts[0].source"),
    ("mounts.0.options.0", "nosuid\0", "mounts[0].options[0]"),
    ("mounts.0.type", "devtmpfs", "mounts[0].type"),
    ("mounts.0.options", ["rbind", "rshared"], "mounts[0].options[1]"),
    ("linux.namespaces", [{"type": "mount", "path": "/proc/1/ns/mnt"}], "linux.namespaces[0].path"),
    (
        "linux.namespaces",
        [{"type": "mount"}, {"type": "network", "path": "/run/netns/x\0"}],
        "linux.namespaces[1].path",
    ),
    ("linux.rootfsPropagation", "rshared", "linux.rootfsPropagation"),
    ("linux.devices", [{"path": "/etc/disk", "type": "b", "major": 8, "minor": 0}], "linux.devices[0].path"),
    ("linux.devices", [{"path": "/dev/../etc/disk", "type": "b", "major": 8, "minor": 0}], "linux.devices[0].path"),
    ("linux.devices", [{"path": "/dev/x", "type": "c", "major": 1}], "linux.devices[0].minor"),
    ("linux.devices", [{"path": "/dev/x", "type": "c", "major": 1, "minor": -1}], "linux.devices[0].minor"),
    (
        "linux.devices",
        [{"path": "/dev/x", "type": "c", "major": 1, "minor": 3, "fileMode": 0o4777}],
        "linux.devices[0].fileMode",
    ),
    ("linux.resources.unified", {"../cgroup.procs": "1"}, "linux.resources.unified"),
    ("linux.resources.unified", {"cgroup.procs": "1"}, "linux.resources.unified"),
    ("linux.resources.cpu", {"cpus": "0-1; rm"}, "linux.resources.cpu.cpus"),
    ("linux.resources.memory", {"limit": 2**64}, "linux.resources.memory.limit"),
    ("linux.uidMappings", [{"containerID": -1, "hostID": 0, "size": 1}], "linux.uidMappings"),
    ("process.user.uid", 2**32, "process.user.uid"),
    ("process.user.additionalGids", [-1], "process.user.additionalGids[0]"),
    ("process.user.umask", 0o1000, "process.user.umask"),
    ("process.oomScoreAdj", 1001, "process.oomScoreAdj"),
    ("process.consoleSize", {"height": -1, "width": 80}, "process.consoleSize.height"),
    ("process.rlimits", [{"type": "RLIMIT_NOFILE", "soft": -1, "hard": 1}], "process.rlimits[0].soft"),
    ("hooks", {"poststart": [{"path": "/bin/true", "timeout": 0}]}, "hooks.poststart[0].timeout"),
    ("hooks", {"poststart": [{"path": "/bin/true", "env": ["NOEQ"]}]}, "hooks.poststart[0].env[0]"),
    ("annotations", {"a\0": "b"}, "annotations.a"),
    ("hooks", {"poststart": [{"path": "relative"}]}, "hooks.poststart[0].path"),
    ("annotations", {"a": 1}, "annotations.a"),
]


@pytest.mark.parametrize(("path", "value", "named"), BAD_FIELDS, ids=[f"{p}" for p, _, _ in BAD_FIELDS])
def test_bad_field_is_named(path: str, value: Any, named: str) -> None:
    raw = copy.deepcopy(default_spec())
    _set(raw, path, value)
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    msg = str(info.value)
    assert named in msg
    assert "\n" not in msg
    assert msg.startswith("config.json:")


def test_hostname_needs_uts_namespace() -> None:
    raw = default_spec()
    raw["linux"]["namespaces"] = [ns for ns in raw["linux"]["namespaces"] if ns["type"] != "uts"]
    with pytest.raises(ConfigError, match="hostname"):
        parse_config(raw)


def test_unknown_fields_are_ignored() -> None:
    """runtime-spec: unknown properties are ignored; they neither fail the parse nor change the result."""
    plain = parse_config(default_spec())
    raw = default_spec()
    raw["vendorExtension"] = {"x": 1}
    raw["process"]["apparmorProfile"] = "whatever"
    raw["linux"]["intelRdt"] = {"closID": "x"}
    raw["mounts"][0]["uidMappings"] = []
    assert parse_config(raw) == plain


@pytest.mark.parametrize(
    ("key", "namespace"),
    [
        ("kernel.msgmax", "ipc"),
        ("kernel.msgmnb", "ipc"),
        ("kernel.msgmni", "ipc"),
        ("kernel.sem", "ipc"),
        ("kernel.shmall", "ipc"),
        ("kernel.shmmax", "ipc"),
        ("kernel.shmmni", "ipc"),
        ("kernel.shm_rmid_forced", "ipc"),
        ("fs.mqueue.queues_max", "ipc"),
        ("fs.mqueue.msg_max", "ipc"),
        ("net.ipv4.ip_forward", "network"),
        ("net.ipv4.ping_group_range", "network"),
        ("net.core.somaxconn", "network"),
        ("kernel.domainname", "uts"),
    ],
)
def test_namespaced_sysctl_needs_its_namespace(key: str, namespace: str) -> None:
    raw = default_spec()
    raw["linux"]["sysctl"] = {key: "1"}
    assert parse_config(raw).linux.sysctl == ((key, "1"),)  # the default spec has every namespace
    raw["linux"]["namespaces"] = [ns for ns in raw["linux"]["namespaces"] if ns["type"] != namespace]
    if namespace == "uts":
        del raw["hostname"]
    with pytest.raises(ConfigError, match=f"{key} belongs to the {namespace} namespace") as info:
        parse_config(raw)
    assert "\n" not in str(info.value)
    # joining a namespace by path is having one (the runtime refuses the host's own at create)
    raw["linux"]["namespaces"].append({"type": namespace, "path": "/run/netns/other"})
    assert parse_config(raw).linux.sysctl == ((key, "1"),)


@pytest.mark.parametrize(
    "key",
    [
        "kernel.core_pattern",
        "fs.lease-break-time",
        "kernel.modprobe",
        "vm.overcommit_memory",
        "kernel.panic",
        "fs.protected_symlinks",
        "kernel.randomize_va_space",
        "user.max_user_namespaces",
        "kernel.sysrq",
        "kernel.ostype",
        "fs.mqueue",
        "net",
        "kernel.shm_next_id",  # IPC-namespaced in the kernel, but not on runc's list: refused, conservatively
    ],
)
def test_global_sysctls_are_refused(key: str) -> None:
    raw = default_spec()
    raw["linux"]["sysctl"] = {key: "1"}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    msg = str(info.value)
    assert f"linux.sysctl.{key}" in msg and "\n" not in msg
    assert "not a namespaced sysctl" in msg or "not a valid sysctl name" in msg


def test_domainname_needs_uts_namespace() -> None:
    raw = default_spec()
    raw["domainname"] = "example"
    assert parse_config(raw).domainname == "example"
    raw["linux"]["namespaces"] = [ns for ns in raw["linux"]["namespaces"] if ns["type"] != "uts"]
    del raw["hostname"]
    with pytest.raises(ConfigError, match="domainname needs a uts namespace"):
        parse_config(raw)


def test_devices_need_a_tmpfs_dev() -> None:
    raw = default_spec()
    raw["linux"]["devices"] = [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]
    assert parse_config(raw).linux.devices[0].path == "/dev/fuse"
    for dev_mount in (
        {"destination": "/dev", "type": "bind", "source": "/dev", "options": ["rbind"]},
        {"destination": "/dev", "type": "tmpfs", "source": "/dev", "options": ["bind"]},
    ):
        raw["mounts"] = [m for m in raw["mounts"] if m["destination"] != "/dev"] + [dev_mount]
        with pytest.raises(ConfigError, match="linux.devices needs a tmpfs mounted at /dev"):
            parse_config(raw)


def test_paths_are_normalized() -> None:
    raw = default_spec()
    raw["mounts"][0]["destination"] = "//proc/./"
    raw["linux"]["cgroupsPath"] = "virtkit//x/"
    raw["process"]["cwd"] = "/tmp/"
    cfg = parse_config(raw)
    assert cfg.mounts[0].destination == "/proc"
    assert cfg.linux.cgroups_path == "/virtkit/x"
    assert cfg.process.cwd == "/tmp"


def test_load_bundle_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config.json"):
        load_bundle(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_bundle(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(default_spec()))
    with pytest.raises(ConfigError, match="rootfs directory .* does not exist"):
        load_bundle(str(tmp_path))
    (tmp_path / "rootfs").mkdir()
    cfg, rootfs = load_bundle(str(tmp_path))
    assert rootfs == str(tmp_path / "rootfs")
    assert cfg.root_path == "rootfs"


def test_kernel_hostname_sysctl_is_refused() -> None:
    """runc and crun refuse it: the hostname field is the one place for that value."""
    raw = default_spec()
    raw["linux"]["sysctl"] = {"kernel.hostname": "other"}
    with pytest.raises(ConfigError, match="kernel.hostname conflicts with the hostname field") as info:
        parse_config(raw)
    assert "\n" not in str(info.value)
