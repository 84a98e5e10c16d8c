"""One cgroup per VM: CPU weight or quota, pinning, the VMM's memory cap, and usage figures.

The layout, the directories and the files are the host layer's (:mod:`virtkit.host.cgroups`);
what is the VM's is here. A VM's vCPUs are threads of one process, so the cgroup holds exactly one
process, and pinning uses the cpuset controller on v1 as on v2. Paths are
``<hierarchy>/<parent>/<vm>``, with ``parent`` (default ``virtkitd``) shared by every VM of a
service, so weights compare VMs with one another.

| what | cgroup v1 (and hybrid) | cgroup v2 |
| --- | --- | --- |
| weight (1..10000, 100 = default) | ``cpu.shares`` = weight x 1024 / 100 | ``cpu.weight`` |
| quota (% of one CPU) | ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` | ``cpu.max`` |
| pinning | ``cpuset.cpus`` (+ ``cpuset.mems``, which v1 requires) | ``cpuset.cpus`` |
| memory cap | ``memory.limit_in_bytes`` | ``memory.max`` (and no swap) |
| CPU time | ``cpuacct.usage`` (ns) | ``cpu.stat`` ``usage_usec`` |

On a hybrid host the VM also gets a directory in the cgroup2 hierarchy, for ``cgroup.kill``.
"""

from __future__ import annotations

import contextlib

from virtkit.host import cgroups as hostcg
from virtkit.host.cgroups import CFS_PERIOD_US, CgroupError, Group, Layout, detect, parse_cpus

V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids")
V2_CONTROLLERS = ("cpu", "cpuset", "memory", "pids")


def validate_cpus(text: str, cores: set[int]) -> None:
    try:
        cpus = parse_cpus(text)
    except ValueError:
        raise CgroupError(f"cpus {text!r} is not a CPU list: use e.g. 0, 0-1 or 0,2") from None
    if not cpus or not cpus <= cores:
        raise CgroupError(f"cpus {text!r} names CPUs this host does not have (it has {sorted(cores)})")


class VmCgroup(Group):
    def __init__(self, name: str, parent: str = "virtkitd", layout: Layout | None = None) -> None:
        self.parent = "/" + parent.strip("/")
        self.rel = "/" + "/".join(p for p in (parent.strip("/"), name) if p)
        super().__init__(layout or detect(), self.rel, V1_CONTROLLERS)

    def create(self, v2_controllers: tuple[str, ...] = V2_CONTROLLERS) -> list[str]:
        return super().create(v2_controllers)

    def apply(self, *, weight: int, quota_pct: int | None, cpus: str | None, memory_max: int) -> None:
        self.set_cpu_weight(weight, max(2, weight * 1024 // 100), f"cpu weight {weight}")
        quota = quota_pct * CFS_PERIOD_US // 100 if quota_pct else -1
        self.set_cpu_max(quota, CFS_PERIOD_US, f"cpu quota {quota_pct}%" if quota_pct else "no cpu quota")
        self.set_memory_max(memory_max, f"memory cap {memory_max}")
        if self.layout.mode == "v2":  # the cap is on RAM: no swapping the guest out behind it
            with contextlib.suppress(CgroupError):
                self.set("memory", "memory.swap.max", "0")
        self.set_cpuset(cpus, None, f"cpus {cpus}")

    # usage, under the names the daemon's reports use
    cpu_ns = Group.cpu_usage_ns
    memory_bytes = Group.memory_usage
    throttled_ns = Group.cpu_throttled_ns


def remove_parent(parent: str, layout: Layout | None = None) -> None:
    """rmdir the service's parent cgroup in every hierarchy (when no VM is left in it)."""
    hostcg.remove_parent(parent, layout or detect(), V1_CONTROLLERS)
