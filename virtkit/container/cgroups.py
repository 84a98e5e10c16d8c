"""cgroups for containers: OCI ``linux.resources`` as limits, device rules, stats and OOM counts.

The layout (v1, hybrid, v2), the directories per hierarchy, the control files and the limit
writes are the host layer's (:mod:`virtkit.host.cgroups`); what is the container's is here: which
controllers a container gets, how the OCI values map onto the files (and which the kernel would
refuse), the device allowlist, and usage in the shape of ``runc events --stats``.

A :class:`Cgroup`'s directory paths are recorded in the container's state *before* they are
made, so that ``delete`` removes them even after a crash.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

from virtkit.container.config import Resources
from virtkit.errors import ContainerError
from virtkit.host.cgroups import Group, Layout, read_int, read_kv

#: v1 controllers a container gets a directory in (when the host has them)
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "devices", "freezer")
#: v2 controllers virtkit enables for containers (when the host offers them)
V2_CONTROLLERS = ("memory", "pids", "cpu", "cpuset")

#: devices every container may use: the ones virtkit creates in /dev (runc's AllowedDevices)
DEFAULT_DEVICE_RULES = (
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",  # null zero full random urandom
    "c 5:0 rwm",
    "c 5:1 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",  # tty console ptmx pts
    "c 10:200 rwm",  # net/tun
)

CPU_QUOTA_MIN_US = 1000  # kernel/sched/core.c: min_cfs_quota_period
CPU_PERIOD_MAX_US = 1_000_000  # max_cfs_quota_period


def shares_to_weight(shares: int) -> int:
    """cpu.shares (2..262144) to cpu.weight (1..10000), the conversion runc and crun use."""
    shares = min(max(shares, 2), 262144)
    return 1 + ((shares - 2) * 9999) // 262142


def device_rules(res: Resources) -> list[Any]:
    """Deny everything, then the config's rules in order, then the devices of the minimal /dev
    (null, zero, full, random, urandom, tty, ptmx, pts, tun): the devices cgroup's semantics, later
    rules winning. runc and crun append their default allowlist the same way, so a config cannot
    take /dev/null away from the container's own init (crun's suite: deny-all plus one allow)."""
    from virtkit.container.devices import Rule, parse_rule

    rules = [Rule(False, "a", None, None, "rwm")]
    for r in res.devices:
        major = None if r.major is None or r.major < 0 else r.major
        minor = None if r.minor is None or r.minor < 0 else r.minor
        rules.append(Rule(r.allow, r.type, major, minor, r.access))
    rules.extend(parse_rule(True, text) for text in DEFAULT_DEVICE_RULES)
    return rules


class Cgroup(Group):
    """The cgroup directories of one container, in every hierarchy of a :class:`Layout`."""

    error = ContainerError
    path_setting = "linux.cgroupsPath"

    def __init__(self, layout: Layout, path: str, cpuset: bool = False) -> None:
        # v1: the cpuset hierarchy only when the config pins CPUs or memory nodes (a v1 cpuset
        # directory must be filled from its parent before it accepts a task)
        super().__init__(layout, path, V1_CONTROLLERS + (("cpuset",) if cpuset else ()))

    def create(self, v2_controllers: tuple[str, ...] = V2_CONTROLLERS) -> list[str]:
        """Make the directories; return every directory made (parents included), outermost first."""
        return super().create(v2_controllers)

    # --- limits ------------------------------------------------------------------------------
    def apply(self, res: Resources) -> None:
        """Write the limits of ``linux.resources``; a value the kernel refuses becomes a ContainerError."""
        self._check(res)
        if self.layout.mode == "v2":
            self._apply_v2(res)
        else:
            self._apply_v1(res)
        self.apply_device_filter(res)

    def update(self, res: Resources) -> None:
        """``update``: write the limits ``res`` sets (devices excluded), leaving the others as they are."""
        self._check(res)
        if self.layout.mode == "v2":
            self._apply_v2(res, devices=False)
        else:
            self._apply_v1(res, devices=False)

    @staticmethod
    def _check(res: Resources) -> None:
        cpu, mem = res.cpu, res.memory
        if cpu.period is not None and not CPU_QUOTA_MIN_US <= cpu.period <= CPU_PERIOD_MAX_US:
            raise ContainerError(
                f"cpu period {cpu.period}us is outside what the kernel accepts "
                f"({CPU_QUOTA_MIN_US}..{CPU_PERIOD_MAX_US}us)"
            )
        if cpu.quota is not None and cpu.quota != -1 and cpu.quota < CPU_QUOTA_MIN_US:
            raise ContainerError(
                f"cpu quota {cpu.quota}us is below the kernel's minimum of "
                f"{CPU_QUOTA_MIN_US}us: use at least {CPU_QUOTA_MIN_US} (or -1 for no limit)"
            )
        if cpu.shares is not None and cpu.shares < 2 and cpu.shares != 0:
            raise ContainerError(f"cpu shares {cpu.shares} is below the kernel's minimum of 2")
        for name, v in (
            ("memory limit", mem.limit),
            ("memory+swap limit", mem.swap),
            ("memory reservation", mem.reservation),
        ):
            if v is not None and v < -1:
                raise ContainerError(f"{name} {v} is negative: give bytes, or -1 for no limit")
            if v is not None and 0 <= v < 4096 and name != "memory reservation":
                raise ContainerError(
                    f"{name} {v} bytes is below one page, which the kernel cannot enforce: use at least a few MiB"
                )
        if res.pids_limit is not None and res.pids_limit < -1:
            raise ContainerError(f"pids limit {res.pids_limit} is negative: give a count, or -1 for no limit")

    def _apply_v1(self, res: Resources, devices: bool = True) -> None:
        mem, cpu = res.memory, res.cpu
        if mem.limit is not None:
            self.set_memory_max(mem.limit, f"memory limit {mem.limit}")
        if mem.swap is not None and self.has("memory", "memory.memsw.limit_in_bytes"):
            self.set("memory", "memory.memsw.limit_in_bytes", str(mem.swap), f"memory+swap limit {mem.swap}")
        if mem.reservation is not None:
            self.set("memory", "memory.soft_limit_in_bytes", str(mem.reservation), "memory reservation")
        if mem.swappiness is not None:
            self.set("memory", "memory.swappiness", str(mem.swappiness), "memory swappiness")
        if mem.disable_oom_killer:
            self.set("memory", "memory.oom_control", "1", "disableOOMKiller")
        if cpu.shares:
            self.set_cpu_weight(shares_to_weight(cpu.shares), cpu.shares, f"cpu shares {cpu.shares}")
        if cpu.period is not None:
            self.set_cpu_max(None, cpu.period, f"cpu period {cpu.period}")
        if cpu.quota is not None:
            self.set_cpu_max(cpu.quota, None, f"cpu quota {cpu.quota}")
        if cpu.cpus or cpu.mems:
            if self.dir("cpuset") is None:
                raise ContainerError(
                    "cpusets need a v1 cpuset cgroup, which virtkit makes only for a container whose config "
                    "sets linux.resources.cpu.cpus or mems: set them at create to change them later"
                    if "cpuset" in self.layout.v1
                    else "linux.resources.cpu.cpus/mems need the cpuset controller, which this host lacks"
                )
            self.set_cpuset(cpu.cpus, cpu.mems, f"cpuset {cpu.cpus or ''} {cpu.mems or ''}".strip())
        if res.pids_limit:
            self.set_pids_max(res.pids_limit, f"pids limit {res.pids_limit}")
        if devices:
            self._apply_devices_v1(res)

    def _apply_devices_v1(self, res: Resources) -> None:
        d = self.dir("devices")
        if d is None:
            return
        for rule in device_rules(res):
            fname = "devices.allow" if rule.allow else "devices.deny"
            text = (
                "a"
                if rule.type == "a" and rule.major is None and rule.minor is None
                else (
                    f"{rule.type} {'*' if rule.major is None else rule.major}:"
                    f"{'*' if rule.minor is None else rule.minor} {rule.access}"
                )
            )
            self.set("devices", fname, text, f"device rule {fname} '{text}'")

    def apply_device_filter(self, res: Resources) -> None:
        """The device rules as a BPF program on the cgroup2 directory: the only enforcement on v2;
        on a hybrid host an addition to the v1 controller, so a refusal there is not fatal."""
        d = self.dirs.get("unified")
        if d is None:
            return
        from virtkit.container import devices

        try:
            devices.attach(d, device_rules(res))
        except ContainerError:
            if self.layout.mode == "v2":
                raise

    def _apply_v2(self, res: Resources, devices: bool = True) -> None:  # noqa: ARG002 - v2 devices are BPF
        mem, cpu = res.memory, res.cpu
        if mem.limit is not None:
            self.set_memory_max(mem.limit, f"memory limit {mem.limit}")
        if mem.swap is not None and mem.limit is not None and self.has("memory", "memory.swap.max"):
            swap = "max" if mem.swap < 0 or mem.limit < 0 else str(mem.swap - mem.limit)
            self.set("memory", "memory.swap.max", swap, f"swap limit {mem.swap}")
        if mem.reservation is not None:
            self.set("memory", "memory.low", str(max(mem.reservation, 0)), "memory reservation")
        if mem.disable_oom_killer:
            raise ContainerError("disableOOMKiller is not available on cgroup v2; remove it")
        if cpu.shares:
            self.set_cpu_weight(shares_to_weight(cpu.shares), cpu.shares, f"cpu shares {cpu.shares}")
        if cpu.quota is not None or cpu.period is not None:
            self.set_cpu_max(cpu.quota, cpu.period, f"cpu quota {cpu.quota}")
        self.set_cpuset(cpu.cpus, None, f"cpuset {cpu.cpus}")
        self.set_cpuset(None, cpu.mems, f"memory nodes {cpu.mems}")
        if res.pids_limit:
            self.set_pids_max(res.pids_limit, f"pids limit {res.pids_limit}")
        for key, value in res.unified:
            if "/" in key or key.startswith("cgroup."):
                raise ContainerError(f"linux.resources.unified key {key!r} is not a controller file")
            self.set("unified", key, value, f"unified {key}")

    # --- queries -----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Resource usage in the shape of ``runc events --stats`` data."""
        if self.layout.mode == "v2":
            d = self.dirs["unified"]
            cst = read_kv(os.path.join(d, "cpu.stat"))
            mem_events = read_kv(os.path.join(d, "memory.events"))
            return {
                "cpu": {
                    "usage": {
                        "total": cst.get("usage_usec", 0) * 1000,
                        "user": cst.get("user_usec", 0) * 1000,
                        "kernel": cst.get("system_usec", 0) * 1000,
                    },
                    "throttling": {
                        "periods": cst.get("nr_periods", 0),
                        "throttledPeriods": cst.get("nr_throttled", 0),
                        "throttledTime": cst.get("throttled_usec", 0) * 1000,
                    },
                },
                "memory": {
                    "usage": {
                        "usage": read_int(os.path.join(d, "memory.current")) or 0,
                        "max": read_int(os.path.join(d, "memory.peak")) or 0,
                        "limit": read_int(os.path.join(d, "memory.max")) or -1,
                        "failcnt": mem_events.get("max", 0),
                    },
                    "oomKills": mem_events.get("oom_kill", 0),
                },
                "pids": {
                    "current": read_int(os.path.join(d, "pids.current")) or 0,
                    "limit": read_int(os.path.join(d, "pids.max")) or -1,
                },
            }
        mem_d, cpu_d = self.dirs.get("memory"), self.dirs.get("cpu")
        acct_d, pids_d = self.dirs.get("cpuacct"), self.dirs.get("pids")
        out: dict[str, Any] = {}
        cpu: dict[str, Any] = {}
        if acct_d:
            ticks = os.sysconf("SC_CLK_TCK")
            st = read_kv(os.path.join(acct_d, "cpuacct.stat"))
            cpu["usage"] = {
                "total": read_int(os.path.join(acct_d, "cpuacct.usage")) or 0,
                "user": st.get("user", 0) * 1_000_000_000 // ticks,
                "kernel": st.get("system", 0) * 1_000_000_000 // ticks,
            }
        if cpu_d:
            st = read_kv(os.path.join(cpu_d, "cpu.stat"))
            cpu["throttling"] = {
                "periods": st.get("nr_periods", 0),
                "throttledPeriods": st.get("nr_throttled", 0),
                "throttledTime": st.get("throttled_time", 0),
            }
        out["cpu"] = cpu
        if mem_d:
            limit = read_int(os.path.join(mem_d, "memory.limit_in_bytes"))
            out["memory"] = {
                "usage": {
                    "usage": read_int(os.path.join(mem_d, "memory.usage_in_bytes")) or 0,
                    "max": read_int(os.path.join(mem_d, "memory.max_usage_in_bytes")) or 0,
                    "limit": -1 if limit is None or limit >= 2**62 else limit,
                    "failcnt": read_int(os.path.join(mem_d, "memory.failcnt")) or 0,
                },
                "oomKills": self.oom_kills(),
            }
        if pids_d:
            out["pids"] = {
                "current": read_int(os.path.join(pids_d, "pids.current")) or 0,
                "limit": read_int(os.path.join(pids_d, "pids.max")) or -1,
            }
        return out

    # --- signals -----------------------------------------------------------------------------
    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """Signal every process of the container. SIGKILL uses cgroup.kill where the kernel has it
        (atomic: no fork can escape); otherwise the cgroup is frozen while the signals go out."""
        paused = self.frozen()
        if sig == signal.SIGKILL and self.kill():
            if paused:  # a paused container: frozen tasks die only once thawed (v1 freezer)
                self.freeze(False)
            return
        frozen = self.freeze(True)
        try:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        finally:
            # thaw what this froze; a paused container stays paused, unless it is being killed
            if frozen and (not paused or sig == signal.SIGKILL):
                self.freeze(False)
