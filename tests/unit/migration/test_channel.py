"""The channel: framing, a MAC on every message, sequence numbers, size caps, deadlines, and page
runs. Socket pairs, no /dev/kvm."""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
import threading
import time

import pytest
from mighelp import KEY, FakeLanding, MiB, Tap, channel_pair, established_pair

from virtkit.migration import protocol, target
from virtkit.migration.protocol import (
    HEADER,
    MAC_SIZE,
    AuthenticationError,
    Channel,
    Empty,
    Failure,
    MessageType,
    MigrationError,
    RoundEnd,
)

SMALL = {MessageType.ROUND: protocol.MAX_SMALL, MessageType.ABORT: protocol.MAX_SMALL}


def raw_message(ch: Channel) -> bytes:
    """Everything on the wire for one message: header, payload, MAC."""
    head = ch.sock.recv(HEADER.size, socket.MSG_WAITALL)
    _, _, length = HEADER.unpack(head)
    return head + ch.sock.recv(length + MAC_SIZE, socket.MSG_WAITALL)


def test_page_runs() -> None:
    P = protocol.PAGE_SIZE
    assert protocol.page_runs([]) == []
    assert protocol.page_runs([0, P, 2 * P, 5 * P, 6 * P, 9 * P]) == [(0, 3), (5 * P, 2), (9 * P, 1)]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:9", ("::1", 9)),
        ("0.0.0.0:7000", ("0.0.0.0", 7000)),
        # no host: loopback, never every interface
        (":0", ("127.0.0.1", 0)),
        ("7000", ("127.0.0.1", 7000)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert protocol.parse_address(text) == expected


@pytest.mark.parametrize("text", ["host", "host:", "host:x", "h:70000", ""])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(MigrationError, match="not HOST:PORT"):
        protocol.parse_address(text)


def test_every_message_carries_the_mac_of_its_sequence_number_header_and_payload() -> None:
    src, dst = established_pair()
    s2t, _ = protocol.session_keys(KEY, b"s" * 32, b"t" * 32)
    for seq in range(3):
        src.send_record(MessageType.ROUND, RoundEnd(round=seq, pages=7))
        wire = raw_message(dst)
        body, mac = wire[:-MAC_SIZE], wire[-MAC_SIZE:]
        assert mac == hmac.digest(s2t, struct.pack("<Q", seq) + body, hashlib.sha256)
    src.close()
    dst.close()


def test_records_round_trip_and_are_typed() -> None:
    src, dst = established_pair()
    src.send_record(MessageType.ROUND, RoundEnd(round=0, pages=5))
    kind, length = dst.recv_header(SMALL)
    assert dst.recv_record(kind, length, RoundEnd) == RoundEnd(round=0, pages=5)
    src.send(MessageType.ROUND, b'{"round": 1, "pages": "many"}')
    kind, length = dst.recv_header(SMALL)
    with pytest.raises(MigrationError, match="ROND from source.pages must be an integer"):
        dst.recv_record(kind, length, RoundEnd)
    src.close()
    dst.close()


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def test_a_flipped_bit_anywhere_in_a_message_is_refused() -> None:
    """Every byte of a message, header, payload and MAC, is covered: flip any one and the
    receiver refuses it (the type and flags by their checks, everything else by the MAC)."""
    src, probe = established_pair()
    src.send_record(MessageType.ROUND, RoundEnd(round=0, pages=3))
    wire = raw_message(probe)
    src.close()
    probe.close()
    length_field = range(8, 16)  # a changed length makes the receiver read a different frame: tested below
    for at in (i for i in range(len(wire)) if i not in length_field):
        sender, receiver = established_pair()
        sender.sock.sendall(_flip(wire, at))
        with pytest.raises(MigrationError):
            kind, length = receiver.recv_header(SMALL)
            receiver.recv_record(kind, length, RoundEnd)
        sender.close()
        receiver.close()


@pytest.mark.parametrize("delta", [-1, +1])
def test_a_changed_length_is_refused(delta: int) -> None:
    src, probe = established_pair()
    src.send_record(MessageType.ROUND, RoundEnd(round=0, pages=3))
    wire = bytearray(raw_message(probe))
    struct.pack_into("<Q", wire, 8, HEADER.unpack_from(wire)[2] + delta)
    sender, receiver = established_pair()
    sender.sock.sendall(bytes(wire) + b"\0" * 64)  # enough bytes that a longer read completes
    kind, length = receiver.recv_header(SMALL)
    with pytest.raises(AuthenticationError, match="failed authentication"):
        receiver.recv_record(kind, length, RoundEnd)
    for ch in (src, probe, sender, receiver):
        ch.close()


def _messages(stream: bytes) -> list[bytes]:
    out = []
    while stream:
        _, _, length = HEADER.unpack_from(stream)
        n = HEADER.size + length + MAC_SIZE
        out.append(stream[:n])
        stream = stream[n:]
    return out


@pytest.mark.parametrize("reshuffle", ["swap", "drop", "repeat", "from-another-session"])
def test_reordered_dropped_repeated_or_spliced_messages_are_refused(reshuffle: str) -> None:
    src, probe = established_pair()
    for i in range(3):
        src.send_record(MessageType.ROUND, RoundEnd(round=i, pages=i))
    m = _messages(b"".join(raw_message(probe) for _ in range(3)))
    if reshuffle == "from-another-session":
        other, other_probe = channel_pair()
        s2t, t2s = protocol.session_keys(KEY, b"S" * 32, b"T" * 32)  # same key, other nonces
        other.establish(send_key=s2t, recv_key=t2s)
        other.send_record(MessageType.ROUND, RoundEnd(round=1, pages=1))
        m[1] = raw_message(other_probe)
        other.close()
        other_probe.close()
    stream = {
        "swap": [m[0], m[2], m[1]],
        "drop": [m[0], m[2]],
        "repeat": [m[0], m[0], m[1]],
        "from-another-session": m,
    }[reshuffle]
    sender, receiver = established_pair()
    sender.sock.sendall(b"".join(stream))
    kind, length = receiver.recv_header(SMALL)
    assert receiver.recv_record(kind, length, RoundEnd).round == 0  # the first one is in place
    kind, length = receiver.recv_header(SMALL)
    with pytest.raises(AuthenticationError, match="ROND message 1 from source failed authentication"):
        receiver.recv_record(kind, length, RoundEnd)
    for ch in (src, probe, sender, receiver):
        ch.close()


def test_a_message_cannot_be_reflected_to_its_sender() -> None:
    """One key per direction: what the target sent, sent back to it, does not verify."""
    src, dst = established_pair()
    dst.send_record(MessageType.ABORT, Failure("x"))
    wire = raw_message(src)
    src.sock.sendall(wire)
    kind, length = dst.recv_header(SMALL)
    with pytest.raises(AuthenticationError):
        dst.recv_record(kind, length, Failure)
    src.close()
    dst.close()


def test_a_cut_stream_ends_the_migration() -> None:
    src, dst = established_pair()
    src.send_record(MessageType.ROUND, RoundEnd(round=0, pages=1))
    wire = raw_message(dst)
    for cut in (5, HEADER.size + 3, len(wire) - 1):
        sender, receiver = established_pair()
        sender.sock.sendall(wire[:cut])
        sender.sock.shutdown(socket.SHUT_WR)
        with pytest.raises(MigrationError, match="closed the connection"):
            kind, length = receiver.recv_header(SMALL)
            receiver.recv_record(kind, length, RoundEnd)
        sender.close()
        receiver.close()
    src.close()
    dst.close()


def test_types_not_allowed_here_are_refused_before_their_payload_is_read() -> None:
    src, dst = established_pair()
    src.sock.sendall(HEADER.pack(b"GO!!", 0, 1 << 40))  # a huge length: must not be waited for
    with pytest.raises(MigrationError, match="sent GO!! where ROND or ABRT was expected"):
        dst.recv_header(SMALL)
    src.sock.sendall(HEADER.pack(b"EVIL", 0, 0))
    with pytest.raises(MigrationError, match="unknown message type"):
        dst.recv_header(SMALL)
    src.sock.sendall(HEADER.pack(b"ROND", 1, 0))
    with pytest.raises(MigrationError, match="unknown flags"):
        dst.recv_header(SMALL)
    src.close()
    dst.close()


def test_oversized_messages_are_refused_before_allocation() -> None:
    src, dst = established_pair()
    src.sock.sendall(HEADER.pack(b"ROND", 0, protocol.MAX_SMALL + 1))
    with pytest.raises(MigrationError, match=f"sent a {protocol.MAX_SMALL + 1}-byte ROND message"):
        dst.recv_header(SMALL)
    src.close()
    dst.close()


@pytest.mark.parametrize(
    "payload,match",
    [
        (b"[" * 60_000, "nested more than"),  # was a RecursionError traceback before records
        (b'{"a":' * 40 + b"1" + b"}" * 40, "nested more than"),
        (b'{"round": 0, "pages": NaN}', "not a JSON number|not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b'{"round": 0, "pages": 1, "path": "/dev/sda"}', "unknown field 'path'"),
    ],
)
def test_hostile_json_is_refused_in_one_line(payload: bytes, match: str) -> None:
    src, dst = established_pair()
    caps = {MessageType.ROUND: 1 << 20}
    t = threading.Thread(target=src.send, args=(MessageType.ROUND, payload))
    t.start()
    kind, length = dst.recv_header(caps)
    with pytest.raises(MigrationError, match=match) as e:
        dst.recv_record(kind, length, RoundEnd)
    assert "\n" not in str(e.value)
    t.join()
    src.close()
    dst.close()


def test_json_is_verified_before_it_is_parsed() -> None:
    """A payload that would fail parsing but whose MAC fails first is reported as unauthenticated:
    the parser never sees bytes the peer did not vouch for."""
    src, probe = established_pair()
    src.send(MessageType.ROUND, b"[" * 1000)
    wire = raw_message(probe)
    sender, receiver = established_pair()
    sender.sock.sendall(_flip(wire, len(wire) - 1))
    kind, length = receiver.recv_header({MessageType.ROUND: 4096})
    with pytest.raises(AuthenticationError):
        receiver.recv_record(kind, length, RoundEnd)
    for ch in (src, probe, sender, receiver):
        ch.close()


def test_a_peer_trickling_bytes_is_cut_off_at_the_deadline() -> None:
    src, dst = established_pair()
    wire_src, wire_dst = established_pair()
    wire_src.send_record(MessageType.ROUND, RoundEnd(round=0, pages=1))
    wire = raw_message(wire_dst)

    def trickle() -> None:
        for b in wire:
            try:
                src.sock.sendall(bytes([b]))
            except OSError:
                return
            time.sleep(0.05)

    t = threading.Thread(target=trickle)
    t.start()
    with pytest.raises(MigrationError, match="too slow"):
        kind, length = dst.recv_header(SMALL, deadline=time.monotonic() + 0.3)
        dst.recv_record(kind, length, RoundEnd)
    dst.close()
    t.join()
    for ch in (src, wire_src, wire_dst):
        ch.close()


def test_a_silent_peer_times_out() -> None:
    a, b = socket.socketpair()
    ch = Channel(a, "source", read_timeout=0.2)
    with pytest.raises(MigrationError, match="stopped sending"):
        ch.recv_header(SMALL)
    ch.close()
    b.close()


def test_error_texts_from_the_peer_are_shown_safely() -> None:
    src, dst = established_pair()
    src.send_record(MessageType.ABORT, Failure("line one\nline two\x1b[31m" + "x" * 900))
    kind, length = dst.recv_header(SMALL)
    text = dst.failure(kind, length)
    assert "\n" not in text and "\x1b" not in text and len(text) <= protocol.MAX_SHOWN + 3
    src.close()
    dst.close()


# --- pages --------------------------------------------------------------------------------------
def _send_pages(src: Channel, runs: list[tuple[int, memoryview]]) -> threading.Thread:
    t = threading.Thread(target=src.send_pages, args=(runs,))
    t.start()
    return t


def test_pages_land_in_guest_memory(landing: FakeLanding) -> None:
    src_mem = FakeLanding()
    src, dst = established_pair()
    src_mem.memory.write(0x3000, b"A" * 4096 + b"B" * 4096)
    src_mem.memory.write(0x10000, b"C" * 4096)
    t = _send_pages(
        src, [(0x3000, src_mem.memory.read_view(0x3000, 8192)), (0x10000, src_mem.memory.read_view(0x10000, 4096))]
    )
    kind, length = dst.recv_header({MessageType.PAGES: protocol.MAX_PAGE_MESSAGE})
    assert target.recv_pages(dst, landing.memory, length) == 3
    t.join()
    assert landing.memory.read(0x3000, 8192) == src_mem.memory.read(0x3000, 8192)
    assert landing.memory.read(0x10000, 4096) == b"C" * 4096
    src_mem.memory.close()
    src.close()
    dst.close()


def test_page_data_is_authenticated(landing: FakeLanding) -> None:
    src_mem = FakeLanding()
    src_mem.memory.write(0x5000, b"D" * 4096)
    src, probe = established_pair()
    t = _send_pages(src, [(0x5000, src_mem.memory.read_view(0x5000, 4096))])
    wire = raw_message(probe)
    t.join()
    sender, receiver = established_pair()
    sender.sock.sendall(_flip(wire, HEADER.size + 24 + 100))  # a byte of the page data
    kind, length = receiver.recv_header({MessageType.PAGES: protocol.MAX_PAGE_MESSAGE})
    with pytest.raises(AuthenticationError):
        target.recv_pages(receiver, landing.memory, length)
    for ch in (src, probe, sender, receiver):
        ch.close()
    src_mem.memory.close()


def test_the_sender_authenticates_what_it_sends_not_what_the_guest_writes_meanwhile(landing: FakeLanding) -> None:
    """The guest keeps running during pre-copy: the MAC covers a copy of the pages, so a guest
    writing them while they are hashed and sent cannot make the receiver refuse a good stream."""
    import ctypes

    src_mem = FakeLanding()
    src, dst = established_pair()
    stop = threading.Event()
    size = 64 * 4096
    memset = ctypes.CDLL(None).memset  # a ctypes call runs without the GIL, as a vCPU does
    memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)

    def guest() -> None:
        n = 0
        while not stop.is_set():
            memset(src_mem.memory.regions[0].host_addr, n & 0xFF, size)
            n += 1

    writer = threading.Thread(target=guest)
    writer.start()
    sender = threading.Thread(
        target=lambda: [src.send_pages([(0, src_mem.memory.read_view(0, size))]) for _ in range(100)]
    )
    sender.start()
    try:
        for _ in range(100):
            kind, length = dst.recv_header({MessageType.PAGES: protocol.MAX_PAGE_MESSAGE})
            assert target.recv_pages(dst, landing.memory, length) == 64  # each one verifies
    finally:
        stop.set()
        writer.join()
        sender.join()
    src.close()
    dst.close()
    src_mem.memory.close()


def _page_message(runs: list[tuple[int, int]], data_pages: int | None = None, reserved: int = 0) -> bytes:
    table = protocol.RUN_TABLE_HEAD.pack(len(runs), 0) + b"".join(protocol.RUN.pack(g, n, reserved) for g, n in runs)
    pages = sum(n for _, n in runs) if data_pages is None else data_pages
    return table + b"P" * (pages * 4096)


@pytest.mark.parametrize(
    "runs,match",
    [
        ([(2 * MiB, 1)], "outside guest RAM"),
        ([(2 * MiB - 4096, 2)], "outside guest RAM"),
        ([(0x123, 1)], "outside guest RAM"),
        ([(0, 0)], "outside guest RAM"),
        ([(1 << 63, 1)], "outside guest RAM"),
        ([(0x2000, 1), (0x1000, 1)], "overlap or are out of order"),
        ([(0x1000, 2), (0x2000, 1)], "overlap or are out of order"),
    ],
)
def test_page_runs_are_checked_before_any_data_lands(
    landing: FakeLanding, runs: list[tuple[int, int]], match: str
) -> None:
    src, dst = established_pair()
    body = _page_message(runs, data_pages=0)
    src.sock.sendall(HEADER.pack(b"PAGE", 0, len(body) + 4096) + body)
    kind, length = dst.recv_header({MessageType.PAGES: protocol.MAX_PAGE_MESSAGE})
    with pytest.raises(MigrationError, match=match):
        target.recv_pages(dst, landing.memory, length)
    assert landing.memory.read(0, 2 * MiB) == bytes(2 * MiB)  # nothing landed
    src.close()
    dst.close()


@pytest.mark.parametrize("nruns,match", [(0, "0 runs"), (protocol.MAX_RUNS + 1, f"{protocol.MAX_RUNS + 1} runs")])
def test_run_count_is_bounded(landing: FakeLanding, nruns: int, match: str) -> None:
    src, dst = established_pair()
    body = protocol.RUN_TABLE_HEAD.pack(nruns, 0)
    src.sock.sendall(HEADER.pack(b"PAGE", 0, len(body) + nruns * protocol.RUN.size) + body)
    kind, length = dst.recv_header({MessageType.PAGES: protocol.MAX_PAGE_MESSAGE})
    with pytest.raises(MigrationError, match=match):
        target.recv_pages(dst, landing.memory, length)
    src.close()
    dst.close()


def test_page_message_length_must_match_its_table(landing: FakeLanding) -> None:
    src, dst = established_pair()
    body = _page_message([(0, 1)], data_pages=0)
    src.sock.sendall(HEADER.pack(b"PAGE", 0, len(body) + 100) + body)
    kind, length = dst.recv_header({MessageType.PAGES: protocol.MAX_PAGE_MESSAGE})
    with pytest.raises(MigrationError, match="does not match its runs"):
        target.recv_pages(dst, landing.memory, length)
    src.close()
    dst.close()


def test_a_page_message_larger_than_its_cap_is_refused() -> None:
    src, dst = established_pair()
    src.sock.sendall(HEADER.pack(b"PAGE", 0, protocol.MAX_PAGE_MESSAGE + 1))
    with pytest.raises(MigrationError, match="PAGE message; at most"):
        dst.recv_header({MessageType.PAGES: protocol.MAX_PAGE_MESSAGE})
    src.close()
    dst.close()


def test_empty_records_refuse_content() -> None:
    src, dst = established_pair()
    src.send(MessageType.ROUND, b'{"surprise": 1}')
    kind, length = dst.recv_header(SMALL)
    with pytest.raises(MigrationError, match="unknown field 'surprise'"):
        dst.recv_record(kind, length, Empty)
    src.close()
    dst.close()


def test_tap_relays_both_ways(tap: Tap) -> None:
    """The helper the handshake tests rely on."""
    tap.source.send(MessageType.ROUND, b"x")
    kind, length = tap.target.recv_header({MessageType.ROUND: 10})
    assert tap.target.recv_payload(length) == b"x"
    assert bytes(tap.sent).endswith(b"x")
