"""Host capacity and the account of what running VMs hold.

CPU: ``cores x overcommit`` vCPUs may run at once (vCPUs are threads; overcommitting them shares
cores, it does not break isolation: cgroups keep each VM to its weight or quota). Memory is not
overcommitted: a VM starts only if its guest memory plus the VMM's own allowance fits in what the
host can give VMs (its memory less a reserve for itself) and in what is available right now.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from virtkit.errors import VirtkitError

MIB = 1 << 20
#: memory a VMM process needs beyond its guest's RAM: the interpreter, page tables, KVM's shadow
#: pages (charged to the VM's memory cgroup too). bench/service.py measures the real figure.
VMM_OVERHEAD = 64 * MIB
#: memory left unclaimed in what the kernel says is available right now (page cache churn, slack)
AVAILABLE_SLACK = 256 * MIB


@dataclass(frozen=True, slots=True)
class AccountInfo:
    """What :meth:`Account.describe` reports (bytes, vCPUs)."""

    cores: int
    overcommit: float
    vcpu_capacity: int
    vcpus_used: int
    memory_total: int
    memory_reserved_for_host: int
    memory_capacity: int
    memory_used: int
    memory_free: int
    memory_available_now: int
    vmm_overhead_allowance: int
    load_average: tuple[float, float, float]


class InsufficientResources(VirtkitError):
    """The host cannot back what a VM asks for."""


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * 1024
    return out


def host_cores() -> int:
    return len(os.sched_getaffinity(0))


class Account:
    def __init__(self, overcommit: float = 4.0, reserve: int | None = None) -> None:
        self.cores = host_cores()
        self.overcommit = overcommit
        self.total_memory = _meminfo()["MemTotal"]
        # a reserve for the host itself: 1 GiB or 5 %, whichever is more
        self.reserve = reserve if reserve is not None else max(1 << 30, self.total_memory // 20)
        self.lock = threading.Lock()
        self.held: dict[str, tuple[int, int]] = {}  # VM name -> (vcpus, bytes incl. VMM allowance)

    @property
    def vcpu_capacity(self) -> int:
        return int(self.cores * self.overcommit)

    @property
    def memory_capacity(self) -> int:
        return max(self.total_memory - self.reserve, 0)

    def usage(self) -> tuple[int, int]:
        with self.lock:
            return sum(v for v, _ in self.held.values()), sum(m for _, m in self.held.values())

    def free_memory(self) -> int:
        _, mem = self.usage()
        available = _meminfo().get("MemAvailable", self.total_memory) - AVAILABLE_SLACK
        return max(min(self.memory_capacity - mem, available), 0)

    def reserve_for(self, name: str, vcpus: int, memory: int) -> None:
        """Hold ``vcpus`` and ``memory`` (+ the VMM allowance) for ``name`` or raise, saying how
        much was asked and how much is free."""
        need = memory + VMM_OVERHEAD
        with self.lock:
            if name in self.held:
                return
            used_v = sum(v for v, _ in self.held.values())
            used_m = sum(m for _, m in self.held.values())
            free_v = self.vcpu_capacity - used_v
            if vcpus > free_v:
                raise InsufficientResources(
                    f"cannot start {name}: asked {vcpus} vCPUs, {max(free_v, 0)} free of {self.vcpu_capacity} "
                    f"({self.cores} cores x overcommit {self.overcommit:g})"
                )
            available = _meminfo().get("MemAvailable", self.total_memory) - AVAILABLE_SLACK
            free_m = max(min(self.memory_capacity - used_m, available), 0)
            if need > free_m:
                raise InsufficientResources(
                    f"cannot start {name}: asked {memory // MIB} MiB (+{VMM_OVERHEAD // MIB} MiB for the VMM), "
                    f"{free_m // MIB} MiB free of {self.memory_capacity // MIB} MiB for VMs"
                )
            self.held[name] = (vcpus, need)

    def release(self, name: str) -> None:
        with self.lock:
            self.held.pop(name, None)

    def describe(self) -> AccountInfo:
        used_v, used_m = self.usage()
        info = _meminfo()
        return AccountInfo(
            cores=self.cores,
            overcommit=self.overcommit,
            vcpu_capacity=self.vcpu_capacity,
            vcpus_used=used_v,
            memory_total=self.total_memory,
            memory_reserved_for_host=self.reserve,
            memory_capacity=self.memory_capacity,
            memory_used=used_m,
            memory_free=self.free_memory(),
            memory_available_now=info.get("MemAvailable", 0),
            vmm_overhead_allowance=VMM_OVERHEAD,
            load_average=os.getloadavg(),
        )
