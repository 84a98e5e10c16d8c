"""virtio-mmio transport, version 2 (virtio 1.2 §4.2): one register window per device.

The register layout is the table of §4.2.2. Where a window goes and which interrupt line it uses
is the device manager's choice (:mod:`virtkit.devices.manager`, which also announces the device
to Linux as ``virtio_mmio.device=4K@0xd0000000:5``); what it does by hand::

    dev = BlockDevice("disk.img")
    irq = IrqFdInterrupt()                            # or IrqLineInterrupt(lambda l: vm.irq_line(gsi, l))
    vm.irqfd(irq.fileno(), gsi)
    transport = VirtioMmioTransport(dev, memory, irq)
    mmio_bus.register(base, VIRTIO_MMIO_SIZE, transport, "virtio-blk")
    for reg in transport.notify_registrations(base):  # optional fast path, one eventfd per queue
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        vm.ioeventfd(efd, reg.addr, reg.length, datamatch=reg.datamatch)
        # an I/O thread: on efd readable -> os.eventfd_read(efd); transport.notify(reg.queue)

Without ioeventfd, the guest's write to QueueNotify exits to the vCPU thread, which calls
``mmio_write`` and processes the queue right there. Both paths end in :meth:`notify`, which, like
every register access, takes the device lock.

Policy for a misbehaving driver (the guest is hostile by assumption):

* register accesses that are not 32-bit and aligned, reads of write-only registers and writes of
  read-only ones are ignored (reads return 0), as are writes to a queue's configuration while it
  is enabled (§4.2.2.2);
* FEATURES_OK is refused unless the driver accepted VIRTIO_F_VERSION_1 and only offered features
  (§2.2.2); DRIVER_OK is refused before FEATURES_OK; a write that would clear status bits is
  ignored (§2.1.1: only a reset, writing 0, clears them);
* a queue enabled with an unusable configuration, or a queue whose rings turn out corrupt, sets
  DEVICE_NEEDS_RESET (§2.1.2) with a configuration change interrupt if DRIVER_OK is set; that
  queue stays stopped until reset, the device's other queues keep working;
* nothing the guest does raises out of ``mmio_read`` / ``mmio_write`` / ``notify``: a bug inside
  virtkit is logged, counted in ``internal_errors`` and also ends in DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Final

from virtkit.devices.contract import MmioDevice, Persistent, QueueReplay
from virtkit.devices.virtio import spec
from virtkit.devices.virtio.device import VirtioDevice
from virtkit.devices.virtio.interrupt import Interrupt
from virtkit.devices.virtio.queue import QueueConfigError, VirtQueue
from virtkit.errors import DeviceError
from virtkit.memory import GuestMemory

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtkit.devices.virtio.persist import TransportState

log = logging.getLogger(__name__)

MAGIC_VALUE: Final = 0x74726976  # "virt" little-endian (§4.2.2)
VERSION: Final = 2  # the non-legacy register layout (§4.2.2; legacy devices say 1)
#: VendorID: "VKIT" little-endian. Drivers ignore it (§4.2.2 gives it no meaning beyond identity).
VENDOR_ID: Final = 0x54494B56
#: feature words the driver may select: bits 0..127 (§2.2 allocates feature bits up to 127)
FEATURE_WORDS: Final = 4
#: the device-specific configuration space starts here (§4.2.2 "Config")
CONFIG_OFFSET: Final = 0x100


class Reg(enum.IntEnum):
    """Register offsets of the version 2 layout (§4.2.2, table "MMIO Device Register Layout")."""

    MAGIC_VALUE = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    SHM_SEL = 0x0AC
    SHM_LEN_LOW = 0x0B0
    SHM_LEN_HIGH = 0x0B4
    SHM_BASE_LOW = 0x0B8
    SHM_BASE_HIGH = 0x0BC
    QUEUE_RESET = 0x0C0
    CONFIG_GENERATION = 0x0FC


_ADDRESS_REGS: Final = {
    Reg.QUEUE_DESC_LOW: ("desc", 0),
    Reg.QUEUE_DESC_HIGH: ("desc", 32),
    Reg.QUEUE_DRIVER_LOW: ("driver", 0),
    Reg.QUEUE_DRIVER_HIGH: ("driver", 32),
    Reg.QUEUE_DEVICE_LOW: ("device", 0),
    Reg.QUEUE_DEVICE_HIGH: ("device", 32),
}


@dataclass(frozen=True, slots=True)
class NotifyRegistration:
    """One ioeventfd the machine may register so that notifications of ``queue`` skip the exit:
    ``vm.ioeventfd(efd, addr, length, datamatch=datamatch)``, then call ``notify(queue)`` when
    ``efd`` becomes readable. Without VIRTIO_F_NOTIFICATION_DATA (never offered) the driver
    writes the queue index to QueueNotify (§4.2.3.3), hence the datamatch."""

    queue: int
    addr: int
    length: int
    datamatch: int


@dataclass(slots=True)
class _QueueRegs:
    """What the driver wrote into one queue's registers (§4.2.3.2)."""

    num: int
    desc: int = 0
    driver: int = 0
    device: int = 0
    ready: bool = False


class VirtioMmioTransport(MmioDevice, Persistent, QueueReplay):
    """The register window of one virtio device; an MMIO bus device (``mmio_read``/``mmio_write``)."""

    def __init__(
        self, device: VirtioDevice, memory: GuestMemory, interrupt: Interrupt, *, vendor_id: int = VENDOR_ID
    ) -> None:
        self.device = device
        self.memory = memory
        self.interrupt = interrupt
        self.vendor_id = vendor_id
        #: the transport shares the device's lock: one lock per device, whoever enters
        self.lock = device.lock
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        #: the driver wrote a non-zero word beyond FEATURE_WORDS: it accepted unknown features
        self.unknown_features_written = False
        self.queue_sel = 0
        self.shm_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self.queue_regs = [_QueueRegs(num=size) for size in device.queue_max_sizes]
        #: why DEVICE_NEEDS_RESET was set, for the host's log and tests
        self.needs_reset_reason: str | None = None
        #: bugs inside virtkit caught at this boundary (never guest errors); should stay 0
        self.internal_errors = 0
        self.ignored_accesses = 0
        with self.lock:
            device.attach(memory, self)

    # --- the fast path and the machine -----------------------------------------------------------
    def notify_registrations(self, base: int) -> list[NotifyRegistration]:
        """The ioeventfds to register, one per queue, for a window at ``base``."""
        return [
            NotifyRegistration(queue=i, addr=base + Reg.QUEUE_NOTIFY, length=4, datamatch=i)
            for i in range(self.device.num_queues)
        ]

    def notify(self, queue_index: int) -> None:
        """An available buffer notification for ``queue_index`` (from QueueNotify or an ioeventfd).
        Safe from any thread; never raises."""
        with self.lock:
            try:
                # §2.1.2: no buffers are consumed before DRIVER_OK; none after the driver gave up.
                if self.status & spec.DeviceStatus.DRIVER_OK and not self.status & spec.DeviceStatus.FAILED:
                    self.device.notify(queue_index)
            except Exception as e:  # noqa: BLE001 - the guest must never take the VMM down
                self.internal_error(e)

    def close(self) -> None:
        with self.lock:
            self.device.close()

    # --- DeviceEvents: what the device reports -----------------------------------------------------
    def signal_used(self, queue: int) -> None:
        self._raise_interrupt(spec.InterruptReason.USED_BUFFER)

    def signal_config(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF
        if self.status & spec.DeviceStatus.DRIVER_OK:
            self._raise_interrupt(spec.InterruptReason.CONFIG_CHANGE)

    def needs_reset(self, reason: str) -> None:
        if self.status & spec.DeviceStatus.DEVICE_NEEDS_RESET:
            return
        log.warning("virtio-%s: device needs reset: %s", self.device.device_type.name.lower(), reason)
        self.needs_reset_reason = reason
        self.status |= spec.DeviceStatus.DEVICE_NEEDS_RESET
        # §2.1.2: once DRIVER_OK is set, DEVICE_NEEDS_RESET comes with a configuration change notification
        if self.status & spec.DeviceStatus.DRIVER_OK:
            self._raise_interrupt(spec.InterruptReason.CONFIG_CHANGE)

    def internal_error(self, error: BaseException) -> None:
        self.internal_errors += 1
        log.error(
            "virtio-%s: internal error",
            self.device.device_type.name.lower(),
            exc_info=(type(error), error, error.__traceback__),
        )
        self.needs_reset(f"internal error: {error!r}")

    def _raise_interrupt(self, reason: spec.InterruptReason) -> None:
        was = self.interrupt_status
        self.interrupt_status |= reason
        if not was:
            self.interrupt.set_level(True)
        self.interrupt.trigger()

    # --- MMIO ------------------------------------------------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        with self.lock:
            try:
                if offset >= CONFIG_OFFSET:
                    return self._read_config(offset - CONFIG_OFFSET, size)
                if size != 4 or offset % 4:
                    self.ignored_accesses += 1  # §4.2.2.2: registers are 32 bits wide, aligned
                    return 0
                return self._read_register(offset) & 0xFFFF_FFFF
            except Exception as e:  # noqa: BLE001 - the guest must never take the VMM down
                self.internal_error(e)
                return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        notify = None
        with self.lock:
            try:
                if offset >= CONFIG_OFFSET:
                    self._write_config(offset - CONFIG_OFFSET, size, value)
                elif size != 4 or offset % 4:
                    self.ignored_accesses += 1
                elif offset == Reg.QUEUE_NOTIFY:
                    notify = value & 0xFFFF
                else:
                    self._write_register(offset, value & 0xFFFF_FFFF)
            except Exception as e:  # noqa: BLE001 - the guest must never take the VMM down
                self.internal_error(e)
        if notify is not None:
            self.notify(notify)

    def _selected(self) -> _QueueRegs | None:
        return self.queue_regs[self.queue_sel] if self.queue_sel < len(self.queue_regs) else None

    def _read_register(self, offset: int) -> int:
        q = self._selected()
        if offset == Reg.MAGIC_VALUE:
            return MAGIC_VALUE
        if offset == Reg.VERSION:
            return VERSION
        if offset == Reg.DEVICE_ID:
            return int(self.device.device_type)
        if offset == Reg.VENDOR_ID:
            return self.vendor_id
        if offset == Reg.DEVICE_FEATURES:
            if self.device_features_sel >= FEATURE_WORDS:
                return 0
            return self.device.offered_features >> (32 * self.device_features_sel)
        if offset == Reg.QUEUE_NUM_MAX:
            return self.device.queue_max_sizes[self.queue_sel] if q is not None else 0
        if offset == Reg.QUEUE_READY:
            return int(q is not None and q.ready)
        if offset == Reg.INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == Reg.STATUS:
            return self.status
        if offset in (Reg.SHM_LEN_LOW, Reg.SHM_LEN_HIGH, Reg.SHM_BASE_LOW, Reg.SHM_BASE_HIGH):
            return 0xFFFF_FFFF  # no shared memory regions: length and base read as -1 (§4.2.2)
        if offset == Reg.CONFIG_GENERATION:
            return self.config_generation
        # write-only registers and holes (QueueReset reads 0: VIRTIO_F_RING_RESET is not offered)
        self.ignored_accesses += 1
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        if offset == Reg.DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == Reg.DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == Reg.DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == Reg.QUEUE_SEL:
            self.queue_sel = value
        elif offset == Reg.QUEUE_NUM:
            self._write_queue_field("num", value, 0)
        elif offset in _ADDRESS_REGS:
            name, shift = _ADDRESS_REGS[Reg(offset)]
            self._write_queue_field(name, value, shift)
        elif offset == Reg.QUEUE_READY:
            self._write_queue_ready(value)
        elif offset == Reg.INTERRUPT_ACK:
            was = self.interrupt_status
            self.interrupt_status &= ~value
            if was and not self.interrupt_status:
                self.interrupt.set_level(False)
        elif offset == Reg.STATUS:
            self._write_status(value & 0xFF)
        elif offset == Reg.SHM_SEL:
            self.shm_sel = value
        else:
            self.ignored_accesses += 1  # read-only registers, QueueReset without RING_RESET, holes

    # --- feature negotiation (§2.2, §3.1.1 steps 4-6) ------------------------------------------------
    def _write_driver_features(self, value: int) -> None:
        # §3.1.1 step 5: no new feature bits once FEATURES_OK is set
        if self.status & spec.DeviceStatus.FEATURES_OK:
            self.ignored_accesses += 1
            return
        if self.driver_features_sel >= FEATURE_WORDS:
            if value:
                self.unknown_features_written = True
            return
        shift = 32 * self.driver_features_sel
        self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)

    def _features_acceptable(self) -> bool:
        unoffered = self.driver_features & ~self.device.offered_features
        if unoffered or self.unknown_features_written:
            log.info(
                "virtio-%s: driver accepted features not offered: %s",
                self.device.device_type.name.lower(),
                spec.feature_bits(unoffered) or "beyond bit 127",
            )
            return False
        if not self.driver_features & spec.F_VERSION_1:
            log.info(
                "virtio-%s: driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)",
                self.device.device_type.name.lower(),
            )
            return False
        return True

    # --- status (§2.1, §3.1.1) ------------------------------------------------------------------------
    def _write_status(self, value: int) -> None:
        S = spec.DeviceStatus
        if value == 0:
            self._reset()
            return
        current = self.status & ~S.DEVICE_NEEDS_RESET
        value &= ~S.DEVICE_NEEDS_RESET  # the device's bit: the driver cannot set or clear it
        if current & ~value:
            self.ignored_accesses += 1  # §2.1.1: the driver MUST NOT clear a status bit
            return
        new = value & ~current
        if new & S.FEATURES_OK and (not (current | new) & S.DRIVER or not self._features_acceptable()):
            new &= ~S.FEATURES_OK  # §2.2.2: the device fails to set FEATURES_OK; the driver re-reads it
        if new & S.DRIVER_OK and not (current | new) & S.FEATURES_OK:
            new &= ~S.DRIVER_OK
        self.status |= new
        if new & S.FEATURES_OK:
            self.device.acked_features = self.driver_features
        if new & S.FAILED:
            self.device.active = False  # the driver gave up (§2.1): serve nothing until it resets
        elif new & S.DRIVER_OK:
            self.device.activate()
            if self.status & S.DEVICE_NEEDS_RESET:
                # broken during setup, before there was a driver to tell: tell it now (§2.1.2)
                self._raise_interrupt(spec.InterruptReason.CONFIG_CHANGE)

    def _reset(self) -> None:
        """Writing 0 to Status (§4.2.2, §2.4): everything back to power-on, queues disabled, no
        interrupt pending (§4.2.2.1)."""
        self.device.reset()
        self.status = 0
        self.device_features_sel = self.driver_features_sel = 0
        self.driver_features = 0
        self.unknown_features_written = False
        self.queue_sel = self.shm_sel = 0
        self.queue_regs = [_QueueRegs(num=size) for size in self.device.queue_max_sizes]
        self.needs_reset_reason = None
        if self.interrupt_status:
            self.interrupt_status = 0
            self.interrupt.set_level(False)

    # --- queue configuration (§4.2.3.2) ----------------------------------------------------------
    def _write_queue_field(self, name: str, value: int, shift: int) -> None:
        q = self._selected()
        if q is None or q.ready:
            self.ignored_accesses += 1  # §4.2.2.2: not while QueueReady is set
            return
        if name == "num":
            q.num = value
            return
        old = getattr(q, name)
        setattr(q, name, (old & ~(0xFFFF_FFFF << shift)) | (value << shift))

    def _write_queue_ready(self, value: int) -> None:
        q = self._selected()
        if q is None:
            self.ignored_accesses += 1
            return
        index = self.queue_sel
        if not value & 1:
            q.ready = False
            self.device.set_queue(index, None)
            return
        if q.ready:
            return
        S = spec.DeviceStatus
        if not self.status & S.FEATURES_OK or self.status & (S.FAILED | S.DEVICE_NEEDS_RESET):
            # queues are set up after feature negotiation (§3.1.1 step 7): refuse, QueueReady reads 0
            self.ignored_accesses += 1
            return
        try:
            queue = VirtQueue(
                self.memory,
                q.num,
                q.desc,
                q.driver,
                q.device,
                event_idx=self.device.has_feature(spec.F_EVENT_IDX),
                indirect=self.device.has_feature(spec.F_INDIRECT_DESC),
                max_size=self.device.queue_max_sizes[index],
                max_chain_bytes=self.device.max_request_bytes,
            )
        except QueueConfigError as e:
            self.needs_reset(f"queue {index}: {e}")
            return
        q.ready = True
        self.device.set_queue(index, queue)
        if self.status & S.DRIVER_OK:
            self.device.notify(index)

    # --- configuration space (§2.5, §4.2.2 "Config") ----------------------------------------------
    def _read_config(self, offset: int, size: int) -> int:
        config = self.device.config_space()
        if size not in (1, 2, 4, 8) or offset + size > len(config):
            self.ignored_accesses += 1
            return 0
        return int.from_bytes(config[offset : offset + size], "little")

    def _write_config(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4, 8):
            self.ignored_accesses += 1
            return
        self.device.write_config(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    # --- persistence -------------------------------------------------------------------------------
    @classmethod
    def state_type(cls) -> type[TransportState]:
        from virtkit.devices.virtio.persist import TransportState

        return TransportState

    def save(self) -> TransportState:
        """Registers, queue configuration and the device's own state (``device``)."""
        from virtkit.devices.virtio.persist import QueueRegsState

        with self.lock:
            return self.state_type()(
                status=self.status,
                device_features_sel=self.device_features_sel,
                driver_features_sel=self.driver_features_sel,
                driver_features=self.driver_features,
                unknown_features_written=self.unknown_features_written,
                queue_sel=self.queue_sel,
                shm_sel=self.shm_sel,
                interrupt_status=self.interrupt_status,
                config_generation=self.config_generation,
                needs_reset_reason=self.needs_reset_reason,
                queues=tuple(
                    QueueRegsState(num=q.num, desc=q.desc, driver=q.driver, device=q.device, ready=q.ready)
                    for q in self.queue_regs
                ),
                device=self.device.save(),
            )

    def restore(self, state: object) -> None:
        """Load what :meth:`save` produced, into a transport built with the same device
        configuration. Guest memory must be restored first. The interrupt level is re-driven from
        InterruptStatus; no new edge is sent (the irqchip's own state carries pending interrupts).
        DeviceError, with nothing changed, if the record does not fit this transport."""
        if not isinstance(state, self.state_type()):
            raise DeviceError("virtio-mmio state is not a TransportState")
        if len(state.queues) != len(self.queue_regs):
            raise DeviceError(
                f"saved virtio-mmio state has {len(state.queues)} queues, the device {len(self.queue_regs)}"
            )
        for index, q in enumerate(state.queues):
            if q.num > self.device.queue_max_sizes[index]:
                raise DeviceError(
                    f"saved virtio-mmio queue {index} has {q.num} entries, more than the "
                    f"{self.device.queue_max_sizes[index]} the device offers"
                )
        with self.lock:
            self.device.restore(state.device)  # raises before anything here changes
            self.status, self.device_features_sel = state.status, state.device_features_sel
            self.driver_features_sel, self.driver_features = state.driver_features_sel, state.driver_features
            self.unknown_features_written = state.unknown_features_written
            self.queue_sel, self.shm_sel = state.queue_sel, state.shm_sel
            self.interrupt_status, self.config_generation = state.interrupt_status, state.config_generation
            self.needs_reset_reason = state.needs_reset_reason
            self.queue_regs = [
                _QueueRegs(num=q.num, desc=q.desc, driver=q.driver, device=q.device, ready=q.ready)
                for q in state.queues
            ]
            self.interrupt.set_level(bool(self.interrupt_status))

    def replay_notifications(self) -> None:
        """After a restore: serve every queue once (see :class:`~virtkit.devices.contract.QueueReplay`)."""
        for index in range(self.device.num_queues):
            self.notify(index)
