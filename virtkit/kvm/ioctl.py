"""Thin typed wrappers around the KVM file descriptors: system, VM and vCPU.

Each method is one ioctl. Errors become :class:`~virtkit.errors.KvmError` with the ioctl's
name and the errno text; callers decide what that means.
"""

from __future__ import annotations

import ctypes as C
import errno
import fcntl
import mmap
import os

from virtkit.errors import KvmError
from virtkit.host.libc import c_ioctl
from virtkit.kvm import constants as K
from virtkit.kvm import structs as S

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypeVar

if TYPE_CHECKING:
    T = TypeVar("T", bound=C.Structure)

KVM_DEVICE = "/dev/kvm"


def _ioctl_buf(fd: int, request: int, buf: T, name: str) -> T:
    try:
        fcntl.ioctl(fd, request, buf, True)
    except OSError as e:
        raise KvmError(f"{name} failed: {os.strerror(e.errno or 0)}") from None
    return buf


def _get_cpuid(fd: int, request: int, name: str, n: int) -> list[S.kvm_cpuid_entry2]:
    """A ``kvm_cpuid2`` query, retried with a larger buffer while KVM answers E2BIG."""
    while True:
        buf = S.kvm_cpuid2_of(n)()
        buf.nent = n
        try:
            fcntl.ioctl(fd, request, buf, True)
        except OSError as e:
            if e.errno == errno.E2BIG and n < 4096:
                n *= 2
                continue
            raise KvmError(f"{name} failed: {e.strerror}") from None
        return [S.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]


def _ioctl_int(fd: int, request: int, arg: int, name: str) -> int:
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as e:
        raise KvmError(f"{name} failed: {os.strerror(e.errno or 0)}") from None


def _ioctl_ulong(fd: int, request: int, arg: int, name: str) -> int:
    """For ioctls whose argument is an unsigned long value wider than a C int (an address)."""
    ret = c_ioctl(fd, request, arg)
    if ret < 0:
        raise KvmError(f"{name} failed: {os.strerror(C.get_errno())}")
    return int(ret)


class Kvm:
    """The system file descriptor (``/dev/kvm``)."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmError(
                f"{path} does not exist: load the kvm module (modprobe kvm_intel, kvm_amd "
                "or kvm_pvm) or run on a host with virtualization enabled"
            ) from None
        except PermissionError:
            raise KvmError(f"no permission to open {path}: add your user to the 'kvm' group or run as root") from None
        except OSError as e:
            raise KvmError(f"cannot open {path}: {e.strerror}") from None
        try:
            version = self.api_version()
            if version != K.KVM_API_VERSION:
                raise KvmError(f"{path} speaks KVM API version {version}, virtkit needs {K.KVM_API_VERSION}")
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def api_version(self) -> int:
        return _ioctl_int(self.fd, K.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        """0 if the capability is absent; otherwise its value (often 1, or a count)."""
        try:
            return fcntl.ioctl(self.fd, K.KVM_CHECK_EXTENSION, int(cap))
        except OSError:
            return 0

    def vcpu_mmap_size(self) -> int:
        return _ioctl_int(self.fd, K.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> list[S.kvm_cpuid_entry2]:
        return _get_cpuid(self.fd, K.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID", 64)

    def msr_index_list(self) -> list[int]:
        n = 256
        buf = S.kvm_msr_list_of(n)()
        buf.nmsrs = n
        _ioctl_buf(self.fd, K.KVM_GET_MSR_INDEX_LIST, buf, "KVM_GET_MSR_INDEX_LIST")
        return [int(buf.indices[i]) for i in range(buf.nmsrs)]

    def create_vm(self) -> VmFd:
        fd = _ioctl_int(self.fd, K.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        return VmFd(fd, self)


class VmFd:
    """A VM file descriptor from ``KVM_CREATE_VM``."""

    def __init__(self, fd: int, kvm: Kvm) -> None:
        self.fd = fd
        self.kvm = kvm

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        try:
            return fcntl.ioctl(self.fd, K.KVM_CHECK_EXTENSION, int(cap))
        except OSError:
            return 0

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, size: int, host_addr: int, flags: int = 0
    ) -> None:
        region = S.kvm_userspace_memory_region(slot, flags, guest_phys_addr, size, host_addr)
        _ioctl_buf(self.fd, K.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def get_dirty_log(self, slot: int, npages: int) -> bytes:
        """The dirty bitmap of ``slot`` since the last call (one bit per 4 KiB page)."""
        nbytes = ((npages + 63) // 64) * 8
        bitmap = (C.c_uint8 * nbytes)()
        log = S.kvm_dirty_log(slot, 0, C.addressof(bitmap))
        _ioctl_buf(self.fd, K.KVM_GET_DIRTY_LOG, log, "KVM_GET_DIRTY_LOG")
        return bytes(bitmap)

    def set_tss_addr(self, addr: int) -> None:
        _ioctl_ulong(self.fd, K.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        _ioctl_buf(self.fd, K.KVM_SET_IDENTITY_MAP_ADDR, C.c_uint64(addr), "KVM_SET_IDENTITY_MAP_ADDR")  # type: ignore[type-var]

    def create_irqchip(self) -> None:
        _ioctl_int(self.fd, K.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = K.KVM_PIT_SPEAKER_DUMMY) -> None:
        cfg = S.kvm_pit_config()
        cfg.flags = flags
        _ioctl_buf(self.fd, K.KVM_CREATE_PIT2, cfg, "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: int) -> None:
        _ioctl_buf(self.fd, K.KVM_IRQ_LINE, S.kvm_irq_level(irq, level), "KVM_IRQ_LINE")

    def irqfd(self, eventfd: int, gsi: int, deassign: bool = False) -> None:
        arg = S.kvm_irqfd()
        arg.fd, arg.gsi = eventfd, gsi
        arg.flags = K.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        _ioctl_buf(self.fd, K.KVM_IRQFD, arg, "KVM_IRQFD")

    def ioeventfd(
        self,
        eventfd: int,
        addr: int,
        length: int,
        *,
        pio: bool = False,
        datamatch: int | None = None,
        deassign: bool = False,
    ) -> None:
        arg = S.kvm_ioeventfd()
        arg.addr, arg.len, arg.fd = addr, length, eventfd
        flags = K.KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if datamatch is not None:
            flags |= K.KVM_IOEVENTFD_FLAG_DATAMATCH
            arg.datamatch = datamatch
        if deassign:
            flags |= K.KVM_IOEVENTFD_FLAG_DEASSIGN
        arg.flags = flags
        _ioctl_buf(self.fd, K.KVM_IOEVENTFD, arg, "KVM_IOEVENTFD")

    def get_irqchip(self, chip_id: int) -> S.kvm_irqchip:
        chip = S.kvm_irqchip()
        chip.chip_id = chip_id
        return _ioctl_buf(self.fd, K.KVM_GET_IRQCHIP, chip, "KVM_GET_IRQCHIP")

    def set_irqchip(self, chip: S.kvm_irqchip) -> None:
        _ioctl_buf(self.fd, K.KVM_SET_IRQCHIP, chip, "KVM_SET_IRQCHIP")

    def get_pit2(self) -> S.kvm_pit_state2:
        return _ioctl_buf(self.fd, K.KVM_GET_PIT2, S.kvm_pit_state2(), "KVM_GET_PIT2")

    def set_pit2(self, state: S.kvm_pit_state2) -> None:
        _ioctl_buf(self.fd, K.KVM_SET_PIT2, state, "KVM_SET_PIT2")

    def get_clock(self) -> S.kvm_clock_data:
        return _ioctl_buf(self.fd, K.KVM_GET_CLOCK, S.kvm_clock_data(), "KVM_GET_CLOCK")

    def set_clock(self, data: S.kvm_clock_data) -> None:
        _ioctl_buf(self.fd, K.KVM_SET_CLOCK, data, "KVM_SET_CLOCK")

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        fd = _ioctl_int(self.fd, K.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        try:
            return VcpuFd(fd, vcpu_id, self.kvm.vcpu_mmap_size())
        except BaseException:
            os.close(fd)
            raise


class VcpuFd:
    """A vCPU file descriptor and its shared ``struct kvm_run`` page."""

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        self.fd = fd
        self.vcpu_id = vcpu_id
        #: the shared kvm_run page(s): the run loop reads exits from it without copying
        self.run_page = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def close(self) -> None:
        if self.fd >= 0:
            self.run_page.close()
            os.close(self.fd)
            self.fd = -1

    def get_regs(self) -> S.kvm_regs:
        return _ioctl_buf(self.fd, K.KVM_GET_REGS, S.kvm_regs(), "KVM_GET_REGS")

    def set_regs(self, regs: S.kvm_regs) -> None:
        _ioctl_buf(self.fd, K.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> S.kvm_sregs:
        return _ioctl_buf(self.fd, K.KVM_GET_SREGS, S.kvm_sregs(), "KVM_GET_SREGS")

    def set_sregs(self, sregs: S.kvm_sregs) -> None:
        _ioctl_buf(self.fd, K.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self) -> S.kvm_fpu:
        return _ioctl_buf(self.fd, K.KVM_GET_FPU, S.kvm_fpu(), "KVM_GET_FPU")

    def set_fpu(self, fpu: S.kvm_fpu) -> None:
        _ioctl_buf(self.fd, K.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def set_cpuid2(self, entries: list[S.kvm_cpuid_entry2]) -> None:
        buf = S.kvm_cpuid2_of(len(entries))()
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e
        _ioctl_buf(self.fd, K.KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def get_cpuid2(self) -> list[S.kvm_cpuid_entry2]:
        """The CPUID this vCPU was given (KVM_GET_CPUID2)."""
        return _get_cpuid(self.fd, K.KVM_GET_CPUID2, "KVM_GET_CPUID2", 256)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        buf = S.kvm_msrs_of(len(indices))()
        buf.nmsrs = len(indices)
        for i, idx in enumerate(indices):
            buf.entries[i].index = idx
        try:
            n = fcntl.ioctl(self.fd, K.KVM_GET_MSRS, buf, True)
        except OSError as e:
            raise KvmError(f"KVM_GET_MSRS failed: {e.strerror}") from None
        return {int(buf.entries[i].index): int(buf.entries[i].data) for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> int:
        """Set MSRs; returns how many KVM accepted (it stops at the first one it refuses)."""
        buf = S.kvm_msrs_of(len(values))()
        buf.nmsrs = len(values)
        for i, (idx, val) in enumerate(values.items()):
            buf.entries[i].index = idx
            buf.entries[i].data = val
        try:
            return int(fcntl.ioctl(self.fd, K.KVM_SET_MSRS, buf, True))
        except OSError as e:
            raise KvmError(f"KVM_SET_MSRS failed: {e.strerror}") from None

    def get_lapic(self) -> S.kvm_lapic_state:
        return _ioctl_buf(self.fd, K.KVM_GET_LAPIC, S.kvm_lapic_state(), "KVM_GET_LAPIC")

    def set_lapic(self, state: S.kvm_lapic_state) -> None:
        _ioctl_buf(self.fd, K.KVM_SET_LAPIC, state, "KVM_SET_LAPIC")

    def get_mp_state(self) -> int:
        return int(_ioctl_buf(self.fd, K.KVM_GET_MP_STATE, S.kvm_mp_state(), "KVM_GET_MP_STATE").mp_state)

    def set_mp_state(self, state: int) -> None:
        _ioctl_buf(self.fd, K.KVM_SET_MP_STATE, S.kvm_mp_state(state), "KVM_SET_MP_STATE")

    def get_vcpu_events(self) -> S.kvm_vcpu_events:
        return _ioctl_buf(self.fd, K.KVM_GET_VCPU_EVENTS, S.kvm_vcpu_events(), "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, events: S.kvm_vcpu_events) -> None:
        _ioctl_buf(self.fd, K.KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS")

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        """KVM_SET_GUEST_DEBUG: e.g. hardware breakpoints (control ENABLE | USE_HW_BP, DR0-3, DR7)."""
        arg = S.kvm_guest_debug(control=control)
        for i, value in enumerate((debugreg or [])[:8]):
            arg.debugreg[i] = value
        _ioctl_buf(self.fd, K.KVM_SET_GUEST_DEBUG, arg, "KVM_SET_GUEST_DEBUG")

    def get_debugregs(self) -> S.kvm_debugregs:
        return _ioctl_buf(self.fd, K.KVM_GET_DEBUGREGS, S.kvm_debugregs(), "KVM_GET_DEBUGREGS")

    def set_debugregs(self, regs: S.kvm_debugregs) -> None:
        _ioctl_buf(self.fd, K.KVM_SET_DEBUGREGS, regs, "KVM_SET_DEBUGREGS")

    def get_xsave(self) -> S.kvm_xsave:
        return _ioctl_buf(self.fd, K.KVM_GET_XSAVE, S.kvm_xsave(), "KVM_GET_XSAVE")

    def set_xsave(self, xsave: S.kvm_xsave) -> None:
        _ioctl_buf(self.fd, K.KVM_SET_XSAVE, xsave, "KVM_SET_XSAVE")

    def get_xcrs(self) -> S.kvm_xcrs:
        return _ioctl_buf(self.fd, K.KVM_GET_XCRS, S.kvm_xcrs(), "KVM_GET_XCRS")

    def set_xcrs(self, xcrs: S.kvm_xcrs) -> None:
        _ioctl_buf(self.fd, K.KVM_SET_XCRS, xcrs, "KVM_SET_XCRS")

    def get_tsc_khz(self) -> int:
        return _ioctl_int(self.fd, K.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def translate(self, linear: int) -> tuple[int, bool]:
        """Guest-virtual to guest-physical through the vCPU's current page tables."""
        t = _ioctl_buf(self.fd, K.KVM_TRANSLATE, S.kvm_translation(linear_address=linear), "KVM_TRANSLATE")
        return int(t.physical_address), bool(t.valid)
