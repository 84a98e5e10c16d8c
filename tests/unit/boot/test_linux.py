"""The Linux boot protocols (boot/linux.py, boot/pvh.py) on synthetic images: what lands where in
guest memory, and a one-line error for every malformed kernel, initrd or setup header."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from elfbuild import elf, multiboot_header  # type: ignore[import-not-found]
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from linuxbuild import bzimage, note, vmlinux  # type: ignore[import-not-found]

from virtkit.arch import layout, x86
from virtkit.boot import linux, pvh
from virtkit.boot.loader import ModuleSpec, detect_protocol, load_kernel
from virtkit.errors import BootError
from virtkit.kvm import structs as S
from virtkit.memory import GuestMemory

MiB = 1 << 20
ZP = layout.ZERO_PAGE_ADDR


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory(layout.ram_ranges(64 * MiB))
    yield m
    m.close()


def write(tmp_path: Path, data: bytes, name: str = "bzImage") -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def e820(mem: GuestMemory) -> list[tuple[int, int, int]]:
    n = mem.read(ZP + linux.ZP_E820_ENTRIES, 1)[0]
    return [struct.unpack("<QQI", mem.read(ZP + linux.ZP_E820_TABLE + 20 * i, 20)) for i in range(n)]


def test_setup_header_is_parsed() -> None:
    h = linux.parse_setup_header(bzimage(setup_sects=0, init_size=0x30_0000, cmdline_size=0x1FF), "k")
    assert (h.setup_sects, h.setup_size, h.version_text) == (4, 5 * 512, "2.15")
    assert (h.syssize, h.payload_size) == (0x60, 0x600)
    assert (h.init_size, h.cmdline_size, h.initrd_addr_max) == (0x30_0000, 0x1FF, 0x7FFF_FFFF)
    assert h.relocatable and h.pref_address == 0x100_0000 and h.header_end == 0x26C
    # relocatable: runs at 1 MiB rounded up to the alignment, but not below pref_address
    assert h.run_address(0x10_0000) == 0x100_0000


def test_bzimage_loads_with_zero_page_cmdline_initrd(tmp_path: Path, mem: GuestMemory) -> None:
    payload = bytes(range(256)) * 6
    kernel = write(tmp_path, bzimage(payload=payload))
    initrd = write(tmp_path, b"INITRD" * 1000, "initrd.img")
    entry = load_kernel(mem, kernel, cmdline="console=ttyS0 quiet", initrd=initrd)
    assert (entry.mode, entry.rip, entry.rsi) == ("linux64", 0x10_0200, ZP)
    assert entry.protocol == "linux (bzImage, boot protocol 2.15)"
    assert mem.read(layout.LINUX_LOAD_ADDR, len(payload)) == payload
    # the setup header is copied, then the loader's fields filled in (zero-page.rst, boot.rst)
    assert mem.read(ZP + 0x202, 4) == b"HdrS" and mem.read_u16(ZP + 0x206) == 0x020F
    assert mem.read(ZP + 0x210, 1) == b"\xff"  # type_of_loader
    cmd = mem.read_u32(ZP + 0x228)
    assert cmd == layout.LINUX_CMDLINE_ADDR and mem.read(cmd, 20) == b"console=ttyS0 quiet\0"
    assert mem.read_u64(ZP + 0x070) == layout.ACPI_RSDP_ADDR
    rd_addr, rd_size = mem.read_u32(ZP + 0x218), mem.read_u32(ZP + 0x21C)
    assert rd_size == 6000 and rd_addr % 4096 == 0
    assert mem.read(rd_addr, rd_size) == b"INITRD" * 1000
    assert rd_addr + rd_size <= 64 * MiB and rd_addr + rd_size > 64 * MiB - 4096  # top of low RAM
    assert e820(mem) == [
        (0, layout.EBDA_START, linux.E820_RAM),
        (layout.EBDA_START, MiB - layout.EBDA_START, linux.E820_RESERVED),
        (MiB, 63 * MiB, linux.E820_RAM),
    ]
    # the boot protocol's GDT: __BOOT_CS 0x10 (64-bit code), __BOOT_DS 0x18, the TSS at 0x20
    gdt = struct.unpack("<6Q", mem.read(layout.GDT_ADDR, 48))
    assert gdt == x86.linux_gdt() and gdt[2] == 0x00AF9B000000FFFF and gdt[3] == 0x00CF93000000FFFF
    assert mem.read_u64(layout.PML4_ADDR) & ~0xFFF == layout.PDPT_ADDR


def test_initrd_stays_below_initrd_addr_max(tmp_path: Path, mem: GuestMemory) -> None:
    kernel = write(tmp_path, bzimage(initrd_addr_max=0x200_0000 - 1, pref_address=0x100_0000))
    initrd = write(tmp_path, b"x" * 8192, "initrd.img")
    load_kernel(mem, kernel, initrd=initrd)
    addr = mem.read_u32(ZP + 0x218)
    assert addr + 8192 <= 0x200_0000 and addr == 0x200_0000 - 8192


def test_e820_has_ram_above_4g_for_big_guests() -> None:
    big = 5 * layout.GiB
    table = linux.e820_map(big)
    assert table[2] == (MiB, layout.MMIO_HOLE_START - MiB, linux.E820_RAM)
    assert table[3] == (layout.MMIO_HOLE_END, big - layout.MMIO_HOLE_START, linux.E820_RAM)


def test_vmlinux_with_linux_note_boots_with_zero_page(tmp_path: Path, mem: GuestMemory) -> None:
    image = vmlinux(0x100_0000, 0x100_0000, b"\xf4" * 64, 0x1000, notes=note(b"Linux", 0x100, b"\0" * 4))
    kernel = write(tmp_path, image, "vmlinux")
    assert detect_protocol(image, "vmlinux") == "linux"
    entry = load_kernel(mem, kernel, cmdline="root=/dev/vda")
    assert (entry.mode, entry.rip, entry.rsi) == ("linux64", 0x100_0000, ZP)
    assert entry.protocol == "linux (vmlinux ELF64)"
    # no setup header in a vmlinux: the loader makes up the parts the kernel reads
    assert mem.read(ZP + 0x202, 4) == b"HdrS" and mem.read_u16(ZP + 0x1FE) == 0xAA55
    assert mem.read(mem.read_u32(ZP + 0x228), 14) == b"root=/dev/vda\0"


def test_vmlinux_virtual_entry_is_translated(tmp_path: Path, mem: GuestMemory) -> None:
    virt = 0xFFFF_FFFF_8100_0000
    image = vmlinux(virt + 0x10, 0x100_0000, b"\xf4" * 64, 0x1000, notes=note(b"Linux", 1, b""), vaddr=virt)
    assert load_kernel(mem, write(tmp_path, image, "vmlinux")).rip == 0x100_0010


def test_elf64_without_linux_notes_stays_direct64(tmp_path: Path, mem: GuestMemory) -> None:
    image = vmlinux(0x20_0000, 0x20_0000, b"\xf4", 1)
    assert load_kernel(mem, write(tmp_path, image, "k.elf")).mode == "long64"


def test_pvh_entry_and_start_info(tmp_path: Path, mem: GuestMemory) -> None:
    notes = note(b"Linux", 1, b"") + note(b"Xen", pvh.XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<Q", 0x100_0040))
    kernel = write(tmp_path, vmlinux(0x100_0000, 0x100_0000, b"\xf4" * 128, 0x1000, notes=notes), "vmlinux")
    initrd = write(tmp_path, b"R" * 5000, "initrd.img")
    entry = load_kernel(mem, kernel, cmdline="console=hvc0", protocol="pvh", initrd=initrd)
    assert (entry.mode, entry.rip, entry.rbx) == ("pvh32", 0x100_0040, layout.PVH_START_INFO_ADDR)
    si = layout.PVH_START_INFO_ADDR
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries, _ = struct.unpack(
        "<IIIIQQQQII", mem.read(si, 56)
    )
    assert (magic, version, flags, nr_modules) == (0x336E_C578, 1, 0, 1)
    assert mem.read(cmdline, 13) == b"console=hvc0\0" and rsdp == layout.ACPI_RSDP_ADDR
    mod_addr, mod_size = struct.unpack("<QQ", mem.read(modlist, 16))
    assert mod_size == 5000 and mem.read(mod_addr, 5000) == b"R" * 5000
    table = [struct.unpack("<QQII", mem.read(memmap + 24 * i, 24))[:3] for i in range(entries)]
    assert table == linux.e820_map(64 * MiB)


def test_pvh_register_state() -> None:
    regs, sregs = S.kvm_regs(), S.kvm_sregs()
    x86.apply_entry_state(regs, sregs, x86.EntryState("pvh32", 0x100_0040, rbx=layout.PVH_START_INFO_ADDR))
    assert (sregs.cs.db, sregs.cs.l, sregs.cs.base, sregs.cs.limit) == (1, 0, 0, 0xFFFF_FFFF)
    assert sregs.cr0 & x86.CR0_PE and not sregs.cr0 & x86.CR0_PG and sregs.cr4 == 0 and sregs.efer == 0
    assert (sregs.tr.base, sregs.tr.limit, sregs.tr.type) == (0, 0x67, 0xB)
    assert regs.rbx == layout.PVH_START_INFO_ADDR and not regs.rflags & x86.RFLAGS_IF


def test_linux64_register_state() -> None:
    regs, sregs = S.kvm_regs(), S.kvm_sregs()
    x86.apply_entry_state(regs, sregs, x86.EntryState("linux64", 0x10_0200, rsi=ZP))
    assert (sregs.cs.selector, sregs.cs.l, sregs.ds.selector, sregs.ss.selector) == (0x10, 1, 0x18, 0x18)
    assert (sregs.tr.selector, sregs.tr.base, sregs.tr.limit, sregs.tr.type) == (0x20, layout.LINUX_TSS_ADDR, 0x67, 0xB)
    assert (sregs.gdt.base, sregs.gdt.limit) == (layout.GDT_ADDR, 47)
    assert (sregs.idt.base, sregs.idt.limit) == (layout.LINUX_IDT_ADDR, 7)
    assert sregs.efer & x86.EFER_LMA and sregs.cr0 & x86.CR0_PG and sregs.cr3 == layout.PML4_ADDR
    assert (regs.rip, regs.rsi) == (0x10_0200, ZP) and not regs.rflags & x86.RFLAGS_IF


def test_boot_msrs_lapic_and_fpu_values() -> None:
    msrs = x86.linux_boot_msrs()
    assert msrs[x86.MSR_IA32_MISC_ENABLE] == 1 and msrs[x86.MSR_MTRR_DEF_TYPE] == 0x806
    for msr in (0x174, 0x175, 0x176, 0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084, 0xC000_0102):
        assert msrs[msr] == 0
    state = S.kvm_lapic_state()
    struct.pack_into("<I", state.regs, 0x350, 0x10000 | 0x700)
    struct.pack_into("<I", state.regs, 0x360, 0x10000)
    out = bytes(x86.lapic_with_lint(state).regs)
    assert struct.unpack_from("<I", out, 0x350)[0] == 0x10700  # ExtINT, mask kept
    assert struct.unpack_from("<I", out, 0x360)[0] == 0x10400  # NMI
    fpu = x86.fpu_init_state()
    assert (fpu.fcw, fpu.mxcsr) == (0x37F, 0x1F80)


@pytest.mark.parametrize(
    "image,fragment",
    [
        (bzimage(version=0x020B), "boot protocol 2.11: virtkit needs 2.12 or later"),
        (bzimage(version=0x0204), "boot protocol 2.04"),
        (bzimage(xloadflags=0x2), "no 64-bit entry point (XLF_KERNEL_64 clear)"),
        (bzimage(loadflags=0), "is a zImage"),
        (bzimage()[:-32], "is truncated: its header says"),
        (bzimage()[:0x250], "too short for a boot protocol 2.12 header"),
        (bzimage(magic=b"HdrX"), "no Linux 'HdrS' setup header magic"),
        (bzimage(boot_flag=0x1234), "bad boot_flag"),
        (bzimage(relocatable=1, kernel_alignment=0x30000), "not a power of two"),
        (bzimage(pref_address=0x1000), "wants to run at 0x1000"),
        (bzimage(init_size=0x1000_0000), "needs RAM up to"),
        (bzimage(cmdline_size=4), "accepts at most 4 (cmdline_size)"),
    ],
)
def test_malformed_bzimage_gets_one_line_error(tmp_path: Path, mem: GuestMemory, image: bytes, fragment: str) -> None:
    with pytest.raises(BootError) as e:
        load_kernel(mem, write(tmp_path, image), cmdline="console=ttyS0")
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_initrd_too_large_for_ram(tmp_path: Path, mem: GuestMemory) -> None:
    kernel = write(tmp_path, bzimage())
    huge = write(tmp_path, b"\0" * (65 * MiB), "huge.img")
    with pytest.raises(BootError, match="initrd .* larger than guest memory"):
        load_kernel(mem, kernel, initrd=huge)
    # fits in RAM, but not between the kernel (it runs at 16 MiB, init_size 4 MiB) and the top
    big = write(tmp_path, b"\0" * (45 * MiB), "big.img")
    with pytest.raises(BootError, match=r"only \d+ fit between the kernel .* give the VM at least --memory"):
        load_kernel(mem, kernel, initrd=big)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"protocol": "pvh"}, "is a Linux bzImage: PVH needs an uncompressed vmlinux"),
        ({"modules": [ModuleSpec("/etc/hostname")]}, "has no Multiboot modules: give the initrd with --initrd"),
        ({"initrd": "/nonexistent/initrd"}, "initrd /nonexistent/initrd does not exist"),
        ({"cmdline": "a\0b"}, "contains a NUL byte"),
    ],
)
def test_bad_linux_requests(tmp_path: Path, mem: GuestMemory, kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(BootError, match=fragment):
        load_kernel(mem, write(tmp_path, bzimage()), **kwargs)  # type: ignore[arg-type]


def test_pvh_without_note_and_initrd_for_multiboot(tmp_path: Path, mem: GuestMemory) -> None:
    plain = write(tmp_path, vmlinux(0x100_0000, 0x100_0000, b"\xf4", 1, notes=note(b"Linux", 1, b"")), "vmlinux")
    with pytest.raises(BootError, match="no XEN_ELFNOTE_PHYS32_ENTRY note"):
        load_kernel(mem, plain, protocol="pvh")
    mb = write(tmp_path, elf(32, 0x10_000C, [(0x10_0000, multiboot_header() + b"\xf4", 0x1000)]), "mb.elf")
    with pytest.raises(BootError, match="--initrd is for Linux kernels; mb.elf boots with the multiboot protocol"):
        load_kernel(mem, mb, initrd="/etc/hostname")


def test_bad_pvh_notes() -> None:
    with pytest.raises(BootError, match="has 3 bytes, not 4 or 8"):
        pvh.pvh_entry([_Note(b"Xen", 18, b"abc")], "k")
    with pytest.raises(BootError, match="above 4 GiB"):
        pvh.pvh_entry([_Note(b"Xen", 18, struct.pack("<Q", 1 << 33))], "k")


def test_note_running_past_its_segment_is_refused(tmp_path: Path, mem: GuestMemory) -> None:
    bad = struct.pack("<III", 4, 0x1000, 18) + b"Xen\0"  # descsz beyond the segment
    with pytest.raises(BootError, match="extends past its segment"):
        load_kernel(mem, write(tmp_path, vmlinux(0x100_0000, 0x100_0000, b"\xf4", 1, notes=bad), "vmlinux"))


def test_device_args_reach_only_guests_without_acpi(tmp_path: Path, mem: GuestMemory) -> None:
    args = ["virtio_mmio.device=4K@0xd0000000:5"]
    kernel = write(tmp_path, bzimage())
    load_kernel(mem, kernel, cmdline="console=ttyS0", device_args=args)
    assert mem.read(layout.LINUX_CMDLINE_ADDR, 14) == b"console=ttyS0\0"
    load_kernel(mem, kernel, cmdline="acpi=off", device_args=args)
    assert mem.read(layout.LINUX_CMDLINE_ADDR, 44) == b"acpi=off virtio_mmio.device=4K@0xd0000000:5\0"


class _Note:
    def __init__(self, name: bytes, type_: int, desc: bytes) -> None:
        self.name, self.type, self.desc = name, type_, desc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0x1F0, 0x270), st.integers(0, 255)), max_size=12), cut=st.integers(0, 4000))
def test_hostile_setup_headers_only_ever_raise_boot_errors(
    tmp_path: Path, mem: GuestMemory, edits: list[tuple[int, int]], cut: int
) -> None:
    image = bytearray(bzimage())
    for offset, value in edits:
        image[offset] = value
    path = write(tmp_path, bytes(image[: len(image) - cut]) or b"x")
    try:
        entry = load_kernel(mem, path, cmdline="console=ttyS0")
    except BootError as e:
        assert "\n" not in str(e)
    else:
        assert entry.mode in ("linux64", "long64", "protected32")


#: the valid-looking setup header of linuxbuild.bzimage(): 0x1f1 up to the end of init_size
HEADER = bzimage()[linux.OFF_SETUP_SECTS : linux.HEADER_MIN_LEN]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    boot_sector=st.binary(min_size=linux.OFF_SETUP_SECTS, max_size=linux.OFF_SETUP_SECTS),
    header=st.one_of(st.just(HEADER), st.binary(min_size=len(HEADER), max_size=len(HEADER))),
    rest=st.binary(max_size=6000),
    cmdline=st.text(max_size=80),
    initrd=st.one_of(st.none(), st.binary(min_size=1, max_size=3000)),
    protocol=st.sampled_from(["auto", "linux", "pvh"]),
)
def test_random_bytes_behind_a_setup_header_only_ever_raise_boot_errors(
    tmp_path: Path,
    mem: GuestMemory,
    boot_sector: bytes,
    header: bytes,
    rest: bytes,
    cmdline: str,
    initrd: bytes | None,
    protocol: str,
) -> None:
    """A kernel made of random bytes around a setup header (the valid one, or random bytes with
    the 'HdrS' magic and the boot flag planted, so the parser gets past its first checks), with
    any command line text and any initrd: it loads, or fails with one line, never anything else."""
    image = bytearray(boot_sector + header + rest)
    image[linux.OFF_BOOT_FLAG : linux.OFF_BOOT_FLAG + 2] = b"\x55\xaa"
    image[linux.OFF_HEADER : linux.OFF_HEADER + 4] = linux.HDRS_MAGIC
    path = write(tmp_path, bytes(image))
    initrd_path = write(tmp_path, initrd, "initrd") if initrd is not None else None
    try:
        entry = load_kernel(mem, path, cmdline=cmdline, protocol=protocol, initrd=initrd_path)
    except BootError as e:
        assert "\n" not in str(e) and str(e)
    else:
        assert entry.mode == "linux64"
        assert mem.read(layout.LINUX_CMDLINE_ADDR, len(cmdline.encode()) + 1) == cmdline.encode() + b"\0"


@pytest.mark.parametrize(
    "cmdline,fragment",
    [("console=\udcff", r"not UTF-8 text \(character 9"), ("a\0b", "contains a NUL byte")],
)
def test_a_command_line_that_cannot_be_written_is_refused_before_loading(
    tmp_path: Path, mem: GuestMemory, cmdline: str, fragment: str
) -> None:
    """Bytes that are not UTF-8 reach argv as lone surrogates (and JSON can carry them): a
    one-line error, for Linux and Multiboot kernels alike, not an encoding traceback."""
    mb = write(tmp_path, elf(32, 0x10_000C, [(0x10_0000, multiboot_header() + b"\xf4", 0x1000)]), "mb.elf")
    for kernel in (write(tmp_path, bzimage()), mb):
        with pytest.raises(BootError, match=fragment):
            load_kernel(mem, kernel, cmdline=cmdline)
    with pytest.raises(BootError, match="the string of module"):
        load_kernel(mem, mb, modules=[ModuleSpec("/etc/hostname", "x\udcff")])


def test_kernels_and_initrds_must_be_regular_files(tmp_path: Path, mem: GuestMemory) -> None:
    """A FIFO would block a plain open() forever; a device reads without end or not at all."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    kernel = write(tmp_path, bzimage())
    with pytest.raises(BootError, match="kernel .*fifo is a FIFO, not a regular file"):
        load_kernel(mem, str(fifo))
    with pytest.raises(BootError, match="initrd .*fifo is a FIFO, not a regular file"):
        load_kernel(mem, kernel, initrd=str(fifo))
    with pytest.raises(BootError, match="initrd /dev/zero is a device"):
        load_kernel(mem, kernel, initrd="/dev/zero")
    with pytest.raises(BootError, match="is a directory"):
        load_kernel(mem, kernel, initrd=str(tmp_path))
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(BootError, match="initrd .*empty is empty"):
        load_kernel(mem, kernel, initrd=str(tmp_path / "empty"))


def test_an_unreadable_initrd_is_one_line(tmp_path: Path, mem: GuestMemory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permission denied (root reads anything, so the refusal is staged at the open)."""
    import os

    from virtkit.boot import loader

    kernel = write(tmp_path, bzimage())
    initrd = write(tmp_path, b"x" * 100, "initrd")
    real_open = os.open

    def refuse(path: str, flags: int, *args: int) -> int:
        if path == initrd:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(loader.os, "open", refuse)
    with pytest.raises(BootError, match=r"initrd .*initrd is not readable \(permission denied\)$"):
        load_kernel(mem, kernel, initrd=initrd)
