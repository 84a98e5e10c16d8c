"""A sandbox: one VM without a kernel, its processes, and the VMM services they share.

``Sandbox(root).run(argv)`` loads ``argv[0]`` from the root (static, static-PIE, or dynamic
through its PT_INTERP loader from the root), runs it at CPL3 and returns its wait status once
it and its descendants have ended.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
import threading

from virtkit.errors import VirtkitError
from virtkit.kvm.ioctl import Kvm, VcpuFd
from virtkit.kvm.structs import KVM_RUN_IMMEDIATE_EXIT_OFFSET
from virtkit.memory import GuestMemory
from virtkit.sandbox import cpu, elf, signals
from virtkit.sandbox.files import FdTable, OpenFile, Root
from virtkit.sandbox.mm import STACK_SIZE, STACK_TOP, Memory, Vma, page_up
from virtkit.sandbox.paging import ADDR_MASK, PAGE, PROT_READ, PROT_WRITE, FrameAllocator, OutOfMemory
from virtkit.sandbox.process import Process
from virtkit.vcpu import KICK_SIGNAL, install_kick_handler

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from virtkit.kvm import structs as S
    from virtkit.sandbox.trace import Tracer

#: where an interpreter (PT_INTERP) is mapped: below the mmap area, like Linux's mmap_base
INTERP_BASE = 0x7FFF_F7FC_0000 - (64 << 20)
#: bound on an executable the loader reads headers from
MAX_HEAD = 1 << 20
DEFAULT_MEMORY = 1 << 30


class SandboxError(VirtkitError):
    """The sandbox could not start the program (the message says what to fix)."""


class Sandbox:
    def __init__(
        self,
        root: str,
        *,
        readonly: bool = False,
        memory: int = DEFAULT_MEMORY,
        tracer: Tracer | None = None,
        env: list[bytes] | None = None,
        report: Callable[[str], None] | None = None,
        fast_stub: bool = True,
    ) -> None:
        try:
            self.root = Root(root, readonly=readonly)
        except OSError as e:
            raise SandboxError(
                f"cannot use {root} as the sandbox root: {e.strerror}: give an existing directory"
            ) from None
        self.tracer = tracer
        self.env = env if env is not None else [b"PATH=/bin:/usr/bin:/sbin:/usr/sbin", b"HOME=/", b"TERM=dumb"]
        self._report = report or (lambda msg: print(f"virtkit sandbox: {msg}", file=sys.stderr))
        self.verbose_faults = False
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.procs: dict[int, Process] = {}
        self.next_pid = 1
        self.idle: list[tuple[VcpuFd, int]] = []
        self.vcpus: list[VcpuFd] = []
        self.faults = 0
        #: the stub runs at CPL3 (PVM): the VMM resumes the program at RCX (register stub), or the
        #: per-process fast stub returns by itself. On VT-x/AMD-V the stub runs at a real CPL0.
        self.pvm_return = os.path.isdir("/sys/module/kvm_pvm")
        self.fast = self.pvm_return and fast_stub
        install_kick_handler()
        self.kvm = Kvm()
        try:
            self.vm = self.kvm.create_vm()
            self.mem = GuestMemory([(0, memory)])
            region = self.mem.regions[0]
            self.vm.set_user_memory_region(0, 0, region.size, region.host_addr)
            self.frames = FrameAllocator(self.mem, 0x10_0000, memory)
            self.kernel = cpu.Kernel(self.frames)
            self.hwcap = next((e.edx for e in self.kvm.supported_cpuid() if e.function == 1), 0)
        except BaseException:
            self.close()
            raise
        from virtkit.sandbox.syscalls import build_table, enosys

        self.table = build_table()
        self.enosys = enosys

    def stop_all(self, sig: int, timeout: float = 5.0) -> None:
        """End every process still running with ``sig`` and wait (bounded) for its thread."""
        with self.lock:
            rest = [p for p in self.procs.values() if p.status is None and p.thread is not None]
        for p in rest:
            p.kill_signal = sig
            self.kick(p)
        for p in rest:
            if p.thread is not None:
                p.thread.join(timeout)

    def close(self) -> None:
        """Release the VM. Process threads are stopped first: none may touch guest memory after."""
        if getattr(self, "procs", None):
            self.stop_all(9)
            stuck = [p.pid for p in self.procs.values() if p.thread is not None and p.thread.is_alive()]
            if stuck:
                # a thread blocked in a host call (a pipe read) could still write guest memory:
                # leave the VM mapped; it goes away with this process
                self.report(f"processes {stuck} did not stop; the VM is left to the process exit")
                self.root.close()
                return
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        if getattr(self, "vm", None) is not None:
            self.vm.close()
        if getattr(self, "mem", None) is not None:
            self.mem.close()
        self.kvm.close()
        self.root.close()

    def report(self, msg: str) -> None:
        self._report(msg)

    def stats_fault(self) -> None:
        self.faults += 1

    def kernel_read(self, va: int, n: int) -> bytes:
        """Bytes of the VMM's own pages (an exception frame on a CPL0 stack)."""
        out = bytearray()
        space = self.kernel._space
        while n > 0:
            off = va & 0xFFF
            k = min(n, PAGE - off)
            at = space._entry_addr(va, False)
            e = int.from_bytes(self.mem.read(at, 8), "little") if at else 0
            if not e & 1:
                raise OutOfMemory(f"exception frame at {va:#x} is not on a VMM stack")
            out += self.mem.read((e & ADDR_MASK) + off, k)
            va, n = va + k, n - k
        return bytes(out)

    def kick(self, proc: Process) -> None:
        """Make ``proc``'s KVM_RUN return soon so that its thread sees ``kill_signal``."""
        vcpu, thread = proc.vcpu, proc.thread
        if vcpu is None or thread is None or thread.ident is None or thread is threading.current_thread():
            return
        vcpu.run_page[KVM_RUN_IMMEDIATE_EXIT_OFFSET] = 1
        with contextlib.suppress(ProcessLookupError):
            signal.pthread_kill(thread.ident, KICK_SIGNAL)
        with self.lock:
            self.changed.notify_all()

    def post_to_parent(self, proc: Process, sig: int) -> None:
        """SIGCHLD (or another signal) to ``proc``'s parent, if it is still there."""
        with self.lock:
            parent = self.procs.get(proc.ppid)
        if parent is not None and parent.status is None:
            with contextlib.suppress(Exception):
                signals.post(self, parent, sig)

    # --- vCPUs -------------------------------------------------------------------------------
    def take_vcpu(self) -> tuple[VcpuFd, int, bool]:
        """An idle vCPU (and its slot), or a new one; True if new."""
        with self.lock:
            if self.idle:
                return (*self.idle.pop(), False)
            slot = len(self.vcpus)
            if slot >= cpu.MAX_CPU_SLOTS:
                raise OSError(11, "too many processes")
            vcpu = self.vm.create_vcpu(slot)
            self.vcpus.append(vcpu)
        self.kernel.build_slot(slot)
        return vcpu, slot, True

    # --- processes ---------------------------------------------------------------------------
    def new_pid(self) -> int:
        with self.lock:
            pid = self.next_pid
            self.next_pid += 1
            return pid

    def start(self, proc: Process, regs: S.kvm_regs | None, sregs: S.kvm_sregs | None = None) -> None:
        """Give ``proc`` a vCPU in CPL3 state (``regs``), and a thread."""
        vcpu, slot, fresh = self.take_vcpu()
        proc.vcpu, proc.slot = vcpu, slot
        cpu.init_vcpu(self.kvm, vcpu, self.kernel, slot, proc.mm.space.pml4, fresh=fresh, fast=self.fast)
        proc.cr3 = proc.mm.space.pml4
        if proc.fs_base:
            proc.set_fs_base(proc.fs_base)
        if regs is not None:
            vcpu.set_regs(regs)
        with self.lock:
            self.procs[proc.pid] = proc
        proc.thread = threading.Thread(target=proc.run, name=f"sandbox-pid{proc.pid}", daemon=True)
        proc.thread.start()

    def reap_thread(self, proc: Process) -> None:
        """The process's thread is ending: release what it held, make it a zombie."""
        proc.fds.close_all()
        with contextlib.suppress(Exception):  # a broken space must not keep the others running
            proc.mm.destroy()
        if proc.vfork_done is not None:
            proc.vfork_done.set()
        self.post_to_parent(proc, signals.SIGCHLD)
        with self.lock:
            if proc.status is None:
                proc.status = 0
            if proc.vcpu is not None:
                self.idle.append((proc.vcpu, proc.slot))
                proc.vcpu = None
            # orphans are reaped by nobody: the sandbox's first process plays init for them
            for cpid in proc.children:
                child = self.procs.get(cpid)
                if child is not None:
                    child.ppid = 1
                    if child.status is not None and child.pid != 1:
                        self.procs.pop(cpid, None)
            if (proc.ppid not in self.procs or proc.ppid == 0) and proc.pid != 1:
                self.procs.pop(proc.pid, None)
            self.changed.notify_all()

    # --- loading -------------------------------------------------------------------------------
    def open_exec(self, proc_cwd: str, path: bytes) -> tuple[int, str]:
        """A host fd of the executable at guest ``path`` (errno OSError if it cannot be)."""
        guest = Root.join(proc_cwd, os.fsdecode(path))
        fd = self.root.open(guest, os.O_RDONLY)
        st = os.fstat(fd)
        if (st.st_mode & 0o170000) != 0o100000 or not st.st_mode & 0o111:
            os.close(fd)
            raise OSError(13, "not an executable file")
        return fd, guest

    def load_program(self, cwd: str, path: bytes, argv: list[bytes], envp: list[bytes]) -> tuple[Memory, int, int]:
        """A new memory image for ``path``: (memory, entry RIP, initial RSP). Raises OSError."""
        fd, guest = self.open_exec(cwd, path)
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, min(size, MAX_HEAD), 0)
            if head[:2] == b"#!":
                return self._load_script(cwd, path, head, argv, envp)
            try:
                exe = elf.parse(head, size)
            except elf.ElfError as e:
                raise OSError(8, f"{guest}: {e}") from None
            mm = Memory(self.frames, self.kernel.pdpt)
            try:
                bias = elf.DYN_BASE if exe.type == elf.ET_DYN else 0
                mm.load(exe, fd, bias)
                entry = exe.entry + bias
                interp_base = 0
                if exe.interp is not None:
                    ifd, _ = self.open_exec("/", exe.interp)
                    try:
                        isize = os.fstat(ifd).st_size
                        ihead = os.pread(ifd, min(isize, MAX_HEAD), 0)
                        try:
                            iexe = elf.parse(ihead, isize)
                        except elf.ElfError as e:
                            raise OSError(8, f"{exe.interp.decode(errors='replace')}: {e}") from None
                        lo, hi = iexe.span
                        interp_base = INTERP_BASE - lo if iexe.type == elf.ET_DYN else 0
                        mm.load(iexe, ifd, interp_base)
                        entry = iexe.entry + interp_base
                    finally:
                        os.close(ifd)
                _lo, hi = exe.span
                mm.brk_start = mm.brk = page_up(hi + bias)
                mm._insert(Vma(STACK_TOP - STACK_SIZE, STACK_TOP, PROT_READ | PROT_WRITE, "stack"))
                aux = [
                    (elf.AT_PHDR, exe.phdr_address(bias)),
                    (elf.AT_PHENT, 56),
                    (elf.AT_PHNUM, exe.phnum),
                    (elf.AT_PAGESZ, PAGE),
                    (elf.AT_BASE, interp_base),
                    (elf.AT_FLAGS, 0),
                    (elf.AT_ENTRY, exe.entry + bias),
                    (elf.AT_UID, 0),
                    (elf.AT_EUID, 0),
                    (elf.AT_GID, 0),
                    (elf.AT_EGID, 0),
                    (elf.AT_HWCAP, self.hwcap),
                    (elf.AT_HWCAP2, 0),
                    (elf.AT_CLKTCK, 100),
                    (elf.AT_SECURE, 0),
                ]
                rsp, blob = elf.build_stack(STACK_TOP, argv, envp, aux, execfn=path, random16=secrets.token_bytes(16))
                if STACK_TOP - rsp > 256 * 1024:
                    raise OSError(7, "argument list too long")
                mm.space.write(rsp, blob)
                if self.fast:
                    mm.map_fast_stub()
                return mm, entry, rsp
            except BaseException:
                mm.destroy()
                raise
        finally:
            os.close(fd)

    def _load_script(
        self, cwd: str, path: bytes, head: bytes, argv: list[bytes], envp: list[bytes]
    ) -> tuple[Memory, int, int]:
        line = head[2:].split(b"\n", 1)[0].strip()
        if not line or len(line) > 255:
            raise OSError(8, "bad #! line")
        parts = line.split(None, 1)
        interp = parts[0]
        new_argv = [interp, *parts[1:], path, *argv[1:]]
        fd, _ = self.open_exec(cwd, interp)
        os.close(fd)
        return self.load_program(cwd, interp, new_argv, envp)

    def _search_path(self, name: bytes) -> bytes:
        """``name`` looked up in the PATH of the sandbox's environment, inside the root (as
        container runtimes do for the first program); unchanged when not found."""
        path = next((e[5:] for e in self.env if e.startswith(b"PATH=")), b"/bin:/usr/bin")
        for d in path.split(b":")[:64]:
            candidate = (d.rstrip(b"/") or b"") + b"/" + name
            try:
                fd, _ = self.open_exec("/", candidate)
            except OSError:
                continue
            os.close(fd)
            return candidate
        return name

    # --- the first process -------------------------------------------------------------------
    def run(self, argv: list[str], stdio: tuple[int, int, int] = (0, 1, 2), cwd: str = "/") -> int:
        """Run ``argv`` and every process it starts; the first process's wait status."""
        from virtkit.kvm import structs as S

        bargv = [os.fsencode(a) for a in argv]
        if b"/" not in bargv[0]:
            bargv[0] = self._search_path(bargv[0])
        try:
            cwd = Root.join("/", cwd)
            mm, entry, rsp = self.load_program(cwd, bargv[0], bargv, self.env)
        except OSError as e:
            raise SandboxError(
                f"cannot run {argv[0]} in the sandbox root {self.root.path}: {e.strerror or e}"
            ) from None
        fds = FdTable()
        for guest_fd, host_fd in enumerate(stdio):
            fds.install(OpenFile(os.dup(host_fd), f"<std{guest_fd}>"), exact=guest_fd)
        proc = Process(self, self.new_pid(), 0, mm, fds, cwd)
        proc.exe = Root.join(cwd, os.fsdecode(bargv[0]))
        regs = S.kvm_regs()
        regs.rip, regs.rsp, regs.rflags = entry, rsp, cpu.RFLAGS_USER
        self.start(proc, regs)
        try:
            with self.lock:
                while proc.status is None or proc.vcpu is not None:
                    self.changed.wait(1.0)
        except KeyboardInterrupt:
            # Ctrl-C: SIGINT to every process, as the terminal does to a foreground job; those
            # with a handler run it, the others end (a second Ctrl-C ends everything)
            with self.lock:
                live = [p for p in self.procs.values() if p.status is None]
            for p in live:
                with contextlib.suppress(Exception):
                    signals.post(self, p, signals.SIGINT)
            try:
                with self.lock:
                    while proc.status is None or proc.vcpu is not None:
                        self.changed.wait(1.0)
            except KeyboardInterrupt:
                self.stop_all(2)
                if proc.status is None:
                    proc.status = 2
        # the first process is gone: what it left running ends with it (SIGKILL)
        self.stop_all(9)
        assert proc.status is not None
        return proc.status


def wait_status_to_exit(status: int) -> int:
    """A shell's view of a wait status: the exit code, or 128 + the signal."""
    if status & 0x7F:
        return 128 + (status & 0x7F)
    return (status >> 8) & 0xFF
