"""Sandbox mode: unmodified static/dynamic x86-64 Linux programs in a VM with no guest kernel,
each system call served by the VMM (docs/SANDBOX.md).

Modules, one concern each: paging (frames, page tables, guest pointers), cpu (descriptor tables,
stubs, vCPU state), elf (executables, initial stack), mm (mappings, brk/mmap, page faults),
files (root-confined paths, fd table), syscalls (the table), process (a process's vCPU thread and
run loop), trace (--trace/--stats), sandbox (the VM and its processes).
"""
