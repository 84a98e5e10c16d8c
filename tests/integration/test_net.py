"""virtio-net end to end: ``virtkit run --net tap,bridge=BR`` in a network namespace this test makes,
with the netping guest answering ARP and ICMP echo.

Everything happens inside a fresh namespace (``ip netns add``): a bridge with a private address, the
VMMs run under ``ip netns exec``, and ``ping`` runs there too; the host's own interfaces are never
touched and nothing is routed anywhere. Each test checks that no ``vk-tap`` link outlives its VMM,
whether the VMM ended by itself, by SIGTERM or by SIGKILL. The fixtures kill what they started and
delete the namespace on every path.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("kvm")

SUBNET = "10.203.77"
BRIDGE = "vk-br0"
#: seconds any one step may take on a busy 2-core machine (a deadline, not an expectation)
DEADLINE = 60
_ids = itertools.count()


def _need(condition: bool, why: str) -> None:
    if not condition:
        pytest.skip(why)


@pytest.fixture
def netping(guests: Path) -> Path:
    path = guests / "netping.elf"
    _need(path.exists(), f"{path} is not built: run `make guests`")
    return path


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=DEADLINE, check=False)


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace with lo up and a bridge at SUBNET.1/24; deleted afterwards."""
    _need(os.geteuid() == 0, "needs root for network namespaces and TAP devices")
    _need(os.path.exists("/dev/net/tun"), "/dev/net/tun does not exist")
    _need(shutil.which("ip") is not None and shutil.which("ping") is not None, "needs iproute2 and ping")
    name = f"vk-net-{os.getpid()}-{next(_ids)}"
    made = ip("netns", "add", name)
    assert made.returncode == 0, made.stderr
    try:
        for cmd in (
            ["link", "set", "lo", "up"],
            ["link", "add", BRIDGE, "type", "bridge"],
            ["addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE],
            ["link", "set", BRIDGE, "up"],
        ):
            r = ip("-n", name, *cmd)
            assert r.returncode == 0, (cmd, r.stderr)
        yield name
    finally:
        ip("netns", "del", name)


def tap_links(ns: str) -> list[str]:
    out = ip("-n", ns, "-o", "link", "show").stdout
    return re.findall(r"^\d+: (vk-tap[^:@\s]*)", out, re.M)


class Vmm:
    """One ``virtkit run`` under ``ip netns exec``, its output collected by a reader thread."""

    def __init__(self, ns: str, *args: str) -> None:
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "virtkit", *args, "--timeout", str(3 * DEADLINE)]
        # ip netns exec execs the command: this pid is the VMM's, so signals reach it directly
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\r\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, count: int = 1) -> list[str]:
        """The first ``count`` lines matching ``pattern``, waiting up to DEADLINE for them."""
        regex = re.compile(pattern)
        end = time.monotonic() + DEADLINE
        with self._changed:
            while True:
                hits = [line for line in self.lines if regex.search(line)]
                if len(hits) >= count:
                    return hits[:count]
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no {count} line(s) matching {pattern!r}:\n" + "\n".join(self.lines))
                self._changed.wait(min(left, 1.0))

    def wait(self) -> int:
        rc = self.proc.wait(timeout=DEADLINE)
        self._reader.join(timeout=DEADLINE)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()


@pytest.fixture
def vmms() -> Iterator[list[Vmm]]:
    started: list[Vmm] = []
    yield started
    for vmm in started:
        vmm.kill()


def start(vmms: list[Vmm], ns: str, kernel: Path, cmdline: str, *net_opts: str, extra: tuple[str, ...] = ()) -> Vmm:
    net = [a for o in net_opts for a in ("--net", o)]
    vmm = Vmm(ns, "run", str(kernel), "--mode", "para", *net, "--cmdline", cmdline, *extra)
    vmms.append(vmm)
    return vmm


def ping(ns: str, count: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "ping", "-c", str(count), "-W", "10", f"{SUBNET}.2"],
        capture_output=True,
        text=True,
        timeout=3 * DEADLINE,
        check=False,
    )


def test_host_pings_the_guest_and_sigterm_removes_the_tap(netns: str, netping: Path, vmms: list[Vmm]) -> None:
    vmm = start(vmms, netns, netping, f"ip={SUBNET}.2", f"tap,bridge={BRIDGE},mac=02:76:6b:00:00:02")
    vmm.wait_for(r"^netping: ready mac=02:76:6b:00:00:02 ")
    (tap,) = tap_links(netns)
    assert f"master {BRIDGE}" in ip("-n", netns, "link", "show", tap).stdout

    p = ping(netns, 3)
    assert p.returncode == 0 and "3 received" in p.stdout, p.stdout + p.stderr + vmm.output
    vmm.wait_for(rf"^netping: arp who-has {SUBNET}\.2 tell {SUBNET}\.1: replied")
    replies = vmm.wait_for(rf"^netping: icmp echo request from {SUBNET}\.1 .*: replied", 3)
    assert [re.findall(r"seq=(\d+)", r) for r in replies] == [["1"], ["2"], ["3"]]
    # the host saw the guest's MAC answer for its address
    neigh = ip("-n", netns, "neigh", "show", f"{SUBNET}.2").stdout
    assert "02:76:6b:00:00:02" in neigh, neigh

    vmm.proc.send_signal(signal.SIGTERM)
    assert vmm.wait() == 128 + signal.SIGTERM, vmm.output
    assert tap_links(netns) == []


def test_two_guests_on_one_bridge_reach_each_other(netns: str, netping: Path, vmms: list[Vmm]) -> None:
    responder = start(vmms, netns, netping, f"ip={SUBNET}.2", f"tap,bridge={BRIDGE}")
    responder.wait_for(r"^netping: ready ")
    pinger = start(
        vmms, netns, netping, f"ip={SUBNET}.3 peer={SUBNET}.2 count=3 secs=60", f"tap,bridge={BRIDGE},name=vk-tap-b"
    )
    # the guest's exit value 0 becomes status (0 << 1) | 1 through the debug-exit port
    assert pinger.wait() == 1, pinger.output
    assert "netping: done replies=3/3" in pinger.output, pinger.output
    assert re.search(rf"^netping: arp {SUBNET}\.2 is-at 02:76:6b:", pinger.output, re.M), pinger.output
    responder.wait_for(rf"^netping: icmp echo request from {SUBNET}\.3 .*: replied", 3)
    assert "vk-tap-b" not in tap_links(netns)  # the pinger's TAP went with it

    responder.proc.send_signal(signal.SIGTERM)
    responder.wait()
    assert tap_links(netns) == []


def test_snapshot_and_restore_keep_the_card_on_a_new_tap(
    netns: str, netping: Path, vmms: list[Vmm], tmp_path: Path
) -> None:
    control, snap = tmp_path / "ctl.sock", tmp_path / "snap"
    mac = "02:76:6b:00:00:07"
    vmm = start(
        vmms, netns, netping, f"ip={SUBNET}.2", f"tap,bridge={BRIDGE},mac={mac}", extra=("--control", str(control))
    )
    vmm.wait_for(r"^netping: ready ")
    assert ping(netns, 1).returncode == 0, vmm.output
    saved = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            netns,
            sys.executable,
            "-m",
            "virtkit",
            "snapshot",
            str(snap),
            "--control",
            str(control),
            "--leave-paused",
        ],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert saved.returncode == 0, saved.stderr
    vmm.proc.send_signal(signal.SIGTERM)
    vmm.wait()
    assert tap_links(netns) == []

    # the bridge comes from the caller (a snapshot's recorded bridge is not followed on its word)
    refused = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "virtkit", "restore", str(snap)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert refused.returncode == 2 and "name each with --net tap[,bridge=BR]" in refused.stderr, refused.stderr
    restored = Vmm(netns, "restore", str(snap), "--net", f"tap,bridge={BRIDGE}")
    vmms.append(restored)
    # the TAP exists from TUNSETIFF on; it is on the bridge and up a moment later
    end = time.monotonic() + DEADLINE
    while not re.search(
        rf"^\d+: vk-tap\S*: <[^>]*\bUP\b[^>]*>.* master {BRIDGE} ", ip("-n", netns, "-o", "link", "show").stdout, re.M
    ):
        assert time.monotonic() < end and restored.proc.poll() is None, restored.output
        time.sleep(0.1)
    assert len(tap_links(netns)) == 1
    ip("-n", netns, "neigh", "flush", "all")  # the restored guest must answer ARP itself
    p = ping(netns, 3)
    assert p.returncode == 0 and "3 received" in p.stdout, p.stdout + p.stderr + restored.output
    restored.wait_for(rf"^netping: icmp echo request from {SUBNET}\.1 .*: replied", 3)
    assert mac in ip("-n", netns, "neigh", "show", f"{SUBNET}.2").stdout
    restored.proc.send_signal(signal.SIGTERM)
    restored.wait()
    assert tap_links(netns) == []


def test_sigkill_leaks_no_tap(netns: str, netping: Path, vmms: list[Vmm]) -> None:
    vmm = start(vmms, netns, netping, f"ip={SUBNET}.2", f"tap,bridge={BRIDGE}", "tap")
    vmm.wait_for(r"^netping: ready ")
    assert len(tap_links(netns)) == 2
    vmm.kill()
    # non-persistent TAPs: the kernel removes them with the VMM's last fd, no cleanup code needed
    end = time.monotonic() + DEADLINE
    while tap_links(netns) and time.monotonic() < end:
        time.sleep(0.1)
    assert tap_links(netns) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--net", "tap,bridge=no-such-br"], "no bridge of that name"),
        (["--net", "tap,name=lo"], "already exists"),
        (["--net", "vde"], "the only backend is tap"),
        (["--net", "tap,mac=ff:ff:ff:ff:ff:ff"], "multicast"),
        (["--net", "tap", "--mode", "full"], "needs --mode para"),
    ],
)
def test_bad_net_options_fail_in_one_line_and_leave_nothing(
    netns: str, netping: Path, args: list[str], message: str
) -> None:
    argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "virtkit", "run", str(netping)]
    if "--mode" not in args:
        argv += ["--mode", "para"]
    r = subprocess.run(argv + args, capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert tap_links(netns) == []


# --- migrate-receive --net: the TAP is made in the host's namespace, before the receiver leaves it -----


def _key(tmp_path: Path) -> Path:
    from virtkit.migration.keys import generate

    key = tmp_path / "key"
    generate(str(key))
    return key


def _virtkit_in(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "virtkit", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=3 * DEADLINE, check=False)


def _receiver(vmms: list[Vmm], ns: str, tmp_path: Path, key: Path, *args: str) -> tuple[Vmm, Path]:
    port_file = tmp_path / "port"
    recv = Vmm(
        ns,
        "migrate-receive",
        "--mode",
        "para",
        "--listen",
        "127.0.0.1:0",
        "--port-file",
        str(port_file),
        "--key-file",
        str(key),
        "--accept-timeout",
        str(3 * DEADLINE),
        *args,
    )
    vmms.append(recv)
    end = time.monotonic() + DEADLINE
    while not port_file.exists():
        assert time.monotonic() < end and recv.proc.poll() is None, recv.output
        time.sleep(0.05)
    return recv, port_file


def test_migrate_receive_puts_the_card_on_a_tap_made_in_the_host_namespace(
    netns: str, netping: Path, vmms: list[Vmm], tmp_path: Path
) -> None:
    """The receiver (confined: its own network namespace) makes its TAP before it unshares, on the
    bridge its own --net names; the card keeps the MAC the guest knows; ping reaches the migrated
    guest through the receiver's TAP; the TAP goes when the receiver ends."""
    key, control, mac = _key(tmp_path), tmp_path / "ctl.sock", "02:76:6b:00:00:09"
    source = start(
        vmms, netns, netping, f"ip={SUBNET}.2", f"tap,bridge={BRIDGE},mac={mac}", extra=("--control", str(control))
    )
    source.wait_for(r"^netping: ready ")
    assert ping(netns, 1).returncode == 0, source.output
    recv, port_file = _receiver(vmms, netns, tmp_path, key, "--net", f"tap,bridge={BRIDGE},name=vk-tap-rx")
    # made before the receiver left the namespace: visible here, on the bridge, while it waits
    assert "vk-tap-rx" in tap_links(netns) and len(tap_links(netns)) == 2, tap_links(netns)
    assert f"master {BRIDGE}" in ip("-n", netns, "link", "show", "vk-tap-rx").stdout

    moved = _virtkit_in(
        netns, "migrate", "--control", str(control), "--to", f"127.0.0.1:{port_file.read_text().strip()}",
        "--key-file", str(key),
    )  # fmt: skip
    assert moved.returncode == 0, moved.stderr + recv.output
    assert source.wait() == 0, source.output  # the VM lives on the receiver now
    assert tap_links(netns) == ["vk-tap-rx"]  # the source's TAP went with it
    ip("-n", netns, "neigh", "flush", "all")  # the guest must answer ARP through the new TAP
    p = ping(netns, 3)
    assert p.returncode == 0 and "3 received" in p.stdout, p.stdout + p.stderr + recv.output
    recv.wait_for(rf"^netping: icmp echo request from {SUBNET}\.1 .*: replied", 3)
    assert mac in ip("-n", netns, "neigh", "show", f"{SUBNET}.2").stdout

    recv.proc.send_signal(signal.SIGTERM)
    assert recv.wait() == 128 + signal.SIGTERM, recv.output
    assert tap_links(netns) == []


def test_migrate_receive_sigkill_leaks_no_tap(netns: str, vmms: list[Vmm], tmp_path: Path) -> None:
    """SIGKILL to the receiver's foreground process: its confined child dies with it
    (PR_SET_PDEATHSIG), the last fd of the TAP closes, the kernel removes it."""
    recv, _ = _receiver(vmms, netns, tmp_path, _key(tmp_path), "--net", f"tap,bridge={BRIDGE}")
    assert len(tap_links(netns)) == 1
    recv.kill()
    end = time.monotonic() + DEADLINE
    while tap_links(netns) and time.monotonic() < end:
        time.sleep(0.1)
    assert tap_links(netns) == []


def test_migrate_receive_refuses_a_vm_with_another_number_of_cards(
    netns: str, netping: Path, vmms: list[Vmm], tmp_path: Path
) -> None:
    key, control = _key(tmp_path), tmp_path / "ctl.sock"
    source = start(vmms, netns, netping, f"ip={SUBNET}.2", f"tap,bridge={BRIDGE}", extra=("--control", str(control)))
    source.wait_for(r"^netping: ready ")
    recv, port_file = _receiver(vmms, netns, tmp_path, key)  # no --net
    moved = _virtkit_in(
        netns, "migrate", "--control", str(control), "--to", f"127.0.0.1:{port_file.read_text().strip()}",
        "--key-file", str(key),
    )  # fmt: skip
    assert moved.returncode != 0
    assert "network cards: the VM has 1, this receiver was started with 0" in moved.stderr, moved.stderr
    assert "Traceback" not in moved.stderr and source.proc.poll() is None  # the source keeps its VM
    assert ping(netns, 1).returncode == 0, source.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--net", "tap", "--mode", "full"], "needs --mode para"),
        (["--mode", "para", "--net", "tap,bridge=no-such-br"], "no bridge of that name"),
        (["--mode", "para", "--net", "tap,name=lo"], "already exists"),
    ],
)
def test_migrate_receive_bad_net_options_fail_in_one_line_and_leave_nothing(
    netns: str, tmp_path: Path, args: list[str], message: str
) -> None:
    r = _virtkit_in(netns, "migrate-receive", "--key-file", str(_key(tmp_path)), "--listen", "127.0.0.1:0", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert tap_links(netns) == []


# --- clone --net: every clone gets TAPs of its own -------------------------------------------------


def _snapshot_of_netping(netns: str, netping: Path, vmms: list[Vmm], tmp_path: Path, mac: str) -> Path:
    control, snap = tmp_path / "ctl.sock", tmp_path / "snap"
    vmm = start(
        vmms, netns, netping, f"ip={SUBNET}.2", f"tap,bridge={BRIDGE},mac={mac}", extra=("--control", str(control))
    )
    vmm.wait_for(r"^netping: ready ")
    saved = _virtkit_in(netns, "snapshot", str(snap), "--control", str(control), "--leave-paused")
    assert saved.returncode == 0, saved.stderr
    vmm.proc.send_signal(signal.SIGTERM)
    vmm.wait()
    assert tap_links(netns) == []
    return snap


def test_clones_get_taps_of_their_own_and_never_share_a_bridge(
    netns: str, netping: Path, vmms: list[Vmm], tmp_path: Path
) -> None:
    mac = "02:76:6b:00:00:0c"
    snap = _snapshot_of_netping(netns, netping, vmms, tmp_path, mac)
    # the same MAC twice on one bridge: refused before anything is made
    r = _virtkit_in(netns, "clone", str(snap), "-n", "2", "--net", f"tap,bridge={BRIDGE}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"clone-0 and clone-1 would both put card 0 (MAC {mac}) on bridge {BRIDGE}" in r.stderr, r.stderr
    r = _virtkit_in(netns, "clone", str(snap), "-n", "2")
    assert r.returncode == 2 and "once per card (1, the same for every clone)" in r.stderr, r.stderr
    r = _virtkit_in(netns, "clone", str(snap), "-n", "2", "--net", "tap,name=vk-tap-same")
    assert r.returncode == 2 and "would name every clone's TAP the same" in r.stderr, r.stderr
    assert tap_links(netns) == []

    # clone 0 on the bridge, clone 1 on a TAP of its own (once per card per clone)
    logs = tmp_path / "logs"
    clones = Vmm(netns, "clone", str(snap), "-n", "2", "--serial-dir", str(logs),
                 "--net", f"tap,bridge={BRIDGE}", "--net", "tap,name=vk-tap-c1")  # fmt: skip
    vmms.append(clones)
    end = time.monotonic() + DEADLINE
    while len(tap_links(netns)) < 2:
        assert time.monotonic() < end and clones.proc.poll() is None, clones.output
        time.sleep(0.1)
    assert "master" not in ip("-n", netns, "link", "show", "vk-tap-c1").stdout
    ip("-n", netns, "neigh", "flush", "all")
    p = ping(netns, 2)
    assert p.returncode == 0 and "2 received" in p.stdout, p.stdout + p.stderr + clones.output
    assert mac in ip("-n", netns, "neigh", "show", f"{SUBNET}.2").stdout
    assert "icmp echo request" in (logs / "clone-0.log").read_text()
    assert "icmp echo request" not in (logs / "clone-1.log").read_text()
    clones.proc.send_signal(signal.SIGINT)
    assert clones.wait() == 130, clones.output
    assert tap_links(netns) == []
