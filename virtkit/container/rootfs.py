"""The container's filesystem view, built inside its new mount namespace (runs in the init process).

Order (as runc's prepareRootfs/finalizeRootfs, and the reasons):

1. ``/`` becomes rslave (or the config's rootfsPropagation) so nothing mounted here leaks to the host;
2. the rootfs is bind-mounted onto itself: pivot_root(2) needs new_root to be a mount point;
3. config mounts, each destination resolved *inside* the rootfs (a symlink in the image cannot send a
   mount to the host, cf. CVE-2021-30465), then a minimal /dev;
4. ``pivot_root(".", ".")`` then a lazy unmount of the old root: the host tree is gone from the
   namespace (never chroot, which a root process escapes with a second chroot);
5. after sysctls: read-only paths, masked paths, and last the read-only remount of ``/``.
"""

from __future__ import annotations

import errno
import os
import stat

from virtkit.container import libc
from virtkit.container.config import Config, Device, Mount
from virtkit.errors import ContainerError

_M = libc
#: mount option -> (clear the flag?, flag)  (mount(8) names)
MOUNT_FLAGS: dict[str, tuple[bool, int]] = {
    "ro": (False, _M.MS_RDONLY), "rw": (True, _M.MS_RDONLY),
    "nosuid": (False, _M.MS_NOSUID), "suid": (True, _M.MS_NOSUID),
    "nodev": (False, _M.MS_NODEV), "dev": (True, _M.MS_NODEV),
    "noexec": (False, _M.MS_NOEXEC), "exec": (True, _M.MS_NOEXEC),
    "sync": (False, _M.MS_SYNCHRONOUS), "async": (True, _M.MS_SYNCHRONOUS),
    "dirsync": (False, _M.MS_DIRSYNC), "remount": (False, _M.MS_REMOUNT),
    "mand": (False, _M.MS_MANDLOCK), "nomand": (True, _M.MS_MANDLOCK),
    "noatime": (False, _M.MS_NOATIME), "atime": (True, _M.MS_NOATIME),
    "nodiratime": (False, _M.MS_NODIRATIME), "diratime": (True, _M.MS_NODIRATIME),
    "relatime": (False, _M.MS_RELATIME), "norelatime": (True, _M.MS_RELATIME),
    "strictatime": (False, _M.MS_STRICTATIME), "nostrictatime": (True, _M.MS_STRICTATIME),
    "nosymfollow": (False, _M.MS_NOSYMFOLLOW), "symfollow": (True, _M.MS_NOSYMFOLLOW),
    "bind": (False, _M.MS_BIND), "rbind": (False, _M.MS_BIND | _M.MS_REC),
}
PROPAGATION: dict[str, int] = {
    "private": _M.MS_PRIVATE, "rprivate": _M.MS_PRIVATE | _M.MS_REC,
    "shared": _M.MS_SHARED, "rshared": _M.MS_SHARED | _M.MS_REC,
    "slave": _M.MS_SLAVE, "rslave": _M.MS_SLAVE | _M.MS_REC,
    "unbindable": _M.MS_UNBINDABLE, "runbindable": _M.MS_UNBINDABLE | _M.MS_REC,
}
#: options runtimes accept and ignore (runc: "tmpcopyup" is a runc extension, others are fs hints)
IGNORED_OPTIONS = ("tmpcopyup", "defaults")

#: the minimal /dev (runtime-spec config-linux.md "Default Devices")
DEFAULT_DEVICES: tuple[Device, ...] = (
    Device("/dev/null", "c", 1, 3, 0o666, 0, 0), Device("/dev/zero", "c", 1, 5, 0o666, 0, 0),
    Device("/dev/full", "c", 1, 7, 0o666, 0, 0), Device("/dev/random", "c", 1, 8, 0o666, 0, 0),
    Device("/dev/urandom", "c", 1, 9, 0o666, 0, 0), Device("/dev/tty", "c", 5, 0, 0o666, 0, 0),
)
DEV_SYMLINKS = (("/proc/self/fd", "/dev/fd"), ("/proc/self/fd/0", "/dev/stdin"),
                ("/proc/self/fd/1", "/dev/stdout"), ("/proc/self/fd/2", "/dev/stderr"),
                ("pts/ptmx", "/dev/ptmx"), ("/proc/kcore", "/dev/core"))

# statvfs f_flag bits (ST_*) -> mount flags (MS_*), to keep locked flags on a bind remount
_ST_TO_MS = ((1, _M.MS_RDONLY), (2, _M.MS_NOSUID), (4, _M.MS_NODEV), (8, _M.MS_NOEXEC),
             (1024, _M.MS_NOATIME), (2048, _M.MS_NODIRATIME), (4096, _M.MS_RELATIME))


def parse_options(options: tuple[str, ...]) -> tuple[int, int, list[str]]:
    """Split mount options into (flags, propagation flags, data options)."""
    flags = 0
    prop = 0
    data = []
    for opt in options:
        if opt in MOUNT_FLAGS:
            clear, flag = MOUNT_FLAGS[opt]
            flags = flags & ~flag if clear else flags | flag
        elif opt in PROPAGATION:
            prop |= PROPAGATION[opt]
        elif opt in IGNORED_OPTIONS:
            continue
        else:
            data.append(opt)
    return flags, prop, data


def secure_join(root: str, unsafe: str, max_links: int = 255) -> str:
    """Resolve ``unsafe`` as if ``root`` were ``/``: symlinks and ``..`` never leave ``root``."""
    parts = [p for p in unsafe.split("/") if p and p != "."]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > max_links:
                raise ContainerError(f"too many symlinks resolving {unsafe} in the rootfs")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def _preserved_flags(path: str) -> int:
    try:
        f_flag = os.statvfs(path).f_flag
    except OSError:
        return 0
    out = 0
    for st_bit, ms in _ST_TO_MS:
        if f_flag & st_bit:
            out |= ms
    return out


def _make_target(dest: str, source_is_file: bool) -> None:
    if os.path.lexists(dest):
        return
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if source_is_file:
        os.close(os.open(dest, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o755))
    else:
        os.makedirs(dest, exist_ok=True)


class RootfsBuilder:
    """Runs in the container's init, in its private mount namespace, before the process starts."""

    def __init__(self, config: Config, rootfs: str, userns: bool, cgroupns: bool, layout_mode: str | None,
                 v1_controllers: tuple[str, ...] = ()) -> None:
        self.config = config
        self.rootfs = rootfs
        self.userns = userns
        self.cgroupns = cgroupns
        self.layout_mode = layout_mode
        self.v1_controllers = v1_controllers
        self.dev_is_mounted = False

    # 1-4 ------------------------------------------------------------------------------------
    def prepare(self) -> None:
        prop = PROPAGATION.get(self.config.linux.rootfs_propagation or "rslave", _M.MS_SLAVE | _M.MS_REC)
        libc.mount(None, "/", None, prop | _M.MS_REC)
        try:
            libc.mount(self.rootfs, self.rootfs, None, _M.MS_BIND | _M.MS_REC)
        except PermissionError:
            if not self.userns:
                raise
            raise ContainerError(f"the container's root user cannot reach the rootfs {self.rootfs}: in a user "
                                 "namespace every parent directory must be searchable by the mapped ids "
                                 "(chmod o+x)") from None
        for m in self.config.mounts:
            self._mount(m)
        if self.dev_is_mounted:
            self._make_devices()
        else:
            for d in self.config.linux.devices:
                self._make_device(d)

    def _mount(self, m: Mount) -> None:
        dest = secure_join(self.rootfs, m.destination)
        flags, prop, data = parse_options(m.options)
        kind = m.type or ("bind" if flags & _M.MS_BIND else None)
        if kind == "bind" or flags & _M.MS_BIND:
            self._bind(m, dest, flags | _M.MS_BIND, prop)
        elif kind == "cgroup":
            self._mount_cgroup(dest, flags)
        else:
            _make_target(dest, False)
            try:
                libc.mount(m.source or kind, dest, kind, flags, ",".join(data) or None)
            except OSError as err:
                # in a user namespace that does not own the network (ipc) namespace, sysfs (mqueue)
                # cannot be mounted: bind the host's instead, read-only, as runc does
                if self.userns and err.errno == errno.EPERM and kind in ("sysfs", "mqueue"):
                    host = "/sys" if kind == "sysfs" else "/dev/mqueue"
                    libc.mount(host, dest, None, _M.MS_BIND | _M.MS_REC)
                    libc.mount(None, dest, None, _M.MS_BIND | _M.MS_REMOUNT | _M.MS_RDONLY | _preserved_flags(dest))
                else:
                    raise ContainerError(f"cannot mount {kind} on {m.destination}: {err.strerror}") from None
            if m.destination == "/dev":
                self.dev_is_mounted = True
        if prop:
            libc.mount(None, dest, None, prop)

    def _bind(self, m: Mount, dest: str, flags: int, prop: int) -> None:
        source = m.source or ""
        if not os.path.exists(source):
            raise ContainerError(f"bind mount source {source!r} for {m.destination} does not exist")
        _make_target(dest, not os.path.isdir(source))
        libc.mount(source, dest, None, flags & (_M.MS_BIND | _M.MS_REC))
        extra = flags & ~(_M.MS_BIND | _M.MS_REC)
        if extra:
            # a bind mount ignores other flags until it is remounted (mount(2), MS_REMOUNT|MS_BIND)
            # keep the flags the kernel may have locked (nosuid, nodev... in a user namespace)
            keep = _preserved_flags(dest) & ~_M.MS_RDONLY
            libc.mount(None, dest, None, _M.MS_BIND | _M.MS_REMOUNT | extra | keep)

    def _mount_cgroup(self, dest: str, flags: int) -> None:
        """The container's own view of its cgroups (the cgroup namespace makes its cgroup the root)."""
        _make_target(dest, False)
        flags |= _M.MS_NOSUID | _M.MS_NODEV | _M.MS_NOEXEC
        if self.layout_mode == "v2":
            libc.mount("cgroup2", dest, "cgroup2", flags)
            return
        libc.mount("tmpfs", dest, "tmpfs", (flags & ~_M.MS_RDONLY), "mode=755")
        for ctrl in self.v1_controllers:
            sub = os.path.join(dest, ctrl)
            os.makedirs(sub, exist_ok=True)
            libc.mount("cgroup", sub, "cgroup", flags, ctrl)
        if flags & _M.MS_RDONLY:
            libc.mount(None, dest, None, _M.MS_REMOUNT | _M.MS_BIND | _M.MS_RDONLY | _preserved_flags(dest))

    def _make_devices(self) -> None:
        old = os.umask(0)
        try:
            for d in DEFAULT_DEVICES + self.config.linux.devices:
                self._make_device(d)
            for target, link in DEV_SYMLINKS:
                path = secure_join(self.rootfs, link)
                if not os.path.lexists(path):
                    os.symlink(target, path)
            for sub in ("pts", "shm"):
                os.makedirs(secure_join(self.rootfs, f"/dev/{sub}"), exist_ok=True)
        finally:
            os.umask(old)

    def _make_device(self, d: Device) -> None:
        dest = secure_join(self.rootfs, d.path)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        kinds = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}
        mode = (d.file_mode if d.file_mode is not None else 0o666) & 0o7777
        if os.path.lexists(dest):
            os.unlink(dest)
        if self.userns and d.type != "p":
            # mknod is refused in a user namespace: bind the host's node instead (runc does the same)
            _make_target(dest, True)
            libc.mount(d.path, dest, None, _M.MS_BIND)
            return
        os.mknod(dest, kinds[d.type] | mode, os.makedev(d.major, d.minor))
        os.chown(dest, d.uid or 0, d.gid or 0)

    def pivot(self) -> None:
        os.chdir(self.rootfs)
        libc.pivot_root(".", ".")
        # the old root is now stacked under "."; make it a slave so the detach cannot propagate
        libc.mount(None, ".", None, _M.MS_SLAVE | _M.MS_REC)
        libc.umount2(".", _M.MNT_DETACH)
        os.chdir("/")

    # 5 --------------------------------------------------------------------------------------
    def finalize(self) -> None:
        for key, value in self.config.linux.sysctl:
            path = "/proc/sys/" + key.replace(".", "/")
            try:
                with open(path, "w") as f:
                    f.write(value)
            except OSError as err:
                raise ContainerError(f"cannot set sysctl {key}={value}: {err.strerror} "
                                     "(only namespaced sysctls can be set)") from None
        for path in self.config.linux.readonly_paths:
            self.readonly(path)
        for path in self.config.linux.masked_paths:
            self.mask(path)
        if self.config.root_readonly:
            libc.mount(None, "/", None, _M.MS_BIND | _M.MS_REMOUNT | _M.MS_RDONLY | _preserved_flags("/"))

    @staticmethod
    def readonly(path: str) -> None:
        try:
            libc.mount(path, path, None, _M.MS_BIND | _M.MS_REC)
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno == errno.ENOENT:
                return
            raise
        libc.mount(None, path, None, _M.MS_BIND | _M.MS_REMOUNT | _M.MS_RDONLY | _M.MS_REC | _preserved_flags(path))

    @staticmethod
    def mask(path: str) -> None:
        try:
            if os.path.isdir(path):
                libc.mount("tmpfs", path, "tmpfs", _M.MS_RDONLY, "size=0")
            elif os.path.lexists(path):
                libc.mount("/dev/null", path, None, _M.MS_BIND)
        except OSError as err:
            if err.errno != errno.ENOENT:
                raise
