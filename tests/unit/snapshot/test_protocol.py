"""The migration wire format over a socket pair: framing, page runs, and hostile input."""

from __future__ import annotations

import socket
import threading

import pytest

from virtkit.memory import GuestMemory
from virtkit.migration import protocol, target
from virtkit.migration.protocol import Channel, MessageType, MigrationError

MiB = 1 << 20


class FakeMachine:
    def __init__(self) -> None:
        self.memory = GuestMemory([(0, 2 * MiB)])


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    yield Channel(a, "b"), Channel(b, "a")  # each names its peer
    a.close()
    b.close()


def test_page_runs() -> None:
    P = protocol.PAGE_SIZE
    assert protocol.page_runs([]) == []
    assert protocol.page_runs([0, P, 2 * P, 5 * P, 6 * P, 9 * P]) == [(0, 3), (5 * P, 2), (9 * P, 1)]


@pytest.mark.parametrize("text,expected", [("127.0.0.1:80", ("127.0.0.1", 80)), (":0", ("0.0.0.0", 0)),
                                           ("[::1]:9", ("::1", 9))])
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert protocol.parse_address(text) == expected


@pytest.mark.parametrize("text", ["host", "host:", "host:x", "h:70000"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(MigrationError, match="not HOST:PORT"):
        protocol.parse_address(text)


def test_json_messages_and_refusal(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    a.send_json(MessageType.HELLO, {"x": 1})
    assert b.expect(MessageType.HELLO) == (MessageType.HELLO, {"x": 1})
    b.send_json(MessageType.REFUSE, {"error": "no room"})
    with pytest.raises(MigrationError, match="b refused the migration: no room"):
        a.expect(MessageType.ACCEPT)


def test_unexpected_and_unknown_messages(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    a.send_json(MessageType.GO, {})
    with pytest.raises(MigrationError, match="a sent GO!! where ACPT was expected"):
        b.expect(MessageType.ACCEPT)
    a.sock.sendall(protocol.HEADER.pack(b"EVIL", 0, 0))
    with pytest.raises(MigrationError, match="unknown message type"):
        b.recv_header()


@pytest.mark.parametrize("body", [b"[" * 50000, b'{"x": ' + b"[" * 50000 + b"]" * 50000 + b"}", b"\xff", b"[1]"])
def test_a_malformed_control_message_is_a_migration_error(pair: tuple[Channel, Channel], body: bytes) -> None:
    # 50,000 '[' raised RecursionError (not a ValueError) out of recv_json_payload
    a, b = pair
    a.sock.sendall(protocol.HEADER.pack(b"HELO", 0, len(body)) + body)
    with pytest.raises(MigrationError, match="malformed HELO message"):
        b.expect(MessageType.HELLO)


def test_oversized_control_message_is_refused(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    a.sock.sendall(protocol.HEADER.pack(b"HELO", 0, protocol.MAX_CONTROL + 1))
    with pytest.raises(MigrationError, match="byte HELO message"):
        b.expect(MessageType.HELLO)


def test_pages_land_in_guest_memory(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    src, dst = FakeMachine(), FakeMachine()
    src.memory.write(0x3000, b"A" * 4096 + b"B" * 4096)
    src.memory.write(0x10000, b"C" * 4096)
    runs = [(0x3000, src.memory.view(0x3000, 8192)), (0x10000, src.memory.view(0x10000, 4096))]
    t = threading.Thread(target=a.send_pages, args=(runs,))
    t.start()
    kind, length = b.recv_header()
    assert kind is MessageType.PAGES
    assert target._recv_pages(b, dst, length) == 3  # type: ignore[arg-type]
    t.join()
    assert dst.memory.read(0x3000, 8192 + 4096) == src.memory.read(0x3000, 8192 + 4096)
    assert dst.memory.read(0x10000, 4096) == b"C" * 4096
    src.memory.close()
    dst.memory.close()


@pytest.mark.parametrize("gpa,npages", [(2 * MiB, 1), (2 * MiB - 4096, 2), (0x123, 1), (0, 0)])
def test_pages_outside_guest_ram_are_refused(pair: tuple[Channel, Channel], gpa: int, npages: int) -> None:
    a, b = pair
    dst = FakeMachine()
    table = protocol.RUN_TABLE_HEAD.pack(1, 0) + protocol.RUN.pack(gpa, npages, 0)
    a.sock.sendall(protocol.HEADER.pack(b"PAGE", 0, len(table) + npages * 4096) + table)
    kind, length = b.recv_header()
    with pytest.raises(MigrationError, match="outside guest RAM"):
        target._recv_pages(b, dst, length)  # type: ignore[arg-type]
    dst.memory.close()


def test_page_message_length_must_match_its_table(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    dst = FakeMachine()
    table = protocol.RUN_TABLE_HEAD.pack(1, 0) + protocol.RUN.pack(0, 1, 0)
    a.sock.sendall(protocol.HEADER.pack(b"PAGE", 0, len(table) + 100) + table)
    kind, length = b.recv_header()
    with pytest.raises(MigrationError, match="does not match its runs"):
        target._recv_pages(b, dst, length)  # type: ignore[arg-type]
    dst.memory.close()


def test_closed_connection(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    a.sock.close()
    with pytest.raises(MigrationError, match="closed the connection"):
        b.recv_header()
