"""cgroups for containers: layout detection (v1, hybrid, v2), limits, stats, OOM count, kill, removal.

Three layouts exist in the wild and this module speaks all three:

* **v1**: one hierarchy per controller (``/sys/fs/cgroup/memory``, ``.../cpu``...);
* **hybrid**: v1 controllers plus a cgroup2 hierarchy (``/sys/fs/cgroup/unified``) holding no or few
  controllers (here: hugetlb). virtkit also makes a cgroup there: it gives ``cgroup.kill`` (5.14+),
  which kills every process of the container in one write, even though limits live in v1;
* **v2**: a single unified hierarchy (most current distributions).

A :class:`Cgroup` is a set of directories, one per hierarchy; their paths are recorded in the
container's state *before* they are made, so that ``delete`` removes them even after a crash.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from virtkit.container.config import Resources
from virtkit.errors import ContainerError

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


@dataclass(frozen=True, slots=True)
class Layout:
    mode: str  # "v1", "hybrid" or "v2"
    v1: dict[str, str] = field(default_factory=dict)  # controller -> mount point
    unified: str | None = None  # cgroup2 mount point

    def describe(self) -> str:
        if self.mode == "v2":
            return f"cgroup v2 at {self.unified}"
        ctrls = ",".join(sorted(self.v1))
        extra = f" + cgroup2 at {self.unified}" if self.unified else ""
        return f"cgroup {self.mode} ({ctrls}){extra}"


#: where the host's cgroup hierarchies live (systemd and every distribution put them there)
CGROUP_ROOT = "/sys/fs/cgroup"


def detect(mountinfo: str | None = None) -> Layout:
    """Read /proc/self/mountinfo and classify the cgroup layout.

    Only the hierarchies at the host's cgroup location count (``/sys/fs/cgroup`` itself, or one
    level below it, as v1 controllers and a hybrid host's ``unified`` are mounted): that is where
    the runtime makes its cgroups. Other programs mount cgroup filesystems elsewhere for their own
    purposes (a test's private tree, a benchmark's v1 hugetlb); those must not change the layout.
    Only when nothing is mounted there are other mounts considered."""
    if mountinfo is None:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
    found: dict[bool, tuple[dict[str, str], list[str]]] = {True: ({}, []), False: ({}, [])}
    for line in mountinfo.splitlines():
        pre, _, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype, mountpoint, root = tail[0], fields[4].replace("\\040", " "), fields[3]
        canonical = mountpoint == CGROUP_ROOT or os.path.dirname(mountpoint) == CGROUP_ROOT
        v1_found, unified_found = found[canonical]
        if fstype == "cgroup2" and root == "/":
            unified_found.append(mountpoint)
        elif fstype == "cgroup" and root == "/":
            for opt in tail[2].split(","):
                if opt in V1_CONTROLLERS or opt in ("cpuset", "blkio", "hugetlb", "net_cls", "perf_event"):
                    v1_found.setdefault(opt, mountpoint)
    v1, unified_all = found[True]
    if not v1 and not unified_all:
        v1, unified_all = found[False]
    # a cgroup2 at /sys/fs/cgroup itself is the unified hierarchy of a v2 host; else the first one
    unified = CGROUP_ROOT if CGROUP_ROOT in unified_all else (unified_all[0] if unified_all else None)
    if v1:
        return Layout("hybrid" if unified else "v1", v1, unified)
    if unified:
        return Layout("v2", {}, unified)
    raise ContainerError("no cgroup filesystem is mounted: mount cgroup2 on /sys/fs/cgroup (or v1 controllers)")


def write_value(path: str, value: str) -> None:
    """Write a cgroup control file in one write(2), as the kernel expects."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _read_int(path: str) -> int | None:
    try:
        text = _read(path).strip()
    except OSError:
        return None
    if text == "max":
        return -1
    try:
        return int(text)
    except ValueError:
        return None


def _kv(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in _read(path).splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                out[parts[0]] = int(parts[1])
    except OSError:
        pass
    return out


def remove_dirs(paths: list[str], timeout: float = 2.0) -> list[str]:
    """rmdir cgroup directories, deepest first, retrying while the kernel still holds them;
    returns those that could not be removed. Shared with the per-VM cgroups of virtkitd."""
    left = []
    for d in sorted(paths, key=lambda p: p.count("/"), reverse=True):
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as err:
                # EBUSY: processes still exiting, or a child cgroup; the kernel frees it shortly
                if err.errno in (errno.EBUSY, errno.ENOTEMPTY) and time.monotonic() < deadline:
                    time.sleep(0.005)
                    continue
                left.append(d)
                break
    return left


def subtree(top: str) -> list[str]:
    """``top`` and every cgroup directory below it (child cgroups the container made itself),
    deepest first. cgroupfs has no symlinks; none is followed anyway."""
    out: list[str] = []
    for dirpath, _dirs, _files in os.walk(top, topdown=False, followlinks=False):
        out.append(dirpath)
    return out


def remove_tree(top: str, timeout: float = 2.0) -> list[str]:
    """rmdir ``top`` and its child cgroups, deepest first; returns what could not be removed."""
    if not os.path.isdir(top):
        return []
    return remove_dirs(subtree(top), timeout)


def shares_to_weight(shares: int) -> int:
    """cpu.shares (2..262144) to cpu.weight (1..10000), the conversion runc and crun use."""
    shares = min(max(shares, 2), 262144)
    return 1 + ((shares - 2) * 9999) // 262142


def device_rules(res: Resources) -> list[Any]:
    """Deny everything, then the config's rules in order, then (when the config allows nothing
    itself) the devices of the minimal /dev: the devices cgroup's semantics, later rules winning."""
    from virtkit.container.devices import Rule, parse_rule

    rules = [Rule(False, "a", None, None, "rwm")]
    for r in res.devices:
        major = None if r.major is None or r.major < 0 else r.major
        minor = None if r.minor is None or r.minor < 0 else r.minor
        rules.append(Rule(r.allow, r.type, major, minor, r.access))
    if not any(r.allow for r in res.devices):
        rules.extend(parse_rule(True, text) for text in DEFAULT_DEVICE_RULES)
    return rules


class Cgroup:
    """The cgroup directories of one container, in every hierarchy of a :class:`Layout`."""

    def __init__(self, layout: Layout, path: str) -> None:
        self.layout = layout
        self.path = "/" + path.strip("/")
        self.dirs: dict[str, str] = {}  # controller (or "unified") -> directory
        for ctrl in V1_CONTROLLERS:
            if ctrl in layout.v1:
                self.dirs[ctrl] = layout.v1[ctrl] + self.path
        if layout.unified:
            self.dirs["unified"] = layout.unified + self.path

    # --- paths -------------------------------------------------------------------------------
    def directories(self) -> list[str]:
        """Distinct directories (controllers co-mounted, like cpu,cpuacct, share one)."""
        seen: list[str] = []
        for d in self.dirs.values():
            if d not in seen:
                seen.append(d)
        return seen

    def _dir(self, ctrl: str) -> str | None:
        if self.layout.mode == "v2":
            return self.dirs.get("unified")
        return self.dirs.get(ctrl)

    # --- lifecycle ---------------------------------------------------------------------------
    def plan(self) -> list[str]:
        """The directories :meth:`create` will make (parents included), for the intent log."""
        out: list[str] = []
        for d in self.directories():
            missing = []
            cur = d
            while not os.path.isdir(cur) and cur not in out:
                if os.path.lexists(cur):
                    raise ContainerError(
                        f"cgroup path {self.path} runs into {cur}, which is a control file, not a "
                        "cgroup: pick another linux.cgroupsPath"
                    )
                missing.append(cur)
                cur = os.path.dirname(cur)
            out.extend(reversed(missing))
        return out

    def create(self) -> list[str]:
        """Make the directories; return every directory made (parents included), outermost first."""
        made: list[str] = []
        try:
            if self.layout.mode == "v2":
                self._create_v2(made)
            else:
                for d in self.directories():
                    self._makedirs(d, made)
        except OSError as err:
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
            raise ContainerError(f"cannot create cgroup {err.filename or self.path}: {err.strerror}") from None
        return made

    @staticmethod
    def _makedirs(d: str, made: list[str]) -> None:
        missing = []
        cur = d
        while not os.path.isdir(cur):
            missing.append(cur)
            cur = os.path.dirname(cur)
        for m in reversed(missing):
            os.mkdir(m)
            made.append(m)

    def _create_v2(self, made: list[str]) -> None:
        root = self.layout.unified
        assert root is not None
        available = set(_read(os.path.join(root, "cgroup.controllers")).split())
        enable = " ".join(f"+{c}" for c in V2_CONTROLLERS if c in available)
        cur = root
        parts = [p for p in self.path.split("/") if p]
        for i, part in enumerate(parts):
            if enable:
                try:
                    write_value(os.path.join(cur, "cgroup.subtree_control"), enable)
                except OSError as err:
                    raise ContainerError(
                        f"cannot enable cgroup v2 controllers in {cur}: {err.strerror} (is a process in that cgroup?)"
                    ) from None
            cur = os.path.join(cur, part)
            if not os.path.isdir(cur):
                os.mkdir(cur)
                made.append(cur)
            elif i == len(parts) - 1:
                pass

    def join(self, pid: int) -> None:
        for d in self.directories():
            try:
                write_value(os.path.join(d, "cgroup.procs"), str(pid))
            except OSError as err:
                raise ContainerError(f"cannot move process {pid} into cgroup {d}: {err.strerror}") from None

    def remove(self, made: list[str] | None = None, timeout: float = 2.0) -> list[str]:
        """rmdir the directories with the child cgroups the container made in them (deepest first);
        return those that could not be removed."""
        targets = list(made) if made is not None else self.directories()
        left: list[str] = []
        for d in sorted(targets, key=lambda p: p.count("/"), reverse=True):
            left.extend(remove_tree(d, timeout))
        return left

    # --- limits ------------------------------------------------------------------------------
    def apply(self, res: Resources) -> None:
        """Write the limits of ``linux.resources``; a value the kernel refuses becomes a ContainerError."""
        self._check(res)
        if self.layout.mode == "v2":
            self._apply_v2(res)
        else:
            self._apply_v1(res)
        self.apply_device_filter(res)

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

    def _set(self, ctrl: str, name: str, value: str, what: str) -> None:
        d = self._dir(ctrl)
        if d is None:
            raise ContainerError(f"{what} needs the {ctrl} cgroup controller, which this host does not have")
        try:
            write_value(os.path.join(d, name), value)
        except OSError as err:
            raise ContainerError(f"the kernel refused {what} ({name} = {value}): {err.strerror}") from None

    def _apply_v1(self, res: Resources) -> None:
        mem, cpu = res.memory, res.cpu
        if mem.limit is not None:
            self._set("memory", "memory.limit_in_bytes", str(mem.limit), f"memory limit {mem.limit}")
        if mem.swap is not None:
            d = self._dir("memory")
            if d and os.path.exists(os.path.join(d, "memory.memsw.limit_in_bytes")):
                self._set("memory", "memory.memsw.limit_in_bytes", str(mem.swap), f"memory+swap limit {mem.swap}")
        if mem.reservation is not None:
            self._set("memory", "memory.soft_limit_in_bytes", str(mem.reservation), "memory reservation")
        if mem.swappiness is not None:
            self._set("memory", "memory.swappiness", str(mem.swappiness), "memory swappiness")
        if mem.disable_oom_killer:
            self._set("memory", "memory.oom_control", "1", "disableOOMKiller")
        if cpu.shares:
            self._set("cpu", "cpu.shares", str(cpu.shares), f"cpu shares {cpu.shares}")
        if cpu.period is not None:
            self._set("cpu", "cpu.cfs_period_us", str(cpu.period), f"cpu period {cpu.period}")
        if cpu.quota is not None:
            self._set("cpu", "cpu.cfs_quota_us", str(cpu.quota), f"cpu quota {cpu.quota}")
        if cpu.cpus or cpu.mems:
            raise ContainerError(
                "linux.resources.cpu.cpus/mems (cpusets) are not supported on cgroup v1 by virtkit yet; remove them"
            )
        if res.pids_limit:
            value = "max" if res.pids_limit < 0 else str(res.pids_limit)
            self._set("pids", "pids.max", value, f"pids limit {res.pids_limit}")
        self._apply_devices_v1(res)

    def _apply_devices_v1(self, res: Resources) -> None:
        d = self._dir("devices")
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
            try:
                write_value(os.path.join(d, fname), text)
            except OSError as err:
                raise ContainerError(f"the kernel refused device rule {fname} '{text}': {err.strerror}") from None

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

    def _apply_v2(self, res: Resources) -> None:
        mem, cpu = res.memory, res.cpu
        if mem.limit is not None:
            self._set("memory", "memory.max", "max" if mem.limit < 0 else str(mem.limit), f"memory limit {mem.limit}")
        if mem.swap is not None and mem.limit is not None:
            swap = "max" if mem.swap < 0 or mem.limit < 0 else str(mem.swap - mem.limit)
            d = self._dir("memory")
            if d and os.path.exists(os.path.join(d, "memory.swap.max")):
                self._set("memory", "memory.swap.max", swap, f"swap limit {mem.swap}")
        if mem.reservation is not None:
            self._set("memory", "memory.low", str(max(mem.reservation, 0)), "memory reservation")
        if mem.disable_oom_killer:
            raise ContainerError("disableOOMKiller is not available on cgroup v2; remove it")
        if cpu.shares:
            self._set("cpu", "cpu.weight", str(shares_to_weight(cpu.shares)), f"cpu shares {cpu.shares}")
        if cpu.quota is not None or cpu.period is not None:
            quota = "max" if cpu.quota is None or cpu.quota < 0 else str(cpu.quota)
            self._set("cpu", "cpu.max", f"{quota} {cpu.period or 100000}", f"cpu quota {cpu.quota}")
        if cpu.cpus:
            self._set("cpuset", "cpuset.cpus", cpu.cpus, f"cpuset {cpu.cpus}")
        if cpu.mems:
            self._set("cpuset", "cpuset.mems", cpu.mems, f"memory nodes {cpu.mems}")
        if res.pids_limit:
            self._set(
                "pids", "pids.max", "max" if res.pids_limit < 0 else str(res.pids_limit), f"pids limit {res.pids_limit}"
            )
        for key, value in res.unified:
            if "/" in key or key.startswith("cgroup."):
                raise ContainerError(f"linux.resources.unified key {key!r} is not a controller file")
            self._set("unified", key, value, f"unified {key}")

    # --- queries -----------------------------------------------------------------------------
    def pids(self) -> list[int]:
        """Every process of the container, in its cgroup and in the child cgroups it made."""
        for ctrl in ("pids", "memory", "unified", "cpu", "freezer"):
            d = self.dirs.get(ctrl)
            if d is None or not os.path.isdir(d):
                continue
            found: set[int] = set()
            for sub in subtree(d):
                with contextlib.suppress(OSError, ValueError):
                    found.update(int(x) for x in _read(os.path.join(sub, "cgroup.procs")).split())
            return sorted(found)
        return []

    def oom_kills(self) -> int:
        if self.layout.mode == "v2":
            d = self.dirs.get("unified")
            return _kv(os.path.join(d, "memory.events")).get("oom_kill", 0) if d else 0
        d = self.dirs.get("memory")
        return _kv(os.path.join(d, "memory.oom_control")).get("oom_kill", 0) if d else 0

    def stats(self) -> dict[str, Any]:
        """Resource usage in the shape of ``runc events --stats`` data."""
        if self.layout.mode == "v2":
            d = self.dirs["unified"]
            cst = _kv(os.path.join(d, "cpu.stat"))
            mem_events = _kv(os.path.join(d, "memory.events"))
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
                        "usage": _read_int(os.path.join(d, "memory.current")) or 0,
                        "max": _read_int(os.path.join(d, "memory.peak")) or 0,
                        "limit": _read_int(os.path.join(d, "memory.max")) or -1,
                        "failcnt": mem_events.get("max", 0),
                    },
                    "oomKills": mem_events.get("oom_kill", 0),
                },
                "pids": {
                    "current": _read_int(os.path.join(d, "pids.current")) or 0,
                    "limit": _read_int(os.path.join(d, "pids.max")) or -1,
                },
            }
        mem_d, cpu_d = self.dirs.get("memory"), self.dirs.get("cpu")
        acct_d, pids_d = self.dirs.get("cpuacct"), self.dirs.get("pids")
        out: dict[str, Any] = {}
        cpu: dict[str, Any] = {}
        if acct_d:
            ticks = os.sysconf("SC_CLK_TCK")
            st = _kv(os.path.join(acct_d, "cpuacct.stat"))
            cpu["usage"] = {
                "total": _read_int(os.path.join(acct_d, "cpuacct.usage")) or 0,
                "user": st.get("user", 0) * 1_000_000_000 // ticks,
                "kernel": st.get("system", 0) * 1_000_000_000 // ticks,
            }
        if cpu_d:
            st = _kv(os.path.join(cpu_d, "cpu.stat"))
            cpu["throttling"] = {
                "periods": st.get("nr_periods", 0),
                "throttledPeriods": st.get("nr_throttled", 0),
                "throttledTime": st.get("throttled_time", 0),
            }
        out["cpu"] = cpu
        if mem_d:
            limit = _read_int(os.path.join(mem_d, "memory.limit_in_bytes"))
            out["memory"] = {
                "usage": {
                    "usage": _read_int(os.path.join(mem_d, "memory.usage_in_bytes")) or 0,
                    "max": _read_int(os.path.join(mem_d, "memory.max_usage_in_bytes")) or 0,
                    "limit": -1 if limit is None or limit >= 2**62 else limit,
                    "failcnt": _read_int(os.path.join(mem_d, "memory.failcnt")) or 0,
                },
                "oomKills": self.oom_kills(),
            }
        if pids_d:
            out["pids"] = {
                "current": _read_int(os.path.join(pids_d, "pids.current")) or 0,
                "limit": _read_int(os.path.join(pids_d, "pids.max")) or -1,
            }
        return out

    # --- signals -----------------------------------------------------------------------------
    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """Signal every process of the container. SIGKILL uses cgroup.kill where the kernel has it
        (atomic: no fork can escape); otherwise the cgroup is frozen while the signals go out."""
        unified = self.dirs.get("unified")
        if sig == signal.SIGKILL and unified and os.path.exists(os.path.join(unified, "cgroup.kill")):
            try:
                write_value(os.path.join(unified, "cgroup.kill"), "1")
                return
            except OSError:
                pass
        frozen = self._freeze(True)
        try:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        finally:
            if frozen:
                self._freeze(False)

    def _freeze(self, on: bool) -> bool:
        try:
            if self.layout.mode == "v2":
                write_value(os.path.join(self.dirs["unified"], "cgroup.freeze"), "1" if on else "0")
                return True
            d = self.dirs.get("freezer")
            if d:
                write_value(os.path.join(d, "freezer.state"), "FROZEN" if on else "THAWED")
                return True
        except OSError:
            pass
        return False
