"""A machine: KVM VM + guest memory + vCPUs + buses + devices, and its lifecycle.

Build order matters to KVM and is kept here in one place:

1. ``KVM_CREATE_VM``, then the RAM memory slots *first*: once an irqchip exists, every
   KVM_SET_USER_MEMORY_REGION waits for an SRCU grace period (measured here: 7 ms per slot
   after KVM_CREATE_IRQCHIP, 0.1 ms before it), which alone would double a VM's start-up time;
2. ``KVM_SET_TSS_ADDR`` and the identity-map address (VT-x needs both for real-mode emulation;
   other flavors ignore them) before any vCPU exists;
3. ``KVM_CREATE_IRQCHIP`` (PIC + IOAPIC + LAPICs in the kernel) and ``KVM_CREATE_PIT2``, both
   before ``KVM_CREATE_VCPU``, since vCPUs pick up the in-kernel LAPIC when they are created;
4. vCPUs with their CPUID; 5. devices on the buses; 6. the kernel and the boot vCPU's registers.
   With the in-kernel irqchip, the other vCPUs wait for INIT/SIPI from the guest.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable

from virtkit.arch import acpi, cpuid, layout, x86
from virtkit.boot.loader import ModuleSpec, load_kernel
from virtkit.devices.legacy import acpi_power, debug_exit, i8042, post, rtc, uart
from virtkit.devices.manager import DeviceManager
from virtkit.errors import ConfigError, DeviceError, KvmError
from virtkit.iothread import IoThread
from virtkit.kvm import structs as S
from virtkit.kvm.constants import KVM_MEM_LOG_DIRTY_PAGES, Cap
from virtkit.kvm.flavor import cpl0_emulated
from virtkit.kvm.ioctl import Kvm, VmFd
from virtkit.memory import GuestMemory
from virtkit.stop import Stop, StopReason
from virtkit.units import format_size
from virtkit.vcpu import Vcpu, VcpuHost, VcpuStats, install_kick_handler

#: the signals a user stops a VM with (Ctrl-C, kill): held back while a machine starts
HOST_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtkit.devices.disk import RawImage
    from virtkit.devices.virtio.net import NetDevice
    from virtkit.devices.virtio.net.tap import NetSpec

#: kept in step with virtkit.devices.hypercall.ABI_VERSION (a unit test checks), which is imported
#: only by paravirtualized machines
HYPERCALL_ABI_VERSION = 1

#: how often the watchdog looks for vCPUs that sleep forever (seconds)
WATCHDOG_PERIOD = 0.25


class DiskSpec:
    __slots__ = ("path", "read_only")

    def __init__(self, path: str, read_only: bool = False) -> None:
        self.path, self.read_only = path, read_only


class MachineConfig:
    """What a machine is made of. ``disks``: in full virtualization the first disk is the ATA
    primary master; paravirtualized, it backs the block hypercalls (and virtio-blk)."""

    __slots__ = ("memory", "vcpus", "paravirt", "strict", "disks", "irqchip", "eventfds", "nets")

    def __init__(
        self,
        memory: int = layout.DEFAULT_MEMORY,
        vcpus: int = 1,
        paravirt: bool = False,
        strict: bool = False,
        disks: tuple[DiskSpec, ...] = (),
        irqchip: bool = True,
        eventfds: bool = True,
        nets: tuple[NetSpec, ...] = (),
    ) -> None:
        self.memory, self.vcpus, self.paravirt, self.strict, self.disks = memory, vcpus, paravirt, strict, disks
        #: use KVM's in-kernel PIC/IOAPIC/LAPIC/PIT when the host has them (False: never)
        self.irqchip = irqchip
        #: virtio fast paths when the host has them: queue notifications by ioeventfd (no exit to
        #: the VMM) and interrupts by irqfd (no ioctl); False forces the exit/KVM_IRQ_LINE paths
        self.eventfds = eventfds
        #: virtio-net cards, each with a TAP made for this machine (paravirtualized machines only)
        self.nets = nets


_supported_cpuid: list[S.kvm_cpuid_entry2] | None = None


def _host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def validate_config(config: MachineConfig, kvm: Kvm) -> None:
    if config.memory < layout.MIN_MEMORY:
        raise ConfigError(
            f"--memory {format_size(config.memory)} is too small: a VM needs at least {format_size(layout.MIN_MEMORY)}"
        )
    host = _host_memory()
    if config.memory > host:
        raise ConfigError(f"--memory {format_size(config.memory)} is more than this host has ({format_size(host)})")
    if config.memory % layout.PAGE_SIZE:
        raise ConfigError(f"--memory must be a multiple of 4 KiB, got {config.memory} bytes")
    max_vcpus = kvm.check_extension(Cap.MAX_VCPUS) or kvm.check_extension(Cap.NR_VCPUS) or 1
    if not 1 <= config.vcpus <= max_vcpus:
        raise ConfigError(f"--vcpus {config.vcpus}: KVM on this host allows 1 to {max_vcpus}")


class Machine(VcpuHost):
    """One virtual machine. Build it, :meth:`load`, :meth:`start`, :meth:`wait`, :meth:`close`."""

    def __init__(
        self,
        config: MachineConfig,
        serial_out: Callable[[bytes], None],
        *,
        memory_fd: int = -1,
        memory_shared: bool = False,
    ) -> None:
        """``memory_fd``: back guest RAM with this file (a memfd, or a snapshot's memory file),
        mapped shared or copy-on-write (``memory_shared=False``: restore and clones)."""
        install_kick_handler()
        self.config = config
        self.stopping = False
        self.paused = False
        self._io_paused = False
        self._pause_cond = threading.Condition()
        self._parked: set[int] = set()
        self.stop_info: Stop | None = None
        self.watchdog_round = 0
        self._stop_lock = threading.Lock()
        self._done = threading.Event()
        self._running = 0
        self._watchdog: threading.Thread | None = None
        self.started_ns = self.ended_ns = 0
        #: the boot protocol the loader used ("multiboot", "linux (bzImage, boot protocol 2.15)"...)
        self.boot_protocol = ""
        self.vcpus: list[Vcpu] = []
        with contextlib.ExitStack() as undo:
            self.kvm = Kvm()
            undo.callback(self.kvm.close)
            validate_config(config, self.kvm)
            self.vm: VmFd = self.kvm.create_vm()
            undo.callback(self.vm.close)
            self.memory = GuestMemory(layout.ram_ranges(config.memory), fd=memory_fd, shared=memory_shared)
            undo.callback(self.memory.close)
            self.dirty_logging = False
            self._host_dirty_before: set[int] = set()  # see dirty_pages()
            for slot, region in enumerate(self.memory.regions):
                region.slot = slot
                self.vm.set_user_memory_region(slot, region.gpa, region.size, region.host_addr)
            self._create_platform()
            undo.callback(self._close_vcpus)
            self._create_vcpus()
            self.disks: list[RawImage] = []  # opened in _create_devices
            #: (TAP name, card) of each --net, in order
            self.nets: list[tuple[str, NetDevice]] = []
            undo.callback(self._close_disks)
            self.device_manager = DeviceManager(strict=config.strict, irq_line=self.irq_setter)
            undo.callback(self.device_manager.close)
            self.io_bus, self.mmio_bus = self.device_manager.io_bus, self.device_manager.mmio_bus
            #: devices with state, by stable name (virtkit.devices.contract.Persistent): what
            #: snapshot and migration walk
            self.devices = self.device_manager.persistent
            self.iothread = IoThread(
                "vm-io",
                lambda e: self.request_stop(Stop(StopReason.ERROR, detail=f"I/O thread: {type(e).__name__}: {e}")),
            )
            undo.callback(self.iothread.stop)
            self._create_devices(serial_out)
            undo.pop_all()

    # --- construction ------------------------------------------------------------------------------
    def _create_platform(self) -> None:
        vm = self.vm
        if vm.check_extension(Cap.SET_TSS_ADDR):
            vm.set_tss_addr(layout.KVM_TSS_ADDR)
            with contextlib.suppress(KvmError):
                vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        # Without an in-kernel irqchip the machine still runs: HLT then exits to userspace (and
        # ends the VM, since nothing could wake it), device interrupt lines go nowhere, and only
        # one vCPU can exist (APs need a local APIC to receive INIT/SIPI).
        self.irqchip = self.config.irqchip and bool(vm.check_extension(Cap.IRQCHIP))
        if self.irqchip:
            vm.create_irqchip()
            if vm.check_extension(Cap.PIT2):
                vm.create_pit2()
        elif self.config.vcpus > 1:
            raise ConfigError(
                "without an in-kernel irqchip (KVM_CAP_IRQCHIP, or irqchip disabled) a VM can only have one vCPU"
            )

    def _create_vcpus(self) -> None:
        global _supported_cpuid
        if _supported_cpuid is None:
            _supported_cpuid = self.kvm.supported_cpuid()
        n = self.config.vcpus
        for i in range(n):
            fd = self.vm.create_vcpu(i)
            self.vcpus.append(Vcpu(self, fd))
            fd.set_cpuid2(
                cpuid.build_cpuid(
                    _supported_cpuid,
                    vcpu_id=i,
                    vcpu_count=n,
                    paravirt=self.config.paravirt,
                    cpl0_emulated=cpl0_emulated(),
                    paravirt_features=cpuid.PV_FEATURE_HYPERCALL | cpuid.PV_FEATURE_VIRTIO_MMIO,
                    hypercall_abi=HYPERCALL_ABI_VERSION,
                    hypercall_port=layout.HYPERCALL_PORT,
                )
            )
        self.note_cpuid()

    def note_cpuid(self) -> None:
        """Remember vCPU 0's CPUID as KVM holds it (KVM_GET_CPUID2), read now, while no vCPU runs
        (after creation, and after a snapshot or migration state replaced it). Read later from
        another thread, the ioctl would wait on the vCPU mutex that KVM_RUN holds, and a guest
        halted in the in-kernel irqchip may not return from KVM_RUN for a long time."""
        #: (function, index, flags, eax, ebx, ecx, edx) of each leaf: what the guest sees
        self.cpuid: list[tuple[int, int, int, int, int, int, int]] = [
            (int(x.function), int(x.index), int(x.flags), int(x.eax), int(x.ebx), int(x.ecx), int(x.edx))
            for x in self.vcpus[0].fd.get_cpuid2()
        ]

    @property
    def kernel_cmdline_extra(self) -> list[str]:
        """Appended to the guest's command line: what the devices need announced."""
        return self.device_manager.cmdline

    @property
    def virtio_paths(self) -> dict[str, str]:
        return self.device_manager.virtio_paths

    def _create_devices(self, serial_out: Callable[[bytes], None]) -> None:
        dm = self.device_manager
        self.uart = uart.Uart16550(serial_out, self.irq_setter(uart.COM1_IRQ))
        dm.add_port_device(
            "uart0 (16550A)",
            uart.COM1_BASE,
            uart.PORT_COUNT,
            self.uart,
            state_name="uart0",
            guest_info=acpi.serial_port("COM1", 0, uart.COM1_BASE, uart.COM1_IRQ),
        )
        dm.add_port_device(
            "isa-debug-exit",
            debug_exit.DEBUG_EXIT_PORT,
            debug_exit.PORT_COUNT,
            debug_exit.DebugExit(self._on_debug_exit),
        )
        kbc = i8042.I8042(self._on_reset)
        dm.add_port_device(
            "i8042 data",
            i8042.DATA_PORT,
            1,
            kbc,
            guest_info=acpi.ps2_controller(i8042.DATA_PORT, i8042.COMMAND_PORT, i8042.KEYBOARD_IRQ),
        )
        dm.add_port_device("i8042 command", i8042.COMMAND_PORT, 1, kbc, offset=4, state_name="i8042")
        dm.add_power_registers(
            "acpi power",
            layout.ACPI_POWER_PORT,
            layout.ACPI_POWER_PORT_COUNT,
            acpi_power.AcpiPowerRegisters(self._on_acpi_power_off, self._on_acpi_reset),
            acpi.PowerRegisters(
                sleep_control_port=layout.ACPI_SLEEP_CONTROL_PORT,
                sleep_status_port=layout.ACPI_SLEEP_STATUS_PORT,
                reset_port=layout.ACPI_RESET_PORT,
                reset_value=acpi_power.RESET_VALUE,
                s5_slp_typ=acpi_power.S5_SLP_TYP,
            ),
        )
        self.rtc = rtc.CmosRtc(self.config.memory)
        dm.add_port_device("cmos rtc", rtc.INDEX_PORT, 2, self.rtc, state_name="rtc")
        self.post = post.PostPort()
        dm.add_port_device("post code", post.POST_PORT, 1, self.post, state_name="post")
        if self.config.nets and not self.config.paravirt:
            raise ConfigError("--net needs --mode para: the network card is a virtio device")
        if not self.config.disks and not self.config.paravirt:
            return
        # imported here: a VM without disks or paravirtual devices never pays for them
        from virtkit.devices.disk import RawImage
        from virtkit.devices.hypercall import HypercallDevice
        from virtkit.devices.legacy import ata

        if len(self.config.disks) > 1:
            raise DeviceError("virtkit attaches one disk per VM for now: give --disk once")
        for spec in self.config.disks:
            self.disks.append(RawImage(spec.path, read_only=spec.read_only))
        disk = self.disks[0] if self.disks else None
        if self.config.paravirt:
            self.hypercalls = HypercallDevice(self.memory, serial_out, disk=disk, power_off=self._on_power_off)
            dm.add_port_device(
                "hypercall", layout.HYPERCALL_PORT, layout.HYPERCALL_PORT_COUNT, self.hypercalls, state_name="hypercall"
            )
            self._create_virtio_devices(serial_out, disk)
        elif disk is not None:
            self.ata = ata.AtaController(disk, self.irq_setter(ata.IRQ))
            dm.add_port_device("ata0 (command block)", ata.CMD_BASE, 8, self.ata)
            dm.add_port_device("ata0 (control)", ata.CTRL_PORT, 1, self.ata, offset=8, state_name="ata0")

    def _create_virtio_devices(self, serial_out: Callable[[bytes], None], disk: RawImage | None) -> None:
        """virtio-mmio devices in the slots the device manager hands out (docs/VIRTIO.md),
        announced to the guest on its command line in Linux's ``virtio_mmio.device=`` syntax."""
        from virtkit.devices import virtio

        vm = self.vm
        fast = self.config.eventfds and self.irqchip
        self.device_manager.configure_virtio(
            vm=vm,
            new_eventfd=self.iothread.new_eventfd,
            irqchip=self.irqchip,
            use_ioeventfd=fast and bool(vm.check_extension(Cap.IOEVENTFD)),
            use_irqfd=fast and bool(vm.check_extension(Cap.IRQFD)),
        )
        self.device_manager.add_virtio("virtio-console", virtio.ConsoleDevice(serial_out), self.memory)
        if disk is not None:
            self.device_manager.add_virtio("virtio-blk", virtio.BlockDevice(disk), self.memory)
        self.device_manager.add_virtio("virtio-rng", virtio.RngDevice(), self.memory)
        for i, net in enumerate(self.config.nets):
            self._add_net(f"virtio-net{i}" if i else "virtio-net", net)

    def _add_net(self, name: str, spec: NetSpec) -> None:
        """A virtio-net card on a TAP made now (or the one ``spec`` brings); the I/O thread reads
        the TAP, the card's close() (with the device manager's) removes it."""
        from virtkit.devices.virtio.net import NetDevice
        from virtkit.devices.virtio.net.tap import TapDevice, random_mac

        tap = spec.tap if spec.tap is not None else TapDevice(spec)
        try:
            card = NetDevice(tap, spec.mac or random_mac())
        except BaseException:
            tap.close()
            raise
        try:
            self.device_manager.add_virtio(name, card, self.memory)
        except BaseException:
            card.close()
            raise
        self.iothread.add_reader(tap.fileno(), card.backend_readable)
        self.nets.append((tap.name, card))

    def irq_setter(self, line: int) -> Callable[[int], None]:
        """A function that drives interrupt ``line`` (an ISA IRQ / IOAPIC pin) to a level."""
        if not self.irqchip:
            return lambda level: None
        vm = self.vm
        return lambda level: vm.irq_line(line, level)

    def _on_debug_exit(self, value: int, status: int) -> None:
        self.request_stop(
            Stop(StopReason.DEBUG_EXIT, exit_status=status, detail=f"guest wrote {value:#x} to the debug-exit port")
        )

    def _on_power_off(self, status: int) -> None:
        self.request_stop(
            Stop(StopReason.POWER_OFF, exit_status=status, detail=f"guest powered off with status {status} (hypercall)")
        )

    def _on_reset(self) -> None:
        self.request_stop(Stop(StopReason.RESET, detail="guest pulsed the i8042 reset line"))

    def _on_acpi_power_off(self) -> None:
        self.request_stop(
            Stop(StopReason.POWER_OFF, detail="guest powered off (ACPI S5 through the sleep control register)")
        )

    def _on_acpi_reset(self) -> None:
        self.request_stop(Stop(StopReason.RESET, detail="guest wrote the ACPI reset register"))

    # --- boot --------------------------------------------------------------------------------------
    def load(
        self,
        kernel: str,
        *,
        cmdline: str = "",
        modules: list[ModuleSpec] | None = None,
        protocol: str = "auto",
        initrd: str | None = None,
    ) -> x86.EntryState:
        entry = load_kernel(
            self.memory,
            kernel,
            cmdline=cmdline,
            modules=modules,
            protocol=protocol,
            initrd=initrd,
            device_args=self.kernel_cmdline_extra,
        )
        self.boot_protocol = entry.protocol
        self._write_firmware_tables(linux=entry.is_linux)
        if entry.is_linux:
            self._prepare_linux_platform()
        boot = self.vcpus[0].fd
        regs, sregs = boot.get_regs(), boot.get_sregs()
        x86.apply_entry_state(regs, sregs, entry)
        boot.set_sregs(sregs)  # SREGS first: the mode they set decides how RIP/RSP are taken
        boot.set_regs(regs)
        return entry

    def _write_firmware_tables(self, *, linux: bool) -> None:
        """What a PC's firmware leaves in its ROM area for every guest: the ACPI and MP tables
        describing this machine's vCPUs and devices (an OS finds the RSDP by scanning
        0xE0000-0xFFFFF, ACPI 6.5 §5.2.5.1; every boot protocol reports that area reserved, and
        the loaders refuse images below 1 MiB). A machine with more vCPUs than the tables can
        describe gets none unless it boots Linux, where that is an error."""
        if len(self.vcpus) > layout.LINUX_MAX_VCPUS and not linux:
            return
        for gpa, blob in self.device_manager.platform_tables(len(self.vcpus)):
            self.memory.write(gpa, blob)

    def _prepare_linux_platform(self) -> None:
        """What a PC's firmware leaves for a Linux kernel besides its tables: on every vCPU the
        boot MSRs, LINT0/LINT1 and FPU state."""
        msrs = x86.linux_boot_msrs()
        for v in self.vcpus:
            accepted = v.fd.set_msrs(msrs)
            if accepted != len(msrs):
                refused = list(msrs)[accepted]
                raise KvmError(f"KVM refused MSR {refused:#x} that a Linux guest starts with (KVM_SET_MSRS)")
            if self.irqchip:  # the LAPIC exists only with the in-kernel irqchip
                v.fd.set_lapic(x86.lapic_with_lint(v.fd.get_lapic()))
            v.fd.set_fpu(x86.fpu_init_state())

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the I/O thread, one thread per vCPU and the watchdog, all or none as far as the
        host's Ctrl-C and SIGTERM are concerned: they are held back until every thread runs (and
        the threads started here never take them), so a signal cannot leave a machine half
        started, with vCPUs running that nothing knows to stop."""
        held = signal.pthread_sigmask(signal.SIG_BLOCK, HOST_STOP_SIGNALS)
        try:
            self.started_ns = time.perf_counter_ns()
            self._running = len(self.vcpus)
            self.iothread.start()
            for v in self.vcpus:
                v.start()
            self._watchdog = threading.Thread(target=self._watch, name="vm-watchdog", daemon=True)
            self._watchdog.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a held signal is delivered now

    def wait(self, timeout: float | None = None) -> Stop:
        """Block until the machine stops (or ``timeout`` seconds pass: then it is stopped)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._done.is_set():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self.request_stop(Stop(StopReason.TIMEOUT, detail=f"no result within {timeout:g} s"))
                    left = None
                self._done.wait(min(left, 0.5) if left is not None else 0.5)
        except BaseException:
            # Ctrl-C (KeyboardInterrupt) or a signal turned into an exception: stop cleanly first
            self.request_stop(Stop(StopReason.STOPPED, detail="stopped by the host"))
            self._done.wait(5)
            raise
        assert self.stop_info is not None
        return self.stop_info

    def request_stop(self, stop: Stop) -> None:
        """Stop the machine for ``stop``'s reason; the first request wins. Callable from any thread."""
        with self._stop_lock:
            if self.stop_info is None:
                self.stop_info = stop
            self.stopping = True
        with self._pause_cond:
            self._pause_cond.notify_all()  # parked vCPUs leave too
        for v in self.vcpus:
            v.kick()

    def stop(self) -> None:
        self.request_stop(Stop(StopReason.STOPPED, detail="stopped by the host"))

    # --- pause / resume (snapshots and migration need every vCPU outside KVM_RUN) -----------------
    def pause(self, timeout: float = 5.0) -> None:
        """Return once every vCPU thread is parked outside KVM_RUN (or has ended). vCPU state
        ioctls are then safe from this thread: KVM serialises them on the vCPU mutex, which
        KVM_RUN holds while the guest runs."""
        with self._pause_cond:
            self.paused = True
        for v in self.vcpus:
            v.kick()
        deadline = time.monotonic() + timeout
        with self._pause_cond:
            while not self._all_parked():
                left = deadline - time.monotonic()
                if left <= 0:
                    self.paused = False
                    self._pause_cond.notify_all()
                    raise KvmError(f"vCPUs did not pause within {timeout:g} s")
                self._pause_cond.wait(min(left, 0.05))
                for v in self.vcpus:  # a kick can land between two KVM_RUNs; repeat it
                    if v.id not in self._parked:
                        v.kick()
        # no vCPU can notify a queue now; wait for the I/O thread to finish what it is doing
        if not self._io_paused:
            self.iothread.pause()
            self._io_paused = True

    def _all_parked(self) -> bool:
        return all(v.id in self._parked or v.thread is None or not v.thread.is_alive() for v in self.vcpus)

    def resume(self) -> None:
        if self._io_paused:
            self._io_paused = False
            self.iothread.resume()
        with self._pause_cond:
            self.paused = False
            self._pause_cond.notify_all()

    def park(self, vcpu: Vcpu) -> None:
        """Called by a vCPU thread that saw ``paused``: wait here until resumed or stopped."""
        with self._pause_cond:
            self._parked.add(vcpu.id)
            self._pause_cond.notify_all()
            while self.paused and not self.stopping:
                self._pause_cond.wait()
            self._parked.discard(vcpu.id)

    def vcpu_exited(self, vcpu: Vcpu) -> None:
        with self._stop_lock:
            self._running -= 1
            last = self._running == 0
            if self.stop_info is None:
                self.stop_info = Stop(StopReason.ERROR, detail=f"vCPU {vcpu.id} stopped unexpectedly")
                self.stopping = True
        if last:
            self.ended_ns = time.perf_counter_ns()
            self._done.set()
        else:
            for v in self.vcpus:
                v.kick()

    def _watch(self) -> None:
        """Find vCPUs asleep for good: with an in-kernel irqchip a HLT never reaches userspace,
        so a vCPU that made no exit for a period is asked to check its MP state."""
        last = [sum(v.stats.exits) for v in self.vcpus]
        while not self._done.wait(WATCHDOG_PERIOD):
            if self.stopping:
                continue
            self.watchdog_round += 1
            for i, v in enumerate(self.vcpus):
                now = sum(v.stats.exits)
                if now == last[i]:
                    v.request_inspection()
                last[i] = now

    def check_all_idle(self) -> None:
        r = self.watchdog_round
        if all(v.idle_round == r for v in self.vcpus):
            self.request_stop(Stop(StopReason.HALTED, detail="all vCPUs halted with interrupts disabled"))

    # --- teardown ----------------------------------------------------------------------------------
    def _close_vcpus(self) -> None:
        for v in self.vcpus:
            v.fd.close()
        self.vcpus = []

    def _close_disks(self) -> None:
        for d in self.disks:
            d.close()
        self.disks = []

    def close(self) -> None:
        """Stop if running, join threads, release every fd and mapping."""
        if self._running:
            self.request_stop(Stop(StopReason.STOPPED, detail="machine closed"))
            self._done.wait(5)
        threads = [v.thread for v in self.vcpus] + [self._watchdog]
        for t in threads:
            if t is not None:
                t.join(timeout=5)
        self.iothread.stop()
        self.device_manager.close()
        self._close_vcpus()
        self._close_disks()
        self.memory.close()
        self.vm.close()
        self.kvm.close()

    # --- dirty page tracking (live migration) ------------------------------------------------------
    def set_dirty_logging(self, enabled: bool) -> None:
        """Re-register every slot with or without KVM_MEM_LOG_DIRTY_PAGES."""
        flags = KVM_MEM_LOG_DIRTY_PAGES if enabled else 0
        for r in self.memory.regions:
            self.vm.set_user_memory_region(r.slot, r.gpa, r.size, r.host_addr, flags)
        self.memory.track_host_writes(enabled)  # device writes never show in KVM's log
        self._host_dirty_before = set()
        self.dirty_logging = enabled

    def dirty_pages(self) -> list[int]:
        """Guest-physical page addresses written since the last call, by the guest (KVM_GET_DIRTY_LOG,
        which clears the log as it reads it) or by a device through GuestMemory. Sorted. Needs
        :meth:`set_dirty_logging` on."""
        # A device marks pages when it takes a view of them, and its data lands a little later
        # (a disk read into a virtio buffer): a drain in between would send the page before the
        # write and forget it. So what host code touched is reported by two consecutive drains:
        # the write has landed by the second, unless one device request outlasts a whole pre-copy
        # round. The last drain, with the vCPUs parked and the I/O thread paused, has no request
        # in flight at all.
        fresh = self.memory.drain_host_dirty()
        host = fresh | self._host_dirty_before
        self._host_dirty_before = fresh
        pages: list[int] = []
        for r in self.memory.regions:
            npages = r.size // layout.PAGE_SIZE
            bitmap = self.vm.get_dirty_log(r.slot, npages)
            for byte_index, byte in enumerate(bitmap):
                if byte:
                    base = r.gpa + byte_index * 8 * layout.PAGE_SIZE
                    pages.extend(base + bit * layout.PAGE_SIZE for bit in range(8) if byte >> bit & 1)
        return sorted(host.union(pages)) if host else pages

    # --- statistics --------------------------------------------------------------------------------
    def vcpu_stats(self) -> list[VcpuStats]:
        return [v.stats for v in self.vcpus]

    def tsc_khz(self) -> int:
        try:
            return self.vcpus[0].fd.get_tsc_khz() if self.vcpus else 0
        except KvmError:
            return 0
