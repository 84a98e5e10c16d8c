"""Snapshot, restore and clone of virtual machines.

    from virtkit import VM
    from virtkit import snapshot

    with VM(kernel="build/guests/counter.elf") as vm:
        vm.start()
        info = snapshot.save(vm, "snap/")          # pause, save, resume
    with snapshot.restore("snap/") as vm2:         # resumes where the guest was
        result = vm2.wait(timeout=1)

Layers, imports pointing down: ``format`` (the state file container) and ``cpucompat`` (CPUID
checks) are pure; ``memfile`` writes and checks guest RAM files; ``vmstate`` reads and writes
KVM and device state in the kernel's order; ``snapshot`` puts them together on disk. See
docs/FAILOVER.md.

May import: the machine (``virtkit.vm``, ``virtkit.api``) and everything below it.
"""

from __future__ import annotations

from virtkit.snapshot.format import FORMAT_VERSION, SnapshotError
from virtkit.snapshot.snapshot import (
    CMOS_CLONE_ID,
    CMOS_CLONE_INDEX,
    STATE_FILE,
    CloneIdentity,
    LoadedSnapshot,
    RestoredVM,
    SnapshotInfo,
    clone,
    describe,
    load,
    restore,
    save,
    save_paused,
)

__all__ = [
    "CMOS_CLONE_ID",
    "CMOS_CLONE_INDEX",
    "FORMAT_VERSION",
    "STATE_FILE",
    "CloneIdentity",
    "LoadedSnapshot",
    "RestoredVM",
    "SnapshotError",
    "SnapshotInfo",
    "clone",
    "describe",
    "load",
    "restore",
    "save",
    "save_paused",
]
