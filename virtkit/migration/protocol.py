"""The live-migration wire protocol, version 2: typed, length-prefixed, authenticated messages over
one TCP connection, in an order both sides enforce.

Every message is a 16-byte header, a payload and, once the handshake has made the session keys,
a 32-byte MAC::

    offset  size  field
    0       4     type, four ASCII letters (MessageType)
    4       4     flags (0; anything else is refused)
    8       8     payload length in bytes
    16      n     payload
    16+n    32    HMAC-SHA256(K_dir, seq || header || payload)   (authenticated messages)

``seq`` is the message's number in its direction (u64 little-endian, from 0). It is not sent:
both sides count, so a message dropped, repeated, reordered or spliced in from another session
fails the MAC of the first message out of place.

The conversation (source S, target T); the receiver of each message accepts only the types listed
for that point, and refuses anything else::

    S -> T  HELO  magic, version, nonce_S (32 random bytes)        not authenticated
    T -> S  CHAL  nonce_T (32 random bytes)                        t2s #0
            (or RFSE {"error"}: the version is not spoken here; not authenticated, shown as such)
    S -> T  DESC  MachineShape (JSON): what the VM is; never a path   s2t #0
    T -> S  ACPT {} or RFSE {"error"}: the shapes differ (the field that differs is named)
    S -> T  PAGE  memory pages, ROND {"round", "pages"}: pre-copy; then, the guest paused, the last PAGEs
    S -> T  STAT  the machine state (a snapshot state file: versioned, checksummed, bounded)
    T -> S  RDY!  {}: state applied; nothing runs yet
    S -> T  GO!!  {}: the source will never run the VM again
    T -> S  RUNG  {"started_ns"}: the vCPUs run on the target

Either side may send ABRT {"error"} instead of its next message (authenticated, after the
handshake). Until the source sends GO!! it can abandon the migration and resume the VM; after GO!!
and before RUNG it leaves the VM paused and reports that the outcome is unknown.

Keys (K: the pre-shared key, at least 32 bytes, :mod:`virtkit.migration.keys`)::

    prk   = HMAC-SHA256(K,   "virtkit-migration-2" || nonce_S || nonce_T)
    K_s2t = HMAC-SHA256(prk, "source to target")
    K_t2s = HMAC-SHA256(prk, "target to source")

Both nonces make every session's keys new: a recorded source stream fails the target's fresh
nonce_T (DESC is the first thing checked), a recorded target stream fails the source's nonce_S
(CHAL proves the target holds K before the source sends anything about the VM). One key per
direction: a message reflected back to its sender fails. The MAC covers the header, so neither
type nor length can be changed. A truncated stream cannot start a VM: the target runs it only
after an authenticated GO!!, which needs an authenticated STAT before it.

What the MAC does not give: confidentiality. Guest memory crosses the network in the clear.

PAGE payload: a run table, then the data of every run back to back::

    u32 number of runs, u32 reserved (0)
    per run: u64 guest-physical address, u32 page count, u32 reserved (0)
    data: sum(page counts) * 4096 bytes

Runs are in increasing address order, never overlap, and lie inside the target's guest RAM,
checked before any data is received. The data lands straight in the (not yet running) guest RAM
and its MAC is checked when the message ends: unverified bytes can reach only guest RAM of a VM
that will never run unless every message verifies. The sender copies each message's pages into a
buffer before computing the MAC, so what it authenticates is exactly what it sends while the
guest keeps writing.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import secrets
import socket
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, TypeVar

from virtkit import records
from virtkit.errors import VirtkitError
from virtkit.records import U32, Bounds

PROTOCOL_VERSION: Final = 2
PAGE_SIZE: Final = 4096
HEADER: Final = struct.Struct("<4sIQ")
#: the HELO payload: magic, version, the source's nonce
HELLO: Final = struct.Struct("<8sI32s")
HELLO_MAGIC: Final = b"VKMIGR\r\n"
NONCE_SIZE: Final = 32
MAC_SIZE: Final = 32
RUN_TABLE_HEAD: Final = struct.Struct("<II")
RUN: Final = struct.Struct("<QII")
#: runs per PAGE message; also bounds the iovec count of one sendmsg (IOV_MAX is 1024)
MAX_RUNS: Final = 512
#: page data per PAGE message: the sender copies a message's pages into one buffer of this size
MAX_PAGE_BYTES: Final = 4 << 20
MAX_PAGE_MESSAGE: Final = RUN_TABLE_HEAD.size + MAX_RUNS * RUN.size + MAX_PAGE_BYTES
#: DESC: the machine's shape (a few KiB, most of it CPUID)
MAX_DESC: Final = 64 << 10
#: every other control message (ACPT, RFSE, ROND, RDY!, GO!!, RUNG, ABRT)
MAX_SMALL: Final = 4096
#: the state file: what one vCPU needs (measured: 17 KiB) with a wide margin, plus the devices;
#: never more than the state file format's own cap (see :func:`state_cap`)
STATE_BASE: Final = 1 << 20
STATE_PER_VCPU: Final = 256 << 10
#: the whole handshake (HELO to DESC verified, on the target) must fit in this
HANDSHAKE_TIMEOUT: Final = 10.0
#: one message, however large, must arrive within this (a peer trickling bytes is cut off)
MESSAGE_TIMEOUT: Final = 120.0
#: what the peer may have said in an error, as this side shows it
MAX_SHOWN: Final = 300

_LABEL_KEYS: Final = b"virtkit-migration-2"
_LABEL_S2T: Final = b"source to target"
_LABEL_T2S: Final = b"target to source"
_SEQ: Final = struct.Struct("<Q")


class MessageType(bytes, enum.Enum):
    HELLO = b"HELO"
    CHALLENGE = b"CHAL"
    DESCRIBE = b"DESC"
    ACCEPT = b"ACPT"
    REFUSE = b"RFSE"
    PAGES = b"PAGE"
    ROUND = b"ROND"
    STATE = b"STAT"
    READY = b"RDY!"
    GO = b"GO!!"
    RUNNING = b"RUNG"
    ABORT = b"ABRT"

    @property
    def label(self) -> str:
        return self.value.decode()


class MigrationError(VirtkitError):
    """A live migration failed. Raised on the source, the VM keeps running there (unless the
    message says the outcome is unknown)."""


class ConnectionLost(MigrationError):
    """The peer closed or reset the connection, or stopped sending."""


class AuthenticationError(MigrationError):
    """A message's MAC did not verify: the peer holds another key, or the stream was altered."""


def state_cap(vcpus: int) -> int:
    from virtkit.snapshot.format import HEADER_SIZE, MAX_PAYLOAD

    return min(HEADER_SIZE + MAX_PAYLOAD, STATE_BASE + vcpus * STATE_PER_VCPU)


def printable(text: str | bytes, limit: int = MAX_SHOWN) -> str:
    """What a peer said, safe to put in our one-line messages and to send in a small message:
    anything but printable ASCII (newlines, escape sequences, characters JSON would expand six
    times) becomes '?', and it is cut at ``limit`` characters."""
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    cut = text[:limit]
    out = "".join(c if c.isascii() and c.isprintable() else "?" for c in cut)
    return out + ("..." if len(text) > limit else "")


# --- the records peers send (every JSON goes through virtkit.records) ---------------------------
MAX_DISKS: Final = 16
MAX_REGIONS: Final = 64
MAX_DEVICES: Final = 64
MAX_CPUID: Final = 1024
#: what Machine.devices names look like (uart0, virtio-blk...): they end up in messages
DEVICE_NAME: Final = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_ADDRESS = Annotated[int, Bounds(lo=0, hi=1 << 52)]
_SIZE = Annotated[int, Bounds(lo=1, hi=1 << 52)]
#: a CPUID entry: function, index, flags, eax, ebx, ecx, edx
CpuidWords = tuple[U32, U32, U32, U32, U32, U32, U32]


@dataclass(frozen=True)
class DiskShape:
    read_only: bool
    size: Annotated[int, Bounds(lo=0, hi=1 << 62)]


@dataclass(frozen=True)
class MachineShape:
    """What the VM is, as both ends compare it (DESC). No path, no file name: the target attaches
    the disks its own command line names, and only compares their number, sizes and modes."""

    memory: _SIZE
    vcpus: Annotated[int, Bounds(lo=1, hi=4096)]
    mode: Literal["full", "para"]
    strict: bool
    disks: Annotated[tuple[DiskShape, ...], Bounds(max_len=MAX_DISKS)]
    regions: Annotated[tuple[tuple[_ADDRESS, _SIZE], ...], Bounds(max_len=MAX_REGIONS)]
    devices: Annotated[tuple[Annotated[str, Bounds(pattern=DEVICE_NAME)], ...], Bounds(max_len=MAX_DEVICES)]
    #: the guest's CPUID (KVM_GET_CPUID2 of vCPU 0)
    cpuid: Annotated[tuple[CpuidWords, ...], Bounds(max_len=MAX_CPUID)]


@dataclass(frozen=True)
class Empty:
    """ACPT, RDY!, GO!!: nothing to say but the message itself."""


@dataclass(frozen=True)
class Failure:
    """RFSE, ABRT."""

    error: Annotated[str, Bounds(max_len=1000)]


@dataclass(frozen=True)
class RoundEnd:
    round: Annotated[int, Bounds(lo=0, hi=1 << 20)]
    pages: Annotated[int, Bounds(lo=0, hi=1 << 40)]


@dataclass(frozen=True)
class Running:
    started_ns: Annotated[int, Bounds(lo=0, hi=1 << 63)]


R = TypeVar("R")


def parse_record(cls: type[R], data: bytes, what: str, max_bytes: int) -> R:
    """Verified payload bytes -> a record; :class:`MigrationError` in one line otherwise."""
    try:
        value = records.load_object(data or b"{}", what=what, max_bytes=max_bytes)
        return records.parse(cls, value, what=what)
    except records.UntrustedInput as e:
        raise MigrationError(str(e)) from None


def encode_record(record: object) -> bytes:
    import json

    return json.dumps(records.to_json(record), separators=(",", ":")).encode()


# --- keys ----------------------------------------------------------------------------------------
def session_keys(psk: bytes, nonce_source: bytes, nonce_target: bytes) -> tuple[bytes, bytes]:
    """(K_s2t, K_t2s) for one session (module docstring)."""
    prk = hmac.digest(psk, _LABEL_KEYS + nonce_source + nonce_target, "sha256")
    return hmac.digest(prk, _LABEL_S2T, "sha256"), hmac.digest(prk, _LABEL_T2S, "sha256")


# --- the channel ---------------------------------------------------------------------------------
Buffer = bytes | bytearray | memoryview


class Channel:
    """One migration connection: framing, the MACs and sequence numbers of both directions, and
    deadlines on every read. Which message may come when is the caller's state machine: each read
    names the types (and their size caps) it accepts."""

    def __init__(self, sock: socket.socket, peer: str, *, read_timeout: float) -> None:
        self.sock = sock
        self.peer = peer
        self.read_timeout = read_timeout
        self.bytes_sent = 0
        self._send_mac: Any = None  # a keyed HMAC, copied for each message
        self._recv_mac: Any = None
        self._send_seq = 0
        self._recv_seq = 0
        self._header = b""  # the header of the message being received
        self._deadline = 0.0  # monotonic: the message being received must be complete by then
        self._page_buffer: bytearray | None = None
        sock.settimeout(read_timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    @property
    def authenticated(self) -> bool:
        return self._recv_mac is not None

    def establish(self, send_key: bytes, recv_key: bytes) -> None:
        """From now on every message is authenticated, in both directions."""
        self._send_mac = hmac.new(send_key, digestmod=hashlib.sha256)
        self._recv_mac = hmac.new(recv_key, digestmod=hashlib.sha256)

    # --- sending ---------------------------------------------------------------------------------
    def _mac(self, template: Any, seq: int, parts: Sequence[Buffer]) -> bytes:
        h = template.copy()
        h.update(_SEQ.pack(seq))
        for p in parts:
            h.update(p)
        return h.digest()  # type: ignore[no-any-return]

    def _frame(self, kind: MessageType, parts: list[Buffer], length: int) -> list[Buffer]:
        frame: list[Buffer] = [HEADER.pack(kind.value, 0, length), *parts]
        if self._send_mac is not None:
            frame.append(self._mac(self._send_mac, self._send_seq, frame))
            self._send_seq += 1
        return frame

    def send(self, kind: MessageType, payload: bytes = b"") -> None:
        self._sendall(self._frame(kind, [payload], len(payload)))

    def send_record(self, kind: MessageType, record: object) -> None:
        self.send(kind, encode_record(record))

    def send_pages(self, runs: Sequence[tuple[int, memoryview]]) -> None:
        """One PAGE message carrying ``runs`` of (guest-physical address, page-aligned view), sorted
        and not overlapping. The pages are copied first: the MAC must cover exactly the bytes sent,
        and the guest may write them meanwhile (a page written after the copy is in the dirty log
        and goes again in the next round)."""
        total = sum(len(v) for _, v in runs)
        assert 0 < len(runs) <= MAX_RUNS and 0 < total <= MAX_PAGE_BYTES
        if self._page_buffer is None:
            self._page_buffer = bytearray(MAX_PAGE_BYTES)
        buf = memoryview(self._page_buffer)
        table = bytearray(RUN_TABLE_HEAD.pack(len(runs), 0))
        offset = 0
        for gpa, view in runs:
            table += RUN.pack(gpa, len(view) // PAGE_SIZE, 0)
            buf[offset : offset + len(view)] = view
            offset += len(view)
        self._sendall(self._frame(MessageType.PAGES, [bytes(table), buf[:total]], len(table) + total))

    def _sendall(self, buffers: list[Buffer]) -> None:
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
        except TimeoutError:
            raise MigrationError(f"{self.peer} stopped receiving (timed out)") from None
        except OSError as e:
            raise MigrationError(f"connection to {self.peer} failed while sending: {e.strerror or e}") from None

    # --- receiving -------------------------------------------------------------------------------
    def recv_header(
        self, allowed: Mapping[MessageType, int], *, deadline: float | None = None
    ) -> tuple[MessageType, int]:
        """The next message's type and payload length. ``allowed`` maps every type acceptable at
        this point of the conversation to its size cap: anything else ends the migration before a
        byte of its payload is read. ``deadline`` (monotonic) bounds the whole message, which
        must be complete by then (default: :data:`MESSAGE_TIMEOUT` from now)."""
        self._deadline = time.monotonic() + MESSAGE_TIMEOUT if deadline is None else deadline
        raw = self._recv_exact(HEADER.size, what="a message")
        kind_raw, flags, length = HEADER.unpack(raw)
        expected = " or ".join(k.label for k in allowed)
        try:
            kind = MessageType(kind_raw)
        except ValueError:
            raise MigrationError(
                f"{self.peer} sent an unknown message type {printable(repr(kind_raw), 20)} "
                f"where {expected} was expected"
            ) from None
        if kind not in allowed:
            raise MigrationError(f"{self.peer} sent {kind.label} where {expected} was expected")
        if flags != 0:
            raise MigrationError(f"{self.peer} sent a {kind.label} message with unknown flags {flags:#x}")
        if length > allowed[kind]:
            raise MigrationError(
                f"{self.peer} sent a {length}-byte {kind.label} message; at most {allowed[kind]} bytes are allowed here"
            )
        self._header = raw
        return kind, int(length)

    def recv_payload(self, length: int, what: str = "a message") -> bytes:
        """``length`` bytes of the current message, not yet verified."""
        buf = bytearray(length)
        self._recv_into(memoryview(buf), what)
        return bytes(buf)

    def recv_into(self, view: memoryview, what: str = "a message") -> None:
        self._recv_into(view, what)

    def verify(self, kind: MessageType, *parts: Buffer) -> None:
        """Read the current message's MAC and check it over its header and ``parts`` (the payload,
        in order). Nothing from a message may be used before this returns."""
        if self._recv_mac is None:
            return  # the handshake's unauthenticated messages (HELO; RFSE in reply to it)
        expected = self._mac(self._recv_mac, self._recv_seq, [self._header, *parts])
        got = self._recv_exact(MAC_SIZE, what=f"the MAC of {kind.label}")
        if not hmac.compare_digest(expected, got):
            raise AuthenticationError(
                f"{kind.label} message {self._recv_seq} from {self.peer} failed "
                "authentication: the peer holds another key, or the stream was altered"
            )
        self._recv_seq += 1

    def recv_body(self, kind: MessageType, length: int) -> bytes:
        """The current message's payload, verified."""
        data = self.recv_payload(length, kind.label)
        self.verify(kind, data)
        return data

    def recv_record(self, kind: MessageType, length: int, cls: type[R]) -> R:
        data = self.recv_body(kind, length)
        return parse_record(cls, data, f"{kind.label} from {self.peer}", MAX_DESC)

    def _recv_exact(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf), what)
        return bytes(buf)

    def _recv_into(self, view: memoryview, what: str) -> None:
        got = 0
        try:
            while got < len(view):
                if time.monotonic() > self._deadline:
                    raise ConnectionLost(f"{self.peer} is too slow: {what} did not arrive in time")
                n = self.sock.recv_into(view[got:])
                if n == 0:
                    raise ConnectionLost(f"{self.peer} closed the connection")
                got += n
        except TimeoutError:
            raise ConnectionLost(f"{self.peer} stopped sending (timed out waiting for {what})") from None
        except OSError as e:
            raise ConnectionLost(f"connection to {self.peer} failed: {e.strerror or e}") from None

    def failure(self, kind: MessageType, length: int) -> str:
        """The verified text of an RFSE or ABRT, safe to show."""
        return printable(self.recv_record(kind, length, Failure).error)


# --- the handshake (both sides; pure, so unit tests drive it over a socket pair) -----------------
def source_handshake(ch: Channel, psk: bytes, shape: MachineShape) -> None:
    """HELO, CHAL (the target proves it holds the key), DESC, ACPT. Returns once the target has
    accepted ``shape``; raises :class:`MigrationError` (:class:`AuthenticationError` for a wrong
    key) otherwise. Nothing about the VM is sent before the target has proved it holds the key."""
    nonce = secrets.token_bytes(NONCE_SIZE)
    ch.send(MessageType.HELLO, HELLO.pack(HELLO_MAGIC, PROTOCOL_VERSION, nonce))
    kind, length = ch.recv_header(
        {MessageType.CHALLENGE: NONCE_SIZE, MessageType.REFUSE: MAX_SMALL, MessageType.ABORT: MAX_SMALL}
    )
    if kind is not MessageType.CHALLENGE:
        # before the keys: an older or newer virtkit, or something else; its words are unproven
        data = ch.recv_payload(length, kind.label)
        try:
            text = parse_record(Failure, data, kind.label, MAX_SMALL).error
        except MigrationError:
            text = data.decode("utf-8", errors="replace")
        raise MigrationError(
            f"{ch.peer} refused the migration before authenticating (unauthenticated reply): {printable(text)}"
        )
    if length != NONCE_SIZE:
        raise MigrationError(f"{ch.peer} sent a {length}-byte challenge, expected {NONCE_SIZE}")
    nonce_target = ch.recv_payload(NONCE_SIZE, "the challenge")
    to_target, to_source = session_keys(psk, nonce, nonce_target)
    ch.establish(send_key=to_target, recv_key=to_source)
    try:
        ch.verify(MessageType.CHALLENGE, nonce_target)
    except AuthenticationError:
        raise AuthenticationError(
            f"{ch.peer} did not prove it holds the migration key: give both sides the same key file"
        ) from None
    ch.send_record(MessageType.DESCRIBE, shape)
    kind, length = ch.recv_header(
        {MessageType.ACCEPT: MAX_SMALL, MessageType.REFUSE: MAX_SMALL, MessageType.ABORT: MAX_SMALL}
    )
    if kind is MessageType.ACCEPT:
        ch.recv_record(kind, length, Empty)
        return
    raise MigrationError(f"{ch.peer} refused the migration: {ch.failure(kind, length)}")


def target_handshake(ch: Channel, psk: bytes, *, deadline: float) -> bytes:
    """HELO, CHAL, DESC: the payload of the source's description (parse it with
    :func:`parse_shape`), once its MAC proved the source holds the key. Before that, nothing the
    source sent is used but its nonce, and the peer is told no more than that the version is not
    spoken (it may not be our source at all)."""
    kind, length = ch.recv_header({MessageType.HELLO: MAX_SMALL}, deadline=deadline)
    data = ch.recv_payload(length, "HELO")
    if length != HELLO.size or not data.startswith(HELLO_MAGIC):
        _refuse_unauthenticated(ch, f"this virtkit speaks migration protocol {PROTOCOL_VERSION} only")
        raise MigrationError(
            f"{ch.peer} sent a HELO this virtkit cannot read (an older virtkit speaking "
            f"protocol 1, or not virtkit); it speaks protocol {PROTOCOL_VERSION} only"
        )
    _, version, nonce_source = HELLO.unpack(data)
    if version != PROTOCOL_VERSION:
        _refuse_unauthenticated(ch, f"this virtkit speaks migration protocol {PROTOCOL_VERSION} only")
        raise MigrationError(
            f"{ch.peer} speaks migration protocol {version}; this virtkit speaks {PROTOCOL_VERSION} only"
        )
    nonce = secrets.token_bytes(NONCE_SIZE)
    to_target, to_source = session_keys(psk, nonce_source, nonce)
    ch.establish(send_key=to_source, recv_key=to_target)
    ch.send(MessageType.CHALLENGE, nonce)
    try:
        kind, length = ch.recv_header({MessageType.DESCRIBE: MAX_DESC, MessageType.ABORT: MAX_SMALL}, deadline=deadline)
        if kind is MessageType.ABORT:
            raise MigrationError(f"{ch.peer} aborted the migration: {ch.failure(kind, length)}")
        return ch.recv_body(kind, length)
    except ConnectionLost as e:
        raise ConnectionLost(f"{e} before authenticating (a source holding another key stops here)") from None
    except AuthenticationError:
        raise AuthenticationError(
            f"{ch.peer} did not prove it holds the migration key (its first "
            "message failed authentication): give both sides the same key file"
        ) from None


def parse_shape(data: bytes, peer: str) -> MachineShape:
    """A verified DESC payload -> the source's machine shape, every field typed and bounded."""
    return parse_record(MachineShape, data, f"DESC from {peer}", MAX_DESC)


def _refuse_unauthenticated(ch: Channel, reason: str) -> None:
    with contextlib.suppress(MigrationError):
        ch.send_record(MessageType.REFUSE, Failure(reason))


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6), ``:PORT`` or ``PORT`` into (host, port). An empty
    host is the loopback address, never "any": listening on every interface must be asked for."""
    host, sep, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MigrationError(f"{what} {text!r} is not HOST:PORT (or PORT)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "127.0.0.1", int(port)


def page_runs(pages: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted page addresses into (address, page count) runs of consecutive pages."""
    runs: list[tuple[int, int]] = []
    for p in pages:
        if runs and runs[-1][0] + runs[-1][1] * PAGE_SIZE == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs
