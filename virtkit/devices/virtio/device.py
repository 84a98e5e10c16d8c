"""What every virtio device has, whatever its type and whatever transport carries it.

A :class:`VirtioDevice` owns its feature bits, its virtqueues once the driver has enabled them,
its configuration space and its lock. A transport (today only virtio-mmio, ``mmio.py``) drives it
through a handful of calls made with ``device.lock`` held: :meth:`attach`, :meth:`set_queue`,
:meth:`activate` (DRIVER_OK, §3.1.1 step 8), :meth:`notify` (an available buffer notification,
§2.7.13.4), :meth:`reset` (§2.4), and reads and writes of the configuration space (§2.5). In the
other direction the device reports through the :class:`DeviceEvents` the transport gave it: a
used buffer notification for a queue, a configuration change, or an error that needs a reset.

``drain`` is the one queue-processing loop all devices share: it takes chains until the ring is
empty, re-arms available buffer notifications without losing a race with the driver (§2.7.10),
fails single requests whose buffers are bad (``ChainError``) and turns a corrupt ring
(``RingCorruptError``) into DEVICE_NEEDS_RESET, and finally asks the queue whether the driver wants
an interrupt (§2.7.7).
"""

from __future__ import annotations

import abc
import logging
import threading
from collections.abc import Callable, Sequence
from typing import ClassVar, Protocol

from virtkit.devices.virtio import spec
from virtkit.devices.virtio.queue import ChainError, DescriptorChain, QueueConfigError, RingCorruptError, VirtQueue
from virtkit.errors import DeviceError
from virtkit.memory import GuestMemory, GuestMemoryError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtkit.devices.virtio.persist import DeviceState, Specific

log = logging.getLogger(__name__)

#: offered by every virtkit device: modern interface, indirect tables and event indices (§6)
COMMON_FEATURES = spec.F_VERSION_1 | spec.F_INDIRECT_DESC | spec.F_EVENT_IDX


class DeviceEvents(Protocol):
    """What a transport provides to the device it carries."""

    def signal_used(self, queue: int) -> None:
        """Send a used buffer notification for ``queue`` (§2.3)."""

    def signal_config(self) -> None:
        """Send a configuration change notification and move the config generation (§2.5)."""

    def needs_reset(self, reason: str) -> None:
        """Set DEVICE_NEEDS_RESET (§2.1.2); ``reason`` is for the host's log."""

    def internal_error(self, error: BaseException) -> None:
        """A bug in virtkit (not a guest error) surfaced while serving the device."""


class _Detached:
    """Events sink of a device no transport carries yet: nothing to notify."""

    def signal_used(self, queue: int) -> None:
        pass

    def signal_config(self) -> None:
        pass

    def needs_reset(self, reason: str) -> None:
        log.warning("virtio device needs reset (not attached): %s", reason)

    def internal_error(self, error: BaseException) -> None:
        log.error("virtio device internal error (not attached): %r", error)


class VirtioDevice(abc.ABC):
    """Base of blk, console and rng. Subclasses set ``device_type``, call ``__init__`` with their
    queue sizes and device feature bits, and implement :meth:`process_queue`."""

    device_type: ClassVar[spec.DeviceType]
    #: the most bytes one request's buffers may describe, readable and writable together; a larger
    #: chain is a failed request. Every device sets what its protocol needs (queue.py explains why).
    max_request_bytes: int = 1 << 20

    def __init__(self, queue_sizes: Sequence[int], features: int = 0) -> None:
        for size in queue_sizes:
            if not 0 < size <= spec.MAX_QUEUE_SIZE or size & (size - 1):
                raise DeviceError(f"virtqueue size {size} is not a power of two between 1 and {spec.MAX_QUEUE_SIZE}")
        #: guards everything below; the transport takes it too, so vCPU threads (MMIO), I/O threads
        #: (ioeventfd) and host input threads never interleave inside one device
        self.lock = threading.RLock()
        self.queue_max_sizes: tuple[int, ...] = tuple(queue_sizes)
        self.offered_features = features | COMMON_FEATURES
        self.acked_features = 0
        self.queues: list[VirtQueue | None] = [None] * len(self.queue_max_sizes)
        #: DRIVER_OK was set: the device may consume buffers (§2.1.2)
        self.active = False
        self.memory: GuestMemory | None = None
        self.events: DeviceEvents = _Detached()
        #: requests failed because their buffers were unusable (guest error, the queue went on)
        self.failed_requests = 0
        self.last_failure: str | None = None

    @property
    def num_queues(self) -> int:
        return len(self.queue_max_sizes)

    def has_feature(self, feature: int) -> bool:
        return self.acked_features & feature == feature

    # --- called by the transport, with self.lock held ----------------------------------------------
    def attach(self, memory: GuestMemory, events: DeviceEvents) -> None:
        self.memory, self.events = memory, events

    def set_queue(self, index: int, queue: VirtQueue | None) -> None:
        """The driver enabled (or disabled, with None) queue ``index``."""
        self.queues[index] = queue

    def activate(self) -> None:
        """DRIVER_OK: start serving. Buffers the driver queued before (allowed by §3.1.1 step 7)
        are processed now, since their notification may have been sent too early to count."""
        self.active = True
        self.on_activate()
        for index in range(self.num_queues):
            self.notify(index)

    def reset(self) -> None:
        """Back to the state after power-on (§2.4): no queues, no features, not active."""
        self.active = False
        self.acked_features = 0
        self.queues = [None] * self.num_queues
        self.on_reset()

    def notify(self, index: int) -> None:
        """The driver has new buffers in queue ``index``. Ignored unless the device is active and
        the queue is enabled and not stopped (§2.1.2, §4.2.2.1: no ring access before QueueReady)."""
        if not self.active or not 0 <= index < self.num_queues:
            return
        queue = self.queues[index]
        if queue is None or queue.broken is not None:
            return
        self.process_queue(index, queue)

    # --- for subclasses -------------------------------------------------------------------------------
    @abc.abstractmethod
    def process_queue(self, index: int, queue: VirtQueue) -> None:
        """Serve what the driver made available on ``queue`` (usually by calling :meth:`drain`)."""

    def on_activate(self) -> None:  # noqa: B027 - optional hook
        """Hook run at DRIVER_OK, before the queues are first served."""

    def on_reset(self) -> None:  # noqa: B027 - optional hook
        """Hook run on reset, for device-specific state."""

    def config_space(self) -> bytes:
        """The current device configuration space (little-endian, §2.5)."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:  # noqa: B027 - optional hook
        """The driver wrote ``data`` at ``offset`` in the configuration space; ignored by default."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release host resources (files, ...)."""

    def drain(
        self,
        index: int,
        queue: VirtQueue,
        handle: Callable[[DescriptorChain], int],
        *,
        more: Callable[[], bool] | None = None,
    ) -> None:
        """Take chains off ``queue`` and give each to ``handle``, which returns the number of bytes it
        wrote into the chain's writable part. ``more`` (optional) says whether the device still has
        something to do (console input), so that buffers are not taken while there is no data."""
        pushed = False
        try:
            while True:
                queue.disable_notifications()
                while more is None or more():
                    chain = queue.pop_chain()
                    if chain is None:
                        break
                    queue.push_used(chain.head, self._serve(chain, handle))
                    pushed = True
                # Re-arm, then look again: the driver may have added buffers after our last look and
                # decided not to notify because notifications were off (§2.7.10).
                if not queue.enable_notifications() or (more is not None and not more()):
                    break
        except RingCorruptError as e:
            self.events.needs_reset(f"queue {index}: {e}")
        if pushed and queue.needs_interrupt():
            self.events.signal_used(index)

    def _serve(self, chain: DescriptorChain, handle: Callable[[DescriptorChain], int]) -> int:
        try:
            return handle(chain)
        except (ChainError, GuestMemoryError) as e:
            self.request_failed(str(e))
            return 0

    def request_failed(self, reason: str) -> None:
        """Count one request failed because of the guest's buffers (the queue goes on)."""
        self.failed_requests += 1
        self.last_failure = reason
        log.debug("%s: request failed: %s", self.device_type.name.lower(), reason)

    # --- persistence --------------------------------------------------------------------------------
    def save(self) -> DeviceState:
        """Negotiated features, activity, every enabled queue's addresses and indices, and the
        device type's own record (:meth:`save_device`)."""
        from virtkit.devices.virtio.persist import DeviceState

        with self.lock:
            return DeviceState(
                type=int(self.device_type),
                acked_features=self.acked_features,
                active=self.active,
                queues=tuple(q.save() if q is not None else None for q in self.queues),
                specific=self.save_device(),
            )

    def restore(self, state: DeviceState) -> None:
        """Load what :meth:`save` produced. Guest memory must already be restored and the device
        attached to its transport. Everything is checked before anything changes (DeviceError)."""
        name = self.device_type.name.lower()
        if state.type != int(self.device_type):
            raise DeviceError(f"saved state of device type {state.type} cannot be restored into a {name} device")
        if len(state.queues) != self.num_queues:
            raise DeviceError(f"saved {name} state has {len(state.queues)} queues, the device {self.num_queues}")
        if state.acked_features & ~self.offered_features:
            raise DeviceError(
                f"saved {name} state acknowledges features {state.acked_features:#x} the device "
                f"does not offer ({self.offered_features:#x})"
            )
        with self.lock:
            if self.memory is None:
                raise DeviceError("restore a virtio device only after attaching it to its transport")
            restored: list[VirtQueue | None] = []
            for index, qstate in enumerate(state.queues):
                if qstate is not None and qstate.max_size != self.queue_max_sizes[index]:
                    raise DeviceError(
                        f"saved {name} queue {index} was offered {qstate.max_size} entries, "
                        f"this device offers {self.queue_max_sizes[index]}"
                    )
                try:
                    restored.append(
                        None if qstate is None else VirtQueue.from_state(self.memory, qstate, self.max_request_bytes)
                    )
                except QueueConfigError as e:
                    raise DeviceError(f"saved {name} queue {index} is not usable: {e}") from None
            self.restore_device(state.specific)  # checks and raises before the queues change
            self.acked_features = state.acked_features
            self.active = state.active
            self.queues = restored

    @abc.abstractmethod
    def save_device(self) -> Specific:
        """The device type's own state record (virtkit.devices.virtio.persist)."""

    @abc.abstractmethod
    def restore_device(self, state: object) -> None:
        """Load a record :meth:`save_device` produced; DeviceError if it is not this type's, or
        does not fit this device."""
