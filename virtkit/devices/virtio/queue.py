"""Split virtqueue, device side (virtio 1.2 §2.7), independent of any device type or transport.

A :class:`VirtQueue` is built from what the driver wrote into the transport registers (size and the
guest-physical addresses of the descriptor table, available ring and used ring) and reads and
writes those rings through :class:`~virtkit.memory.GuestMemory` only. The device pops descriptor
chains (:meth:`VirtQueue.pop_chain`), does its work on the chain's buffers and hands the head back
(:meth:`VirtQueue.push_used`); :meth:`VirtQueue.needs_interrupt` then says whether the driver
asked to be interrupted (§2.7.7).

The driver is hostile by assumption. Everything read from the rings is checked before use, and
every problem falls into one of three classes, each with its own exception:

``QueueConfigError``
    the queue as configured cannot be used: size not a power of two or above the maximum, a ring
    misaligned (§2.7 alignment table) or not entirely in guest RAM. Raised by the constructor; the
    transport marks the device DEVICE_NEEDS_RESET (§2.1.2).
``RingCorruptError``
    the ring contents break a rule the device needs to walk them safely: avail ``idx`` more than
    Queue Size ahead, a head or ``next`` index out of the table, a chain longer than Queue Size
    (which is how a loop shows up), an indirect table that is nested, combined with NEXT, not a
    whole number of descriptors, longer than Queue Size or outside RAM (§2.7.5.3.1).
    The queue stops for good (``broken``) until the device is reset; the device reports
    DEVICE_NEEDS_RESET. Other queues are unaffected.
``ChainError``
    one request's *buffers* are unusable but the ring itself is intact: a buffer outside guest
    RAM, ``addr + len`` past 2^64, more than 2^32 bytes in total (§2.7.5.2) or more than the device
    takes in one request (``max_chain_bytes``, see below), a device-readable
    buffer after a device-writable one (§2.7.4.2), or a device asking for more bytes than the
    chain has in the direction it needs. :meth:`pop_chain` still returns such a chain, with
    ``fault`` set, so the device can fail that one request (write an error status if the status
    byte is valid, hand the head back) and go on with the next.

Work is bounded by construction: walking a chain visits at most Queue Size buffer descriptors
plus one indirect switch, descriptors are read 16 bytes at a time (no table-sized allocation), and
the chain helpers hand out zero-copy views of guest RAM or copy at most what the caller limits.
What one request may *move* is bounded too: each device says how many bytes its requests may
describe in all (``max_chain_bytes``); a chain above that is a faulted request. Without it, 63
descriptors each covering all of a 64 MiB guest made one console request stream 4 GiB to the
host: the buffers may overlap, so the guest's RAM size bounds nothing.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator, Sequence
from typing import Final

from virtkit.devices.virtio import spec
from virtkit.errors import VirtkitError
from virtkit.memory import GuestMemory, GuestMemoryError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtkit.devices.virtio.persist import QueueState

_DESC = struct.Struct("<QIHH")  # struct virtq_desc (§2.7.5)
_U64_LIMIT: Final = 1 << 64


class VirtQueueError(VirtkitError):
    """Base of the errors a hostile or buggy driver causes on a virtqueue. Handled inside the
    virtio layer; never meant to reach the VMM."""

    exit_status = 1


class QueueConfigError(VirtQueueError):
    """The queue registers describe a queue that cannot be used (§2.7 size and alignment)."""


class RingCorruptError(VirtQueueError):
    """The rings break a rule the device relies on to walk them: the queue stops until reset."""


class ChainError(VirtQueueError):
    """One descriptor chain's buffers cannot be used as asked: that request fails, the queue goes on."""


# On x86 (TSO) loads are not reordered with loads nor stores with stores, so reading avail.idx
# before the ring, and writing a used element before used.idx (§2.7.8.2), need no fence. A store
# followed by a load of another location *can* be reordered: publishing avail_event and then
# re-reading avail.idx (§2.7.10), or used.idx and then used_event (§2.7.7), needs a full barrier.
# CPython has no fence primitive; acquiring a lock is a LOCK-prefixed read-modify-write, which
# orders all earlier stores before all later loads on x86 (Intel SDM vol. 3A, "Memory Ordering in
# P6 and More Recent Processor Families").
_fence_lock = threading.Lock()


def _full_barrier() -> None:
    with _fence_lock:
        pass


Buffer = tuple[int, int]
"""One guest buffer: (guest-physical address, length in bytes)."""


def _views(memory: GuestMemory, buffers: Sequence[Buffer], offset: int, length: int) -> list[memoryview]:
    """Zero-copy views of bytes ``offset``..``offset+length`` of the concatenation of ``buffers``."""
    views: list[memoryview] = []
    for gpa, size in buffers:
        if length == 0:
            break
        if offset >= size:
            offset -= size
            continue
        take = min(size - offset, length)
        views.append(memory.view(gpa + offset, take))
        length -= take
        offset = 0
    if length:
        raise ChainError("the descriptor chain is shorter than the request needs")
    return views


class DescriptorChain:
    """One request taken off the available ring: its head index and its buffers, split by direction.

    ``readable`` are the device-readable buffers, ``writable`` the device-writable ones, each a list
    of (gpa, len) in chain order. Zero-length descriptors are dropped. When ``fault`` is set the
    chain is structurally sound but its buffers must not be used; only :meth:`write_status` still
    works (if the status byte itself lies in guest RAM).
    """

    __slots__ = ("memory", "head", "readable", "writable", "fault")

    def __init__(
        self, memory: GuestMemory, head: int, readable: list[Buffer], writable: list[Buffer], fault: str | None = None
    ) -> None:
        self.memory = memory
        self.head = head
        self.readable = readable
        self.writable = writable
        self.fault = fault

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, readable={self.readable}, writable={self.writable}, "
            f"fault={self.fault!r})"
        )

    @property
    def readable_len(self) -> int:
        return sum(size for _, size in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(size for _, size in self.writable)

    def _usable(self) -> None:
        if self.fault is not None:
            raise ChainError(self.fault)

    # --- device-readable part ------------------------------------------------------------------
    def readable_views(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Zero-copy views of the readable part (all of it from ``offset`` unless ``length``)."""
        self._usable()
        if length is None:
            length = max(0, self.readable_len - offset)
        return _views(self.memory, self.readable, offset, length)

    def read(self, length: int, offset: int = 0) -> bytes:
        """Exactly ``length`` bytes of the readable part, from ``offset``. ChainError if shorter."""
        return b"".join(bytes(v) for v in self.readable_views(offset, length))

    def read_all(self, limit: int) -> bytes:
        """The whole readable part as bytes; ChainError if it is larger than ``limit`` (so a hostile
        chain cannot make the device allocate more than the caller allows)."""
        self._usable()
        total = self.readable_len
        if total > limit:
            raise ChainError(f"the readable part is {total} bytes, more than the {limit} allowed")
        return self.read(total)

    def iter_readable(self, chunk: int) -> Iterator[bytes]:
        """The readable part in copies of at most ``chunk`` bytes, for streaming to a host sink."""
        for view in self.readable_views():
            for start in range(0, len(view), chunk):
                yield bytes(view[start : start + chunk])

    # --- device-writable part ------------------------------------------------------------------
    def writable_views(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Zero-copy views of the writable part (all of it from ``offset`` unless ``length``)."""
        self._usable()
        if length is None:
            length = max(0, self.writable_len - offset)
        return _views(self.memory, self.writable, offset, length)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Copy ``data`` into the writable part at ``offset``; ChainError if it does not fit.
        Nothing is ever written into a device-readable buffer (§2.7.5.1)."""
        pos = 0
        for view in self.writable_views(offset, len(data)):
            view[:] = data[pos : pos + len(view)]
            pos += len(view)
        return pos

    def write_status(self, value: int) -> bool:
        """Store ``value`` in the last byte of the writable part, the status byte of most device
        protocols (blk §5.2.6). Works on a faulted chain too, but only if that last buffer really
        is writable guest RAM; returns whether the byte was written."""
        if not self.writable:
            return False
        gpa, size = self.writable[-1]
        if gpa + size > _U64_LIMIT or not self.memory.contains(gpa + size - 1, 1):
            return False
        self.memory.write(gpa + size - 1, bytes((value & 0xFF,)))
        return True


def _check_config(
    memory: GuestMemory, size: int, max_size: int, desc_table: int, avail_ring: int, used_ring: int
) -> None:
    if not 0 < size <= min(max_size, spec.MAX_QUEUE_SIZE) or size & (size - 1):
        raise QueueConfigError(
            f"queue size {size} is not a power of two between 1 and {min(max_size, spec.MAX_QUEUE_SIZE)} (§2.7)"
        )
    parts = (
        ("descriptor table", desc_table, spec.DESC_TABLE_ALIGN, spec.desc_table_size(size)),
        ("available ring", avail_ring, spec.AVAIL_RING_ALIGN, spec.avail_ring_size(size)),
        ("used ring", used_ring, spec.USED_RING_ALIGN, spec.used_ring_size(size)),
    )
    for name, gpa, align, length in parts:
        if gpa % align:
            raise QueueConfigError(f"{name} at {gpa:#x} is not {align}-byte aligned (§2.7)")
        if not memory.contains(gpa, length):
            raise QueueConfigError(f"{name} {gpa:#x}+{length:#x} is not inside guest RAM")


class VirtQueue:
    """The device's side of one split virtqueue (§2.7)."""

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc_table: int,
        avail_ring: int,
        used_ring: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        max_size: int = spec.MAX_QUEUE_SIZE,
        max_chain_bytes: int = spec.MAX_CHAIN_BYTES,
    ) -> None:
        """Validate the configuration (QueueConfigError) and start with both indices at 0.

        ``event_idx`` and ``indirect`` are whether VIRTIO_F_EVENT_IDX and VIRTIO_F_INDIRECT_DESC
        were negotiated; ``max_size`` is the QueueNumMax the device offered; ``max_chain_bytes``
        the most bytes one chain may describe (readable and writable together) before it is
        returned as a faulted request."""
        _check_config(memory, size, max_size, desc_table, avail_ring, used_ring)
        if not 0 < max_chain_bytes <= spec.MAX_CHAIN_BYTES:
            raise QueueConfigError(f"a request bound of {max_chain_bytes} bytes is not between 1 and 2^32")
        self.max_chain_bytes = max_chain_bytes
        self.memory = memory
        self.size = size
        self.max_size = max_size
        self.desc_table = desc_table
        self.avail_ring = avail_ring
        self.used_ring = used_ring
        self.event_idx = event_idx
        self.indirect = indirect
        #: free-running 16-bit index of the next available ring entry to take (§2.7.6)
        self.next_avail = 0
        #: free-running 16-bit used.idx: where the next used element goes (§2.7.8)
        self.next_used = 0
        #: used.idx when needs_interrupt() last ran, the "old" of the event-index test (§2.7.7)
        self.last_signalled = 0
        #: chains pushed since needs_interrupt() last ran (a wrap of 2^16 forces an interrupt)
        self.unsignalled = 0
        #: why the queue stopped, if it did; it stays stopped until the device is reset
        self.broken: str | None = None

    # --- ring field addresses (§2.7.6, §2.7.8) ----------------------------------------------------
    @property
    def _avail_idx_addr(self) -> int:
        return self.avail_ring + 2

    @property
    def _used_event_addr(self) -> int:
        return self.avail_ring + 4 + 2 * self.size

    @property
    def _avail_event_addr(self) -> int:
        return self.used_ring + 4 + spec.USED_ELEM_SIZE * self.size

    def _corrupt(self, reason: str) -> RingCorruptError:
        self.broken = reason
        return RingCorruptError(reason)

    # --- taking requests ---------------------------------------------------------------------------
    def pending(self) -> int:
        """How many chains the driver has made available that the device has not taken yet."""
        if self.broken is not None:
            return 0
        return (self.memory.read_u16(self._avail_idx_addr) - self.next_avail) & 0xFFFF

    def pop_chain(self) -> DescriptorChain | None:
        """The next available descriptor chain, or None when there is none (or the queue is broken).

        Raises RingCorruptError (and stops the queue) when the ring cannot be walked safely. A chain
        whose buffers are bad is returned with ``fault`` set; it has been taken off the ring and
        must be given back with push_used like any other."""
        if self.broken is not None:
            return None
        try:
            pending = self.pending()
            if pending == 0:
                return None
            # The driver can only have Queue Size chains outstanding: anything else means avail.idx
            # was scribbled on (or moved backwards, §2.7.6.1), and the entries are not to be trusted.
            if pending > self.size:
                raise self._corrupt(
                    f"avail idx is {pending} entries ahead of the device, more than the queue size {self.size} (§2.7.6)"
                )
            slot = self.next_avail % self.size
            head = self.memory.read_u16(self.avail_ring + 4 + 2 * slot)
            chain = self._walk(head)
        except GuestMemoryError as e:
            # The rings were checked to be in RAM when the queue was configured; this is defensive.
            raise self._corrupt(f"ring access failed: {e}") from None
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return chain

    def _walk(self, head: int) -> DescriptorChain:
        """Follow a chain from ``head``, validating every descriptor (§2.7.5, §2.7.5.3)."""
        if head >= self.size:
            raise self._corrupt(f"available ring names descriptor {head}, outside a table of {self.size}")
        readable: list[Buffer] = []
        writable: list[Buffer] = []
        fault: str | None = None
        total = 0
        table, table_len, index = self.desc_table, self.size, head
        in_indirect = False
        # A chain holds at most Queue Size descriptors (§2.7.5.3.1); that bound is also what turns a
        # `next` loop into an error instead of an endless walk.
        budget = self.size
        while True:
            addr, length, flags, nxt = _DESC.unpack(self.memory.read(table + spec.DESC_SIZE * index, spec.DESC_SIZE))
            if flags & spec.DescFlag.INDIRECT:
                table, table_len = self._enter_indirect(addr, length, flags, in_indirect)
                index, in_indirect = 0, True
                continue
            if budget == 0:
                raise self._corrupt(
                    f"descriptor chain from head {head} is longer than the queue size "
                    f"{self.size} (a loop?) (§2.7.5.3.1)"
                )
            budget -= 1
            if length:
                problem = None
                if addr + length > _U64_LIMIT:
                    problem = f"buffer {addr:#x}+{length:#x} wraps past 2^64"
                elif not self.memory.contains(addr, length):
                    problem = f"buffer {addr:#x}+{length:#x} is outside guest RAM"
                elif not flags & spec.DescFlag.WRITE and writable:
                    problem = "a device-readable buffer follows a device-writable one (§2.7.4.2)"
                total += length
                if problem is None and total > self.max_chain_bytes:
                    problem = (
                        f"the chain describes more than {self.max_chain_bytes} bytes, the most this "
                        "device takes in one request"
                        if self.max_chain_bytes < spec.MAX_CHAIN_BYTES
                        else "the chain describes more than 2^32 bytes (§2.7.5.2)"
                    )
                if problem is not None and fault is None:
                    fault = problem
                (writable if flags & spec.DescFlag.WRITE else readable).append((addr, length))
            if not flags & spec.DescFlag.NEXT:
                return DescriptorChain(self.memory, head, readable, writable, fault)
            if nxt >= table_len:
                raise self._corrupt(f"descriptor next={nxt} is outside a table of {table_len}")
            index = nxt

    def _enter_indirect(self, addr: int, length: int, flags: int, in_indirect: bool) -> tuple[int, int]:
        """Check a descriptor pointing at an indirect table (§2.7.5.3.1) and return (gpa, entries).
        Its WRITE flag is ignored, as §2.7.5.3.2 requires."""
        if not self.indirect:
            raise self._corrupt("indirect descriptor used without VIRTIO_F_INDIRECT_DESC negotiated")
        if in_indirect:
            raise self._corrupt("indirect descriptor inside an indirect table (§2.7.5.3.1)")
        if flags & spec.DescFlag.NEXT:
            raise self._corrupt("indirect descriptor with NEXT set (§2.7.5.3.1)")
        # only the length must be whole descriptors: unlike the ring's own table (§2.7, alignment),
        # an indirect table has no alignment rule, and Linux's kmalloc'd tables are 8-byte aligned
        if length == 0 or length % spec.DESC_SIZE:
            raise self._corrupt(f"indirect table {addr:#x}+{length:#x} is not a whole number of descriptors")
        entries = length // spec.DESC_SIZE
        if entries > self.size:
            raise self._corrupt(
                f"indirect table of {entries} descriptors is longer than the queue size {self.size} (§2.7.5.3.1)"
            )
        if addr + length > _U64_LIMIT or not self.memory.contains(addr, length):
            raise self._corrupt(f"indirect table {addr:#x}+{length:#x} is outside guest RAM")
        return addr, entries

    # --- returning requests ------------------------------------------------------------------------
    def push_used(self, head: int, written: int) -> None:
        """Put ``head`` on the used ring with ``written`` bytes written into its writable part.

        The element is stored before used.idx moves (§2.7.8.2)."""
        if not 0 <= head < self.size or not 0 <= written < 1 << 32:
            raise ValueError(f"push_used({head}, {written}) out of range")
        elem = self.used_ring + 4 + spec.USED_ELEM_SIZE * (self.next_used % self.size)
        self.memory.write_u32(elem, head)
        self.memory.write_u32(elem + 4, written)
        self.next_used = (self.next_used + 1) & 0xFFFF
        self.memory.write_u16(self.used_ring + 2, self.next_used)
        self.unsignalled += 1

    def needs_interrupt(self) -> bool:
        """Whether the driver wants a used buffer notification for what was pushed since the last call.

        Without VIRTIO_F_EVENT_IDX: unless avail.flags has VIRTQ_AVAIL_F_NO_INTERRUPT. With it:
        when used.idx went past used_event since the last call, i.e. the element at index
        used_event was written (§2.7.7.2)."""
        if self.unsignalled == 0:
            return False
        old, new = self.last_signalled, self.next_used
        wrapped = self.unsignalled >= 1 << 16
        self.last_signalled, self.unsignalled = new, 0
        _full_barrier()  # used.idx is published before used_event / avail.flags is read
        if wrapped:
            return True
        if self.event_idx:
            event = self.memory.read_u16(self._used_event_addr)
            return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not self.memory.read_u16(self.avail_ring) & spec.VIRTQ_AVAIL_F_NO_INTERRUPT

    # --- available buffer notification suppression (§2.7.10) -------------------------------------
    def disable_notifications(self) -> None:
        """Ask the driver not to notify while the device is draining the queue.

        With EVENT_IDX nothing is written: avail_event stays behind next_avail, and the driver only
        notifies when avail.idx crosses it."""
        if not self.event_idx and self.broken is None:
            self.memory.write_u16(self.used_ring, spec.VIRTQ_USED_F_NO_NOTIFY)

    def enable_notifications(self) -> bool:
        """Ask to be notified of the next available buffer; returns True if buffers arrived in the
        meantime (the caller then drains again instead of waiting for a notification that the
        driver may have decided not to send)."""
        if self.broken is not None:
            return False
        if self.event_idx:
            self.memory.write_u16(self._avail_event_addr, self.next_avail)
        else:
            self.memory.write_u16(self.used_ring, 0)
        _full_barrier()  # the request to notify is visible before avail.idx is read again
        return self.pending() != 0

    # --- persistence --------------------------------------------------------------------------------
    def save(self) -> QueueState:
        from virtkit.devices.virtio.persist import QueueState

        return QueueState(
            size=self.size,
            max_size=self.max_size,
            desc_table=self.desc_table,
            avail_ring=self.avail_ring,
            used_ring=self.used_ring,
            event_idx=self.event_idx,
            indirect=self.indirect,
            next_avail=self.next_avail,
            next_used=self.next_used,
            last_signalled=self.last_signalled,
            unsignalled=self.unsignalled,
            broken=self.broken,
        )

    @classmethod
    def from_state(
        cls, memory: GuestMemory, state: QueueState, max_chain_bytes: int = spec.MAX_CHAIN_BYTES
    ) -> VirtQueue:
        """Rebuild a queue saved by :meth:`save` (guest memory must already hold the rings).
        QueueConfigError if the saved configuration is not valid for this memory (the same checks
        as when the driver enables a queue). The request bound is the device's, not the record's."""
        q = cls(
            memory,
            state.size,
            state.desc_table,
            state.avail_ring,
            state.used_ring,
            event_idx=state.event_idx,
            indirect=state.indirect,
            max_size=state.max_size,
            max_chain_bytes=max_chain_bytes,
        )
        q.next_avail, q.next_used, q.last_signalled = state.next_avail, state.next_used, state.last_signalled
        q.unsignalled = state.unsignalled
        q.broken = state.broken
        return q
