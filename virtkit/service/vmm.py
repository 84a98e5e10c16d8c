"""One VM per process: the VMM that virtkitd starts for each VM (``python -m virtkit.service.vmm``).

    python -m virtkit.service.vmm --dir VMDIR [--wait] [--no-jail] [--no-seccomp] [--probe ACTION]

``VMDIR/definition.json`` says what to run (written by the service: kernel, memory in bytes,
vCPUs, command line, mode, disks, cgroup directories to join, the jail's uid/gid), a
:class:`~virtkit.service.model.VmmDefinition`: read bounded and parsed into that record before
anything else happens (an unknown field, a wrong type or a value out of bounds is one line on
stderr and exit status 2). The process

1. joins the VM's cgroups (so guest memory is charged to the VM from its first page);
2. unshares its namespaces and forks: the child is PID 1 of a new PID namespace and is the VMM;
   the parent prints ``{"pid": N}`` (the VMM's pid on the host) and exits, or with ``--wait``
   waits and exits with the VMM's status (128+signal if it was killed);
3. the VMM builds the machine, binds ``VMDIR/control.sock``, opens ``serial.log`` and
   ``exit.json``, then confines itself (:mod:`virtkit.jail.confine`) and only then runs the guest;
4. a control thread answers JSON lines on the socket (``status``, ``stats``, ``console-read``,
   ``console-write``, ``pause``, ``resume``, ``stop``); the main thread waits for the guest;
5. at the end it writes its exit report into ``exit.json`` (through the fd opened in 3) and exits
   with the status ``virtkit run`` would have (docs/ARCHITECTURE.md), skipping interpreter teardown.

The service may restart meanwhile: the VMM does not depend on it (own session, no parent-death
signal) and a new service finds it again through the control socket and its pid.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from virtkit.errors import VirtkitError
from virtkit.records import UntrustedInput, load_object, parse
from virtkit.service.model import MAX_DEFINITION, VmmDefinition

CONTROL_SOCKET = "control.sock"
SERIAL_LOG = "serial.log"
EXIT_REPORT = "exit.json"
DEFINITION = "definition.json"
#: serial output kept in memory for console reads (the log file keeps everything, up to RLIMIT_FSIZE)
CONSOLE_RING = 64 << 10
#: the longest control request line accepted
MAX_REQUEST = 64 << 10
PROBES = ("open-host-file", "socket-inet", "socket-unix", "exec", "fork", "ptrace", "host-processes")


class SerialSink:
    """Where the guest's UART output goes: a bounded ring for console reads (absolute offsets, so a
    reader knows what it missed) and the serial log file."""

    def __init__(self, log_fd: int) -> None:
        self.log_fd = log_fd
        self.ring = bytearray()
        self.total = 0  # bytes ever written: the offset just past the newest byte
        self.first_ns: int | None = None
        self.lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            if self.first_ns is None:
                self.first_ns = time.perf_counter_ns()
            self.ring += data
            self.total += len(data)
            if len(self.ring) > CONSOLE_RING:
                del self.ring[: len(self.ring) - CONSOLE_RING]
        if self.log_fd >= 0:
            # EFBIG at RLIMIT_FSIZE: the log is full, the guest keeps running
            with contextlib.suppress(OSError):
                os.write(self.log_fd, data)

    def read(self, offset: int, limit: int) -> tuple[int, bytes, int]:
        """(offset of the first byte returned, bytes, next offset); bytes older than the ring are
        skipped, so the first offset may be greater than asked."""
        with self.lock:
            start = self.total - len(self.ring)
            offset = min(max(offset, start), self.total)
            data = bytes(self.ring[offset - start : offset - start + limit])
            return offset, data, offset + len(data)


class Vmm:
    def __init__(self, vmdir: str, definition: VmmDefinition) -> None:
        from virtkit.vm import DiskSpec, Machine, MachineConfig

        self.dir = vmdir
        self.definition = d = definition
        disks = tuple(DiskSpec(x.path, x.read_only) for x in d.disks)
        config = MachineConfig(memory=d.memory, vcpus=d.vcpus, paravirt=d.mode == "para", disks=disks)
        log_fd = os.open(os.path.join(vmdir, SERIAL_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self.serial = SerialSink(log_fd)
        self.report_fd = os.open(
            os.path.join(vmdir, EXIT_REPORT), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640
        )
        self.machine = Machine(config, self.serial.write)
        self.machine.load(d.kernel, cmdline=d.cmdline)
        path = d.control_socket or os.path.join(vmdir, CONTROL_SOCKET)  # sun_path: 108 bytes
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(path)
        os.chmod(path, 0o600)
        self.listener.listen(8)
        self.started = time.time()

    # --- control ---------------------------------------------------------------------------------
    def serve(self) -> None:
        """The control thread: one client at a time, one JSON object per line each way."""
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            try:
                self._serve_client(conn)
            except OSError:
                pass
            finally:
                conn.close()

    def _serve_client(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            if len(buf) > MAX_REQUEST and b"\n" not in buf:
                conn.sendall(b'{"ok": false, "error": "request line too long"}\n')
                return
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    reply = self.handle(json.loads(line))
                except Exception as e:  # noqa: BLE001 - a bad request never ends the VMM
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        m = self.machine
        op = req.get("op")
        if op == "status":
            state = "stopping" if m.stopping else "paused" if m.paused else "running"
            return {
                "ok": True,
                "name": self.definition.name,
                "instance": self.definition.instance,
                "state": state,
                "vcpus": len(m.vcpus),
                "memory": m.config.memory,
                "started": self.started,
            }
        if op == "stats":
            return {"ok": True, "stats": self.stats()}
        if op == "console-read":
            first, data, nxt = self.serial.read(
                int(req.get("offset", 0)), min(int(req.get("limit", CONSOLE_RING)), CONSOLE_RING)
            )
            return {"ok": True, "offset": first, "next": nxt, "data": base64.b64encode(data).decode()}
        if op == "console-write":
            m.uart.receive(base64.b64decode(str(req.get("data", ""))))
            return {"ok": True}
        if op == "pause":
            m.pause()
            return {"ok": True}
        if op == "resume":
            m.resume()
            return {"ok": True}
        if op == "stop":
            m.stop()
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def stats(self) -> dict[str, Any]:
        from virtkit.stats import KNOWN_PORTS, merge

        m = self.machine
        for _ in range(5):  # vCPU threads add keys while we read; retry a torn read
            try:
                st = merge(
                    m.vcpu_stats(),
                    dict(m.io_bus.unknown),
                    dict(m.mmio_bus.unknown),
                    (m.ended_ns or time.perf_counter_ns()) - m.started_ns,
                )
                break
            except RuntimeError:
                continue
        else:
            return {}
        devices: dict[str, int] = {}
        for (port, _rw), n in st.pio.items():
            name = KNOWN_PORTS.get(port, "other")
            devices[name] = devices.get(name, 0) + n
        if st.mmio:
            devices["mmio"] = sum(st.mmio.values())
        st.boot_protocol = m.boot_protocol
        out = st.to_dict()
        out["device_exits"] = devices
        out["serial_bytes"] = self.serial.total
        out["first_output_s"] = None if self.serial.first_ns is None else (self.serial.first_ns - m.started_ns) / 1e9
        out["uptime_s"] = time.time() - self.started
        return out

    # --- run -------------------------------------------------------------------------------------
    def run(self, probe: str | None = None) -> int:
        from virtkit.api import exit_status_for

        m = self.machine
        signal.signal(signal.SIGTERM, lambda *_: m.stop())
        m.start()
        threading.Thread(target=self.serve, name="control", daemon=True).start()
        if probe:
            run_probe(probe)
            m.stop()
        stop = m.wait()
        status = exit_status_for(stop)
        report = {
            "reason": stop.reason.value,
            "exit_status": status,
            "detail": stop.detail[:4000],
            "crash": stop.reason.is_crash,
            "ended": time.time(),
        }
        with contextlib.suppress(OSError):
            os.write(self.report_fd, json.dumps(report).encode())
        return status


def run_probe(action: str) -> None:
    """Test hook: try something a confined VMM must not be able to do, and say what happened on
    stderr. Under seccomp most of these end the process with SIGSYS instead."""

    def say(text: str) -> None:
        os.write(2, f"probe {action}: {text}\n".encode())

    try:
        if action == "open-host-file":
            fd = os.open("/etc/passwd", os.O_RDONLY)
            say(f"opened fd {fd}")
        elif action == "socket-inet":
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.connect(("127.0.0.1", 1))
            say("connected")
        elif action == "socket-unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            say(f"created fd {s.fileno()}")
        elif action == "exec":
            os.execv("/bin/true", ["/bin/true"])
        elif action == "fork":
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            say(f"forked {pid}")
        elif action == "host-processes":
            seen = []
            for pid in range(2, 4096):  # PID 1 of its namespace is itself
                try:
                    os.close(os.pidfd_open(pid))  # EINVAL for ids of its own threads: processes only
                    seen.append(pid)
                except OSError:
                    pass
            say(f"can see {len(seen)} other processes")
        elif action == "ptrace":
            from virtkit.host import libc

            ret = libc.ptrace(16, 1)  # PTRACE_ATTACH
            say(f"ptrace returned {ret}")
        else:
            say("unknown probe")
    except OSError as e:
        say(f"denied: {e.strerror or e}")


# ------------------------------------------------------------------------------------------------
# process start-up


def read_definition(vmdir: str) -> VmmDefinition:
    """``VMDIR/definition.json`` as a record: at most :data:`MAX_DEFINITION` bytes, a regular
    file, every field known and in bounds. Raises UntrustedInput (one line) or OSError."""
    path = os.path.join(vmdir, DEFINITION)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        import stat

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UntrustedInput(f"{path} is not a regular file")
        data = os.read(fd, MAX_DEFINITION + 1)
    finally:
        os.close(fd)
    return parse(VmmDefinition, load_object(data, what=path, max_bytes=MAX_DEFINITION), what=DEFINITION)


def _join_cgroups(dirs: list[str]) -> None:
    from virtkit.host.cgroups import write_value

    for d in dirs:
        write_value(os.path.join(d, "cgroup.procs"), "0")  # 0: the writing process


def _status_of(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def main(argv: list[str] | None = None, vmm_class: type[Vmm] | None = None) -> int:
    """``vmm_class``: what runs the guest once built and confined (tests substitute a hostile one)."""
    import argparse

    p = argparse.ArgumentParser(prog="virtkit vmm", description="run one VM from VMDIR/definition.json")
    p.add_argument("--dir", required=True, help="the VM's directory (definition.json, sockets, logs)")
    p.add_argument("--wait", action="store_true", help="stay in the foreground until the VM ends")
    p.add_argument("--no-jail", action="store_true", help="run unconfined (in-process experiments only)")
    p.add_argument("--no-seccomp", action="store_true", help=argparse.SUPPRESS)  # tests of the other layers
    p.add_argument("--probe", choices=PROBES, default=None, help=argparse.SUPPRESS)  # tests of the jail
    args = p.parse_args(argv)
    vmdir = os.path.abspath(args.dir)
    try:
        definition = read_definition(vmdir)
    except (UntrustedInput, OSError) as e:
        os.write(2, f"virtkit vmm: error: {e}\n".encode())
        return 2
    jailed = not args.no_jail and definition.jail.enabled
    _join_cgroups(list(definition.cgroups))
    if jailed:
        from virtkit.jail.confine import enter_namespaces

        enter_namespaces()
        # fork with the interpreter's own bookkeeping; the child is PID 1 of the new namespace
        pid = os.fork()
        if pid:
            print(json.dumps({"pid": pid}), flush=True)
            if not args.wait:
                return 0
            signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGTERM))
            signal.signal(signal.SIGINT, lambda *_: os.kill(pid, signal.SIGTERM))
            while True:
                try:
                    return _status_of(os.waitpid(pid, 0)[1])
                except InterruptedError:
                    continue
    else:
        print(json.dumps({"pid": os.getpid()}), flush=True)
    return _vmm_main(vmdir, definition, jailed, args, vmm_class or Vmm)


def _vmm_main(vmdir: str, definition: VmmDefinition, jailed: bool, args: object, vmm_class: type[Vmm]) -> int:
    import virtkit.diagnose  # noqa: F401 - crash reports must not need an import after confinement
    import virtkit.stats  # noqa: F401
    from virtkit.api import exit_status_for  # noqa: F401

    try:
        vmm = vmm_class(vmdir, definition)
        # stdout is the launcher's pipe to the service, which reads one line from it: the VMM has
        # nothing to say there, so a subverted one cannot write to it either
        devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        os.dup2(devnull, 1)
        os.close(devnull)
        if jailed:
            from virtkit.jail.confine import JailSpec, confine, thread_limit

            j = definition.jail
            spec = JailSpec(
                uid=j.uid,
                gid=j.gid,
                threads=thread_limit(definition.vcpus, definition.mode == "para"),
                max_file_size=j.max_log,
                seccomp=not getattr(args, "no_seccomp", False),
            )
            confine(spec)
    except (VirtkitError, OSError) as e:
        os.write(2, f"virtkit vmm: error: {e}\n".encode())
        try:
            fd = os.open(os.path.join(vmdir, EXIT_REPORT), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            os.write(
                fd,
                json.dumps(
                    {"reason": "error", "exit_status": 1, "detail": str(e)[:4000], "crash": False, "ended": time.time()}
                ).encode(),
            )
            os.close(fd)
        except OSError:
            pass
        return 1
    return vmm.run(getattr(args, "probe", None))


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
