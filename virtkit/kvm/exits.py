"""The exit-specific part of the ``kvm_run`` page, decoded with precompiled ``struct`` layouts.

After KVM_RUN returns, ``exit_reason`` (offset 8) says which member of the union at
:data:`~virtkit.kvm.structs.KVM_RUN_EXIT_UNION_OFFSET` is valid (include/uapi/linux/kvm.h,
``struct kvm_run``). The vCPU loop reads them with ``Struct.unpack_from`` on the mmap'd page,
which costs a fraction of a ctypes attribute access: these layouts are on the hot path.
"""

from __future__ import annotations

import struct

from virtkit.kvm.structs import KVM_RUN_EXIT_UNION_OFFSET

#: u32 exit_reason, at offset 8 of kvm_run
EXIT_REASON_OFFSET = 8
EXIT_REASON = struct.Struct("<I")
#: kvm_run.io: u8 direction, u8 size, u16 port, u32 count, u64 data_offset (into the page)
IO = struct.Struct("<BBHIQ")
#: kvm_run.mmio: u64 phys_addr, u8 data[8], u32 len, u8 is_write
MMIO = struct.Struct("<Q8sIB")
#: where kvm_run.mmio.data sits in the page (a read's value is written back there)
MMIO_DATA_OFFSET = KVM_RUN_EXIT_UNION_OFFSET + 8
#: kvm_run.internal: u32 suberror, u32 ndata, u64 data[0] (flags, for emulation failures)
INTERNAL = struct.Struct("<IIQ")
#: in data[0] of an emulation failure: data[1] holds the instruction length and bytes follow
INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1
#: kvm_run.system_event: u32 type, u32 ndata
SYSTEM_EVENT = struct.Struct("<II")
#: kvm_run.fail_entry: u64 hardware_entry_failure_reason
FAIL_ENTRY = struct.Struct("<Q")
