"""The sending side of a live migration (see :mod:`virtkit.migration.protocol`).

Pre-copy, as in QEMU and Cloud Hypervisor: with KVM dirty-page logging on
(``KVM_MEM_LOG_DIRTY_PAGES``), send all of guest RAM while the guest runs, then, round after
round, the pages it wrote meanwhile (``KVM_GET_DIRTY_LOG``), until what is left can be sent within
the downtime budget at the bandwidth measured so far, or the rounds stop converging, or the round
limit is reached. Then pause the guest, send the last dirty pages and the machine state, and hand
over. Every failure before the hand-over leaves the guest running here.
"""

from __future__ import annotations

import contextlib
import ctypes as C
import socket
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal, TypeVar

from virtkit import records
from virtkit.errors import KvmError, VirtkitError
from virtkit.host.libc import c_memcmp
from virtkit.migration.protocol import (
    MAX_PAGE_BYTES,
    MAX_RUNS,
    MAX_SMALL,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Channel,
    Empty,
    Failure,
    MessageType,
    MigrationError,
    RoundEnd,
    Running,
    page_runs,
    parse_address,
    printable,
    source_handshake,
)
from virtkit.records import Bounds
from virtkit.snapshot import format, vmstate
from virtkit.vm import Machine

#: granularity of the zero check in the first round (pages left out are zero on the target too)
ZERO_CHUNK: Final = 64 << 10
_ZERO = C.create_string_buffer(ZERO_CHUNK)
#: what pausing, sending the state and starting on the target cost beyond the page copy (seconds)
SWITCHOVER_OVERHEAD: Final = 0.005


@dataclass(frozen=True)
class MigrationOptions:
    #: the pre-shared key (virtkit.migration.keys): mandatory, a migration is never unauthenticated
    key: bytes = b""
    downtime_ms: float = 50.0
    max_rounds: int = 30
    connect_timeout: float = 5.0
    #: how long to wait for each reply of the target (its check of the shape, state apply, start)
    reply_timeout: float = 30.0

    @classmethod
    def from_request(cls, req: dict[str, Any]) -> MigrationOptions:
        """From a control-socket ``migrate`` request (local, root-only, still parsed strictly)."""
        if not isinstance(req.get("key"), str):
            raise MigrationError(
                'migrate needs "key": the pre-shared key in hex (`virtkit migrate --key-file FILE` reads it from FILE)'
            )
        try:
            r = records.parse(MigrateRequest, req, what="migrate request")
        except records.UntrustedInput as e:
            raise MigrationError(str(e)) from None
        from virtkit.migration.keys import parse

        return cls(key=parse(r.key.encode(), what="the key given"), downtime_ms=r.downtime_ms, max_rounds=r.max_rounds)


@dataclass(frozen=True)
class MigrateRequest:
    cmd: Literal["migrate"]
    to: Annotated[str, Bounds(max_len=300)]
    key: Annotated[str, Bounds(max_len=8192, pattern="[0-9a-fA-F]+")]
    downtime_ms: Annotated[float, Bounds(lo=0.001, hi=600_000.0)] = 50.0
    max_rounds: Annotated[int, Bounds(lo=1, hi=100_000)] = 30


@dataclass
class MigrationResult:
    completed: bool
    to: str
    rounds: int = 0
    pages_sent: int = 0
    bytes_sent: int = 0
    dirty_per_round: list[int] = field(default_factory=list)  # pages sent in round 0, 1, ...
    dirty_seen: list[int] = field(default_factory=list)  # dirty-log size at each check after round 0
    precopy_ms: float = 0.0
    downtime_ms: float = 0.0  # source pause -> target's RUNG received here
    target_downtime_ms: float = 0.0  # source pause -> target vCPUs started (same-host clocks)
    total_ms: float = 0.0
    final_pages: int = 0
    stop_reason: str = ""  # why pre-copy ended: budget, converged, max-rounds

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _send_runs(ch: Channel, machine: Machine, runs: list[tuple[int, int]]) -> int:
    """Send (address, page count) runs in PAGE messages of at most MAX_RUNS runs and MAX_PAGE_BYTES
    of data; returns pages sent. Pages are read through read-only views: sending is not a write."""
    batch: list[tuple[int, memoryview]] = []
    room = MAX_PAGE_BYTES
    pages = 0
    for gpa, n in runs:
        while n:
            take = min(n, room // PAGE_SIZE)
            batch.append((gpa, machine.memory.read_view(gpa, take * PAGE_SIZE)))
            pages += take
            gpa += take * PAGE_SIZE
            n -= take
            room -= take * PAGE_SIZE
            if len(batch) == MAX_RUNS or room < PAGE_SIZE:
                ch.send_pages(batch)
                batch, room = [], MAX_PAGE_BYTES
    if batch:
        ch.send_pages(batch)
    return pages


def _nonzero_runs(machine: Machine) -> list[tuple[int, int]]:
    """All of guest RAM as runs, leaving out ZERO_CHUNK-sized chunks that are all zero."""
    runs: list[tuple[int, int]] = []
    for r in machine.memory.regions:
        start = -1
        for off in range(0, r.size, ZERO_CHUNK):
            n = min(ZERO_CHUNK, r.size - off)
            zero = c_memcmp(r.host_addr + off, _ZERO, n) == 0
            if zero and start >= 0:
                runs.append((r.gpa + start, (off - start) // PAGE_SIZE))
                start = -1
            elif not zero and start < 0:
                start = off
        if start >= 0:
            runs.append((r.gpa + start, (r.size - start) // PAGE_SIZE))
    return runs


R = TypeVar("R")


def _reply(ch: Channel, kind: MessageType, cls: type[R]) -> R:
    """The target's reply ``kind`` (a tiny typed record, authenticated), or its ABRT as an error."""
    got, length = ch.recv_header({kind: MAX_SMALL, MessageType.ABORT: MAX_SMALL})
    if got is MessageType.ABORT:
        raise MigrationError(f"{ch.peer} aborted the migration: {ch.failure(got, length)}")
    return ch.recv_record(got, length, cls)


def migrate(machine: Machine, to: str, opts: MigrationOptions | None = None) -> MigrationResult:
    """Move ``machine`` to the virtkit listening at ``to`` (HOST:PORT). On success the machine
    here is left paused and must not run again (the caller stops it). On failure before the
    switch-over, it runs here as before and :class:`MigrationError` says why."""
    opts = opts or MigrationOptions()
    if not opts.key:
        raise MigrationError(
            "a migration needs the pre-shared key (virtkit migrate --key-file FILE); the VM keeps running here"
        )
    if machine.stopping:
        raise MigrationError("the VM has stopped: nothing to migrate")
    if machine.paused:
        raise MigrationError("the VM is paused: resume it before migrating")
    host, port = parse_address(to, "--to")
    t_start = time.perf_counter()
    result = MigrationResult(False, to)
    try:
        sock = socket.create_connection((host, port), timeout=opts.connect_timeout)
    except OSError as e:
        raise MigrationError(f"cannot connect to {to}: {e.strerror or e}; the VM keeps running here") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ch = Channel(sock, to, read_timeout=opts.reply_timeout)
    paused = logging = go_sent = False
    try:
        from virtkit.migration.shape import describe

        source_handshake(ch, opts.key, describe(machine))
        machine.set_dirty_logging(True)
        logging = True
        machine.dirty_pages()  # start from an empty log
        budget = opts.downtime_ms / 1e3
        # --- round 0: everything that is not zero --------------------------------------------
        t0 = time.perf_counter()
        sent = _send_runs(ch, machine, _nonzero_runs(machine))
        elapsed = time.perf_counter() - t0
        bandwidth = sent * PAGE_SIZE / elapsed if elapsed > 0 and sent else 1e9
        result.dirty_per_round.append(sent)
        result.pages_sent += sent
        ch.send_record(MessageType.ROUND, RoundEnd(round=0, pages=sent))
        # --- rounds 1..: what the guest dirtied meanwhile --------------------------------------
        history: list[int] = []
        result.stop_reason = "max-rounds"
        for rnd in range(1, opts.max_rounds + 1):
            dirty = machine.dirty_pages()
            result.dirty_seen.append(len(dirty))
            if len(dirty) * PAGE_SIZE / bandwidth + SWITCHOVER_OVERHEAD <= budget:
                result.stop_reason = "budget"
                pending = dirty  # small enough: send it during the downtime
                break
            t0 = time.perf_counter()
            sent = _send_runs(ch, machine, page_runs(dirty))
            elapsed = time.perf_counter() - t0
            if elapsed > 0 and sent >= 256:  # enough data for a meaningful rate
                bandwidth = sent * PAGE_SIZE / elapsed
            result.dirty_per_round.append(sent)
            result.pages_sent += sent
            ch.send_record(MessageType.ROUND, RoundEnd(round=rnd, pages=sent))
            history.append(len(dirty))
            # not converging: the guest dirties as fast as we send; more rounds only add traffic
            if len(history) >= 4 and min(history[-3:]) >= min(history[:-3]):
                result.stop_reason = "not-converging"
                pending = []
                break
        else:
            pending = []
        result.rounds = len(result.dirty_per_round)
        result.precopy_ms = (time.perf_counter() - t_start) * 1e3
        # --- stop and copy ---------------------------------------------------------------------
        t_pause = time.perf_counter()
        t_pause_ns = time.monotonic_ns()
        machine.pause()
        paused = True
        final = sorted(set(pending) | set(machine.dirty_pages()))
        sent = _send_runs(ch, machine, page_runs(final))
        result.final_pages = sent
        result.pages_sent += sent
        state = vmstate.capture(machine)
        ch.send(MessageType.STATE, format.pack({"protocol": PROTOCOL_VERSION, **state}))
        _reply(ch, MessageType.READY, Empty)
        ch.send_record(MessageType.GO, Empty())
        go_sent = True
        running = _reply(ch, MessageType.RUNNING, Running)
        t_end = time.perf_counter()
        result.downtime_ms = (t_end - t_pause) * 1e3
        if running.started_ns > t_pause_ns:
            result.target_downtime_ms = (running.started_ns - t_pause_ns) / 1e6
        result.total_ms = (t_end - t_start) * 1e3
        result.bytes_sent = ch.bytes_sent
        result.completed = True
        return result
    except (VirtkitError, OSError) as e:
        reason = str(e) if isinstance(e, VirtkitError) else (e.strerror or str(e))
        if go_sent:
            # The target may or may not have started the VM: never risk two running copies.
            raise MigrationError(
                f"migration to {to}: lost contact after the switch-over ({reason}); the VM "
                "stays paused here: check the target, then resume or stop it here "
                "(control socket 'resume'/'stop')"
            ) from None
        if ch.authenticated:  # before the keys, the peer is nobody we owe an explanation
            with contextlib.suppress(MigrationError):
                ch.send_record(MessageType.ABORT, Failure(printable(reason, 900)))
        if isinstance(e, KvmError):
            reason = f"KVM: {reason}"
        raise MigrationError(f"migration to {to} failed, the VM keeps running here: {reason}") from None
    finally:
        ch.close()
        if not result.completed and not go_sent:
            if logging:
                with contextlib.suppress(KvmError):
                    machine.set_dirty_logging(False)
            if paused:
                machine.resume()
