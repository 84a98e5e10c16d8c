"""Measure the system calls a confined VMM makes, for the allow-list of :mod:`virtkit.jail.policy`.

    python -m virtkit.jail.measure [--guests DIR] [--keep DIR]

Runs the service's VMM (``python -m virtkit.service.vmm --wait --no-seccomp``, every other layer of
the jail on) under ``strace -f`` once per case of :data:`CASES`: every mode the service starts (full,
para), every device a machine of that mode has (UART, PIT/PIC/IOAPIC paths, ATA disk; virtio console,
blk with and without interrupts, rng through its host source), the I/O thread and the irqfd/ioeventfd
paths, two vCPUs, guests that end by exit port, crash, emulation failure, and a stop from outside,
with control-socket traffic (status, stats, console read/write, pause, resume, stop) while the guest
runs. Only the calls made after ``PR_SET_NO_NEW_PRIVS`` count (the filter is installed right after
it). Prints each call with the cases that made it, and what the policy would do with it; exits 1 if
a measured call is one the policy kills the VMM for.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

#: (name, guest, mode, vcpus, command line, disk MiB or 0, drive the control socket)
CASES: tuple[tuple[str, str, str, int, str, int, bool], ...] = (
    ("full-hello", "hello.elf", "full", 1, "", 0, False),
    ("full-counter-control", "counter.elf", "full", 1, "", 0, True),
    ("full-triplefault", "triplefault.elf", "full", 1, "", 0, False),
    ("full-badinsn", "badinsn.elf", "full", 1, "", 0, False),
    ("full-smp", "smp.elf", "full", 2, "rounds=1000", 0, False),
    ("full-hammer", "hammer.elf", "full", 1, "n=2000", 0, False),
    ("full-trapcost-timer", "trapcost.elf", "full", 1, "phases=pio,mmio,timer n=1000 ticks=20", 0, False),
    ("full-hltcli-stop", "hltcli.elf", "full", 1, "", 0, True),
    (
        "full-fullwork-ata-disk",
        "fullwork.elf",
        "full",
        1,
        "work=console,disk,null bytes=4096 sectors=64 n=100",
        1,
        False,
    ),
    ("para-console-virtio", "parawork.elf", "para", 1, "work=console,null,cpu bytes=65536 n=1000 loop=1000", 0, False),
    ("para-console-hcall", "parawork.elf", "para", 1, "work=console,null via=hcall bytes=65536 n=1000", 0, False),
    ("para-disk-virtio", "parawork.elf", "para", 1, "work=disk sectors=64", 1, False),
    ("para-disk-virtio-irq", "parawork.elf", "para", 1, "work=disk sectors=64 irq=1", 1, False),
    ("para-disk-hcall", "parawork.elf", "para", 1, "work=disk via=hcall sectors=64 exit=hcall", 1, False),
    ("para-spin-control", "spin.elf", "para", 1, "cpl=3", 0, True),
)

_CALL = re.compile(r"^(\d+)\s+([a-z_0-9]+)\(")


def _control(path: str, req: dict[str, object]) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk


def _drive(path: str) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    reqs: tuple[dict[str, object], ...] = (
        {"op": "status"},
        {"op": "stats"},
        {"op": "console-read", "offset": 0},
        {"op": "console-write", "data": base64.b64encode(b"x").decode()},
        {"op": "pause"},
        {"op": "stats"},
        {"op": "resume"},
        {"op": "stop"},
    )
    for req in reqs:
        try:
            _control(path, req)
        except OSError:  # the guest ended on its own meanwhile
            return


def run_case(case: tuple[str, str, str, int, str, int, bool], guests: str, work: str) -> set[str]:
    name, guest, mode, vcpus, cmdline, disk_mib, drive = case
    vmdir = os.path.join(work, name)
    os.makedirs(vmdir, exist_ok=True)
    disks = []
    if disk_mib:
        img = os.path.join(vmdir, "disk.img")
        with open(img, "wb") as f:
            f.truncate(disk_mib << 20)
        os.chmod(img, 0o666)  # the VMM opens it before it drops to its uid; this only eases inspection
        disks.append({"path": img})
    sock = os.path.join(vmdir, "c.sock")
    definition = {
        "name": name,
        "instance": "0",
        "kernel": os.path.join(guests, guest),
        "memory": 64 << 20,
        "vcpus": vcpus,
        "mode": mode,
        "cmdline": cmdline,
        "disks": disks,
        "control_socket": sock,
        "jail": {"uid": 299990, "gid": 299990},
    }
    with open(os.path.join(vmdir, "definition.json"), "w") as f:
        json.dump(definition, f)
    trace = os.path.join(vmdir, "strace.txt")
    proc = subprocess.Popen(
        [
            "strace",
            "-f",
            "-qq",
            "-o",
            trace,
            sys.executable,
            "-m",
            "virtkit.service.vmm",
            "--dir",
            vmdir,
            "--wait",
            "--no-seccomp",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        if drive:
            _drive(sock)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode >= 128 + 1 and proc.returncode != 130:
        print(
            f"{name}: the VMM ended with status {proc.returncode}: {err.decode(errors='replace')[-300:]}",
            file=sys.stderr,
        )
    # the first pid of the trace is the launcher (it waits in the foreground); the VMM it forked
    # installs the filter right after PR_SET_NO_NEW_PRIVS, and every thread it makes afterwards
    # inherits it: every other pid's calls from then on count
    calls: set[str] = set()
    launcher = None
    confined = False
    with open(trace) as f:
        for line in f:
            m = _CALL.match(line)
            if m is None:
                continue
            launcher = launcher or m.group(1)
            if not confined:
                confined = "PR_SET_NO_NEW_PRIVS" in line
                continue
            if m.group(1) != launcher:
                calls.add(m.group(2))
    return calls


def main(argv: list[str] | None = None) -> int:
    from virtkit.jail.policy import classify

    p = argparse.ArgumentParser(prog="python -m virtkit.jail.measure", description=__doc__.split("\n\n")[0])
    p.add_argument("--guests", default=os.path.join(os.getcwd(), "build", "guests"))
    p.add_argument("--keep", default=None, help="keep the traces in this directory")
    args = p.parse_args(argv)
    if shutil.which("strace") is None:
        print("measure: error: strace is not installed (apt-get install strace)", file=sys.stderr)
        return 2
    work = args.keep or tempfile.mkdtemp(prefix="vk-measure-")
    seen: dict[str, list[str]] = {}
    try:
        for case in CASES:
            for call in run_case(case, os.path.abspath(args.guests), work):
                seen.setdefault(call, []).append(case[0])
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    bad = 0
    for call in sorted(seen):
        verdict = classify(call)
        bad += verdict == "kill"
        print(f"{call:24} {verdict:12} {', '.join(seen[call])}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
