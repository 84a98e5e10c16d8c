"""Clones of a paravirtualized VM with a writable disk: each writes its own overlay, the base image
and the snapshot's disk copy never change, and each clone has an identity host and guest can read."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
from fohelp import counts, one_line_error, virtkit, wait_for

from virtkit import VM, snapshot
from virtkit.devices.legacy import rtc
from virtkit.snapshot import RestoredVM

pytestmark = pytest.mark.usefixtures("kvm")

SECTORS = 256  # the disk: 128 KiB
WORK = 64  # the guest writes (and reads back) sectors 0..63
MARK = b"base-image-marker-data-" * 22 + b"!!!!!!"  # one 512-byte sector the guest never writes
MASK = (1 << 64) - 1


def pattern(s: int) -> bytes:
    """Sector ``s`` as parawork writes it (docs/GUESTS.md, "Data and checksums")."""
    x, words = ((s + 1) * 0x9E3779B97F4A7C15) & MASK, []
    for _ in range(64):
        x = (x * 6364136223846793005 + 1442695040888963407) & MASK
        words.append(x ^ (x >> 31))
    return struct.pack("<64Q", *words)


WRITTEN = b"".join(pattern(s) for s in range(WORK))


@pytest.fixture
def parawork(guests: Path) -> Path:
    path = guests / "parawork.elf"
    if not path.exists():
        pytest.skip(f"{path} is not built: run `make guests`")
    return path


@pytest.fixture
def snap(parawork: Path, tmp_path: Path) -> tuple[Path, Path, VM]:
    """A snapshot of a parawork VM taken before its first instruction, with a writable disk that
    holds a marker past the workload's sectors. The source VM is returned open and not started."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(512 * WORK) + MARK * (SECTORS - WORK))
    vm = VM(parawork, mode="para", memory="32M", cmdline=f"work=disk sectors={WORK} req=8 via=hcall", disks=[str(disk)])
    vm.open()
    assert vm.machine is not None
    info = snapshot.save_paused(vm.machine, tmp_path / "snap")
    assert [m for _, m in info.disk_copies] in (["reflink"], ["sparse"])
    return tmp_path / "snap", disk, vm


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _finish(vm: RestoredVM) -> None:
    vm.start()
    result = vm.wait(30)
    line = next(x for x in result.serial_output.splitlines() if x.startswith("work=disk"))
    fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
    assert line.endswith(" ok") and fields["wsum"] == fields["rsum"], result.serial_output


def _cmos(vm: RestoredVM, offset: int, n: int) -> bytes:
    """Read CMOS bytes through the RTC's port interface, as the guest's out 0x70 / in 0x71 does."""
    assert vm.machine is not None
    dev = vm.machine.rtc
    out = bytearray()
    for i in range(n):
        dev.pio_write(0, 1, offset + i)
        out.append(dev.pio_read(1, 1))
    return bytes(out)


def test_clones_write_only_their_own_overlay(snap: tuple[Path, Path, VM], tmp_path: Path) -> None:
    directory, disk, source = snap
    base_before = _digest(disk)
    (copy,) = directory.glob("disk0-*.img")
    copy_before = _digest(copy)
    # the source VM keeps running after the snapshot and writes the original image
    try:
        _finish(source)  # type: ignore[arg-type]
    finally:
        source.close()
    assert disk.read_bytes()[: len(WRITTEN)] == WRITTEN and _digest(disk) != base_before
    source_after = _digest(disk)

    vms = snapshot.clone(directory, 2, start=False, workdir=tmp_path / "clones")
    try:
        a, b = vms
        assert a.identity is not None and b.identity is not None
        oa, ob = (Path(v.identity.disks[0].path) for v in (a, b))  # type: ignore[union-attr]
        assert oa.parent == tmp_path / "clones" / "clone-0" and ob.parent == tmp_path / "clones" / "clone-1"
        assert {a.identity.disks[0].method, b.identity.disks[0].method} <= {"reflink", "sparse"}
        # the overlays start from the snapshot's copy, not from what the source wrote since
        assert _digest(oa) == _digest(ob) == copy_before
        _finish(a)
        assert oa.read_bytes() == WRITTEN + MARK * (SECTORS - WORK)
        assert _digest(ob) == copy_before, "clone 0's writes reached clone 1's overlay"
        _finish(b)
        assert ob.read_bytes() == oa.read_bytes()
    finally:
        for vm in vms:
            vm.close()
    assert _digest(copy) == copy_before and _digest(disk) == source_after


def test_clones_have_distinct_identities(snap: tuple[Path, Path, VM]) -> None:
    directory, _, source = snap
    source.close()
    vms = snapshot.clone(directory, 3, start=False)
    try:
        ids = [vm.identity for vm in vms]
        assert [i.name for i in ids if i] == ["clone-0", "clone-1", "clone-2"]
        assert len({i.id for i in ids if i}) == 3 and all(i and len(i.id) == 16 and any(i.id) for i in ids)
        for n, vm in enumerate(vms):
            assert vm.identity is not None
            assert _cmos(vm, snapshot.CMOS_CLONE_ID, 16) == vm.identity.id
            assert int.from_bytes(_cmos(vm, snapshot.CMOS_CLONE_INDEX, 2), "little") == n + 1
            # the RTC's own registers are untouched by the identity
            assert _cmos(vm, rtc.REG_D, 1) == bytes([rtc.REG_D_VRT])
    finally:
        for vm in vms:
            vm.close()


def test_a_running_clone_reads_its_own_number(counter: Path, tmp_path: Path) -> None:
    """The guest side of the identity: the counter guest reads CMOS 0x50 every 64 lines."""
    with VM(counter, cmdline="us=200") as source:
        source.start()
        wait_for(lambda: len(counts(source.console.output)) > 10, what="the counter to run")
        snapshot.save(source, tmp_path / "snap")
    vms = snapshot.clone(tmp_path / "snap", 2)
    try:
        for n, vm in enumerate(vms, start=1):
            wait_for(
                lambda vm=vm, n=n: f"counter: clone {n}".encode() in vm.console.output,
                what=f"clone {n} to print its number",
            )
    finally:
        for vm in vms:
            vm.close()
    assert b"counter: clone" not in source.console.output  # the original never was a clone


def test_clone_cli_reports_identities_and_refuses_a_resized_base(snap: tuple[Path, Path, VM], tmp_path: Path) -> None:
    directory, _, source = snap
    source.close()
    p = virtkit("clone", str(directory), "-n", "2", "--workdir", str(tmp_path / "w"), "--timeout", "20", "--json")
    out = json.loads(p.stdout)
    assert out["exit_codes"] == [1, 1], (p.stdout, p.stderr)  # exit value 0 through port 0xF4: (0 << 1) | 1
    assert [c["name"] for c in out["clones"]] == ["clone-0", "clone-1"]
    assert out["clones"][0]["id"] != out["clones"][1]["id"]
    for c in out["clones"]:
        (d,) = c["disks"]
        assert d["method"] in ("reflink", "sparse") and Path(d["path"]).read_bytes()[: len(WRITTEN)] == WRITTEN

    (copy,) = directory.glob("disk0-*.img")
    os.chmod(copy, 0o600)
    os.truncate(copy, 512 * (SECTORS + 1))
    one_line_error(
        virtkit("clone", str(directory), "-n", "2", "--workdir", str(tmp_path / "w2")),
        f"is {512 * (SECTORS + 1)} bytes, it was {512 * SECTORS} at the snapshot",
    )
    assert not (tmp_path / "w2").exists() or not any((tmp_path / "w2").iterdir())
