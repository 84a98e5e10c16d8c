"""The live-migration wire protocol: typed, length-prefixed messages over one TCP connection.

Every message is a 16-byte header and a payload::

    offset  size  field
    0       4     type, four ASCII letters (MessageType)
    4       4     reserved (0)
    8       8     payload length in bytes

The conversation (source S, target T)::

    S -> T  HELO  JSON: protocol version, machine config, the guest's CPUID, memory layout
    T -> S  ACPT  JSON {}                    or RFSE {"error": ...}: the target cannot run it
    S -> T  PAGE  memory pages (below), any number, in pre-copy rounds while the guest runs
    S -> T  ROND  JSON {"round": n, "pages": k}: end of a pre-copy round (progress only)
            ... the source pauses the guest: downtime starts ...
    S -> T  PAGE  the pages dirtied since the last round
    S -> T  STAT  the machine state: a snapshot state file (virtkit.snapshot.format: versioned,
                  checksummed) holding KVM, vCPU and device state
    T -> S  RDY!  JSON {}: state applied, the VM is ready to run here; nothing runs yet
    S -> T  GO!!  JSON {}: the source will never run the VM again: run it
    T -> S  RUNG  JSON {"started_ns": ...}: the vCPUs run on the target; downtime ends

Either side may send ABRT {"error": ...} instead of its next message. Until the source sends GO!!
it can abandon the migration and resume the VM (target refused, connection lost, target died):
the guest never runs in two places. After GO!! and before RUNG, an error leaves the VM paused on
the source, which then reports that the outcome is unknown rather than risk two running copies.

PAGE payload: a run table, then the data of every run back to back (so both sides move page
data straight between guest memory and the socket, with no intermediate copy)::

    u32 number of runs, u32 reserved
    per run: u64 guest-physical address, u32 page count, u32 reserved
    data: sum(page counts) * 4096 bytes

The target checks every run against its guest RAM before receiving into it.
"""

from __future__ import annotations

import contextlib
import enum
import json
import socket
import struct
from collections.abc import Sequence
from typing import Any, Final

from virtkit import records
from virtkit.errors import VirtkitError

PROTOCOL_VERSION: Final = 1
PAGE_SIZE: Final = 4096
HEADER: Final = struct.Struct("<4sIQ")
RUN_TABLE_HEAD: Final = struct.Struct("<II")
RUN: Final = struct.Struct("<QII")
#: control messages (everything but PAGE and STAT) are small; refuse anything larger
MAX_CONTROL: Final = 1 << 20
MAX_STATE: Final = 64 << 20
#: runs per PAGE message; also bounds the iovec count of one sendmsg (IOV_MAX is 1024)
MAX_RUNS: Final = 512


class MessageType(bytes, enum.Enum):
    HELLO = b"HELO"
    ACCEPT = b"ACPT"
    REFUSE = b"RFSE"
    PAGES = b"PAGE"
    ROUND = b"ROND"
    STATE = b"STAT"
    READY = b"RDY!"
    GO = b"GO!!"
    RUNNING = b"RUNG"
    ABORT = b"ABRT"


class MigrationError(VirtkitError):
    """A live migration failed. Raised on the source, the VM keeps running there (unless the
    message says the outcome is unknown)."""


class Channel:
    """One migration connection: typed messages with bounded sizes."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.bytes_sent = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    # --- sending ---------------------------------------------------------------------------------
    def send(self, kind: MessageType, payload: bytes = b"") -> None:
        self._sendall([HEADER.pack(kind.value, 0, len(payload)), payload])

    def send_json(self, kind: MessageType, obj: dict[str, Any]) -> None:
        self.send(kind, json.dumps(obj).encode())

    def send_pages(self, runs: Sequence[tuple[int, memoryview]]) -> None:
        """One PAGE message carrying ``runs`` of (guest-physical address, page-aligned view)."""
        assert 0 < len(runs) <= MAX_RUNS
        table = bytearray(RUN_TABLE_HEAD.pack(len(runs), 0))
        total = 0
        for gpa, view in runs:
            table += RUN.pack(gpa, len(view) // PAGE_SIZE, 0)
            total += len(view)
        head = HEADER.pack(MessageType.PAGES.value, 0, len(table) + total)
        self._sendall([head, bytes(table), *(v for _, v in runs)])

    def _sendall(self, buffers: list[bytes | memoryview]) -> None:
        bufs = [memoryview(b).cast("B") for b in buffers if len(b)]
        try:
            while bufs:
                n = self.sock.sendmsg(bufs)
                self.bytes_sent += n
                while n:
                    if n >= len(bufs[0]):
                        n -= len(bufs[0])
                        bufs.pop(0)
                    else:
                        bufs[0] = bufs[0][n:]
                        n = 0
        except OSError as e:
            raise MigrationError(f"connection to {self.peer} failed while sending: {e.strerror or e}") from None

    # --- receiving -------------------------------------------------------------------------------
    def recv_into(self, view: memoryview) -> None:
        got = 0
        try:
            while got < len(view):
                n = self.sock.recv_into(view[got:])
                if n == 0:
                    raise MigrationError(f"{self.peer} closed the connection")
                got += n
        except TimeoutError:
            raise MigrationError(f"{self.peer} stopped answering (timed out)") from None
        except OSError as e:
            raise MigrationError(f"connection to {self.peer} failed: {e.strerror or e}") from None

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self.recv_into(memoryview(buf))
        return bytes(buf)

    def recv_header(self) -> tuple[MessageType, int]:
        kind, _, length = HEADER.unpack(self.recv_exact(HEADER.size))
        try:
            return MessageType(kind), int(length)
        except ValueError:
            raise MigrationError(f"{self.peer} sent an unknown message type {kind!r}") from None

    def recv_json_payload(self, kind: MessageType, length: int) -> dict[str, Any]:
        if length > MAX_CONTROL:
            raise MigrationError(f"{self.peer} sent a {length}-byte {kind.value.decode()} message")
        if not length:
            return {}
        # depth bounded before parsing (records): deep nesting raised RecursionError, not ValueError
        try:
            return records.load_object(self.recv_exact(length), what=f"{kind.value.decode()} message",
                                       max_bytes=MAX_CONTROL)
        except records.UntrustedInput as e:
            raise MigrationError(f"{self.peer} sent a malformed {kind.value.decode()} message: {e}") from None

    def expect(self, *kinds: MessageType) -> tuple[MessageType, dict[str, Any]]:
        """Receive a control message of one of ``kinds``; ABRT and REFUSE become errors."""
        kind, length = self.recv_header()
        if kind in (MessageType.ABORT, MessageType.REFUSE) and kind not in kinds:
            body = self.recv_json_payload(kind, length)
            what = "refused the migration" if kind is MessageType.REFUSE else "aborted the migration"
            raise MigrationError(f"{self.peer} {what}: {body.get('error', 'no reason given')}")
        if kind not in kinds:
            raise MigrationError(f"{self.peer} sent {kind.value.decode()} where "
                                 f"{' or '.join(k.value.decode() for k in kinds)} was expected")
        return kind, self.recv_json_payload(kind, length)


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) into (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MigrationError(f"{what} {text!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def page_runs(pages: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted page addresses into (address, page count) runs of consecutive pages."""
    runs: list[tuple[int, int]] = []
    for p in pages:
        if runs and runs[-1][0] + runs[-1][1] * PAGE_SIZE == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs
