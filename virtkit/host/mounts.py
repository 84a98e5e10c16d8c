"""Mounts: mount(2), umount2(2), pivot_root(2), the fd-based mount API (open_tree, move_mount,
fsopen/fsconfig/fsmount, mount_setattr), openat2(2)'s kernel-side path resolution, and what
filesystem or mount an fd is on.

Thin errno-checked wrappers on :mod:`virtkit.host.libc`'s handle, no policy; what is mounted
where is its caller's (the container's rootfs, the jail's empty root).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from virtkit.host.libc import check, encode, handle, syscall

# --- linux/mount.h -------------------------------------------------------------------------
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
MNT_FORCE = 1
MNT_DETACH = 2

# --- syscall numbers (x86-64) ----------------------------------------------------------------
SYS_pivot_root = 155
SYS_statx = 332
SYS_open_tree = 428
SYS_move_mount = 429
SYS_fsopen = 430
SYS_fsconfig = 431
SYS_fsmount = 432
SYS_openat2 = 437
SYS_mount_setattr = 442

# --- linux/openat2.h: struct open_how.resolve ------------------------------------------------
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# --- linux/fcntl.h, linux/mount.h: the fd-based mount API (5.2+; mount_setattr 5.12+) ---------
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40
FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOUNT_ATTR_RDONLY = 0x01
MOUNT_ATTR_NOSUID = 0x02
MOUNT_ATTR_NODEV = 0x04
MOUNT_ATTR_NOEXEC = 0x08
MOUNT_ATTR__ATIME = 0x70
MOUNT_ATTR_RELATIME = 0x00
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
MOUNT_ATTR_NOSYMFOLLOW = 0x200000

# --- statfs f_type (linux/magic.h) -------------------------------------------------------------
PROC_SUPER_MAGIC = 0x9FA0
TMPFS_MAGIC = 0x01021994
CGROUP_SUPER_MAGIC = 0x27E0EB
CGROUP2_SUPER_MAGIC = 0x63677270

STATX_MNT_ID = 0x1000


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    ret = handle.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data))
    check(ret, f"mount {fstype or ''} {source or ''} on {target}".replace("  ", " "), target)


def umount2(target: str, flags: int = 0) -> None:
    check(handle.umount2(encode(target), ctypes.c_int(flags)), "umount", target)


def pivot_root(new_root: str, put_old: str) -> None:
    check(syscall(SYS_pivot_root, encode(new_root), encode(put_old)), "pivot_root", new_root)


# --- paths resolved by the kernel, and mounts made on file descriptors --------------------------


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): open ``path`` relative to ``dirfd`` with the ``RESOLVE_*`` rules enforced by the
    kernel during the walk itself (so nothing can be swapped in between a check and the open).
    The returned fd is close-on-exec. Retries the EAGAIN the kernel returns when a concurrent
    rename makes a ``..`` step of RESOLVE_IN_ROOT/BENEATH ambiguous."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    raw = os.fsencode(path)
    for _ in range(64):
        ret = syscall(SYS_openat2, ctypes.c_int(dirfd), raw, ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if ret >= 0:
            return int(ret)
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EINTR):
            raise OSError(err, f"openat2: {os.strerror(err)}", path)
    raise OSError(errno.EAGAIN, "openat2: the path kept changing while it was resolved", path)


def mount_id(fd: int) -> int:
    """The id of the mount ``fd`` is on (statx STATX_MNT_ID; the same number /proc/PID/mountinfo
    and fdinfo show), read without going through /proc."""
    buf = ctypes.create_string_buffer(256)
    check(
        syscall(
            SYS_statx,
            ctypes.c_int(fd),
            b"",
            ctypes.c_int(AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW),
            ctypes.c_uint(STATX_MNT_ID),
            buf,
        ),
        "statx",
    )
    mask = struct.unpack_from("<I", buf.raw, 0)[0]
    if not mask & STATX_MNT_ID:
        raise OSError(errno.ENOSYS, "statx: this kernel does not report mount ids")
    return int(struct.unpack_from("<Q", buf.raw, 144)[0])


def fstatfs_type(fd: int) -> int:
    """``f_type`` of fstatfs(2): which filesystem ``fd`` is on (PROC_SUPER_MAGIC, TMPFS_MAGIC...)."""
    buf = ctypes.create_string_buffer(120)  # struct statfs on x86-64; f_type is the first long
    check(handle.fstatfs(ctypes.c_int(fd), buf), "fstatfs")
    return int(struct.unpack_from("<q", buf.raw, 0)[0])


def open_tree(fd: int, recursive: bool) -> int:
    """A detached copy of the mount tree at ``fd`` (a bind mount not yet attached anywhere)."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    return check(syscall(SYS_open_tree, ctypes.c_int(fd), b"", ctypes.c_uint(flags)), "open_tree")


def move_mount(mount_fd: int, target_fd: int) -> None:
    """Attach the mount ``mount_fd`` on top of what ``target_fd`` is (no path is walked)."""
    check(
        syscall(
            SYS_move_mount,
            ctypes.c_int(mount_fd),
            b"",
            ctypes.c_int(target_fd),
            b"",
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
        ),
        "move_mount",
    )


def _fs_error(fs_fd: int, what: str) -> OSError:
    """The errno of a failed fs-context call, with the kernel's own message if it left one."""
    err = ctypes.get_errno()
    detail = ""
    try:
        detail = os.read(fs_fd, 256).decode(errors="replace").strip()
        detail = detail[2:] if detail[1:2] == " " else detail  # "e tmpfs: Unknown parameter 'x'"
    except OSError:
        pass
    return OSError(err, f"{what}: {detail or os.strerror(err)}")


def fs_mount(fstype: str, source: str | None, options: list[str], attrs: int) -> int:
    """A new, detached instance of ``fstype`` (fsopen + fsconfig + fsmount); returns its mount fd.
    ``options`` are mount(8) data options (``mode=755``, ``newinstance``); ``attrs`` MOUNT_ATTR_*."""
    fs_fd = check(syscall(SYS_fsopen, os.fsencode(fstype), ctypes.c_uint(FSOPEN_CLOEXEC)), f"fsopen {fstype}")
    try:
        params: list[tuple[str, str | None]] = []
        if source:
            params.append(("source", source))
        for opt in options:
            name, eq, text = opt.partition("=")
            params.append((name, text if eq else None))
        for key, value in params:
            cmd = FSCONFIG_SET_FLAG if value is None else FSCONFIG_SET_STRING
            ret = syscall(
                SYS_fsconfig,
                ctypes.c_int(fs_fd),
                ctypes.c_uint(cmd),
                os.fsencode(key),
                None if value is None else os.fsencode(value),
                ctypes.c_int(0),
            )
            if ret < 0:
                raise _fs_error(fs_fd, f"{fstype} option {key}")
        if (
            syscall(SYS_fsconfig, ctypes.c_int(fs_fd), ctypes.c_uint(FSCONFIG_CMD_CREATE), None, None, ctypes.c_int(0))
            < 0
        ):
            raise _fs_error(fs_fd, f"mount {fstype}")
        ret = syscall(SYS_fsmount, ctypes.c_int(fs_fd), ctypes.c_uint(FSMOUNT_CLOEXEC), ctypes.c_uint(attrs))
        if ret < 0:
            raise _fs_error(fs_fd, f"mount {fstype}")
        return int(ret)
    finally:
        os.close(fs_fd)


def mount_setattr(fd: int, attr_set: int, attr_clr: int = 0, propagation: int = 0, recursive: bool = False) -> None:
    """Change the flags (MOUNT_ATTR_*) or propagation (MS_SHARED...) of the mount ``fd`` is the root of."""
    attr = ctypes.create_string_buffer(struct.pack("<QQQQ", attr_set, attr_clr, propagation, 0), 32)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    check(
        syscall(SYS_mount_setattr, ctypes.c_int(fd), b"", ctypes.c_uint(flags), attr, ctypes.c_size_t(32)),
        "mount_setattr",
    )
