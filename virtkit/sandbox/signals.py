"""Signals: dispositions, delivery to a handler on the program's stack, and rt_sigreturn.

Layouts are Linux x86-64's (arch/x86/include/uapi/asm/sigcontext.h ``struct sigcontext_64``,
include/uapi/asm-generic/ucontext.h, arch/x86/kernel/signal_64.c ``struct rt_sigframe``,
``struct sigaction`` as the kernel takes it: handler, flags, restorer, mask). A signal is
delivered when its process comes back from a system call or is pulled out of KVM_RUN by a kick
while it runs its own code; the FPU/SSE state of the interrupted code is kept by the VMM (the
frame's ``fpstate`` is NULL) and put back by ``rt_sigreturn``.
"""

from __future__ import annotations

import struct

from virtkit.sandbox.paging import USER_TOP, Fault

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Final

    from virtkit.kvm import structs as S

    #: a virtkit.sandbox.process.Process / its Sandbox (that module imports this one)
    Process = Any
    Sandbox = Any


class Exited(Exception):
    """Raised inside a process's thread to end it (exit_group, a fatal signal)."""


SIGINT, SIGKILL, SIGSEGV, SIGCHLD, SIGCONT, SIGSTOP = 2, 9, 11, 17, 18, 19
#: ignored by default (signal(7)); the stop signals are ignored too: there is no job control
DEFAULT_IGNORE: Final = frozenset({SIGCHLD, SIGCONT, 20, 21, 22, 23, 28})
SA_SIGINFO, SA_ONSTACK, SA_RESTART, SA_NODEFER, SA_RESETHAND = 4, 0x08000000, 0x10000000, 0x40000000, 0x80000000
SIG_DFL, SIG_IGN = 0, 1
_ACTION = struct.Struct("<QQQQ")
#: 18 general registers, then cs gs fs ss, err, trapno, oldmask, cr2, fpstate, 8 reserved
_MCONTEXT = struct.Struct("<18QHHHHQQQQQ64x")
UC_SIZE: Final = 8 + 8 + 24 + _MCONTEXT.size + 8
INFO_SIZE: Final = 128
FRAME_SIZE: Final = 8 + UC_SIZE + INFO_SIZE
_GPRS = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi", "rsi", "rbp", "rbx", "rdx", "rax", "rcx")


def action(p: Process, sig: int) -> tuple[int, int, int, int]:
    """(handler, flags, restorer, mask) of ``sig`` in ``p``."""
    raw = p.sigactions.get(sig)
    if raw is None:
        return SIG_DFL, 0, 0, 0
    return _ACTION.unpack(raw[:32].ljust(32, b"\0"))


def post(sb: Sandbox, q: Process, sig: int, sender: Process | None = None) -> None:
    """Send ``sig`` to ``q``: ignore it, end ``q`` (default action), or make it pending for its
    handler. Raises Exited when the sender ends itself."""
    handler = action(q, sig)[0] if sig not in (SIGKILL, SIGSTOP) else SIG_DFL
    if handler == SIG_IGN or (handler == SIG_DFL and sig in DEFAULT_IGNORE):
        return
    if handler == SIG_DFL:
        q.kill_signal = sig
        if sender is not None and q is sender:
            sender.status = sig
            raise Exited
    else:
        q.pending |= 1 << (sig - 1)
        if q is sender:
            return  # delivered when the kill call returns
    sb.kick(q)


def deliverable(p: Process) -> int:
    """The lowest pending signal not blocked, or 0."""
    ready: int = p.pending & ~p.sigmask
    if not ready:
        return 0
    return (ready & -ready).bit_length()


def deliver(p: Process, regs: S.kvm_regs) -> bool:
    """Run the handler of the next deliverable signal: push the frame that saves ``regs`` (the
    program's state to come back to) and set the vCPU's registers to the handler. False when
    nothing is deliverable. A frame that cannot be written ends the process with SIGSEGV."""
    sig = deliverable(p)
    if not sig:
        return False
    assert p.vcpu is not None
    p.pending &= ~(1 << (sig - 1))
    handler, flags, restorer, mask = action(p, sig)
    if handler in (SIG_DFL, SIG_IGN):
        # the action changed since it was posted (an execve resets handlers; pending signals stay
        # pending across it): the new action applies, so a default one ends the process
        if handler == SIG_DFL and sig not in DEFAULT_IGNORE:
            p.kill_signal = sig
        return False
    sp = ((regs.rsp - 128 - FRAME_SIZE) & ~15) - 8
    info = struct.pack("<iii", sig, 0, 0).ljust(INFO_SIZE, b"\0")
    gprs = [getattr(regs, n) for n in _GPRS]
    mctx = _MCONTEXT.pack(*gprs, regs.rsp, regs.rip, regs.rflags, 0x33, 0, 0, 0x2B, 0, 0, p.sigmask, 0, 0)
    uc = struct.pack("<QQQiiQ", 0, 0, 0, 2, 0, 0) + mctx + struct.pack("<Q", p.sigmask)
    frame = struct.pack("<Q", restorer) + uc + info
    assert len(frame) == FRAME_SIZE
    try:
        if sp <= 0 or sp + FRAME_SIZE > USER_TOP:
            raise Fault(sp)
        p.mm.space.write(sp, frame)
    except Fault:
        p.status = SIGSEGV
        raise Exited from None
    p.saved_fpu.append(p.vcpu.get_fpu())
    if len(p.saved_fpu) > 64:  # handlers that never return: keep the newest
        del p.saved_fpu[0]
    p.sigmask |= mask | (0 if flags & SA_NODEFER else 1 << (sig - 1))
    p.sigmask &= ~((1 << (SIGKILL - 1)) | (1 << (SIGSTOP - 1)))
    if flags & SA_RESETHAND:
        p.sigactions.pop(sig, None)
    regs.rsp = sp
    regs.rip = handler
    regs.rdi, regs.rsi, regs.rdx = sig, sp + 8 + UC_SIZE, sp + 8
    regs.rax = 0
    regs.rflags &= ~((1 << 8) | (1 << 10))  # TF, DF
    p.vcpu.set_regs(regs)
    return True


def sigreturn(p: Process) -> None:
    """rt_sigreturn: the state saved by :func:`deliver`, from the frame at the program's RSP
    (the handler's ``ret`` popped ``pretcode``, so RSP points at the ucontext)."""
    assert p.vcpu is not None
    regs = p.vcpu.get_regs()
    try:
        raw = p.mm.space.read(regs.rsp + 40, _MCONTEXT.size)
        mask = p.mm.space.read_u64(regs.rsp + 40 + _MCONTEXT.size)
    except Fault:
        p.status = SIGSEGV
        raise Exited from None
    fields = _MCONTEXT.unpack(raw)
    for name, value in zip(_GPRS, fields[:15], strict=True):
        setattr(regs, name, value)
    regs.rsp, regs.rip = fields[15], fields[16]
    # the program may edit its saved flags: only the arithmetic and direction ones are taken
    regs.rflags = (fields[17] & 0xDD5) | 0x202
    p.sigmask = mask & ~((1 << (SIGKILL - 1)) | (1 << (SIGSTOP - 1)))
    p.vcpu.set_regs(regs)
    if p.saved_fpu:
        p.vcpu.set_fpu(p.saved_fpu.pop())
