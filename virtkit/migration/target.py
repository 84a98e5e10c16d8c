"""The receiving side of a live migration (see :mod:`virtkit.migration.protocol`).

The target builds an empty machine as soon as the source says what it is (HELO), so that a host
that cannot run it refuses before any page moves; it then receives pages straight into guest RAM,
applies the final state, reports READY, and starts the vCPUs only when the source says GO (the
source has then given the VM up for good).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import time
from typing import Any, BinaryIO, Final

from virtkit.api import VM
from virtkit.errors import VirtkitError
from virtkit.migration.protocol import (
    MAX_RUNS,
    MAX_STATE,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    RUN,
    RUN_TABLE_HEAD,
    Channel,
    MessageType,
    MigrationError,
    parse_address,
)
from virtkit.snapshot import cpucompat, format, vmstate
from virtkit.snapshot.format import Fields
from virtkit.snapshot.snapshot import effective_cpuid
from virtkit.vm import DiskSpec, Machine, MachineConfig

#: how long the target waits for the next message before it gives the migration up
READ_TIMEOUT: Final = 60.0
FAULTS: Final = ("refuse", "drop-during-memory", "die-before-switchover")


class IncomingVM(VM):
    """A :class:`virtkit.api.VM` whose machine arrives over the network; it is already running
    when :func:`receive` returns it."""

    def __init__(self, config: MachineConfig, *, serial: str | BinaryIO | None = None) -> None:
        super().__init__("(incoming migration)", memory=config.memory, vcpus=config.vcpus,
                         mode="para" if config.paravirt else "full", strict=config.strict, serial=serial)
        self.config = config
        self.source = ""
        self.stats: dict[str, Any] = {}

    def open(self) -> None:
        if self.machine is not None:
            return
        try:
            self.machine = Machine(self.config, self.console.write)
        except BaseException:
            self.close()
            raise


def _config_from_hello(hello: dict[str, Any]) -> MachineConfig:
    f = Fields(hello, "HELO")
    m = f.obj("machine")
    disks = tuple(DiskSpec(Fields(d, "disk").string("path"), read_only=Fields(d, "disk").boolean("read_only"))
                  for d in (m.array("disks") if m.has("disks") else []))
    kw: dict[str, Any] = {"disks": disks} if disks else {}
    return MachineConfig(memory=m.integer("memory"), vcpus=m.integer("vcpus"), paravirt=m.boolean("paravirt"),
                         strict=m.boolean("strict"), **kw)


def _check_hello(hello: dict[str, Any], machine: Machine) -> str | None:
    """None if this host can take the VM described by HELO; else why not."""
    if hello.get("protocol") != PROTOCOL_VERSION:
        return f"migration protocol version {hello.get('protocol')!r}; this virtkit speaks {PROTOCOL_VERSION}"
    cpuid = hello.get("cpuid")
    if not isinstance(cpuid, list) or not all(isinstance(e, list) and len(e) == 7 for e in cpuid):
        return "HELO carries no valid CPUID"
    reason = cpucompat.check_compatible([tuple(e) for e in cpuid], effective_cpuid(machine))
    if reason:
        return reason
    regions = [[r.gpa, r.size] for r in machine.memory.regions]
    if hello.get("regions") != regions:
        return f"guest memory layout {hello.get('regions')} differs from this virtkit's {regions}"
    if hello.get("devices") != sorted(machine.devices):
        return f"devices {hello.get('devices')} differ from this virtkit's {sorted(machine.devices)}"
    return None


def _recv_pages(ch: Channel, machine: Machine, length: int) -> int:
    """One PAGE message into guest RAM; every run is bounds-checked before data is received."""
    if length < RUN_TABLE_HEAD.size:
        raise MigrationError(f"{ch.peer} sent a malformed PAGE message")
    nruns, _ = RUN_TABLE_HEAD.unpack(ch.recv_exact(RUN_TABLE_HEAD.size))
    if not 0 < nruns <= MAX_RUNS:
        raise MigrationError(f"{ch.peer} sent a PAGE message with {nruns} runs")
    table = ch.recv_exact(nruns * RUN.size)
    runs = [RUN.unpack_from(table, i * RUN.size)[:2] for i in range(nruns)]
    total = sum(n for _, n in runs) * PAGE_SIZE
    if RUN_TABLE_HEAD.size + len(table) + total != length:
        raise MigrationError(f"{ch.peer} sent a PAGE message whose length does not match its runs")
    views = []
    for gpa, n in runs:
        if gpa % PAGE_SIZE or n == 0 or not machine.memory.contains(gpa, n * PAGE_SIZE):
            raise MigrationError(f"{ch.peer} sent pages at {gpa:#x}+{n} outside guest RAM")
        views.append(machine.memory.view(gpa, n * PAGE_SIZE))
    for v in views:
        ch.recv_into(v)
    return int(total // PAGE_SIZE)


def _listen(address: str) -> socket.socket:
    host, port = parse_address(address, "--listen")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MigrationError(f"cannot listen on {address}: {e.strerror or e}") from None
    sock.listen(1)
    return sock


def _write_port_file(path: str, port: int) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.rename(tmp, path)


def receive(listen: str, *, serial: str | BinaryIO | None = None, port_file: str | None = None,
            accept_timeout: float | None = None, fault: str | None = None,
            listener: socket.socket | None = None) -> IncomingVM:
    """Accept one migration on ``listen`` (HOST:PORT) and return the VM running here. Raises
    :class:`MigrationError` (and leaves nothing behind) if the migration does not complete.
    ``fault`` injects a failure for tests: refuse, drop-during-memory, die-before-switchover."""
    if fault is not None and fault not in FAULTS:
        raise MigrationError(f"unknown fault {fault!r}")
    lsock = listener or _listen(listen)
    try:
        if port_file:
            _write_port_file(port_file, lsock.getsockname()[1])
        lsock.settimeout(accept_timeout)
        try:
            conn, addr = lsock.accept()
        except TimeoutError:
            raise MigrationError(f"no migration arrived on {listen} within {accept_timeout:g} s") from None
    finally:
        lsock.close()
    conn.settimeout(READ_TIMEOUT)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ch = Channel(conn, f"{addr[0]}:{addr[1]}")
    vm: IncomingVM | None = None
    answered = False  # the source was already told why (REFUSE), or must not be (injected drop)
    try:
        _, hello = ch.expect(MessageType.HELLO)
        try:
            config = _config_from_hello(hello)
            vm = IncomingVM(config, serial=serial)
            vm.source = ch.peer
            vm.open()
        except VirtkitError as e:
            answered = True
            ch.send_json(MessageType.REFUSE, {"error": f"this host cannot build the VM: {e}"})
            raise MigrationError(f"refused the migration from {ch.peer}: {e}") from None
        assert vm.machine is not None
        machine = vm.machine
        reason = _check_hello(hello, machine)
        if reason is None and fault == "refuse":
            reason = "refused by fault injection"
        if reason is not None:
            answered = True
            ch.send_json(MessageType.REFUSE, {"error": reason})
            raise MigrationError(f"refused the migration from {ch.peer}: {reason}")
        ch.send_json(MessageType.ACCEPT, {})
        pages = 0
        t_first = time.perf_counter()
        while True:
            kind, length = ch.recv_header()
            if kind is MessageType.PAGES:
                pages += _recv_pages(ch, machine, length)
                if fault == "drop-during-memory":
                    answered = True
                    # an abrupt reset, as when a host or its network goes away
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    raise MigrationError("dropped the connection by fault injection")
            elif kind is MessageType.ROUND:
                ch.recv_json_payload(kind, length)
            elif kind is MessageType.STATE:
                if length > MAX_STATE:
                    raise MigrationError(f"{ch.peer} sent a {length}-byte state")
                doc = format.unpack(ch.recv_exact(length), source=f"migration state from {ch.peer}")
                if doc.get("protocol") != PROTOCOL_VERSION:
                    raise MigrationError(f"{ch.peer} sent state for protocol {doc.get('protocol')!r}")
                image = vmstate.parse(Fields(doc, "state"))
                if fault == "die-before-switchover":
                    os.kill(os.getpid(), signal.SIGKILL)
                vmstate.apply(machine, image)
                ch.send_json(MessageType.READY, {})
            elif kind is MessageType.GO:
                ch.recv_json_payload(kind, length)
                machine.start()
                started_ns = time.monotonic_ns()
                vm.stats = {"pages": pages, "receive_s": time.perf_counter() - t_first}
                with contextlib.suppress(MigrationError):
                    ch.send_json(MessageType.RUNNING, {"started_ns": started_ns})
                return vm
            elif kind is MessageType.ABORT:
                body = ch.recv_json_payload(kind, length)
                raise MigrationError(f"{ch.peer} aborted the migration: {body.get('error', 'no reason given')}")
            else:
                raise MigrationError(f"{ch.peer} sent {kind.value.decode()} during the migration")
    except BaseException as e:
        if isinstance(e, VirtkitError) and not answered:
            with contextlib.suppress(MigrationError):  # tell the source why, if it still listens
                ch.send_json(MessageType.ABORT, {"error": str(e)})
        if vm is not None:
            vm.close()
        raise
    finally:
        ch.close()
