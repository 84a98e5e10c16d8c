"""virtkit.cpl0 on a fake vCPU: which rejected CPL0 instructions are completed, with what effect,
and which are refused (and why), without /dev/kvm."""

from __future__ import annotations

import ctypes as C

import pytest

from virtkit.cpl0 import (
    CR4_LA57,
    CR4_OSXSAVE,
    CR4_SMAP,
    EV_EXC_INJECTED,
    EV_EXC_NR,
    EV_FLAGS,
    EV_INT_INJECTED,
    EV_INT_NR,
    EV_INT_SHADOW,
    EV_INT_SOFT,
    KVM_VCPUEVENT_VALID_SHADOW,
    RFLAGS_AC,
    RFLAGS_RF,
    RFLAGS_TF,
    Completer,
    NotExact,
    decode,
    walk,
)
from virtkit.kvm import structs as S

KERNEL_RIP = 0xFFFF_FFFF_8100_0000
DATA = 0xFFFF_8880_0000_5000  # a kernel direct-map address, mapped by a 4 KiB page below
RAM = 0x40_0000  # 4 MiB of fake RAM
PML4, PDPT_HI, PD_HI, PT_HI = 0x1000, 0x2000, 0x3000, 0x4000
PDPT_DM, PD_DM, PT_DM = 0x6000, 0x7000, 0x8000
CODE_PAGE, DATA_PAGE = 0x10000, 0x20000
P, RW, US, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
KERNEL_PTE = P | RW | A | D


class FakeMemory:
    def __init__(self, size: int = RAM) -> None:
        self.ram = bytearray(size)

    def read(self, gpa: int, length: int) -> bytes:
        if gpa < 0 or gpa + length > len(self.ram):
            raise ValueError(f"{gpa:#x} outside RAM")
        return bytes(self.ram[gpa : gpa + length])

    def write(self, gpa: int, data: bytes) -> None:
        if gpa < 0 or gpa + len(data) > len(self.ram):
            raise ValueError(f"{gpa:#x} outside RAM")
        self.ram[gpa : gpa + len(data)] = data

    def u64(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(8, "little"))


def _idx(linear: int, level: int) -> int:
    return (linear >> (12 + 9 * (level - 1))) & 0x1FF


class FakeVcpu:
    """A 64-bit CPL0 vCPU with 4-level paging mapping KERNEL_RIP and DATA to RAM."""

    def __init__(self, *, cpuid: dict[tuple[int, int], dict[str, int]] | None = None) -> None:
        self.memory = FakeMemory()
        m = self.memory
        self.regs = S.kvm_regs(rflags=0x2, rip=KERNEL_RIP, rsp=0xFFFF_C900_0000_0F00)
        self.sregs = S.kvm_sregs()
        self.sregs.cr0 = 0x8005_0033  # PG WP NE ET MP PE
        self.sregs.cr3 = PML4
        self.sregs.cr4 = 0x20  # PAE
        self.sregs.efer = 0x500  # LME LMA
        self.sregs.cs.l, self.sregs.cs.selector = 1, 0x10
        self.events = S.kvm_vcpu_events()
        C.c_uint32.from_buffer(self.events, EV_FLAGS).value = KVM_VCPUEVENT_VALID_SHADOW
        self.events_set = 0
        self.regs_set = 0
        self.xcr0 = 0x2_0000_0007
        self.fsw = 0
        self.cpuid = (
            cpuid
            if cpuid is not None
            else {(1, 0): {"edx": 1 << 19, "ecx": 1 << 22}, (7, 0): {"ebx": (1 << 20) | (1 << 23) | (1 << 24)}}
        )
        # code: PML4[511] -> PDPT_HI[510] -> PD_HI[8] -> PT_HI[0] -> CODE_PAGE
        m.u64(PML4 + 8 * _idx(KERNEL_RIP, 4), PDPT_HI | KERNEL_PTE)
        m.u64(PDPT_HI + 8 * _idx(KERNEL_RIP, 3), PD_HI | KERNEL_PTE)
        m.u64(PD_HI + 8 * _idx(KERNEL_RIP, 2), PT_HI | KERNEL_PTE)
        m.u64(PT_HI + 8 * _idx(KERNEL_RIP, 1), CODE_PAGE | KERNEL_PTE)
        # data: PML4[273] -> PDPT_DM -> PD_DM -> PT_DM[5] -> DATA_PAGE (and [6] -> next page)
        m.u64(PML4 + 8 * _idx(DATA, 4), PDPT_DM | KERNEL_PTE)
        m.u64(PDPT_DM + 8 * _idx(DATA, 3), PD_DM | KERNEL_PTE)
        m.u64(PD_DM + 8 * _idx(DATA, 2), PT_DM | KERNEL_PTE)
        self.map_data(DATA, DATA_PAGE, KERNEL_PTE)
        self.map_data(DATA + 0x1000, DATA_PAGE + 0x1000, KERNEL_PTE)

    def map_data(self, linear: int, gpa: int, flags: int) -> None:
        self.memory.u64(PT_DM + 8 * _idx(linear, 1), gpa | flags)

    def code(self, insn: bytes) -> None:
        self.memory.write(CODE_PAGE, insn)

    # --- VcpuOps ---
    def get_regs(self) -> S.kvm_regs:
        return S.kvm_regs.from_buffer_copy(self.regs)

    def set_regs(self, regs: S.kvm_regs) -> None:
        self.regs = S.kvm_regs.from_buffer_copy(regs)
        self.regs_set += 1

    def get_sregs(self) -> S.kvm_sregs:
        return S.kvm_sregs.from_buffer_copy(self.sregs)

    def get_vcpu_events(self) -> S.kvm_vcpu_events:
        return S.kvm_vcpu_events.from_buffer_copy(self.events)

    def set_vcpu_events(self, events: S.kvm_vcpu_events) -> None:
        self.events = S.kvm_vcpu_events.from_buffer_copy(events)
        self.events_set += 1

    def get_xcrs(self) -> S.kvm_xcrs:
        x = S.kvm_xcrs()
        x.nr_xcrs = 1
        x.xcrs[0].xcr, x.xcrs[0].value = 0, self.xcr0
        return x

    def get_fpu(self) -> S.kvm_fpu:
        return S.kvm_fpu(fsw=self.fsw)

    def get_cpuid2(self) -> list[S.kvm_cpuid_entry2]:
        out = []
        for (leaf, sub), regs in self.cpuid.items():
            e = S.kvm_cpuid_entry2(function=leaf, index=sub)
            for name, value in regs.items():
                setattr(e, name, value)
            out.append(e)
        return out


def run(vcpu: FakeVcpu, insn: bytes, *, from_memory: bool = False) -> tuple[str | None, str]:
    vcpu.code(insn)
    out = Completer(vcpu, vcpu.memory).complete(None if from_memory else insn)
    return out.kind, out.reason


def injected_interrupt(vcpu: FakeVcpu) -> tuple[int, int, int]:
    r = vcpu.events.raw
    return r[EV_INT_INJECTED], r[EV_INT_NR], r[EV_INT_SOFT]


def injected_exception(vcpu: FakeVcpu) -> tuple[int, int]:
    return vcpu.events.raw[EV_EXC_INJECTED], vcpu.events.raw[EV_EXC_NR]


# --- int3 / int n ---------------------------------------------------------------------------------
def test_int3_moves_rip_past_it_and_injects_vector_3() -> None:
    v = FakeVcpu()
    v.regs.rflags = 0x2 | RFLAGS_RF
    assert run(v, b"\xcc") == ("int3", "")
    assert v.regs.rip == KERNEL_RIP + 1
    assert not v.regs.rflags & RFLAGS_RF
    assert injected_interrupt(v) == (1, 3, 0)
    assert injected_exception(v) == (0, 0)


def test_int_n_injects_its_vector_without_error_code() -> None:
    v = FakeVcpu()
    assert run(v, b"\xcd\x0e") == ("int", "")  # INT 14 pushes no error code, unlike #PF
    assert v.regs.rip == KERNEL_RIP + 2
    assert injected_interrupt(v) == (1, 14, 0)
    assert injected_exception(v) == (0, 0)


def test_instruction_bytes_are_fetched_through_the_page_tables_when_kvm_gives_none() -> None:
    v = FakeVcpu()
    assert run(v, b"\xcd\x80", from_memory=True) == ("int", "")
    assert injected_interrupt(v) == (1, 0x80, 0)


def test_interrupt_shadow_is_cleared_once_the_instruction_completed() -> None:
    v = FakeVcpu()
    v.events.raw[EV_INT_SHADOW] = 1
    assert run(v, b"\x0f\x01\xca")[0] == "clac"
    assert v.events.raw[EV_INT_SHADOW] == 0 and v.events_set == 1


# --- xgetbv ---------------------------------------------------------------------------------------
def test_xgetbv_reads_xcr0_into_edx_eax() -> None:
    v = FakeVcpu()
    v.sregs.cr4 |= CR4_OSXSAVE
    v.regs.rax, v.regs.rdx, v.regs.rcx = 0xFFFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_0000_0000
    assert run(v, b"\x0f\x01\xd0") == ("xgetbv", "")
    assert (v.regs.rax, v.regs.rdx) == (7, 2)  # upper halves zeroed
    assert v.regs.rip == KERNEL_RIP + 3


def test_xgetbv_without_osxsave_raises_ud_at_the_instruction() -> None:
    v = FakeVcpu()
    assert run(v, b"\x0f\x01\xd0") == ("xgetbv(#UD)", "")
    assert v.regs.rip == KERNEL_RIP and v.regs_set == 0
    assert injected_exception(v) == (1, 6)


def test_xgetbv_of_another_xcr_is_refused() -> None:
    v = FakeVcpu()
    v.sregs.cr4 |= CR4_OSXSAVE
    v.regs.rcx = 1
    kind, why = run(v, b"\x0f\x01\xd0")
    assert kind is None and "ECX=0x1" in why
    assert v.regs_set == 0 and v.events_set == 0


# --- clac / stac / flushes ------------------------------------------------------------------------
def test_stac_and_clac_set_and_clear_ac() -> None:
    v = FakeVcpu()
    assert run(v, b"\x0f\x01\xcb") == ("stac", "")
    assert v.regs.rflags & RFLAGS_AC
    v.regs.rip = KERNEL_RIP
    assert run(v, b"\x0f\x01\xca") == ("clac", "")
    assert not v.regs.rflags & RFLAGS_AC


def test_stac_without_smap_in_cpuid_is_ud() -> None:
    v = FakeVcpu(cpuid={(7, 0): {"ebx": 0}})
    assert run(v, b"\x0f\x01\xcb") == ("stac(#UD)", "")
    assert injected_exception(v) == (1, 6) and not v.regs.rflags & RFLAGS_AC


def test_lock_prefix_on_a_completed_instruction_is_refused_not_guessed() -> None:
    # the CPU raises #UD; capstone does not decode these, so virtkit reports them
    v = FakeVcpu()
    kind, why = run(v, b"\xf0\x0f\x01\xcb")
    assert kind is None and "do not decode" in why
    assert v.regs_set == 0 and v.events_set == 0


def test_clwb_checks_the_address_and_moves_on() -> None:
    v = FakeVcpu()
    v.regs.rax = DATA
    assert run(v, b"\x66\x0f\xae\x30") == ("clwb", "")  # clwb (%rax)
    assert v.regs.rip == KERNEL_RIP + 4


def test_clflush_of_an_unmapped_address_is_refused() -> None:
    v = FakeVcpu()
    v.regs.rax = DATA + 0x3000
    kind, why = run(v, b"\x0f\xae\x38")
    assert kind is None and "not mapped" in why


# --- movbe ----------------------------------------------------------------------------------------
def test_movbe_loads_32_bits_swapped_and_zero_extends() -> None:
    v = FakeVcpu()
    v.memory.write(DATA_PAGE + 0x10, bytes.fromhex("11223344"))
    v.regs.rcx, v.regs.rax = DATA, 0xFFFF_FFFF_FFFF_FFFF
    assert run(v, b"\x0f\x38\xf0\x41\x10") == ("movbe", "")  # movbe 0x10(%rcx), %eax
    assert v.regs.rax == 0x1122_3344
    assert v.regs.rip == KERNEL_RIP + 5


def test_movbe_16_bit_load_keeps_the_upper_bits() -> None:
    v = FakeVcpu()
    v.memory.write(DATA_PAGE, bytes.fromhex("1122"))
    v.regs.rcx, v.regs.rdx = DATA, 0xFFFF_FFFF_FFFF_FFFF
    assert run(v, b"\x66\x0f\x38\xf0\x11") == ("movbe", "")  # movbe (%rcx), %dx
    assert v.regs.rdx == 0xFFFF_FFFF_FFFF_1122


def test_movbe_store_64_across_a_page_boundary() -> None:
    v = FakeVcpu()
    v.regs.rcx, v.regs.r9 = DATA + 0xFFC, 0x0102_0304_0506_0708
    assert run(v, b"\x4c\x0f\x38\xf1\x09") == ("movbe", "")  # movbe %r9, (%rcx)
    got = v.memory.read(DATA_PAGE + 0xFFC, 4) + v.memory.read(DATA_PAGE + 0x1000, 4)
    assert got == bytes.fromhex("0102030405060708")


def test_movbe_rip_relative() -> None:
    v = FakeVcpu()
    insn = b"\x0f\x38\xf0\x05" + (0x100 - 8).to_bytes(4, "little")  # movbe 0x100 - 8(%rip), %eax
    v.memory.write(CODE_PAGE + 0x100, bytes.fromhex("aabbccdd"))
    assert run(v, insn) == ("movbe", "")
    assert v.regs.rax == 0xAABB_CCDD


def test_movbe_store_to_a_clean_page_is_refused() -> None:
    v = FakeVcpu()
    v.map_data(DATA, DATA_PAGE, P | RW | A)  # D clear: the CPU would set it
    v.regs.rcx = DATA
    kind, why = run(v, b"\x0f\x38\xf1\x01")
    assert kind is None and "dirty bit" in why
    assert v.memory.read(DATA_PAGE, 4) == bytes(4) and v.regs_set == 0


def test_movbe_to_a_read_only_page_is_refused() -> None:
    v = FakeVcpu()
    v.map_data(DATA, DATA_PAGE, P | A | D)
    v.regs.rcx = DATA
    kind, why = run(v, b"\x0f\x38\xf1\x01")
    assert kind is None and "read-only" in why


def test_movbe_from_a_user_page_with_smap_is_refused_unless_ac() -> None:
    v = FakeVcpu()
    for level, table in ((4, PML4), (3, PDPT_DM), (2, PD_DM)):
        nxt = {PML4: PDPT_DM, PDPT_DM: PD_DM, PD_DM: PT_DM}[table]
        v.memory.u64(table + 8 * _idx(DATA, level), nxt | KERNEL_PTE | US)
    v.map_data(DATA, DATA_PAGE, KERNEL_PTE | US)
    v.sregs.cr4 |= CR4_SMAP
    v.regs.rcx = DATA
    kind, why = run(v, b"\x0f\x38\xf0\x01")
    assert kind is None and "SMAP" in why
    v.regs.rflags |= RFLAGS_AC
    assert run(v, b"\x0f\x38\xf0\x01") == ("movbe", "")


def test_movbe_without_cpuid_bit_is_ud() -> None:
    v = FakeVcpu(cpuid={(1, 0): {}})
    v.regs.rcx = DATA
    assert run(v, b"\x0f\x38\xf0\x01") == ("movbe(#UD)", "")


# --- refused --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("insn", "cpuid", "words"),
    [
        (b"\xf0\x48\x0f\xc7\x0e", None, "cmpxchg16b is not an instruction"),
        (b"\x0f\x01\xfd", {(0x8000_0008, 0): {"ebx": 1 << 4}}, "rdpru"),
        (b"\x66\x0f\x38\x82\x08", {(7, 0): {"ebx": 1 << 10}}, "invpcid"),
        (b"\x0f\xae\x20", None, "xsave is not an instruction"),
    ],
)
def test_what_cannot_be_done_exactly_is_refused(
    insn: bytes, cpuid: dict[tuple[int, int], dict[str, int]] | None, words: str
) -> None:
    v = FakeVcpu(cpuid=cpuid)
    v.regs.rsi = v.regs.rax = DATA
    kind, why = run(v, insn)
    assert kind is None and words in why
    assert v.regs_set == 0 and v.events_set == 0


def test_rdpru_and_invpcid_without_the_feature_are_ud() -> None:
    assert run(FakeVcpu(cpuid={}), b"\x0f\x01\xfd") == ("rdpru(#UD)", "")
    assert run(FakeVcpu(cpuid={}), b"\x66\x0f\x38\x82\x08") == ("invpcid(#UD)", "")


def test_single_step_cpl3_and_pending_events_are_refused() -> None:
    v = FakeVcpu()
    v.regs.rflags |= RFLAGS_TF
    assert "TF" in run(v, b"\xcc")[1]
    v = FakeVcpu()
    v.sregs.cs.selector = 0x33
    assert "CPL3" in run(v, b"\xcc")[1]
    v = FakeVcpu()
    v.events.raw[EV_EXC_INJECTED] = 1
    assert "already being delivered" in run(v, b"\xcc")[1]
    v = FakeVcpu()
    v.sregs.cs.l = 0
    assert "64-bit" in run(v, b"\xcc")[1]


def test_garbage_bytes_are_refused() -> None:
    kind, why = run(FakeVcpu(), b"\x0f\x0b")  # ud2 decodes, and is not completed
    assert kind is None and "ud2" in why
    kind, why = run(FakeVcpu(), b"\x0f\xff\xff\xff")
    assert kind is None


# --- the page walk --------------------------------------------------------------------------------
def test_walk_2m_and_1g_pages_and_5_levels() -> None:
    v = FakeVcpu()
    m = v.memory
    big = 0xFFFF_8881_0000_0000  # PDPT_DM[4]: a 1 GiB page
    m.u64(PDPT_DM + 8 * _idx(big, 3), 0x4000_0000 | KERNEL_PTE | PS)
    assert walk(m, v.sregs, big + 0x12_3456)[0] == 0x4012_3456
    mid = 0xFFFF_8880_0040_0000  # PD_DM[2]: a 2 MiB page
    m.u64(PD_DM + 8 * _idx(mid, 2), 0x20_0000 | KERNEL_PTE | PS)
    assert walk(m, v.sregs, mid + 0x1234)[0] == 0x20_1234
    # 5-level: one more table on top, whose entry 0 leads to the same PML4
    v.sregs.cr4 |= CR4_LA57
    v.sregs.cr3 = 0x9000
    m.u64(0x9000, PML4 | KERNEL_PTE)
    la = DATA & ((1 << 48) - 1)  # the same indices at levels 4-1, index 0 at level 5
    assert walk(m, v.sregs, la + 0x24)[0] == DATA_PAGE + 0x24
    with pytest.raises(NotExact, match="not mapped"):
        walk(m, v.sregs, 1 << 48)  # level-5 entry 1 is absent


def test_decode_reports_prefixes_and_operands() -> None:
    d = decode(b"\x65\x66\x0f\x38\xf1\x04\x25\x10\x00\x00\x00", 0)  # movbe %ax, %gs:0x10
    assert d.mnemonic == "movbe" and d.store and d.size == 2
    assert d.prefixes == (0x65, 0x66) and d.mem is not None and d.mem.segment == "gs"


@pytest.mark.parametrize("code", [b"\xcc", b"\xcd\x80", b"\x0f\x01\xd0", b"\x0f\x01\xca", b"\x0f\x01\xcb"])
def test_the_capstone_free_decoder_agrees_with_capstone(code: bytes) -> None:
    import capstone

    ours = decode(code + b"\x90" * 8, 0)
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    theirs = next(md.disasm(code, 0))
    assert (ours.mnemonic, ours.size_bytes) == (theirs.mnemonic, theirs.size)


def test_prefixed_forms_are_left_to_capstone() -> None:
    d = decode(b"\x66\x0f\x01\xcb", 0)  # not the plain STAC pattern: capstone decides
    assert d.prefixes == (0x66,) or d.mnemonic != "stac"


# --- popcnt (the test kernel's first rejected instruction after xsave, with noxsave) ----------------
POPCNT_CPUID = {(1, 0): {"ecx": 1 << 23}}


def test_popcnt_64_bit_register_counts_and_sets_only_zf_when_zero() -> None:
    v = FakeVcpu(cpuid=POPCNT_CPUID)
    v.regs.rdi, v.regs.rax, v.regs.rflags = 0xF0F0_0000_0000_0001, 0xDEAD, 0x2 | 0x8D5  # CF PF AF ZF SF OF set
    assert run(v, b"\xf3\x48\x0f\xb8\xc7") == ("popcnt", "")  # popcnt %rdi, %rax
    assert v.regs.rax == 9 and v.regs.rflags == 0x2 and v.regs.rip == KERNEL_RIP + 5
    v = FakeVcpu(cpuid=POPCNT_CPUID)
    v.regs.rdi, v.regs.rax = 0, 0xDEAD
    assert run(v, b"\xf3\x48\x0f\xb8\xc7") == ("popcnt", "")
    assert v.regs.rax == 0 and v.regs.rflags & 0x40


def test_popcnt_32_bit_zero_extends_16_bit_keeps_the_upper_bits() -> None:
    v = FakeVcpu(cpuid=POPCNT_CPUID)
    v.regs.rcx, v.regs.rdx = 0xFFFF_FFFF_0000_00FF, 0xFFFF_FFFF_FFFF_FFFF
    assert run(v, b"\xf3\x0f\xb8\xd1") == ("popcnt", "")  # popcnt %ecx, %edx
    assert v.regs.rdx == 8
    v = FakeVcpu(cpuid=POPCNT_CPUID)
    v.regs.rcx, v.regs.rdx = 0x0003, 0xFFFF_FFFF_FFFF_FFFF
    assert run(v, b"\x66\xf3\x0f\xb8\xd1") == ("popcnt", "")  # popcnt %cx, %dx
    assert v.regs.rdx == 0xFFFF_FFFF_FFFF_0002


def test_popcnt_from_memory_reads_through_the_page_tables() -> None:
    v = FakeVcpu(cpuid=POPCNT_CPUID)
    v.memory.write(DATA_PAGE + 0x10, (0x0101_0101).to_bytes(4, "little"))
    v.regs.rcx = DATA
    assert run(v, b"\xf3\x0f\xb8\x41\x10") == ("popcnt", "")  # popcnt 0x10(%rcx), %eax
    assert v.regs.rax == 4


def test_popcnt_without_its_cpuid_bit_is_ud() -> None:
    v = FakeVcpu(cpuid={})
    assert run(v, b"\xf3\x48\x0f\xb8\xc7") == ("popcnt(#UD)", "")
    assert injected_exception(v) == (1, 6) and v.regs.rip == KERNEL_RIP


# --- wait / fwait ---------------------------------------------------------------------------------
def test_wait_with_nothing_pending_only_moves_rip() -> None:
    v = FakeVcpu()
    assert run(v, b"\x9b\x65\x48\xc7\x05") == ("wait", "")  # 9B then an unrelated instruction
    assert v.regs.rip == KERNEL_RIP + 1 and injected_exception(v) == (0, 0)


def test_wait_before_an_x87_opcode_is_a_wait_of_its_own() -> None:
    v = FakeVcpu()
    assert run(v, b"\x9b\xdb\xe3") == ("wait", "")  # FINIT = WAIT + FNINIT
    assert v.regs.rip == KERNEL_RIP + 1


def test_wait_with_ts_and_mp_raises_nm_at_the_instruction() -> None:
    v = FakeVcpu()
    v.sregs.cr0 |= 0x8 | 0x2  # TS, MP
    assert run(v, b"\x9b") == ("wait(#NM)", "")
    assert v.regs.rip == KERNEL_RIP and injected_exception(v) == (1, 7)


def test_wait_with_ts_but_not_mp_does_nothing_more() -> None:
    v = FakeVcpu()
    v.sregs.cr0 = (v.sregs.cr0 | 0x8) & ~0x2
    assert run(v, b"\x9b") == ("wait", "")


def test_wait_with_a_pending_x87_exception_is_refused() -> None:
    v = FakeVcpu()
    v.fsw = 0x80 | 0x1  # ES, IE
    kind, reason = run(v, b"\x9b")
    assert kind is None and "x87 exception pending" in reason
    assert v.regs.rip == KERNEL_RIP and v.regs_set == 0


# --- lsl ------------------------------------------------------------------------------------------
def _descriptor(limit: int, *, kind: int, s: int = 1, dpl: int = 0, g: int = 0) -> int:
    """An 8-byte segment descriptor (SDM vol. 3A §3.4.5), present, 64-bit code or data."""
    return (limit & 0xFFFF) | (kind & 0xF) << 40 | s << 44 | dpl << 45 | 1 << 47 | ((limit >> 16) & 0xF) << 48 | g << 55


def _gdt_vcpu(*entries: int) -> FakeVcpu:
    v = FakeVcpu()
    for i, e in enumerate(entries):
        v.memory.u64(DATA_PAGE + 8 * i, e)
    v.sregs.gdt.base, v.sregs.gdt.limit = DATA, 8 * len(entries) - 1
    return v


LSL_RAX_EAX = b"\x48\x0f\x03\xc0"  # lsl rax, eax: what Linux's paranoid entry runs


def test_lsl_loads_the_byte_limit_and_sets_zf() -> None:
    # Linux's CPUNODE segment: a DPL3 data segment whose limit encodes node << 12 | cpu
    v = _gdt_vcpu(0, _descriptor(0x1003, kind=0x5, dpl=3))
    v.regs.rax, v.regs.rflags = 0xFFFF_FFFF_0000_0000 | 0x0B, 0x2 | 0x1  # selector 8 | RPL 3; CF set
    assert run(v, LSL_RAX_EAX) == ("lsl", "")
    assert v.regs.rax == 0x1003  # 32-bit limit zero-extended
    assert v.regs.rflags & 0x40 and v.regs.rflags & 0x1  # ZF set, CF untouched
    assert v.regs.rip == KERNEL_RIP + 4


def test_lsl_scales_a_page_granular_limit() -> None:
    v = _gdt_vcpu(0, _descriptor(0xFFFFF, kind=0xB, g=1))  # flat code segment
    v.regs.rax = 0x8
    assert run(v, LSL_RAX_EAX) == ("lsl", "")
    assert v.regs.rax == 0xFFFF_FFFF


def test_lsl_16_bit_keeps_the_upper_bits() -> None:
    v = _gdt_vcpu(0, _descriptor(0x12345, kind=0x3))
    v.regs.rax = 0xAAAA_BBBB_CCCC_0008
    assert run(v, b"\x66\x0f\x03\xc0") == ("lsl", "")  # lsl ax, ax
    assert v.regs.rax == 0xAAAA_BBBB_CCCC_2345


@pytest.mark.parametrize(
    ("entries", "selector", "why"),
    [
        ((0, _descriptor(0x10, kind=0x3)), 0x0, "the null selector"),
        ((0, _descriptor(0x10, kind=0x3)), 0x10, "beyond the GDT limit"),
        ((0, _descriptor(0x10, kind=0x3, dpl=0)), 0xB, "RPL 3 above DPL 0"),
        ((0, _descriptor(0x10, kind=0xE, s=0)), 0x8, "an interrupt gate is not a type LSL accepts"),
    ],
)
def test_lsl_clears_zf_and_leaves_the_destination(entries: tuple[int, ...], selector: int, why: str) -> None:
    v = _gdt_vcpu(*entries)
    v.regs.rax, v.regs.rflags = selector, 0x2 | 0x40
    assert run(v, LSL_RAX_EAX) == ("lsl", ""), why
    assert v.regs.rax == selector and not v.regs.rflags & 0x40, why


def test_lsl_of_a_conforming_code_segment_ignores_the_rpl() -> None:
    v = _gdt_vcpu(0, _descriptor(0x77, kind=0xE, dpl=0))  # code, conforming, readable
    v.regs.rax = 0xB
    assert run(v, LSL_RAX_EAX) == ("lsl", "")
    assert v.regs.rax == 0x77 and v.regs.rflags & 0x40


def test_lsl_of_a_tss_reads_the_low_half_of_its_16_byte_descriptor() -> None:
    v = _gdt_vcpu(0, _descriptor(0x67, kind=0x9, s=0), 0)
    v.regs.rax = 0x8
    assert run(v, LSL_RAX_EAX) == ("lsl", "")
    assert v.regs.rax == 0x67


def test_lsl_refuses_ldt_selectors_and_memory_sources() -> None:
    v = _gdt_vcpu(0, _descriptor(0x10, kind=0x3))
    v.regs.rax = 0xC  # TI = 1
    assert run(v, LSL_RAX_EAX)[0] is None
    v = _gdt_vcpu(0, _descriptor(0x10, kind=0x3))
    kind, reason = run(v, b"\x48\x0f\x03\x00")  # lsl rax, word ptr [rax]
    assert kind is None and "lsl form" in reason
