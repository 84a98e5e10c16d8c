"""The state file container: round trip, and a one-line refusal for every kind of damage."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtkit.snapshot import format
from virtkit.snapshot.format import SnapshotError


def test_round_trip_keeps_bytes_and_nesting(document: dict[str, Any]) -> None:
    data = format.pack(document)
    assert data[:8] == b"VKSNAP\r\n"
    back = format.unpack(data)
    assert back == document
    assert isinstance(back["devices"]["uart0"]["rx"], bytes)


def test_header_layout_is_pinned() -> None:
    data = format.pack({"a": 1})
    magic, version, flags, length, _digest = struct.unpack_from("<8sIIQ32s", data)
    assert (magic, version, flags) == (b"VKSNAP\r\n", format.FORMAT_VERSION, 0)
    assert format.HEADER_SIZE == 56 and length == len(data) - 56


def test_every_truncation_is_refused(document: dict[str, Any]) -> None:
    data = format.pack(document)
    # every prefix of the header, and a spread of prefixes of the payload
    cuts = list(range(0, 64)) + list(range(64, len(data), max(1, len(data) // 97)))
    for cut in cuts:
        with pytest.raises(SnapshotError, match="truncated|empty") as e:
            format.unpack(data[:cut], source="vm.state")
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("offset", [8, 12, 16, 24, 40, 56, 100, -1])
def test_flipped_bits_are_refused(document: dict[str, Any], offset: int) -> None:
    data = bytearray(format.pack(document))
    data[offset] ^= 0x10
    with pytest.raises(SnapshotError, match="corrupted|version|truncated"):
        format.unpack(bytes(data))


def test_checksum_mismatch_says_corrupted(document: dict[str, Any]) -> None:
    data = bytearray(format.pack(document))
    data[format.HEADER_SIZE + 5] ^= 1
    with pytest.raises(SnapshotError, match="corrupted: checksum mismatch"):
        format.unpack(bytes(data))


def test_other_version_is_refused_before_the_payload_is_read(document: dict[str, Any]) -> None:
    data = bytearray(format.pack(document))
    struct.pack_into("<I", data, 8, format.FORMAT_VERSION + 1)
    with pytest.raises(
        SnapshotError,
        match=f"format version {format.FORMAT_VERSION + 1}; this virtkit reads version {format.FORMAT_VERSION}",
    ):
        format.unpack(bytes(data[:40]))  # even cut short: the version is what matters


def test_not_a_snapshot_and_trailing_garbage() -> None:
    with pytest.raises(SnapshotError, match="bad magic"):
        format.unpack(b"\x7fELF" + bytes(100))
    with pytest.raises(SnapshotError, match="bytes after the payload"):
        format.unpack(format.pack({"a": 1}) + b"x")


def test_valid_checksum_over_invalid_json_is_still_refused() -> None:
    import hashlib

    payload = b"[1, 2"
    data = (
        struct.pack("<8sIIQ32s", format.MAGIC, format.FORMAT_VERSION, 0, len(payload), hashlib.sha256(payload).digest())
        + payload
    )
    with pytest.raises(SnapshotError, match="not valid JSON"):
        format.unpack(data)


def test_unstorable_values_are_a_type_error() -> None:
    with pytest.raises(TypeError):
        format.pack({"x": object()})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), 1 << 64) | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8).filter(lambda k: k != "$bytes"), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
# "$bytes" alone as a key is the format's tag for bytes, at the top level as anywhere else
@given(st.dictionaries(st.text(max_size=8).filter(lambda k: k != "$bytes"), json_values, max_size=6))
def test_any_document_round_trips(doc: dict[str, Any]) -> None:
    assert format.unpack(format.pack(doc)) == doc


@pytest.mark.parametrize("payload", [b"[" * 200_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"[1]", b"NaN"])
def test_a_crafted_payload_with_a_valid_checksum_is_refused_in_one_line(payload: bytes) -> None:
    """The checksum proves only that the writer wrote this, not that the writer was virtkit."""
    import hashlib

    data = (
        format._HEADER.pack(format.MAGIC, format.FORMAT_VERSION, 0, len(payload), hashlib.sha256(payload).digest())
        + payload
    )
    with pytest.raises(format.SnapshotError, match="is corrupted") as e:
        format.unpack(data, source="state")
    assert "\n" not in str(e.value)
