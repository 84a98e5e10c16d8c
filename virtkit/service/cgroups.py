"""One cgroup per VM: CPU weight or quota, pinning, the VMM's memory cap, and usage figures.

Layout detection is the containers runtime's (:func:`virtkit.container.cgroups.detect`); what
differs for VMs is what is limited: a VM's vCPUs are threads of one process, so the cgroup holds
exactly one process, and pinning uses the cpuset controller on v1 as on v2. Paths are
``<hierarchy>/<parent>/<vm>``, with ``parent`` (default ``virtkitd``) shared by every VM of a
service, so weights compare VMs with one another.

| what | cgroup v1 (and hybrid) | cgroup v2 |
| --- | --- | --- |
| weight (1..10000, 100 = default) | ``cpu.shares`` = weight x 1024 / 100 | ``cpu.weight`` |
| quota (% of one CPU) | ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` | ``cpu.max`` |
| pinning | ``cpuset.cpus`` (+ ``cpuset.mems``, which v1 requires) | ``cpuset.cpus`` |
| memory cap | ``memory.limit_in_bytes`` | ``memory.max`` |
| CPU time | ``cpuacct.usage`` (ns) | ``cpu.stat`` ``usage_usec`` |

On a hybrid host the VM also gets a directory in the cgroup2 hierarchy, for ``cgroup.kill``.
"""

from __future__ import annotations

import contextlib
import os

from virtkit.container.cgroups import Layout, detect
from virtkit.container.cgroups import write_value as _write
from virtkit.errors import VirtkitError

V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids")
V2_CONTROLLERS = ("cpu", "cpuset", "memory", "pids")
CFS_PERIOD_US = 100_000


class CgroupError(VirtkitError):
    pass


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _parse_cpus(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def validate_cpus(text: str, cores: set[int]) -> None:
    try:
        cpus = _parse_cpus(text)
    except ValueError:
        raise CgroupError(f"cpus {text!r} is not a CPU list: use e.g. 0, 0-1 or 0,2") from None
    if not cpus or not cpus <= cores:
        raise CgroupError(f"cpus {text!r} names CPUs this host does not have (it has {sorted(cores)})")


class VmCgroup:
    def __init__(self, name: str, parent: str = "virtkitd", layout: Layout | None = None) -> None:
        self.layout = layout or detect()
        self.rel = "/" + "/".join(p for p in (parent.strip("/"), name) if p)
        self.parent = "/" + parent.strip("/")
        self.dirs: dict[str, str] = {}
        if self.layout.mode == "v2":
            assert self.layout.unified is not None
            self.dirs["unified"] = self.layout.unified + self.rel
        else:
            for c in V1_CONTROLLERS:
                if c in self.layout.v1:
                    self.dirs[c] = self.layout.v1[c] + self.rel
            if self.layout.unified:
                self.dirs["unified"] = self.layout.unified + self.rel

    def directories(self) -> list[str]:
        out: list[str] = []
        for d in self.dirs.values():
            if d not in out:
                out.append(d)
        return out

    def _dir(self, ctrl: str) -> str | None:
        return self.dirs.get("unified") if self.layout.mode == "v2" else self.dirs.get(ctrl)

    # --- lifecycle -------------------------------------------------------------------------------
    def create(self) -> None:
        made: list[str] = []
        try:
            if self.layout.mode == "v2":
                self._create_v2(made)
            else:
                for ctrl, d in self.dirs.items():
                    self._mkdirs(d, made, cpuset=ctrl == "cpuset")
        except OSError as e:
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
            raise CgroupError(f"cannot create cgroup {e.filename or self.rel}: {e.strerror}") from None

    @staticmethod
    def _mkdirs(d: str, made: list[str], cpuset: bool) -> None:
        missing = []
        cur = d
        while not os.path.isdir(cur):
            missing.append(cur)
            cur = os.path.dirname(cur)
        for m in reversed(missing):
            os.mkdir(m)
            made.append(m)
            if cpuset:  # v1: a cpuset with no cpus or mems accepts no task; start from the parent's
                for f in ("cpuset.cpus", "cpuset.mems"):
                    _write(os.path.join(m, f), _read(os.path.join(os.path.dirname(m), f)))

    def _create_v2(self, made: list[str]) -> None:
        root = self.layout.unified
        assert root is not None
        cur = root
        for part in [p for p in self.rel.split("/") if p]:
            available = set(_read(os.path.join(cur, "cgroup.controllers")).split())
            enable = " ".join(f"+{c}" for c in V2_CONTROLLERS if c in available)
            if enable:
                _write(os.path.join(cur, "cgroup.subtree_control"), enable)
            cur = os.path.join(cur, part)
            if not os.path.isdir(cur):
                os.mkdir(cur)
                made.append(cur)

    def apply(self, *, weight: int, quota_pct: int | None, cpus: str | None, memory_max: int) -> None:
        v2 = self.layout.mode == "v2"
        if v2:
            self._set("cpu", "cpu.weight", str(weight))
            self._set("cpu", "cpu.max", f"{quota_pct * CFS_PERIOD_US // 100 if quota_pct else 'max'} {CFS_PERIOD_US}")
            self._set("memory", "memory.max", str(memory_max))
            with contextlib.suppress(CgroupError):
                self._set("memory", "memory.swap.max", "0")
        else:
            self._set("cpu", "cpu.shares", str(max(2, weight * 1024 // 100)))
            self._set("cpu", "cpu.cfs_period_us", str(CFS_PERIOD_US))
            self._set("cpu", "cpu.cfs_quota_us", str(quota_pct * CFS_PERIOD_US // 100 if quota_pct else -1))
            self._set("memory", "memory.limit_in_bytes", str(memory_max))
        if cpus:
            self._set("cpuset", "cpuset.cpus", cpus)

    def _set(self, ctrl: str, name: str, value: str) -> None:
        d = self._dir(ctrl)
        if d is None or not os.path.exists(os.path.join(d, name)):
            raise CgroupError(f"this host's cgroups have no {name} ({ctrl} controller missing)")
        try:
            _write(os.path.join(d, name), value)
        except OSError as e:
            raise CgroupError(f"the kernel refused {name} = {value}: {e.strerror}") from None

    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.directories()]

    def kill(self) -> None:
        u = self.dirs.get("unified")
        if u and os.path.exists(os.path.join(u, "cgroup.kill")):
            with contextlib.suppress(OSError):
                _write(os.path.join(u, "cgroup.kill"), "1")

    def remove(self, timeout: float = 2.0) -> list[str]:
        from virtkit.container.cgroups import remove_dirs

        return remove_dirs(self.directories(), timeout)

    def exists(self) -> bool:
        return any(os.path.isdir(d) for d in self.directories())

    # --- usage -----------------------------------------------------------------------------------
    def cpu_ns(self) -> int:
        try:
            if self.layout.mode == "v2":
                for line in _read(os.path.join(self.dirs["unified"], "cpu.stat")).splitlines():
                    k, _, v = line.partition(" ")
                    if k == "usage_usec":
                        return int(v) * 1000
                return 0
            d = self.dirs.get("cpuacct")
            return int(_read(os.path.join(d, "cpuacct.usage"))) if d else 0
        except (OSError, ValueError):
            return 0

    def memory_bytes(self) -> int:
        d = self._dir("memory")
        name = "memory.current" if self.layout.mode == "v2" else "memory.usage_in_bytes"
        try:
            return int(_read(os.path.join(d, name))) if d else 0
        except (OSError, ValueError):
            return 0

    def throttled_ns(self) -> int:
        d = self._dir("cpu")
        if d is None:
            return 0
        try:
            for line in _read(os.path.join(d, "cpu.stat")).splitlines():
                k, _, v = line.partition(" ")
                if k == "throttled_time":
                    return int(v)
                if k == "throttled_usec":
                    return int(v) * 1000
        except (OSError, ValueError):
            pass
        return 0


def remove_parent(parent: str, layout: Layout | None = None) -> None:
    """rmdir the service's parent cgroup in every hierarchy (when no VM is left in it)."""
    layout = layout or detect()
    roots = [layout.unified] if layout.mode == "v2" else [layout.v1[c] for c in V1_CONTROLLERS if c in layout.v1]
    if layout.mode != "v2" and layout.unified:
        roots.append(layout.unified)
    for root in dict.fromkeys(r for r in roots if r):
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(root, parent.strip("/")))
