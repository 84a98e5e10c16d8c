"""What the runtime supports, and the ``update`` verb's flags as ``linux.resources``.

``features()`` is the document of runtime-spec ``features.md`` (the ``features`` verb of runc and
crun): every list is taken from the code that implements it, so it cannot claim more than the
runtime does. ``update_resources()`` turns runc's ``update`` flags (``--memory``, ``--cpu-quota``...)
or a ``--resources`` JSON file into a ``linux.resources`` object, which the runtime parses with the
same checks as a config.json.
"""

from __future__ import annotations

from typing import Any

from virtkit.errors import ConfigError

OCI_VERSION_MIN = "1.0.0"
OCI_VERSION_MAX = "1.2.0"

#: hooks the runtime runs (config.py refuses createContainer/startContainer)
HOOKS = ("prestart", "createRuntime", "poststart", "poststop")


def features() -> dict[str, Any]:
    """runtime-spec features.md: the runtime's capabilities as a JSON-able object."""
    from virtkit.container.config import SUPPORTED_NAMESPACES
    from virtkit.container.rootfs import ATTR_OPTIONS, IGNORED_OPTIONS, PROPAGATION, SB_OPTIONS
    from virtkit.host.caps import CAPABILITIES
    from virtkit.host.seccomp import ACTIONS, OPS

    options = set(ATTR_OPTIONS) | set(SB_OPTIONS) | set(IGNORED_OPTIONS) | {"bind", "rbind"}
    options |= {p for p in PROPAGATION if "shared" not in p}
    return {
        "ociVersionMin": OCI_VERSION_MIN,
        "ociVersionMax": OCI_VERSION_MAX,
        "hooks": list(HOOKS),
        "mountOptions": sorted(options),
        "linux": {
            "namespaces": list(SUPPORTED_NAMESPACES),
            "capabilities": sorted(f"CAP_{name}" if not name.startswith("CAP_") else name for name in CAPABILITIES),
            "cgroup": {"v1": True, "v2": True, "systemd": False, "systemdUser": False, "rdma": False},
            "seccomp": {
                "enabled": True,
                "actions": list(ACTIONS),
                "operators": list(OPS),
                "archs": ["SCMP_ARCH_X86_64"],
                "knownFlags": [],
                "supportedFlags": [],
            },
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
            "intelRdt": {"enabled": False},
            "mountExtensions": {"idmap": {"enabled": False}},
        },
        "annotations": {"org.virtkit.runtime": "virtkit (Python)"},
    }


def _int_flag(name: str, text: str, *, allow_unlimited: bool = False, minimum: int = 0) -> int:
    """A number of runc's update flags: decimal, with K/M/G suffixes for byte counts as runc."""
    from virtkit.units import parse_size

    t = text.strip()
    if allow_unlimited and t == "-1":
        return -1
    if name.startswith("--memory"):
        value = parse_size(t, what=name)
    else:
        try:
            value = int(t, 10)
        except ValueError:
            raise ConfigError(f"{name} {text!r} is not a number") from None
    if value < minimum:
        raise ConfigError(f"{name} {value} is below {minimum}" + (" (use -1 for no limit)" if allow_unlimited else ""))
    return value


def update_resources(
    flags: dict[str, str | None], unsupported: dict[str, str | None], resources_json: bytes | None, what: str = ""
) -> dict[str, Any]:
    """runc's ``update`` flags (or its ``--resources`` file) as a raw ``linux.resources`` object.

    ``flags`` maps option names (``memory``, ``cpu_quota``...) to the text given, ``unsupported``
    the flags virtkit accepts from the dialect but cannot honour (each an error when given).
    """
    for name, value in unsupported.items():
        if value is not None:
            raise ConfigError(f"{name} is not supported by virtkit (kernel memory, realtime and RDT limits); drop it")
    raw: dict[str, Any] = {}
    if resources_json is not None:
        from virtkit.container.config import MAX_CONFIG_BYTES
        from virtkit.records import UntrustedInput, load_object

        try:
            raw = load_object(resources_json, what=f"resources file {what}", max_bytes=MAX_CONFIG_BYTES)
        except UntrustedInput as err:
            raise ConfigError(str(err)) from None
    mem = dict(raw.get("memory") or {})
    cpu = dict(raw.get("cpu") or {})
    if flags.get("memory") is not None:
        mem["limit"] = _int_flag("--memory", str(flags["memory"]), allow_unlimited=True)
    if flags.get("memory_reservation") is not None:
        mem["reservation"] = _int_flag("--memory-reservation", str(flags["memory_reservation"]), allow_unlimited=True)
    if flags.get("memory_swap") is not None:
        mem["swap"] = _int_flag("--memory-swap", str(flags["memory_swap"]), allow_unlimited=True)
    if flags.get("cpu_shares") is not None:
        cpu["shares"] = _int_flag("--cpu-shares", str(flags["cpu_shares"]), minimum=2)
    if flags.get("cpu_quota") is not None:
        cpu["quota"] = _int_flag("--cpu-quota", str(flags["cpu_quota"]), allow_unlimited=True)
    if flags.get("cpu_period") is not None:
        cpu["period"] = _int_flag("--cpu-period", str(flags["cpu_period"]), minimum=1)
    if flags.get("cpuset_cpus") is not None:
        cpu["cpus"] = str(flags["cpuset_cpus"])
    if flags.get("cpuset_mems") is not None:
        cpu["mems"] = str(flags["cpuset_mems"])
    if mem:
        raw["memory"] = mem
    if cpu:
        raw["cpu"] = cpu
    if flags.get("pids_limit") is not None:
        raw["pids"] = {"limit": _int_flag("--pids-limit", str(flags["pids_limit"]), allow_unlimited=True)}
    if flags.get("blkio_weight") is not None:
        weight = _int_flag("--blkio-weight", str(flags["blkio_weight"]), minimum=10)
        if weight > 1000:
            raise ConfigError(f"--blkio-weight {weight} is above 1000 (the range is 10..1000)")
        raw["blockIO"] = {"weight": weight}
    if not raw:
        raise ConfigError("update: nothing to change; give --memory, --cpu-quota, --pids-limit... or --resources FILE")
    return raw
