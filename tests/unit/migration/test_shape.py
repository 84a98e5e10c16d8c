"""What the target compares: the source's description against its own machine, field by field,
refusing with the first difference, named."""

from __future__ import annotations

import dataclasses

import pytest
from mighelp import CPUID, SHAPE

from virtkit.migration.protocol import DiskShape
from virtkit.migration.shape import compare


def test_the_same_shape_fits() -> None:
    assert compare(SHAPE, SHAPE) is None


@pytest.mark.parametrize(
    "change,field",
    [
        ({"memory": 4 << 20}, "memory: the VM has 4 MiB of RAM, this receiver was started with --memory 2 MiB"),
        ({"vcpus": 4}, "vcpus: the VM has 4 vCPUs, this receiver was started with --vcpus 1"),
        ({"mode": "para"}, "mode: the VM runs in --mode para, this receiver was started with --mode full"),
        ({"strict": True}, "strict: the VM runs with --strict, this receiver without"),
        ({"disks": ()}, "disks: the VM has 0 disks, this receiver was started with 1 disk (--disk)"),
        ({"disks": (DiskShape(False, 1 << 20),) * 2}, "disks: the VM has 2 disks"),
        (
            {"disks": (DiskShape(True, 1 << 20),)},
            "disks[0].read_only: the VM's disk 0 is read-only, this receiver's is writable",
        ),
        (
            {"disks": (DiskShape(False, 2 << 20),)},
            "disks[0].size: the VM's disk 0 is 2097152 bytes, this receiver's is 1048576 bytes",
        ),
        ({"regions": ((0, 1 << 20), (1 << 20, 1 << 20))}, "regions: the VM's memory layout"),
        ({"devices": ("ata0", "i8042", "post", "rtc", "uart0")}, "devices: the VM has ata0, i8042"),
        (
            {"devices": (*SHAPE.devices, "virtio-net")},
            "network cards: the VM has 1, this receiver was started with 0 (--net tap[,bridge=BR]",
        ),
        ({"cpuid": (CPUID[0], (1, 0, 0, 0x800F12, 0, 0x1 | 1 << 28, 0x1))}, "cpuid: "),
    ],
)
def test_each_difference_is_refused_naming_the_field(change: dict[str, object], field: str) -> None:
    reason = compare(SHAPE, dataclasses.replace(SHAPE, **change))  # type: ignore[arg-type]
    assert reason is not None and reason.startswith(field.split(":")[0] + ":"), reason
    assert field in reason, reason
    assert "\n" not in reason


def test_a_vm_that_saw_fewer_cpu_features_fits() -> None:
    fewer = (CPUID[0], (1, 0, 0, 0x800F12, 0, 0, 0x1))
    assert compare(SHAPE, dataclasses.replace(SHAPE, cpuid=fewer)) is None
