"""virtkitd's records: what crosses each of its edges, parsed once there and passed inward typed.

One shape per thing, whichever edge it crosses:

* **the HTTP body** (:mod:`virtkit.service.api`): :class:`VmCreate`, :class:`ConsoleInput`;
* **the database row** (:mod:`virtkit.service.store`): :class:`VmRow` (its ``definition`` is a
  :class:`VmDefinition`, its ``last_exit`` an :class:`ExitInfo`) and :class:`Event`; a row is
  parsed like any other input, so a tampered or stale database gives one clear line;
* **the VMM process's input** (:mod:`virtkit.service.vmm`, ``definition.json``): :class:`VmmDefinition`;
* **the answers** the API sends and the CLI parses back (:mod:`virtkit.service.client`):
  :class:`VmStatus`, :class:`VmStats`, :class:`LogChunk`, :class:`Event`, :class:`HostInfo`,
  :class:`ErrorBody`;
* **the metrics scrape** (:mod:`virtkit.service.metrics`): a :class:`MetricsSnapshot` the service
  takes, so the renderer needs nothing of the service.

Every record is frozen and slotted, parsed by :func:`virtkit.records.parse` (unknown fields refused
with the known ones named, types and bounds checked) and published in the OpenAPI document by
:func:`virtkit.records.json_schema` (:mod:`virtkit.service.openapi`), so the contract and what is
enforced are one text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Final, Literal

from virtkit.records import DESCRIPTION, Bounds, Count
from virtkit.service.vmmproto import ExitReport, StopReasonName, VmmStats

#: VM names become directory, cgroup and socket names: no path characters, no leading dot or dash
NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
CPUS_PATTERN: Final = r"^[0-9]{1,4}(-[0-9]{1,4})?(,[0-9]{1,4}(-[0-9]{1,4})?){0,63}$"
#: text that reaches a path, a command line or the guest's UART: no NUL characters
NO_NUL: Final = r"^[^\x00]*$"
_BIG: Final = float(2**63)

Name = Annotated[str, Bounds(pattern=NAME_PATTERN)]
Time = Annotated[float, Bounds(lo=0, hi=_BIG)]
Bytes = Annotated[int, Bounds(lo=0, hi=2**63)]
Pid = Annotated[int, Bounds(lo=1, hi=2**22)]  # PID_MAX_LIMIT

VmState = Literal["created", "starting", "running", "restarting", "stopped", "failed"]
Mode = Literal["full", "para"]
ExitReason = Literal[
    StopReasonName,  # what a VMM's exit report says
    # what the service concludes without one
    "bad-exit-report",
    "vmm-killed",
    "vmm-error",
    "vmm-gone",
    "service-error",
    "unknown",
]


def _doc(text: str) -> dict[str, str]:
    """A field's metadata: its description in the OpenAPI document."""
    return {DESCRIPTION: text}


# --- definitions ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VmDefinition:
    """A VM as defined: what the service keeps in its database and answers with."""

    name: Name = field(metadata=_doc("unique; letters, digits, _ . -"))
    kernel: Annotated[str, Bounds(min_len=1, max_len=4096, pattern=NO_NUL)] = field(
        metadata=_doc("absolute path of the guest kernel (Multiboot or ELF64) on the host")
    )
    memory_mib: Annotated[int, Bounds(lo=2, hi=1048576)] = 64
    vcpus: Annotated[int, Bounds(lo=1, hi=64)] = 1
    cmdline: Annotated[str, Bounds(max_len=1024, pattern=NO_NUL)] = ""
    mode: Mode = "full"
    cpu_weight: Annotated[int, Bounds(lo=1, hi=10000)] = field(
        default=100, metadata=_doc("share of CPU against other VMs when they compete (100 = default)")
    )
    cpu_quota_pct: Annotated[int, Bounds(lo=1, hi=6400)] | None = field(
        default=None, metadata=_doc("hard cap in percent of one CPU (150 = one and a half CPUs)")
    )
    cpus: Annotated[str, Bounds(pattern=CPUS_PATTERN)] | None = field(
        default=None, metadata=_doc("pin the VM's vCPUs to these host CPUs, e.g. 0 or 0-1")
    )
    restart: Literal["never", "on-failure"] = field(
        default="never",
        metadata=_doc("on-failure: restart with exponential back-off when the VMM dies or the guest crashes"),
    )


@dataclass(frozen=True, slots=True)
class VmCreate(VmDefinition):
    """The body of ``POST /v1/vms``: a definition, and whether to start it at once."""

    start: bool = field(default=False, metadata=_doc("start it at once"))

    def definition(self) -> VmDefinition:
        return VmDefinition(**{f.name: getattr(self, f.name) for f in dataclasses.fields(VmDefinition)})


@dataclass(frozen=True, slots=True)
class ConsoleInput:
    """The body of ``POST /v1/vms/{name}/console``."""

    data: Annotated[str, Bounds(max_len=4096, pattern=NO_NUL)] = field(metadata=_doc("text typed into the UART"))


# --- how a VM ended --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """How a VM's VMM ended last: from its exit report, or what the service saw without one."""

    reason: ExitReason
    crash: bool = True
    exit_status: Annotated[int, Bounds(lo=0, hi=255)] | None = None
    detail: Annotated[str, Bounds(max_len=4096)] = ""
    at: Time | None = None

    @staticmethod
    def from_report(report: ExitReport, detail: str) -> ExitInfo:
        return ExitInfo(reason=report.reason, crash=report.crash, exit_status=report.exit_status, detail=detail)


# --- the database ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VmRow:
    """One row of the ``vms`` table (:mod:`virtkit.service.store`), JSON columns decoded."""

    id: Annotated[int, Bounds(lo=1, hi=2**62)]
    name: Name
    definition: VmDefinition
    state: VmState
    instance: Annotated[str, Bounds(max_len=64, pattern=r"[0-9a-f]+")] | None
    pid: Pid | None
    created: Time
    started: Time | None
    restarts: Annotated[int, Bounds(lo=0, hi=2**31)]
    last_exit: ExitInfo | None

    def public(self) -> VmStatus:
        return VmStatus(
            name=self.name,
            state=self.state,
            pid=self.pid,
            definition=self.definition,
            restarts=self.restarts,
            last_exit=self.last_exit,
            created=self.created,
            started=self.started,
        )


@dataclass(frozen=True, slots=True)
class Event:
    """One row of the ``events`` table, as ``GET /v1/events`` answers it."""

    id: Annotated[int, Bounds(lo=1, hi=2**62)]
    ts: Time
    vm: Name
    kind: Annotated[str, Bounds(max_len=64, pattern=r"[a-z][a-z-]*")]
    detail: Annotated[str, Bounds(max_len=64 << 10)]


# --- answers ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VmStatus:
    """A VM as the API answers it."""

    name: Name
    state: VmState
    pid: Pid | None
    definition: VmDefinition
    restarts: Count
    last_exit: ExitInfo | None
    created: Time
    started: Time | None


@dataclass(frozen=True, slots=True)
class VmStats:
    """``GET /v1/vms/{name}/stats``: the cgroup's and the VMM's figures (null when not running)."""

    name: Name
    state: VmState
    pid: Pid | None
    memory_bytes: Bytes = field(metadata=_doc("guest memory the VM was given"))
    vcpus: Count = 0
    cpu_seconds: Time | None = field(default=None, metadata=_doc("CPU time of the VM's cgroup (guest time included)"))
    throttled_seconds: Time | None = None
    memory_cgroup_bytes: Bytes | None = None
    rss_bytes: Bytes | None = None
    vmm: VmmStats | None = field(
        default=None, metadata=_doc("what the VMM reports: exits by reason, device I/O, serial bytes")
    )
    vmm_error: Annotated[str, Bounds(max_len=400)] | None = field(
        default=None, metadata=_doc("why the VMM's figures are missing")
    )


@dataclass(frozen=True, slots=True)
class LogChunk:
    """``GET /v1/vms/{name}/logs``: the serial log from ``offset`` (``next``: where to go on)."""

    offset: Annotated[int, Bounds(lo=0, hi=2**62)]
    next: Annotated[int, Bounds(lo=0, hi=2**62)]
    data: Annotated[str, Bounds(max_len=1 << 20)]


@dataclass(frozen=True, slots=True)
class HostInfo:
    """``GET /v1/host``: the host's capacity, what running VMs hold, and the VMs by state."""

    cores: Annotated[int, Bounds(lo=1, hi=1 << 16)]
    overcommit: Annotated[float, Bounds(lo=0, hi=1 << 16)]
    vcpu_capacity: Count
    vcpus_used: Count
    memory_total: Bytes
    memory_reserved_for_host: Bytes
    memory_capacity: Bytes
    memory_used: Bytes
    memory_free: Bytes
    memory_available_now: Bytes
    vmm_overhead_allowance: Bytes
    load_average: tuple[float, float, float]
    cgroups: Annotated[str, Bounds(max_len=400)]
    vms: Annotated[dict[str, Count], Bounds(max_len=16)] = field(metadata=_doc("how many VMs are in each state"))
    service_uptime_s: Time = 0.0


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """Every 4xx/5xx answer: the reason in one line."""

    error: Annotated[str, Bounds(max_len=400)]


# --- the VMM process -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VmmJail:
    """How the VMM confines itself (:mod:`virtkit.jail.confine`)."""

    enabled: bool = True
    uid: Annotated[int, Bounds(lo=1, hi=2**32 - 2)] = 65534
    gid: Annotated[int, Bounds(lo=1, hi=2**32 - 2)] = 65534
    max_log: Annotated[int, Bounds(lo=0, hi=2**62)] = 64 << 20


@dataclass(frozen=True, slots=True)
class VmmDisk:
    path: Annotated[str, Bounds(min_len=1, max_len=4096, pattern=NO_NUL)]
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class VmmDefinition:
    """``VMDIR/definition.json``: what one VMM process runs (written by the service, or by hand)."""

    name: Annotated[str, Bounds(min_len=1, max_len=64, pattern=NO_NUL)]
    kernel: Annotated[str, Bounds(min_len=1, max_len=4096, pattern=NO_NUL)]
    memory: Annotated[int, Bounds(lo=1 << 20, hi=1 << 50)]
    vcpus: Annotated[int, Bounds(lo=1, hi=256)] = 1
    cmdline: Annotated[str, Bounds(max_len=4096, pattern=NO_NUL)] = ""
    mode: Mode = "full"
    instance: Annotated[str, Bounds(max_len=64)] | None = None
    control_socket: Annotated[str, Bounds(min_len=1, max_len=107, pattern=NO_NUL)] | None = None  # sun_path
    cgroups: Annotated[tuple[Annotated[str, Bounds(max_len=4096, pattern=NO_NUL)], ...], Bounds(max_len=16)] = ()
    jail: VmmJail = field(default_factory=VmmJail)
    disks: Annotated[tuple[VmmDisk, ...], Bounds(max_len=16)] = ()


#: definition.json is a few hundred bytes
MAX_DEFINITION: Final = 64 << 10


# --- metrics ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VmSample:
    """One VM in a metrics scrape: its stats if it is running and answered, else None."""

    name: str
    stats: VmStats | None


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """What ``/metrics`` renders, taken by the service at the scrape."""

    host: HostInfo
    vms: tuple[VmSample, ...]
