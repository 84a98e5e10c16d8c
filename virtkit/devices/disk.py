"""A raw disk image file, shared by the disk front ends (ATA PIO, the block hypercalls).

Sector size is 512 bytes. Every request is checked against the image size before any I/O, and
data moves between the file and guest memory views with pread/pwrite (no intermediate copies).
"""

from __future__ import annotations

import os
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

from virtkit.errors import DeviceError

SECTOR_SIZE: Final = 512


class DiskImage:
    def __init__(self, path: str, *, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except FileNotFoundError:
            raise DeviceError(f"disk image {path} does not exist") from None
        except IsADirectoryError:
            raise DeviceError(f"disk image {path} is a directory") from None
        except PermissionError:
            hint = "" if read_only else " (add ,ro to attach it read-only)"
            raise DeviceError(f"disk image {path} cannot be opened {'for reading' if read_only else 'for writing'}: "
                              f"permission denied{hint}") from None
        except OSError as e:
            raise DeviceError(f"cannot open disk image {path}: {e.strerror}") from None
        size = os.fstat(self.fd).st_size
        if size == 0 or size % SECTOR_SIZE:
            os.close(self.fd)
            raise DeviceError(f"disk image {path} is {size} bytes, not a positive multiple of {SECTOR_SIZE}: "
                              f"resize it (truncate -s) to whole sectors")
        self.size = size

    @property
    def sectors(self) -> int:
        return self.size // SECTOR_SIZE

    def check(self, sector: int, count: int) -> bool:
        """True if ``count`` sectors from ``sector`` lie inside the image."""
        return 0 <= sector and 0 <= count and sector + count <= self.sectors

    def read_into(self, sector: int, buf: memoryview) -> int:
        return os.preadv(self.fd, [buf], sector * SECTOR_SIZE)

    def write_from(self, sector: int, buf: memoryview | bytes | bytearray) -> int:
        if self.read_only:
            raise DeviceError(f"disk image {self.path} is read-only")
        return os.pwritev(self.fd, [buf], sector * SECTOR_SIZE)

    def flush(self) -> None:
        if not self.read_only:
            os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
