"""The default ``config.json`` (``virtkit spec``): runc's layout with Docker's security defaults."""

from __future__ import annotations

import os
from typing import Any

from virtkit.container.seccomp import default_profile
from virtkit.host.caps import DOCKER_DEFAULT

DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm")

#: Docker's masked and read-only paths (moby oci/defaults.go)
MASKED_PATHS = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


def default_mounts() -> list[dict[str, Any]]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
        },
    ]


def default_spec(
    args: list[str] | None = None, rootless: bool = False, rootfs: str = "rootfs", hostname: str = "virtkit"
) -> dict[str, Any]:
    caps = list(DOCKER_DEFAULT)
    namespaces = [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")]
    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
        "seccomp": default_profile(caps),
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
    }
    mounts = default_mounts()
    if rootless:
        uid, gid = os.geteuid(), os.getegid()
        namespaces.append({"type": "user"})
        if uid == 0:
            linux["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
            linux["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
        else:
            linux["uidMappings"] = [{"containerID": 0, "hostID": uid, "size": 1}]
            linux["gidMappings"] = [{"containerID": 0, "hostID": gid, "size": 1}]
        del linux["resources"]
        # sysfs of the host is bound read-only; a cgroup tree cannot be mounted without privileges
        mounts = [m for m in mounts if m["type"] != "cgroup"]
        for m in mounts:
            if m["destination"] == "/dev/pts":
                m["options"] = [o for o in m["options"] if o != "gid=5"]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args or ["sh"],
            "env": list(DEFAULT_ENV),
            "cwd": "/",
            "capabilities": {k: list(caps) for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": False},
        "hostname": hostname,
        "mounts": mounts,
        "linux": linux,
    }
