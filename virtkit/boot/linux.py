"""The Linux x86 boot protocol: bzImage setup header, the zero page (``struct boot_params``),
the e820 map, the command line and the initrd.

Spec: Linux Documentation/arch/x86/boot.rst (the setup header at 0x1f1, "LOADING THE REST OF THE
KERNEL", "64-bit BOOT PROTOCOL") and Documentation/arch/x86/zero-page.rst (the zero page's
layout). virtkit is a 64-bit boot loader: the protected-mode part of a bzImage is loaded at
1 MiB and entered at its 64-bit entry point, load address + 0x200, which needs boot protocol
2.12 or later with ``XLF_KERNEL_64`` set; an uncompressed ``vmlinux`` (ELF64) is entered at its
ELF entry point with the same zero page.

Everything read from the image is bounded by the file's size before it is used.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from virtkit.arch import layout
from virtkit.errors import BootError
from virtkit.memory import GuestMemory

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

# --- setup header offsets (boot.rst "THE REAL-MODE KERNEL HEADER") ----------------------------
OFF_SETUP_SECTS: Final = 0x1F1
OFF_VID_MODE: Final = 0x1FA
OFF_BOOT_FLAG: Final = 0x1FE
OFF_JUMP: Final = 0x200  # 2-byte short jump; its second byte says where the header ends
OFF_HEADER: Final = 0x202  # "HdrS"
OFF_VERSION: Final = 0x206
OFF_TYPE_OF_LOADER: Final = 0x210
OFF_LOADFLAGS: Final = 0x211
OFF_RAMDISK_IMAGE: Final = 0x218
OFF_RAMDISK_SIZE: Final = 0x21C
OFF_CMD_LINE_PTR: Final = 0x228
OFF_INITRD_ADDR_MAX: Final = 0x22C
OFF_KERNEL_ALIGNMENT: Final = 0x230
OFF_RELOCATABLE: Final = 0x234
OFF_XLOADFLAGS: Final = 0x236
OFF_CMDLINE_SIZE: Final = 0x238
OFF_PREF_ADDRESS: Final = 0x258
OFF_INIT_SIZE: Final = 0x260
#: the 2.12 header is complete through init_size
HEADER_MIN_LEN: Final = OFF_INIT_SIZE + 4
SYSSIZE_OFF: Final = 0x1F4

HDRS_MAGIC: Final = b"HdrS"
BOOT_FLAG: Final = 0xAA55
MIN_VERSION: Final = 0x020C  # 2.12: xloadflags (XLF_KERNEL_64)
LOADED_HIGH: Final = 1 << 0  # loadflags: protected-mode code at 0x100000 (a bzImage)
XLF_KERNEL_64: Final = 1 << 0  # xloadflags: has the 64-bit entry at load + 0x200
ENTRY64_OFFSET: Final = 0x200
TYPE_OF_LOADER_UNDEFINED: Final = 0xFF  # boot.rst: "0xFF  Undefined" (no assigned loader ID)
VID_MODE_NORMAL: Final = 0xFFFF
#: x86 COMMAND_LINE_SIZE; what a vmlinux (no header to say otherwise) accepts
DEFAULT_CMDLINE_SIZE: Final = 2048
#: boot.rst: initrd_addr_max for kernels that do not say (and the usual value of those that do)
DEFAULT_INITRD_ADDR_MAX: Final = 0x7FFF_FFFF

# --- zero page offsets (zero-page.rst) -----------------------------------------------------------
ZP_ACPI_RSDP_ADDR: Final = 0x070
ZP_EXT_RAMDISK_IMAGE: Final = 0x0C0
ZP_EXT_RAMDISK_SIZE: Final = 0x0C4
ZP_EXT_CMD_LINE_PTR: Final = 0x0C8
ZP_E820_ENTRIES: Final = 0x1E8
ZP_HDR_END: Final = 0x290  # the setup header and its padding end here (edd_mbr_sig_buffer)
ZP_E820_TABLE: Final = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE: Final = 128
ZERO_PAGE_SIZE: Final = 0x1000

# e820 types (ACPI 6.5 §15 table 15.1, as Linux's E820_TYPE_*)
E820_RAM: Final = 1
E820_RESERVED: Final = 2
E820_ACPI: Final = 3


@dataclass(frozen=True, slots=True)
class SetupHeader:
    """The fields of a bzImage's setup header that a 64-bit loader needs (boot.rst)."""

    setup_sects: int  #: 512-byte sectors of real-mode setup code after the boot sector (0 means 4)
    syssize: int  #: protected-mode code size in 16-byte paragraphs
    version: int  #: boot protocol version, e.g. 0x020F
    loadflags: int
    xloadflags: int
    relocatable: bool
    kernel_alignment: int
    pref_address: int  #: where the kernel wants to run (LOAD_PHYSICAL_ADDR)
    init_size: int  #: linear memory the kernel needs from where it runs, before it sets up its own
    cmdline_size: int  #: longest command line, without its terminating NUL
    initrd_addr_max: int  #: highest address the initrd may occupy
    header_end: int  #: offset in the file where the setup header ends

    @property
    def setup_size(self) -> int:
        """Bytes before the protected-mode part: the boot sector plus the setup sectors."""
        return (self.setup_sects + 1) * 512

    @property
    def payload_size(self) -> int:
        return self.syssize * 16

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"

    def run_address(self, load: int) -> int:
        """Where the kernel decompresses itself and runs when loaded at ``load``: a relocatable
        kernel at ``load`` rounded up to kernel_alignment but not below pref_address; any other at
        pref_address (arch/x86/boot/compressed/head_64.S, startup_64)."""
        if not self.relocatable:
            return self.pref_address
        align = self.kernel_alignment
        return max(self.pref_address, (load + align - 1) & ~(align - 1))


def is_bzimage(data: bytes) -> bool:
    """A Linux setup header ("HdrS" at 0x202) is present."""
    return data[OFF_HEADER : OFF_HEADER + 4] == HDRS_MAGIC


def has_boot_sector_signature(data: bytes) -> bool:
    """0xAA55 at 0x1FE: a PC boot sector (an old Linux kernel image looks like one)."""
    return len(data) >= OFF_BOOT_FLAG + 2 and struct.unpack_from("<H", data, OFF_BOOT_FLAG)[0] == BOOT_FLAG


def parse_setup_header(data: bytes, name: str) -> SetupHeader:
    """Parse and check a bzImage's setup header; every failure is a one-line :class:`BootError`."""
    what = f"{name} (Linux bzImage)"
    if len(data) < OFF_HEADER + 4:
        raise BootError(f"{what} is truncated: {len(data)} bytes, too short for a setup header")
    if not is_bzimage(data):
        raise BootError(f"{what} has no 'HdrS' magic at 0x202: not a Linux kernel, or older than boot protocol 2.00")
    if len(data) < OFF_VERSION + 2:
        raise BootError(f"{what} is truncated inside its setup header")
    version = struct.unpack_from("<H", data, OFF_VERSION)[0]
    if version < MIN_VERSION:
        raise BootError(
            f"{what} speaks boot protocol {version >> 8}.{version & 0xFF:02d}: virtkit needs 2.12 or later "
            "(Linux 3.8+), which has the 64-bit entry"
        )
    if len(data) < HEADER_MIN_LEN:
        raise BootError(f"{what} is truncated: {len(data)} bytes, too short for a boot protocol 2.12 header")
    if struct.unpack_from("<H", data, OFF_BOOT_FLAG)[0] != BOOT_FLAG:
        raise BootError(f"{what} has a bad boot_flag at 0x1fe (not 0xAA55): the image is damaged")
    setup_sects = data[OFF_SETUP_SECTS] or 4  # boot.rst: "If this field is 0, the real value is 4"
    (syssize,) = struct.unpack_from("<I", data, SYSSIZE_OFF)
    loadflags, xloadflags = data[OFF_LOADFLAGS], struct.unpack_from("<H", data, OFF_XLOADFLAGS)[0]
    (initrd_addr_max, kernel_alignment) = struct.unpack_from("<II", data, OFF_INITRD_ADDR_MAX)
    (cmdline_size,) = struct.unpack_from("<I", data, OFF_CMDLINE_SIZE)
    (pref_address,) = struct.unpack_from("<Q", data, OFF_PREF_ADDRESS)
    (init_size,) = struct.unpack_from("<I", data, OFF_INIT_SIZE)
    if not loadflags & LOADED_HIGH:
        raise BootError(f"{what} is a zImage (loads at 0x10000), not a bzImage: rebuild it as a bzImage")
    if not xloadflags & XLF_KERNEL_64:
        raise BootError(
            f"{what} has no 64-bit entry point (XLF_KERNEL_64 clear): it is a 32-bit kernel; virtkit boots 64-bit ones"
        )
    hdr = SetupHeader(
        setup_sects=setup_sects,
        syssize=syssize,
        version=version,
        loadflags=loadflags,
        xloadflags=xloadflags,
        relocatable=bool(data[OFF_RELOCATABLE]),
        kernel_alignment=kernel_alignment,
        pref_address=pref_address,
        init_size=init_size,
        cmdline_size=cmdline_size,
        initrd_addr_max=initrd_addr_max or DEFAULT_INITRD_ADDR_MAX,
        header_end=min(OFF_HEADER + data[OFF_JUMP + 1], ZP_HDR_END),
    )
    if syssize == 0:
        raise BootError(f"{what} has syssize 0: no protected-mode kernel follows the setup code")
    if hdr.setup_size + hdr.payload_size > len(data):
        raise BootError(
            f"{what} is truncated: its header says {hdr.setup_size + hdr.payload_size} bytes, the file has {len(data)}"
        )
    if hdr.header_end < HEADER_MIN_LEN:
        raise BootError(f"{what}: its jump at 0x200 ends the setup header before init_size; the header is damaged")
    if hdr.relocatable and (kernel_alignment == 0 or kernel_alignment & (kernel_alignment - 1)):
        raise BootError(f"{what} has kernel_alignment {kernel_alignment:#x}, not a power of two: the header is damaged")
    if pref_address >= layout.MMIO_HOLE_START or pref_address < layout.LINUX_LOAD_ADDR:
        raise BootError(f"{what} wants to run at {pref_address:#x} (pref_address): virtkit needs 1 MiB..3 GiB")
    return hdr


@dataclass(frozen=True, slots=True)
class LoadedKernel:
    """A kernel placed in guest memory: its 64-bit entry, the end of the memory it needs, and the
    parts of its header the zero page carries."""

    entry: int
    end: int  #: first byte above what the kernel occupies or will occupy while it boots
    header: bytes  #: the setup header bytes (from 0x1f1) to copy into the zero page; b"" for a vmlinux
    cmdline_size: int
    initrd_addr_max: int
    kind: str  #: "bzImage, boot protocol 2.15" / "vmlinux ELF64": said in --stats and errors


def _memory_hint(end: int) -> str:
    return f"give the VM at least --memory {((end + (1 << 20) - 1) >> 20) + 16}M"


def load_bzimage(mem: GuestMemory, data: bytes, name: str) -> LoadedKernel:
    """Put the protected-mode part of a bzImage at 1 MiB; return where to enter it in 64-bit mode."""
    hdr = parse_setup_header(data, name)
    load = layout.LINUX_LOAD_ADDR
    payload = memoryview(data)[hdr.setup_size : hdr.setup_size + hdr.payload_size]
    run = hdr.run_address(load)
    end = max(load + len(payload), run + max(hdr.init_size, len(payload)))
    low_end = layout.low_ram_end(mem.size)
    if end > low_end:
        raise BootError(
            f"{name} (Linux bzImage) needs RAM up to {end:#x} (it runs at {run:#x} and needs init_size "
            f"{hdr.init_size >> 20} MiB there); the VM has {low_end >> 20} MiB below the MMIO hole: {_memory_hint(end)}"
        )
    mem.write(load, payload)
    return LoadedKernel(
        entry=load + ENTRY64_OFFSET,
        end=end,
        header=bytes(data[OFF_SETUP_SECTS : hdr.header_end]),
        cmdline_size=hdr.cmdline_size,
        initrd_addr_max=hdr.initrd_addr_max,
        kind=f"bzImage, boot protocol {hdr.version_text}",
    )


def e820_map(memory_size: int) -> list[tuple[int, int, int]]:
    """(address, size, type) entries of the guest's memory: RAM below the EBDA, the EBDA and the
    BIOS area up to 1 MiB reserved (they hold the MP and ACPI tables), RAM from 1 MiB to the MMIO
    hole, and RAM above 4 GiB for what did not fit below it."""
    low_end = layout.low_ram_end(memory_size)
    entries = [
        (0, layout.EBDA_START, E820_RAM),
        (layout.EBDA_START, layout.LEGACY_HOLE_END - layout.EBDA_START, E820_RESERVED),
    ]
    if low_end > layout.LEGACY_HOLE_END:
        entries.append((layout.LEGACY_HOLE_END, low_end - layout.LEGACY_HOLE_END, E820_RAM))
    if memory_size > layout.MMIO_HOLE_START:
        entries.append((layout.MMIO_HOLE_END, memory_size - layout.MMIO_HOLE_START, E820_RAM))
    return entries


def write_cmdline(mem: GuestMemory, cmdline: str, limit: int, name: str) -> tuple[int, int]:
    """The command line, NUL-terminated, at its fixed address; (address, length without NUL)."""
    raw = cmdline.encode()
    if b"\0" in raw:
        raise BootError("the kernel command line contains a NUL byte")
    limit = min(limit, layout.LINUX_CMDLINE_MAX - 1)
    if len(raw) > limit:
        raise BootError(
            f"the kernel command line is {len(raw)} bytes; {name} accepts at most {limit} (cmdline_size): shorten it"
        )
    mem.write(layout.LINUX_CMDLINE_ADDR, raw + b"\0")
    return layout.LINUX_CMDLINE_ADDR, len(raw)


def place_initrd(mem: GuestMemory, initrd: bytes, kernel_end: int, addr_max: int, what: str) -> int:
    """Copy the initrd to the top of low RAM, page aligned, wholly at or below ``addr_max``
    (boot.rst: "as high as possible" under initrd_addr_max) and above the kernel. Returns its address."""
    top = min(layout.low_ram_end(mem.size), addr_max + 1)
    addr = (top - len(initrd)) & ~(layout.PAGE_SIZE - 1)
    floor = (kernel_end + layout.PAGE_SIZE - 1) & ~(layout.PAGE_SIZE - 1)
    if len(initrd) > top or addr < floor:
        room = max(top - floor, 0)
        raise BootError(
            f"initrd {what} is {len(initrd)} bytes, but only {room} fit between the kernel (ends at "
            f"{kernel_end:#x}) and the top of low RAM ({top:#x}): {_memory_hint(kernel_end + len(initrd))}"
        )
    mem.write(addr, initrd)
    return addr


def build_zero_page(
    *,
    header: bytes,
    e820: list[tuple[int, int, int]],
    cmdline_addr: int,
    initrd: tuple[int, int] | None,
    rsdp_addr: int,
) -> bytes:
    """``struct boot_params`` as bytes (zero-page.rst). ``header``: the bzImage's setup header from
    0x1f1 (empty for a vmlinux: a minimal one is made up, as a loader of an ELF kernel does)."""
    zp = bytearray(ZERO_PAGE_SIZE)
    if header:
        if OFF_SETUP_SECTS + len(header) > ZP_HDR_END:
            raise BootError("the setup header is longer than the zero page has room for")
        zp[OFF_SETUP_SECTS : OFF_SETUP_SECTS + len(header)] = header
    else:
        struct.pack_into("<H", zp, OFF_BOOT_FLAG, BOOT_FLAG)
        zp[OFF_HEADER : OFF_HEADER + 4] = HDRS_MAGIC
        struct.pack_into("<H", zp, OFF_VERSION, 0x020F)
        struct.pack_into("<I", zp, OFF_KERNEL_ALIGNMENT, 0x100_0000)
    struct.pack_into("<H", zp, OFF_VID_MODE, VID_MODE_NORMAL)
    zp[OFF_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    struct.pack_into("<I", zp, OFF_CMD_LINE_PTR, cmdline_addr & 0xFFFF_FFFF)
    struct.pack_into("<I", zp, ZP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    if initrd is not None:
        addr, size = initrd
        struct.pack_into("<II", zp, OFF_RAMDISK_IMAGE, addr & 0xFFFF_FFFF, size & 0xFFFF_FFFF)
        struct.pack_into("<I", zp, ZP_EXT_RAMDISK_IMAGE, addr >> 32)
        struct.pack_into("<I", zp, ZP_EXT_RAMDISK_SIZE, size >> 32)
    struct.pack_into("<Q", zp, ZP_ACPI_RSDP_ADDR, rsdp_addr)
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise BootError(f"the memory map has {len(e820)} entries; the zero page holds {E820_MAX_ENTRIES_ZEROPAGE}")
    zp[ZP_E820_ENTRIES] = len(e820)
    for i, (addr, size, kind) in enumerate(e820):
        struct.pack_into("<QQI", zp, ZP_E820_TABLE + 20 * i, addr, size, kind)
    return bytes(zp)
