"""The snapshot state file: a small binary header around a JSON document.

Layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"VKSNAP\\r\\n"   (the CR LF catches text-mode mangling, as PNG's does)
    8       4     format version          (FORMAT_VERSION; any other value is refused)
    12      4     flags                   (0; reserved)
    16      8     payload length in bytes
    24      32    SHA-256 of the payload
    56      ...   payload: UTF-8 JSON (see :func:`encode_payload`)

Why JSON inside a checksummed binary envelope rather than a packed struct format: the state is
small (a few tens of KiB: most of it the 4 KiB XSAVE area and 1 KiB LAPIC page per vCPU), so
parse speed does not matter (well under a millisecond); a self-describing document lets a device
add a field without a format bump of every other part, and a human can read it
(``virtkit snapshot-info``). The envelope gives what JSON lacks: a fixed place for the version,
checked before anything is parsed, and a checksum that turns any flipped bit or cut-off tail into
a clear refusal rather than a guest resumed with garbage. KVM structures are stored as their raw
bytes (base64): their layout is the kernel's stable uapi ABI, and the file records each one's
size so that a mismatch is refused too.

Bytes values anywhere in the document are written as ``{"$bytes": "<base64>"}``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from typing import Any, Final

from virtkit import records
from virtkit.errors import VirtkitError

MAGIC: Final = b"VKSNAP\r\n"
FORMAT_VERSION: Final = 1
_HEADER: Final = struct.Struct("<8sIIQ32s")
HEADER_SIZE: Final = _HEADER.size  # 56
#: a state file larger than this is not one of ours (a 1024-vCPU VM's state is ~25 MiB)
MAX_PAYLOAD: Final = 64 << 20
_BYTES_TAG: Final = "$bytes"


class SnapshotError(VirtkitError):
    """A snapshot cannot be written, read or restored (truncated, corrupted, wrong version,
    incompatible host...). Nothing was restored when this is raised."""


def _default(obj: object) -> object:
    if isinstance(obj, bytes | bytearray | memoryview):
        return {_BYTES_TAG: base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot store a {type(obj).__name__} in a snapshot")


def _object_hook(d: dict[str, Any]) -> object:
    if len(d) == 1 and _BYTES_TAG in d:
        value = d[_BYTES_TAG]
        if not isinstance(value, str):
            raise ValueError("bytes value is not a string")
        return base64.b64decode(value, validate=True)
    return d


def encode_payload(document: dict[str, Any]) -> bytes:
    """The JSON payload for ``document`` (bytes become tagged base64)."""
    return json.dumps(document, default=_default, separators=(",", ":"), sort_keys=True).encode()


def pack(document: dict[str, Any]) -> bytes:
    """A complete state file: header + payload."""
    payload = encode_payload(document)
    if len(payload) > MAX_PAYLOAD:
        raise SnapshotError(f"snapshot state is {len(payload)} bytes, more than the {MAX_PAYLOAD} this format allows")
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(payload), hashlib.sha256(payload).digest())
    return header + payload


def unpack(data: bytes, *, source: str = "snapshot") -> dict[str, Any]:
    """Check and decode a state file. Every failure is one :class:`SnapshotError` line naming
    ``source`` and saying what is wrong; the checks run in the order that gives the most useful
    message: not a snapshot, other version, truncated, corrupted."""
    if not data:
        raise SnapshotError(f"{source} is empty (truncated to 0 bytes)")
    if len(data) < len(MAGIC) and MAGIC.startswith(data):
        raise SnapshotError(f"{source} is truncated: {len(data)} bytes, shorter than the header")
    if data[: len(MAGIC)] != MAGIC:
        raise SnapshotError(f"{source} is not a virtkit snapshot state file (bad magic)")
    if len(data) >= 12:  # the version first: a snapshot from another virtkit is not "corrupted"
        (version,) = struct.unpack_from("<I", data, 8)
        if version != FORMAT_VERSION:
            raise SnapshotError(
                f"{source} has snapshot format version {version}; this virtkit reads "
                f"version {FORMAT_VERSION} only: restore it with the virtkit that made it"
            )
    if len(data) < HEADER_SIZE:
        raise SnapshotError(f"{source} is truncated: {len(data)} bytes, shorter than the {HEADER_SIZE}-byte header")
    _, _, flags, length, digest = _HEADER.unpack_from(data)
    if flags != 0:
        raise SnapshotError(f"{source} is corrupted: unknown header flags {flags:#x}")
    if length > MAX_PAYLOAD:
        raise SnapshotError(f"{source} is corrupted: header claims a {length}-byte payload")
    payload = data[HEADER_SIZE:]
    if len(payload) < length:
        raise SnapshotError(f"{source} is truncated: {len(payload)} of {length} payload bytes present")
    if len(payload) > length:
        raise SnapshotError(f"{source} is corrupted: {len(payload) - length} bytes after the payload")
    if hashlib.sha256(payload).digest() != digest:
        raise SnapshotError(f"{source} is corrupted: checksum mismatch")
    # The checksum only proves the file is what its writer wrote, not that the writer was ours: a
    # crafted file with a valid checksum is still parsed as hostile (bounded depth, no recursion).
    try:
        document = records.load_object(payload, what="payload", max_bytes=MAX_PAYLOAD, object_hook=_object_hook)
    except records.UntrustedInput as e:
        raise SnapshotError(f"{source} is corrupted: {e}") from None
    return document


# --- typed access to a decoded document: a malformed field is a SnapshotError, never a KeyError ----
class Fields:
    """Read fields of one JSON object with type checks, naming the path in errors."""

    def __init__(self, obj: object, path: str) -> None:
        if not isinstance(obj, dict):
            raise SnapshotError(f"snapshot field {path} is not an object")
        self._d: dict[str, Any] = obj
        self.path = path

    def _get(self, key: str) -> Any:
        if key not in self._d:
            raise SnapshotError(f"snapshot field {self.path}.{key} is missing")
        return self._d[key]

    def has(self, key: str) -> bool:
        return key in self._d

    def mapping(self) -> dict[str, Any]:
        """The object itself (for parts whose schema belongs to someone else: device state)."""
        return self._d

    def integer(self, key: str) -> int:
        v = self._get(key)
        if not isinstance(v, int) or isinstance(v, bool):
            raise SnapshotError(f"snapshot field {self.path}.{key} is not an integer")
        return v

    def boolean(self, key: str) -> bool:
        v = self._get(key)
        if not isinstance(v, bool):
            raise SnapshotError(f"snapshot field {self.path}.{key} is not a boolean")
        return v

    def string(self, key: str) -> str:
        """A string field. NUL is refused: these strings name files (the memory file, disk images
        and their copies), and every os call raises ValueError on an embedded NUL."""
        v = self._get(key)
        if not isinstance(v, str):
            raise SnapshotError(f"snapshot field {self.path}.{key} is not a string")
        if "\0" in v:
            raise SnapshotError(f"snapshot field {self.path}.{key} contains a NUL character")
        return v

    def number(self, key: str) -> float:
        """A JSON number as a float; an integer too large for one is refused (float() would raise
        OverflowError)."""
        v = self._get(key)
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise SnapshotError(f"snapshot field {self.path}.{key} is not a number")
        try:
            return float(v)
        except OverflowError:
            raise SnapshotError(f"snapshot field {self.path}.{key} is out of range") from None

    def blob(self, key: str, size: int | None = None) -> bytes:
        v = self._get(key)
        if not isinstance(v, bytes):
            raise SnapshotError(f"snapshot field {self.path}.{key} is not a byte string")
        if size is not None and len(v) != size:
            raise SnapshotError(
                f"snapshot field {self.path}.{key} is {len(v)} bytes, expected {size} (a different KVM ABI?)"
            )
        return v

    def array(self, key: str) -> list[Any]:
        v = self._get(key)
        if not isinstance(v, list):
            raise SnapshotError(f"snapshot field {self.path}.{key} is not a list")
        return v

    def obj(self, key: str) -> Fields:
        return Fields(self._get(key), f"{self.path}.{key}")

    def raw(self, key: str) -> Any:
        return self._get(key)
