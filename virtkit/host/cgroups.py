"""cgroups: the host's layout (v1, hybrid, v2), control files, one cgroup's directories in every
hierarchy, killing and freezing it, and the limit writes in whichever file the layout has.

Three layouts exist in the wild and this module speaks all three
(Documentation/admin-guide/cgroup-v1/ and cgroup-v2.rst of the kernel):

* **v1**: one hierarchy per controller (``/sys/fs/cgroup/memory``, ``.../cpu,cpuacct``...);
* **hybrid**: v1 controllers plus a cgroup2 hierarchy (``/sys/fs/cgroup/unified``) holding no or
  few controllers. A cgroup there still gives ``cgroup.kill`` (5.14+), which kills every process
  in one write, even though the limits live in v1;
* **v2**: a single unified hierarchy at ``/sys/fs/cgroup`` (most current distributions).

No policy: the container runtime (:mod:`virtkit.container.cgroups`: OCI resources, device rules,
stats in runc's shape) and virtkitd (:mod:`virtkit.service.cgroups`: weight, quota and pinning per
VM) decide what to write; a :class:`Group` writes it where this host keeps it. Control files are
read and written whole, in one system call each, as the kernel expects.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass, field
from typing import ClassVar

from virtkit.errors import VirtkitError

#: where the host's cgroup hierarchies live (systemd and every distribution put them there)
CGROUP_ROOT = "/sys/fs/cgroup"
#: the v1 controllers virtkit uses (containers: all but cpuset; VMs: cpu, cpuacct, cpuset, memory,
#: pids). Only hierarchies with one of them decide the layout: a hugetlb, blkio, net_cls or
#: perf_event hierarchy mounted on a v2 host (crun's benchmark does that) does not make it hybrid.
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer")
#: the CFS period the kernel starts every cgroup with (cpu.max's second field, cpu.cfs_period_us)
CFS_PERIOD_US = 100_000
#: the largest control file read (cpu.stat, memory.events and the like are a few hundred bytes)
MAX_CONTROL_FILE = 64 << 10
#: cgroup.procs has a line per process: at most pid_max (4194304 on 64-bit) lines of 8 bytes
MAX_PROCS_FILE = 32 << 20


class CgroupError(VirtkitError):
    """A cgroup cannot be made, joined or limited as asked (the message says which file and why)."""


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


def detect(mountinfo: str | None = None) -> Layout:
    """Read /proc/self/mountinfo (proc(5)) and classify the cgroup layout.

    Only the hierarchies that matter count:

    * at the host's cgroup location (``/sys/fs/cgroup`` itself, or one level below it, as v1
      controllers and a hybrid host's ``unified`` are mounted): that is where cgroups are made.
      Other programs mount cgroup filesystems elsewhere for their own purposes (a test's private
      tree, a jail's); those must not change the layout. Only when nothing is mounted there are
      other mounts considered;
    * of the whole hierarchy (root ``/``; a bind of a sub-cgroup is someone's view, not the host's);
    * for v1, only the controllers of :data:`V1_CONTROLLERS`: a v1 hierarchy of some other
      controller makes no cgroup of virtkit's, so it neither turns a v2 host into a hybrid one
      nor appears in the layout."""
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
        if root != "/":
            continue
        canonical = mountpoint == CGROUP_ROOT or os.path.dirname(mountpoint) == CGROUP_ROOT
        v1_found, unified_found = found[canonical]
        if fstype == "cgroup2":
            unified_found.append(mountpoint)
        elif fstype == "cgroup":
            for opt in tail[2].split(","):
                if opt in V1_CONTROLLERS:
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
    raise CgroupError("no cgroup filesystem is mounted: mount cgroup2 on /sys/fs/cgroup (or v1 controllers)")


# --- control files ---------------------------------------------------------------------------


def write_value(path: str, value: str) -> None:
    """Write a cgroup control file in one write(2), as the kernel expects."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def read_text(path: str, limit: int = MAX_CONTROL_FILE) -> str:
    """A control file's text (at most ``limit`` bytes)."""
    with open(path) as f:
        return f.read(limit)


def read_int(path: str) -> int | None:
    """A single-number control file: its value, -1 for ``max``, None if unreadable or not a number."""
    try:
        text = read_text(path).strip()
    except OSError:
        return None
    if text == "max":
        return -1
    try:
        return int(text)
    except ValueError:
        return None


def read_kv(path: str) -> dict[str, int]:
    """A flat-keyed file (``cpu.stat``, ``memory.events``: "key value" lines); {} if unreadable."""
    out: dict[str, int] = {}
    try:
        for line in read_text(path).splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                out[parts[0]] = int(parts[1])
    except OSError:
        pass
    return out


def parse_cpus(text: str) -> set[int]:
    """A CPU list as cpuset.cpus takes it (``0-3,6``, cpuset(7) "List format"); ValueError if it
    is not one. CPU numbers stop below 8192, x86-64's largest CONFIG_NR_CPUS: a range from a
    user is never expanded beyond that bound."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo_text, _, hi_text = part.partition("-")
        lo, hi = int(lo_text), int(hi_text or lo_text)
        if lo < 0 or hi < lo or hi >= 8192:
            raise ValueError(f"bad CPU range {part!r}")
        out.update(range(lo, hi + 1))
    return out


# --- directories -----------------------------------------------------------------------------


def remove_dirs(paths: list[str], timeout: float = 2.0) -> list[str]:
    """rmdir cgroup directories, deepest first, retrying while the kernel still holds them;
    returns those that could not be removed."""
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
    """``top`` and every cgroup directory below it (child cgroups made inside), deepest first.
    cgroupfs has no symlinks; none is followed anyway."""
    out: list[str] = []
    for dirpath, _dirs, _files in os.walk(top, topdown=False, followlinks=False):
        out.append(dirpath)
    return out


def remove_tree(top: str, timeout: float = 2.0) -> list[str]:
    """rmdir ``top`` and its child cgroups, deepest first; returns what could not be removed."""
    if not os.path.isdir(top):
        return []
    return remove_dirs(subtree(top), timeout)


def remove_parent(parent: str, layout: Layout, controllers: tuple[str, ...]) -> None:
    """rmdir ``parent`` (a cgroup path) in every hierarchy of ``controllers`` and in cgroup2, if
    nothing is left in it (a busy parent stays, quietly)."""
    group = Group(layout, parent, controllers)
    for d in group.directories():
        with contextlib.suppress(OSError):
            os.rmdir(d)


class Group:
    """One cgroup path (``/virtkit/web``) made in every hierarchy of a :class:`Layout` that holds
    one of ``controllers`` (v1), and in cgroup2 when the host has it. On v2 every controller's
    files are in the one directory."""

    #: the error raised on a refusal; a user of the class may give its own (the container
    #: runtime raises ContainerError, as the rest of its verbs do)
    error: ClassVar[type[VirtkitError]] = CgroupError
    #: what the user calls the path, for the error that asks for another one
    path_setting: ClassVar[str] = "cgroup path"

    def __init__(self, layout: Layout, path: str, controllers: tuple[str, ...]) -> None:
        self.layout = layout
        self.path = "/" + path.strip("/")
        self.dirs: dict[str, str] = {}  # controller (or "unified") -> directory
        for ctrl in controllers:
            if ctrl in layout.v1:
                self.dirs[ctrl] = layout.v1[ctrl] + self.path
        if layout.unified:
            self.dirs["unified"] = layout.unified + self.path

    # --- paths -------------------------------------------------------------------------------
    def directories(self) -> list[str]:
        """Distinct directories (controllers co-mounted, like cpu,cpuacct, share one)."""
        return list(dict.fromkeys(self.dirs.values()))

    def dir(self, ctrl: str) -> str | None:
        """The directory holding ``ctrl``'s files (None if the host lacks that controller)."""
        if self.layout.mode == "v2":
            return self.dirs.get("unified")
        return self.dirs.get(ctrl)

    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.directories()]

    def exists(self) -> bool:
        return any(os.path.isdir(d) for d in self.directories())

    # --- lifecycle ---------------------------------------------------------------------------
    def plan(self) -> list[str]:
        """The directories :meth:`create` will make (parents included), for an intent log."""
        out: list[str] = []
        for d in self.directories():
            missing = []
            cur = d
            while not os.path.isdir(cur) and cur not in out:
                if os.path.lexists(cur):
                    raise self.error(
                        f"cgroup path {self.path} runs into {cur}, which is a control file, not a "
                        f"cgroup: pick another {self.path_setting}"
                    )
                missing.append(cur)
                cur = os.path.dirname(cur)
            out.extend(reversed(missing))
        return out

    def create(self, v2_controllers: tuple[str, ...]) -> list[str]:
        """Make the directories, enabling ``v2_controllers`` (those the host offers) down the
        path on v2; return every directory made (parents included), outermost first. On a
        failure what was made is removed again."""
        made: list[str] = []
        try:
            if self.layout.mode == "v2":
                self._create_v2(made, v2_controllers)
            else:
                for d in self.directories():
                    self._makedirs(d, made, cpuset=d == self.dirs.get("cpuset"))
        except OSError as err:
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
            raise self.error(f"cannot create cgroup {err.filename or self.path}: {err.strerror}") from None
        except VirtkitError:
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
            raise
        return made

    @staticmethod
    def _makedirs(d: str, made: list[str], cpuset: bool) -> None:
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
                    write_value(os.path.join(m, f), read_text(os.path.join(os.path.dirname(m), f)).strip())

    def _create_v2(self, made: list[str], v2_controllers: tuple[str, ...]) -> None:
        root = self.layout.unified
        if root is None:
            raise self.error("this host has no cgroup2 hierarchy")
        cur = root
        for part in [p for p in self.path.split("/") if p]:
            # cgroup-v2.rst "Top-down Constraint": a controller is enabled in a parent's
            # subtree_control before a child can use it; offer what this level has
            available = set(read_text(os.path.join(cur, "cgroup.controllers")).split())
            enable = " ".join(f"+{c}" for c in v2_controllers if c in available)
            if enable:
                try:
                    write_value(os.path.join(cur, "cgroup.subtree_control"), enable)
                except OSError as err:
                    raise self.error(
                        f"cannot enable cgroup v2 controllers in {cur}: {err.strerror} (is a process in that cgroup?)"
                    ) from None
            cur = os.path.join(cur, part)
            if not os.path.isdir(cur):
                os.mkdir(cur)
                made.append(cur)

    def join(self, pid: int) -> None:
        """Move ``pid`` (0: the calling process) into the cgroup in every hierarchy."""
        for d in self.directories():
            try:
                write_value(os.path.join(d, "cgroup.procs"), str(pid))
            except OSError as err:
                raise self.error(f"cannot move process {pid} into cgroup {d}: {err.strerror}") from None

    def remove(self, made: list[str] | None = None, timeout: float = 2.0) -> list[str]:
        """rmdir the directories (``made``, or all of them) with the child cgroups made in them,
        deepest first; return those that could not be removed."""
        targets = list(made) if made is not None else self.directories()
        left: list[str] = []
        for d in sorted(targets, key=lambda p: p.count("/"), reverse=True):
            left.extend(remove_tree(d, timeout))
        return left

    # --- processes ---------------------------------------------------------------------------
    def pids(self) -> list[int]:
        """Every process in the cgroup and in the child cgroups made inside it."""
        for ctrl in ("pids", "memory", "unified", "cpu", "freezer"):
            d = self.dirs.get(ctrl)
            if d is None or not os.path.isdir(d):
                continue
            found: set[int] = set()
            for sub in subtree(d):
                with contextlib.suppress(OSError, ValueError):
                    procs = read_text(os.path.join(sub, "cgroup.procs"), MAX_PROCS_FILE)
                    found.update(int(x) for x in procs.split())
            return sorted(found)
        return []

    def kill(self) -> bool:
        """SIGKILL every process through ``cgroup.kill`` (5.14+; atomic, no fork escapes it).
        False when the kernel has no cgroup.kill here or refused it: the caller falls back."""
        unified = self.dirs.get("unified")
        if unified and os.path.exists(os.path.join(unified, "cgroup.kill")):
            try:
                write_value(os.path.join(unified, "cgroup.kill"), "1")
                return True
            except OSError:
                pass
        return False

    def freeze(self, on: bool) -> bool:
        """Freeze (or thaw) the cgroup: cgroup.freeze on v2, the v1 freezer elsewhere. False when
        neither is available."""
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

    def frozen(self) -> bool:
        """Whether the cgroup is frozen (by :meth:`freeze`, in the same hierarchy it writes)."""
        try:
            if self.layout.mode == "v2":
                return read_text(os.path.join(self.dirs["unified"], "cgroup.freeze")).strip() == "1"
            d = self.dirs.get("freezer")
            return d is not None and read_text(os.path.join(d, "freezer.state")).strip() in ("FROZEN", "FREEZING")
        except (OSError, KeyError):
            return False

    # --- limits ------------------------------------------------------------------------------
    def has(self, ctrl: str, name: str) -> bool:
        d = self.dir(ctrl)
        return d is not None and os.path.exists(os.path.join(d, name))

    def set(self, ctrl: str, name: str, value: str, what: str | None = None) -> None:
        """Write ``value`` to ``ctrl``'s file ``name``; ``what`` names the setting for the error."""
        what = what or name
        d = self.dir(ctrl)
        if d is None:
            raise self.error(f"{what} needs the {ctrl} cgroup controller, which this host does not have")
        try:
            write_value(os.path.join(d, name), value)
        except OSError as err:
            raise self.error(f"the kernel refused {what} ({name} = {value}): {err.strerror}") from None

    def set_cpu_weight(self, weight: int, shares: int, what: str | None = None) -> None:
        """The CPU share: ``cpu.weight`` (1..10000) on v2, ``cpu.shares`` (2..262144) on v1. The two
        scales differ and callers convert differently, so both values are the caller's."""
        if self.layout.mode == "v2":
            self.set("cpu", "cpu.weight", str(weight), what)
        else:
            self.set("cpu", "cpu.shares", str(shares), what)

    def set_cpu_max(self, quota_us: int | None, period_us: int | None, what: str | None = None) -> None:
        """CPU bandwidth: ``quota_us`` of CPU time per ``period_us`` (None or negative quota: no
        limit; None period: the kernel's default on v2, unchanged on v1). v2 writes ``cpu.max``
        in one go; v1 writes ``cpu.cfs_period_us`` first, then ``cpu.cfs_quota_us``."""
        if self.layout.mode == "v2":
            quota = "max" if quota_us is None or quota_us < 0 else str(quota_us)
            self.set("cpu", "cpu.max", f"{quota} {period_us or CFS_PERIOD_US}", what)
            return
        if period_us is not None:
            self.set("cpu", "cpu.cfs_period_us", str(period_us), what)
        if quota_us is not None:
            self.set("cpu", "cpu.cfs_quota_us", str(quota_us if quota_us >= 0 else -1), what)

    def set_cpuset(self, cpus: str | None, mems: str | None = None, what: str | None = None) -> None:
        """Pin to ``cpus`` (and memory nodes ``mems``), cpuset(7) list format."""
        if cpus:
            self.set("cpuset", "cpuset.cpus", cpus, what)
        if mems:
            self.set("cpuset", "cpuset.mems", mems, what)

    def set_memory_max(self, limit: int, what: str | None = None) -> None:
        """The memory cap in bytes (negative: none): ``memory.max`` / ``memory.limit_in_bytes``."""
        if self.layout.mode == "v2":
            self.set("memory", "memory.max", "max" if limit < 0 else str(limit), what)
        else:
            self.set("memory", "memory.limit_in_bytes", str(limit if limit >= 0 else -1), what)

    def set_pids_max(self, limit: int, what: str | None = None) -> None:
        """The task limit (negative: none): ``pids.max``, the same file in v1 and v2."""
        self.set("pids", "pids.max", "max" if limit < 0 else str(limit), what)

    # --- usage -------------------------------------------------------------------------------
    def cpu_usage_ns(self) -> int:
        """CPU time used, in ns: ``cpu.stat`` usage_usec on v2, ``cpuacct.usage`` on v1; 0 if unknown."""
        if self.layout.mode == "v2":
            d = self.dirs.get("unified")
            return read_kv(os.path.join(d, "cpu.stat")).get("usage_usec", 0) * 1000 if d else 0
        d = self.dirs.get("cpuacct")
        return (read_int(os.path.join(d, "cpuacct.usage")) or 0) if d else 0

    def cpu_throttled_ns(self) -> int:
        """Time the quota held the cgroup back, in ns (``cpu.stat``: throttled_usec / throttled_time)."""
        d = self.dir("cpu")
        if d is None:
            return 0
        st = read_kv(os.path.join(d, "cpu.stat"))
        if "throttled_time" in st:
            return st["throttled_time"]
        return st.get("throttled_usec", 0) * 1000

    def memory_usage(self) -> int:
        """Memory charged now, in bytes (``memory.current`` / ``memory.usage_in_bytes``); 0 if unknown."""
        d = self.dir("memory")
        name = "memory.current" if self.layout.mode == "v2" else "memory.usage_in_bytes"
        value = read_int(os.path.join(d, name)) if d else None
        return value if value is not None and value >= 0 else 0

    def oom_kills(self) -> int:
        """Processes the OOM killer took in this cgroup (``oom_kill`` of memory.events / oom_control)."""
        if self.layout.mode == "v2":
            d = self.dirs.get("unified")
            return read_kv(os.path.join(d, "memory.events")).get("oom_kill", 0) if d else 0
        d = self.dirs.get("memory")
        return read_kv(os.path.join(d, "memory.oom_control")).get("oom_kill", 0) if d else 0
