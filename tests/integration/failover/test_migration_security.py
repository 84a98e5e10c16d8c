"""Live migration with a hostile network and a hostile sender, real KVM, two processes on loopback:
the receiver builds its machine from its own command line, confines itself before it reads a byte,
authenticates every message, and runs nothing it was not entitled to."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fohelp import (
    FileWatch,
    assert_seamless,
    file_counts,
    make_key,
    spawn,
    stop_process,
    virtkit,
    wait_for,
)

from virtkit.migration import protocol
from virtkit.migration.control import request
from virtkit.migration.protocol import Channel, Empty, MessageType

pytestmark = pytest.mark.usefixtures("kvm")
SIGSYS_STATUS = 128 + signal.SIGSYS


class Receiver:
    """`virtkit migrate-receive` with a key, its own machine options, a port file and a serial log."""

    def __init__(self, tmp: Path, *options: str, key: Path | None = None, tag: str = "dst") -> None:
        self.key = key or make_key(tmp / "key")
        self.port_file, self.log, self.ctl = tmp / f"{tag}.port", tmp / f"{tag}.log", tmp / f"{tag}.sock"
        self.proc = spawn(
            "migrate-receive",
            "--listen",
            "127.0.0.1:0",
            "--port-file",
            str(self.port_file),
            "--key-file",
            str(self.key),
            "--serial",
            str(self.log),
            "--accept-timeout",
            "30",
            *options,
        )
        wait_for(
            lambda: self.port_file.exists() or self.proc.poll() is not None, timeout=20, what="the receiver to listen"
        )
        assert self.proc.poll() is None, self.proc.communicate()
        self.port = int(self.port_file.read_text())

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def child(self) -> int:
        """The host pid of the confined receiver: the launcher's only child."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        wait_for(lambda: path.read_text().strip() != "", what="the confined receiver")
        return int(path.read_text().split()[0])

    def finish(self, timeout: float = 20) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err.decode()

    def ran(self) -> bool:
        """Did a guest run here? (The counter guest prints from its first instruction.)"""
        return self.log.exists() and self.log.stat().st_size > 0


class Source:
    """`virtkit run KERNEL --control`, running until it has printed ``lines`` lines."""

    def __init__(self, tmp: Path, kernel: Path, *options: str, lines: int = 10) -> None:
        self.sock, self.log = tmp / "src.sock", tmp / "src.log"
        self.proc = spawn("run", str(kernel), "--control", str(self.sock), "--serial", str(self.log), *options)
        wait_for(lambda: self.sock.exists() and len(file_counts(self.log)) >= lines, timeout=20, what="the source VM")

    def migrate(self, to: str, key: Path) -> subprocess.CompletedProcess[str]:
        return virtkit("migrate", "--control", str(self.sock), "--to", to, "--key-file", str(key), timeout=60)

    def still_running(self) -> None:
        assert request(str(self.sock), "status")["state"] == "running"
        at = len(file_counts(self.log))
        wait_for(lambda: len(file_counts(self.log)) >= at + 10, what="the source VM to keep running")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        stop_process(p)


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _one_line_error(err: str, fragment: str) -> str:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("virtkit: error:")]
    assert len(errors) == 1 and fragment in errors[0], err
    return errors[0]


def test_authenticated_migration_into_a_confined_receiver(
    tmp_path: Path, counter: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the jail needs root")
    dst = Receiver(tmp_path, "--control", str(tmp_path / "dst.sock"))
    procs.append(dst.proc)
    pid = dst.child()
    # confined before it accepted anything: what a guest (or a stream) that took it over would have
    wait_for(lambda: _status(pid).get("Seccomp") == "2", what="the receiver to confine itself")
    st = _status(pid)
    assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1"
    assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == int(st["CapBnd"], 16) == 0
    assert st["Uid"].split() != ["0"] * 4 and len(set(st["Uid"].split())) == 1
    assert st["NSpid"].split()[-1] == "1"  # PID 1 of its own PID namespace
    for ns in ("mnt", "pid", "net", "ipc", "uts"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    assert os.listdir(f"/proc/{pid}/root") == []  # an empty root: no host file reachable by path
    src = Source(tmp_path, counter, "--cmdline", "us=500")
    procs.append(src.proc)
    p = src.migrate(dst.address, dst.key)
    assert p.returncode == 0, p.stderr
    assert src.proc.wait(timeout=20) == 0  # the source VMM ends: the VM lives on the target now
    wait_for(lambda: len(file_counts(dst.log)) >= 20, what="the VM to run on the target")
    # the VM runs in the jail, which the control socket shows, and refuses what needs the host
    assert request(str(dst.ctl), "status")["state"] == "running"
    with pytest.raises(Exception, match="confined"):
        request(str(dst.ctl), "snapshot", dir=str(tmp_path / "snap"))
    assert not (tmp_path / "snap").exists()
    request(str(dst.ctl), "stop")
    code, err = dst.finish()
    assert code == 130, err  # the VM's status (stopped), through the launcher
    assert_seamless(src.log.read_bytes(), dst.log.read_bytes(), first=1)
    assert not dst.ctl.exists()  # the launcher removed the socket file the jail could not


def test_a_sender_with_another_key_is_refused(
    tmp_path: Path, counter: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    dst = Receiver(tmp_path)
    procs.append(dst.proc)
    src = Source(tmp_path, counter, "--cmdline", "us=500")
    procs.append(src.proc)
    wrong = make_key(tmp_path / "another.key")
    p = src.migrate(dst.address, wrong)
    assert p.returncode == 2
    _one_line_error(p.stderr, "did not prove it holds the migration key")
    assert "the VM keeps running here" in p.stderr
    src.still_running()
    code, err = dst.finish()
    assert code == 2
    _one_line_error(err, "handshake failed")
    assert not dst.ran()


@pytest.mark.parametrize(
    "options,field",
    [
        (["--memory", "128M"], "memory: the VM has 64 MiB of RAM, this receiver was started with --memory 128 MiB"),
        (["--vcpus", "2"], "vcpus: the VM has 1 vCPUs, this receiver was started with --vcpus 2"),
        (["--mode", "para"], "mode: the VM runs in --mode full, this receiver was started with --mode para"),
        (["--strict"], "strict: the VM runs without --strict, this receiver with"),
        (["--disk", "{disk}"], "disks: the VM has 0 disks, this receiver was started with 1 disk"),
    ],
)
def test_a_vm_of_another_shape_is_refused_and_nothing_runs(
    tmp_path: Path, counter: Path, options: list[str], field: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    disk = tmp_path / "receiver.img"
    disk.write_bytes(b"receiver's own disk".ljust(1 << 20, b"\0"))
    dst = Receiver(tmp_path, *[o.format(disk=disk) for o in options])
    procs.append(dst.proc)
    src = Source(tmp_path, counter, "--cmdline", "us=500")
    procs.append(src.proc)
    p = src.migrate(dst.address, dst.key)
    assert p.returncode == 2
    _one_line_error(p.stderr, f"refused the migration: {field}")
    src.still_running()
    code, err = dst.finish()
    assert code == 2
    _one_line_error(err, field)
    assert not dst.ran()
    assert disk.read_bytes().startswith(b"receiver's own disk")


def _handshake(address: str, key: Path) -> Channel:
    """A key holder's connection to a receiver, past HELO and CHAL: whatever it sends next is
    authenticated, so only the receiver's checks stand between it and the machine."""
    from virtkit.migration.keys import load

    host, port = protocol.parse_address(address)
    ch = Channel(socket.create_connection((host, port), timeout=10), address, read_timeout=10)
    nonce = os.urandom(32)
    ch.send(MessageType.HELLO, protocol.HELLO.pack(protocol.HELLO_MAGIC, protocol.PROTOCOL_VERSION, nonce))
    kind, length = ch.recv_header({MessageType.CHALLENGE: 32})
    nonce_t = ch.recv_payload(length)
    to_target, to_source = protocol.session_keys(load(str(key)), nonce, nonce_t)
    ch.establish(send_key=to_target, recv_key=to_source)
    ch.verify(MessageType.CHALLENGE, nonce_t)
    return ch


def _shape_of(memory: int = 64 << 20) -> dict[str, object]:
    """The shape of the receiver's machine, as a JSON document (built here the same way)."""
    from virtkit import records
    from virtkit.migration.shape import describe
    from virtkit.vm import Machine, MachineConfig

    m = Machine(MachineConfig(memory=memory), lambda b: None)
    try:
        return records.to_json(describe(m))
    finally:
        m.close()


@pytest.mark.parametrize("attack", ["old-protocol-hello", "path-in-description", "path-in-disk"])
def test_a_disk_path_from_the_sender_is_never_opened(
    tmp_path: Path, attack: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    """The reported attack, and its variants with the key: the sender names a host file as the
    guest's disk. The receiver refuses, and the file is not opened, read or written by anyone."""
    canary = tmp_path / "canary"
    canary.write_bytes(b"host secret".ljust(1 << 20, b"\0"))
    before = canary.read_bytes()
    watch = FileWatch(canary)
    dst = Receiver(tmp_path)
    procs.append(dst.proc)
    if attack == "old-protocol-hello":  # no key at all: what the review sent
        hello = json.dumps(
            {
                "protocol": 1,
                "machine": {
                    "memory": 64 << 20,
                    "vcpus": 1,
                    "paravirt": False,
                    "strict": False,
                    "disks": [{"path": str(canary), "read_only": False}],
                },
            }
        ).encode()
        with socket.create_connection(("127.0.0.1", dst.port), timeout=10) as s:
            s.sendall(protocol.HEADER.pack(b"HELO", 0, len(hello)) + hello)
            assert b"speaks migration protocol 2 only" in s.recv(4096)
        fragment = "cannot read"
    else:
        shape = _shape_of()
        if attack == "path-in-description":
            shape["path"] = str(canary)
        else:
            shape["disks"] = [{"read_only": False, "size": 1 << 20, "path": str(canary)}]
        ch = _handshake(dst.address, dst.key)
        ch.send(MessageType.DESCRIBE, json.dumps(shape).encode())
        kind, length = ch.recv_header({MessageType.ABORT: protocol.MAX_SMALL})
        assert "unknown field 'path'" in ch.failure(kind, length)
        ch.close()
        fragment = "unknown field 'path'"
    code, err = dst.finish()
    assert code == 2
    _one_line_error(err, fragment)
    assert not dst.ran()
    assert watch.events() == 0  # never opened, read, written or chmod'ed
    assert canary.read_bytes() == before


@pytest.mark.parametrize(
    "attack,fragment",
    [
        ("go-before-state", "sent GO!! where PAGE or ROND or STAT or ABRT was expected"),
        ("deeply-nested-description", "nested more than 32 levels"),
        ("state-of-no-machine", "snapshot field state.vm is missing"),
    ],
)
def test_a_key_holder_out_of_protocol_starts_nothing(
    tmp_path: Path, attack: str, fragment: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    dst = Receiver(tmp_path)
    procs.append(dst.proc)
    ch = _handshake(dst.address, dst.key)
    if attack == "deeply-nested-description":
        ch.send(MessageType.DESCRIBE, b'{"memory": ' + b"[" * 20_000 + b"]" * 20_000 + b"}")
    else:
        ch.send_record(MessageType.DESCRIBE, _shape_of())
        kind, length = ch.recv_header({MessageType.ACCEPT: protocol.MAX_SMALL})
        ch.recv_record(kind, length, Empty)
        if attack == "go-before-state":
            ch.send_record(MessageType.GO, Empty())
        else:
            from virtkit.snapshot import format

            state = format.pack({"protocol": protocol.PROTOCOL_VERSION})  # not a machine: refused
            ch.send(MessageType.STATE, state)
    with pytest.raises(protocol.MigrationError):  # the receiver's ABRT, or the connection ends
        kind, length = ch.recv_header({MessageType.READY: protocol.MAX_SMALL})
    ch.close()
    code, err = dst.finish()
    assert code == 2
    _one_line_error(err, fragment)
    assert not dst.ran()


def test_a_confined_receiver_runs_a_paravirtual_guest_doing_disk_io(
    tmp_path: Path, guests: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """The seccomp allow-list covers what a para guest needs after the switch-over: the I/O thread
    (epoll, eventfds) and virtio-blk writes and reads on the receiver's own disk image."""
    if os.geteuid() != 0:
        pytest.skip("the jail needs root")
    size = 256 << 20
    for name in ("src.img", "dst.img"):
        with open(tmp_path / name, "wb") as f:
            f.truncate(size)
    dst = Receiver(tmp_path, "--mode", "para", "--memory", "32M", "--disk", str(tmp_path / "dst.img"))
    procs.append(dst.proc)
    src = spawn(
        "run",
        str(guests / "parawork.elf"),
        "--mode",
        "para",
        "--memory",
        "32M",
        "--disk",
        str(tmp_path / "src.img"),
        "--cmdline",
        # 8 KiB requests: long enough (seconds) that the migration always lands mid-work; with
        # 32 KiB ones the guest sometimes finished first on a quiet machine and the source was gone
        "work=disk mib=200 via=virtio req=16",
        "--control",
        str(tmp_path / "src.sock"),
        "--serial",
        str(tmp_path / "src.log"),
    )
    procs.append(src)
    wait_for(
        lambda: (
            b"virtio-blk capacity" in ((tmp_path / "src.log").read_bytes() if (tmp_path / "src.log").exists() else b"")
        ),
        timeout=20,
        what="the guest to start its disk work",
    )
    p = virtkit(
        "migrate", "--control", str(tmp_path / "src.sock"), "--to", dst.address, "--key-file", str(dst.key), timeout=60
    )
    assert p.returncode == 0, p.stderr
    code, err = dst.finish(timeout=120)
    assert code != SIGSYS_STATUS, err
    assert "SIGSYS" not in err and "Traceback" not in err, err
    assert b"work=disk mode=para via=virtio" in dst.log.read_bytes(), (code, err)
    with open(tmp_path / "dst.img", "rb") as f:  # the receiver wrote its own image
        assert any(f.read(1 << 20).strip(b"\0") for _ in range(size >> 20))


def test_the_receiver_listens_on_loopback_by_default(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    key = make_key(tmp_path / "key")
    port_file = tmp_path / "port"
    p = spawn(
        "migrate-receive",
        "--listen",
        "0",
        "--port-file",
        str(port_file),
        "--key-file",
        str(key),
        "--serial",
        "none",
        "--accept-timeout",
        "30",
    )
    procs.append(p)
    wait_for(port_file.exists, timeout=20, what="the receiver to listen")
    port = int(port_file.read_text())
    listening = [
        row.split()[1]
        for row in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if row.split()[3] == "0A" and int(row.split()[1].split(":")[1], 16) == port
    ]
    assert listening == [f"0100007F:{port:04X}"]  # 127.0.0.1, not 0.0.0.0


def test_killing_the_launcher_ends_the_confined_receiver(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    if os.geteuid() != 0:
        pytest.skip("the jail needs root")
    dst = Receiver(tmp_path)
    procs.append(dst.proc)
    child = dst.child()
    dst.proc.kill()
    dst.proc.wait(timeout=10)

    def gone() -> bool:
        try:
            return _status(child).get("State", "").startswith("Z")
        except FileNotFoundError:
            return True

    wait_for(gone, what="the confined receiver to die with its launcher")


@pytest.mark.parametrize("mode,fragment", [(0o644, "has permissions 0644"), (0o600, "holds a 5-byte key")])
def test_unsafe_key_files_are_refused_in_one_line(tmp_path: Path, mode: int, fragment: str) -> None:
    key = tmp_path / "key"
    key.write_text("short" if mode == 0o600 else "ab" * 32)
    key.chmod(mode)
    for args in (
        ["migrate-receive", "--listen", "0", "--key-file", str(key)],
        ["migrate", "--control", str(tmp_path / "none.sock"), "--to", "127.0.0.1:1", "--key-file", str(key)],
    ):
        p = virtkit(*args)
        assert p.returncode == 2
        _one_line_error(p.stderr, fragment)


def test_checkpoints_need_the_host_and_are_refused_with_the_jail(tmp_path: Path) -> None:
    key = make_key(tmp_path / "key")
    p = virtkit(
        "migrate-receive",
        "--listen",
        "0",
        "--key-file",
        str(key),
        "--checkpoint-every",
        "1s",
        "--checkpoint-dir",
        str(tmp_path),
    )
    assert p.returncode == 2
    _one_line_error(p.stderr, "--checkpoint-every writes into a host directory")


def test_migrate_keygen(tmp_path: Path) -> None:
    key = tmp_path / "k"
    p = virtkit("migrate-keygen", str(key))
    assert p.returncode == 0, p.stderr
    assert key.stat().st_mode & 0o777 == 0o600 and len(bytes.fromhex(key.read_text())) == 32
    p = virtkit("migrate-keygen", str(key))
    assert p.returncode == 2
    _one_line_error(p.stderr, "exists")


def test_no_jail_warns(tmp_path: Path) -> None:
    key = make_key(tmp_path / "key")
    p = virtkit(
        "migrate-receive",
        "--listen",
        "0",
        "--key-file",
        str(key),
        "--no-jail",
        "--accept-timeout",
        "0.2",
        "--serial",
        "none",
    )
    assert p.returncode == 2
    assert "warning: --no-jail: this receiver runs unconfined" in p.stderr
    _one_line_error(p.stderr, "no migration arrived")
