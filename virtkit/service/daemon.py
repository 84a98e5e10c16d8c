"""virtkitd: VMs as a service. The state machine, the VMM processes, restart policy, re-attach.

States of a VM: ``created`` (defined) -> ``starting`` -> ``running`` -> ``stopped`` (ended by
the guest or by a user) or ``failed`` (the VMM died, the guest crashed); ``on-failure`` VMs go
through ``restarting`` (waiting out a back-off) back to ``starting``.

Each VM runs in a VMM process of its own (:mod:`virtkit.service.vmm`), confined before its guest
runs, in a session of its own: it outlives the service. The service is a child subreaper, so the
VMMs it starts become its children (their launcher exits at once) and it learns their exit
status; VMMs it re-attached to after a restart are watched through pidfds and their exit report.

Re-attach (``Service.reattach``, at start-up): every VM recorded as ``starting`` or ``running``
is looked for through its control socket. A VMM that answers with the instance id recorded for
the VM is that VM's VMM (its pid comes from SO_PEERCRED, not from the database, so a recycled
pid can never be mistaken for it); otherwise the VM ended while the service was down, and its
exit report, if any, says how. A VM is started only from ``created``, ``stopped`` or ``failed``,
under its lock, so no VM ever has two VMMs.

The service's methods take and return records (:mod:`virtkit.service.model`): the API parses a
body into one before calling, the store parses rows into :class:`~virtkit.service.model.VmRow`,
and the VMM process gets a :class:`~virtkit.service.model.VmmDefinition`. The process that serves
the API is :mod:`virtkit.service.server` (``virtkitd``); this module knows nothing of HTTP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

from virtkit.errors import ConfigError, VirtkitError
from virtkit.host import libc
from virtkit.records import UntrustedInput, to_json
from virtkit.service import vmmproto
from virtkit.service.cgroups import VmCgroup, validate_cpus
from virtkit.service.model import (
    Event,
    ExitInfo,
    HostInfo,
    LogChunk,
    MetricsSnapshot,
    VmCreate,
    VmmDefinition,
    VmmJail,
    VmRow,
    VmSample,
    VmStats,
    VmStatus,
)
from virtkit.service.resources import VMM_OVERHEAD, Account, InsufficientResources
from virtkit.service.store import CorruptRow, Store
from virtkit.service.vmm import DEFINITION, EXIT_REPORT, SERIAL_LOG

MIB = 1 << 20
DEFAULT_STATE_DIR = "/var/lib/virtkitd"
DEFAULT_RUN_DIR = "/run/virtkitd"
API_SOCKET = "api.sock"
#: uids of confined VMMs: UID_BASE + a block per state directory (so two services on one host do
#: not share uids, whose RLIMIT_NPROC is counted per uid) + the VM's database id (never reused)
UID_BASE = 400_000
UID_BLOCK = 100_000
STOP_GRACE = 10.0
START_TIMEOUT = 30.0
#: restart back-off: BASE x 2^n seconds, at most MAX; n resets once a VM ran STABLE seconds
BACKOFF_BASE = 0.5
BACKOFF_MAX = 30.0
BACKOFF_STABLE = 30.0
MAX_RESTARTS = 10
ACTIVE = ("starting", "running")
#: what a kill waits for the VMM to be gone (SIGKILL: only an uninterruptible sleep delays it)
KILL_WAIT = 10.0


class NotFound(VirtkitError):
    pass


class Conflict(VirtkitError):
    pass


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def describe_exit(
    report: vmmproto.ExitReport | None, wait_status: int | None, unreadable: str | None = None
) -> ExitInfo:
    """How a VMM ended, from its exit report and (when it was our child) its wait status. A report
    that could not be read (``unreadable``: the one-line reason) is a crash: the VMM misbehaved."""
    if unreadable is not None:
        detail = f"the VMM wrote an unreadable exit report: {_one_line(unreadable)}"
        if wait_status is not None and os.WIFSIGNALED(wait_status):
            detail += f" (and was killed by {_signal_name(os.WTERMSIG(wait_status))})"
        return ExitInfo(reason="bad-exit-report", exit_status=None, crash=True, detail=detail)
    if report:
        return ExitInfo.from_report(report, _one_line(report.detail, 2000))
    if wait_status is not None and os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        detail = f"the VMM was killed by {_signal_name(sig)}"
        if sig == signal.SIGSYS:
            detail += " (seccomp: it made a system call outside its allow-list)"
        return ExitInfo(reason="vmm-killed", exit_status=min(128 + sig, 255), crash=True, detail=detail)
    if wait_status is not None:
        return ExitInfo(
            reason="vmm-error",
            exit_status=os.WEXITSTATUS(wait_status),
            crash=True,
            detail=f"the VMM exited with status {os.WEXITSTATUS(wait_status)} without an exit report",
        )
    return ExitInfo(
        reason="vmm-gone",
        exit_status=None,
        crash=True,
        detail="the VMM ended without an exit report (killed while the service was not watching)",
    )


def _one_line(text: str, limit: int = 400) -> str:
    """Text from a VMM as one printable line of at most ``limit`` characters."""
    line = " ".join("".join(c if c.isprintable() else " " for c in text[: limit * 2]).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def is_failure(exit_info: ExitInfo) -> bool:
    return exit_info.crash


class VmRuntime:
    """What the service holds for a VM whose VMM it watches."""

    def __init__(self, name: str, pid: int, pidfd: int, instance: str, child: bool) -> None:
        self.name, self.pid, self.pidfd, self.instance, self.child = name, pid, pidfd, instance, child
        self.user_stop = False  # a stop/kill was asked: not a failure, no restart
        self.started = time.time()
        self.handled = False  # its end was recorded (by the monitor, or by a kill that could not wait)


class Service:
    def __init__(
        self,
        state_dir: str = DEFAULT_STATE_DIR,
        run_dir: str = DEFAULT_RUN_DIR,
        *,
        overcommit: float = 4.0,
        reserve: int | None = None,
        cgroup_parent: str = "virtkitd",
        backoff_base: float = BACKOFF_BASE,
        use_cgroups: bool = True,
        python: str | None = None,
        vmm_module: str = "virtkit.service.vmm",
    ) -> None:
        self.state_dir, self.run_dir = os.path.abspath(state_dir), os.path.abspath(run_dir)
        for d in (self.state_dir, os.path.join(self.state_dir, "vms"), self.run_dir):
            _private_dir(d)
        self.store = Store(os.path.join(self.state_dir, "virtkitd.db"))
        self.account = Account(overcommit, reserve)
        self.cgroup_parent = cgroup_parent
        self.use_cgroups = use_cgroups
        self.backoff_base = backoff_base
        self.python = python or sys.executable
        #: the VMM's entry point; tests run a deliberately hostile one (tests/integration/service)
        self.vmm_module = vmm_module
        self._end_lock = threading.Lock()
        self.runtimes: dict[str, VmRuntime] = {}
        self.timers: dict[str, threading.Timer] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closing = False
        self._monitor = threading.Thread(target=self._supervise, name="vmm-monitor", daemon=True)
        self.started = time.time()

    # --- plumbing --------------------------------------------------------------------------------
    def lock(self, name: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(name, threading.Lock())

    def vm_dir(self, name: str) -> str:
        return os.path.join(self.state_dir, "vms", name)

    def control_path(self, rec: VmRow) -> str:
        return os.path.join(self.run_dir, f"vm{rec.id}.sock")

    def uid_for(self, vm_id: int) -> int:
        import zlib

        block = zlib.crc32(self.state_dir.encode()) % 10_000
        return UID_BASE + block * UID_BLOCK + vm_id % UID_BLOCK

    def cgroup(self, name: str) -> VmCgroup:
        return VmCgroup(name, self.cgroup_parent)

    def start_service(self) -> None:
        with contextlib.suppress(OSError):
            libc.prctl(libc.PR_SET_CHILD_SUBREAPER, 1)
        self.reattach()
        self._monitor.start()

    def close(self) -> None:
        """Stop watching; the VMMs keep running (a new service re-attaches to them)."""
        self._closing = True
        for t in list(self.timers.values()):
            t.cancel()
        os.write(self._wake_w, b"x")
        if self._monitor.is_alive():
            self._monitor.join(timeout=5)
        for rt in list(self.runtimes.values()):
            with contextlib.suppress(OSError):
                os.close(rt.pidfd)
        self.runtimes.clear()
        self.store.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # --- definitions -----------------------------------------------------------------------------
    def get(self, name: str) -> VmRow:
        rec = self.store.get(name)
        if rec is None:
            raise NotFound(f"no VM named {name!r}")
        return rec

    def status(self, name: str) -> VmStatus:
        return self.get(name).public()

    def create(self, request: VmCreate) -> VmStatus:
        """Define the VM ``request`` describes (parsed and bounded by the API) and, if it asks,
        start it."""
        import sqlite3

        definition = request.definition()
        name, kernel = definition.name, definition.kernel
        if not os.path.isabs(kernel):
            raise ConfigError(f"kernel {kernel!r} must be an absolute path on the host")
        if not os.path.isfile(kernel):
            raise ConfigError(f"kernel {kernel} does not exist or is not a file")
        memory = definition.memory_mib * MIB
        if memory + VMM_OVERHEAD > self.account.memory_capacity:
            raise InsufficientResources(
                f"{name}: asked {definition.memory_mib} MiB, more than this host can "
                f"give any VM ({self.account.memory_capacity // MIB} MiB)"
            )
        if definition.vcpus > self.account.vcpu_capacity:
            raise InsufficientResources(
                f"{name}: asked {definition.vcpus} vCPUs, more than this host runs "
                f"({self.account.vcpu_capacity} with overcommit)"
            )
        if definition.cpus:
            validate_cpus(definition.cpus, set(os.sched_getaffinity(0)))
        with self.lock(name):
            try:
                rec = self.store.insert(name, definition)
            except sqlite3.IntegrityError:
                raise Conflict(f"a VM named {name!r} exists already") from None
            try:
                d = self.vm_dir(name)
                shutil.rmtree(d, ignore_errors=True)  # a leftover of a VM deleted while the service was down
                os.makedirs(d, mode=0o700)
            except OSError as e:
                self.store.delete(name)
                raise ConfigError(f"cannot create the VM's directory: {e.strerror}") from None
            self.store.event(name, "created", json.dumps(to_json(definition)))
        if request.start:
            try:
                return self.start(name)
            except VirtkitError:
                # created, but not started: say so without leaving a half-made VM behind
                with contextlib.suppress(VirtkitError):
                    self.delete(name)
                raise
        return rec.public()

    def delete(self, name: str, force: bool = False) -> None:
        with self.lock(name):
            try:
                rec: VmRow | None = self.get(name)
            except CorruptRow:
                # a row that does not parse can still be deleted (what its error message offers)
                if not force:
                    raise
                rec = None
            if rec is not None and (rec.state in ACTIVE or name in self.runtimes):
                if not force:
                    raise Conflict(f"{name} is {rec.state}: stop it first, or delete with force=true")
                self._kill_locked(name)
            elif name in self.runtimes:
                self._kill_locked(name)
            timer = self.timers.pop(name, None)
            if timer:
                timer.cancel()
            self.store.delete(name)
            self.store.event(name, "deleted", "")
            shutil.rmtree(self.vm_dir(name), ignore_errors=True)
            if rec is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.control_path(rec))
            if self.use_cgroups:
                self.cgroup(name).remove()
        # the name's lock is kept: a thread may be waiting on it, and a new Lock for the same name
        # would let two threads in at once

    # --- start / stop ----------------------------------------------------------------------------
    def start(self, name: str) -> VmStatus:
        with self.lock(name):
            rec = self.get(name)
            if rec.state in ACTIVE:
                raise Conflict(f"{name} is {rec.state} already")
            timer = self.timers.pop(name, None)
            if timer:
                timer.cancel()
            self._start_locked(rec)
            return self.status(name)

    def vmm_definition(self, rec: VmRow, instance: str, cg: VmCgroup | None) -> VmmDefinition:
        """What the VM's VMM process runs (its ``definition.json``)."""
        d = rec.definition
        return VmmDefinition(
            name=rec.name,
            instance=instance,
            kernel=d.kernel,
            memory=d.memory_mib * MIB,
            vcpus=d.vcpus,
            cmdline=d.cmdline,
            mode=d.mode,
            control_socket=self.control_path(rec),
            cgroups=tuple(os.path.dirname(p) for p in cg.procs_files()) if cg else (),
            jail=VmmJail(uid=self.uid_for(rec.id), gid=self.uid_for(rec.id)),
        )

    def _start_locked(self, rec: VmRow) -> None:
        name, d = rec.name, rec.definition
        self.account.reserve_for(name, d.vcpus, d.memory_mib * MIB)
        cg = self.cgroup(name) if self.use_cgroups else None
        try:
            if cg is not None:
                cg.remove()  # a leftover of a VMM that died while the service was down
                cg.create()
                cg.apply(
                    weight=d.cpu_weight,
                    quota_pct=d.cpu_quota_pct,
                    cpus=d.cpus,
                    memory_max=d.memory_mib * MIB + VMM_OVERHEAD,
                )
            instance = uuid.uuid4().hex
            vmdir = self.vm_dir(name)
            with open(os.path.join(vmdir, DEFINITION), "w") as f:
                json.dump(to_json(self.vmm_definition(rec, instance, cg)), f)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(vmdir, EXIT_REPORT))
            self.store.update(name, state="starting", instance=instance, pid=None)
            pid = self._spawn(name, vmdir)
            pidfd = os.pidfd_open(pid)
            rt = VmRuntime(name, pid, pidfd, instance, child=True)
            self.runtimes[name] = rt
            self.store.update(name, state="running", pid=pid, started=time.time())
            self.store.event(name, "started", f"VMM pid {pid}")
            os.write(self._wake_w, b"x")
        except BaseException as e:
            self.account.release(name)
            if name not in self.runtimes:
                if cg is not None:
                    cg.kill()
                    cg.remove()
                self.store.update(name, state="failed", pid=None)
                self.store.event(name, "start-failed", str(e))
            raise

    def _spawn(self, name: str, vmdir: str) -> int:
        log = open(os.path.join(vmdir, "vmm.log"), "ab")  # noqa: SIM115 - handed to the child
        try:
            launcher = subprocess.Popen(
                [self.python, "-m", self.vmm_module, "--dir", vmdir],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
                close_fds=True,
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            )
        finally:
            log.close()
        assert launcher.stdout is not None
        try:
            line = _read_line(launcher.stdout.fileno(), START_TIMEOUT, vmmproto.MAX_LAUNCH_LINE)
            try:
                status = launcher.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                launcher.kill()
                status = launcher.wait()
        finally:
            launcher.stdout.close()
        try:
            pid = vmmproto.parse_launch_line(line, what=f"the VMM launcher of {name}").pid
        except UntrustedInput:
            tail = self._log_tail(vmdir)
            raise VirtkitError(f"the VMM of {name} did not start (status {status}): {tail}") from None
        if status != 0:
            raise VirtkitError(f"the VMM launcher of {name} failed with status {status}: {self._log_tail(vmdir)}")
        return pid

    @staticmethod
    def _log_tail(vmdir: str) -> str:
        """The last line of the VMM's stderr log (which a VMM fills as it likes: bounded, one line)."""
        try:
            data = vmmproto.read_bounded(os.path.join(vmdir, "vmm.log"), 0, 2000, from_end=True)
        except (OSError, UntrustedInput):
            return "no output"
        lines = data.decode(errors="replace").strip().splitlines()
        return _one_line(lines[-1], 300) if lines else "no output"

    def stop(self, name: str, grace: float = STOP_GRACE) -> VmStatus:
        # the VM's lock is held to read and mark its state, never while talking to its VMM: a VMM
        # that does not answer must not keep kill or delete from taking the lock
        with self.lock(name):
            rec = self.get(name)
            timer = self.timers.pop(name, None)
            if timer:  # stopping a VM waiting to be restarted: it stays stopped
                timer.cancel()
                self.store.update(name, state="stopped")
                self.store.event(name, "restart-cancelled", "stopped by the user")
                return self.status(name)
            rt = self.runtimes.get(name)
            if rt is None:
                raise Conflict(f"{name} is {rec.state}, not running")
            rt.user_stop = True
            path = self.control_path(rec)
        deadline = time.monotonic() + grace
        with contextlib.suppress(vmmproto.VmmUnresponsive):
            vmmproto.request(
                path,
                {"op": "stop"},
                vmmproto.OkReply,
                deadline=min(grace, vmmproto.REQUEST_DEADLINE),
                what=f"the VMM of {name}",
            )
        if not self._wait_gone(name, rt, max(0.0, deadline - time.monotonic())):
            with self.lock(name):
                if self.runtimes.get(name) is rt:
                    self._kill_locked(name)
        return self.status(name)

    def kill(self, name: str) -> VmStatus:
        with self.lock(name):
            rec = self.get(name)
            timer = self.timers.pop(name, None)
            if timer:
                timer.cancel()
                self.store.update(name, state="stopped")
                return self.status(name)
            if name not in self.runtimes:
                raise Conflict(f"{name} is {rec.state}, not running")
            self._kill_locked(name)
        return self.status(name)

    def _kill_locked(self, name: str) -> None:
        """SIGKILL the VM's VMM through its pidfd and return once its end is recorded. Needs no
        word from the VMM and no monitor: if the monitor has not recorded the end soon after the
        process is gone, this thread records it."""
        rt = self.runtimes.get(name)
        if rt is None:
            return
        rt.user_stop = True
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(rt.pidfd, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError):
            select.select([rt.pidfd], [], [], KILL_WAIT)  # readable once the process is gone
        if not self._wait_gone(name, rt, 1.0):
            self._handle_end(rt)

    def _wait_gone(self, name: str, rt: VmRuntime, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.runtimes.get(name) is rt:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # --- watching VMMs ---------------------------------------------------------------------------
    def _supervise(self) -> None:
        """The monitor thread. No VM's misbehaviour reaches this loop (:meth:`_watch` contains each
        VM's end); should anything else escape, it is logged and watching resumes."""
        while not self._closing:
            try:
                self._watch()
            except Exception as e:  # noqa: BLE001 - the monitor must never die
                _log(f"the VMM monitor failed and restarts: {type(e).__name__}: {e}")
                time.sleep(0.1)

    def _watch(self) -> None:
        while not self._closing:
            fds = {rt.pidfd: rt for rt in list(self.runtimes.values()) if not rt.handled}
            try:
                ready, _, _ = select.select([self._wake_r, *fds], [], [], 1.0)
            except (OSError, ValueError):
                time.sleep(0.01)
                continue  # an fd closed meanwhile: rebuild the set
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            for fd in ready:
                rt = fds.get(fd)
                if rt is not None and not self._closing:
                    self._handle_end(rt)

    def _handle_end(self, rt: VmRuntime) -> None:
        """Record the end of ``rt``'s VMM exactly once, whatever that VMM left behind."""
        with self._end_lock:
            if rt.handled:
                return
            rt.handled = True
        try:
            self._ended(rt)
        except Exception as e:  # noqa: BLE001 - one VM's end never takes the monitor down
            _log(f"recording the end of {rt.name} failed: {type(e).__name__}: {e}")
            self._force_end(rt, f"the service could not record how the VMM ended: {type(e).__name__}: {e}")

    def _force_end(self, rt: VmRuntime, detail: str) -> None:
        """The end of a VM whose normal recording failed: every step on its own, none can stop the rest."""
        with contextlib.suppress(OSError):
            os.close(rt.pidfd)
        if self.runtimes.get(rt.name) is rt:
            self.runtimes.pop(rt.name, None)
        with contextlib.suppress(Exception):
            self.account.release(rt.name)
        if self.use_cgroups:
            with contextlib.suppress(Exception):
                cg = self.cgroup(rt.name)
                cg.kill()
                cg.remove()
        with contextlib.suppress(Exception):
            self.store.update(
                rt.name,
                state="stopped" if rt.user_stop else "failed",
                pid=None,
                last_exit=ExitInfo(reason="service-error", crash=True, detail=_one_line(detail), at=time.time()),
            )
            self.store.event(rt.name, "failed", _one_line(detail))

    def _exit_info(self, name: str, wait_status: int | None) -> ExitInfo:
        path = os.path.join(self.vm_dir(name), EXIT_REPORT)
        try:
            report = vmmproto.read_exit_report(path, what=f"the exit report of {name}")
        except UntrustedInput as e:
            return describe_exit(None, wait_status, unreadable=str(e))
        return describe_exit(report, wait_status)

    def _ended(self, rt: VmRuntime) -> None:
        wait_status = None
        if rt.child:
            with contextlib.suppress(ChildProcessError):
                _, wait_status = os.waitpid(rt.pid, 0)
        try:
            info = dataclasses.replace(self._exit_info(rt.name, wait_status), at=time.time())
            self._record_end(rt.name, info, user_stop=rt.user_stop, ran=time.time() - rt.started)
        finally:
            with contextlib.suppress(OSError):
                os.close(rt.pidfd)
            if self.runtimes.get(rt.name) is rt:
                self.runtimes.pop(rt.name, None)

    def _record_end(self, name: str, info: ExitInfo, *, user_stop: bool, ran: float) -> None:
        rec = self.store.get(name)
        self.account.release(name)
        if self.use_cgroups:
            cg = self.cgroup(name)
            cg.kill()
            cg.remove()
        if rec is None:
            return
        failed = is_failure(info) and not user_stop
        kind = "stopped" if user_stop else ("failed" if failed else "exited")
        self.store.event(name, kind, f"{info.reason}: {info.detail}".strip())
        restarts = rec.restarts if ran < BACKOFF_STABLE else 0
        policy = rec.definition.restart
        if failed and policy == "on-failure" and not self._closing:
            if restarts >= MAX_RESTARTS:
                self.store.update(name, state="failed", pid=None, last_exit=info, restarts=restarts)
                self.store.event(name, "restart-abandoned", f"{restarts} restarts in a row failed")
                return
            delay = min(self.backoff_base * (2**restarts), BACKOFF_MAX)
            self.store.update(name, state="restarting", pid=None, last_exit=info, restarts=restarts + 1)
            self.store.event(name, "restart-scheduled", f"in {delay:g} s (restart {restarts + 1})")
            timer = threading.Timer(delay, self._restart, args=(name,))
            timer.daemon = True
            self.timers[name] = timer
            timer.start()
            return
        self.store.update(
            name,
            state="failed" if failed else "stopped",
            pid=None,
            last_exit=info,
            restarts=0 if not failed else restarts,
        )

    def _restart(self, name: str) -> None:
        try:
            with self.lock(name):
                if self.timers.pop(name, None) is None or self._closing:
                    return  # cancelled meanwhile
                rec = self.store.get(name)
                if rec is None or rec.state != "restarting":
                    return
                try:
                    self._start_locked(rec)
                    self.store.update(name, restarts=rec.restarts)
                    self.store.event(name, "restarted", f"restart {rec.restarts}")
                except VirtkitError as e:
                    self.store.event(name, "restart-failed", str(e))
        except Exception as e:  # noqa: BLE001 - a timer thread dies silently otherwise, the VM stuck
            _log(f"restarting {name} failed: {type(e).__name__}: {e}")
            with contextlib.suppress(Exception):
                self.store.update(name, state="failed", pid=None)
                self.store.event(name, "restart-failed", _one_line(f"{type(e).__name__}: {e}"))

    # --- re-attach -------------------------------------------------------------------------------
    def reattach(self) -> None:
        """Find every VM's VMM again (module docstring). Survives anything a VMM left behind:
        a VM whose record cannot be handled is marked failed with the reason, and the rest go on."""
        for rec in self.store.all(on_corrupt=lambda name, e: _log(f"not re-attaching {name[:64]!r}: {e}")):
            try:
                self._reattach_one(rec)
            except Exception as e:  # noqa: BLE001 - virtkitd must always start
                _log(f"re-attaching {rec.name} failed: {type(e).__name__}: {e}")
                with contextlib.suppress(Exception):
                    self.store.update(
                        rec.name,
                        state="failed",
                        pid=None,
                        last_exit=ExitInfo(
                            reason="service-error",
                            crash=True,
                            at=time.time(),
                            detail=_one_line(f"re-attach failed: {type(e).__name__}: {e}"),
                        ),
                    )

    def _reattach_one(self, rec: VmRow) -> None:
        name = rec.name
        if rec.state == "restarting":
            self.store.update(name, state="failed")
            info = rec.last_exit or ExitInfo(reason="unknown", crash=True)
            self._record_end(name, info, user_stop=False, ran=0.0)
            return
        if rec.state not in ACTIVE:
            return
        path = self.control_path(rec)
        pid = 0
        ok = False
        pidfd = -1
        try:
            reply, pid = vmmproto.request(
                path, {"op": "status"}, vmmproto.StatusReply, deadline=2.0, what=f"the VMM of {name}"
            )
            ok = reply.instance == rec.instance and pid > 0
        except vmmproto.VmmUnresponsive:
            ok = False
        if ok:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                ok = False
        if ok:
            d = rec.definition
            with contextlib.suppress(InsufficientResources):
                self.account.reserve_for(name, d.vcpus, d.memory_mib * MIB)
            rt = VmRuntime(name, pid, pidfd, rec.instance or "", child=False)
            rt.started = rec.started or time.time()
            self.runtimes[name] = rt
            self.store.update(name, state="running", pid=pid)
            self.store.event(name, "reattached", f"VMM pid {pid}")
            return
        info = self._exit_info(name, None)
        info = dataclasses.replace(info, at=time.time(), detail=(info.detail + " (while the service was down)").strip())
        self._record_end(name, info, user_stop=False, ran=0.0)

    # --- queries ---------------------------------------------------------------------------------
    @staticmethod
    def public(rec: VmRow) -> VmStatus:
        return rec.public()

    def vms(self) -> list[VmStatus]:
        return [r.public() for r in self.store.all()]

    def events(self, vm: str | None = None, since: int = 0) -> list[Event]:
        if vm is not None:
            self.get(vm)
        return self.store.events(vm=vm, since=since)

    def stats(self, name: str) -> VmStats:
        return self._stats(self.get(name))

    def _stats(self, rec: VmRow) -> VmStats:
        name = rec.name
        out = VmStats(
            name=name,
            state=rec.state,
            pid=rec.pid,
            memory_bytes=rec.definition.memory_mib * MIB,
            vcpus=rec.definition.vcpus,
        )
        rt = self.runtimes.get(name)
        if self.use_cgroups and rt is not None:
            cg = self.cgroup(name)
            out = dataclasses.replace(
                out,
                cpu_seconds=cg.cpu_ns() / 1e9,
                throttled_seconds=cg.throttled_ns() / 1e9,
                memory_cgroup_bytes=cg.memory_bytes(),
            )
        if rt is not None:
            out = dataclasses.replace(out, rss_bytes=_rss(rt.pid))
            try:
                reply, _ = vmmproto.request(
                    self.control_path(rec),
                    {"op": "stats"},
                    vmmproto.StatsReply,
                    deadline=2.0,
                    what=f"the VMM of {name}",
                )
                out = dataclasses.replace(out, vmm=reply.stats)
            except vmmproto.VmmUnresponsive as e:
                out = dataclasses.replace(out, vmm_error=_one_line(str(e)))
        return out

    def logs(self, name: str, offset: int, limit: int) -> LogChunk:
        """The serial log, which the VMM fills: read from a regular file only, at most ``limit``."""
        self.get(name)
        path = os.path.join(self.vm_dir(name), SERIAL_LOG)
        try:
            data = vmmproto.read_bounded(path, offset, limit)
        except FileNotFoundError:
            data = b""
        except UntrustedInput as e:
            raise Conflict(f"{name}'s serial log cannot be served: {e}") from None
        except OSError as e:
            raise Conflict(f"{name}'s serial log cannot be read: {e.strerror}") from None
        return LogChunk(offset=offset, next=offset + len(data), data=data.decode("utf-8", errors="replace"))

    def console_write(self, name: str, data: str) -> None:
        rec = self.get(name)
        if name not in self.runtimes:
            raise Conflict(f"{name} is {rec.state}, not running")
        import base64

        try:
            reply, _ = vmmproto.request(
                self.control_path(rec),
                {"op": "console-write", "data": base64.b64encode(data.encode()).decode()},
                vmmproto.OkReply,
                what=f"{name}'s VMM",
            )
        except vmmproto.VmmUnresponsive as e:
            raise Conflict(_one_line(str(e))) from None
        if not reply.ok:
            raise Conflict(f"{name}'s VMM refused the input: {_one_line(reply.error or 'no reason')}")

    def host(self) -> HostInfo:
        from virtkit.host.cgroups import detect

        states: dict[str, int] = {}
        for name in self.store.names():
            try:
                rec = self.store.get(name)
            except CorruptRow:
                states["corrupt"] = states.get("corrupt", 0) + 1
                continue
            if rec is not None:
                states[rec.state] = states.get(rec.state, 0) + 1
        try:
            cgroups = detect().describe()
        except VirtkitError as e:
            cgroups = str(e)
        a = self.account.describe()
        return HostInfo(
            cores=a.cores,
            overcommit=a.overcommit,
            vcpu_capacity=a.vcpu_capacity,
            vcpus_used=a.vcpus_used,
            memory_total=a.memory_total,
            memory_reserved_for_host=a.memory_reserved_for_host,
            memory_capacity=a.memory_capacity,
            memory_used=a.memory_used,
            memory_free=a.memory_free,
            memory_available_now=a.memory_available_now,
            vmm_overhead_allowance=a.vmm_overhead_allowance,
            load_average=a.load_average,
            cgroups=_one_line(cgroups),
            vms=states,
            service_uptime_s=time.time() - self.started,
        )

    def metrics_snapshot(self) -> MetricsSnapshot:
        """What ``/metrics`` renders: the host, and every VM with its stats if it is running (a VM
        that ends during the scrape, or whose row does not parse, is left out of it)."""
        samples = []
        for rec in self.store.all(on_corrupt=lambda name, e: None):
            if rec.state != "running":
                samples.append(VmSample(rec.name, None))
                continue
            try:
                samples.append(VmSample(rec.name, self._stats(rec)))
            except Exception:  # noqa: BLE001, S112 - a VM that just ended is left out of this scrape
                continue
        return MetricsSnapshot(host=self.host(), vms=tuple(samples))


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _log(text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"virtkitd: {text}\n")
        sys.stderr.flush()


def _private_dir(path: str) -> None:
    """``path`` as a directory only root can enter (0700), also when it existed with a looser
    mode: the database, VM definitions and sockets are under it."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    import stat as stat_mod

    if not stat_mod.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} is not a directory")
    if stat_mod.S_IMODE(st.st_mode) != 0o700 or st.st_uid != os.geteuid():
        os.chown(path, os.geteuid(), os.getegid())
        os.chmod(path, 0o700)


def _read_line(fd: int, timeout: float, cap: int) -> bytes:
    """The first line from pipe ``fd`` (without its newline), at most ``cap`` bytes, within ``timeout``."""
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf and len(buf) <= cap:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, cap + 1 - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0][: cap + 1]


if __name__ == "__main__":
    # `python -m virtkit.service.daemon`, the spelling older scripts use: virtkitd is
    # virtkit.service.server, which sits above this module (it imports the API, which imports this
    # module). Become it, rather than import it from below.
    os.execv(sys.executable, [sys.executable, "-m", "virtkit.service", *sys.argv[1:]])
