"""The device allowlist as a cgroup2 BPF program (what the v1 devices controller does, for cgroup v2).

cgroup v2 has no devices controller: the kernel asks a ``BPF_PROG_TYPE_CGROUP_DEVICE`` program
attached to the cgroup, with ``struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }``
(access_type: device type in the low 16 bits, BPF_DEVCG_DEV_BLOCK=1/CHAR=2; requested access in
the high 16, MKNOD=1 READ=2 WRITE=4), and it returns 1 to allow, 0 to deny. runc and crun generate
the same kind of program. The rules keep the devices cgroup's semantics: everything is denied, then
rules apply in order, a later rule overriding an earlier one, so the program tests them last to first
and the first match decides.

The program is attached to the container's cgroup2 directory (on a hybrid host as well, where it
adds to the v1 controller); it lives as long as that cgroup.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from dataclasses import dataclass

from virtkit.errors import ContainerError
from virtkit.host.libc import bpf

BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 2

# eBPF opcodes (linux/bpf.h, linux/bpf_common.h)
_LDX_MEM_W = 0x61  # dst = *(u32 *)(src + off)
_MOV64_X = 0xBF  # dst = src
_MOV64_K = 0xB7  # dst = imm
_AND32_K = 0x54  # dst &= imm (32-bit)
_RSH32_K = 0x74  # dst >>= imm (32-bit)
_JNE_K = 0x55  # if dst != imm goto pc + off
_EXIT = 0x95

DEV_BLOCK, DEV_CHAR = 1, 2
ACC = {"m": 1, "r": 2, "w": 4}


@dataclass(frozen=True, slots=True)
class Rule:
    allow: bool
    type: str  # "a", "b" or "c"
    major: int | None  # None = any
    minor: int | None
    access: str  # letters from "rwm"


def parse_rule(allow: bool, text: str) -> Rule:
    """A devices-cgroup rule as written to devices.allow: ``c 1:3 rwm``, ``b *:* m`` or ``a``."""
    parts = text.split()
    if parts == ["a"]:
        return Rule(allow, "a", None, None, "rwm")
    kind, numbers, access = parts
    major, minor = numbers.split(":")
    return Rule(allow, kind, None if major == "*" else int(major), None if minor == "*" else int(minor), access)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def build_program(rules: list[Rule]) -> bytes:
    """eBPF for ``rules`` (in devices-cgroup order: later rules win); the default is deny."""
    head = [
        _insn(_LDX_MEM_W, dst=2, src=1, off=0),  # r2 = access_type
        _insn(_MOV64_X, dst=3, src=2),
        _insn(_AND32_K, dst=3, imm=0xFFFF),  # r3 = device type
        _insn(_RSH32_K, dst=2, imm=16),  # r2 = requested access
        _insn(_LDX_MEM_W, dst=4, src=1, off=4),  # r4 = major
        _insn(_LDX_MEM_W, dst=5, src=1, off=8),  # r5 = minor
    ]
    blocks = []
    for rule in reversed(rules):  # the last rule written is the first to decide
        checks: list[tuple[int, int, int]] = []  # (code, register, imm) of "skip this rule if"
        body: list[bytes] = []
        if rule.type != "a":
            checks.append((_JNE_K, 3, DEV_BLOCK if rule.type == "b" else DEV_CHAR))
        mask = sum(ACC[c] for c in rule.access)
        if mask != 7:
            # allowed only if the request asks for nothing outside the rule: r6 = r2 & ~mask; r6 != 0 -> skip
            body.append(_insn(_MOV64_X, dst=6, src=2))
            body.append(_insn(_AND32_K, dst=6, imm=~mask & 0x7))
            checks.append((_JNE_K, 6, 0))
        if rule.major is not None:
            checks.append((_JNE_K, 4, rule.major))
        if rule.minor is not None:
            checks.append((_JNE_K, 5, rule.minor))
        tail = [_insn(_MOV64_K, dst=0, imm=1 if rule.allow else 0), _insn(_EXIT)]
        # lay out: body (the mask computation) first, then the conditional skips, then the verdict
        n_checks = len(checks)
        jumps = []
        for i, (code, reg, imm) in enumerate(checks):
            remaining = n_checks - i - 1
            jumps.append(_insn(code, dst=reg, off=remaining + len(tail), imm=imm))
        blocks.append(b"".join(body) + b"".join(jumps) + b"".join(tail))
        if not checks:
            # an unconditional rule decides everything that reaches it; the verifier rejects
            # unreachable instructions, so nothing may follow
            return b"".join(head) + b"".join(blocks)
    deny = _insn(_MOV64_K, dst=0, imm=0) + _insn(_EXIT)
    return b"".join(head) + b"".join(blocks) + deny


def attach(cgroup_dir: str, rules: list[Rule]) -> None:
    """Load the program and attach it to ``cgroup_dir`` (a cgroup2 directory)."""
    program = build_program(rules)
    code = ctypes.create_string_buffer(program, len(program))
    license_ = ctypes.create_string_buffer(b"Apache-2.0")

    def load(log: ctypes.Array[ctypes.c_char] | None) -> int:
        # union bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, log_level, log_size,
        # log_buf, kern_version, prog_flags, prog_name[16], prog_ifindex, expected_attach_type
        attr = struct.pack(
            "<IIQQIIQII16sII",
            BPF_PROG_TYPE_CGROUP_DEVICE,
            len(program) // 8,
            ctypes.addressof(code),
            ctypes.addressof(license_),
            1 if log else 0,
            len(log) if log else 0,
            ctypes.addressof(log) if log else 0,
            0,
            0,
            b"virtkit_dev",
            0,
            BPF_CGROUP_DEVICE,
        ).ljust(128, b"\0")
        return bpf(BPF_PROG_LOAD, attr)

    try:
        prog = load(None)
    except OSError as err:
        # again with the verifier's log (a log too small for it fails with ENOSPC, so be generous)
        log = ctypes.create_string_buffer(1 << 20)
        with contextlib.suppress(OSError):
            load(log)
        detail = " / ".join(log.value.decode(errors="replace").strip().splitlines()[-2:])
        raise ContainerError(f"the kernel refused the device filter program: {err.strerror} {detail}".strip()) from None
    try:
        fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            bpf(
                BPF_PROG_ATTACH,
                struct.pack("<IIIII", fd, prog, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI, 0).ljust(128, b"\0"),
            )
        except OSError as err:
            raise ContainerError(f"cannot attach the device filter to {cgroup_dir}: {err.strerror}") from None
        finally:
            os.close(fd)
    finally:
        os.close(prog)  # the attachment holds its own reference


def run_program(program: bytes, kind: str, major: int, minor: int, access: str) -> int:
    """A reference interpreter for the few instructions build_program emits (for unit tests)."""
    ctx = struct.pack(
        "<III", (DEV_BLOCK if kind == "b" else DEV_CHAR) | (sum(ACC[c] for c in access) << 16), major, minor
    )
    regs = [0] * 11
    pc = 0
    insns = [struct.unpack_from("<BBhi", program, i) for i in range(0, len(program), 8)]
    while True:
        code, regs_byte, off, imm = insns[pc]
        dst, src = regs_byte & 0xF, regs_byte >> 4
        pc += 1
        if code == _LDX_MEM_W:
            regs[dst] = struct.unpack_from("<I", ctx, off)[0]
        elif code == _MOV64_X:
            regs[dst] = regs[src]
        elif code == _MOV64_K:
            regs[dst] = imm & 0xFFFFFFFFFFFFFFFF
        elif code == _AND32_K:
            regs[dst] = (regs[dst] & imm) & 0xFFFFFFFF
        elif code == _RSH32_K:
            regs[dst] = (regs[dst] & 0xFFFFFFFF) >> imm
        elif code == _JNE_K:
            if regs[dst] != (imm & 0xFFFFFFFFFFFFFFFF):
                pc += off
        elif code == _EXIT:
            return regs[0]
        else:
            raise ValueError(f"unexpected opcode {code:#x}")
