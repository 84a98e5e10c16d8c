"""The x86 PC that virtkit's machines are: the guest-physical address map (``layout``),
descriptors, page tables and the CPU state each boot protocol starts in (``x86``), the CPUID
policy (``cpuid``).

Owns: every fixed guest-physical address and every architectural constant. May import:
``virtkit.kvm``, ``virtkit.memory``, ``virtkit.errors``.
"""
