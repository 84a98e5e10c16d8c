"""The handshake: both sides prove they hold the key with fresh nonces before anything about the VM
moves; a wrong key, an old or foreign peer, a replayed or altered handshake all end it."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest
from mighelp import KEY, OTHER_KEY, SHAPE, Tap, channel_pair

from virtkit.migration import protocol
from virtkit.migration.protocol import (
    HEADER,
    AuthenticationError,
    Channel,
    Empty,
    Failure,
    MachineShape,
    MessageType,
    MigrationError,
)


class Target:
    """target_handshake in a thread, answering ACPT (or RFSE) as serve() would."""

    def __init__(self, ch: Channel, key: bytes = KEY, refuse: str | None = None, deadline: float = 5.0) -> None:
        self.shape: MachineShape | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                data = protocol.target_handshake(ch, key, deadline=time.monotonic() + deadline)
                self.shape = protocol.parse_shape(data, ch.peer)
                if refuse:
                    ch.send_record(MessageType.REFUSE, Failure(refuse))
                else:
                    ch.send_record(MessageType.ACCEPT, Empty())
            except BaseException as e:  # noqa: BLE001 - handed to the test
                self.error = e
                ch.close()  # as receive() does: the source sees the connection end

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


def test_both_sides_agree_and_the_target_gets_the_shape(tap: Tap) -> None:
    t = Target(tap.target)
    protocol.source_handshake(tap.source, KEY, SHAPE)
    t.join()
    assert t.error is None and t.shape == SHAPE
    # the description names no file: the target attaches what its own command line names
    hello = HEADER.size + protocol.HELLO.size
    kind, _, length = HEADER.unpack_from(tap.sent, hello)
    assert kind == b"DESC"
    desc = json.loads(tap.sent[hello + HEADER.size : hello + HEADER.size + length])
    assert set(desc) == {"memory", "vcpus", "mode", "strict", "disks", "regions", "devices", "cpuid"}
    assert all(set(d) == {"read_only", "size"} for d in desc["disks"])


def test_a_source_with_another_key_learns_it_before_sending_anything_about_the_vm(tap: Tap) -> None:
    t = Target(tap.target, key=OTHER_KEY)
    with pytest.raises(AuthenticationError, match="did not prove it holds the migration key"):
        protocol.source_handshake(tap.source, KEY, SHAPE)
    tap.source.close()  # what the source does next: it walks away
    t.join()
    assert isinstance(t.error, MigrationError) and "before authenticating" in str(t.error)
    assert t.shape is None
    assert len(tap.sent) == HEADER.size + protocol.HELLO.size  # HELO only: the VM's description never left


def test_a_target_refuses_a_source_that_cannot_authenticate_its_description(tap: Tap) -> None:
    """A source that ignores the target's challenge (or holds another key and tries anyway) gets
    no further than its first authenticated message."""
    t = Target(tap.target)
    src = tap.source
    src.send(MessageType.HELLO, protocol.HELLO.pack(protocol.HELLO_MAGIC, protocol.PROTOCOL_VERSION, b"n" * 32))
    kind, length = src.recv_header({MessageType.CHALLENGE: 32})
    nonce_t = src.recv_payload(length)
    to_target, to_source = protocol.session_keys(OTHER_KEY, b"n" * 32, nonce_t)
    src.establish(send_key=to_target, recv_key=to_source)
    src._recv_exact(protocol.MAC_SIZE, "MAC")  # skip the challenge's MAC, it would not verify
    src.send_record(MessageType.DESCRIBE, SHAPE)
    t.join()
    assert isinstance(t.error, AuthenticationError)
    assert "did not prove it holds the migration key" in str(t.error) and t.shape is None


def test_a_recorded_source_stream_cannot_be_replayed() -> None:
    """Everything a real source sent in one session, replayed byte for byte to a target: the target's
    fresh nonce makes the recorded DESC's MAC worthless."""
    first = Tap()
    t = Target(first.target)
    protocol.source_handshake(first.source, KEY, SHAPE)
    t.join()
    recording = bytes(first.sent)
    first.close()
    attacker, victim = channel_pair()
    t = Target(victim)
    attacker.sock.sendall(recording)
    t.join()
    assert isinstance(t.error, AuthenticationError) and t.shape is None
    attacker.close()
    victim.close()


def test_a_recorded_target_stream_cannot_be_replayed_to_a_source() -> None:
    """A fake target replaying a real target's challenge and acceptance: the source's fresh nonce
    makes the recorded challenge's MAC worthless, so the source sends nothing about its VM."""
    first = Tap()
    t = Target(first.target)
    protocol.source_handshake(first.source, KEY, SHAPE)
    t.join()
    recording = bytes(first.replied)
    first.close()
    victim, impostor = channel_pair()

    def play() -> None:
        impostor.sock.recv(1024)  # the victim's HELO, with its own fresh nonce
        impostor.sock.sendall(recording)

    p = threading.Thread(target=play)
    p.start()
    with pytest.raises(AuthenticationError, match="did not prove it holds the migration key"):
        protocol.source_handshake(victim, KEY, SHAPE)
    p.join()
    victim.close()
    impostor.close()


def test_an_old_or_foreign_hello_is_refused_without_authentication(tap: Tap) -> None:
    t = Target(tap.target)
    # a protocol-1 source opened with its machine description, disk paths included
    tap.source.send(MessageType.HELLO, b'{"protocol": 1, "machine": {"disks": [{"path": "/dev/sda"}]}}')
    kind, length = tap.source.recv_header({MessageType.REFUSE: 4096})
    assert b"speaks migration protocol 2 only" in tap.source.recv_payload(length)
    t.join()
    assert isinstance(t.error, MigrationError) and "cannot read" in str(t.error)


def test_another_version_is_refused_and_the_source_says_the_reply_is_unauthenticated(tap: Tap) -> None:
    def target() -> None:
        ch = tap.target
        kind, length = ch.recv_header({MessageType.HELLO: 4096})
        ch.recv_payload(length)
        ch.send_record(MessageType.REFUSE, Failure("I speak\nversion 9"))

    th = threading.Thread(target=target)
    th.start()
    with pytest.raises(MigrationError, match=r"before authenticating \(unauthenticated reply\): I speak\?version 9"):
        protocol.source_handshake(tap.source, KEY, SHAPE)
    th.join()


def test_the_target_refuses_a_newer_version(tap: Tap) -> None:
    t = Target(tap.target)
    tap.source.send(MessageType.HELLO, protocol.HELLO.pack(protocol.HELLO_MAGIC, 3, b"n" * 32))
    t.join()
    assert isinstance(t.error, MigrationError) and "speaks migration protocol 3" in str(t.error)


def test_a_refusal_after_authentication_is_reported_by_the_source(tap: Tap) -> None:
    t = Target(tap.target, refuse="memory: the VM has 2 MiB, this receiver 4 MiB")
    with pytest.raises(MigrationError, match="target refused the migration: memory: the VM has 2 MiB"):
        protocol.source_handshake(tap.source, KEY, SHAPE)
    t.join()


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("cpuid", ((0, 0, 0, 1 << 40, 0, 0, 0),), "cpuid[0][3] is 1099511627776, more than"),
        ("regions", ((0, 0),), "regions[0][1] is 0, less than 1"),
        ("devices", ("",), "devices[0] '' does not match"),
        ("devices", ("uart0\nvirtkit: error: forged",), "does not match"),
        ("devices", ("\u00e9" * 64,), "does not match"),
    ],
)
def test_a_description_out_of_bounds_is_refused(tap: Tap, field: str, value: object, match: str) -> None:
    t = Target(tap.target)
    bad = dataclasses.replace(SHAPE, **{field: value})
    with pytest.raises(MigrationError):
        protocol.source_handshake(tap.source, KEY, bad)
    t.join()
    assert isinstance(t.error, MigrationError) and match in str(t.error)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: {**d, "disks": [{"read_only": False, "size": 1 << 20, "path": "/dev/sda"}]}, "unknown field 'path'"),
        (lambda d: {**d, "memory": 1 << 60}, "memory is 1152921504606846976, more than"),
        (lambda d: {**d, "vcpus": 0}, "vcpus is 0, less than"),
        (lambda d: {**d, "mode": "container"}, "mode must be one of"),
        (lambda d: {k: v for k, v in d.items() if k != "memory"}, "memory is missing"),
        (lambda d: {**d, "disks": [{"read_only": False, "size": 1}] * 17}, "disks is longer than 16"),
    ],
)
def test_a_hostile_description_from_a_key_holder_is_refused_naming_the_field(
    tap: Tap, edit: object, match: str
) -> None:
    import json

    from virtkit import records

    t = Target(tap.target)
    src = tap.source
    nonce = b"n" * 32
    src.send(MessageType.HELLO, protocol.HELLO.pack(protocol.HELLO_MAGIC, protocol.PROTOCOL_VERSION, nonce))
    kind, length = src.recv_header({MessageType.CHALLENGE: 32})
    nonce_t = src.recv_payload(length)
    to_target, to_source = protocol.session_keys(KEY, nonce, nonce_t)
    src.establish(send_key=to_target, recv_key=to_source)
    src.verify(MessageType.CHALLENGE, nonce_t)
    doc = edit(records.to_json(SHAPE))  # type: ignore[operator]
    src.send(MessageType.DESCRIBE, json.dumps(doc).encode())
    t.join()
    assert isinstance(t.error, MigrationError) and match in str(t.error), t.error
    assert "\n" not in str(t.error)


def test_a_deeply_nested_description_is_one_line_not_a_traceback(tap: Tap) -> None:
    t = Target(tap.target)
    src = tap.source
    nonce = b"n" * 32
    src.send(MessageType.HELLO, protocol.HELLO.pack(protocol.HELLO_MAGIC, protocol.PROTOCOL_VERSION, nonce))
    kind, length = src.recv_header({MessageType.CHALLENGE: 32})
    nonce_t = src.recv_payload(length)
    to_target, to_source = protocol.session_keys(KEY, nonce, nonce_t)
    src.establish(send_key=to_target, recv_key=to_source)
    src.verify(MessageType.CHALLENGE, nonce_t)
    src.send(MessageType.DESCRIBE, b'{"memory":' + b"[" * 30_000 + b"]" * 30_000 + b"}")
    t.join()
    assert isinstance(t.error, MigrationError) and "nested more than" in str(t.error)


def test_the_whole_handshake_has_a_deadline(tap: Tap) -> None:
    t = Target(tap.target, deadline=0.3)
    hello = HEADER.pack(b"HELO", 0, protocol.HELLO.size)
    for b in hello:  # one byte at a time, slower than the deadline allows
        try:
            tap.source.sock.sendall(bytes([b]))
        except OSError:
            break
        time.sleep(0.05)
    t.join()
    assert isinstance(t.error, MigrationError) and "too slow" in str(t.error)


def test_a_huge_hello_is_refused_before_it_is_read(tap: Tap) -> None:
    t = Target(tap.target)
    tap.source.sock.sendall(HEADER.pack(b"HELO", 0, 1 << 40))
    t.join()
    assert isinstance(t.error, MigrationError) and "-byte HELO message" in str(t.error)


@pytest.mark.parametrize("kind", [k for k in MessageType if k is not MessageType.HELLO])
def test_the_first_message_must_be_hello(tap: Tap, kind: MessageType) -> None:
    t = Target(tap.target)
    tap.source.send(kind, b"{}")
    t.join()
    assert isinstance(t.error, MigrationError) and f"sent {kind.label} where HELO was expected" in str(t.error)


@pytest.mark.parametrize("kind", [k for k in MessageType if k not in (MessageType.DESCRIBE, MessageType.ABORT)])
def test_after_the_challenge_only_a_description_or_an_abort(tap: Tap, kind: MessageType) -> None:
    t = Target(tap.target)
    src = tap.source
    nonce = b"n" * 32
    src.send(MessageType.HELLO, protocol.HELLO.pack(protocol.HELLO_MAGIC, protocol.PROTOCOL_VERSION, nonce))
    kind_c, length = src.recv_header({MessageType.CHALLENGE: 32})
    nonce_t = src.recv_payload(length)
    to_target, to_source = protocol.session_keys(KEY, nonce, nonce_t)
    src.establish(send_key=to_target, recv_key=to_source)
    src.verify(MessageType.CHALLENGE, nonce_t)
    src.send(kind, b"{}")
    t.join()
    assert isinstance(t.error, MigrationError) and f"sent {kind.label} where DESC or ABRT" in str(t.error)


@pytest.mark.parametrize("reply", [b'{"extra": 1}', b"[]", b'{"error": 5}'])
def test_the_source_treats_the_targets_replies_as_hostile(tap: Tap, reply: bytes) -> None:
    def target() -> None:
        with pytest.raises(MigrationError):  # the source walks away
            protocol.parse_shape(protocol.target_handshake(tap.target, KEY, deadline=time.monotonic() + 5), "s")
            tap.target.send(MessageType.ACCEPT if b"extra" in reply or reply == b"[]" else MessageType.REFUSE, reply)
            tap.target.recv_header({MessageType.PAGES: 10})

    th = threading.Thread(target=target)
    th.start()
    with pytest.raises(MigrationError, match="ACPT from target|RFSE from target"):
        protocol.source_handshake(tap.source, KEY, SHAPE)
    tap.source.close()
    th.join()


def test_session_keys_differ_by_direction_nonce_and_key() -> None:
    base = protocol.session_keys(KEY, b"a" * 32, b"b" * 32)
    assert base[0] != base[1]
    assert protocol.session_keys(KEY, b"a" * 32, b"c" * 32)[0] != base[0]
    assert protocol.session_keys(KEY, b"c" * 32, b"b" * 32)[0] != base[0]
    assert protocol.session_keys(KEY[::-1], b"a" * 32, b"b" * 32)[0] != base[0]
