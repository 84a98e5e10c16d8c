"""Copy-on-write copies of raw disk images, for snapshots and per-clone disk overlays.

A raw image has no backing-file format (qcow2 would need a block layer virtkit does not have), so a
clone's "overlay" is a whole-file copy made as cheaply as Linux allows, in this order:

1. ``reflink``: ``ioctl(dst, FICLONE, src)`` shares every extent of ``src`` with ``dst`` and lets
   the filesystem copy blocks only when either side writes them. Instant and free of space at any
   size; btrfs, XFS (reflink=1), bcachefs, and OCFS2 support it. Anything else fails with
   EOPNOTSUPP/EINVAL/EXDEV/ENOTTY (ext4, tmpfs, another filesystem).
2. ``sparse``: a new file of the same length, into which only the allocated extents of ``src``
   (found with ``SEEK_DATA``/``SEEK_HOLE``) are copied with ``copy_file_range`` (in-kernel, no user
   buffer; some filesystems share blocks here too). Holes stay holes, so a mostly-empty 1 GiB disk
   costs what it holds, not 1 GiB. Where SEEK_DATA is not supported the whole file is one extent.

Both give the copy its own inode: writing it can never reach ``src``, and vice versa. Which path
ran is returned so callers can report it (``clone`` puts it in each clone's result).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from typing import Final, Literal

#: _IOW(0x94, 9, int) from linux/fs.h
FICLONE: Final = 0x40049409
_NO_REFLINK: Final = frozenset(
    {errno.EOPNOTSUPP, errno.EINVAL, errno.EXDEV, errno.ENOTTY, errno.ENOSYS, errno.EPERM, errno.EBADF}
)
CHUNK: Final = 8 << 20

Method = Literal["reflink", "sparse"]


def copy_image(src: str, dst: str, *, reflink: bool = True, follow_symlinks: bool = True) -> Method:
    """Copy ``src`` to the new file ``dst`` (which must not exist), copy-on-write if the filesystem
    can, else sparse. ``reflink=False`` forces the sparse path (tests). On failure ``dst`` is gone.

    ``src`` must be a regular file or a block device (OSError otherwise: a FIFO would block the
    copy forever); ``follow_symlinks=False`` refuses a symbolic link too (ELOOP), for a ``src`` in a
    snapshot directory, which may be crafted to point at any host file."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    sfd = os.open(src, flags)
    try:
        mode = os.fstat(sfd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise OSError(errno.EINVAL, f"{src} is not a regular file or block device")
        os.set_blocking(sfd, True)
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            method = _copy(sfd, dfd, reflink)
        except BaseException:
            os.close(dfd)
            with contextlib.suppress(OSError):
                os.unlink(dst)
            raise
        os.close(dfd)
        return method
    finally:
        os.close(sfd)


def _copy(sfd: int, dfd: int, reflink: bool) -> Method:
    if reflink:
        try:
            fcntl.ioctl(dfd, FICLONE, sfd)
            return "reflink"
        except OSError as e:
            if e.errno not in _NO_REFLINK:
                raise
    size = os.lseek(sfd, 0, os.SEEK_END)  # also right for a block device (st_size 0)
    os.ftruncate(dfd, size)  # all hole; only data extents are written below
    for start, end in data_extents(sfd, size):
        _copy_range(sfd, dfd, start, end)
    return "sparse"


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` ranges of ``fd`` that hold data (everything if SEEK_DATA is missing)."""
    extents: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break  # only a hole from pos to the end
            return [(0, size)] if size else []  # no SEEK_DATA here: copy it all
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end))
        pos = end
    return extents


def _copy_range(sfd: int, dfd: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        n = min(CHUNK, end - pos)
        try:
            done = os.copy_file_range(sfd, dfd, n, pos, pos)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            done = os.pwrite(dfd, os.pread(sfd, n, pos), pos)
        if done <= 0:
            raise OSError(errno.EIO, f"short copy at offset {pos}")
        pos += done
