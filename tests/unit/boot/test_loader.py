from __future__ import annotations

import struct
from pathlib import Path

import pytest
from elfbuild import elf, multiboot_header  # type: ignore[import-not-found]

from virtkit.arch import layout
from virtkit.boot import multiboot
from virtkit.boot.elf import parse_elf
from virtkit.boot.loader import ModuleSpec, load_kernel
from virtkit.errors import BootError
from virtkit.memory import GuestMemory

MiB = 1 << 20
CODE = multiboot_header() + b"\xf4" * 16  # header then hlt


@pytest.fixture
def mem() -> GuestMemory:
    m = GuestMemory(layout.ram_ranges(16 * MiB))
    yield m
    m.close()


def write(tmp_path: Path, data: bytes, name: str = "k.elf") -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_multiboot_elf32_loads_and_builds_mbi(tmp_path: Path, mem: GuestMemory) -> None:
    k = write(tmp_path, elf(32, 0x100000 + 12, [(0x100000, CODE, 0x2000)]))
    mod = write(tmp_path, b"module-data", "mod.bin")
    entry = load_kernel(mem, k, cmdline="console=ttyS0 x=1", modules=[ModuleSpec(mod, "initrd")])
    assert (entry.mode, entry.rip, entry.rax, entry.rbx) == ("protected32", 0x10000C, 0x2BADB002, layout.MBI_ADDR)
    assert mem.read(0x100000, len(CODE)) == CODE
    assert mem.read(0x100000 + len(CODE), 16) == bytes(16)  # bss zeroed
    flags, lower, upper = struct.unpack("<III", mem.read(layout.MBI_ADDR, 12))
    assert flags & (multiboot.MBI_MEM | multiboot.MBI_CMDLINE | multiboot.MBI_MMAP | multiboot.MBI_MODS)
    assert (lower, upper) == (640, (16 * MiB - MiB) >> 10)
    cmdline_addr = mem.read_u32(layout.MBI_ADDR + 16)
    assert mem.read(cmdline_addr, 18) == b"console=ttyS0 x=1\0"
    count, mods = mem.read_u32(layout.MBI_ADDR + 20), mem.read_u32(layout.MBI_ADDR + 24)
    start, end, string = struct.unpack("<III", mem.read(mods, 12))
    assert count == 1 and start % 4096 == 0 and start >= 0x102000
    assert mem.read(start, end - start) == b"module-data"
    assert mem.read(string, 7) == b"initrd\0"


def test_memory_map_reserves_virtkit_structures(mem: GuestMemory) -> None:
    entries = multiboot.memory_map(layout.ram_ranges(16 * MiB))
    reserved = [(b, n) for b, n, t in entries if t == multiboot.MMAP_RESERVED]
    assert (0, layout.LOADER_RESERVED_END) in reserved
    avail = sum(n for b, n, t in entries if t == multiboot.MMAP_AVAILABLE)
    assert avail == 16 * MiB - layout.LOADER_RESERVED_END - (layout.LEGACY_HOLE_END - layout.LOW_MEMORY_END)


def test_direct64_sets_up_page_tables(tmp_path: Path, mem: GuestMemory) -> None:
    k = write(tmp_path, elf(64, 0x200000, [(0x200000, b"\xf4", 1)]))
    entry = load_kernel(mem, k, protocol="direct64")
    assert entry.mode == "long64" and entry.rip == 0x200000
    assert mem.read_u64(layout.PML4_ADDR) & ~0xFFF == layout.PDPT_ADDR
    assert mem.read_u64(layout.PD_ADDR + 8) == (2 * MiB) | 0x83  # second 2 MiB page, P|RW|PS


def test_auto_picks_direct64_for_elf64_without_header(tmp_path: Path, mem: GuestMemory) -> None:
    k = write(tmp_path, elf(64, 0x200000, [(0x200000, b"\xf4", 1)]))
    assert load_kernel(mem, k).mode == "long64"


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "is empty"),
        (b"MZ this is not elf" * 10, "not an ELF file, a Linux bzImage or a Multiboot kernel"),
        (elf(32, 0x100000, [(0x100000, b"\xf4" * 4, 4)]), "ELF32 file without a Multiboot header"),
        (elf(32, 0x100000, [(0x100000, CODE, len(CODE))])[:-4], "extends past the end of the file"),
        (elf(32, 0x100000, [(0x1000, CODE, len(CODE))]), "overlaps virtkit's boot structures"),
        (elf(32, 0x100000, [(0x100000, CODE, 64 * MiB)]), "does not fit in guest memory"),
        (elf(32, 0x900000, [(0x100000, CODE, len(CODE))]), "entry point .* outside"),
        (elf(32, 0x100000, [(0x100000, CODE, len(CODE))], machine=40), "not an x86 kernel"),
        (elf(32, 0x100000, [(0x100000, CODE, len(CODE))], etype=1), "not an executable"),
        (elf(32, 0x100000, [(0x100000, multiboot_header(flags=0x8) + b"\xf4", 64)]), "requires Multiboot features"),
    ],
    ids=[
        "empty",
        "not-elf",
        "elf32-no-header",
        "truncated",
        "low-overlap",
        "too-big",
        "bad-entry",
        "wrong-machine",
        "relocatable",
        "unknown-flags",
    ],
)
def test_bad_kernels_are_refused(tmp_path: Path, mem: GuestMemory, data: bytes, message: str) -> None:
    with pytest.raises(BootError, match=message):
        load_kernel(mem, write(tmp_path, data))


def test_missing_and_directory_paths(tmp_path: Path, mem: GuestMemory) -> None:
    with pytest.raises(BootError, match="does not exist"):
        load_kernel(mem, str(tmp_path / "nope"))
    with pytest.raises(BootError, match="directory"):
        load_kernel(mem, str(tmp_path))


def test_multiboot_forced_without_header(tmp_path: Path, mem: GuestMemory) -> None:
    k = write(tmp_path, elf(64, 0x200000, [(0x200000, b"\xf4", 1)]))
    with pytest.raises(BootError, match="no Multiboot header"):
        load_kernel(mem, k, protocol="multiboot")


def test_direct64_refuses_elf32(tmp_path: Path, mem: GuestMemory) -> None:
    k = write(tmp_path, elf(32, 0x100000 + 12, [(0x100000, CODE, len(CODE))]))
    with pytest.raises(BootError, match="needs an ELF64"):
        load_kernel(mem, k, protocol="direct64")


def test_aout_kludge_address_fields(tmp_path: Path, mem: GuestMemory) -> None:
    # flat binary: header at file offset 0, loaded at 1 MiB, entry just after the 32-byte header
    load = 0x100000
    fields = struct.pack("<IIIII", load, load, 0, load + 0x1000, load + 32)
    image = multiboot_header(flags=0x10003, extra=fields) + b"\xf4" * 8
    entry = load_kernel(mem, write(tmp_path, image, "k.bin"))
    assert entry.rip == load + 32
    assert mem.read(load + 32, 8) == b"\xf4" * 8


def test_elf_parser_rejects_big_endian() -> None:
    data = bytearray(elf(32, 0, [(0x100000, b"x", 1)]))
    data[5] = 2
    with pytest.raises(BootError, match="big-endian"):
        parse_elf(bytes(data), "k")


def test_huge_cmdline_is_refused(tmp_path: Path, mem: GuestMemory) -> None:
    k = write(tmp_path, elf(32, 0x100000 + 12, [(0x100000, CODE, len(CODE))]))
    with pytest.raises(BootError, match="too long"):
        load_kernel(mem, k, cmdline="x" * (1 << 20))


@pytest.mark.parametrize("protocol", ["multiboot", "direct64"])
def test_a_module_that_would_land_above_4_gib_is_refused(tmp_path: Path, protocol: str) -> None:
    # A hostile ELF64 with a segment in the RAM above the MMIO hole puts the modules after it, above
    # 4 GiB, where the MBI's 32-bit mod_start/mod_end cannot say: struct.error escaped load_kernel.
    big = GuestMemory(layout.ram_ranges(layout.MMIO_HOLE_START + 16 * MiB))  # NORESERVE: costs nothing
    try:
        code = CODE if protocol == "multiboot" else b"\xf4" * 16
        k = write(tmp_path, elf(64, 0x100000, [(0x100000, code, 0x1000), (layout.MMIO_HOLE_END, b"x", 0x1000)]))
        m = write(tmp_path, b"module", "m.bin")
        load_kernel(big, k, protocol=protocol)  # without modules the kernel itself loads
        with pytest.raises(BootError, match="above 4 GiB"):
            load_kernel(big, k, modules=[ModuleSpec(m)], protocol=protocol)
    finally:
        big.close()


def test_a_kernel_that_reads_without_end_is_refused(mem: GuestMemory) -> None:
    # st_size of /dev/zero is 0, and read() without a bound filled host memory until killed: only
    # regular files are read now (and those at most one byte past the limit)
    with pytest.raises(BootError, match="kernel /dev/zero is a device, not a regular file"):
        load_kernel(mem, "/dev/zero")
