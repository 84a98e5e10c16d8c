"""The device manager: the one place that wires devices into a machine.

It owns
* the two buses (:class:`IoBus`, :class:`MmioBus`) and every registration on them;
* the device windows of the address map (:mod:`virtkit.arch.layout`): virtio-mmio slots are
  handed out here, each with its own interrupt line (GSI), never chosen by a device;
* the kernel command-line fragments the devices need (``virtio_mmio.device=...``);
* the map of persistent devices, by stable name, that snapshot and live migration walk;
* how each virtio device is wired: queue notifications by ioeventfd or by MMIO exit, interrupts
  by irqfd or by KVM_IRQ_LINE, whichever the host offers (``virtio_paths`` says which);
* the teardown of what it wired, in reverse order.

A new device is added through :meth:`add_port_device`, :meth:`add_mmio_device` or
:meth:`add_virtio`; the platform tables a Linux guest reads (ACPI, MP table) are generated from
the same inventory (:meth:`platform_tables`): a device registered with a ``guest_info``
description, and every virtio-mmio device, appears in the DSDT.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from virtkit.arch import acpi, layout, mptable
from virtkit.devices.bus import IoBus, MmioBus
from virtkit.devices.contract import MmioDevice, Persistent, PioDevice
from virtkit.errors import DeviceError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtkit.devices.virtio import VirtioDevice, VirtioMmioTransport
    from virtkit.kvm.ioctl import VmFd
    from virtkit.memory import GuestMemory

#: how a device drives its interrupt line: a function of the level (0 or 1)
IrqSetter = Callable[[int], None]


def virtio_kernel_cmdline_arg(base: int, irq: int, size: int = layout.VIRTIO_MMIO_SIZE) -> str:
    """The Linux command line parameter that declares one virtio-mmio device
    (drivers/virtio/virtio_mmio.c: ``virtio_mmio.device=<size>@<base>:<irq>``)."""
    return f"virtio_mmio.device={size // 1024}K@{base:#x}:{irq}"


def virtio_mmio_slot(index: int) -> tuple[int, int]:
    """(base GPA, GSI) of virtio-mmio slot ``index`` in the address map."""
    if not 0 <= index < layout.VIRTIO_MMIO_MAX_DEVICES:
        raise DeviceError(
            f"virtio-mmio slot {index} does not exist: a machine has "
            f"{layout.VIRTIO_MMIO_MAX_DEVICES} (0..{layout.VIRTIO_MMIO_MAX_DEVICES - 1})"
        )
    return layout.VIRTIO_MMIO_BASE + index * layout.VIRTIO_MMIO_SIZE, layout.VIRTIO_GSIS[index]


class DeviceManager:
    """The devices of one machine. ``irq_line(gsi)`` gives a setter for an interrupt line (a
    no-op without an in-kernel irqchip)."""

    def __init__(self, *, strict: bool, irq_line: Callable[[int], IrqSetter]) -> None:
        self.io_bus = IoBus(strict=strict)
        self.mmio_bus = MmioBus(strict=strict)
        self.irq_line = irq_line
        #: devices with state, by stable name (what snapshot and migration walk)
        self.persistent: dict[str, Persistent] = {}
        #: appended to the guest's command line, in the order devices were added
        self.cmdline: list[str] = []
        #: how virtio notifications and interrupts travel on this host (for --stats and benches)
        self.virtio_paths: dict[str, str] = {}
        self._next_virtio_slot = 0
        self._closers: list[Callable[[], None]] = []
        self._vm: VmFd | None = None
        self._new_eventfd: Callable[[Callable[[], None]], int] | None = None
        self._use_ioeventfd = self._use_irqfd = False
        #: the devices a guest's firmware tables describe, in the order they were added
        self.guest_devices: list[acpi.DeviceInfo] = []
        #: the power registers the FADT points at, once a device offers them
        self.power_registers: acpi.PowerRegisters | None = None

    # --- adding devices --------------------------------------------------------------------------
    def _persist(self, name: str | None, device: object) -> None:
        if name is None:
            return
        if not isinstance(device, Persistent):
            raise DeviceError(f"{name}: {type(device).__name__} has no state to persist")
        if name in self.persistent:
            raise DeviceError(f"two devices are named {name!r}")
        self.persistent[name] = device

    def add_port_device(
        self,
        name: str,
        base: int,
        length: int,
        device: PioDevice,
        *,
        offset: int = 0,
        state_name: str | None = None,
        guest_info: acpi.DeviceInfo | None = None,
    ) -> None:
        """Ports ``base``..``base+length-1`` to ``device`` (see :meth:`IoBus.register`);
        ``state_name``: the name its state is saved under, if it has any; ``guest_info``: how the
        ACPI tables describe it to the guest (a device spread over several registrations gives it
        once)."""
        self.io_bus.register(base, length, device, name, offset=offset)
        self._persist(state_name, device)
        if guest_info is not None:
            self.guest_devices.append(guest_info)

    def add_power_registers(
        self, name: str, base: int, length: int, device: PioDevice, registers: acpi.PowerRegisters
    ) -> None:
        """Ports ``base``..``base+length-1`` to ``device``, the machine's ACPI power registers:
        the FADT points its RESET_REG and sleep registers at them (one such device a machine)."""
        if self.power_registers is not None:
            raise DeviceError(f"{name}: the machine already has its ACPI power registers")
        for port in (registers.sleep_control_port, registers.sleep_status_port, registers.reset_port):
            if not base <= port < base + length:
                raise DeviceError(f"{name}: ACPI register port {port:#x} is outside its ports {base:#x}+{length}")
        self.io_bus.register(base, length, device, name)
        self.power_registers = registers

    def add_mmio_device(
        self, name: str, base: int, length: int, device: MmioDevice, *, state_name: str | None = None
    ) -> None:
        self.mmio_bus.register(base, length, device, name)
        self._persist(state_name, device)

    def on_close(self, close: Callable[[], None]) -> None:
        """Run ``close`` when the manager closes (in reverse order of registration)."""
        self._closers.append(close)

    # --- virtio-mmio -----------------------------------------------------------------------------
    def allocate_virtio_slot(self) -> tuple[int, int]:
        """The next free virtio-mmio window and its GSI."""
        slot = virtio_mmio_slot(self._next_virtio_slot)
        self._next_virtio_slot += 1
        return slot

    def configure_virtio(
        self,
        *,
        vm: VmFd,
        new_eventfd: Callable[[Callable[[], None]], int],
        use_ioeventfd: bool,
        use_irqfd: bool,
        irqchip: bool,
    ) -> None:
        """How virtio devices will be wired on this host: queue notifications by ioeventfd
        (served on the I/O thread ``new_eventfd`` belongs to) or by MMIO exit; interrupts by irqfd
        or by KVM_IRQ_LINE (or nowhere, without an in-kernel irqchip)."""
        self._vm, self._new_eventfd = vm, new_eventfd
        self._use_ioeventfd, self._use_irqfd = use_ioeventfd, use_irqfd
        self.virtio_paths = {
            "notify": "ioeventfd" if use_ioeventfd else "mmio-exit",
            "interrupt": "irqfd" if use_irqfd else ("irq-line" if irqchip else "none"),
        }

    def add_virtio(self, name: str, device: VirtioDevice, memory: GuestMemory) -> VirtioMmioTransport:
        """Put ``device`` behind a virtio-mmio transport in the next free slot, wire its
        notifications and interrupt as :meth:`configure_virtio` said, announce it on the command
        line and persist it as ``name``."""
        from virtkit.devices import virtio

        if self._vm is None or self._new_eventfd is None:
            raise DeviceError("configure_virtio() first")
        base, gsi = self.allocate_virtio_slot()
        irq: virtio.Interrupt
        if self._use_irqfd:
            fd_irq = virtio.IrqFdInterrupt()
            self.on_close(fd_irq.close)
            self._vm.irqfd(fd_irq.fileno(), gsi)
            irq = fd_irq
        else:
            irq = virtio.IrqLineInterrupt(self.irq_line(gsi), edge=True)
        transport = virtio.VirtioMmioTransport(device, memory, irq)
        self.on_close(transport.close)
        self.add_mmio_device(name, base, layout.VIRTIO_MMIO_SIZE, transport, state_name=name)
        if self._use_ioeventfd:
            for reg in transport.notify_registrations(base):
                efd = self._new_eventfd(functools.partial(transport.notify, reg.queue))
                self._vm.ioeventfd(efd, reg.addr, reg.length, datamatch=reg.datamatch)
        self.cmdline.append(virtio_kernel_cmdline_arg(base, gsi))
        index = (base - layout.VIRTIO_MMIO_BASE) // layout.VIRTIO_MMIO_SIZE
        self.guest_devices.append(acpi.virtio_mmio_device(index, base, layout.VIRTIO_MMIO_SIZE, gsi))
        return transport

    # --- what the guest's firmware tables say ----------------------------------------------------
    def platform(self, vcpus: int) -> acpi.Platform:
        """The machine as ACPI and the MP table describe it: ``vcpus`` processors, the IOAPIC and
        every device registered with a description."""
        if not 1 <= vcpus <= layout.LINUX_MAX_VCPUS:
            raise DeviceError(
                f"{vcpus} vCPUs: the ACPI and MP tables of a Linux guest describe at most "
                f"{layout.LINUX_MAX_VCPUS} (8-bit APIC IDs): give fewer --vcpus"
            )
        return acpi.Platform(vcpus=vcpus, devices=tuple(self.guest_devices), power=self.power_registers)

    def platform_tables(self, vcpus: int) -> list[tuple[int, bytes]]:
        """The ACPI tables (RSDP at ``layout.ACPI_RSDP_ADDR``) and the MP table, as
        (guest-physical address, bytes) pairs to write into the guest's firmware area."""
        platform = self.platform(vcpus)
        gsis = tuple(irq for d in platform.devices for irq in d.irqs)
        try:
            return acpi.build_tables(platform) + mptable.build_mptable(platform, gsis)
        except ValueError as e:
            raise DeviceError(f"the machine's firmware tables cannot be built: {e}") from None

    # --- teardown --------------------------------------------------------------------------------
    def close(self) -> None:
        closers, self._closers = self._closers, []
        for close in reversed(closers):
            close()
