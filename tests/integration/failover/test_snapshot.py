"""Snapshot, restore and clone on real KVM: the guest continues exactly where it was."""

from __future__ import annotations

import hashlib
import os
import struct
import time
from pathlib import Path

import pytest
from fohelp import assert_seamless, counts, one_line_error, virtkit, wait_for

from virtkit import VM, snapshot
from virtkit.snapshot import format
from virtkit.snapshot.format import SnapshotError
from virtkit.stop import StopReason
from virtkit.vm import DiskSpec

pytestmark = pytest.mark.usefixtures("kvm")


def _run_counter(counter: Path, lines: int = 20, cmdline: str = "us=300") -> VM:
    vm = VM(counter, cmdline=cmdline)
    vm.start()
    wait_for(lambda: len(counts(vm.console.output)) >= lines, what=f"{lines} counter lines")
    return vm


@pytest.fixture
def snap(counter: Path, tmp_path: Path) -> tuple[Path, bytes]:
    """A snapshot of a counter guest, and everything it printed up to the snapshot."""
    vm = _run_counter(counter)
    try:
        snapshot.save(vm, tmp_path / "snap", resume=False)
        return tmp_path / "snap", vm.console.output
    finally:
        vm.close()


def _resume_and_collect(directory: Path, lines: int = 10) -> bytes:
    vm = snapshot.restore(directory)
    try:
        wait_for(lambda: len(counts(vm.console.output)) >= lines, what="output after the restore")
        vm.stop()
        assert vm.wait(5).reason is StopReason.STOPPED
        return vm.console.output
    finally:
        vm.close()


@pytest.mark.usefixtures("no_leaks")
def test_restored_guest_continues_without_a_gap(snap: tuple[Path, bytes]) -> None:
    directory, before = snap
    after = _resume_and_collect(directory)
    assert_seamless(before, after, first=1)


@pytest.mark.usefixtures("no_leaks")
def test_snapshot_of_a_running_vm_lets_it_run_on(counter: Path, tmp_path: Path) -> None:
    vm = _run_counter(counter)
    try:
        info = snapshot.save(vm, tmp_path / "snap")  # pause, save, resume
        at = len(counts(vm.console.output))
        wait_for(lambda: len(counts(vm.console.output)) >= at + 10, what="the original to run on")
        assert info.memory_bytes == vm.config.memory
        assert 0 < info.memory_written < info.memory_bytes  # zero chunks are holes
    finally:
        vm.close()
    assert counts(_resume_and_collect(tmp_path / "snap"))  # and the snapshot is usable


def test_memory_file_is_never_written_by_a_restored_vm(snap: tuple[Path, bytes]) -> None:
    directory, before = snap
    mem = next(directory.glob("memory-*.bin"))
    digest = hashlib.sha256(mem.read_bytes()).digest()
    first = _resume_and_collect(directory)
    second = _resume_and_collect(directory)  # copy-on-write: the same starting point again
    assert hashlib.sha256(mem.read_bytes()).digest() == digest
    n = min(len(first), len(second))
    assert first[:n] == second[:n]
    assert_seamless(before, second, first=1)


def test_resnapshot_into_the_same_directory_of_a_vm_restored_from_it(snap: tuple[Path, bytes]) -> None:
    """The restored VM maps the old memory file; the new snapshot must not write into it."""
    directory, before = snap
    vm = snapshot.restore(directory)
    try:
        wait_for(lambda: len(counts(vm.console.output)) >= 5)
        snapshot.save(vm, directory)
        wait_for(lambda: len(counts(vm.console.output)) >= 15, what="the VM to run on after re-snapshot")
        mid = vm.console.output
    finally:
        vm.close()
    assert_seamless(before, mid, first=1)
    assert len(list(directory.glob("memory-*.bin"))) == 1  # the old one was removed
    assert counts(_resume_and_collect(directory))[0] > counts(before)[-1]


def test_two_vcpus_resume_mid_pingpong(guests: Path, tmp_path: Path) -> None:
    vm = VM(guests / "smp.elf", vcpus=2, cmdline="rounds=1000000")
    vm.start()
    try:
        wait_for(lambda: b"cpu1 online" in vm.console.output, what="the AP to come up")
        snapshot.save(vm, tmp_path / "smp", resume=False)
    finally:
        vm.close()
    vm2 = snapshot.restore(tmp_path / "smp")
    try:
        result = vm2.wait(30)
    finally:
        vm2.close()
    assert result.reason is StopReason.DEBUG_EXIT and result.exit_code == 1, result.detail
    assert b"pingpong rounds=1000000 ok" in result.serial_bytes


def test_clones_each_continue_from_the_snapshot(snap: tuple[Path, bytes], tmp_path: Path) -> None:
    directory, before = snap
    logs = [tmp_path / f"clone{i}.log" for i in range(3)]
    vms = snapshot.clone(directory, 3, serial=[str(p) for p in logs])
    try:
        for vm in vms:
            wait_for(lambda vm=vm: len(counts(vm.console.output)) >= 10, what="every clone to run")
    finally:
        for vm in vms:
            vm.close()
    for log in logs:
        assert_seamless(before, log.read_bytes(), first=1)


# --- refusals: one line, nothing half-restored --------------------------------------------------
def _edit_state(directory: Path, edit: object) -> None:
    path = directory / snapshot.STATE_FILE
    doc = format.unpack(path.read_bytes())
    edit(doc)  # type: ignore[operator]
    path.write_bytes(format.pack(doc))


def _lacking_feature(doc: dict) -> None:  # type: ignore[type-arg]
    """Claim the guest saw every leaf-7 EBX feature: no real CPU has them all."""
    for cpu in doc["vcpus"]:
        for e in cpu["cpuid"]:
            if e[0] == 7 and e[1] == 0:
                e[4] = 0xFFFF_FFFF


@pytest.mark.parametrize(
    "damage,fragment",
    [
        ("truncate-state", "is truncated"),
        ("corrupt-state", "corrupted: checksum mismatch"),
        ("version", "format version 99; this virtkit reads version 1"),
        ("truncate-memory", "is truncated"),
        ("remove-memory", "is missing"),
        ("cpuid", "lacks features the guest saw"),
    ],
)
def test_damaged_snapshots_are_refused(snap: tuple[Path, bytes], damage: str, fragment: str) -> None:
    directory, _ = snap
    state = directory / snapshot.STATE_FILE
    mem = next(directory.glob("memory-*.bin"))
    if damage == "truncate-state":
        state.write_bytes(state.read_bytes()[:-100])
    elif damage == "corrupt-state":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0x01
        state.write_bytes(bytes(data))
    elif damage == "version":
        data = bytearray(state.read_bytes())
        struct.pack_into("<I", data, 8, 99)
        state.write_bytes(bytes(data))
    elif damage == "truncate-memory":
        os.truncate(mem, mem.stat().st_size - 4096)
    elif damage == "remove-memory":
        mem.unlink()
    elif damage == "cpuid":
        _edit_state(directory, _lacking_feature)
    one_line_error(virtkit("restore", str(directory), "--timeout", "5"), fragment)


@pytest.mark.usefixtures("no_leaks")
def test_refused_restore_leaves_nothing_behind(snap: tuple[Path, bytes]) -> None:
    directory, _ = snap
    _edit_state(directory, _lacking_feature)
    with pytest.raises(SnapshotError, match="lacks features"):
        snapshot.restore(directory)


def test_verify_finds_a_corrupted_memory_file(snap: tuple[Path, bytes]) -> None:
    directory, _ = snap
    mem = next(directory.glob("memory-*.bin"))
    with open(mem, "r+b") as f:  # inside the guest image, which is not a hole
        f.seek(0x100000 + 64)
        b = f.read(1)
        f.seek(0x100000 + 64)
        f.write(bytes([b[0] ^ 0xFF]))
    one_line_error(virtkit("restore", str(directory), "--verify"), "checksum mismatch in guest memory at 0x100000")


def test_paravirtual_guest_resumes_mid_disk_io(guests: Path, tmp_path: Path) -> None:
    """A paravirtualized guest saved in the middle of its block hypercalls: the hypercall device's
    state and the disk image (named again by the caller) carry it to a correct end."""
    kernel = guests / "parawork.elf"
    if not kernel.exists():
        pytest.skip(f"{kernel} is not built")
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8 << 20))
    vm = VM(kernel, mode="para", memory="128M", cmdline="work=disk mib=8 req=1 via=hcall", disks=[str(disk)])
    vm.start()
    try:
        wait_for(lambda: b"virtkit hypercalls" in vm.console.output, what="the guest to find virtkit")
        time.sleep(0.1)  # into the disk workload (1.4 s in all here); no assertion depends on when
        snapshot.save(vm, tmp_path / "snap", resume=False)
    finally:
        vm.close()
    vm2 = snapshot.restore(tmp_path / "snap", disks=[DiskSpec(str(disk))])
    try:
        result = vm2.wait(60)
    finally:
        vm2.close()
    assert result.exit_code == 1, result.serial_output
    line = next(x for x in result.serial_output.splitlines() if x.startswith("work=disk"))
    fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
    assert line.endswith(" ok") and fields["wsum"] == fields["rsum"], line
