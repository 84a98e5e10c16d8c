"""The container's filesystem view, built inside its new mount namespace (runs in the init process).

Order (as runc's prepareRootfs/finalizeRootfs, and the reasons):

1. ``/`` becomes rslave (or the config's rootfsPropagation) so nothing mounted here leaks to the host;
2. the rootfs is bind-mounted onto itself: pivot_root(2) needs new_root to be a mount point;
3. config mounts, then the minimal /dev in the tmpfs the config mounts there;
4. namespaced sysctls, read-only paths, masked paths, the read-only remount of ``/``;
5. ``pivot_root(".", ".")`` then a lazy unmount of the old root: the host tree is gone from the
   namespace (never chroot, which a root process escapes with a second chroot).

**No path is walked twice.** Every path the config (or the image under the rootfs) controls is
resolved once, by the kernel, with ``openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`` from a file
descriptor of the rootfs: symlinks and ``..`` resolve as if the rootfs were ``/``, and ``/proc``
magic links are refused. Mounts are then made *on that file descriptor* with the fd-based mount API
(``open_tree``/``fsopen``/``fsmount`` then ``move_mount`` to the fd, ``mount_setattr`` on the new
mount's own fd), so a symlink swapped into the path after the check cannot redirect a mount to the
host (the CVE-2021-30465 class), and no remount ever walks the path again.

**What the runtime writes, and where.** A missing mount point is created only on the rootfs's own
mount or in a tmpfs this runtime mounted in this container; never through a bind mount (that would
write into the host's files) nor anywhere else. Device nodes and the /dev symlinks are created only
in the tmpfs the runtime mounted at ``/dev`` itself; if something else is at ``/dev`` (a bind of
the host's /dev, for one) it is left alone. Nothing is ever unlinked or overwritten: a path that
already exists is kept as it is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass

from virtkit.container.config import Config, Device, Mount
from virtkit.errors import ContainerError
from virtkit.host import mounts

_M = mounts

#: options that set or clear a per-mount attribute: option -> (MOUNT_ATTR_* to set, to clear)
ATTR_OPTIONS: dict[str, tuple[int, int]] = {
    "ro": (_M.MOUNT_ATTR_RDONLY, 0),
    "rw": (0, _M.MOUNT_ATTR_RDONLY),
    "nosuid": (_M.MOUNT_ATTR_NOSUID, 0),
    "suid": (0, _M.MOUNT_ATTR_NOSUID),
    "nodev": (_M.MOUNT_ATTR_NODEV, 0),
    "dev": (0, _M.MOUNT_ATTR_NODEV),
    "noexec": (_M.MOUNT_ATTR_NOEXEC, 0),
    "exec": (0, _M.MOUNT_ATTR_NOEXEC),
    "noatime": (_M.MOUNT_ATTR_NOATIME, _M.MOUNT_ATTR__ATIME),
    "strictatime": (_M.MOUNT_ATTR_STRICTATIME, _M.MOUNT_ATTR__ATIME),
    "relatime": (_M.MOUNT_ATTR_RELATIME, _M.MOUNT_ATTR__ATIME),
    # the kernel's default when neither noatime nor strictatime is asked for is relatime
    "atime": (_M.MOUNT_ATTR_RELATIME, _M.MOUNT_ATTR__ATIME),
    "norelatime": (_M.MOUNT_ATTR_RELATIME, _M.MOUNT_ATTR__ATIME),
    "nostrictatime": (_M.MOUNT_ATTR_RELATIME, _M.MOUNT_ATTR__ATIME),
    "nodiratime": (_M.MOUNT_ATTR_NODIRATIME, 0),
    "diratime": (0, _M.MOUNT_ATTR_NODIRATIME),
    "nosymfollow": (_M.MOUNT_ATTR_NOSYMFOLLOW, 0),
    "symfollow": (0, _M.MOUNT_ATTR_NOSYMFOLLOW),
}
#: superblock flags: passed to a new filesystem (fsconfig), ignored for bind mounts as mount(2) does
SB_OPTIONS = ("sync", "async", "dirsync", "lazytime", "nolazytime", "mand", "nomand")
PROPAGATION: dict[str, tuple[int, bool]] = {
    "private": (_M.MS_PRIVATE, False),
    "rprivate": (_M.MS_PRIVATE, True),
    "slave": (_M.MS_SLAVE, False),
    "rslave": (_M.MS_SLAVE, True),
    "unbindable": (_M.MS_UNBINDABLE, False),
    "runbindable": (_M.MS_UNBINDABLE, True),
    # config.py refuses these two: a shared mount would show the container's mounts on the host
    "shared": (_M.MS_SHARED, False),
    "rshared": (_M.MS_SHARED, True),
}
#: options runtimes accept and ignore (runc: "tmpcopyup" is a runc extension, others are fs hints)
IGNORED_OPTIONS = ("tmpcopyup", "defaults")

#: the minimal /dev (runtime-spec config-linux.md "Default Devices")
DEFAULT_DEVICES: tuple[Device, ...] = (
    Device("/dev/null", "c", 1, 3, 0o666, 0, 0),
    Device("/dev/zero", "c", 1, 5, 0o666, 0, 0),
    Device("/dev/full", "c", 1, 7, 0o666, 0, 0),
    Device("/dev/random", "c", 1, 8, 0o666, 0, 0),
    Device("/dev/urandom", "c", 1, 9, 0o666, 0, 0),
    Device("/dev/tty", "c", 5, 0, 0o666, 0, 0),
)
DEV_SYMLINKS = (
    ("/proc/self/fd", "fd"),
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
    ("pts/ptmx", "ptmx"),
    ("/proc/kcore", "core"),
)
DEV_DIRS = ("pts", "shm")

#: resolve as if the rootfs were /, and never through /proc/PID/fd-style magic links
IN_ROOT = _M.RESOLVE_IN_ROOT | _M.RESOLVE_NO_MAGICLINKS
#: one step below a directory we hold: no symlink, no magic link, no other mount
STRICT = _M.RESOLVE_BENEATH | _M.RESOLVE_NO_SYMLINKS | _M.RESOLVE_NO_MAGICLINKS | _M.RESOLVE_NO_XDEV


@dataclass(frozen=True, slots=True)
class MountOptions:
    bind: bool = False
    recursive: bool = False
    attr_set: int = 0
    attr_clr: int = 0
    propagation: int = 0
    propagation_recursive: bool = False
    sb_flags: tuple[str, ...] = ()
    data: tuple[str, ...] = ()


def split_options(options: tuple[str, ...]) -> MountOptions:
    """mount(8) options -> what the fd-based mount API takes, later options overriding earlier ones."""
    bind = recursive = prop_rec = False
    attr_set = attr_clr = prop = 0
    sb: list[str] = []
    data: list[str] = []
    for opt in options:
        if opt in ("bind", "rbind"):
            bind = True
            recursive = recursive or opt == "rbind"
        elif opt in ATTR_OPTIONS:
            s, c = ATTR_OPTIONS[opt]
            if c == _M.MOUNT_ATTR__ATIME:  # one of three values (relatime is 0), not a bit
                attr_set = (attr_set & ~c) | s
                attr_clr |= c
            elif s:
                attr_set |= s
                attr_clr &= ~s
            else:
                attr_set &= ~c
                attr_clr |= c
        elif opt in PROPAGATION:
            prop, prop_rec = PROPAGATION[opt]
        elif opt in SB_OPTIONS:
            sb.append(opt)
        elif opt in IGNORED_OPTIONS:
            continue
        elif opt == "remount":
            raise ContainerError("mount option 'remount' is not supported: describe the mount as it should be")
        else:
            data.append(opt)
    return MountOptions(bind, recursive, attr_set, attr_clr, prop, prop_rec, tuple(sb), tuple(data))


# --------------------------------------------------------------------------------------------
# paths inside the rootfs, resolved by the kernel


def _rel(path: str) -> str:
    return path.strip("/") or "."


def open_in_root(root_fd: int, path: str, flags: int = os.O_PATH) -> int:
    """An fd of ``path`` resolved inside ``root_fd`` (symlinks and ``..`` never leave it)."""
    return mounts.openat2(root_fd, _rel(path), flags, IN_ROOT)


def make_target(root_fd: int, path: str, *, directory: bool, writable: set[int]) -> int:
    """An O_PATH fd of ``path`` inside ``root_fd``, for a mount to be made on.

    What is missing is created (directories, and the last component as an empty file when
    ``directory`` is false), but only on a mount whose id is in ``writable``: the runtime never
    creates anything through a bind mount from the host, or on any mount it did not make."""
    try:
        return open_in_root(root_fd, path)
    except FileNotFoundError:
        pass
    parts = _rel(path).split("/")
    parent = -1
    for depth in range(len(parts) - 1, -1, -1):  # the deepest ancestor that exists
        try:
            parent = open_in_root(root_fd, "/".join(parts[:depth]), os.O_PATH | os.O_DIRECTORY)
            break
        except FileNotFoundError:
            continue
    if parent < 0:  # pragma: no cover - the root itself always exists
        raise ContainerError(f"cannot resolve {path} in the rootfs")
    try:
        if mounts.mount_id(parent) not in writable:
            raise ContainerError(
                f"{path} does not exist, and its parent is on a mount the runtime did not make "
                "(a bind mount, or a filesystem of the host): create it there, or mount "
                "elsewhere"
            )
        missing = parts[depth:]
        for i, name in enumerate(missing):
            last = i == len(missing) - 1
            with contextlib.suppress(FileExistsError):  # made by a racing writer: checked by the open below
                if last and not directory:
                    os.close(
                        os.open(
                            name,
                            os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                            0o644,
                            dir_fd=parent,
                        )
                    )
                else:
                    os.mkdir(name, 0o755, dir_fd=parent)
            flags = os.O_PATH | (os.O_DIRECTORY if directory or not last else 0)
            nxt = mounts.openat2(parent, name, flags, STRICT)
            os.close(parent)
            parent = nxt
        return parent
    except BaseException:
        os.close(parent)
        raise


def _is_dir(fd: int) -> bool:
    return stat.S_ISDIR(os.fstat(fd).st_mode)


def _open_host_device(path: str, kind: str, major: int, minor: int) -> int:
    """An O_PATH fd of the host's device node ``path``, checked to be the device the config names."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    want = stat.S_ISBLK if kind == "b" else stat.S_ISCHR
    if not want(st.st_mode) or st.st_rdev != os.makedev(major, minor):
        os.close(fd)
        raise ContainerError(
            f"{path} on the host is not the {'block' if kind == 'b' else 'character'} device "
            f"{major}:{minor} the config names"
        )
    return fd


class RootfsBuilder:
    """Runs in the container's init, in its private mount namespace, before the process starts.

    ``cgroup_dirs`` are the container's own cgroup directories on the host (controller, or
    ``unified``, -> directory): a ``cgroup`` mount shows exactly those, nothing above them."""

    def __init__(
        self,
        config: Config,
        rootfs: str,
        userns: bool,
        cgroup_dirs: dict[str, str] | None = None,
        layout_mode: str | None = None,
    ) -> None:
        self.config = config
        self.rootfs = rootfs
        self.userns = userns
        self.cgroup_dirs = dict(cgroup_dirs or {})
        self.layout_mode = layout_mode
        self.root_fd = -1  # the root of the rootfs bind mount (O_PATH); everything resolves from it
        self.writable: set[int] = set()  # mounts (ids) where missing mount points may be created
        self.tmpfs_roots: dict[int, int] = {}  # tmpfs instances we mounted: mount id -> inode of their root

    # 1-3 ------------------------------------------------------------------------------------
    def prepare(self) -> None:
        prop = PROPAGATION.get(self.config.linux.rootfs_propagation or "rslave", (_M.MS_SLAVE, True))[0]
        # an unbindable tree cannot be bind-mounted (the rootfs, the config's binds): build it as
        # a slave, and make the new root unbindable once it is in place (pivot)
        mounts.mount(None, "/", None, (_M.MS_SLAVE if prop == _M.MS_UNBINDABLE else prop) | _M.MS_REC)
        self._bind_rootfs()
        for i, m in enumerate(self.config.mounts):
            self._mount(i, m)
        self._make_dev()
        self._make_cwd()

    def _make_cwd(self) -> None:
        """A missing ``process.cwd`` is created, as runc and crun do (before a read-only root is
        remounted), under the same rule as a mount point: only on a mount this runtime made."""
        cwd = self.config.process.cwd
        if cwd in ("", "/"):
            return
        try:
            fd = make_target(self.root_fd, cwd, directory=True, writable=self.writable)
        except NotADirectoryError:
            raise ContainerError(f"process.cwd {cwd} is not a directory in the container") from None
        os.close(fd)

    def _bind_rootfs(self) -> None:
        try:
            src = os.open(self.rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except PermissionError:
            if not self.userns:
                raise
            raise ContainerError(
                f"the container's root user cannot reach the rootfs {self.rootfs}: in a user "
                "namespace every parent directory must be searchable by the mapped ids "
                "(chmod o+x)"
            ) from None
        try:
            st, host_root = os.fstat(src), os.stat("/")
            if (st.st_dev, st.st_ino) == (host_root.st_dev, host_root.st_ino):
                raise ContainerError(
                    f"the rootfs {self.rootfs} is the host's / : a container needs a rootfs directory of its own"
                )
            tree = mounts.open_tree(src, recursive=True)
            try:
                mounts.move_mount(tree, src)
            except BaseException:
                os.close(tree)
                raise
        finally:
            os.close(src)
        self.root_fd = tree  # the fd of the new mount's root: pivot_root and every path start here
        self.writable.add(mounts.mount_id(tree))

    def _mount(self, index: int, m: Mount) -> None:
        opts = split_options(m.options)
        kind = m.type or ("bind" if opts.bind else None)
        bind = kind == "bind" or opts.bind
        where = f"mounts[{index}] ({m.destination})"
        try:
            if kind in ("cgroup", "cgroup2") and not bind:
                self._mount_cgroup(m.destination, opts)
                return
            if bind:
                mnt = self._bind_source(m, opts)
            else:
                if kind is None:
                    raise ContainerError(f"{where} needs a type (tmpfs, proc, bind...)")
                mnt = self._new_fs(kind, m, opts)
            try:
                target = make_target(self.root_fd, m.destination, directory=_is_dir(mnt), writable=self.writable)
                try:
                    mounts.move_mount(mnt, target)
                finally:
                    os.close(target)
                if opts.propagation:
                    mounts.mount_setattr(mnt, 0, 0, opts.propagation, recursive=opts.propagation_recursive)
                if kind == "tmpfs" and not bind:
                    mid = mounts.mount_id(mnt)
                    self.writable.add(mid)
                    self.tmpfs_roots[mid] = os.fstat(mnt).st_ino
            finally:
                os.close(mnt)
        except OSError as err:
            raise ContainerError(
                f"cannot mount {kind or ''} on {m.destination} ({where}): {err.strerror or err}"
            ) from None
        except ContainerError as err:
            msg = str(err)
            raise ContainerError(msg if m.destination in msg else f"{where}: {msg}") from None

    def _new_fs(self, kind: str, m: Mount, opts: MountOptions) -> int:
        """A new instance of ``kind``, detached, with the config's options."""
        try:
            return mounts.fs_mount(kind, m.source or kind, [*opts.sb_flags, *opts.data], opts.attr_set)
        except OSError as err:
            # in a user namespace that does not own the network (ipc) namespace, sysfs (mqueue)
            # cannot be mounted: bind the host's instead, read-only, as runc does
            if not (self.userns and err.errno == errno.EPERM and kind in ("sysfs", "mqueue")):
                raise
        src = os.open("/sys" if kind == "sysfs" else "/dev/mqueue", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            tree = mounts.open_tree(src, recursive=True)
        finally:
            os.close(src)
        mounts.mount_setattr(tree, opts.attr_set | _M.MOUNT_ATTR_RDONLY, 0, recursive=True)
        return tree

    def _bind_source(self, m: Mount, opts: MountOptions) -> int:
        """A detached copy of the bind source (a host path the config names), with its flags set.
        The runtime reads the source; it never writes into it."""
        source = m.source or ""
        try:
            src = os.open(source, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            raise ContainerError(f"bind mount source {source!r} for {m.destination} does not exist") from None
        try:
            tree = mounts.open_tree(src, recursive=opts.recursive)
        finally:
            os.close(src)
        try:
            if opts.attr_set or opts.attr_clr:
                # on a bind mount every flag is per mount: set them on the copy before it is attached
                mounts.mount_setattr(tree, opts.attr_set, opts.attr_clr)
        except BaseException:
            os.close(tree)
            raise
        return tree

    def _mount_cgroup(self, dest: str, opts: MountOptions) -> None:
        """The container's own cgroups and nothing above them: a bind mount of each of its cgroup
        directories (on v2 the one directory at ``dest``; on v1/hybrid a tmpfs at ``dest`` holding
        one per controller). Whether or not the container has a cgroup namespace, writing
        ``cgroup.procs`` there can only move a process within the container's own subtree."""
        attrs = opts.attr_set | _M.MOUNT_ATTR_NOSUID | _M.MOUNT_ATTR_NODEV | _M.MOUNT_ATTR_NOEXEC
        if self.layout_mode == "v2" and "unified" in self.cgroup_dirs:
            mnt = self._bind_cgroup_dir(self.cgroup_dirs["unified"], attrs, opts.attr_clr)
            try:
                target = make_target(self.root_fd, dest, directory=True, writable=self.writable)
                try:
                    mounts.move_mount(mnt, target)
                finally:
                    os.close(target)
            finally:
                os.close(mnt)
            return
        tmp = mounts.fs_mount("tmpfs", "tmpfs", ["mode=755", "size=64k"], attrs & ~_M.MOUNT_ATTR_RDONLY)
        try:
            for name, d in sorted(self.cgroup_dirs.items()):
                os.mkdir(name, 0o755, dir_fd=tmp)
                sub = mounts.openat2(tmp, name, os.O_PATH | os.O_DIRECTORY, STRICT)
                try:
                    mnt = self._bind_cgroup_dir(d, attrs, opts.attr_clr)
                    try:
                        mounts.move_mount(mnt, sub)
                    finally:
                        os.close(mnt)
                finally:
                    os.close(sub)
            if attrs & _M.MOUNT_ATTR_RDONLY:
                mounts.mount_setattr(tmp, _M.MOUNT_ATTR_RDONLY)
            target = make_target(self.root_fd, dest, directory=True, writable=self.writable)
            try:
                mounts.move_mount(tmp, target)
            finally:
                os.close(target)
        finally:
            os.close(tmp)

    @staticmethod
    def _bind_cgroup_dir(path: str, attr_set: int, attr_clr: int) -> int:
        src = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if mounts.fstatfs_type(src) not in (_M.CGROUP_SUPER_MAGIC, _M.CGROUP2_SUPER_MAGIC):
                raise ContainerError(f"{path} is not a cgroup directory")
            tree = mounts.open_tree(src, recursive=False)
        finally:
            os.close(src)
        try:
            mounts.mount_setattr(tree, attr_set, attr_clr)
        except BaseException:
            os.close(tree)
            raise
        return tree

    # /dev -------------------------------------------------------------------------------------
    def _dev_fd(self) -> int | None:
        """An fd of the container's /dev if it is the root of a tmpfs this runtime mounted, else None."""
        try:
            fd = open_in_root(self.root_fd, "/dev", os.O_PATH | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        mid = mounts.mount_id(fd)
        if self.tmpfs_roots.get(mid) == os.fstat(fd).st_ino and mounts.fstatfs_type(fd) == _M.TMPFS_MAGIC:
            return fd
        os.close(fd)
        return None

    def _make_dev(self) -> None:
        """Device nodes, /dev symlinks and /dev/pts, /dev/shm: only in our own tmpfs at /dev."""
        dev = self._dev_fd()
        if dev is None:
            if self.config.linux.devices:  # config.py refuses this; the mount table is what counts
                raise ContainerError(
                    "linux.devices needs a tmpfs mounted at /dev: the container's /dev is "
                    "something else (a bind mount, or nothing), and virtkit never makes device "
                    "nodes there"
                )
            return  # /dev is not ours (the host's, or the image's): leave it as it is
        old = os.umask(0)
        try:
            wanted: dict[str, tuple[Device, bool]] = {d.path: (d, False) for d in DEFAULT_DEVICES}
            wanted.update((d.path, (d, True)) for d in self.config.linux.devices)  # the config's win
            for d, explicit in wanted.values():
                self._make_device(dev, d, explicit)
            for target, name in DEV_SYMLINKS:
                with contextlib.suppress(FileExistsError):  # something the config mounted there: keep it
                    os.symlink(target, name, dir_fd=dev)
            for name in DEV_DIRS:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=dev)
        finally:
            os.umask(old)
            os.close(dev)

    def _make_device(self, dev: int, d: Device, explicit: bool) -> None:
        parts = d.path[len("/dev/") :].split("/")
        parent = os.dup(dev)
        try:
            for name in parts[:-1]:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=parent)
                nxt = mounts.openat2(parent, name, os.O_PATH | os.O_DIRECTORY, STRICT)
                os.close(parent)
                parent = nxt
            name = parts[-1]
            kinds = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}
            mode = d.file_mode if d.file_mode is not None else 0o666
            try:
                if self.userns and d.type != "p":
                    # mknod is refused in a user namespace: bind the host's node instead (runc does the same)
                    os.close(
                        os.open(
                            name,
                            os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                            0o600,
                            dir_fd=parent,
                        )
                    )
                else:
                    os.mknod(name, kinds[d.type] | mode, os.makedev(d.major, d.minor), dir_fd=parent)
            except FileExistsError:
                # a mount the config made there (never unlink it); an explicit device cannot be honoured
                if explicit:
                    raise ContainerError(
                        f"linux.devices: {d.path} is already taken in the container's /dev (by a mount in the config)"
                    ) from None
                return
            if self.userns and d.type != "p":
                src = _open_host_device(d.path, "b" if d.type == "b" else "c", d.major, d.minor)
                try:
                    tree = mounts.open_tree(src, recursive=False)
                finally:
                    os.close(src)
                try:
                    # a device node is opened, never executed or setuid (runc and crun: nosuid,noexec)
                    mounts.mount_setattr(tree, _M.MOUNT_ATTR_NOSUID | _M.MOUNT_ATTR_NOEXEC)
                    target = mounts.openat2(parent, name, os.O_PATH, STRICT)
                    try:
                        mounts.move_mount(tree, target)
                    finally:
                        os.close(target)
                finally:
                    os.close(tree)
                return
            os.chown(name, d.uid or 0, d.gid or 0, dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)

    # 4 --------------------------------------------------------------------------------------
    def set_sysctls(self) -> None:
        """Write the config's sysctls (config.py admits only namespaced ones, in namespaces the
        container has). The init already lives in those namespaces, and a namespaced sysctl file
        acts on the namespace of whoever opens it, so the host's procfs is used: it is trusted
        (no symlink or mount of the container's can be in it), opened without following symlinks
        and checked to be procfs."""
        if not self.config.linux.sysctl:
            return
        proc = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if mounts.fstatfs_type(proc) != _M.PROC_SUPER_MAGIC:
                raise ContainerError("/proc of the runtime is not procfs: cannot set sysctls")
            for key, value in self.config.linux.sysctl:
                try:
                    fd = mounts.openat2(proc, "sys/" + key.replace(".", "/"), os.O_WRONLY | os.O_NOFOLLOW, STRICT)
                    try:
                        if mounts.fstatfs_type(fd) != _M.PROC_SUPER_MAGIC:
                            raise OSError(errno.EINVAL, "not a sysctl file")
                        os.write(fd, value.encode())
                    finally:
                        os.close(fd)
                except OSError as err:
                    raise ContainerError(f"cannot set sysctl {key}={value}: {err.strerror}") from None
        finally:
            os.close(proc)

    def protect(self) -> None:
        """Read-only paths, masked paths, then the read-only remount of the rootfs."""
        for path in self.config.linux.readonly_paths:
            self.readonly(path)
        for path in self.config.linux.masked_paths:
            self.mask(path)
        if self.config.root_readonly:
            mounts.mount_setattr(self.root_fd, _M.MOUNT_ATTR_RDONLY)

    def _existing(self, path: str) -> int | None:
        try:
            return open_in_root(self.root_fd, path)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def readonly(self, path: str) -> None:
        fd = self._existing(path)
        if fd is None:
            return
        try:
            tree = mounts.open_tree(fd, recursive=True)
            try:
                mounts.mount_setattr(tree, _M.MOUNT_ATTR_RDONLY, recursive=True)
                mounts.move_mount(tree, fd)
            finally:
                os.close(tree)
        except OSError as err:
            raise ContainerError(f"cannot make {path} read-only: {err.strerror}") from None
        finally:
            os.close(fd)

    def mask(self, path: str) -> None:
        fd = self._existing(path)
        if fd is None:
            return
        try:
            if _is_dir(fd):
                cover = mounts.fs_mount("tmpfs", "tmpfs", [], _M.MOUNT_ATTR_RDONLY)  # empty, read-only
            else:
                null = _open_host_device("/dev/null", "c", 1, 3)
                try:
                    cover = mounts.open_tree(null, recursive=False)
                finally:
                    os.close(null)
            try:
                mounts.move_mount(cover, fd)
            finally:
                os.close(cover)
        except OSError as err:
            raise ContainerError(f"cannot mask {path}: {err.strerror}") from None
        finally:
            os.close(fd)

    # 5 --------------------------------------------------------------------------------------
    def pivot(self) -> None:
        os.fchdir(self.root_fd)
        mounts.pivot_root(".", ".")
        # the old root is now stacked under "."; make it a slave so the detach cannot propagate
        mounts.mount(None, ".", None, _M.MS_SLAVE | _M.MS_REC)
        mounts.umount2(".", _M.MNT_DETACH)
        os.chdir("/")
        if PROPAGATION.get(self.config.linux.rootfs_propagation or "", (0, False))[0] == _M.MS_UNBINDABLE:
            mounts.mount(None, "/", None, _M.MS_UNBINDABLE | _M.MS_REC)
        os.close(self.root_fd)
        self.root_fd = -1
