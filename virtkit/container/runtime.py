"""The OCI runtime: create, start, state, kill, delete, run, exec, ps, list, stats, events.

This is the runtime process's side (R). The forked children are in :mod:`virtkit.container.process`,
the filesystem view in :mod:`.rootfs`, limits in :mod:`.cgroups`, persistence in :mod:`.state`.

State machine (runtime-spec runtime.md "Lifecycle"): ``creating -> created -> running -> stopped``;
``start`` only from created, ``delete`` only from stopped (created is killed first, as runc does;
running needs ``--force``), ``kill`` only from created or running.

The :class:`Runtime` object is usable as a library from a long-lived process (the warm path): it
keeps the pipe on which each container's monitor reports the exit status, and reaps its children.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pwd
import select
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

from virtkit.container.cgroups import Cgroup
from virtkit.container.config import Config, Process, User, load_bundle_raw, parse_config, parse_resources
from virtkit.container.process import Channel, ExecSpec, InitSpec, exec_main, monitor_main
from virtkit.container.signals import parse_signal
from virtkit.container.state import (
    FIFO,
    LOG_FILE,
    CorruptState,
    Record,
    StateDir,
    atomic_write,
    current_status,
    proc_start_time,
    process_alive,
    validate_id,
)
from virtkit.errors import ConfigError, ContainerError
from virtkit.host import mounts
from virtkit.host.cgroups import CgroupError, Layout, detect
from virtkit.host.ns import NAMESPACES

OCI_VERSION = "1.0.2"
CONFIG_COPY = "config.json"
#: namespaces joined by exec, in order: the user namespace first (it grants the rights to join the
#: others), the mount namespace last (after it, /proc/PID/ns paths of the host are gone)
_JOIN_ORDER = ("user", "ipc", "uts", "network", "pid", "cgroup", "mount")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def _owner() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _wait_gone(pid: int, start: int | None, timeout: float) -> bool:
    """Wait for a process (not necessarily our child) to exit; pidfd where possible."""
    if not process_alive(pid, start):
        return True
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        fd = -1
    try:
        deadline = time.monotonic() + timeout
        while process_alive(pid, start):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if fd >= 0:
                select.select([fd], [], [], min(left, 0.5))
            else:
                time.sleep(0.005)
        return True
    finally:
        if fd >= 0:
            os.close(fd)


NSFS_MAGIC = 0x6E736673
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), linux/nsfs.h


def open_namespaces(config: Config) -> dict[str, int]:
    """Open every namespace the config joins by path, once: type -> fd (the children setns to the
    fd, so the path is never walked again). Each must be a namespace file of the type it claims,
    and one that sysctls or a hostname will be written to must not be the runtime's own (that
    would change the host's values)."""
    from virtkit.container.config import sysctl_namespace

    targets = {sysctl_namespace(k) for k, _ in config.linux.sysctl}
    if config.hostname is not None or config.domainname is not None:
        targets.add("uts")
    out: dict[str, int] = {}
    try:
        for i, ns in enumerate(config.linux.namespaces):
            if not ns.path:
                continue
            where = f"config.json: linux.namespaces[{i}].path {ns.path}"
            flag, name = NAMESPACES[ns.type]
            try:
                fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as err:
                raise ConfigError(f"{where}: cannot open it ({err.strerror})") from None
            out[ns.type] = fd
            try:
                kind = fcntl.ioctl(fd, NS_GET_NSTYPE) if mounts.fstatfs_type(fd) == NSFS_MAGIC else None
            except OSError:
                kind = None
            if kind is None:
                raise ConfigError(f"{where} is not a namespace (give /proc/PID/ns/{name} or a bind mount of one)")
            if kind != flag:
                raise ConfigError(f"{where} is not a {ns.type} namespace")
            if ns.type in targets:
                st = os.fstat(fd)
                for own in (f"/proc/self/ns/{name}", f"/proc/1/ns/{name}"):
                    with contextlib.suppress(OSError):
                        o = os.stat(own)
                        if (o.st_dev, o.st_ino) == (st.st_dev, st.st_ino):
                            raise ConfigError(
                                f"{where} is the host's {ns.type} namespace, and the config sets "
                                "sysctls or names in it, which would change the host's; join another "
                                "namespace or drop them"
                            )
    except BaseException:
        for fd in out.values():
            os.close(fd)
        raise
    return out


def send_console(path: str, master: int) -> None:
    """Hand a terminal's master side to whoever listens on the --console-socket (runc's protocol:
    one message carrying the fd as SCM_RIGHTS)."""
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            socket.send_fds(s, [b"/dev/ptmx"], [master])
    except OSError as err:
        raise ContainerError(f"cannot send the terminal to --console-socket {path}: {err.strerror}") from None


def proxy_terminal(master: int, done: int) -> None:
    """Copy our stdin to the terminal and the terminal to our stdout until ``done`` is readable
    (the exit pipe, or a pidfd). Our own terminal, if any, is raw meanwhile; its size follows."""
    import errno
    import fcntl
    import termios
    import threading
    import tty

    stdin_tty = os.isatty(0)
    saved = termios.tcgetattr(0) if stdin_tty else None

    def resize(*_: Any) -> None:
        if stdin_tty:
            with contextlib.suppress(OSError):
                fcntl.ioctl(master, termios.TIOCSWINSZ, fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8))

    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGWINCH, resize)
    resize()
    if stdin_tty:
        tty.setraw(0)
    reading_stdin, reading_master = True, True

    def pump() -> bool:
        try:
            data = os.read(master, 65536)
        except OSError as err:  # EIO: the container's side is closed
            if err.errno != errno.EIO:
                raise
            data = b""
        view = memoryview(data)
        while view:
            view = view[os.write(1, view) :]
        return bool(data)

    try:
        while True:
            watch = [done] + ([master] if reading_master else []) + ([0] if reading_stdin else [])
            ready, _, _ = select.select(watch, [], [])
            if master in ready:
                reading_master = pump()
            if 0 in ready:
                data = os.read(0, 65536)
                if data:
                    os.write(master, data)
                else:
                    reading_stdin = False
            if done in ready:
                while reading_master and select.select([master], [], [], 0.05)[0]:
                    reading_master = pump()
                return
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        if old is not None:
            signal.signal(signal.SIGWINCH, old)


class Runtime:
    """An OCI runtime bound to one state root."""

    def __init__(self, root: str | None = None, *, cgroups: bool = True) -> None:
        self.dirs = StateDir(root)
        #: False: containers get no cgroup (crun's --cgroup-manager disabled); limits are refused
        self.cgroups = cgroups
        self._layout: Layout | None = None
        self._exit_pipes: dict[str, int] = {}
        self._children: dict[str, int] = {}  # container id -> monitor pid, when we forked it
        self._configs: dict[str, Config] = {}  # parsed configs of the containers this object created
        self._consoles: dict[str, int] = {}  # terminal master sides, for run in the foreground
        self.warnings: list[str] = []  # things the caller should tell the user (a corrupt record removed...)

    def default_cgroup_path(self, cid: str) -> str:
        """``/virtkit/ID`` for the default root; other roots get a suffix of their own, so that two
        runtimes (two test runs, say) with the same container id never share a cgroup."""
        from virtkit.container.state import DEFAULT_ROOT

        if self.dirs.root == DEFAULT_ROOT:
            return f"/virtkit/{cid}"
        import hashlib

        return f"/virtkit/{cid}-{hashlib.sha256(self.dirs.root.encode()).hexdigest()[:8]}"

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            try:
                self._layout = detect()
            except CgroupError as err:
                raise ContainerError(str(err)) from None
        return self._layout

    # ------------------------------------------------------------------------------------------
    # create

    def create(
        self,
        cid: str,
        bundle: str,
        *,
        pid_file: str | None = None,
        capture: bool = False,
        config: Config | None = None,
        rootfs: str | None = None,
        raw_config: dict[str, Any] | None = None,
        overlay: dict[str, str] | None = None,
        net: str | None = None,
        annotations: dict[str, str] | None = None,
        console_socket: str | None = None,
        console_proxy: bool = False,
        config_path: str | None = None,
        preserve_fds: int = 0,
        listen_fds: int = 0,
        handover: bool = False,
    ) -> Record:
        """Create container ``cid`` from ``bundle`` (or from an already parsed config and rootfs).

        ``overlay`` = {"lower": dir, "upper": dir, "work": dir} mounts a copy-on-write rootfs at
        ``rootfs`` first (images); ``net="bridge"`` adds a veth pair on the virtkit bridge.
        """
        validate_id(cid)
        bundle = os.path.abspath(bundle)
        if config is None:
            config, raw_config, rootfs = load_bundle_raw(bundle, config_path)
        assert rootfs is not None and raw_config is not None
        if listen_fds:
            import dataclasses

            env = tuple(e for e in config.process.env if not e.startswith(("LISTEN_FDS=", "LISTEN_PID=")))
            env += (f"LISTEN_FDS={listen_fds}", "LISTEN_PID=1")
            config = dataclasses.replace(config, process=dataclasses.replace(config.process, env=env))
            preserve_fds += listen_fds
        linux = config.linux
        if config.process.terminal and not console_socket and not console_proxy:
            raise ConfigError(
                "process.terminal is true: pass --console-socket SOCKET (the runtime sends the "
                "terminal's master there), or run it in the foreground with 'virtkit oci run'"
            )
        if linux.namespace("mount") is None:
            raise ConfigError(
                "config.json: linux.namespaces must include a mount namespace "
                "(virtkit builds the rootfs with pivot_root in it)"
            )
        seccomp = None
        if linux.seccomp is not None:
            from virtkit.host.seccomp import compile_profile

            seccomp = compile_profile(linux.seccomp)
        netns = linux.namespace("network")
        if net == "bridge" and (netns is None or netns.path):
            raise ConfigError("--net bridge needs a new network namespace in config.json")
        ns_fds = open_namespaces(config)  # before anything exists: a bad path is only an error
        try:
            return self._create(
                cid,
                bundle,
                config,
                rootfs,
                raw_config,
                ns_fds,
                seccomp,
                pid_file=pid_file,
                capture=capture,
                overlay=overlay,
                net=net,
                annotations=annotations,
                console_socket=console_socket,
                preserve_fds=preserve_fds,
                handover=handover,
            )
        finally:
            for fd in ns_fds.values():
                os.close(fd)

    def _create(
        self,
        cid: str,
        bundle: str,
        config: Config,
        rootfs: str,
        raw_config: dict[str, Any],
        ns_fds: dict[str, int],
        seccomp: bytes | None,
        *,
        pid_file: str | None,
        capture: bool,
        overlay: dict[str, str] | None,
        net: str | None,
        annotations: dict[str, str] | None,
        console_socket: str | None,
        preserve_fds: int = 0,
        handover: bool = False,
    ) -> Record:
        linux = config.linux
        rootless = os.geteuid() != 0
        no_cgroup = rootless or not self.cgroups
        cpuset = bool(linux.resources.cpu.cpus or linux.resources.cpu.mems)
        cgroup = (
            None
            if no_cgroup
            else Cgroup(self.layout, linux.cgroups_path or self.default_cgroup_path(cid), cpuset=cpuset)
        )
        if no_cgroup and (linux.resources.memory.limit or linux.resources.pids_limit or linux.resources.cpu.quota):
            raise ContainerError(
                "resource limits need cgroups, which an unprivileged runtime cannot write: "
                "run as root or drop linux.resources"
                if rootless
                else "resource limits need cgroups, and --cgroup-manager disabled makes none: drop linux.resources"
            )
        rec = Record(
            id=cid,
            bundle=bundle,
            status="creating",
            created=_now(),
            owner=_owner(),
            annotations=dict(config.annotations) | (annotations or {}),
            creator_pid=os.getpid(),
            creator_start=proc_start_time(os.getpid()),
            rootfs=rootfs,
            cgroup_path=cgroup.path if cgroup else "",
            cgroup_dirs=cgroup.directories() if cgroup else [],
            mounts=[rootfs] if overlay else [],
            netdevs=[],
            capture=capture,
        )
        if self.dirs.exists(cid):  # checked again, atomically, when the state directory is made
            raise ContainerError(
                f"container id {cid!r} is already in use: pick another id or 'virtkit delete {cid}' first"
            )
        # intent log: every cgroup directory this create may make is on record before it exists
        planned = cgroup.plan() if cgroup else []
        if cgroup is not None and any(d not in planned for d in cgroup.directories()):
            raise ContainerError(
                f"cgroup {cgroup.path} already exists: another container (or a crashed one) "
                "uses it; delete that container or set linux.cgroupsPath"
            )
        rec.cgroup_made = planned
        cdir = self.dirs.create(rec, {CONFIG_COPY: json.dumps(raw_config).encode()})
        made: list[str] = list(planned)
        mon = 0
        try:
            if overlay:
                from virtkit.container.image import mount_overlay

                mount_overlay(overlay["lower"], overlay["upper"], overlay["work"], rootfs)
            os.mkfifo(os.path.join(cdir, FIFO), 0o600)
            if cgroup is not None:
                cgroup.create()
                cgroup.apply(linux.resources)
            new_ns, join_ns, new_user = 0, [], False
            for kind in _JOIN_ORDER:
                ns = linux.namespace(kind)
                if ns is None:
                    continue
                flag = NAMESPACES[kind][0]
                if ns.path:
                    join_ns.append((flag, ns_fds[kind]))
                elif kind == "user":
                    new_user = True
                else:
                    new_ns |= flag
            net_spec = None
            if net == "bridge":
                from virtkit.container import network

                net_spec = network.plan(self.dirs.root, cid)
                rec.netdevs = [net_spec["host_if"]]
                rec.lease, rec.address = net_spec["lease"], net_spec["address"]
                self.dirs.save(rec)
            spec = InitSpec(
                config=config,
                rootfs=rootfs,
                state_dir=cdir,
                fifo=os.path.join(cdir, FIFO),
                cgroup=cgroup,
                seccomp=seccomp,
                log_path=os.path.join(cdir, LOG_FILE) if capture else None,
                new_ns=new_ns,
                join_ns=join_ns,
                new_userns=new_user,
                net=net_spec,
                runtime_hooks=bool(config.hooks.prestart or config.hooks.create_runtime),
                preserve_fds=preserve_fds,
                handover=handover,
            )
            r_chan, c_chan = Channel.pair()
            exit_r, exit_w = os.pipe()
            dir_fd = os.open(cdir, os.O_RDONLY | os.O_DIRECTORY)
            mon = os.fork()
            if mon == 0:  # pragma: no cover - runs in the child
                r_chan.close()
                os.close(exit_r)
                monitor_main(spec, c_chan, exit_w, dir_fd)
            c_chan.close()
            os.close(exit_w)
            os.close(dir_fd)
            self._children[cid] = mon
            rec.monitor_pid = mon
            try:
                self._handshake(rec, r_chan, config, net_spec, console_socket)
            except BaseException:
                os.close(exit_r)
                raise
            finally:
                r_chan.close()
            self._exit_pipes[cid] = exit_r
            self._configs[cid] = config
            rec.status = "created"
            self.dirs.save(rec)
            if pid_file:
                atomic_write(os.path.abspath(pid_file), f"{rec.pid}".encode())
            return rec
        except BaseException as err:
            try:
                self._teardown(rec, cgroup, made, kill=True)
            except ContainerError as cleanup:
                # the state stays (listed, deletable again); say both things on one line
                raise ContainerError(f"{err}; then {cleanup}") from None
            self.dirs.remove(cid)
            raise

    def _handshake(
        self,
        rec: Record,
        chan: Channel,
        config: Config,
        net_spec: dict[str, Any] | None,
        console_socket: str | None = None,
    ) -> None:
        """Serve the children until the init's pid is known *and* the init is ready.

        The two come from different processes (setup reports the pid after its fork; the init,
        running concurrently, may be ready first), so neither message may end the wait alone.
        """
        got_pid = ready = hooks_waiting = False

        def run_hooks() -> None:
            self._run_hooks(config.hooks.prestart + config.hooks.create_runtime, rec)
            chan.send(go=True)

        while not (got_pid and ready):
            msg = chan.recv(timeout=60)
            if msg is None:
                raise ContainerError(f"cannot create container {rec.id}: its init exited during setup")
            if "error" in msg:
                raise ContainerError(f"cannot create container {rec.id}: {msg['error']}")
            if "userns" in msg:
                self._write_id_maps(int(msg["userns"]), config)
                chan.send(mapped=True)
            elif "pid" in msg:
                rec.pid = int(msg["pid"])
                rec.pid_start = proc_start_time(rec.pid)
                got_pid = True
                if not rec.cgroup_path:  # without a cgroup, the pid is the only handle for cleanup
                    self.dirs.save(rec)
                if net_spec is not None:
                    from virtkit.container import network

                    network.attach(net_spec, rec.pid)
                    chan.send(net=True)
                if hooks_waiting:
                    run_hooks()
            elif msg.get("hooks"):
                # hooks get the state with the init's pid: wait for it if it has not come yet
                if got_pid:
                    run_hooks()
                else:
                    hooks_waiting = True
            elif msg.get("console"):
                master = msg["fds"][0]
                if console_socket:
                    try:
                        send_console(console_socket, master)
                    finally:
                        os.close(master)
                else:
                    self._consoles[rec.id] = master
            elif msg.get("ready"):
                ready = True

    @staticmethod
    def _write_id_maps(pid: int, config: Config) -> None:
        def fmt(maps: tuple[Any, ...]) -> str:
            return "".join(f"{m.container_id} {m.host_id} {m.size}\n" for m in maps)

        try:
            if os.geteuid() != 0:
                with open(f"/proc/{pid}/setgroups", "w") as f:
                    f.write("deny")
            with open(f"/proc/{pid}/uid_map", "w") as f:
                f.write(fmt(config.linux.uid_mappings))
            with open(f"/proc/{pid}/gid_map", "w") as f:
                f.write(fmt(config.linux.gid_mappings))
        except OSError as err:
            raise ContainerError(
                f"the kernel refused the user namespace id maps: {err.strerror} "
                "(an unprivileged runtime can only map its own uid and gid)"
            ) from None

    # ------------------------------------------------------------------------------------------
    # start / kill / state

    def start(self, cid: str) -> None:
        with self.dirs.lock(cid):
            rec = self.dirs.load(cid)
            status = current_status(rec)
            if status != "created":
                info = self.dirs.exit_info(cid) if status == "stopped" else None
                why = ""
                if info and info.get("signal"):
                    why = f", its init was killed by signal {info['signal']} before start"
                elif info:
                    why = f", its init exited with status {info.get('exitStatus')} before start"
                raise ContainerError(
                    f"cannot start container {cid}: it is {status}{why} (only a created container can be started)"
                )
            fifo = self.dirs.path(cid, FIFO)
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                raise ContainerError(
                    f"cannot start container {cid}: its init is not waiting any more; 'virtkit delete {cid}'"
                ) from None
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
            os.unlink(fifo)
            rec.status = "running"
            self.dirs.save(rec)
        config = self._config(cid)
        if config is not None:
            self._run_hooks(config.hooks.poststart, rec)

    def kill(self, cid: str, sig: int | str = signal.SIGTERM, all_processes: bool = False) -> None:
        signum: int = parse_signal(sig) if isinstance(sig, str) else int(sig)
        rec = self.dirs.load(cid)
        status = self._status(rec)
        if status not in ("created", "running", "paused"):
            raise ContainerError(f"cannot signal container {cid}: it is {status}")
        if all_processes and rec.cgroup_path:
            self._cgroup(rec).kill_all(signum)
            return
        try:
            pidfd = os.pidfd_open(rec.pid)
        except ProcessLookupError:
            raise ContainerError(f"cannot signal container {cid}: it has stopped") from None
        try:
            if proc_start_time(rec.pid) != rec.pid_start:
                raise ContainerError(f"cannot signal container {cid}: it has stopped")
            signal.pidfd_send_signal(pidfd, signum)
        finally:
            os.close(pidfd)

    def _status(self, rec: Record) -> str:
        """:func:`current_status`, and ``paused`` for a running container whose cgroup is frozen."""
        status = current_status(rec)
        if status == "running" and rec.cgroup_path and self._cgroup(rec).frozen():
            return "paused"
        return status

    def pause(self, cid: str) -> None:
        """Freeze every process of the container (runc ``pause``: the cgroup freezer)."""
        with self.dirs.lock(cid):
            rec = self.dirs.load(cid)
            status = self._status(rec)
            if status != "running":
                raise ContainerError(f"cannot pause container {cid}: it is {status} (only a running one can be)")
            if not rec.cgroup_path or not self._cgroup(rec).freeze(True):
                raise ContainerError(f"cannot pause container {cid}: it has no freezer cgroup (rootless?)")

    def resume(self, cid: str) -> None:
        with self.dirs.lock(cid):
            rec = self.dirs.load(cid)
            status = self._status(rec)
            if status != "paused":
                raise ContainerError(f"cannot resume container {cid}: it is {status}, not paused")
            if not self._cgroup(rec).freeze(False):
                raise ContainerError(f"cannot resume container {cid}: the kernel refused to thaw its cgroup")

    def update(self, cid: str, resources: dict[str, Any]) -> None:
        """runc ``update``: new limits (a raw ``linux.resources`` object) for a created, running or
        paused container, written to its cgroups and to its saved config."""

        if "blockIO" in resources:
            raise ContainerError("block I/O limits (--blkio-weight, blockIO) are not supported by virtkit yet")
        if "devices" in resources:
            raise ContainerError("update cannot change device rules (runc neither); recreate the container")
        res = parse_resources(resources)
        with self.dirs.lock(cid):
            rec = self.dirs.load(cid)
            status = self._status(rec)
            if status not in ("created", "running", "paused"):
                raise ContainerError(f"cannot update container {cid}: it is {status}")
            if not rec.cgroup_path:
                raise ContainerError(f"cannot update container {cid}: it has no cgroup (rootless)")
            self._cgroup(rec).update(res)
            self._save_resources(cid, resources)

    def _save_resources(self, cid: str, resources: dict[str, Any]) -> None:
        """Merge updated limits into the saved config copy (what ``state``/``ps`` readers see)."""
        from virtkit.container.config import MAX_CONFIG_BYTES
        from virtkit.container.state import read_small
        from virtkit.records import UntrustedInput, load_object

        try:
            raw = load_object(
                read_small(self.dirs.path(cid, CONFIG_COPY), MAX_CONFIG_BYTES),
                what="config.json",
                max_bytes=MAX_CONFIG_BYTES,
            )
        except (OSError, UntrustedInput):
            return
        linux = raw.setdefault("linux", {})
        current = linux.setdefault("resources", {})
        if isinstance(current, dict):
            for key, value in resources.items():
                if isinstance(value, dict) and isinstance(current.get(key), dict):
                    current[key] = {**current[key], **value}
                else:
                    current[key] = value
        atomic_write(self.dirs.path(cid, CONFIG_COPY), json.dumps(raw).encode())
        self._configs.pop(cid, None)

    def state(self, cid: str) -> dict[str, Any]:
        rec = self.dirs.load(cid)
        status = self._status(rec)
        out: dict[str, Any] = {
            "ociVersion": OCI_VERSION,
            "id": rec.id,
            "status": status,
            "pid": rec.pid if status in ("created", "running", "paused") else 0,
            "bundle": rec.bundle,
            "rootfs": rec.rootfs,
            "created": rec.created,
            "owner": rec.owner,
        }
        if rec.annotations:
            out["annotations"] = rec.annotations
        if rec.address:
            out["address"] = rec.address
        info = self.dirs.exit_info(cid)
        if status == "stopped" and info:
            out["exitStatus"] = info.get("exitStatus")
            if info.get("signal"):
                out["signal"] = info["signal"]
        oom = bool(info and info.get("oomKilled"))
        if not oom and rec.cgroup_path:
            with contextlib.suppress(OSError):
                oom = self._cgroup(rec).oom_kills() > 0
        out["oomKilled"] = oom
        return out

    def containers(self, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
        """The OCI state of every container under this root; one whose record is corrupt is left
        out, and ``warn`` is told (with the command that removes it)."""
        out = []
        for cid in self.dirs.ids():
            try:
                out.append(self.state(cid))
            except CorruptState as err:
                if warn is not None:
                    warn(str(err))
            except ContainerError:
                continue  # deleted meanwhile
        return out

    # ------------------------------------------------------------------------------------------
    # wait / run

    def wait(self, cid: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the container's process has exited; return exitStatus/signal/oomKilled."""
        pipe = self._exit_pipes.pop(cid, None)
        if pipe is not None:
            try:
                data = b""
                deadline = None if timeout is None else time.monotonic() + timeout
                while True:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    ready, _, _ = select.select([pipe], [], [], left)
                    if not ready:
                        self._exit_pipes[cid] = pipe
                        pipe = -1
                        raise ContainerError(f"container {cid} did not stop within {timeout}s")
                    chunk = os.read(pipe, 4096)
                    if not chunk:
                        break
                    data += chunk
            finally:
                if pipe >= 0:
                    os.close(pipe)
            self._reap(cid)
            if data:
                return json.loads(data)  # type: ignore[no-any-return]
        rec = self.dirs.load(cid)
        if not _wait_gone(rec.pid, rec.pid_start, timeout if timeout is not None else 1e9):
            raise ContainerError(f"container {cid} did not stop within {timeout}s")
        # the monitor writes exit.json right after reaping the init
        if rec.monitor_pid:
            _wait_gone(rec.monitor_pid, None, 2.0)
        self._reap(cid)
        return self.dirs.exit_info(cid) or {"exitStatus": None, "signal": None, "oomKilled": False}

    def _reap(self, cid: str) -> None:
        mon = self._children.pop(cid, None)
        if mon:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(mon, 0)

    def run(
        self,
        cid: str,
        bundle: str,
        *,
        detach: bool = False,
        remove: bool = False,
        forward_signals: bool = True,
        **create_args: Any,
    ) -> int:
        """create + start (+ wait, forwarding signals, + delete if ``remove``); the exit status."""
        if detach:
            create_args.setdefault("capture", True)
        else:
            create_args.setdefault("console_proxy", True)
        rec = self.create(cid, bundle, **create_args)
        master = self._consoles.pop(cid, None)
        forwarded = (
            signal.SIGINT,
            signal.SIGTERM,
            signal.SIGHUP,
            signal.SIGQUIT,
            signal.SIGUSR1,
            signal.SIGUSR2,
            signal.SIGWINCH,
        )
        old: dict[int, Any] = {}
        import threading

        if forward_signals and not detach and threading.current_thread() is threading.main_thread():
            # installed before start: the container may react (and its caller signal us) at once
            def forward(signum: int, _frame: Any) -> None:
                with contextlib.suppress(OSError):
                    os.kill(rec.pid, signum)

            for s in forwarded:
                old[s] = signal.signal(s, forward)
        try:
            self.start(cid)
        except BaseException:
            for sig_, handler in old.items():
                signal.signal(sig_, handler)
            self.delete(cid, force=True)
            raise
        if detach:
            return 0
        try:
            if master is not None:
                try:
                    proxy_terminal(master, self._exit_pipes[cid])
                finally:
                    os.close(master)
            info = self.wait(cid)
        finally:
            for sig_, handler in old.items():
                signal.signal(sig_, handler)
            if remove:
                self.delete(cid, force=True)
        status = info.get("exitStatus")
        return int(status) if status is not None else 255

    # ------------------------------------------------------------------------------------------
    # delete

    def delete(self, cid: str, force: bool = False) -> None:
        with self.dirs.lock(cid):
            try:
                rec = self.dirs.load(cid)
            except CorruptState:
                if not force:
                    raise
                self._delete_corrupt(cid)
                return
            status = current_status(rec)
            if status == "running" and not force:
                raise ContainerError(
                    f"cannot delete container {cid}: it is running; stop it "
                    f"('virtkit kill {cid} KILL') or use 'delete --force'"
                )
            if status == "creating" and not force:
                raise ContainerError(f"cannot delete container {cid}: it is being created; retry, or use --force")
            cgroup = self._cgroup(rec) if rec.cgroup_path else None
            made = self._made_cgroups(rec, cgroup)
            config = self._config(cid)
            self._teardown(rec, cgroup, made, kill=status != "stopped")
            if config is not None:
                with contextlib.suppress(ContainerError):
                    self._run_hooks(config.hooks.poststop, rec)
            self.dirs.remove(cid)
            self._configs.pop(cid, None)

    def _made_cgroups(self, rec: Record, cgroup: Cgroup | None) -> list[str]:
        """The cgroup directories the record says create made, kept only where they are the
        container's own path or one of its parents in one of the host's hierarchies."""
        if cgroup is None:
            return []
        allowed = set()
        for d in cgroup.directories():
            top = d[: len(d) - len(cgroup.path)]
            cur = cgroup.path
            while cur not in ("", "/"):
                allowed.add(top + cur)
                cur = os.path.dirname(cur)
        return [d for d in (rec.cgroup_made or rec.cgroup_dirs or []) if d in allowed]

    def _delete_corrupt(self, cid: str) -> None:
        """``delete --force`` of a container whose record cannot be trusted: release what can be
        found without it (its cgroup at the path its saved config or the default names, a mount
        below its directory, its bridge device and lease), then remove the directory."""
        found: list[str] = []
        config = self._config(cid)
        path = (
            config.linux.cgroups_path
            if config is not None and config.linux.cgroups_path
            else self.default_cgroup_path(cid)
        )
        if os.geteuid() == 0:
            with contextlib.suppress(ContainerError, OSError):
                cgroup = Cgroup(self.layout, path)
                if any(os.path.isdir(d) for d in cgroup.directories()):
                    found.append(f"cgroup {path}")
                    self._teardown(Record(id=cid, bundle="", cgroup_path=path), cgroup, [], kill=True)
        from virtkit.container import network

        host_if = network.host_ifname(self.dirs.root, cid)
        lease = network.lease_of(host_if)
        if lease is not None or os.path.exists(f"/sys/class/net/{host_if}"):
            found.append(f"network device {host_if}")
            with contextlib.suppress(Exception):  # noqa: BLE001 - best effort, said in the warning
                network.remove_link(host_if, lease)
        self.dirs.remove(cid)  # unmounts what is mounted below it first
        self._configs.pop(cid, None)
        self.warnings.append(
            f"state of container {cid} was corrupt; removed it" + (f" and released {', '.join(found)}" if found else "")
        )

    def _teardown(self, rec: Record, cgroup: Cgroup | None, made: list[str], kill: bool) -> None:
        """Release everything a container holds; safe to repeat, safe on half-made containers."""
        problems = []
        if kill or process_alive(rec.pid, rec.pid_start):
            if cgroup is not None:
                with contextlib.suppress(OSError):
                    cgroup.kill_all(signal.SIGKILL)
            if rec.pid and process_alive(rec.pid, rec.pid_start):
                with contextlib.suppress(OSError):
                    os.kill(rec.pid, signal.SIGKILL)
            _wait_gone(rec.pid, rec.pid_start, 5.0)
        if cgroup is not None:
            deadline = time.monotonic() + 5.0
            while cgroup.pids() and time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    cgroup.kill_all(signal.SIGKILL)
                time.sleep(0.01)
        if rec.monitor_pid:
            if rec.id in self._children:
                self._reap(rec.id)
            else:
                _wait_gone(rec.monitor_pid, None, 2.0)
        pipe = self._exit_pipes.pop(rec.id, None)
        if pipe is not None:
            os.close(pipe)
        console = self._consoles.pop(rec.id, None)
        if console is not None:
            os.close(console)
        for dev in rec.netdevs or []:
            from virtkit.container import network

            network.remove_link(dev, rec.lease)
        for target in rec.mounts or []:
            try:
                mounts.umount2(target, mounts.MNT_DETACH)
            except OSError as err:
                if err.errno not in (22, 2):  # EINVAL: not mounted (any more); ENOENT
                    problems.append(f"unmount {target}: {err.strerror}")
        if cgroup is not None:
            # the container's own directories must go (a busy one is an error); the parents it made
            # (/virtkit) go when empty, which they are not while another container lives there
            leaves = cgroup.directories()
            left = cgroup.remove(leaves)
            problems.extend(f"cgroup {d} is still busy" for d in left)
            parents = {d for d in made if d not in leaves}
            if rec.cgroup_path == self.default_cgroup_path(rec.id):
                parents |= {os.path.dirname(d) for d in leaves}
            for d in sorted(parents, key=lambda p: p.count("/"), reverse=True):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
        if problems:
            raise ContainerError(f"container {rec.id} was stopped but not fully cleaned up: {'; '.join(problems)}")

    # ------------------------------------------------------------------------------------------
    # exec / ps / stats / events

    def exec(
        self,
        cid: str,
        process: Process,
        *,
        detach: bool = False,
        pid_file: str | None = None,
        preserve_fds: int = 0,
        console_socket: str | None = None,
    ) -> int:
        """Run ``process`` in the running container; return its exit status (0 when detached).

        With ``process.terminal``, the terminal's master side goes to ``console_socket`` (runc's
        protocol) or, in the foreground, is proxied to this process's stdio."""
        rec = self.dirs.load(cid)
        status = self._status(rec)
        if process.terminal and detach and not console_socket:
            raise ConfigError("exec --tty --detach needs --console-socket SOCKET to send the terminal to")
        if status == "paused":
            # the new process would join the frozen cgroup and freeze before it could start
            raise ContainerError(f"cannot exec in container {cid}: it is paused; 'resume' it first")
        if status != "running":
            raise ContainerError(f"cannot exec in container {cid}: it is {status}")
        config = self._config(cid)
        seccomp = None
        if config is not None and config.linux.seccomp is not None:
            from virtkit.host.seccomp import compile_profile

            seccomp = compile_profile(config.linux.seccomp)
        # the init's namespaces are opened here, once, and checked to be the init's after the open
        # (a pid reused in between would otherwise be joined); the child joins the descriptors
        namespaces: list[tuple[int, int]] = []
        try:
            for kind in _JOIN_ORDER:
                if config is not None and config.linux.namespace(kind) is None:
                    continue
                flag, name = NAMESPACES[kind]
                try:
                    fd = os.open(f"/proc/{rec.pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    raise ContainerError(f"cannot exec in container {cid}: it has stopped") from None
                ns_st, own = os.fstat(fd), os.stat(f"/proc/self/ns/{name}")
                if (ns_st.st_dev, ns_st.st_ino) == (own.st_dev, own.st_ino):
                    os.close(fd)  # already there (the user namespace cannot be re-entered)
                    continue
                namespaces.append((flag, fd))
            if proc_start_time(rec.pid) != rec.pid_start:
                raise ContainerError(f"cannot exec in container {cid}: it has stopped")
            spec = ExecSpec(
                process=process,
                init_pid=rec.pid,
                namespaces=namespaces,
                cgroup=self._cgroup(rec) if rec.cgroup_path else None,
                seccomp=seccomp,
                preserve_fds=preserve_fds,
                handover=detach,
            )
            r_chan, c_chan = Channel.pair()
            child = os.fork()
            if child == 0:  # pragma: no cover - runs in the child
                r_chan.close()
                exec_main(spec, c_chan)
            c_chan.close()
        finally:
            for _flag, fd in namespaces:
                os.close(fd)
        target = 0
        master = None
        started = False
        try:
            # the joining child reports the process's pid as the host sees it ("pid"); the process
            # itself says when it is about to execve ("started"; its own pid is the namespace's)
            while not (target and started):
                msg = r_chan.recv(timeout=60)
                if msg is None:
                    break
                if "error" in msg:
                    os.waitpid(child, 0)
                    raise ContainerError(f"cannot exec in container {cid}: {msg['error']}")
                if msg.get("console"):
                    master = msg["fds"][0]
                    continue
                if "pid" in msg:
                    target = int(msg["pid"])
                if "started" in msg:
                    started = True
        finally:
            r_chan.close()
        if detach:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child, 0)  # it exits at once (handover), leaving the process to our caller
        if pid_file and target:
            atomic_write(os.path.abspath(pid_file), str(target).encode())
        if master is not None and console_socket:
            try:
                send_console(console_socket, master)
            finally:
                os.close(master)
            master = None
        if detach:
            if master is not None:
                os.close(master)
            return 0

        def forward(signum: int, _frame: Any) -> None:
            with contextlib.suppress(OSError):
                os.kill(target, signum)

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            if master is not None:
                done = os.pidfd_open(child)
                try:
                    proxy_terminal(master, done)
                finally:
                    os.close(done)
                    os.close(master)
            _, st = os.waitpid(child, 0)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        code = os.waitstatus_to_exitcode(st)
        return code if code >= 0 else 128 - code

    def exec_process(
        self,
        cid: str,
        args: list[str],
        *,
        env: list[str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        base: dict[str, Any] | None = None,
        tty: bool = False,
        additional_gids: list[str] | None = None,
        caps: list[str] | None = None,
        no_new_privs: bool = False,
    ) -> Process:
        """The process ``exec`` runs: the container's own (capabilities, rlimits, user) with overrides."""
        self.dirs.load(cid)  # an unknown id is reported as such
        config = self._config(cid)
        if base is not None:
            raw = {"ociVersion": "1.0.2", "root": {"path": "/"}, "process": base}
            return parse_config(raw).process
        gids: list[int] = []
        for g in additional_gids or []:
            if not g.isdigit() or int(g) > 0xFFFFFFFE:
                raise ConfigError(f"--additional-gids {g!r}: give a group id number")
            gids.append(int(g))
        if config is None:
            raise ContainerError(f"container {cid} has no saved config.json; pass a process.json")
        p = config.process
        u = p.user
        if user:
            uid, _, gid = user.partition(":")
            if not uid.isdigit() or (gid and not gid.isdigit()):
                raise ConfigError(f"--user {user!r}: give UID or UID:GID as numbers")
            u = User(int(uid), int(gid) if gid else (u.gid if not gid else 0), u.umask, u.additional_gids)
        if gids:
            u = User(u.uid, u.gid, u.umask, tuple(gids))
        capabilities = p.capabilities
        if caps:
            from virtkit.host.caps import CAPABILITIES

            extra = []
            for c in caps:
                name = c.upper() if c.upper().startswith("CAP_") else "CAP_" + c.upper()
                if name not in CAPABILITIES:
                    raise ConfigError(f"--cap {c!r} is not a capability (CAP_NET_ADMIN, CAP_SYS_PTRACE...)")
                extra.append(name)
            capabilities = _with_caps(capabilities, extra)
        new_env = list(p.env)
        for e in env or []:
            if "=" not in e:
                raise ConfigError(f"--env {e!r}: use KEY=VALUE")
            key = e.split("=", 1)[0] + "="
            new_env = [x for x in new_env if not x.startswith(key)] + [e]
        if not args:
            raise ConfigError("exec needs a command: virtkit exec ID -- CMD ARGS...")
        return Process(
            args=tuple(args),
            cwd=cwd or p.cwd,
            env=tuple(new_env),
            user=u,
            terminal=tty,
            capabilities=capabilities,
            rlimits=p.rlimits,
            no_new_privileges=p.no_new_privileges or no_new_privs,
        )

    def processes(self, cid: str) -> list[int]:
        rec = self.dirs.load(cid)
        if rec.cgroup_path:
            return self._cgroup(rec).pids()
        return [rec.pid] if process_alive(rec.pid, rec.pid_start) else []

    def stats(self, cid: str) -> dict[str, Any]:
        rec = self.dirs.load(cid)
        if not rec.cgroup_path:
            raise ContainerError(f"container {cid} has no cgroup (rootless): no statistics")
        return self._cgroup(rec).stats()

    def events(self, cid: str, interval: float = 5.0, stats_only: bool = False) -> Iterator[dict[str, Any]]:
        """runc-style events: a stats event every ``interval``, an ``oom`` event when the OOM killer
        strikes; ends when the container stops (or after one stats event if ``stats_only``)."""
        rec = self.dirs.load(cid)
        cg = self._cgroup(rec) if rec.cgroup_path else None
        ooms = cg.oom_kills() if cg else 0
        next_stats = 0.0
        while True:
            if cg is not None:
                now_ooms = cg.oom_kills()
                if now_ooms > ooms:
                    yield {"type": "oom", "id": cid, "data": {"count": now_ooms}}
                    ooms = now_ooms
                if time.monotonic() >= next_stats:
                    yield {"type": "stats", "id": cid, "data": cg.stats()}
                    next_stats = time.monotonic() + interval
            if stats_only:
                return
            if not process_alive(rec.pid, rec.pid_start):
                info = self.dirs.exit_info(cid) or {}
                yield {"type": "exit", "id": cid, "data": info}
                return
            time.sleep(min(0.1, interval))

    def logs(self, cid: str) -> str:
        rec = self.dirs.load(cid)
        if not rec.capture:
            raise ContainerError(
                f"container {cid} writes to the terminal that created it, not to a log: "
                "create it with --capture (or 'virtkit oci run --detach') to keep its output"
            )
        try:
            with open(self.dirs.path(cid, LOG_FILE), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    # ------------------------------------------------------------------------------------------

    def _cgroup(self, rec: Record) -> Cgroup:
        # a v1 cpuset directory is the container's only when create made one (the record says)
        top = self.layout.v1.get("cpuset")
        cpuset = top is not None and top + "/" + rec.cgroup_path.strip("/") in (rec.cgroup_dirs or [])
        return Cgroup(self.layout, rec.cgroup_path, cpuset=cpuset)

    def _config(self, cid: str) -> Config | None:
        if cid in self._configs:
            return self._configs[cid]
        from virtkit.container.config import MAX_CONFIG_BYTES
        from virtkit.container.state import read_small
        from virtkit.records import UntrustedInput, load_object

        try:
            data = read_small(self.dirs.path(cid, CONFIG_COPY), MAX_CONFIG_BYTES)
            return parse_config(load_object(data, what="config.json", max_bytes=MAX_CONFIG_BYTES))
        except (OSError, UntrustedInput, ConfigError):
            return None

    def _run_hooks(self, hooks: tuple[Any, ...], rec: Record) -> None:
        if not hooks:
            return
        import subprocess

        state = json.dumps(
            {
                "ociVersion": OCI_VERSION,
                "id": rec.id,
                "status": current_status(rec),
                "pid": rec.pid,
                "bundle": rec.bundle,
                "annotations": rec.annotations or {},
            }
        )
        for h in hooks:
            try:
                subprocess.run(
                    list(h.args) or [h.path],
                    input=state.encode(),
                    # no env: the runtime's own, as runc and crun (Go's exec.Cmd with a nil Env)
                    env=dict(e.split("=", 1) for e in h.env) if h.env else None,
                    timeout=h.timeout,
                    check=True,
                    executable=h.path,
                    capture_output=True,
                )
            except subprocess.CalledProcessError as err:
                raise ContainerError(
                    f"hook {h.path} failed with status {err.returncode}: "
                    f"{err.stderr.decode(errors='replace').strip()[:200]}"
                ) from None
            except subprocess.TimeoutExpired:
                raise ContainerError(f"hook {h.path} did not finish within {h.timeout}s") from None
            except OSError as err:
                raise ContainerError(f"hook {h.path} cannot run: {err.strerror}") from None


def _with_caps(caps: Any, extra: list[str]) -> Any:
    """``exec --cap``: ``caps`` with ``extra`` added to every set but ambient (as runc does)."""
    from virtkit.container.config import Capabilities

    def add(current: tuple[str, ...]) -> tuple[str, ...]:
        return current + tuple(c for c in extra if c not in current)

    return Capabilities(
        bounding=add(caps.bounding),
        effective=add(caps.effective),
        inheritable=caps.inheritable,
        permitted=add(caps.permitted),
        ambient=caps.ambient,
    )
