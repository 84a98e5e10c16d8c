"""What a machine is, as the two ends of a migration compare it.

The target builds its machine from its own command line (as ``qemu -incoming`` does) before it
accepts a connection; the source describes its machine (:func:`describe`), and the target checks
the description against its own (:func:`compare`), refusing with the first field that differs.
The description never names a file: which disk image backs disk 0 is the target's business, only
their number, sizes and read-only flags must agree.
"""

from __future__ import annotations

from virtkit.migration.protocol import DiskShape, MachineShape
from virtkit.snapshot import cpucompat
from virtkit.units import format_size
from virtkit.vm import Machine


def describe(machine: Machine) -> MachineShape:
    c = machine.config
    return MachineShape(
        memory=c.memory,
        vcpus=c.vcpus,
        mode="para" if c.paravirt else "full",
        strict=c.strict,
        disks=tuple(DiskShape(read_only=d.read_only, size=d.size) for d in machine.disks),
        regions=tuple((r.gpa, r.size) for r in machine.memory.regions),
        devices=tuple(sorted(machine.devices)),
        # what the guest saw (KVM_GET_CPUID2), on the target what a guest booted here would see;
        # read while no vCPU ran: the source's vCPUs run now, and a vCPU ioctl would wait for
        # KVM_RUN to return (never, for a guest halted with nothing to wake it)
        cpuid=tuple(machine.cpuid),
    )


def _network_cards(devices: tuple[str, ...]) -> int:
    """virtio-net cards among a machine's persistent devices (named virtio-net, virtio-net1...:
    Machine._create_virtio_devices)."""
    import re

    return sum(1 for d in devices if re.fullmatch(r"virtio-net[0-9]*", d))


def _disks(n: int) -> str:
    return f"{n} disk{'s' if n != 1 else ''}"


def compare(here: MachineShape, vm: MachineShape) -> str | None:
    """None if the VM described by ``vm`` can run in the machine ``here``; else the first field
    that differs, named, with both values, in one line."""
    if vm.memory != here.memory:
        return (
            f"memory: the VM has {format_size(vm.memory)} of RAM, this receiver was started with "
            f"--memory {format_size(here.memory)}"
        )
    if vm.vcpus != here.vcpus:
        return f"vcpus: the VM has {vm.vcpus} vCPUs, this receiver was started with --vcpus {here.vcpus}"
    if vm.mode != here.mode:
        return f"mode: the VM runs in --mode {vm.mode}, this receiver was started with --mode {here.mode}"
    if vm.strict != here.strict:
        return (
            f"strict: the VM runs {'with' if vm.strict else 'without'} --strict, this receiver "
            f"{'with' if here.strict else 'without'}"
        )
    if len(vm.disks) != len(here.disks):
        return (
            f"disks: the VM has {_disks(len(vm.disks))}, this receiver was started with "
            f"{_disks(len(here.disks))} (--disk)"
        )
    for i, (theirs, mine) in enumerate(zip(vm.disks, here.disks, strict=True)):
        if theirs.read_only != mine.read_only:
            return (
                f"disks[{i}].read_only: the VM's disk {i} is {'read-only' if theirs.read_only else 'writable'}, "
                f"this receiver's is {'read-only' if mine.read_only else 'writable'} (--disk IMG[,ro])"
            )
        if theirs.size != mine.size:
            return f"disks[{i}].size: the VM's disk {i} is {theirs.size} bytes, this receiver's is {mine.size} bytes"
    if vm.regions != here.regions:
        return f"regions: the VM's memory layout {list(vm.regions)} differs from this receiver's {list(here.regions)}"
    theirs_cards, my_cards = _network_cards(vm.devices), _network_cards(here.devices)
    if theirs_cards != my_cards:
        return (
            f"network cards: the VM has {theirs_cards}, this receiver was started with {my_cards} "
            "(--net tap[,bridge=BR], once per card, in order)"
        )
    if vm.devices != here.devices:
        return f"devices: the VM has {', '.join(vm.devices)}; this receiver has {', '.join(here.devices)}"
    reason = cpucompat.check_compatible(list(vm.cpuid), list(here.cpuid))
    if reason is not None:
        return f"cpuid: {reason}"
    return None
