"""Put a kernel (and its modules) into guest memory and say where the boot vCPU starts.

Protocols:

* ``multiboot``: Multiboot v1, ELF32/ELF64 or the header's address fields (a.out kludge); the
  vCPU starts in 32-bit protected mode, paging off (Multiboot §3.2).
* ``direct64``: an ELF64 entered straight in 64-bit long mode with virtkit's identity-mapped page
  tables and GDT, as Firecracker enters its kernels. EBX points at the same Multiboot information.
* ``linux``: the Linux x86 64-bit boot protocol (``boot/linux.py``): a bzImage (setup header
  "HdrS", protocol >= 2.12, XLF_KERNEL_64) loaded at 1 MiB and entered at load + 0x200, or an
  uncompressed vmlinux (ELF64) entered at its ELF entry; RSI points at the zero page.
* ``pvh``: a vmlinux with a ``XEN_ELFNOTE_PHYS32_ENTRY`` note, entered in 32-bit protected mode
  with EBX pointing at ``hvm_start_info`` (``boot/pvh.py``).
* ``auto``: Multiboot if the image has a Multiboot header; ``linux`` for a bzImage or an ELF64 with
  a "Linux" or "Xen" note (a vmlinux); else direct64 for an ELF64 image.

Linux guests find their devices in the ACPI and MP tables the machine writes (``arch/acpi.py``,
``arch/mptable.py``); the others on the command line (``device_args``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from virtkit.arch import layout, x86
from virtkit.boot import multiboot
from virtkit.boot.elf import ElfImage, is_elf, parse_elf, parse_notes
from virtkit.errors import BootError
from virtkit.memory import GuestMemory

PROTOCOLS = ("auto", "multiboot", "direct64", "linux", "pvh")
#: ELF note owners that mark an ELF64 file as a Linux vmlinux (include/linux/elfnote.h; Xen's
#: notes, PVH among them, are only in kernels built for it)
LINUX_NOTE_OWNERS = (b"Linux", b"Xen")


class ModuleSpec:
    """A module the user asked for: a file and the string the kernel sees with it."""

    __slots__ = ("path", "string")

    def __init__(self, path: str, string: str = "") -> None:
        self.path, self.string = path, string


def read_image(path: str, what: str, limit: int) -> bytes:
    """The whole of the regular file ``path`` (a kernel, initrd or module), at most ``limit``
    bytes. Opened without blocking (a FIFO with no writer would hang a plain open) and checked
    with fstat on that fd, so what is read is what was checked; anything but a regular file is a
    one-line :class:`BootError`, as is a missing, unreadable, empty or too large one."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise BootError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise BootError(f"{what} {path} is not readable (permission denied)") from None
    except OSError as e:
        raise BootError(f"cannot open {what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise BootError(f"{what} {path} is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
            raise BootError(f"{what} {path} is {kind}, not a regular file: give the {what} as a file")
        if st.st_size > limit:
            raise BootError(f"{what} {path} is {st.st_size} bytes, larger than guest memory: give the VM more --memory")
        # a file that grows while it is read is cut one byte past the limit, and refused
        chunks: list[bytes] = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, min(limit + 1 - total, 8 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise BootError(f"{what} {path} is larger than guest memory ({limit} bytes)")
    except IsADirectoryError:
        raise BootError(f"{what} {path} is a directory, not a file") from None
    except OSError as e:
        raise BootError(f"cannot read {what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if not total:
        raise BootError(f"{what} {path} is empty")
    return b"".join(chunks)


def check_cmdline(cmdline: str, what: str = "the kernel command line") -> None:
    """A command line that the loaders can write: UTF-8 text without NUL (argv bytes that are not
    UTF-8 arrive as lone surrogates; an API client's JSON can carry them too)."""
    try:
        cmdline.encode()
    except UnicodeEncodeError as e:
        raise BootError(
            f"{what} is not UTF-8 text (character {e.start + 1} cannot be encoded): give it as UTF-8"
        ) from None
    if "\0" in cmdline:
        raise BootError(f"{what} contains a NUL byte")


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


def _is_vmlinux(data: bytes, name: str) -> bool:
    return any(n.name in LINUX_NOTE_OWNERS for n in parse_notes(data, name))


def detect_protocol(data: bytes, name: str) -> str:
    """The boot protocol ``auto`` picks for an image (see the module docstring)."""
    if multiboot.find_header(data) is not None:
        return "multiboot"
    if is_elf(data) and len(data) > 4 and data[4] == 2:
        parse_elf(data, name)  # headers checked before the notes are read
        return "linux" if _is_vmlinux(data, name) else "direct64"
    if is_elf(data):
        raise BootError(
            f"{name} is an ELF32 file without a Multiboot header: virtkit boots Multiboot "
            "kernels, Linux bzImage/vmlinux kernels, or ELF64 kernels with --boot direct64"
        )
    # the Linux loader (and the dataclasses module its records need) is imported only for a
    # kernel that is not one of virtkit's own kinds: `virtkit run` of those stays fast
    from virtkit.boot import linux

    if linux.is_bzimage(data):
        return "linux"
    if linux.has_boot_sector_signature(data):
        raise BootError(
            f"{name} has a PC boot sector (0xAA55) but no Linux 'HdrS' setup header magic at 0x202: "
            "not a Linux bzImage, or one older than boot protocol 2.00"
        )
    raise BootError(f"{name} is not an ELF file, a Linux bzImage or a Multiboot kernel: give one of those")


def load_kernel(
    mem: GuestMemory,
    path: str,
    *,
    cmdline: str = "",
    modules: list[ModuleSpec] | None = None,
    protocol: str = "auto",
    initrd: str | None = None,
    device_args: Sequence[str] = (),
) -> x86.EntryState:
    """Load ``path`` with ``protocol`` (or the one ``auto`` detects). ``device_args``: command-line
    fragments announcing the devices, for guests that do not read ACPI: Multiboot and direct64
    guests, and a Linux kernel given ``acpi=off``."""
    if protocol not in PROTOCOLS:
        raise BootError(f"unknown boot protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    name = os.path.basename(path)
    check_cmdline(cmdline)
    for spec in modules or ():
        check_cmdline(spec.string, f"the string of module {spec.path}")
    data = read_image(path, "kernel", mem.size)
    if protocol == "auto":
        protocol = detect_protocol(data, name)
    if protocol in ("linux", "pvh"):
        if modules:
            raise BootError(
                f"{name} boots with the {protocol} protocol, which has no Multiboot modules: "
                "give the initrd with --initrd"
            )
        if "acpi=off" in cmdline.split():
            cmdline = " ".join([cmdline, *device_args])
        return _load_linux(mem, data, name, protocol, cmdline, initrd)
    if initrd is not None:
        raise BootError(
            f"--initrd is for Linux kernels; {name} boots with the {protocol} protocol: give it modules with --module"
        )
    cmdline = " ".join([cmdline, *device_args]).strip()
    header = multiboot.find_header(data)

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
        return x86.EntryState("long64", entry, rbx=layout.MBI_ADDR, rsp=layout.BOOT_STACK_TOP, protocol="direct64")
    return x86.EntryState("protected32", entry, rbx=layout.MBI_ADDR, protocol="multiboot")


def _vmlinux_entry(elf: ElfImage, name: str) -> int:
    """A vmlinux's e_entry is physical (vmlinux.lds: ENTRY(phys_startup_64)); a kernel linked
    with a virtual one is translated through the segment that holds it."""
    if _in_segments(elf, elf.entry):
        return elf.entry
    for seg in elf.segments:
        if seg.vaddr <= elf.entry < seg.vaddr + seg.memsz:
            return elf.entry - seg.vaddr + seg.paddr
    raise BootError(f"{name} (vmlinux): entry point {elf.entry:#x} is outside its loadable segments")


def _in_segments(elf: ElfImage, paddr: int) -> bool:
    return any(seg.paddr <= paddr < seg.paddr + seg.memsz for seg in elf.segments)


def _load_linux(
    mem: GuestMemory, data: bytes, name: str, protocol: str, cmdline: str, initrd_path: str | None
) -> x86.EntryState:
    """Load a Linux kernel for the 64-bit boot protocol or PVH; write its zero page (or start
    info), command line, initrd and entry structures. The ACPI and MP tables the zero page points
    at are the machine's to write (they describe its devices)."""
    from virtkit.boot import linux, pvh

    if linux.is_bzimage(data):
        if protocol == "pvh":
            raise BootError(
                f"{name} is a Linux bzImage: PVH needs an uncompressed vmlinux with a XEN_ELFNOTE_PHYS32_ENTRY "
                "note; boot the bzImage with --boot linux"
            )
        kernel = linux.load_bzimage(mem, data, name)
    elif is_elf(data) and len(data) > 4 and data[4] == 2:
        elf = parse_elf(data, name)
        pvh_entry = pvh.pvh_entry(parse_notes(data, name), name) if protocol == "pvh" else None
        if protocol == "pvh" and pvh_entry is None:
            raise BootError(
                f"{name} has no XEN_ELFNOTE_PHYS32_ENTRY note (a kernel without CONFIG_PVH): boot it with --boot linux"
            )
        top = _load_elf(mem, data, elf, f"{name} (vmlinux)")
        entry = pvh_entry if pvh_entry is not None else _vmlinux_entry(elf, name)
        if entry >= layout.IDENTITY_MAP_BYTES or not _in_segments(elf, entry):
            raise BootError(f"{name} (vmlinux): entry point {entry:#x} is outside its loadable segments")
        kernel = linux.LoadedKernel(
            entry=entry,
            end=top,
            header=b"",
            cmdline_size=linux.DEFAULT_CMDLINE_SIZE - 1,
            initrd_addr_max=linux.DEFAULT_INITRD_ADDR_MAX,
            kind="vmlinux ELF64, PVH entry" if protocol == "pvh" else "vmlinux ELF64",
        )
    else:
        raise BootError(f"{name} is neither a Linux bzImage nor an ELF64 vmlinux: --boot {protocol} needs one")
    what = f"{protocol} ({kernel.kind})"
    cmdline_addr, _ = linux.write_cmdline(mem, cmdline, kernel.cmdline_size, name)
    initrd: tuple[int, int] | None = None
    if initrd_path is not None:
        blob = read_image(initrd_path, "initrd", mem.size)
        initrd = (linux.place_initrd(mem, blob, kernel.end, kernel.initrd_addr_max, initrd_path), len(blob))
    e820 = linux.e820_map(mem.size)
    if protocol == "pvh":
        rsdp = layout.ACPI_RSDP_ADDR
        info = pvh.build_start_info(e820=e820, cmdline_addr=cmdline_addr, initrd=initrd, rsdp_addr=rsdp)
        mem.write(layout.PVH_START_INFO_ADDR, info)
        mem.write(layout.GDT_ADDR, x86.gdt_bytes(x86.PVH_GDT))
        mem.fill(layout.LINUX_IDT_ADDR, 8)
        return x86.EntryState("pvh32", kernel.entry, rax=0, rbx=layout.PVH_START_INFO_ADDR, protocol=what)
    zero_page = linux.build_zero_page(
        header=kernel.header, e820=e820, cmdline_addr=cmdline_addr, initrd=initrd, rsdp_addr=layout.ACPI_RSDP_ADDR
    )
    mem.write(layout.ZERO_PAGE_ADDR, zero_page)
    mem.write(layout.GDT_ADDR, x86.gdt_bytes(x86.linux_gdt()))
    mem.fill(layout.LINUX_IDT_ADDR, 8)
    mem.fill(layout.LINUX_TSS_ADDR, layout.LINUX_TSS_SIZE)
    for gpa, table in x86.identity_page_tables():
        mem.write(gpa, table)
    return x86.EntryState(
        "linux64", kernel.entry, rax=0, rsi=layout.ZERO_PAGE_ADDR, rsp=layout.BOOT_STACK_TOP, protocol=what
    )


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
