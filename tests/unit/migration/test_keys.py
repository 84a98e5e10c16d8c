"""The pre-shared key: made 0600, never overwritten; read only from a file nobody else can read,
long enough, and not too long; every refusal one line saying what to do."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from virtkit.migration import keys
from virtkit.migration.keys import KeyFileError


def test_keygen_writes_a_fresh_key_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "k"
    old = os.umask(0)  # whatever the umask, the file is 0600
    try:
        keys.generate(str(path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = keys.load(str(path))
    assert len(key) == keys.KEY_BYTES
    other = tmp_path / "k2"
    keys.generate(str(other))
    assert keys.load(str(other)) != key


def test_keygen_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text("precious")
    with pytest.raises(KeyFileError, match="exists: remove it first"):
        keys.generate(str(path))
    assert path.read_text() == "precious"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644, 0o660])
def test_a_key_others_can_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k"
    keys.generate(str(path))
    path.chmod(mode)
    with pytest.raises(
        KeyFileError, match=f"has permissions {mode:04o}: group and others must have none; run `chmod 600 {path}`"
    ):
        keys.load(str(path))


def test_a_key_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    path = tmp_path / "k"
    keys.generate(str(path))
    os.chown(path, 12345, 12345)
    with pytest.raises(KeyFileError, match="belongs to uid 12345"):
        keys.load(str(path))


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "holds a 0-byte key"),
        (b"00" * 31 + b"\n", "holds a 31-byte key"),
        (b"short raw key", "holds a 13-byte key"),
        (b"x" * 5000, "larger than 4096 bytes"),
    ],
)
def test_short_or_oversized_keys_are_refused(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "k"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=match):
        keys.load(str(path))


def test_hex_and_raw_keys(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"  " + b"ab" * 32 + b"\n")
    path.chmod(0o600)
    assert keys.load(str(path)) == b"\xab" * 32
    path.write_bytes(bytes(range(40)))
    assert keys.load(str(path)) == bytes(range(40))


def test_missing_symlinked_or_special_key_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist: make one with `virtkit migrate-keygen"):
        keys.load(str(tmp_path / "nope"))
    real = tmp_path / "real"
    keys.generate(str(real))
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(KeyFileError, match="cannot open key file"):  # O_NOFOLLOW: no redirection
        keys.load(str(link))
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="is not a regular file"):
        keys.load(str(d))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyFileError, match="is not a regular file"):  # and reading it would block
        keys.load(str(fifo))


def test_errors_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"1")
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as e:
        keys.load(str(path))
    assert "\n" not in str(e.value)
