"""The target's state machine (virtkit.migration.target.serve) against a source that holds the key
and says whatever it likes: each message type only where the protocol allows it, the VM started
only after an authenticated GO!! that follows a STAT, nothing applied from unverified bytes."""

from __future__ import annotations

import dataclasses
import socket

import pytest
from mighelp import KEY, SHAPE, FakeLanding, Served, channel_pair

from virtkit.migration import protocol
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
    Running,
)

STATE = b"VKSNAP-state-bytes"


def start(landing: FakeLanding) -> tuple[Channel, Served]:
    """A source channel past the handshake (ACPT read), and the target serving it."""
    src, dst = channel_pair()
    served = Served(dst, landing)
    protocol.source_handshake(src, KEY, SHAPE)
    return src, served


def reply(src: Channel, *kinds: MessageType) -> MessageType:
    kind, length = src.recv_header({k: protocol.MAX_SMALL for k in kinds})
    src.recv_body(kind, length)
    return kind


def one_page(src: Channel, gpa: int = 0x1000, byte: bytes = b"Z") -> None:
    data = bytearray(byte * 4096)
    src.send_pages([(gpa, memoryview(data))])


def finish(src: Channel, served: Served) -> BaseException | None:
    src.close()
    return served.join()


def test_a_complete_migration(landing: FakeLanding) -> None:
    src, served = start(landing)
    one_page(src)
    src.send_record(MessageType.ROUND, RoundEnd(round=0, pages=1))
    one_page(src, 0x2000, b"Y")
    src.send(MessageType.STATE, STATE)
    assert reply(src, MessageType.READY) is MessageType.READY
    assert landing.applied == [STATE] and landing.started == 0  # applied, nothing runs yet
    src.send_record(MessageType.GO, Empty())
    kind, length = src.recv_header({MessageType.RUNNING: protocol.MAX_SMALL})
    assert src.recv_record(kind, length, Running).started_ns > 0
    assert finish(src, served) is None
    assert landing.started == 1 and served.result is not None and served.result["pages"] == 2
    assert landing.memory.read(0x1000, 4096) == b"Z" * 4096
    assert landing.memory.read(0x2000, 4096) == b"Y" * 4096


def test_go_before_state_is_refused_and_nothing_runs(landing: FakeLanding) -> None:
    src, served = start(landing)
    one_page(src)
    src.send_record(MessageType.GO, Empty())
    assert reply(src, MessageType.ABORT) is MessageType.ABORT  # the source is told why
    error = finish(src, served)
    assert isinstance(error, MigrationError)
    assert "sent GO!! where PAGE or ROND or STAT or ABRT was expected" in str(error)
    assert landing.started == 0 and landing.applied == []


def test_a_second_state_is_refused(landing: FakeLanding) -> None:
    src, served = start(landing)
    src.send(MessageType.STATE, STATE)
    reply(src, MessageType.READY)
    src.send(MessageType.STATE, b"another machine")
    error = finish(src, served)
    assert isinstance(error, MigrationError) and "sent STAT where GO!! or ABRT was expected" in str(error)
    assert landing.started == 0 and landing.applied == [STATE]


def test_pages_after_the_state_are_refused(landing: FakeLanding) -> None:
    src, served = start(landing)
    src.send(MessageType.STATE, STATE)
    reply(src, MessageType.READY)
    one_page(src)
    error = finish(src, served)
    assert isinstance(error, MigrationError) and "sent PAGE where GO!! or ABRT was expected" in str(error)
    assert landing.started == 0


MEMORY_PHASE = {MessageType.PAGES, MessageType.ROUND, MessageType.STATE, MessageType.ABORT}


@pytest.mark.parametrize("kind", [k for k in MessageType if k not in MEMORY_PHASE])
def test_every_type_out_of_place_in_the_memory_phase_is_refused(landing: FakeLanding, kind: MessageType) -> None:
    src, served = start(landing)
    src.send(kind, b"{}")
    error = finish(src, served)
    assert isinstance(error, MigrationError)
    assert f"sent {kind.label} where PAGE or ROND or STAT or ABRT was expected" in str(error)
    assert landing.started == 0 and landing.applied == []


@pytest.mark.parametrize("kind", [k for k in MessageType if k not in (MessageType.GO, MessageType.ABORT)])
def test_every_type_out_of_place_at_the_switchover_is_refused(landing: FakeLanding, kind: MessageType) -> None:
    src, served = start(landing)
    src.send(MessageType.STATE, STATE)
    reply(src, MessageType.READY)
    src.send(kind, b"{}")
    error = finish(src, served)
    assert isinstance(error, MigrationError) and f"sent {kind.label} where GO!! or ABRT was expected" in str(error)
    assert landing.started == 0


def test_an_unverified_go_starts_nothing(landing: FakeLanding) -> None:
    src, served = start(landing)
    src.send(MessageType.STATE, STATE)
    reply(src, MessageType.READY)
    src.sock.sendall(HEADER.pack(b"GO!!", 0, 2) + b"{}" + bytes(MAC_SIZE))  # not signed with the key
    error = finish(src, served)
    assert isinstance(error, AuthenticationError) and landing.started == 0


def test_an_unverified_state_is_not_applied(landing: FakeLanding) -> None:
    src, served = start(landing)
    src.sock.sendall(HEADER.pack(b"STAT", 0, len(STATE)) + STATE + bytes(MAC_SIZE))
    error = finish(src, served)
    assert isinstance(error, AuthenticationError) and landing.applied == [] and landing.started == 0


def test_a_stream_cut_before_go_starts_nothing(landing: FakeLanding) -> None:
    src, served = start(landing)
    one_page(src)
    src.send(MessageType.STATE, STATE)
    reply(src, MessageType.READY)
    src.sock.shutdown(socket.SHUT_WR)  # truncated right before GO!!
    error = finish(src, served)
    assert isinstance(error, MigrationError) and "closed the connection" in str(error)
    assert landing.started == 0


def test_an_abort_from_the_source_ends_it(landing: FakeLanding) -> None:
    src, served = start(landing)
    src.send_record(MessageType.ABORT, Failure("changed my mind"))
    error = finish(src, served)
    assert isinstance(error, MigrationError) and "aborted the migration: changed my mind" in str(error)
    assert landing.started == 0


def test_rounds_must_come_in_order(landing: FakeLanding) -> None:
    src, served = start(landing)
    src.send_record(MessageType.ROUND, RoundEnd(round=0, pages=0))
    src.send_record(MessageType.ROUND, RoundEnd(round=5, pages=0))
    error = finish(src, served)
    assert isinstance(error, MigrationError) and "ended round 5 where round 1 was expected" in str(error)


def test_a_state_larger_than_its_cap_is_refused_before_it_is_read(landing: FakeLanding) -> None:
    src, served = start(landing)
    cap = protocol.state_cap(1)
    src.sock.sendall(HEADER.pack(b"STAT", 0, cap + 1))
    error = finish(src, served)
    assert isinstance(error, MigrationError) and f"{cap + 1}-byte STAT message" in str(error)
    assert landing.applied == []


def test_a_shape_that_differs_is_refused_naming_the_field(landing: FakeLanding) -> None:
    src, dst = channel_pair()
    served = Served(dst, landing)
    with pytest.raises(MigrationError, match="refused the migration: vcpus: the VM has 2 vCPUs"):
        protocol.source_handshake(src, KEY, dataclasses.replace(SHAPE, vcpus=2))
    error = finish(src, served)
    assert isinstance(error, MigrationError) and "vcpus: the VM has 2 vCPUs" in str(error)
    assert landing.started == 0 and landing.applied == []


def test_a_state_the_landing_rejects_is_reported_to_the_source(landing: FakeLanding) -> None:
    def bad_state(data: bytes, peer: str) -> None:
        raise MigrationError("the migration state is corrupted: checksum mismatch")

    landing.apply_state = bad_state  # type: ignore[method-assign]
    src, served = start(landing)
    src.send(MessageType.STATE, STATE)
    kind, length = src.recv_header({MessageType.ABORT: protocol.MAX_SMALL})
    assert "checksum mismatch" in src.failure(kind, length)
    error = finish(src, served)
    assert isinstance(error, MigrationError) and landing.started == 0


def test_a_wrong_key_starts_nothing_and_tells_nothing(landing: FakeLanding) -> None:
    src, dst = channel_pair()
    served = Served(dst, landing, key=b"k" * 32)
    with pytest.raises(AuthenticationError):
        protocol.source_handshake(src, KEY, SHAPE)
    error = finish(src, served)
    assert isinstance(error, MigrationError) and "handshake failed" in str(error)
    assert landing.started == 0 and landing.memory.read(0, 1 << 20) == bytes(1 << 20)


def test_receive_needs_a_key() -> None:
    from virtkit.migration.target import receive

    a, b = socket.socketpair()
    with pytest.raises(MigrationError, match="needs the pre-shared key"):
        receive(a, object(), b"")  # type: ignore[arg-type]
    a.close()
    b.close()


def test_errors_that_quote_the_peer_stay_on_one_line(landing: FakeLanding) -> None:
    def quoting(data: bytes, peer: str) -> None:  # as a state check naming a field the peer chose
        raise MigrationError("snapshot field devices.evil\nvirtkit: error: forged line\x1b[2J is not an object")

    landing.apply_state = quoting  # type: ignore[method-assign]
    src, served = start(landing)
    src.send(MessageType.STATE, STATE)
    kind, length = src.recv_header({MessageType.ABORT: protocol.MAX_SMALL})
    told = src.failure(kind, length)
    error = finish(src, served)
    assert isinstance(error, MigrationError)
    for text in (str(error), told):
        assert "\n" not in text and "\x1b" not in text and "forged line" in text
