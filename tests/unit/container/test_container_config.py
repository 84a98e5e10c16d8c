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
    ("linux.seccomp", {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": [], "action": "SCMP_ACT_ALLOW"}]},
     "linux.seccomp.syscalls[0].names"),
    ("linux.seccomp", {"defaultAction": "SCMP_ACT_ERRNO",
                       "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",
                                     "args": [{"index": 9, "value": 0, "op": "SCMP_CMP_EQ"}]}]},
     "linux.seccomp.syscalls[0].args[0].index"),
    ("linux.sysctl", {"../x": "1"}, "linux.sysctl"),
    ("linux.cgroupsPath", "../escape", "linux.cgroupsPath"),
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
    raw = default_spec()
    raw["vendorExtension"] = {"x": 1}
    raw["process"]["apparmorProfile"] = "whatever"
    parse_config(raw)


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
