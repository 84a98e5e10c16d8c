"""One vCPU: its thread, the KVM_RUN loop, and exit decoding.

The loop is the hot path of the whole VMM: every port or MMIO access of the guest passes through
it. It reads the shared ``kvm_run`` page with precompiled ``struct`` unpackers, counts the exit,
dispatches to the bus and goes straight back into the guest. Everything rarer (shutdown, internal
errors, halts) leaves the loop for :meth:`Vcpu._slow_exit`.

``fcntl.ioctl`` releases the GIL while KVM_RUN executes guest code, so vCPUs of one VM, and VMs
of one process, run in parallel.

Stopping a vCPU from another thread: set ``kvm_run.immediate_exit`` (so a vCPU about to enter
the guest returns at once) and send it :data:`KICK_SIGNAL` (so one already inside returns with
EINTR). KVM documents this pairing under KVM_CAP_IMMEDIATE_EXIT.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import signal
import threading
import time

from virtkit.arch.x86 import RFLAGS_IF
from virtkit.cpl0 import Completer  # not lazily: a confined VMM can import nothing new
from virtkit.devices.bus import UnknownAccess
from virtkit.errors import KvmError
from virtkit.kvm import exits as exits_layout
from virtkit.kvm.constants import (
    KVM_EXIT_IO_OUT,
    KVM_RUN,
    ExitReason,
    InternalError,
    MpState,
    SystemEvent,
)
from virtkit.kvm.ioctl import VcpuFd
from virtkit.kvm.structs import KVM_RUN_EXIT_UNION_OFFSET, KVM_RUN_IMMEDIATE_EXIT_OFFSET
from virtkit.stop import Stop, StopReason

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtkit.devices.bus import IoBus, MmioBus
    from virtkit.memory import GuestMemory

#: real-time signal used to pull a vCPU thread out of KVM_RUN
KICK_SIGNAL = signal.SIGRTMIN + 1
_kick_installed = False
_kick_lock = threading.Lock()


def install_kick_handler() -> None:
    """Give KICK_SIGNAL a (no-op) handler so it interrupts KVM_RUN instead of killing us.

    Python lets only the main thread install handlers. It is done when this module is first
    imported from the main thread (the usual case), so machines can then be built in any thread;
    otherwise the first Machine must be built in the main thread."""
    global _kick_installed
    with _kick_lock:
        if _kick_installed:
            return
        if threading.current_thread() is not threading.main_thread():
            raise KvmError(
                "create the first virtkit machine from the main thread (virtkit installs a "
                "signal handler there to stop vCPUs)"
            )
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        _kick_installed = True


if threading.current_thread() is threading.main_thread():
    install_kick_handler()


#: distinct MMIO addresses counted one by one; beyond this they are counted under address -1
MAX_DISTINCT_MMIO = 1024
_NREASONS = 64


class VcpuStats:
    """What one vCPU saw. Times are nanoseconds: inside KVM_RUN (guest + in-kernel handling)
    versus in the VMM's own Python code handling exits."""

    __slots__ = ("exits", "pio", "mmio", "interrupted", "guest_ns", "vmm_ns", "completed")

    def __init__(self) -> None:
        self.exits = [0] * _NREASONS  # by exit reason
        self.pio: dict[tuple[int, bool], int] = {}  # (port, is_write) -> count
        self.mmio: dict[tuple[int, bool], int] = {}  # (address, is_write) -> count
        self.interrupted = 0  # KVM_RUN returns with EINTR (kicks)
        self.guest_ns = 0
        self.vmm_ns = 0
        self.completed: dict[str, int] = {}  # CPL0 instructions the VMM completed (virtkit.cpl0), by kind


class VcpuHost(abc.ABC):
    """What a vCPU needs from the machine it belongs to (:class:`virtkit.vm.Machine`): the buses
    its exits go to, guest memory for crash reports, and the calls that stop, pause and watch it.
    A vCPU knows its machine only through this, so the machine module sits above this one."""

    io_bus: IoBus
    mmio_bus: MmioBus
    memory: GuestMemory
    #: set once the machine is ending / while vCPUs must park outside KVM_RUN
    stopping: bool
    paused: bool
    #: the watchdog's current round (see :meth:`Vcpu.request_inspection`)
    watchdog_round: int

    @abc.abstractmethod
    def request_stop(self, stop: Stop) -> None:
        """End the machine for ``stop``'s reason (the first request wins); any thread."""

    @abc.abstractmethod
    def park(self, vcpu: Vcpu) -> None:
        """Called by a vCPU thread that saw ``paused``: returns when resumed or stopping."""

    @abc.abstractmethod
    def vcpu_exited(self, vcpu: Vcpu) -> None:
        """Called by a vCPU thread as it ends."""

    @abc.abstractmethod
    def check_all_idle(self) -> None:
        """A vCPU found itself asleep for good in this watchdog round: stop if all are."""


class Vcpu:
    def __init__(self, machine: VcpuHost, fd: VcpuFd) -> None:
        self.machine = machine
        self.fd = fd
        self.id = fd.vcpu_id
        self.stats = VcpuStats()
        self.thread: threading.Thread | None = None
        self.inspect_requested = False
        #: watchdog round in which an inspection last found this vCPU asleep for good (halted with
        #: interrupts off, or an AP nobody started); compared with the current round, so stale
        #: findings never count
        self.idle_round = -1
        self.completer: Completer | None = None  # created at the first emulation failure

    # --- control from other threads --------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.id}", daemon=True)
        self.thread.start()

    def kick(self) -> None:
        """Make KVM_RUN return in this vCPU's thread soon (see the module docstring)."""
        self.fd.run_page[KVM_RUN_IMMEDIATE_EXIT_OFFSET] = 1
        t = self.thread
        if t is not None and t.ident is not None and t.is_alive() and t is not threading.current_thread():
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(t.ident, KICK_SIGNAL)

    def request_inspection(self) -> None:
        """Ask the vCPU to check whether it is halted for good (the watchdog calls this when a
        vCPU has made no exit for a while: with an in-kernel irqchip, HLT never leaves KVM)."""
        self.inspect_requested = True
        self.kick()

    # --- the loop --------------------------------------------------------------------------------
    def _thread_main(self) -> None:
        m = self.machine
        try:
            self._loop()
        except BaseException as e:  # the VMM must report, never die silently in a thread
            m.request_stop(Stop(StopReason.ERROR, detail=f"vCPU {self.id}: {type(e).__name__}: {e}"))
        finally:
            m.vcpu_exited(self)

    def _loop(self) -> None:
        m = self.machine
        fd = self.fd.fd
        page = self.fd.run_page
        ioctl = fcntl.ioctl
        clock = time.perf_counter_ns
        reason_of = exits_layout.EXIT_REASON.unpack_from
        io_of = exits_layout.IO.unpack_from
        mmio_of = exits_layout.MMIO.unpack_from
        mmio_data = exits_layout.MMIO_DATA_OFFSET
        pio_read, pio_write = m.io_bus.read, m.io_bus.write
        pio_read_string, pio_write_string = m.io_bus.read_string, m.io_bus.write_string
        mmio_read, mmio_write = m.mmio_bus.read, m.mmio_bus.write
        st = self.stats
        exits, pio_counts, mmio_counts = st.exits, st.pio, st.mmio
        EXIT_IO, EXIT_MMIO = int(ExitReason.IO), int(ExitReason.MMIO)
        union = KVM_RUN_EXIT_UNION_OFFSET
        while not m.stopping:
            t0 = clock()
            try:
                ioctl(fd, KVM_RUN, 0)
            except InterruptedError:
                st.guest_ns += clock() - t0
                st.interrupted += 1
                page[KVM_RUN_IMMEDIATE_EXIT_OFFSET] = 0
                if self.inspect_requested and not m.stopping:
                    self.inspect_requested = False
                    self._inspect_halt()
                if m.paused:
                    m.park(self)
                continue
            except BlockingIOError:
                # EAGAIN: an AP left KVM_MP_STATE_UNINITIALIZED (INIT/SIPI arrived) without
                # running guest code yet; KVM expects KVM_RUN to be called again
                st.guest_ns += clock() - t0
                continue
            t1 = clock()
            st.guest_ns += t1 - t0
            reason = reason_of(page, exits_layout.EXIT_REASON_OFFSET)[0]
            try:
                if reason == EXIT_IO:
                    exits[EXIT_IO] += 1
                    direction, size, port, count, off = io_of(page, union)
                    is_write = direction == KVM_EXIT_IO_OUT
                    key = (port, is_write)
                    pio_counts[key] = pio_counts.get(key, 0) + count
                    if count == 1:
                        if is_write:
                            pio_write(port, size, int.from_bytes(page[off : off + size], "little"))
                        else:
                            page[off : off + size] = pio_read(port, size).to_bytes(size, "little")
                    else:  # rep ins/outs: KVM batches up to a page of elements in one exit
                        end = off + count * size
                        if end > len(page):
                            raise KvmError(
                                f"KVM reported string I/O of {count} x {size} bytes, more than the kvm_run page holds"
                            )
                        if is_write:
                            pio_write_string(port, size, page[off:end])
                        else:
                            page[off:end] = pio_read_string(port, size, count)
                elif reason == EXIT_MMIO:
                    exits[EXIT_MMIO] += 1
                    addr, data, length, is_write = mmio_of(page, union)
                    key = (addr, bool(is_write))
                    if key in mmio_counts or len(mmio_counts) < MAX_DISTINCT_MMIO:
                        mmio_counts[key] = mmio_counts.get(key, 0) + 1
                    else:
                        mmio_counts[(-1, key[1])] = mmio_counts.get((-1, key[1]), 0) + 1
                    if length > 8:
                        length = 8  # kvm_run.mmio.data is 8 bytes; never trust a larger len
                    if is_write:
                        mmio_write(addr, length, int.from_bytes(data[:length], "little"))
                    else:
                        value = mmio_read(addr, length)
                        page[mmio_data : mmio_data + length] = value.to_bytes(length, "little")
                else:
                    if reason < _NREASONS:
                        exits[reason] += 1
                    if not self._slow_exit(reason):
                        break
            except UnknownAccess as e:
                m.request_stop(Stop(StopReason.UNKNOWN_ACCESS, vcpu=self.id, detail=f"{e} (--strict)"))
                break
            st.vmm_ns += clock() - t1  # kept live: the service reads it while the VM runs

    # --- rare exits ------------------------------------------------------------------------------
    def _slow_exit(self, reason: int) -> bool:
        """Handle an exit other than I/O; False ends this vCPU's loop."""
        from virtkit.diagnose import crash_report  # only crashes need capstone and the report

        m = self.machine
        page = self.fd.run_page
        u = KVM_RUN_EXIT_UNION_OFFSET
        if reason == ExitReason.HLT:
            # only without an in-kernel irqchip: nothing could ever wake the vCPU again
            regs = self.fd.get_regs()
            state = "interrupts disabled" if not regs.rflags & RFLAGS_IF else "no interrupt source"
            m.request_stop(Stop(StopReason.HALTED, vcpu=self.id, detail=f"vCPU {self.id} halted ({state})"))
            return False
        if reason == ExitReason.SHUTDOWN:
            report = crash_report("triple fault (KVM_EXIT_SHUTDOWN)", self.fd, m.memory)
            m.request_stop(Stop(StopReason.TRIPLE_FAULT, vcpu=self.id, detail=report))
            return False
        if reason == ExitReason.INTERNAL_ERROR:
            suberror, ndata, flags = exits_layout.INTERNAL.unpack_from(page, u)
            insn = None
            if (
                suberror == InternalError.EMULATION
                and ndata >= 2
                and flags & exits_layout.INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
            ):
                size = min(page[u + 16], 15)
                insn = bytes(page[u + 17 : u + 17 + size])
            not_done = ""
            if suberror == InternalError.EMULATION:
                # an instruction KVM's emulator rejects (PVM runs CPL0 emulated): complete it here
                # when its effect can be performed exactly (virtkit/cpl0.py)
                if self.completer is None:
                    self.completer = Completer(self.fd, m.memory)
                outcome = self.completer.complete(insn)
                if outcome.kind is not None:
                    done = self.stats.completed
                    done[outcome.kind] = done.get(outcome.kind, 0) + 1
                    return True
                not_done = f"\n  not completed by the VMM: {outcome.reason}"
            try:
                what = InternalError(suberror).name.lower().replace("_", " ")
            except ValueError:
                what = f"suberror {suberror}"
            report = crash_report(f"KVM internal error ({what})", self.fd, m.memory, insn) + not_done
            m.request_stop(Stop(StopReason.INTERNAL_ERROR, vcpu=self.id, detail=report))
            return False
        if reason == ExitReason.FAIL_ENTRY:
            hw_reason = exits_layout.FAIL_ENTRY.unpack_from(page, u)[0]
            report = crash_report(f"VM entry failed (hardware reason {hw_reason:#x})", self.fd, m.memory)
            m.request_stop(Stop(StopReason.FAIL_ENTRY, vcpu=self.id, detail=report))
            return False
        if reason == ExitReason.SYSTEM_EVENT:
            kind = exits_layout.SYSTEM_EVENT.unpack_from(page, u)[0]
            if kind == SystemEvent.RESET:
                m.request_stop(Stop(StopReason.RESET, vcpu=self.id, detail="guest requested a reset"))
            elif kind == SystemEvent.SHUTDOWN:
                m.request_stop(Stop(StopReason.POWER_OFF, vcpu=self.id, detail="guest powered off"))
            else:
                report = crash_report(f"guest system event {kind}", self.fd, m.memory)
                m.request_stop(Stop(StopReason.ERROR, vcpu=self.id, detail=report))
            return False
        if reason in (ExitReason.IRQ_WINDOW_OPEN, ExitReason.INTR):
            return True
        try:
            name = ExitReason(reason).name
        except ValueError:
            name = str(reason)
        report = crash_report(f"unexpected VM exit {name}", self.fd, m.memory)
        m.request_stop(Stop(StopReason.ERROR, vcpu=self.id, detail=report))
        return False

    def _inspect_halt(self) -> None:
        mp = self.fd.get_mp_state()
        if mp == MpState.HALTED:
            idle = not self.fd.get_regs().rflags & RFLAGS_IF
        else:
            idle = mp == MpState.UNINITIALIZED  # an AP no one started
        if idle:
            self.idle_round = self.machine.watchdog_round
            self.machine.check_all_idle()
