"""Sandboxed processes: one vCPU and one host thread each, in one VM; the run loop (hot path).

Model (docs/SANDBOX.md, "Processes"): every sandboxed process owns a vCPU of the sandbox's VM
and a host thread that runs it. Its address space is its own page tables (CR3) over the VM's
shared pool of frames; fork copies the parent's pages into a new space and starts the child on
another vCPU (taken from a pool of idle ones, or created), so parent and child run in parallel
and a blocking call (a pipe read, wait4) blocks only its own thread. KVM_RUN releases the GIL.

The run loop: KVM_RUN; a port write to SYSCALL_PORT is a system call (RAX the number; RDI, RSI,
RDX, R10, R8, R9 the arguments; RCX the return address, R11 the saved RFLAGS), served through
the dispatch table; a write to FAULT_PORT_BASE+vector is an exception taken through the IDT.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time

from virtkit.kvm.constants import KVM_RUN, ExitReason
from virtkit.sandbox import cpu, signals
from virtkit.sandbox.paging import USER_TOP, Fault, OutOfMemory
from virtkit.sandbox.signals import Exited

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol

    from virtkit.kvm import structs as S
    from virtkit.kvm.ioctl import VcpuFd
    from virtkit.sandbox.files import FdTable, Root
    from virtkit.sandbox.mm import Memory
    from virtkit.sandbox.paging import FrameAllocator

    class Tracing(Protocol):
        def call(self, p: Process, nr: int, handler: Callable[..., object], args: tuple[int, ...]) -> object: ...

    class Sandbox(Protocol):
        """What a process and its system calls use of the sandbox that runs it
        (virtkit.sandbox.sandbox.Sandbox; a Protocol so that this module does not import it)."""

        lock: threading.Lock
        changed: threading.Condition
        procs: dict[int, Process]
        root: Root
        frames: FrameAllocator

        @property
        def table(self) -> list[Callable[..., object]]: ...
        @property
        def enosys(self) -> Callable[..., object]: ...
        @property
        def tracer(self) -> Tracing | None: ...

        pvm_return: bool
        verbose_faults: bool

        def report(self, msg: str) -> None: ...
        def kernel_read(self, va: int, n: int) -> bytes: ...
        def stats_fault(self) -> None: ...
        def reap_thread(self, proc: Process) -> None: ...
        def kick(self, proc: Process) -> None: ...
        def post_to_parent(self, proc: Process, sig: int) -> None: ...
        def new_pid(self) -> int: ...
        def start(self, proc: Process, regs: S.kvm_regs | None) -> None: ...
        def load_program(
            self, cwd: str, path: bytes, argv: list[bytes], envp: list[bytes]
        ) -> tuple[Memory, int, int]: ...


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_FRAME = struct.Struct("<6Q")
_ARGS = struct.Struct("<7Q")
_Q = struct.Struct("<Q")
_EXIT_IO = int(ExitReason.IO)
_MASK64 = (1 << 64) - 1
SIGNALS_FOR_VECTOR = {0: 8, 1: 5, 3: 5, 4: 11, 5: 11, 6: 4, 7: 8, 13: 11, 14: 11, 16: 8, 17: 7, 19: 8}

#: returned by a handler that has set the registers itself (execve) or ended the process
NO_RETURN = object()


class Process:
    """One sandboxed process."""

    def __init__(self, sandbox: Sandbox, pid: int, ppid: int, mm: Memory, fds: FdTable, cwd: str) -> None:
        self.sandbox = sandbox
        self.pid, self.ppid = pid, ppid
        self.pgid = self.sid = pid
        self.mm = mm
        self.fds = fds
        self.cwd = cwd
        self.umask = 0o022
        self.sigactions: dict[int, bytes] = {}
        self.sigmask = 0
        #: signals waiting for their handler (bit sig-1), and the FPU states handlers interrupted
        self.pending = 0
        self.saved_fpu: list[S.kvm_fpu] = []
        self.fs_base = 0
        self.vcpu: VcpuFd | None = None
        self.slot = -1
        self.cr3 = 0
        self.thread: threading.Thread | None = None
        #: wait status once ended (zombie), None while it runs
        self.status: int | None = None
        self.children: set[int] = set()
        self.kill_signal = 0
        self.vfork_done: threading.Event | None = None
        self.exe = ""
        self.clear_tid = 0

    # --- state ---------------------------------------------------------------------------
    def load_cr3(self) -> None:
        assert self.vcpu is not None
        sregs = self.vcpu.get_sregs()
        sregs.cr3 = self.mm.space.pml4
        self.vcpu.set_sregs(sregs)
        self.cr3 = self.mm.space.pml4

    def set_fs_base(self, base: int) -> None:
        assert self.vcpu is not None
        sregs = self.vcpu.get_sregs()
        sregs.fs.base = base
        self.vcpu.set_sregs(sregs)
        self.fs_base = base

    # --- the run loop ------------------------------------------------------------------------
    def run(self) -> None:
        """The thread body: run the vCPU until the process ends."""
        sb = self.sandbox
        try:
            self._loop()
        except Exited:
            pass
        except Fault:
            self.status = self.status if self.status is not None else 11
        except OutOfMemory as e:  # like the kernel's OOM killer: this process ends with SIGKILL
            sb.report(f"pid {self.pid}: killed: {e}")
            self.status = 9
        except Exception as e:  # never let one process's bug take the VMM down
            sb.report(f"pid {self.pid}: VMM error serving it, killed: {type(e).__name__}: {e}")
            if self.status is None:
                self.status = 9
        finally:
            sb.reap_thread(self)

    def _loop(self) -> None:
        sb = self.sandbox
        vcpu = self.vcpu
        assert vcpu is not None
        fd = vcpu.fd
        page = vcpu.run_page
        table = sb.table
        ntable = len(table)
        enosys = sb.enosys
        get_regs, set_regs = vcpu.get_regs, vcpu.set_regs
        unpack_u32, unpack_u16 = _U32.unpack_from, _U16.unpack_from
        unpack_args, pack_ret = _ARGS.unpack_from, _Q.pack_into
        ram = sb.frames.mem.regions[0].view
        fast_port, syscall_port = cpu.FAST_PORT, cpu.SYSCALL_PORT
        ioctl = fcntl.ioctl
        tracer = sb.tracer
        while True:
            space = self.mm.space
            if space.fresh:
                space.fresh.clear()
            if self.kill_signal:
                self.status = self.kill_signal
                raise Exited
            try:
                ioctl(fd, KVM_RUN, 0)
            except InterruptedError:
                page[1] = 0  # kvm_run.immediate_exit, set by a kick
                if self.pending & ~self.sigmask and not self.kill_signal:
                    regs = get_regs()
                    if regs.rip < USER_TOP:  # in the program's code, not in a CPL0 fault stub
                        signals.deliver(self, regs)
                continue
            reason = unpack_u32(page, 8)[0]
            if reason != _EXIT_IO:
                self._bad_exit(reason)
                return
            port = unpack_u16(page, 34)[0]
            if port == fast_port:
                # the hot path: arguments from the data page, the result back into it
                data = self.mm.sysdata
                nr, a0, a1, a2, a3, a4, a5 = unpack_args(ram, data)
                handler = table[nr] if nr < ntable else enosys
                try:
                    if tracer is None:
                        ret = handler(self, a0, a1, a2, a3, a4, a5)
                    else:
                        ret = tracer.call(self, nr, handler, (a0, a1, a2, a3, a4, a5))
                except Fault:  # a guest pointer no handler caught
                    ret = -errno.EFAULT
                except (OverflowError, ValueError):  # a value the host call cannot even take
                    ret = -errno.EINVAL
                if ret is NO_RETURN:
                    continue
                if self.mm.space.pml4 != self.cr3:
                    self.load_cr3()
                if self.pending & ~self.sigmask:
                    # a signal for a handler: the program resumes (after the handler) at RCX
                    # with the result in RAX, as if the stub had finished
                    regs = get_regs()
                    regs.rax, regs.rip, regs.rflags = ret & _MASK64, regs.rcx, regs.r11  # type: ignore[operator]
                    if signals.deliver(self, regs):
                        continue
                pack_ret(ram, self.mm.sysdata, ret & _MASK64)  # type: ignore[operator]
                continue
            regs = get_regs()
            if port == syscall_port:
                nr = regs.rax
                handler = table[nr] if nr < ntable else enosys
                args = (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9)
                try:
                    if tracer is None:
                        ret = handler(self, *args)
                    else:
                        ret = tracer.call(self, nr, handler, args)
                except Fault:
                    ret = -errno.EFAULT
                except (OverflowError, ValueError):
                    ret = -errno.EINVAL
                if ret is NO_RETURN:
                    continue
                regs.rax = ret & _MASK64  # type: ignore[operator]
                if sb.pvm_return:
                    regs.rip = regs.rcx
                    regs.rflags = regs.r11
                if self.mm.space.pml4 != self.cr3:
                    self.load_cr3()
                if not (sb.pvm_return and self.pending & ~self.sigmask and signals.deliver(self, regs)):
                    set_regs(regs)
            elif cpu.FAULT_PORT_BASE <= port < cpu.FAULT_PORT_BASE + 32:
                self._fault(port - cpu.FAULT_PORT_BASE, regs)
            else:
                self._bad_exit(reason)
                return

    def _fault(self, vector: int, regs: S.kvm_regs) -> None:
        """An exception from the program: a page fault to serve, or a fatal signal."""
        assert self.vcpu is not None
        sb = self.sandbox
        frame_va = regs.rsp
        has_error = vector in cpu.ERROR_CODE_VECTORS
        words = sb.kernel_read(frame_va, 48 if has_error else 40)
        if has_error:
            error_code, rip, cs, _rflags, user_rsp, _ss = _FRAME.unpack(words.ljust(48, b"\0"))
        else:
            error_code = 0
            rip, cs, _rflags, user_rsp, _ss, _ = _FRAME.unpack(words.ljust(48, b"\0"))
        cr2 = self.vcpu.get_sregs().cr2 if vector == 14 else 0
        if vector == 14 and cs & 3 == 3 and self.mm.fault(cr2, error_code):
            sb.stats_fault()
            # resume: pop the error code and let the stub's iretq return to the program
            regs.rsp = frame_va + 8
            regs.rip = cpu.FAULT_IRET_VA
            self.vcpu.set_regs(regs)
            if self.mm.space.pml4 != self.cr3:
                self.load_cr3()
            return
        sig = SIGNALS_FOR_VECTOR.get(vector, 11)
        if sb.tracer is not None or sb.verbose_faults:
            what = f"cr2={cr2:#x} error={error_code:#x}" if vector == 14 else f"error={error_code:#x}"
            sb.report(
                f"pid {self.pid}: exception {vector} at rip={rip:#x} rsp={user_rsp:#x} {what}: killed by signal {sig}"
            )
        self.status = sig
        raise Exited

    def _bad_exit(self, reason: int) -> None:
        assert self.vcpu is not None
        regs = self.vcpu.get_regs()
        self.sandbox.report(f"pid {self.pid}: unexpected VM exit {reason} at rip={regs.rip:#x}: killed")
        self.status = 9

    # --- helpers the handlers use ------------------------------------------------------------
    def read(self, va: int, n: int) -> bytes:
        return self.mm.space.read(va, n)

    def write(self, va: int, data: bytes | bytearray | memoryview) -> None:
        self.mm.space.write(va, data)

    def cstr(self, va: int, limit: int = 4096) -> bytes:
        return self.mm.space.read_cstr(va, limit)

    def string_array(self, va: int, max_items: int = 4096, max_bytes: int = 1 << 21) -> list[bytes]:
        """argv/envp: a NULL-terminated array of string pointers, bounded like Linux's ARG_MAX."""
        out: list[bytes] = []
        total = 0
        if va == 0:
            return out
        while True:
            ptr = self.mm.space.read_u64(va + 8 * len(out))
            if ptr == 0:
                return out
            s = self.cstr(ptr, 131072)
            total += len(s) + 1
            if len(out) >= max_items or total > max_bytes:
                raise OSError(errno.E2BIG, "argument list too long")
            out.append(s)


def user_range_ok(va: int, n: int) -> bool:
    return va >= 0 and n >= 0 and va + n <= USER_TOP


def now_ns() -> int:
    return time.perf_counter_ns()


def write_all(fd: int, data: bytes) -> int:
    return os.write(fd, data)
