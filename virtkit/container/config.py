"""OCI runtime-spec 1.x ``config.json``: parsing into frozen records, with errors that name the field.

Only what virtkit acts on is modelled; unknown fields are ignored as the spec asks (config.md:
"runtimes MUST ignore unknown properties"). Every error names the JSON path of the bad value, e.g.
``config.json: process.args[0] must be a string``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from virtkit.errors import ConfigError

SUPPORTED_NAMESPACES = ("pid", "network", "mount", "ipc", "uts", "user", "cgroup")
RLIMITS = ("RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_LOCKS",
           "RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_NOFILE", "RLIMIT_NPROC",
           "RLIMIT_RSS", "RLIMIT_RTPRIO", "RLIMIT_RTTIME", "RLIMIT_SIGPENDING", "RLIMIT_STACK")


@dataclass(frozen=True, slots=True)
class User:
    uid: int = 0
    gid: int = 0
    umask: int | None = None
    additional_gids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Capabilities:
    bounding: tuple[str, ...] = ()
    effective: tuple[str, ...] = ()
    inheritable: tuple[str, ...] = ()
    permitted: tuple[str, ...] = ()
    ambient: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rlimit:
    type: str
    soft: int
    hard: int


@dataclass(frozen=True, slots=True)
class Process:
    args: tuple[str, ...]
    cwd: str = "/"
    env: tuple[str, ...] = ()
    terminal: bool = False
    console_size: tuple[int, int] | None = None  # (height, width)
    user: User = User()
    capabilities: Capabilities | None = None
    rlimits: tuple[Rlimit, ...] = ()
    no_new_privileges: bool = False
    oom_score_adj: int | None = None


@dataclass(frozen=True, slots=True)
class Mount:
    destination: str
    type: str | None = None
    source: str | None = None
    options: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Namespace:
    type: str
    path: str | None = None


@dataclass(frozen=True, slots=True)
class IdMapping:
    container_id: int
    host_id: int
    size: int


@dataclass(frozen=True, slots=True)
class Device:
    path: str
    type: str
    major: int = 0
    minor: int = 0
    file_mode: int | None = None
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True, slots=True)
class DeviceRule:
    allow: bool
    type: str = "a"
    major: int | None = None
    minor: int | None = None
    access: str = "rwm"


@dataclass(frozen=True, slots=True)
class Memory:
    limit: int | None = None
    reservation: int | None = None
    swap: int | None = None
    swappiness: int | None = None
    disable_oom_killer: bool = False


@dataclass(frozen=True, slots=True)
class Cpu:
    shares: int | None = None
    quota: int | None = None
    period: int | None = None
    cpus: str | None = None
    mems: str | None = None


@dataclass(frozen=True, slots=True)
class Resources:
    memory: Memory = Memory()
    cpu: Cpu = Cpu()
    pids_limit: int | None = None
    devices: tuple[DeviceRule, ...] = ()
    unified: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Hook:
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout: int | None = None


@dataclass(frozen=True, slots=True)
class Hooks:
    prestart: tuple[Hook, ...] = ()
    create_runtime: tuple[Hook, ...] = ()
    poststart: tuple[Hook, ...] = ()
    poststop: tuple[Hook, ...] = ()


@dataclass(frozen=True, slots=True)
class Linux:
    namespaces: tuple[Namespace, ...] = ()
    uid_mappings: tuple[IdMapping, ...] = ()
    gid_mappings: tuple[IdMapping, ...] = ()
    devices: tuple[Device, ...] = ()
    cgroups_path: str | None = None
    resources: Resources = Resources()
    sysctl: tuple[tuple[str, str], ...] = ()
    seccomp: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    rootfs_propagation: str | None = None
    masked_paths: tuple[str, ...] = ()
    readonly_paths: tuple[str, ...] = ()

    def namespace(self, kind: str) -> Namespace | None:
        for ns in self.namespaces:
            if ns.type == kind:
                return ns
        return None


@dataclass(frozen=True, slots=True)
class Config:
    oci_version: str
    root_path: str
    root_readonly: bool
    process: Process
    hostname: str | None = None
    domainname: str | None = None
    mounts: tuple[Mount, ...] = ()
    linux: Linux = Linux()
    hooks: Hooks = Hooks()
    annotations: tuple[tuple[str, str], ...] = ()

    def annotation(self, key: str, default: str | None = None) -> str | None:
        return dict(self.annotations).get(key, default)


# --------------------------------------------------------------------------------------------
# the field walker: every accessor takes the JSON path it is reading, for the error message


class _Bad(ConfigError):
    pass


def _fail(path: str, what: str, value: Any = ...) -> ConfigError:
    shown = "" if value is ... else f" (got {json.dumps(value)[:60]})"
    return ConfigError(f"config.json: {path} {what}{shown}; fix it in the bundle's config.json")


def _obj(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, "must be an object", value)
    return value


def _opt(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str) -> Any:
    value = obj.get(key)
    if value is None:
        return None
    if kind is int or kind == (int,):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(f"{path}.{key}" if path else key, "must be an integer", value)
        return value
    if not isinstance(value, kind):
        names = {str: "a string", bool: "true or false", list: "a list", dict: "an object"}
        want = names.get(kind, str(kind)) if isinstance(kind, type) else "valid"
        raise _fail(f"{path}.{key}" if path else key, f"must be {want}", value)
    return value


def _req(obj: dict[str, Any], key: str, kind: type, path: str) -> Any:
    value = _opt(obj, key, kind, path)
    if value is None:
        raise _fail(f"{path}.{key}" if path else key, "is required")
    return value


def _strs(obj: dict[str, Any], key: str, path: str) -> tuple[str, ...]:
    values = _opt(obj, key, list, path) or []
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise _fail(f"{path}.{key}[{i}]", "must be a string", v)
    return tuple(values)


def _ints(obj: dict[str, Any], key: str, path: str) -> tuple[int, ...]:
    values = _opt(obj, key, list, path) or []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int):
            raise _fail(f"{path}.{key}[{i}]", "must be an integer", v)
    return tuple(values)


def _abs(value: str, path: str) -> str:
    if not value.startswith("/"):
        raise _fail(path, "must be an absolute path", value)
    return value


def _parse_process(raw: dict[str, Any]) -> Process:
    p = "process"
    args = _strs(raw, "args", p)
    if not args:
        raise _fail("process.args", "must be a non-empty list of strings", raw.get("args"))
    cwd = _abs(_req(raw, "cwd", str, p), "process.cwd")
    env = _strs(raw, "env", p)
    for i, e in enumerate(env):
        if "=" not in e:
            raise _fail(f"process.env[{i}]", "must have the form KEY=VALUE", e)
    user = User()
    if (u := _opt(raw, "user", dict, p)) is not None:
        uid = _opt(u, "uid", int, "process.user")
        gid = _opt(u, "gid", int, "process.user")
        for name, v in (("uid", uid), ("gid", gid)):
            if v is not None and not 0 <= v < 2**32 - 1:
                raise _fail(f"process.user.{name}", "must be between 0 and 4294967294", v)
        user = User(uid or 0, gid or 0, _opt(u, "umask", int, "process.user"),
                    _ints(u, "additionalGids", "process.user"))
    caps = None
    if (c := _opt(raw, "capabilities", dict, p)) is not None:
        from virtkit.container.caps import CAPABILITIES

        sets = {}
        for kind in ("bounding", "effective", "inheritable", "permitted", "ambient"):
            names = _strs(c, kind, "process.capabilities")
            for i, n in enumerate(names):
                if n.upper() not in CAPABILITIES:
                    raise _fail(f"process.capabilities.{kind}[{i}]", "is not a known capability", n)
            sets[kind] = tuple(n.upper() for n in names)
        caps = Capabilities(**sets)
    rlimits = []
    for i, r in enumerate(_opt(raw, "rlimits", list, p) or []):
        rp = f"process.rlimits[{i}]"
        r = _obj(r, rp)
        kind = _req(r, "type", str, rp)
        if kind not in RLIMITS:
            raise _fail(f"{rp}.type", "is not a known rlimit (RLIMIT_NOFILE, ...)", kind)
        soft, hard = _req(r, "soft", int, rp), _req(r, "hard", int, rp)
        if soft > hard:
            raise _fail(rp, "has soft above hard", r)
        rlimits.append(Rlimit(kind, soft, hard))
    console_size = None
    if (cs := _opt(raw, "consoleSize", dict, p)) is not None:
        console_size = (_req(cs, "height", int, "process.consoleSize"), _req(cs, "width", int, "process.consoleSize"))
    return Process(args=args, cwd=cwd, env=env, terminal=bool(_opt(raw, "terminal", bool, p)),
                   console_size=console_size, user=user, capabilities=caps,
                   rlimits=tuple(rlimits),
                   no_new_privileges=bool(_opt(raw, "noNewPrivileges", bool, p)),
                   oom_score_adj=_opt(raw, "oomScoreAdj", int, p))


def _parse_mappings(raw: dict[str, Any], key: str) -> tuple[IdMapping, ...]:
    out = []
    for i, m in enumerate(_opt(raw, key, list, "linux") or []):
        mp = f"linux.{key}[{i}]"
        m = _obj(m, mp)
        size = _req(m, "size", int, mp)
        if size <= 0:
            raise _fail(f"{mp}.size", "must be positive", size)
        out.append(IdMapping(_req(m, "containerID", int, mp), _req(m, "hostID", int, mp), size))
    return tuple(out)


def _parse_resources(raw: dict[str, Any]) -> Resources:
    rp = "linux.resources"
    memory, cpu = Memory(), Cpu()
    if (m := _opt(raw, "memory", dict, rp)) is not None:
        mp = rp + ".memory"
        memory = Memory(limit=_opt(m, "limit", int, mp), reservation=_opt(m, "reservation", int, mp),
                        swap=_opt(m, "swap", int, mp), swappiness=_opt(m, "swappiness", int, mp),
                        disable_oom_killer=bool(_opt(m, "disableOOMKiller", bool, mp)))
        if memory.swappiness is not None and not 0 <= memory.swappiness <= 100:
            raise _fail(mp + ".swappiness", "must be between 0 and 100", memory.swappiness)
        if memory.limit is not None and memory.swap is not None and 0 < memory.swap < memory.limit:
            raise _fail(mp + ".swap", "(memory+swap) must be at least memory.limit", memory.swap)
    if (c := _opt(raw, "cpu", dict, rp)) is not None:
        cp = rp + ".cpu"
        cpu = Cpu(shares=_opt(c, "shares", int, cp), quota=_opt(c, "quota", int, cp),
                  period=_opt(c, "period", int, cp), cpus=_opt(c, "cpus", str, cp),
                  mems=_opt(c, "mems", str, cp))
    pids_limit = None
    if (pd := _opt(raw, "pids", dict, rp)) is not None:
        pids_limit = _req(pd, "limit", int, rp + ".pids")
    rules = []
    for i, d in enumerate(_opt(raw, "devices", list, rp) or []):
        dp = f"{rp}.devices[{i}]"
        d = _obj(d, dp)
        kind = _opt(d, "type", str, dp) or "a"
        if kind not in ("a", "b", "c"):
            raise _fail(f"{dp}.type", "must be a, b or c", kind)
        access = _opt(d, "access", str, dp) or "rwm"
        if not access or set(access) - set("rwm"):
            raise _fail(f"{dp}.access", "must be letters from rwm", access)
        rules.append(DeviceRule(bool(_req(d, "allow", bool, dp)), kind, _opt(d, "major", int, dp),
                                _opt(d, "minor", int, dp), access))
    unified = _opt(raw, "unified", dict, rp) or {}
    for k, v in unified.items():
        if not isinstance(v, str):
            raise _fail(f"{rp}.unified.{k}", "must be a string", v)
    return Resources(memory, cpu, pids_limit, tuple(rules), tuple(sorted(unified.items())))


def _parse_linux(raw: dict[str, Any]) -> Linux:
    namespaces = []
    seen = set()
    for i, n in enumerate(_opt(raw, "namespaces", list, "linux") or []):
        np_ = f"linux.namespaces[{i}]"
        n = _obj(n, np_)
        kind = _req(n, "type", str, np_)
        if kind not in SUPPORTED_NAMESPACES:
            raise _fail(f"{np_}.type", f"must be one of {', '.join(SUPPORTED_NAMESPACES)}", kind)
        if kind in seen:
            raise _fail(f"{np_}.type", "appears twice", kind)
        seen.add(kind)
        path = _opt(n, "path", str, np_)
        namespaces.append(Namespace(kind, _abs(path, f"{np_}.path") if path else None))
    uid_maps, gid_maps = _parse_mappings(raw, "uidMappings"), _parse_mappings(raw, "gidMappings")
    if "user" in seen and not any(n.path for n in namespaces if n.type == "user"):
        if not uid_maps or not gid_maps:
            raise _fail("linux.uidMappings", "and linux.gidMappings are required with a new user namespace")
    elif uid_maps or gid_maps:
        raise _fail("linux.uidMappings", "needs a user namespace in linux.namespaces")
    devices = []
    for i, d in enumerate(_opt(raw, "devices", list, "linux") or []):
        dp = f"linux.devices[{i}]"
        d = _obj(d, dp)
        kind = _req(d, "type", str, dp)
        if kind not in ("c", "b", "u", "p"):
            raise _fail(f"{dp}.type", "must be c, b, u or p", kind)
        devices.append(Device(_abs(_req(d, "path", str, dp), f"{dp}.path"), kind,
                              _opt(d, "major", int, dp) or 0, _opt(d, "minor", int, dp) or 0,
                              _opt(d, "fileMode", int, dp), _opt(d, "uid", int, dp), _opt(d, "gid", int, dp)))
    resources = Resources()
    if (r := _opt(raw, "resources", dict, "linux")) is not None:
        resources = _parse_resources(r)
    sysctl = _opt(raw, "sysctl", dict, "linux") or {}
    for k, v in sysctl.items():
        if not isinstance(v, str):
            raise _fail(f"linux.sysctl.{k}", "must be a string", v)
        if "/" in k or ".." in k:
            raise _fail(f"linux.sysctl.{k}", "is not a valid sysctl name")
    seccomp = _opt(raw, "seccomp", dict, "linux")
    if seccomp is not None:
        from virtkit.container.seccomp import validate_profile

        validate_profile(seccomp, "linux.seccomp")
    prop = _opt(raw, "rootfsPropagation", str, "linux")
    if prop is not None and prop not in ("private", "rprivate", "slave", "rslave", "shared", "rshared",
                                         "unbindable", "runbindable"):
        raise _fail("linux.rootfsPropagation", "is not a propagation mode", prop)
    cgroups_path = _opt(raw, "cgroupsPath", str, "linux")
    if cgroups_path is not None and (".." in cgroups_path.split("/") or ":" in cgroups_path):
        raise _fail("linux.cgroupsPath", "must be a path without '..' (systemd slices are not supported)",
                    cgroups_path)
    return Linux(tuple(namespaces), uid_maps, gid_maps, tuple(devices), cgroups_path, resources,
                 tuple(sorted(sysctl.items())), seccomp, prop,
                 tuple(_abs(p, "linux.maskedPaths[]") for p in _strs(raw, "maskedPaths", "linux")),
                 tuple(_abs(p, "linux.readonlyPaths[]") for p in _strs(raw, "readonlyPaths", "linux")))


def _parse_hooks(raw: dict[str, Any]) -> Hooks:
    out: dict[str, tuple[Hook, ...]] = {}
    for key, attr in (("prestart", "prestart"), ("createRuntime", "create_runtime"),
                      ("poststart", "poststart"), ("poststop", "poststop")):
        hooks = []
        for i, h in enumerate(_opt(raw, key, list, "hooks") or []):
            hp = f"hooks.{key}[{i}]"
            h = _obj(h, hp)
            timeout = _opt(h, "timeout", int, hp)
            if timeout is not None and timeout <= 0:
                raise _fail(f"{hp}.timeout", "must be positive", timeout)
            hooks.append(Hook(_abs(_req(h, "path", str, hp), f"{hp}.path"), _strs(h, "args", hp),
                              _strs(h, "env", hp), timeout))
        out[attr] = tuple(hooks)
    for key in ("createContainer", "startContainer"):
        if raw.get(key):
            raise _fail(f"hooks.{key}", "is not supported by virtkit; use createRuntime/poststart")
    return Hooks(**out)


def parse_config(raw: Any) -> Config:
    """Turn the decoded JSON of a config.json into a :class:`Config`, or raise ConfigError."""
    raw = _obj(raw, "(top level)")
    version = _req(raw, "ociVersion", str, "")
    if not version.startswith("1."):
        raise _fail("ociVersion", "must be a 1.x runtime-spec version", version)
    root = _obj(raw.get("root"), "root") if raw.get("root") is not None else None
    if root is None:
        raise _fail("root", "is required")
    root_path = _req(root, "path", str, "root")
    process_raw = raw.get("process")
    if process_raw is None:
        raise _fail("process", "is required (virtkit starts the container's process)")
    process = _parse_process(_obj(process_raw, "process"))
    mounts = []
    for i, m in enumerate(_opt(raw, "mounts", list, "") or []):
        mp = f"mounts[{i}]"
        m = _obj(m, mp)
        mounts.append(Mount(_abs(_req(m, "destination", str, mp), f"{mp}.destination"),
                            _opt(m, "type", str, mp), _opt(m, "source", str, mp), _strs(m, "options", mp)))
    linux = _parse_linux(_obj(raw["linux"], "linux")) if raw.get("linux") is not None else Linux()
    hooks = _parse_hooks(_obj(raw["hooks"], "hooks")) if raw.get("hooks") is not None else Hooks()
    annotations = _opt(raw, "annotations", dict, "") or {}
    for k, v in annotations.items():
        if not isinstance(v, str):
            raise _fail(f"annotations.{k}", "must be a string", v)
    hostname = _opt(raw, "hostname", str, "")
    if hostname is not None and linux.namespace("uts") is None:
        raise _fail("hostname", "needs a uts namespace in linux.namespaces")
    return Config(version, root_path, bool(_opt(root, "readonly", bool, "root")), process, hostname,
                  _opt(raw, "domainname", str, ""), tuple(mounts), linux, hooks,
                  tuple(sorted(annotations.items())))


def load_bundle(bundle: str) -> tuple[Config, str]:
    """Read ``bundle/config.json``; return the config and the absolute rootfs path (checked to exist)."""
    bundle = os.path.abspath(bundle)
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"no config.json in bundle {bundle}: run 'virtkit spec' there to write one") from None
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
    try:
        raw = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"{path} is not valid JSON (line {getattr(err, 'lineno', '?')}): "
                          f"{getattr(err, 'msg', err)}") from None
    config = parse_config(raw)
    rootfs = config.root_path if os.path.isabs(config.root_path) else os.path.join(bundle, config.root_path)
    if not os.path.isdir(rootfs):
        raise ConfigError(f"root.path {config.root_path!r}: rootfs directory {rootfs} does not exist; "
                          "create it or fix root.path in config.json")
    return config, rootfs
