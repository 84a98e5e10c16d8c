"""The machine code the VMM writes for a sandbox VM, disassembled: the stubs do what the design
says (docs/SANDBOX.md) and touch no register they do not restore."""

from __future__ import annotations

import struct

import pytest

from virtkit.sandbox import cpu

capstone = pytest.importorskip("capstone")


def _disasm(code: bytes, at: int) -> list[tuple[int, str, str]]:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    return [(i.address, i.mnemonic, i.op_str) for i in md.disasm(code, at)]


def test_fast_stub_saves_exits_and_returns() -> None:
    insns = _disasm(cpu.FAST_STUB, cpu.FAST_STUB_VA)
    assert insns[-1][0] + 2 - cpu.FAST_STUB_VA == len(cpu.FAST_STUB)  # every byte decodes
    data = cpu.FAST_DATA_VA
    saved = [(m, o) for _a, m, o in insns[:9]]
    regs = ["rax", "rdi", "rsi", "rdx", "r10", "r8", "r9", "rcx", "r11"]
    for k, ((mnemonic, ops), reg) in enumerate(zip(saved, regs, strict=True)):
        assert mnemonic == "mov" and ops.endswith(f", {reg}"), ops
        # rip-relative: capstone shows the displacement; the target is the data page slot k
        addr, *_ = (a for a, _m, o in insns if o == ops)
        disp = int(ops.split("+ ")[1].split("]")[0], 16)
        nxt = next(a for a, _m, _o in insns if a > addr)
        assert nxt + disp == data + 8 * k
    assert (insns[9][1], insns[9][2]) == ("out", f"{cpu.FAST_PORT:#x}, al")
    assert [m for _a, m, _o in insns[-6:]] == ["lea", "push", "popfq", "mov", "mov", "jmp"]
    assert insns[-1][2] == "rcx"


def test_register_stub_and_fault_stubs() -> None:
    assert [(m, o) for _a, m, o in _disasm(cpu.SYSCALL_STUB, cpu.SYSCALL_STUB_VA)] == [
        ("out", f"{cpu.SYSCALL_PORT:#x}, al"),
        ("sysretq", ""),
    ]
    page = cpu.fault_stubs()
    for vector in (0, 13, 14, 31):
        m, o = _disasm(page[8 * vector : 8 * vector + 3], cpu.FAULT_STUBS_VA)[0][1:]
        assert (m, o) == ("out", f"{cpu.FAULT_PORT_BASE + vector:#x}, al")
    iret = cpu.FAULT_IRET_VA - cpu.FAULT_STUBS_VA
    assert _disasm(page[iret : iret + 2], cpu.FAULT_IRET_VA)[0][1] == "iretq"


def test_idt_gates_point_at_the_stubs() -> None:
    idt = cpu.idt()
    for vector in (3, 14):
        low, high = struct.unpack_from("<QQ", idt, 16 * vector)
        target = (low & 0xFFFF) | (((low >> 48) & 0xFFFF) << 16) | (high << 32)
        assert target == cpu.FAULT_STUBS_VA + 8 * vector
        assert (low >> 16) & 0xFFFF == cpu.KERNEL_CS
        assert (low >> 45) & 3 == (3 if vector == 3 else 0)  # int3 may be raised from CPL3


def test_tss_io_bitmap_is_all_zero() -> None:
    tss = cpu.tss(0x1234)
    assert struct.unpack_from("<Q", tss, 4)[0] == 0x1234  # RSP0
    base = struct.unpack_from("<H", tss, 102)[0]
    assert base == cpu.TSS_SIZE and tss[base : base + cpu.IOMAP_BYTES] == bytes(cpu.IOMAP_BYTES)
    assert tss[-1] == 0xFF
