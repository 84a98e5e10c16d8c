"""OCI runtime-spec 1.x ``config.json``: parsing into frozen records, with errors that name the field.

Only what virtkit acts on is modelled; unknown fields are ignored as the spec asks (config.md:
"runtimes MUST ignore unknown properties"). Every error names the JSON path of the bad value, e.g.
``config.json: process.args[0] must be a string``.

Everything is checked here, before the runtime creates anything: types, the range of every number
that reaches a system call, no NUL byte in any string (the C side would cut the string there, or
Python would raise deep in a forked child), path shapes, and the rules that keep a config from
changing the host: only namespaced sysctls, and only in a namespace the container has; hostname
and domainname only with a UTS namespace; no ``devtmpfs`` (one instance shared with the host); no
shared mount propagation (the container's mounts would appear on the host).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from virtkit.errors import ConfigError

SUPPORTED_NAMESPACES = ("pid", "network", "mount", "ipc", "uts", "user", "cgroup")
#: a config.json larger than this is refused before it is parsed (real ones are a few KiB)
MAX_CONFIG_BYTES = 4 << 20
U32_MAX = 2**32 - 1
I64_MAX = 2**63 - 1
U64_MAX = 2**64 - 1
PATH_MAX = 4096
NAME_MAX = 255
HOST_NAME_MAX = 64

#: sysctls that belong to a namespace (everything else is global to the host), as runc's validator
#: has them: the IPC namespace's message queues, semaphores and shared memory, POSIX message queues
#: (``fs.mqueue.*``), the network namespace's ``net.*``, and the UTS namespace's names
IPC_SYSCTLS = frozenset(
    {
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    }
)
UTS_SYSCTLS = frozenset({"kernel.hostname", "kernel.domainname"})
_SYSCTL_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_@:+-]+)+")
_CPU_LIST = re.compile(r"[0-9,\- ]*")
_UNIFIED_KEY = re.compile(r"[a-z0-9_]+\.[a-z0-9_.]+")


def sysctl_namespace(key: str) -> str | None:
    """The namespace (OCI type) a sysctl belongs to, or None for a host-global one."""
    if key in IPC_SYSCTLS or key.startswith("fs.mqueue."):
        return "ipc"
    if key.startswith("net."):
        return "network"
    if key in UTS_SYSCTLS:
        return "uts"
    return None


RLIMITS = (
    "RLIMIT_AS",
    "RLIMIT_CORE",
    "RLIMIT_CPU",
    "RLIMIT_DATA",
    "RLIMIT_FSIZE",
    "RLIMIT_LOCKS",
    "RLIMIT_MEMLOCK",
    "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE",
    "RLIMIT_NOFILE",
    "RLIMIT_NPROC",
    "RLIMIT_RSS",
    "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME",
    "RLIMIT_SIGPENDING",
    "RLIMIT_STACK",
)


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


def _no_nul(value: Any, path: str) -> None:
    """No NUL byte in any string of the document, keys included: the kernel reads C strings."""
    if isinstance(value, str):
        if "\0" in value:
            raise _fail(path or "(top level)", "contains a NUL byte", value)
    elif isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if "\0" in str(k):
                raise _fail(sub, "(a key) contains a NUL byte")
            _no_nul(v, sub)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _no_nul(v, f"{path}[{i}]")


def _int(obj: dict[str, Any], key: str, path: str, lo: int, hi: int) -> int | None:
    """An optional integer within [lo, hi] (the range the system call it goes to accepts)."""
    value = _opt(obj, key, int, path)
    if value is not None and not lo <= value <= hi:
        raise _fail(f"{path}.{key}" if path else key, f"must be between {lo} and {hi}", value)
    return value  # type: ignore[no-any-return]


def _path(value: str, path: str, *, root_ok: bool = False) -> str:
    """An absolute path, normalized (``//a/./b/`` -> ``/a/b``, ``..`` refused), with kernel limits."""
    _abs(value, path)
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _fail(path, "must not contain '..'", value)
    if len(value.encode()) > PATH_MAX or any(len(p.encode()) > NAME_MAX for p in parts):
        raise _fail(path, f"is longer than the kernel allows ({PATH_MAX} bytes, {NAME_MAX} per name)", value[:80])
    if not parts and not root_ok:
        raise _fail(path, "must not be / itself", value)
    return "/" + "/".join(parts)


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
    if not args[0]:
        raise _fail("process.args[0]", "must name a program", args[0])
    cwd = _path(_req(raw, "cwd", str, p), "process.cwd", root_ok=True)
    env = _strs(raw, "env", p)
    for i, e in enumerate(env):
        if "=" not in e or e.startswith("="):
            raise _fail(f"process.env[{i}]", "must have the form KEY=VALUE", e)
    user = User()
    if (u := _opt(raw, "user", dict, p)) is not None:
        up = "process.user"
        uid = _int(u, "uid", up, 0, U32_MAX - 1)
        gid = _int(u, "gid", up, 0, U32_MAX - 1)
        umask = _int(u, "umask", up, 0, 0o777)
        gids = _ints(u, "additionalGids", up)
        for i, g in enumerate(gids):
            if not 0 <= g < U32_MAX:
                raise _fail(f"{up}.additionalGids[{i}]", f"must be between 0 and {U32_MAX - 1}", g)
        if len(gids) > 65536:  # NGROUPS_MAX
            raise _fail(f"{up}.additionalGids", "has more than 65536 groups")
        user = User(uid or 0, gid or 0, umask, gids)
    caps = None
    if (c := _opt(raw, "capabilities", dict, p)) is not None:
        from virtkit.host.caps import CAPABILITIES

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
        for name, v in (("soft", soft), ("hard", hard)):
            if not 0 <= v <= U64_MAX:
                raise _fail(f"{rp}.{name}", f"must be between 0 and {U64_MAX} (unlimited)", v)
        if soft > hard:
            raise _fail(rp, "has soft above hard", r)
        rlimits.append(Rlimit(kind, soft, hard))
    console_size = None
    if (cs := _opt(raw, "consoleSize", dict, p)) is not None:
        cp = "process.consoleSize"
        for key in ("height", "width"):
            _req(cs, key, int, cp)
        console_size = (_int(cs, "height", cp, 0, 65535) or 0, _int(cs, "width", cp, 0, 65535) or 0)
    return Process(
        args=args,
        cwd=cwd,
        env=env,
        terminal=bool(_opt(raw, "terminal", bool, p)),
        console_size=console_size,
        user=user,
        capabilities=caps,
        rlimits=tuple(rlimits),
        no_new_privileges=bool(_opt(raw, "noNewPrivileges", bool, p)),
        oom_score_adj=_int(raw, "oomScoreAdj", p, -1000, 1000),
    )


def _parse_mappings(raw: dict[str, Any], key: str) -> tuple[IdMapping, ...]:
    out = []
    for i, m in enumerate(_opt(raw, key, list, "linux") or []):
        mp = f"linux.{key}[{i}]"
        m = _obj(m, mp)
        for k in ("containerID", "hostID", "size"):
            _req(m, k, int, mp)
        size = _int(m, "size", mp, 1, U32_MAX) or 0
        container_id = _int(m, "containerID", mp, 0, U32_MAX - 1) or 0
        host_id = _int(m, "hostID", mp, 0, U32_MAX - 1) or 0
        if container_id + size > U32_MAX or host_id + size > U32_MAX:
            raise _fail(mp, "runs past the last id (4294967294)", m)
        out.append(IdMapping(container_id, host_id, size))
    if len(out) > 340:  # the kernel's limit on lines of an id map
        raise _fail(f"linux.{key}", "has more than 340 ranges")
    return tuple(out)


def _parse_resources(raw: dict[str, Any]) -> Resources:
    rp = "linux.resources"
    memory, cpu = Memory(), Cpu()
    if (m := _opt(raw, "memory", dict, rp)) is not None:
        mp = rp + ".memory"
        memory = Memory(
            limit=_int(m, "limit", mp, -(2**63), I64_MAX),
            reservation=_int(m, "reservation", mp, -(2**63), I64_MAX),
            swap=_int(m, "swap", mp, -(2**63), I64_MAX),
            swappiness=_opt(m, "swappiness", int, mp),
            disable_oom_killer=bool(_opt(m, "disableOOMKiller", bool, mp)),
        )
        if memory.swappiness is not None and not 0 <= memory.swappiness <= 100:
            raise _fail(mp + ".swappiness", "must be between 0 and 100", memory.swappiness)
        if memory.limit is not None and memory.swap is not None and 0 < memory.swap < memory.limit:
            raise _fail(mp + ".swap", "(memory+swap) must be at least memory.limit", memory.swap)
    if (c := _opt(raw, "cpu", dict, rp)) is not None:
        cp = rp + ".cpu"
        cpu = Cpu(
            shares=_int(c, "shares", cp, 0, U64_MAX),
            quota=_int(c, "quota", cp, -(2**63), I64_MAX),
            period=_int(c, "period", cp, 0, U64_MAX),
            cpus=_opt(c, "cpus", str, cp),
            mems=_opt(c, "mems", str, cp),
        )
        for name, v in (("cpus", cpu.cpus), ("mems", cpu.mems)):
            if v is not None and (len(v) > 1024 or not _CPU_LIST.fullmatch(v)):
                raise _fail(f"{cp}.{name}", "must be a list like 0-3,6", v)
    pids_limit = None
    if (pd := _opt(raw, "pids", dict, rp)) is not None:
        _req(pd, "limit", int, rp + ".pids")
        pids_limit = _int(pd, "limit", rp + ".pids", -(2**63), I64_MAX)
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
        _req(d, "allow", bool, dp)
        rules.append(
            DeviceRule(
                bool(d["allow"]), kind, _int(d, "major", dp, -1, U32_MAX), _int(d, "minor", dp, -1, U32_MAX), access
            )
        )
    unified = _opt(raw, "unified", dict, rp) or {}
    for k, v in unified.items():
        if not isinstance(v, str):
            raise _fail(f"{rp}.unified.{k}", "must be a string", v)
        if not _UNIFIED_KEY.fullmatch(k) or k.startswith("cgroup."):
            raise _fail(f"{rp}.unified.{k}", "is not a controller file (memory.high, io.weight...)")
    return Resources(memory, cpu, pids_limit, tuple(rules), tuple(sorted(unified.items())))


def parse_resources(raw: Any) -> Resources:
    """A ``linux.resources`` object on its own (``update --resources FILE``), with the config's checks."""
    return _parse_resources(_obj(raw, "linux.resources"))


def _parse_devices(raw: dict[str, Any]) -> tuple[Device, ...]:
    devices = []
    seen: set[str] = set()
    for i, d in enumerate(_opt(raw, "devices", list, "linux") or []):
        dp = f"linux.devices[{i}]"
        d = _obj(d, dp)
        kind = _req(d, "type", str, dp)
        if kind not in ("c", "b", "u", "p"):
            raise _fail(f"{dp}.type", "must be c, b, u or p", kind)
        path = _path(_req(d, "path", str, dp), f"{dp}.path")
        # device nodes are only ever made in the tmpfs the runtime mounts at /dev, never elsewhere
        # in the rootfs (the bundle's, or the image store's, files on the host's disk)
        if not path.startswith("/dev/"):
            raise _fail(f"{dp}.path", "must be under /dev/ (virtkit makes device nodes only in its own /dev)", path)
        if path in seen:
            raise _fail(f"{dp}.path", "appears twice", path)
        seen.add(path)
        if kind != "p":
            _req(d, "major", int, dp)
            _req(d, "minor", int, dp)
        devices.append(
            Device(
                path,
                kind,
                _int(d, "major", dp, 0, 4095) or 0,  # MAJORBITS 12, MINORBITS 20
                _int(d, "minor", dp, 0, 2**20 - 1) or 0,
                _int(d, "fileMode", dp, 0, 0o777),
                _int(d, "uid", dp, 0, U32_MAX - 1),
                _int(d, "gid", dp, 0, U32_MAX - 1),
            )
        )
    return tuple(devices)


def _parse_cgroups_path(value: str | None) -> str | None:
    """``linux.cgroupsPath``: a path below the hierarchies' roots, never a root itself."""
    if value is None:
        return None
    what = "linux.cgroupsPath"
    if "\0" in value:
        raise _fail(what, "contains a NUL byte", value)
    if ":" in value:
        raise _fail(
            what,
            "is a systemd slice (slice:prefix:name), which virtkit does not support; give a path like /virtkit/web",
            value,
        )
    parts = value.split("/")
    if ".." in parts or "." in parts:
        raise _fail(what, "must be a path without '.' or '..'", value)
    names = [p for p in parts if p]
    if not names:
        raise _fail(what, "must name a cgroup below the root (the root cgroup holds the whole host)", value)
    if len(value.encode()) > PATH_MAX or any(len(n.encode()) > NAME_MAX for n in names):
        raise _fail(what, f"is longer than the kernel allows ({PATH_MAX} bytes, {NAME_MAX} per name)", value[:80])
    if len(names) > 32:
        raise _fail(what, "is nested more than 32 levels deep", value[:80])
    return "/" + "/".join(names)


def _parse_sysctls(raw: dict[str, Any], namespaces: set[str]) -> tuple[tuple[str, str], ...]:
    sysctl = _opt(raw, "sysctl", dict, "linux") or {}
    for k, v in sysctl.items():
        where = f"linux.sysctl.{k}"
        if not isinstance(v, str):
            raise _fail(where, "must be a string", v)
        if len(v) > 4096:
            raise _fail(where, "is longer than 4096 characters")
        if len(k) > 256 or not _SYSCTL_KEY.fullmatch(k):
            raise _fail(where, "is not a valid sysctl name (dotted, like net.ipv4.ip_forward)")
        if k == "kernel.hostname":
            # runc refuses it too: two sources for one value (the field wins in one runtime, the
            # sysctl in another)
            raise _fail(where, "conflicts with the hostname field; set hostname instead of this sysctl")
        ns = sysctl_namespace(k)
        if ns is None:
            raise _fail(
                where,
                "is not a namespaced sysctl and would change the host: only kernel.msg*, sem, "
                "shm* and fs.mqueue.* (ipc), net.* (network) and kernel.domainname (uts) "
                "can be set; remove it",
            )
        if ns not in namespaces:
            raise _fail(
                where,
                f"belongs to the {ns} namespace, which the container does not have: setting it "
                f'would change the host\'s value; add {{"type": "{ns}"}} to linux.namespaces or '
                "remove it",
            )
    return tuple(sorted(sysctl.items()))


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
        if path and kind == "mount":
            raise _fail(
                f"{np_}.path",
                "cannot join a mount namespace: virtkit builds the container's root "
                "filesystem in a new one; remove the path",
                path,
            )
        namespaces.append(Namespace(kind, _path(path, f"{np_}.path") if path else None))
    uid_maps, gid_maps = _parse_mappings(raw, "uidMappings"), _parse_mappings(raw, "gidMappings")
    if "user" in seen and not any(n.path for n in namespaces if n.type == "user"):
        if not uid_maps or not gid_maps:
            raise _fail("linux.uidMappings", "and linux.gidMappings are required with a new user namespace")
    elif uid_maps or gid_maps:
        raise _fail("linux.uidMappings", "needs a user namespace in linux.namespaces")
    devices = _parse_devices(raw)
    resources = Resources()
    if (r := _opt(raw, "resources", dict, "linux")) is not None:
        resources = _parse_resources(r)
    sysctl = _parse_sysctls(raw, seen)
    seccomp = _opt(raw, "seccomp", dict, "linux")
    if seccomp is not None:
        from virtkit.container.seccomp import validate_profile

        validate_profile(seccomp, "linux.seccomp")
    prop = _opt(raw, "rootfsPropagation", str, "linux")
    if prop is not None and prop not in PROPAGATION_MODES:
        raise _fail("linux.rootfsPropagation", "is not a propagation mode", prop)
    if prop in ("shared", "rshared"):
        raise _fail(
            "linux.rootfsPropagation",
            "shared would make the container's mounts appear on the host; use slave or private",
            prop,
        )
    cgroups_path = _parse_cgroups_path(_opt(raw, "cgroupsPath", str, "linux"))
    return Linux(
        tuple(namespaces),
        uid_maps,
        gid_maps,
        devices,
        cgroups_path,
        resources,
        sysctl,
        seccomp,
        prop,
        tuple(_path(p, f"linux.maskedPaths[{i}]") for i, p in enumerate(_strs(raw, "maskedPaths", "linux"))),
        tuple(_path(p, f"linux.readonlyPaths[{i}]") for i, p in enumerate(_strs(raw, "readonlyPaths", "linux"))),
    )


PROPAGATION_MODES = ("private", "rprivate", "slave", "rslave", "shared", "rshared", "unbindable", "runbindable")


def _parse_mounts(raw: dict[str, Any]) -> tuple[Mount, ...]:
    mounts = []
    for i, m in enumerate(_opt(raw, "mounts", list, "") or []):
        mp = f"mounts[{i}]"
        m = _obj(m, mp)
        dest = _path(_req(m, "destination", str, mp), f"{mp}.destination")
        kind = _opt(m, "type", str, mp)
        options = _strs(m, "options", mp)
        if kind == "devtmpfs":
            raise _fail(
                f"{mp}.type",
                "devtmpfs is the host's own /dev (one instance for the whole machine); "
                "use tmpfs (virtkit makes the container's device nodes in it)",
                kind,
            )
        for j, opt in enumerate(options):
            if opt in ("shared", "rshared"):
                raise _fail(
                    f"{mp}.options[{j}]",
                    "would make mounts made in the container appear on the host; use slave or private",
                    opt,
                )
        mounts.append(Mount(dest, kind, _opt(m, "source", str, mp), options))
    return tuple(mounts)


def _parse_hooks(raw: dict[str, Any]) -> Hooks:
    out: dict[str, tuple[Hook, ...]] = {}
    for key, attr in (
        ("prestart", "prestart"),
        ("createRuntime", "create_runtime"),
        ("poststart", "poststart"),
        ("poststop", "poststop"),
    ):
        hooks = []
        for i, h in enumerate(_opt(raw, key, list, "hooks") or []):
            hp = f"hooks.{key}[{i}]"
            h = _obj(h, hp)
            timeout = _int(h, "timeout", hp, 1, 86400)
            env = _strs(h, "env", hp)
            for j, e in enumerate(env):
                if "=" not in e or e.startswith("="):
                    raise _fail(f"{hp}.env[{j}]", "must have the form KEY=VALUE", e)
            hooks.append(Hook(_path(_req(h, "path", str, hp), f"{hp}.path"), _strs(h, "args", hp), env, timeout))
        out[attr] = tuple(hooks)
    for key in ("createContainer", "startContainer"):
        if raw.get(key):
            raise _fail(f"hooks.{key}", "is not supported by virtkit; use createRuntime/poststart")
    return Hooks(**out)


def parse_config(raw: Any) -> Config:
    """Turn the decoded JSON of a config.json into a :class:`Config`, or raise ConfigError."""
    raw = _obj(raw, "(top level)")
    _no_nul(raw, "")
    version = _req(raw, "ociVersion", str, "")
    if not version.startswith("1."):
        raise _fail("ociVersion", "must be a 1.x runtime-spec version", version)
    root = _obj(raw.get("root"), "root") if raw.get("root") is not None else None
    if root is None:
        raise _fail("root", "is required")
    root_path = _req(root, "path", str, "root")
    if not root_path or len(root_path.encode()) > PATH_MAX:
        raise _fail("root.path", "must name the rootfs directory", root_path[:80])
    process_raw = raw.get("process")
    if process_raw is None:
        raise _fail("process", "is required (virtkit starts the container's process)")
    process = _parse_process(_obj(process_raw, "process"))
    mounts = _parse_mounts(raw)
    linux = _parse_linux(_obj(raw["linux"], "linux")) if raw.get("linux") is not None else Linux()
    hooks = _parse_hooks(_obj(raw["hooks"], "hooks")) if raw.get("hooks") is not None else Hooks()
    annotations = _opt(raw, "annotations", dict, "") or {}
    for k, v in annotations.items():
        if not isinstance(v, str):
            raise _fail(f"annotations.{k}", "must be a string", v)
    hostname = _opt(raw, "hostname", str, "")
    domainname = _opt(raw, "domainname", str, "")
    for key, value in (("hostname", hostname), ("domainname", domainname)):
        if value is None:
            continue
        if linux.namespace("uts") is None:
            # without its own UTS namespace the container would rename the host
            raise _fail(key, "needs a uts namespace in linux.namespaces (it would change the host's)")
        if len(value.encode()) > HOST_NAME_MAX:
            raise _fail(key, f"is longer than {HOST_NAME_MAX} bytes", value[:80])
    if linux.devices and not _dev_is_tmpfs(mounts):
        raise _fail(
            "linux.devices",
            "needs a tmpfs mounted at /dev (virtkit makes device nodes only in a /dev "
            "it mounted itself, never in the rootfs or in a /dev from the host); add the default "
            "/dev mount or remove linux.devices",
        )
    return Config(
        version,
        root_path,
        bool(_opt(root, "readonly", bool, "root")),
        process,
        hostname,
        domainname,
        mounts,
        linux,
        hooks,
        tuple(sorted(annotations.items())),
    )


def _dev_is_tmpfs(mounts: tuple[Mount, ...]) -> bool:
    """Whether the last mount on /dev is a new tmpfs (not a bind mount of something)."""
    last = None
    for m in mounts:
        if m.destination == "/dev":
            last = m
    return last is not None and last.type == "tmpfs" and not {"bind", "rbind"} & set(last.options)


def load_bundle(bundle: str) -> tuple[Config, str]:
    """Read ``bundle/config.json``; return the config and the absolute rootfs path (checked to exist)."""
    config, _raw, rootfs = load_bundle_raw(bundle)
    return config, rootfs


def load_bundle_raw(bundle: str, config_path: str | None = None) -> tuple[Config, dict[str, Any], str]:
    """:func:`load_bundle`, and the decoded JSON as read (the runtime keeps a copy of exactly that).

    ``config_path`` (crun's ``--config``) names another file than ``BUNDLE/config.json``; a relative
    ``root.path`` is still relative to the bundle (runtime-spec config.md)."""
    from virtkit.records import UntrustedInput, load_object

    bundle = os.path.abspath(bundle)
    path = os.path.abspath(config_path) if config_path else os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        if config_path:
            raise ConfigError(f"cannot read {path}: no such file (check --config)") from None
        raise ConfigError(f"no config.json in bundle {bundle}: run 'virtkit spec' there to write one") from None
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
    try:
        raw = load_object(text, what=path, max_bytes=MAX_CONFIG_BYTES)
    except UntrustedInput as err:
        raise ConfigError(str(err)) from None
    config = parse_config(raw)
    rootfs = config.root_path if os.path.isabs(config.root_path) else os.path.join(bundle, config.root_path)
    if not os.path.isdir(rootfs):
        raise ConfigError(
            f"root.path {config.root_path!r}: rootfs directory {rootfs} does not exist; "
            "create it or fix root.path in config.json"
        )
    if os.path.realpath(rootfs) == "/":
        raise ConfigError(
            f"root.path {config.root_path!r} is the host's / : a container needs a rootfs directory of its own"
        )
    return config, raw, rootfs
