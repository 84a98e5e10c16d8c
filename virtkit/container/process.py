"""The processes a container is made of, from ``fork`` to ``execve``.

``create`` makes three generations (the runtime, R, stays the caller):

* **monitor** (R's child): leaves R's session, becomes a child subreaper, forks the next stage and
  then waits for the container's init. It records the exit status and whether the OOM killer
  struck in ``exit.json``, for ``state``/``events``/``run``. It never enters a namespace.
* **setup** (the monitor's child): joins the cgroups, creates the user namespace (R writes its id
  maps), joins or creates the other namespaces, and forks the init, which ``CLONE_NEWPID`` makes
  PID 1. It reports the init's pid to R and exits; the init is reparented to the monitor.
* **init** (PID 1): builds the rootfs, sets hostname, sysctls, rlimits, user and capabilities,
  reports ``ready`` to R, then blocks on ``exec.fifo`` until ``start`` writes to it, and execs the
  container's process.

``exec`` makes two: one process joins the namespaces (and cgroups) of the init, its child is in the
PID namespace and execs. Everything runs in forked copies of the runtime: nothing may be imported
after ``pivot_root``/``setns``, and a child never returns into the caller's stack (``os._exit``).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import os
import resource
import signal
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Any

from virtkit.container.cgroups import Cgroup
from virtkit.container.config import Capabilities, Config, Process, User
from virtkit.container.rootfs import RootfsBuilder
from virtkit.errors import ContainerError
from virtkit.host import caps as capsmod
from virtkit.host import libc, ns

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# ------------------------------------------------------------------------------------------
# the message channel between R and its children: an AF_UNIX SOCK_SEQPACKET pair, JSON messages


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def pair(cls) -> tuple[Channel, Channel]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a), cls(b)

    def send(self, fds: list[int] | None = None, **msg: Any) -> None:
        if fds:
            socket.send_fds(self.sock, [json.dumps(msg).encode()], fds)
        else:
            self.sock.send(json.dumps(msg).encode())

    def recv(self, timeout: float | None = 60.0) -> dict[str, Any] | None:
        """The next message, or None when every peer has closed its end. File descriptors passed
        with it (SCM_RIGHTS: a terminal's master side) are in ``msg["fds"]``."""
        self.sock.settimeout(timeout)
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 65536, 4)
        except TimeoutError:
            raise ContainerError(f"container setup did not answer within {timeout:.0f}s") from None
        if not data:
            return None
        msg: dict[str, Any] = json.loads(data)
        if fds:
            msg["fds"] = list(fds)
        return msg

    def close(self) -> None:
        self.sock.close()


def _report_and_exit(chan: Channel | None, err: BaseException, status: int = 1) -> None:
    """The last thing a failing child does: tell R in one line, then leave without unwinding."""
    try:
        if isinstance(err, OSError) and err.strerror:
            msg = err.strerror
            if err.filename and str(err.filename) not in msg:
                msg += f" ({err.filename})"
        else:
            msg = str(err) or type(err).__name__
        if chan is not None:
            chan.send(error=msg)
        else:
            os.write(2, f"virtkit: error: {msg}\n".encode())
    except BaseException:
        pass
    finally:
        os._exit(status)


# ------------------------------------------------------------------------------------------
# what R hands to its children (all computed before fork: nothing may be imported after)


@dataclass(slots=True)
class InitSpec:
    config: Config
    rootfs: str
    state_dir: str
    fifo: str
    cgroup: Cgroup | None
    seccomp: bytes | None
    log_path: str | None
    new_ns: int  # CLONE_NEW* flags of namespaces to create (user excluded)
    join_ns: list[tuple[int, int]]  # (flag, fd) of namespaces to join, opened and checked by R
    new_userns: bool
    net: dict[str, Any] | None = None  # container side of a bridge network: name, address, gateway
    runtime_hooks: bool = False  # createRuntime/prestart hooks: R runs them before pivot_root
    preserve_fds: int = 0  # fds 3..3+N-1 of the caller go on to the container's process (--preserve-fds)
    # True: the monitor does not stay; the init is reparented to the caller's subreaper (conmon,
    # containerd-shim) or to PID 1, which then reaps it and reads its exit status, as with runc
    handover: bool = False


@dataclass(slots=True)
class ExecSpec:
    process: Process
    init_pid: int
    namespaces: list[tuple[int, int]]  # (flag, fd of /proc/PID/ns/NAME opened by R) in join order
    cgroup: Cgroup | None
    seccomp: bytes | None
    preserve_fds: int = 0
    # detached: the joining process exits at once, so the process is reparented to the caller's
    # subreaper (conmon reaps it and reads its exit status, as with runc exec --detach)
    handover: bool = False


# ------------------------------------------------------------------------------------------
# small pieces used by init and exec


def lookup_executable(process: Process) -> str:
    """Find args[0] with the container's PATH, in the container's root (OCI: like execvp)."""
    name = process.args[0]
    if "/" in name:
        path = name if name.startswith("/") else os.path.join(process.cwd, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
        raise ContainerError(f"{name}: no such executable in the container")
    env_path = next((e[5:] for e in process.env if e.startswith("PATH=")), DEFAULT_PATH)
    for d in env_path.split(":"):
        candidate = os.path.join(d or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise ContainerError(f"{name}: executable file not found in $PATH of the container")


def home_of(uid: int, passwd: str = "/etc/passwd") -> str | None:
    """The home directory of ``uid`` in the container's passwd file (read after pivot_root, as
    the container's user): a regular file, at most 1 MiB, opened without blocking on a FIFO."""
    try:
        fd = os.open(passwd, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, 1 << 20)
    except OSError:
        return None
    finally:
        os.close(fd)
    want = str(uid).encode()
    for line in data.split(b"\n"):
        fields = line.split(b":")
        if len(fields) >= 7 and fields[2] == want and fields[5]:
            return fields[5].decode(errors="replace")
    return None


def environment(process: Process) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in process.env:
        key, _, value = item.partition("=")
        env[key] = value
    if "HOME" not in env:
        # runc and crun: the user's home from the container's /etc/passwd, if it names one
        env["HOME"] = home_of(process.user.uid) or ("/root" if process.user.uid == 0 else "/")
    return env


def chown_stdio(user: User) -> None:
    """Give the process's user its stdio pipes and sockets (as runc's fixStdioPermissions), so it
    can reopen /proc/self/fd/N. Only anonymous pipes and sockets: a file or terminal the caller
    passed stays as it is (changing its owner would change a host file)."""
    if user.uid == 0 and user.gid == 0:
        return
    for fd in (0, 1, 2):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if (stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode)) and st.st_uid != user.uid:
            with contextlib.suppress(OSError):
                os.fchown(fd, user.uid, user.gid)


def set_rlimits(process: Process) -> None:
    for r in process.rlimits:
        which = getattr(resource, r.type)
        try:
            resource.setrlimit(which, (r.soft, r.hard))
        except (ValueError, OSError) as err:
            raise ContainerError(f"cannot set {r.type} to {r.soft}/{r.hard}: {err}") from None


def switch_user(user: User, caps: Capabilities | None) -> None:
    """Bounding set, then groups and ids (keeping capabilities across setuid), then the sets.
    The order is capabilities(7)'s: PR_SET_KEEPCAPS only survives until the sets are written."""
    if caps is not None:
        capsmod.drop_bounding(caps.bounding, capsmod.last_cap())
        libc.prctl(libc.PR_SET_KEEPCAPS, 1)
    try:
        os.setgroups(list(user.additional_gids))
    except PermissionError:
        if user.additional_gids:  # setgroups is denied in a rootless user namespace
            raise
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    if caps is not None:
        libc.prctl(libc.PR_SET_KEEPCAPS, 0)
        capsmod.apply_sets(caps.effective, caps.permitted, caps.inheritable, caps.ambient)
    os.umask(user.umask if user.umask is not None else 0o022)


def reset_signals() -> None:
    """execve keeps ignored dispositions and the mask: undo Python's (SIGPIPE, SIGXFSZ ignored)."""
    for sig in range(1, signal.NSIG):
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def exec_process(process: Process, exe: str, seccomp: bytes | None, preserve_fds: int = 0) -> None:
    """The last steps before execve: no_new_privs, seccomp, close fds, signals."""
    if process.no_new_privileges:
        libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
        if seccomp is not None:
            libc.seccomp_set_filter(seccomp)
    env = environment(process)
    libc.close_range_cloexec(3 + preserve_fds)
    reset_signals()
    os.execve(exe, list(process.args), env)


def set_oom_score_adj(process: Process) -> None:
    """Through the runtime's own /proc, before the process enters the container's mount namespace
    (whose /proc the config controls); forked children inherit the value."""
    if process.oom_score_adj is None:
        return
    fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(process.oom_score_adj).encode())
    finally:
        os.close(fd)


def prepare_process(process: Process, seccomp: bytes | None) -> str:
    """Everything up to the exec that may fail with a message for R; returns the executable."""
    set_rlimits(process)
    try:
        os.chdir(process.cwd)
        chdir_later = False
    except PermissionError:
        chdir_later = True
    except FileNotFoundError:
        raise ContainerError(
            f"process.cwd {process.cwd} does not exist in the container (chdir: No such file or directory)"
        ) from None
    except NotADirectoryError:
        raise ContainerError(f"process.cwd {process.cwd} is not a directory (chdir: Not a directory)") from None
    exe = lookup_executable(process)
    chown_stdio(process.user)
    if seccomp is not None and not process.no_new_privileges:
        # without no_new_privs, installing a filter needs CAP_SYS_ADMIN: do it before dropping it
        libc.seccomp_set_filter(seccomp)
    switch_user(process.user, process.capabilities)
    if chdir_later:
        os.chdir(process.cwd)
    return exe


# --- terminals (asm-generic/ioctls.h) ---------------------------------------------------------
TIOCSCTTY = 0x540E
TIOCSWINSZ = 0x5414
TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431


def open_terminal(process: Process) -> int:
    """Make a pseudo-terminal in the container's devpts and make its slave side our stdio and
    controlling terminal; return the master side (for R, who hands it on or proxies it)."""
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))  # unlockpt
    number = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))[0]
    slave = os.open(f"/dev/pts/{number}", os.O_RDWR | os.O_NOCTTY)
    with contextlib.suppress(OSError):  # the user owns its terminal, as after a login
        os.fchown(slave, process.user.uid, process.user.gid)
    if process.console_size:
        rows, cols = process.console_size
        fcntl.ioctl(slave, TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    os.close(slave)
    fcntl.ioctl(0, TIOCSCTTY, 0)  # we are a session leader: this becomes our controlling tty
    return master


_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_SIOCSIFADDR = 0x8916
_SIOCSIFNETMASK = 0x891C
_SIOCADDRT = 0x890B
_SIOCSIFNAME = 0x8923
_IFF_UP = 0x1


def link_up(name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH14x", name.encode(), 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH14x", name.encode(), flags | _IFF_UP))


def rename_link(old: str, new: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), _SIOCSIFNAME, struct.pack("16s16s8x", old.encode(), new.encode()))


def configure_interface(name: str, address: str, prefix: int, gateway: str | None) -> None:
    """Address, netmask, up and default route with plain ioctls (netlink libraries may import lazily)."""

    def sockaddr(ip: str) -> bytes:
        return struct.pack("<H2s4s8x", socket.AF_INET, b"\0\0", socket.inet_aton(ip))

    mask = socket.inet_ntoa(struct.pack(">I", (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), _SIOCSIFADDR, struct.pack("16s", name.encode()) + sockaddr(address))
        fcntl.ioctl(s.fileno(), _SIOCSIFNETMASK, struct.pack("16s", name.encode()) + sockaddr(mask))
        link_up(name)
        if gateway:
            # struct rtentry: pad, dst, gateway, genmask, flags (RTF_UP|RTF_GATEWAY), ...
            rt = (
                struct.pack("<Q", 0)
                + sockaddr("0.0.0.0")
                + sockaddr(gateway)
                + sockaddr("0.0.0.0")
                + struct.pack("<H", 0x3)
                + b"\0" * 6
                + b"\0" * 8 * 2
                + b"\0" * 8
                + b"\0" * 8 * 3
            )
            rt = rt.ljust(120, b"\0")
            fcntl.ioctl(s.fileno(), _SIOCADDRT, rt)


# ------------------------------------------------------------------------------------------
# create: monitor -> setup -> init


def _after_fork() -> None:
    """A forked child runs a few milliseconds of Python: no garbage collection, whose passes would
    write to (and so copy) most of the parent's pages."""
    gc.disable()


def monitor_main(spec: InitSpec, chan: Channel, exit_w: int, dir_fd: int) -> None:
    """Runs in R's child; never returns."""
    _after_fork()
    try:
        os.setsid()
        if not spec.handover:
            libc.prctl(libc.PR_SET_CHILD_SUBREAPER, 1)
        libc.prctl(libc.PR_SET_DUMPABLE, 0)
        oom_before = spec.cgroup.oom_kills() if spec.cgroup else 0
        setup_pid = os.fork()
        if setup_pid == 0:
            os.close(exit_w)
            os.close(dir_fd)
            setup_main(spec, chan)
        chan.close()
        if spec.handover:
            # setup exits once it has forked the init; with no subreaper here, the kernel then
            # hands the init to the nearest subreaper above us (the caller's), as runc's init is
            os.waitpid(setup_pid, 0)
            os._exit(0)
        for _flag, fd in spec.join_ns:  # setup's to use: held here they would pin the namespaces
            os.close(fd)
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        # the caller's other descriptors (--preserve-fds, a pipe it reads to EOF) are the
        # container's to hold: the monitor outlives the caller and must not keep them open
        keep = sorted((exit_w, dir_fd))
        os.closerange(3, keep[0])
        os.closerange(keep[0] + 1, keep[1])
        os.closerange(keep[1] + 1, 65536)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        status = None
        while True:
            try:
                pid, st = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid != setup_pid:
                status = st
        if status is None:
            os._exit(0)
        code = os.waitstatus_to_exitcode(status)
        oom = (spec.cgroup.oom_kills() if spec.cgroup else 0) > oom_before
        info = {
            "exitStatus": code if code >= 0 else 128 - code,
            "signal": -code if code < 0 else None,
            "oomKilled": oom,
        }
        data = json.dumps(info).encode()
        try:
            fd = os.open(".exit.json.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd)
            os.write(fd, data)
            os.close(fd)
            os.rename(".exit.json.tmp", "exit.json", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            os.write(exit_w, data)
    except BaseException as err:  # noqa: BLE001 - a forked child must never unwind into R
        _report_and_exit(chan, err)
    os._exit(0)


def setup_main(spec: InitSpec, chan: Channel) -> None:
    try:
        # opened while still host root: in a user namespace, the state directory is out of reach
        fifo = os.open(spec.fifo, os.O_RDWR | os.O_CLOEXEC)
        log = -1
        if spec.log_path is not None:
            log = os.open(spec.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        if spec.cgroup is not None:
            spec.cgroup.join(os.getpid())
        for flag, fd in spec.join_ns:  # the user namespace comes first in join_ns
            ns.setns(fd, flag)
            os.close(fd)
        if spec.new_userns:
            ns.unshare(ns.CLONE_NEWUSER)
            chan.send(userns=os.getpid())
            reply = chan.recv(timeout=30)
            if not reply or not reply.get("mapped"):
                raise ContainerError("the runtime did not write the user namespace id maps")
            try:
                os.setresgid(0, 0, 0)
                os.setresuid(0, 0, 0)
            except OSError:
                pass  # container root is not mapped: the process runs as the overflow id
        if spec.new_ns:
            ns.unshare(spec.new_ns)
        pid = os.fork()
        if pid == 0:
            init_main(spec, chan, fifo, log)
        chan.send(pid=pid)
    except BaseException as err:  # noqa: BLE001
        _report_and_exit(chan, err)
    os._exit(0)


def init_main(spec: InitSpec, chan: Channel, fifo: int, log: int) -> None:
    cfg = spec.config
    try:
        os.setsid()
        set_oom_score_adj(cfg.process)
        if log >= 0:
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.close(log)
            os.close(null)
        if spec.new_ns & ns.CLONE_NEWNET:
            link_up("lo")
            if spec.net:
                reply = chan.recv(timeout=30)  # R has moved our end of the veth pair in
                if not reply or not reply.get("net"):
                    raise ContainerError("the runtime did not set up the network")
                n = spec.net
                rename_link(n["peer_if"], n["ifname"])
                configure_interface(n["ifname"], n["address"], n["prefix"], n.get("gateway"))
        if spec.runtime_hooks:
            # runtime-spec: createRuntime hooks run once the namespaces exist, before pivot_root
            chan.send(hooks=True)
            reply = chan.recv(timeout=None)
            if not reply or not reply.get("go"):
                os._exit(1)  # R reports the hook's failure
        builder = RootfsBuilder(
            cfg,
            spec.rootfs,
            spec.new_userns,
            spec.cgroup.dirs if spec.cgroup else None,
            spec.cgroup.layout.mode if spec.cgroup else None,
        )
        builder.prepare()
        builder.set_sysctls()
        builder.protect()
        builder.pivot()
        if cfg.hostname is not None:
            ns.sethostname(cfg.hostname)
        if cfg.domainname is not None:
            ns.setdomainname(cfg.domainname)
        if cfg.process.terminal:
            master = open_terminal(cfg.process)
            chan.send(fds=[master], console=True)
            os.close(master)
        exe = prepare_process(cfg.process, spec.seccomp)
        chan.send(ready=True)
        chan.close()
    except BaseException as err:  # noqa: BLE001
        _report_and_exit(chan, err)
    try:
        # created: wait for 'start' (it writes one byte; EOF would mean the fifo went away)
        while True:
            try:
                got = os.read(fifo, 1)
                break
            except InterruptedError:
                continue
        if not got:
            os._exit(1)
        os.close(fifo)
        exec_process(cfg.process, exe, spec.seccomp, spec.preserve_fds)
    except BaseException as err:  # noqa: BLE001
        _report_and_exit(None, err, 127)


# ------------------------------------------------------------------------------------------
# exec: join -> child in the PID namespace


def exec_main(spec: ExecSpec, chan: Channel) -> None:
    _after_fork()
    try:
        # non-dumpable first: /proc/PID/exe of this (host) interpreter must not be reachable
        libc.prctl(libc.PR_SET_DUMPABLE, 0)
        set_oom_score_adj(spec.process)
        if spec.cgroup is not None:
            spec.cgroup.join(os.getpid())
        for flag, fd in spec.namespaces:
            ns.setns(fd, flag)
            os.close(fd)
        pid = os.fork()
        if pid == 0:
            try:
                if spec.process.terminal:
                    os.setsid()
                    master = open_terminal(spec.process)
                    chan.send(fds=[master], console=True)
                    os.close(master)
                exe = prepare_process(spec.process, spec.seccomp)
                chan.send(started=os.getpid())
                chan.close()
            except BaseException as err:  # noqa: BLE001
                _report_and_exit(chan, err)
            try:
                exec_process(spec.process, exe, spec.seccomp, spec.preserve_fds)
            except BaseException as err:  # noqa: BLE001
                _report_and_exit(None, err, 127)
        # R may already have what it needs (the child's "started") and closed its end
        with contextlib.suppress(OSError):
            chan.send(pid=pid)
        chan.close()
        if spec.handover:
            os._exit(0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        while True:
            try:
                _, st = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        code = os.waitstatus_to_exitcode(st)
        os._exit(code if code >= 0 else 128 - code)
    except BaseException as err:  # noqa: BLE001
        _report_and_exit(chan, err)
