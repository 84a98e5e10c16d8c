"""The receiving side of a live migration (see :mod:`virtkit.migration.protocol`).

The target's machine comes from its own configuration, never from the stream: the caller builds an
:class:`IncomingVM` from its command line (memory, vCPUs, mode, disks it opens itself) before any
connection is accepted, as ``qemu -incoming`` does. :func:`receive` then accepts one connection
and :func:`serve` runs the conversation: it authenticates the source, compares the source's
description with that machine (refusing with the field that differs), receives pages straight
into guest RAM, applies the final state, reports READY, and starts the vCPUs only on an
authenticated GO (the source has then given the VM up). :func:`serve` asks the machine for what it
needs through :class:`Landing`, so its every path is tested without /dev/kvm.

The order of messages is a strict state machine; at each point only the types listed are read,
with their size caps, and anything else ends the migration before its payload is read::

    state       accepted                    then
    HANDSHAKE   HELO, then DESC | ABRT      ACPT or RFSE sent
    MEMORY      PAGE | ROND | STAT | ABRT   PAGE, ROND: stay; STAT: state applied, RDY! sent
    SWITCHOVER  GO!! | ABRT                 vCPUs started, RUNG sent
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any, BinaryIO, Final, Protocol

from virtkit.api import VM
from virtkit.errors import KvmError, VirtkitError
from virtkit.memory import GuestMemory
from virtkit.migration.protocol import (
    HANDSHAKE_TIMEOUT,
    MAX_PAGE_BYTES,
    MAX_PAGE_MESSAGE,
    MAX_RUNS,
    MAX_SMALL,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    RUN,
    RUN_TABLE_HEAD,
    Channel,
    Empty,
    Failure,
    MachineShape,
    MessageType,
    MigrationError,
    RoundEnd,
    Running,
    parse_address,
    parse_shape,
    printable,
    state_cap,
    target_handshake,
)
from virtkit.snapshot import cpucompat, format, vmstate
from virtkit.snapshot.format import Fields, SnapshotError
from virtkit.vm import DiskSpec, Machine

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtkit.devices.virtio.net.tap import NetSpec

#: how long the target waits for each read before it gives the migration up
READ_TIMEOUT: Final = 60.0
FAULTS: Final = ("refuse", "drop-during-memory", "die-before-switchover")


class IncomingVM(VM):
    """A :class:`virtkit.api.VM` built from this host's configuration, whose memory and state arrive
    over the network; it is running when :func:`receive` returns it."""

    def __init__(
        self,
        *,
        memory: str | int = "64M",
        vcpus: int | str = 1,
        mode: str = "full",
        strict: bool = False,
        disks: Sequence[str | DiskSpec] = (),
        serial: str | BinaryIO | None = None,
        nets: Sequence[NetSpec] = (),
    ) -> None:
        """``nets``: the host side of the VM's network cards, in order (``--net`` here: a peer never
        chooses what the receiver attaches). A card with no ``mac=`` takes the MAC the guest knows
        from the incoming state; one with ``mac=`` must have that MAC."""
        super().__init__(
            "(incoming migration)", memory=memory, vcpus=vcpus, mode=mode, strict=strict, serial=serial, disks=disks
        )
        self.config.nets = tuple(nets)
        self.source = ""
        self.stats: dict[str, Any] = {}

    def open(self) -> None:
        """Build the machine (memory, vCPUs, devices, the disks this host names, the network
        cards on the TAPs it names): no kernel."""
        if self.machine is not None:
            return
        try:
            self.machine = Machine(self.config, self.console.write)
            for spec, (_, card) in zip(self.config.nets, self.machine.nets, strict=True):
                card.adopt_saved_mac = spec.mac is None
        except BaseException:
            self.close()
            raise


def listen(address: str) -> socket.socket:
    """A listening socket for ``address`` (``HOST:PORT``, ``:PORT`` or ``PORT``; no host means
    loopback). Bound before anything else, so that a receiver confines itself with it open."""
    host, port = parse_address(address, "--listen")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MigrationError(f"cannot listen on {address}: {e.strerror or e}") from None
    sock.listen(1)
    return sock


def write_port_file(path: str, port: int) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.rename(tmp, path)
    except OSError as e:
        raise MigrationError(f"cannot write --port-file {path}: {e.strerror}") from None


def recv_pages(ch: Channel, memory: GuestMemory, length: int) -> int:
    """One PAGE message into guest RAM. The run table is checked (increasing, not overlapping,
    inside guest RAM, lengths adding up) before a byte of data is received; the MAC after."""
    if length < RUN_TABLE_HEAD.size:
        raise MigrationError(f"{ch.peer} sent a malformed PAGE message")
    head = ch.recv_payload(RUN_TABLE_HEAD.size, "a PAGE run table")
    nruns, reserved = RUN_TABLE_HEAD.unpack(head)
    if not 0 < nruns <= MAX_RUNS or reserved:
        raise MigrationError(f"{ch.peer} sent a PAGE message with {nruns} runs (1 to {MAX_RUNS} allowed)")
    if RUN_TABLE_HEAD.size + nruns * RUN.size > length:
        raise MigrationError(f"{ch.peer} sent a PAGE message whose length does not match its runs")
    table = ch.recv_payload(nruns * RUN.size, "a PAGE run table")
    total = 0
    end = 0
    views = []
    for i in range(nruns):
        gpa, n, reserved = RUN.unpack_from(table, i * RUN.size)
        size = n * PAGE_SIZE
        if gpa % PAGE_SIZE or n == 0 or reserved or not memory.contains(gpa, size):
            raise MigrationError(f"{ch.peer} sent pages at {gpa:#x}+{n} outside guest RAM")
        if gpa < end:
            raise MigrationError(f"{ch.peer} sent a PAGE message whose runs overlap or are out of order")
        end = gpa + size
        total += size
        views.append(memory.view(gpa, size))
    if total > MAX_PAGE_BYTES or RUN_TABLE_HEAD.size + len(table) + total != length:
        raise MigrationError(f"{ch.peer} sent a PAGE message whose length does not match its runs")
    for v in views:
        ch.recv_into(v, "PAGE data")
    ch.verify(MessageType.PAGES, head, table, *views)
    return total // PAGE_SIZE


def parse_state(data: bytes, machine: Machine, peer: str) -> vmstate.MachineImage:
    """A verified STAT payload -> the state to apply, checked against this machine: the snapshot
    format's own checks (version, checksum, bounded JSON, every field typed), the protocol, the
    vCPU count, and each vCPU's CPUID against what this host offers."""
    from virtkit.snapshot.snapshot import effective_cpuid

    try:
        doc = format.unpack(data, source=f"the migration state from {peer}")
        if doc.get("protocol") != PROTOCOL_VERSION:
            raise MigrationError(f"{peer} sent state for protocol {printable(repr(doc.get('protocol')), 20)}")
        image = vmstate.parse(Fields(doc, "state"))
    except SnapshotError as e:
        raise MigrationError(str(e)) from None
    if len(image.vcpus) != len(machine.vcpus):
        raise MigrationError(
            f"{peer} sent the state of {len(image.vcpus)} vCPUs for a {len(machine.vcpus)}-vCPU machine"
        )
    host = effective_cpuid(machine)
    for v in image.vcpus:
        reason = cpucompat.check_compatible(v.cpuid, host)
        if reason is not None:
            raise MigrationError(f"the state of vCPU {v.id} from {peer}: {reason}")
    return image


class Landing(Protocol):
    """What the target's state machine needs of the machine a VM lands in: :class:`MachineLanding`
    for a real one; unit tests pass a fake to drive every path without /dev/kvm."""

    memory: GuestMemory
    vcpus: int

    def refusal(self, shape: MachineShape) -> str | None:
        """Why a VM of this (verified) shape cannot land here, or None."""

    def apply_state(self, data: bytes, peer: str) -> None:
        """Check and apply a verified STAT payload; nothing runs yet."""

    def start(self) -> int:
        """Start the vCPUs; the CLOCK_MONOTONIC time (ns) they started at."""


class MachineLanding:
    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.memory = machine.memory
        self.vcpus = len(machine.vcpus)

    def refusal(self, shape: MachineShape) -> str | None:
        from virtkit.migration.shape import compare, describe

        return compare(describe(self.machine), shape)

    def apply_state(self, data: bytes, peer: str) -> None:
        image = parse_state(data, self.machine, peer)
        try:
            vmstate.apply(self.machine, image)
        except (SnapshotError, KvmError) as e:
            raise MigrationError(f"cannot apply the state from {peer}: {e}") from None

    def start(self) -> int:
        self.machine.start()
        return time.monotonic_ns()


def serve(ch: Channel, key: bytes, landing: Landing, *, fault: str | None = None) -> dict[str, Any]:
    """The target's side of one connection, from HELO to RUNG (module docstring); returns
    statistics once the VM runs. Raises :class:`MigrationError` otherwise, and then nothing was
    started and no state applied unless every message up to it verified."""
    authenticated = False  # the source proved it holds the key: it is owed an explanation
    answered = False  # it was told why already (RFSE), or must not be (injected drop)
    try:
        try:
            description = target_handshake(ch, key, deadline=time.monotonic() + HANDSHAKE_TIMEOUT)
        except MigrationError as e:
            raise type(e)(f"migration handshake failed: {e}") from None
        authenticated = True
        theirs = parse_shape(description, ch.peer)
        reason = landing.refusal(theirs)
        if reason is None and fault == "refuse":
            reason = "refused by fault injection"
        if reason is not None:
            answered = True
            reason = printable(reason, 900)  # it may quote the peer's words
            ch.send_record(MessageType.REFUSE, Failure(reason))
            raise MigrationError(f"refused the migration from {ch.peer}: {reason}")
        ch.send_record(MessageType.ACCEPT, Empty())
        # --- MEMORY -------------------------------------------------------------------------------
        pages = rounds = 0
        t_first = time.perf_counter()
        memory_phase = {
            MessageType.PAGES: MAX_PAGE_MESSAGE,
            MessageType.ROUND: MAX_SMALL,
            MessageType.STATE: state_cap(landing.vcpus),
            MessageType.ABORT: MAX_SMALL,
        }
        while True:
            kind, length = ch.recv_header(memory_phase)
            if kind is MessageType.PAGES:
                pages += recv_pages(ch, landing.memory, length)
                if fault == "drop-during-memory":
                    answered = True
                    # an abrupt reset, as when a host or its network goes away
                    ch.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    raise MigrationError("dropped the connection by fault injection")
            elif kind is MessageType.ROUND:
                r = ch.recv_record(kind, length, RoundEnd)
                if r.round != rounds:
                    raise MigrationError(f"{ch.peer} ended round {r.round} where round {rounds} was expected")
                rounds += 1
            elif kind is MessageType.ABORT:
                raise MigrationError(f"{ch.peer} aborted the migration: {ch.failure(kind, length)}")
            else:
                break
        # --- STATE: verified, then parsed, checked and applied; READY -----------------------------
        state = ch.recv_body(MessageType.STATE, length)
        if fault == "die-before-switchover":
            # As abrupt as SIGKILL for the source (no ABRT, no cleanup), and it works where a signal
            # cannot: a confined receiver is PID 1 of its namespace, which ignores its own SIGKILL.
            os._exit(128 + signal.SIGKILL)
        landing.apply_state(state, ch.peer)
        ch.send_record(MessageType.READY, Empty())
        # --- SWITCHOVER ---------------------------------------------------------------------------
        kind, length = ch.recv_header({MessageType.GO: MAX_SMALL, MessageType.ABORT: MAX_SMALL})
        if kind is MessageType.ABORT:
            raise MigrationError(f"{ch.peer} aborted the migration: {ch.failure(kind, length)}")
        ch.recv_record(kind, length, Empty)
        # every message verified, in order, up to an authenticated GO: only now does the VM run
        started_ns = landing.start()
        with contextlib.suppress(MigrationError):
            ch.send_record(MessageType.RUNNING, Running(started_ns=started_ns))
        return {"pages": pages, "rounds": rounds, "receive_s": time.perf_counter() - t_first}
    except BaseException as e:
        if isinstance(e, VirtkitError):
            # one line, whatever the peer put in a field name or a device's state that an error quotes
            e.args = (printable(str(e), 2000),)
            if authenticated and not answered:
                with contextlib.suppress(MigrationError):  # tell the source why, if it still listens
                    ch.send_record(MessageType.ABORT, Failure(printable(str(e), 900)))
        raise


def receive(
    listener: socket.socket,
    vm: IncomingVM,
    key: bytes,
    *,
    accept_timeout: float | None = None,
    fault: str | None = None,
) -> IncomingVM:
    """Accept one migration on ``listener`` into ``vm`` (opened: its machine built from this host's
    configuration) and return it running. Raises :class:`MigrationError` if the migration does
    not complete; the caller then closes ``vm``, which never ran. ``fault`` injects a failure for
    tests: refuse, drop-during-memory, die-before-switchover."""
    if fault is not None and fault not in FAULTS:
        raise MigrationError(f"unknown fault {fault!r}")
    if not key:
        raise MigrationError("receiving a migration needs the pre-shared key (--key-file FILE)")
    machine = vm.machine
    if machine is None:
        raise MigrationError("open() the IncomingVM before receiving into it")
    name = "{}:{}".format(*listener.getsockname()[:2])
    listener.settimeout(accept_timeout)
    try:
        conn, addr = listener.accept()
    except TimeoutError:
        raise MigrationError(f"no migration arrived on {name} within {accept_timeout:g} s") from None
    except OSError as e:
        raise MigrationError(f"cannot accept a migration on {name}: {e.strerror or e}") from None
    finally:
        listener.close()  # one migration per receiver: nobody else gets a turn
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ch = Channel(conn, f"{addr[0]}:{addr[1]}", read_timeout=READ_TIMEOUT)
    try:
        vm.stats = serve(ch, key, MachineLanding(machine), fault=fault)
        vm.source = ch.peer
        return vm
    finally:
        ch.close()
