"""Put a kernel (and its modules) into guest memory and say where the boot vCPU starts.

Protocols:

* ``multiboot``: Multiboot v1, ELF32/ELF64 or the header's address fields (a.out kludge); the
  vCPU starts in 32-bit protected mode, paging off (Multiboot §3.2).
* ``direct64``: an ELF64 entered straight in 64-bit long mode with virtkit's identity-mapped page
  tables and GDT, as Firecracker enters its kernels. EBX points at the same Multiboot information.
* ``auto``: Multiboot if the image has a Multiboot header, else direct64 for an ELF64 image.
"""

from __future__ import annotations

import os

from virtkit.arch import layout, x86
from virtkit.boot import multiboot
from virtkit.boot.elf import ElfImage, is_elf, parse_elf
from virtkit.errors import BootError
from virtkit.memory import GuestMemory

PROTOCOLS = ("auto", "multiboot", "direct64")


class ModuleSpec:
    """A module the user asked for: a file and the string the kernel sees with it."""

    __slots__ = ("path", "string")

    def __init__(self, path: str, string: str = "") -> None:
        self.path, self.string = path, string


def read_image(path: str, what: str, limit: int) -> bytes:
    try:
        size = os.stat(path).st_size
        if os.path.isdir(path):
            raise BootError(f"{what} {path} is a directory, not a file")
        if size > limit:
            raise BootError(f"{what} {path} is {size} bytes, larger than guest memory: give the VM more --memory")
        with open(path, "rb") as f:
            # st_size says nothing for a character device (/dev/zero reads without end): read at
            # most one byte past the limit, whatever the file claims
            data = f.read(limit + 1)
        if len(data) > limit:
            raise BootError(f"{what} {path} is larger than guest memory ({limit} bytes)")
    except FileNotFoundError:
        raise BootError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise BootError(f"{what} {path} is not readable (permission denied)") from None
    except IsADirectoryError:
        raise BootError(f"{what} {path} is a directory, not a file") from None
    except OSError as e:
        raise BootError(f"cannot read {what} {path}: {e.strerror}") from None
    if not data:
        raise BootError(f"{what} {path} is empty")
    return data


def _check_range(mem: GuestMemory, start: int, size: int, what: str) -> None:
    if start < layout.LOADER_RESERVED_END:
        raise BootError(
            f"{what} at {start:#x} overlaps virtkit's boot structures "
            f"(0x0-{layout.LOADER_RESERVED_END - 1:#x}); link it at or above "
            f"{layout.KERNEL_MIN_ADDR:#x}"
        )
    if not mem.contains(start, size):
        raise BootError(
            f"{what} at {start:#x}-{start + size - 1:#x} does not fit in guest memory "
            f"({mem.size >> 20} MiB): give the VM more --memory or link it lower"
        )


def _load_elf(mem: GuestMemory, data: bytes, elf: ElfImage, name: str) -> int:
    """Copy PT_LOAD segments to their physical addresses; returns the end of the highest one."""
    top = 0
    for i, seg in enumerate(elf.segments):
        _check_range(mem, seg.paddr, seg.memsz, f"{name} segment {i}")
        mem.write(seg.paddr, data[seg.offset : seg.offset + seg.filesz])
        if seg.memsz > seg.filesz:  # .bss; fresh guest RAM is zero, but a reload may not be
            mem.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz)
        top = max(top, seg.paddr + seg.memsz)
    return top


def _entry_inside(elf: ElfImage, entry: int, name: str) -> None:
    for seg in elf.segments:
        if seg.vaddr <= entry < seg.vaddr + seg.memsz or seg.paddr <= entry < seg.paddr + seg.memsz:
            return
    raise BootError(f"{name}: entry point {entry:#x} is outside its loadable segments")


def _load_aout_kludge(mem: GuestMemory, data: bytes, hdr: multiboot.MultibootHeader, name: str) -> tuple[int, int]:
    # Multiboot §3.1.3: the file offset of load_addr is header offset - (header_addr - load_addr)
    if hdr.load_addr > hdr.header_addr:
        raise BootError(f"{name}: Multiboot load_addr lies after header_addr")
    file_off = hdr.offset - (hdr.header_addr - hdr.load_addr)
    if file_off < 0:
        raise BootError(f"{name}: Multiboot address fields point before the start of the file")
    if hdr.load_end_addr:
        if hdr.load_end_addr < hdr.load_addr:
            raise BootError(f"{name}: Multiboot load_end_addr is below load_addr")
        length = hdr.load_end_addr - hdr.load_addr
    else:
        length = len(data) - file_off
    if file_off + length > len(data):
        raise BootError(f"{name}: Multiboot load range extends past the end of the file")
    end = max(hdr.bss_end_addr, hdr.load_addr + length)
    _check_range(mem, hdr.load_addr, end - hdr.load_addr, name)
    mem.write(hdr.load_addr, data[file_off : file_off + length])
    if end > hdr.load_addr + length:
        mem.fill(hdr.load_addr + length, end - hdr.load_addr - length)
    if not hdr.load_addr <= hdr.entry_addr < end:
        raise BootError(f"{name}: entry point {hdr.entry_addr:#x} is outside the loaded image")
    return hdr.entry_addr, end


def load_kernel(
    mem: GuestMemory, path: str, *, cmdline: str = "", modules: list[ModuleSpec] | None = None, protocol: str = "auto"
) -> x86.EntryState:
    if protocol not in PROTOCOLS:
        raise BootError(f"unknown boot protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    name = os.path.basename(path)
    data = read_image(path, "kernel", mem.size)
    header = multiboot.find_header(data)
    if protocol == "auto":
        if header is not None:
            protocol = "multiboot"
        elif is_elf(data) and data[4] == 2:
            protocol = "direct64"
        elif is_elf(data):
            raise BootError(
                f"{name} is an ELF32 file without a Multiboot header: virtkit boots Multiboot "
                "kernels, or ELF64 kernels with --boot direct64"
            )
        else:
            raise BootError(
                f"{name} is not an ELF file and has no Multiboot header: give a Multiboot kernel or an ELF64 kernel"
            )

    if protocol == "multiboot":
        if header is None:
            raise BootError(
                f"{name} has no Multiboot header in its first 8 KiB: add one, or boot an "
                "ELF64 kernel with --boot direct64"
            )
        multiboot.check_required_flags(header, name)
        if header.has_address_fields:
            entry, top = _load_aout_kludge(mem, data, header, name)
        else:
            elf = parse_elf(data, name)
            top = _load_elf(mem, data, elf, name)
            entry = elf.entry
            _entry_inside(elf, entry, name)
            if entry >= 1 << 32:
                raise BootError(
                    f"{name}: Multiboot entry point {entry:#x} is above 4 GiB; Multiboot enters in 32-bit mode"
                )
    else:
        elf = parse_elf(data, name)
        if elf.bits != 64:
            raise BootError(f"{name} is an ELF32 file: --boot direct64 needs an ELF64 kernel")
        top = _load_elf(mem, data, elf, name)
        entry = elf.entry
        _entry_inside(elf, entry, name)
        if entry >= layout.IDENTITY_MAP_BYTES:
            raise BootError(
                f"{name}: entry point {entry:#x} is outside the identity map (first 4 GiB) "
                "that the direct 64-bit entry sets up"
            )

    loaded = _load_modules(mem, modules or [], top)
    mbi = multiboot.build_mbi(layout.ram_ranges(mem.size), cmdline, loaded)
    mem.write(layout.MBI_ADDR, mbi)
    mem.write(layout.GDT_ADDR, x86.gdt_bytes())
    if protocol == "direct64":
        for gpa, table in x86.identity_page_tables():
            mem.write(gpa, table)
        return x86.EntryState("long64", entry, rbx=layout.MBI_ADDR, rsp=layout.BOOT_STACK_TOP)
    return x86.EntryState("protected32", entry, rbx=layout.MBI_ADDR)


def _load_modules(mem: GuestMemory, specs: list[ModuleSpec], top: int) -> list[multiboot.Module]:
    loaded = []
    addr = top
    for spec in specs:
        # always page aligned, whether or not the header asks (§3.1.2 bit 0): cheap, and QEMU does too
        addr = (addr + layout.PAGE_SIZE - 1) & ~(layout.PAGE_SIZE - 1)
        data = read_image(spec.path, "module", mem.size)
        if addr + len(data) > 1 << 32:
            # the MBI's mod_start/mod_end are 32-bit (§3.3); a kernel with a segment above the MMIO
            # hole puts its modules there, and packing the MBI raised struct.error
            raise BootError(
                f"module {spec.path} would be loaded at {addr:#x}, above 4 GiB, where Multiboot "
                "cannot describe it: link the kernel below 4 GiB"
            )
        _check_range(mem, addr, len(data), f"module {spec.path}")
        mem.write(addr, data)
        loaded.append(multiboot.Module(addr, addr + len(data), spec.string or spec.path))
        addr += len(data)
    return loaded
