"""The pre-shared key of live migration: making one, and reading one only from a file nobody else
can read.

Both ends of a migration hold the same key (``virtkit migrate-keygen FILE`` makes one; copy the
file to the other host by a channel you trust, e.g. ssh). It authenticates every message of the
migration stream (docs/FAILOVER.md, "Authentication"): whoever holds it can hand a VM to a
receiver, or receive one, so it is as secret as the VM itself.

A key file holds at least :data:`MIN_KEY_BYTES` random bytes, either as hex text (what
``migrate-keygen`` writes, one line) or raw. It is refused, with one line saying what to do, if
it is not a regular file, belongs to another user, grants any permission to group or others
(as ssh refuses a private key), is too short or too long.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from typing import Final

from virtkit.errors import ConfigError

#: what migrate-keygen writes: 256 bits
KEY_BYTES: Final = 32
#: shorter keys are refused: HMAC-SHA256's security is bounded by the key's entropy
MIN_KEY_BYTES: Final = 32
#: a key file larger than this is not a key file (read no further)
MAX_KEY_FILE: Final = 4096
_HEX = re.compile(rb"[0-9a-fA-F]+")


class KeyFileError(ConfigError):
    """A key file is missing, unsafe or malformed."""


def generate(path: str) -> None:
    """Write a new random key to ``path`` (hex, one line), mode 0600. Refuses to overwrite a file:
    replacing a key by mistake would break migrations to and from every host holding the old one."""
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise KeyFileError(
            f"{path} exists: remove it first or choose another file (a key is never overwritten)"
        ) from None
    except OSError as e:
        raise KeyFileError(f"cannot create key file {path}: {e.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask said
        os.write(fd, key.hex().encode() + b"\n")
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        raise KeyFileError(f"cannot write key file {path}: {e.strerror}") from None
    os.close(fd)


def load(path: str) -> bytes:
    """The key in ``path``; :class:`KeyFileError` (one line) if the file is unsafe or not a key."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KeyFileError(
            f"key file {path} does not exist: make one with `virtkit migrate-keygen "
            f"{path}` and copy it to the other host"
        ) from None
    except OSError as e:
        raise KeyFileError(f"cannot open key file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)  # of what was opened: no race with a rename between check and read
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        if st.st_uid not in (os.geteuid(), 0):
            raise KeyFileError(
                f"key file {path} belongs to uid {st.st_uid}, not to you: a key must be "
                "owned by the user who uses it (or root)"
            )
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"key file {path} has permissions {stat.S_IMODE(st.st_mode):04o}: group and "
                f"others must have none; run `chmod 600 {path}`"
            )
        data = os.read(fd, MAX_KEY_FILE + 1)
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"key file {path} is larger than {MAX_KEY_FILE} bytes: not a key file")
    return parse(data, what=f"key file {path}")


def parse(data: bytes, *, what: str) -> bytes:
    """Hex text (surrounding whitespace ignored) or raw bytes -> the key."""
    text = data.strip()
    if text and _HEX.fullmatch(text) and len(text) % 2 == 0:
        key = bytes.fromhex(text.decode())
    else:
        key = data
    if len(key) < MIN_KEY_BYTES:
        raise KeyFileError(
            f"{what} holds a {len(key)}-byte key; at least {MIN_KEY_BYTES} random bytes are "
            "needed: make one with `virtkit migrate-keygen FILE`"
        )
    return key
