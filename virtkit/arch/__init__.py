"""x86-64 architecture helpers: descriptors, page tables, register state, CPUID policy."""
