"""Capture and apply everything KVM and the devices hold for one machine (guest memory aside).

The result of :func:`capture` is a JSON-able dict (see :mod:`virtkit.snapshot.format`): KVM
structures as their raw uapi bytes, MSRs as index/value pairs, device state as each device's
``save()`` returned it. :func:`apply` writes such a dict into a freshly built machine whose vCPUs
have never run, in the order the kernel needs (comments at each step). It validates the whole
document before the first ioctl, so a malformed one changes nothing.

Both run with every vCPU parked outside KVM_RUN (:meth:`Machine.pause`, or not started yet):
KVM_GET/SET_VCPU_EVENTS and the LAPIC ioctls are unsafe while other vCPUs run, and a vCPU ioctl
waits for KVM_RUN to return anyway.
"""

from __future__ import annotations

import ctypes as C
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from virtkit import records
from virtkit.devices.contract import QueueReplay
from virtkit.errors import DeviceError, KvmError
from virtkit.kvm import constants as K
from virtkit.kvm import structs as S
from virtkit.kvm.ioctl import Kvm, VcpuFd, VmFd
from virtkit.snapshot.cpucompat import CpuidEntry
from virtkit.snapshot.format import Fields, SnapshotError
from virtkit.vm import Machine

T = TypeVar("T", bound=C.Structure)

#: KVM_GET_IRQCHIP chip ids (arch/x86/include/uapi/asm/kvm.h)
KVM_IRQCHIP_PIC_MASTER: Final = 0
KVM_IRQCHIP_PIC_SLAVE: Final = 1
KVM_IRQCHIP_IOAPIC: Final = 2
IRQCHIPS: Final = (
    ("pic_master", KVM_IRQCHIP_PIC_MASTER),
    ("pic_slave", KVM_IRQCHIP_PIC_SLAVE),
    ("ioapic", KVM_IRQCHIP_IOAPIC),
)

#: raw-bytes KVM structures of one vCPU, with the type each must decode to
VCPU_STRUCTS: Final[dict[str, type[C.Structure]]] = {
    "regs": S.kvm_regs,
    "sregs": S.kvm_sregs,
    "fpu": S.kvm_fpu,
    "xsave": S.kvm_xsave,
    "xcrs": S.kvm_xcrs,
    "lapic": S.kvm_lapic_state,
    "events": S.kvm_vcpu_events,
    "debugregs": S.kvm_debugregs,
}

_msr_index_cache: list[int] | None = None


def _raw(s: C.Structure) -> bytes:
    return bytes(memoryview(s).cast("B"))


def _from_raw(t: type[T], data: bytes) -> T:
    return t.from_buffer_copy(data)


def msr_index_list(kvm: Kvm) -> list[int]:
    """KVM_GET_MSR_INDEX_LIST, once per process (it does not change while KVM is loaded)."""
    global _msr_index_cache
    if _msr_index_cache is None:
        _msr_index_cache = kvm.msr_index_list()
    return list(_msr_index_cache)


def get_cpuid(fd: VcpuFd) -> list[CpuidEntry]:
    """The CPUID the vCPU was given (KVM_GET_CPUID2): what the guest saw, even for a machine
    that was itself restored with a CPUID older than this host's."""
    return [
        (int(x.function), int(x.index), int(x.flags), int(x.eax), int(x.ebx), int(x.ecx), int(x.edx))
        for x in fd.get_cpuid2()
    ]


def cpuid_structs(entries: list[CpuidEntry]) -> list[S.kvm_cpuid_entry2]:
    out = []
    for function, index, flags, eax, ebx, ecx, edx in entries:
        e = S.kvm_cpuid_entry2()
        e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx = function, index, flags, eax, ebx, ecx, edx
        out.append(e)
    return out


def readable_msrs(fd: VcpuFd, indices: list[int]) -> dict[int, int]:
    """Values of every MSR in ``indices`` that this vCPU lets us read. KVM_GET_MSRS stops at the
    first MSR it refuses and returns how many it did; skip that one and go on."""
    values: dict[int, int] = {}
    rest = list(indices)
    while rest:
        got = fd.get_msrs(rest)
        values.update(got)
        rest = rest[len(got) + 1 :]
    return values


# --- capture -----------------------------------------------------------------------------------
def capture_vcpu(fd: VcpuFd, msr_indices: list[int]) -> dict[str, Any]:
    # Save order (the reverse concerns of restore): KVM_GET_MP_STATE first, because it runs
    # kvm_apic_accept_events(), which can change LAPIC and vCPU state the later GETs read;
    # KVM_GET_VCPU_EVENTS last, since the other GETs may still move pending events around.
    mp_state = fd.get_mp_state()
    state: dict[str, Any] = {"id": fd.vcpu_id, "mp_state": mp_state}
    state["regs"] = _raw(fd.get_regs())
    state["sregs"] = _raw(fd.get_sregs())
    state["fpu"] = _raw(fd.get_fpu())
    state["xsave"] = _raw(fd.get_xsave())
    state["xcrs"] = _raw(fd.get_xcrs())
    state["debugregs"] = _raw(fd.get_debugregs())
    state["lapic"] = _raw(fd.get_lapic())
    state["cpuid"] = [list(e) for e in get_cpuid(fd)]
    state["msrs"] = [[i, v] for i, v in readable_msrs(fd, msr_indices).items()]
    try:
        state["tsc_khz"] = fd.get_tsc_khz()
    except KvmError:
        state["tsc_khz"] = 0
    state["events"] = _raw(fd.get_vcpu_events())
    return state


def capture_vm(vm: VmFd) -> dict[str, Any]:
    state: dict[str, Any] = {name: _raw(vm.get_irqchip(chip)) for name, chip in IRQCHIPS}
    state["pit2"] = _raw(vm.get_pit2())
    state["clock"] = _raw(vm.get_clock())
    return state


def capture_devices(machine: Machine) -> dict[str, Any]:
    return {name: records.to_json(dev.save()) for name, dev in machine.devices.items()}


def capture(machine: Machine) -> dict[str, Any]:
    """Machine-level, per-vCPU and device state. Every vCPU must be parked or not yet started."""
    if machine.stopping:
        raise SnapshotError("the VM has stopped: there is no running state left to snapshot")
    indices = msr_index_list(machine.kvm)
    return {
        "vm": capture_vm(machine.vm),
        "vcpus": [capture_vcpu(v.fd, indices) for v in machine.vcpus],
        "devices": capture_devices(machine),
    }


# --- validation: the whole document is checked before the first SET ioctl --------------------
@dataclass(frozen=True, slots=True)
class VcpuImage:
    """One vCPU's state, every KVM structure decoded to its own type (sizes were checked)."""

    id: int
    mp_state: int
    regs: S.kvm_regs
    sregs: S.kvm_sregs
    fpu: S.kvm_fpu
    xsave: S.kvm_xsave
    xcrs: S.kvm_xcrs
    lapic: S.kvm_lapic_state
    events: S.kvm_vcpu_events
    debugregs: S.kvm_debugregs
    cpuid: list[CpuidEntry]
    msrs: dict[int, int]
    tsc_khz: int


@dataclass
class MachineImage:
    irqchips: list[S.kvm_irqchip]
    pit2: S.kvm_pit_state2
    clock: S.kvm_clock_data
    vcpus: list[VcpuImage]
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)


def _u32(x: object, what: str) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x <= 0xFFFF_FFFF:
        raise SnapshotError(f"snapshot field {what} is not a 32-bit value")
    return x


def parse(doc: Fields) -> MachineImage:
    vm = doc.obj("vm")
    chips = []
    for name, chip_id in IRQCHIPS:
        chip = _from_raw(S.kvm_irqchip, vm.blob(name, C.sizeof(S.kvm_irqchip)))
        if chip.chip_id != chip_id:
            raise SnapshotError(f"snapshot field vm.{name} holds irqchip {chip.chip_id}, expected {chip_id}")
        chips.append(chip)
    pit2 = _from_raw(S.kvm_pit_state2, vm.blob("pit2", C.sizeof(S.kvm_pit_state2)))
    clock = _from_raw(S.kvm_clock_data, vm.blob("clock", C.sizeof(S.kvm_clock_data)))
    vcpus = []
    for i, raw in enumerate(doc.array("vcpus")):
        v = Fields(raw, f"vcpus[{i}]")
        if v.integer("id") != i:
            raise SnapshotError(f"snapshot field vcpus[{i}].id is {v.integer('id')}, expected {i}")

        def struct(name: str, t: type[T], v: Fields = v) -> T:
            return _from_raw(t, v.blob(name, C.sizeof(t)))

        cpuid: list[CpuidEntry] = []
        for j, e in enumerate(v.array("cpuid")):
            if not isinstance(e, list) or len(e) != 7:
                raise SnapshotError(f"snapshot field vcpus[{i}].cpuid[{j}] is not a CPUID entry")
            f, idx, fl, a, b, c, d = (_u32(x, f"vcpus[{i}].cpuid[{j}]") for x in e)
            cpuid.append((f, idx, fl, a, b, c, d))
        msrs: dict[int, int] = {}
        for j, e in enumerate(v.array("msrs")):
            if not (
                isinstance(e, list)
                and len(e) == 2
                and all(isinstance(x, int) for x in e)
                and 0 <= e[0] <= 0xFFFF_FFFF
                and 0 <= e[1] < 1 << 64
            ):
                raise SnapshotError(f"snapshot field vcpus[{i}].msrs[{j}] is not an MSR index/value pair")
            msrs[e[0]] = e[1]
        mp_state = v.integer("mp_state")
        if mp_state not in set(K.MpState):
            raise SnapshotError(f"snapshot field vcpus[{i}].mp_state {mp_state} is not an MP state")
        vcpus.append(
            VcpuImage(
                i,
                mp_state,
                regs=struct("regs", S.kvm_regs),
                sregs=struct("sregs", S.kvm_sregs),
                fpu=struct("fpu", S.kvm_fpu),
                xsave=struct("xsave", S.kvm_xsave),
                xcrs=struct("xcrs", S.kvm_xcrs),
                lapic=struct("lapic", S.kvm_lapic_state),
                events=struct("events", S.kvm_vcpu_events),
                debugregs=struct("debugregs", S.kvm_debugregs),
                cpuid=cpuid,
                msrs=msrs,
                tsc_khz=v.integer("tsc_khz"),
            )
        )
    devices_obj = doc.obj("devices")
    devices = {name: devices_obj.obj(name).mapping() for name in devices_obj.mapping()}
    return MachineImage(chips, pit2, clock, vcpus, devices)


# --- apply -------------------------------------------------------------------------------------
def _set_msrs(fd: VcpuFd, msrs: dict[int, int]) -> None:
    """KVM_SET_MSRS stops at the first MSR it refuses. A refusal is harmless only if the fresh
    vCPU already holds the saved value; otherwise the guest would resume with a wrong MSR, so the
    restore fails, naming it."""
    items = list(msrs.items())
    while items:
        n = fd.set_msrs(dict(items))
        if n >= len(items):
            return
        index, value = items[n]
        current = fd.get_msrs([index]).get(index)
        if current != value:
            raise SnapshotError(
                f"KVM on this host refuses to set MSR {index:#x} to {value:#x} "
                f"(it holds {current if current is None else hex(current)}): the guest "
                "cannot resume here"
            )
        items = items[n + 1 :]


def apply_vcpu(fd: VcpuFd, img: VcpuImage, *, has_xsave: bool) -> None:
    # Restore order, each for a reason the kernel imposes:
    # 1. CPUID first: KVM checks later writes (XCR0 against CPUID.0xD, MSRs against the feature
    #    bits, the LAPIC's x2APIC mode) against it.
    fd.set_cpuid2(cpuid_structs(img.cpuid))
    # 2. SREGS before REGS: SREGS sets the mode (CR0/CR4/EFER) and the APIC base MSR; REGS then
    #    lands in that mode. SREGS also carries a pending external interrupt (interrupt_bitmap).
    fd.set_sregs(img.sregs)
    # 3. REGS: note that KVM_SET_REGS clears any pending exception, so it must precede
    #    KVM_SET_VCPU_EVENTS (step 9), which restores it.
    fd.set_regs(img.regs)
    # 4. FPU state: XSAVE holds the legacy FXSAVE area too, so FPU is only for hosts without it.
    if has_xsave:
        fd.set_xsave(img.xsave)
        # 5. XCRs after XSAVE and CPUID (XCR0 must be allowed by CPUID.0xD).
        fd.set_xcrs(img.xcrs)
    else:
        fd.set_fpu(img.fpu)
    fd.set_debugregs(img.debugregs)
    # 6. LAPIC after SREGS (which restored IA32_APIC_BASE: the LAPIC's enable/x2APIC mode) and
    #    before MSRs (the TSC-deadline MSR only takes when the LAPIC timer is configured).
    fd.set_lapic(img.lapic)
    # 7. MSRs, including IA32_TSC (the guest's TSC continues from where it was: a pause).
    _set_msrs(fd, img.msrs)
    # 8. MP state after the LAPIC: a restored LAPIC may hold a pending INIT; MP state says what
    #    the vCPU was doing (running, halted, waiting for SIPI).
    fd.set_mp_state(img.mp_state)
    # 9. Events last: pending exception/interrupt/NMI and the interrupt shadow, which the steps
    #    above may have cleared (KVM_SET_REGS) or queued (KVM_SET_SREGS).
    fd.set_vcpu_events(img.events)


def apply(machine: Machine, img: MachineImage) -> None:
    """Write ``img`` into ``machine``, which was just built and has never run."""
    if len(img.vcpus) != len(machine.vcpus):
        raise SnapshotError(f"snapshot has {len(img.vcpus)} vCPUs, the machine {len(machine.vcpus)}")
    if set(img.devices) != set(machine.devices):
        missing = sorted(set(img.devices) - set(machine.devices))
        extra = sorted(set(machine.devices) - set(img.devices))
        raise SnapshotError(
            f"snapshot devices do not match this virtkit's machine (not here: {missing}; not in the snapshot: {extra})"
        )
    # Every device's record is parsed (types and bounds, records.parse) before any is restored.
    parsed: dict[str, object] = {}
    for name, dev in machine.devices.items():
        try:
            parsed[name] = records.parse(dev.state_type(), img.devices[name], what=f"devices.{name}")
        except records.UntrustedInput as e:
            raise SnapshotError(f"snapshot state of device {name} is invalid: {e}") from None
    # Devices first: restoring one may drive its interrupt line (the UART re-asserts its IRQ
    # level), which would leave an edge in the PIC; the irqchip restore below then overwrites
    # the PIC and IOAPIC with exactly the saved pin state.
    for name, dev in machine.devices.items():
        try:
            dev.restore(parsed[name])
        except DeviceError as e:
            raise SnapshotError(f"snapshot state of device {name} does not fit this machine: {e}") from None
    vm = machine.vm
    # VM-wide in-kernel devices before the vCPUs: the IOAPIC/PIC routes and pin levels must be in
    # place when the LAPICs are restored (an IRR bit there may correspond to a level-triggered
    # pin); the PIT after the PIC it ticks into.
    for chip in img.irqchips:
        vm.set_irqchip(chip)
    vm.set_pit2(img.pit2)
    has_xsave = bool(machine.kvm.check_extension(K.Cap.XSAVE))
    for v, vimg in zip(machine.vcpus, img.vcpus, strict=True):
        apply_vcpu(v.fd, vimg, has_xsave=has_xsave)
    machine.note_cpuid()  # the CPUID is the saved one now (a migration source describes it)
    # kvmclock last, closest to the moment the vCPUs run. Flags cleared: KVM_CLOCK_REALTIME would
    # make KVM advance the clock by the wall time since the snapshot; virtkit resumes a guest as
    # after a pause, consistent with the TSC restored in step 7 (docs/FAILOVER.md, "Time").
    clock = S.kvm_clock_data.from_buffer_copy(img.clock)
    clock.flags = 0
    clock.realtime = clock.host_tsc = 0
    vm.set_clock(clock)
    replay_queue_notifications(machine)


def replay_queue_notifications(machine: Machine) -> None:
    """Notify every queue of every device that declares it has queues (QueueReplay), now that
    the irqchip holds its state.

    A driver's notification is an ioeventfd signal; if it came just before the pause, the I/O
    thread may have consumed it without serving the queue (the pause keeps handlers from running).
    The eventfd does not survive into the new machine, so the request would wait forever (seen:
    virtio-blk "the device did not write a status byte"). A notification with nothing new is
    harmless: the device serves what is available and stops (virtio 1.2 §2.7.13 lets a device look
    at the available ring at any time)."""
    for dev in machine.devices.values():
        if isinstance(dev, QueueReplay):
            dev.replay_notifications()
