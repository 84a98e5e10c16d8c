"""A raw disk image: a regular file (or block device) read and written at byte offsets.

Shared by every disk front end: virtio-blk, the ATA PIO controller and the block hypercalls. One
machine opens an image once and hands the same object to each front end it attaches.

Data moves with ``preadv``/``pwritev`` straight between the file and guest RAM views handed out by
:class:`~virtkit.memory.GuestMemory`: no intermediate copy and no allocation proportional to the
request. Sparse images stay sparse: zeros the guest writes over a hole are not written (reading a
hole already returns zeros), so a guest zeroing a fresh disk does not allocate it; nothing is ever
preallocated.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from virtkit.errors import DeviceError

SECTOR_SIZE: Final = 512  # the unit of virtio-blk capacity and sector numbers (§5.2.4, §5.2.6)
#: granularity at which zero writes over holes are skipped: the page size of common filesystems
HOLE_CHUNK: Final = 4096
#: iovecs per preadv/pwritev call (Linux UIO_MAXIOV)
IOV_MAX: Final = 1024


class RawImage:
    """An open raw image. Not thread-safe: the block device calls it with its lock held."""

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        """Open ``path`` for reading (and writing unless ``read_only``) and take an advisory lock
        (shared when read-only, exclusive otherwise) so that two machines never write one image.
        Raises DeviceError with a one-line message for anything the user has to fix."""
        self.path = Path(path)
        self.read_only = read_only
        self._fd = self._open()
        try:
            self.size = self._measure()
            os.set_blocking(self._fd, True)
            self._lock()
        except BaseException:
            os.close(self._fd)
            raise

    def _open(self) -> int:
        # O_NONBLOCK only for the open itself: opening a FIFO for reading would block until a writer
        # came (the path may come from a crafted snapshot); _measure then refuses it, and
        # _open clears the flag for the image's real I/O.
        flags = (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            return os.open(self.path, flags)
        except FileNotFoundError:
            raise DeviceError(f"disk image {self.path} does not exist") from None
        except IsADirectoryError:
            raise DeviceError(f"disk image {self.path} is a directory, not an image file") from None
        except OSError as e:
            if (
                not self.read_only
                and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
                and os.access(self.path, os.R_OK)
            ):
                raise DeviceError(
                    f"disk image {self.path} is read-only ({os.strerror(e.errno)}); "
                    f"attach it read-only or make it writable"
                ) from None
            raise DeviceError(f"cannot open disk image {self.path}: {e.strerror}") from None

    def _measure(self) -> int:
        st = os.fstat(self._fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise DeviceError(f"disk image {self.path} is not a regular file or block device")
        size = os.lseek(self._fd, 0, os.SEEK_END)  # also right for block devices, whose st_size is 0
        if size % SECTOR_SIZE:
            raise DeviceError(
                f"disk image {self.path} is {size} bytes, not a multiple of {SECTOR_SIZE}: "
                f"resize it (e.g. truncate -s {(size // SECTOR_SIZE + 1) * SECTOR_SIZE})"
            )
        return size

    def _lock(self) -> None:
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_SH if self.read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeviceError(f"disk image {self.path} is in use by another process or machine") from None

    @property
    def sectors(self) -> int:
        return self.size // SECTOR_SIZE

    def contains(self, sector: int, count: int) -> bool:
        """True if ``count`` sectors from ``sector`` lie inside the image."""
        return sector >= 0 and count >= 0 and sector + count <= self.sectors

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # also drops the flock
            self._fd = -1

    # --- I/O (OSError on host failures; the device turns them into VIRTIO_BLK_S_IOERR) -----------
    def _check_range(self, offset: int, views: Sequence[memoryview]) -> None:
        # Every front end checks its request against the image first; this is the wall behind
        # them: no state (a restored snapshot, a device bug) can make I/O land outside the image,
        # where a write would grow the host file without bound.
        length = sum(len(v) for v in views)
        if offset < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"bytes {offset}+{length} are outside the {self.size}-byte image")

    def read_into(self, offset: int, views: Sequence[memoryview]) -> None:
        """Fill ``views`` from the image starting at ``offset``."""
        self._check_range(offset, views)
        _transfer(os.preadv, self._fd, views, offset)

    def write_from(self, offset: int, views: Sequence[memoryview]) -> None:
        """Write ``views`` to the image starting at ``offset``, leaving holes unallocated where the
        data is zeros."""
        if self.read_only:
            raise OSError(errno.EBADF, "image is read-only")
        self._check_range(offset, views)
        for view in views:
            self._write_segment(offset, view)
            offset += len(view)

    def flush(self) -> None:
        if not self.read_only:
            os.fdatasync(self._fd)

    def _write_segment(self, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        if not data or self._next_hole(offset) >= end:
            _transfer(os.pwritev, self._fd, [data], offset)  # no hole in range: the common case
            return
        # Some of the range is a hole: go piece by piece (pieces aligned to HOLE_CHUNK in the file)
        # and leave out the all-zero pieces that fall entirely in a hole. Runs of pieces that must
        # be written go out in one call.
        run_start = offset
        pos = offset
        while pos < end:
            piece_end = min(end, (pos // HOLE_CHUNK + 1) * HOLE_CHUNK)
            piece = data[pos - offset : piece_end - offset]
            if _is_zero(piece) and self._is_hole(pos, piece_end):
                if run_start < pos:
                    _transfer(os.pwritev, self._fd, [data[run_start - offset : pos - offset]], run_start)
                run_start = piece_end
            pos = piece_end
        if run_start < end:
            _transfer(os.pwritev, self._fd, [data[run_start - offset :]], run_start)

    def _next_hole(self, offset: int) -> int:
        try:
            return os.lseek(self._fd, offset, os.SEEK_HOLE)  # the end of the file counts as a hole
        except OSError:
            return self.size  # no SEEK_HOLE support (or past the end): treat everything as data

    def _is_hole(self, start: int, end: int) -> bool:
        try:
            data = os.lseek(self._fd, start, os.SEEK_DATA)
        except OSError as e:
            return e.errno == errno.ENXIO  # no data at or after start: all hole
        return data >= end


def _is_zero(piece: memoryview) -> bool:
    # one memcpy of at most HOLE_CHUNK bytes and a memcmp: far faster than comparing memoryviews
    return bytes(piece) == bytes(len(piece))


def _transfer(
    call: Callable[[int, list[memoryview], int], int], fd: int, views: Sequence[memoryview], offset: int
) -> None:
    """Run ``os.preadv`` or ``os.pwritev`` until every byte of ``views`` moved; EOF is an error."""
    pending = [v for v in views if len(v)]
    while pending:
        batch = pending[:IOV_MAX]
        done = call(fd, batch, offset)
        if done <= 0:
            raise OSError(errno.EIO, "unexpected end of disk image")
        offset += done
        # drop what was transferred, keep the tail of a partially transferred view
        while done and pending:
            first = pending[0]
            if done >= len(first):
                done -= len(first)
                pending.pop(0)
            else:
                pending[0] = first[done:]
                done = 0
