"""Seccomp: a compiler from OCI ``linux.seccomp`` objects to classic BPF, and a reference interpreter.

What a program allows is its caller's policy: the container runtime's default profile
(:mod:`virtkit.container.seccomp`), the VMM allow-lists (:mod:`virtkit.jail.policy`). The program
is installed with :func:`virtkit.host.libc.seccomp_set_filter`.

The filter the kernel runs (seccomp(2), ``struct seccomp_data``) sees the syscall number, the audit
architecture and six 64-bit arguments. The compiled program is:

1. architecture check: anything but x86-64 native calls (i386 ``int 0x80``, x32) gets the default
   action, or EPERM when the default allows (a 32-bit table would let them bypass the rules);
2. a binary search over syscall-number ranges, so a call costs about log2(ranges) comparisons
   instead of a scan of 350 names (libseccomp's binary-tree optimisation does the same);
3. per-syscall blocks for rules with argument conditions, tried in profile order, first match wins.

Classic BPF conditional jumps reach at most 255 instructions ahead; the assembler turns a far
conditional jump into a pair of unconditional ``ja`` (32-bit offset) as needed.
"""

from __future__ import annotations

import errno as _errno
import struct
from dataclasses import dataclass
from typing import Any

from virtkit.errors import ConfigError
from virtkit.host.syscalls_x86_64 import SYSCALLS

# --- linux/filter.h, linux/bpf_common.h ----------------------------------------------------
BPF_LD_W_ABS = 0x20
BPF_ALU_AND_K = 0x54
BPF_JMP_JA = 0x05
BPF_JMP_JEQ_K = 0x15
BPF_JMP_JGT_K = 0x25
BPF_JMP_JGE_K = 0x35
BPF_JMP_JSET_K = 0x45
BPF_RET_K = 0x06
BPF_MAXINSNS = 4096

# --- linux/seccomp.h ------------------------------------------------------------------------
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_TRACE = 0x7FF00000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000

# struct seccomp_data offsets: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]
OFF_NR = 0
OFF_ARCH = 4
OFF_ARGS = 16

# linux/audit.h
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

ACTIONS = (
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_LOG",
)
OPS = ("SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_MASKED_EQ")


def action_value(action: str, errno_ret: int | None, default_errno: int = _errno.EPERM) -> int:
    if action == "SCMP_ACT_ALLOW":
        return SECCOMP_RET_ALLOW
    if action == "SCMP_ACT_ERRNO":
        return SECCOMP_RET_ERRNO | ((errno_ret if errno_ret is not None else default_errno) & 0xFFFF)
    if action in ("SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD"):
        return SECCOMP_RET_KILL_THREAD
    if action == "SCMP_ACT_KILL_PROCESS":
        return SECCOMP_RET_KILL_PROCESS
    if action == "SCMP_ACT_TRAP":
        return SECCOMP_RET_TRAP
    if action == "SCMP_ACT_TRACE":
        return SECCOMP_RET_TRACE | ((errno_ret or 0) & 0xFFFF)
    if action == "SCMP_ACT_LOG":
        return SECCOMP_RET_LOG
    raise ValueError(action)


# --------------------------------------------------------------------------------------------
# assembler


@dataclass(slots=True)
class _Insn:
    code: int
    k: int = 0
    jt: str | None = None  # label, or None = next instruction
    jf: str | None = None
    target: str | None = None  # for JA


class Assembler:
    """Classic BPF with symbolic labels; far conditional jumps are expanded into ``ja`` pairs."""

    def __init__(self) -> None:
        self.items: list[_Insn | str] = []
        self._n = 0

    def label(self, hint: str = "L") -> str:
        self._n += 1
        return f"{hint}{self._n}"

    def place(self, label: str) -> None:
        self.items.append(label)

    def load(self, offset: int) -> None:
        self.items.append(_Insn(BPF_LD_W_ABS, offset))

    def and_(self, k: int) -> None:
        self.items.append(_Insn(BPF_ALU_AND_K, k))

    def jump(self, code: int, k: int, jt: str | None, jf: str | None) -> None:
        self.items.append(_Insn(code, k, jt, jf))

    def goto(self, label: str) -> None:
        self.items.append(_Insn(BPF_JMP_JA, target=label))

    def ret(self, value: int) -> None:
        self.items.append(_Insn(BPF_RET_K, value))

    def assemble(self) -> bytes:
        far: set[int] = set()  # indices (into items) of conditional jumps emitted in long form
        while True:
            pos: dict[str, int] = {}
            at = 0
            for idx, item in enumerate(self.items):
                if isinstance(item, str):
                    pos[item] = at
                else:
                    at += 3 if idx in far else 1
            out: list[bytes] = []
            grew = False
            at = 0
            for idx, item in enumerate(self.items):
                if isinstance(item, str):
                    continue
                if item.code == BPF_JMP_JA:
                    assert item.target is not None
                    out.append(struct.pack("<HBBI", item.code, 0, 0, pos[item.target] - at - 1))
                    at += 1
                elif item.code & 0x07 == 0x05:  # conditional jump
                    if idx in far:
                        t = pos[item.jt] if item.jt else at + 3
                        f = pos[item.jf] if item.jf else at + 3
                        out.append(struct.pack("<HBBI", item.code, 0, 1, item.k))
                        out.append(struct.pack("<HBBI", BPF_JMP_JA, 0, 0, t - (at + 1) - 1))
                        out.append(struct.pack("<HBBI", BPF_JMP_JA, 0, 0, f - (at + 2) - 1))
                        at += 3
                        continue
                    jt = (pos[item.jt] - at - 1) if item.jt else 0
                    jf = (pos[item.jf] - at - 1) if item.jf else 0
                    if jt > 255 or jf > 255:
                        far.add(idx)
                        grew = True
                    out.append(struct.pack("<HBBI", item.code, min(jt, 255), min(jf, 255), item.k))
                    at += 1
                else:
                    out.append(struct.pack("<HBBI", item.code, 0, 0, item.k))
                    at += 1
            if not grew:
                program = b"".join(out)
                if len(program) // 8 > BPF_MAXINSNS:
                    raise ConfigError(
                        f"seccomp profile compiles to {len(program) // 8} BPF instructions, "
                        f"over the kernel's {BPF_MAXINSNS}; simplify linux.seccomp"
                    )
                return program


# --------------------------------------------------------------------------------------------
# compiler


@dataclass(frozen=True, slots=True)
class _Cond:
    index: int
    op: str
    value: int
    value_two: int


@dataclass(frozen=True, slots=True)
class _Rule:
    conds: tuple[_Cond, ...]
    action: int


def _emit_cond(asm: Assembler, c: _Cond, fail: str) -> None:
    """Fall through when argument ``c.index`` satisfies the condition, else jump to ``fail``."""
    lo_off, hi_off = OFF_ARGS + 8 * c.index, OFF_ARGS + 8 * c.index + 4
    v_hi, v_lo = c.value >> 32, c.value & 0xFFFFFFFF
    ok = asm.label("ok")
    if c.op == "SCMP_CMP_EQ":
        asm.load(hi_off)
        asm.jump(BPF_JMP_JEQ_K, v_hi, None, fail)
        asm.load(lo_off)
        asm.jump(BPF_JMP_JEQ_K, v_lo, None, fail)
    elif c.op == "SCMP_CMP_NE":
        asm.load(hi_off)
        asm.jump(BPF_JMP_JEQ_K, v_hi, None, ok)
        asm.load(lo_off)
        asm.jump(BPF_JMP_JEQ_K, v_lo, fail, None)
    elif c.op == "SCMP_CMP_MASKED_EQ":
        d_hi, d_lo = c.value_two >> 32, c.value_two & 0xFFFFFFFF
        asm.load(hi_off)
        asm.and_(v_hi)
        asm.jump(BPF_JMP_JEQ_K, d_hi, None, fail)
        asm.load(lo_off)
        asm.and_(v_lo)
        asm.jump(BPF_JMP_JEQ_K, d_lo, None, fail)
    elif c.op in ("SCMP_CMP_GT", "SCMP_CMP_GE"):
        asm.load(hi_off)
        asm.jump(BPF_JMP_JGT_K, v_hi, ok, None)
        asm.jump(BPF_JMP_JEQ_K, v_hi, None, fail)
        asm.load(lo_off)
        asm.jump(BPF_JMP_JGT_K if c.op == "SCMP_CMP_GT" else BPF_JMP_JGE_K, v_lo, None, fail)
    elif c.op in ("SCMP_CMP_LT", "SCMP_CMP_LE"):
        asm.load(hi_off)
        asm.jump(BPF_JMP_JGE_K, v_hi, None, ok)  # hi < v_hi: true
        asm.jump(BPF_JMP_JEQ_K, v_hi, None, fail)  # hi > v_hi: false
        asm.load(lo_off)
        asm.jump(BPF_JMP_JGE_K if c.op == "SCMP_CMP_LT" else BPF_JMP_JGT_K, v_lo, fail, None)
    else:  # pragma: no cover - validate_profile rejects it
        raise ValueError(c.op)
    asm.place(ok)


_CACHE: dict[str, bytes] = {}


def compile_profile(profile: dict[str, Any]) -> bytes:
    """Compile an OCI seccomp object (already validated) into a BPF program for x86-64.

    Programs are cached by the profile's canonical JSON: a long-lived runtime compiles the default
    profile once."""
    import json

    key = json.dumps(profile, sort_keys=True)
    program = _CACHE.get(key)
    if program is None:
        program = _compile(profile)
        if len(_CACHE) > 64:
            _CACHE.clear()
        _CACHE[key] = program
    return program


def _compile(profile: dict[str, Any]) -> bytes:
    default_errno = profile.get("defaultErrnoRet")
    default = action_value(profile["defaultAction"], default_errno)
    foreign = default if default not in (SECCOMP_RET_ALLOW, SECCOMP_RET_LOG) else (SECCOMP_RET_ERRNO | _errno.EPERM)
    rules: dict[int, list[_Rule]] = {}
    for rule in profile.get("syscalls") or []:
        action = action_value(rule["action"], rule.get("errnoRet"))
        conds = tuple(
            _Cond(a["index"], a["op"], a.get("value", 0), a.get("valueTwo", 0)) for a in rule.get("args") or []
        )
        for name in rule["names"]:
            nr = SYSCALLS.get(name)
            if nr is None:
                continue  # not an x86-64 syscall (e.g. chown32): skipped, as runc does
            rules.setdefault(nr, []).append(_Rule(conds, action))

    asm = Assembler()
    ret_labels: dict[int, str] = {}

    def ret_label(value: int) -> str:
        if value not in ret_labels:
            ret_labels[value] = asm.label("ret")
        return ret_labels[value]

    # leaves: an unconditional first rule is a plain action; anything else gets a block
    leaf_of: dict[int, str] = {}
    blocks: list[tuple[str, list[_Rule]]] = []
    for nr, rs in sorted(rules.items()):
        if not rs[0].conds:
            leaf_of[nr] = ret_label(rs[0].action)
        else:
            lbl = asm.label(f"sys{nr}_")
            leaf_of[nr] = lbl
            blocks.append((lbl, rs))
    default_lbl = ret_label(default)

    # ranges [lo, hi] -> leaf label, covering 0..max with the default in the gaps
    ranges: list[tuple[int, str]] = []  # (start, leaf); a range ends where the next starts
    nr_max = max(SYSCALLS.values())
    for nr in range(nr_max + 1):
        leaf = leaf_of.get(nr, default_lbl)
        if not ranges or ranges[-1][1] != leaf:
            ranges.append((nr, leaf))

    asm.load(OFF_ARCH)
    asm.jump(BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64, None, ret_label(foreign))
    asm.load(OFF_NR)
    asm.jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, ret_label(foreign), None)
    asm.jump(BPF_JMP_JGT_K, nr_max, default_lbl, None)

    def tree(lo: int, hi: int) -> None:  # ranges[lo:hi], accumulator holds nr
        if hi - lo == 1:
            asm.goto(ranges[lo][1])
            return
        mid = (lo + hi) // 2
        right = asm.label("ge")
        asm.jump(BPF_JMP_JGE_K, ranges[mid][0], right, None)
        tree(lo, mid)
        asm.place(right)
        tree(mid, hi)

    tree(0, len(ranges))
    for lbl, rs in blocks:
        asm.place(lbl)
        for rule in rs:
            nxt = asm.label("next")
            for c in rule.conds:
                _emit_cond(asm, c, nxt)
            asm.ret(rule.action)
            asm.place(nxt)
        asm.ret(default)
    for value, lbl in ret_labels.items():
        asm.place(lbl)
        asm.ret(value)
    return asm.assemble()


# --------------------------------------------------------------------------------------------
# a reference interpreter, so unit tests can check a compiled program without installing it


def run_filter(program: bytes, nr: int, args: tuple[int, ...] = (), arch: int = AUDIT_ARCH_X86_64) -> int:
    """Evaluate ``program`` on a synthetic ``seccomp_data``; return the action value."""
    full = tuple(args) + (0,) * (6 - len(args))
    data = struct.pack("<iIQ6Q", nr, arch, 0, *full)
    insns = [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program), 8)]
    acc, pc = 0, 0
    for _ in range(len(insns) * 4):
        code, jt, jf, k = insns[pc]
        if code == BPF_LD_W_ABS:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == BPF_ALU_AND_K:
            acc &= k
        elif code == BPF_RET_K:
            return int(k)
        elif code == BPF_JMP_JA:
            pc += k
        elif code in (BPF_JMP_JEQ_K, BPF_JMP_JGT_K, BPF_JMP_JGE_K, BPF_JMP_JSET_K):
            taken = {
                BPF_JMP_JEQ_K: acc == k,
                BPF_JMP_JGT_K: acc > k,
                BPF_JMP_JGE_K: acc >= k,
                BPF_JMP_JSET_K: bool(acc & k),
            }[code]
            pc += jt if taken else jf
        else:
            raise ValueError(f"unknown BPF opcode {code:#x}")
        pc += 1
    raise RuntimeError("BPF program did not return")
