"""Readable reports of why a guest stopped abnormally: registers, privilege level, and the
instruction at RIP with its disassembly (capstone), so "emulation failure" says *what* failed."""

from __future__ import annotations

from virtkit.arch.x86 import CR0_PE
from virtkit.kvm.ioctl import VcpuFd
from virtkit.memory import GuestMemory


def cpu_mode(cs_l: int, cs_db: int, cr0: int) -> tuple[str, int]:
    """(name, bits) of the execution mode from CS.L, CS.D/B and CR0.PE."""
    if not cr0 & CR0_PE:
        return "real mode", 16
    if cs_l:
        return "64-bit mode", 64
    return ("32-bit protected mode", 32) if cs_db else ("16-bit protected mode", 16)


def disassemble(code: bytes, address: int, bits: int) -> str:
    if not code:
        return "(instruction bytes unavailable)"
    try:
        import capstone
    except ImportError:  # pragma: no cover - capstone is a declared dependency
        return "(capstone not installed)"
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    for insn in md.disasm(code, address):
        return f"{insn.mnemonic} {insn.op_str}".strip()
    return "(bytes do not decode as an x86 instruction)"


def instruction_bytes(vcpu: VcpuFd, memory: GuestMemory, linear: int, paging: bool) -> bytes:
    """Up to 15 bytes at ``linear``, translated through the guest's page tables when paging is on.
    Reads go through GuestMemory's bounds checks: a RIP outside RAM yields no bytes."""
    out = bytearray()
    addr = linear
    while len(out) < 15:
        try:
            gpa, valid = vcpu.translate(addr) if paging else (addr, True)
        except Exception:
            break
        if not valid:
            break
        chunk = min(15 - len(out), 0x1000 - (gpa & 0xFFF))
        try:
            out += memory.read(gpa, chunk)
        except Exception:
            break
        addr += chunk
    return bytes(out)


def crash_report(title: str, vcpu: VcpuFd, memory: GuestMemory, insn: bytes | None = None) -> str:
    """A few lines: what happened, where (RIP, CPL, mode), the instruction, the registers."""
    try:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    except Exception as e:
        return f"{title} on vCPU {vcpu.vcpu_id} (registers unavailable: {e})"
    mode, bits = cpu_mode(sregs.cs.l, sregs.cs.db, sregs.cr0)
    cpl = sregs.cs.selector & 3 if sregs.cr0 & CR0_PE else 0
    linear = (sregs.cs.base + regs.rip) & ((1 << 64) - 1)
    if not insn:
        insn = instruction_bytes(vcpu, memory, linear, bool(sregs.cr0 & (1 << 31)))
    text = disassemble(insn, regs.rip, bits)
    lines = [
        f"{title} on vCPU {vcpu.vcpu_id}: RIP {regs.rip:#x} CPL{cpl} ({mode})",
        f"  instruction: {insn.hex(' ') if insn else '??'}  ->  {text}",
        f"  rax={regs.rax:#x} rbx={regs.rbx:#x} rcx={regs.rcx:#x} rdx={regs.rdx:#x} "
        f"rsp={regs.rsp:#x} rflags={regs.rflags:#x}",
        f"  cr0={sregs.cr0:#x} cr3={sregs.cr3:#x} cr4={sregs.cr4:#x} efer={sregs.efer:#x}",
    ]
    return "\n".join(lines)


#: what a Linux kernel prints when its init process dies (kernel/exit.c), and when it starts one
_INIT_KILLED = b"Attempted to kill init!"
_INIT_STARTED = b"Run /init as init process"


def linux_init_wall(serial: bytes, flavor: str) -> str | None:
    """On a PVM host, a Linux guest's init dies at its first system call: ``syscall`` from guest
    user mode reaches the kernel's entry still at CPL3 (docs/PLATFORM.md, "Privilege
    transitions"). Said in one line when the console shows exactly that story, else None."""
    if flavor != "pvm" or _INIT_STARTED not in serial:
        return None
    if _INIT_KILLED not in serial[serial.rindex(_INIT_STARTED) :]:
        return None
    return (
        "the guest's init died at its first system call: on this PVM host `syscall` from guest user "
        "mode enters the kernel still at CPL3, which no VMM can fix (docs/PLATFORM.md); "
        "a VT-x/AMD-V host runs it"
    )
