"""Boot protocols: Multiboot v1 and direct 64-bit ELF entry (``loader`` picks one from the file).

Owns: parsing kernel images and placing them and their boot information in guest memory. May
import: ``virtkit.arch`` (the address map, the entry CPU state), ``virtkit.memory``,
``virtkit.errors``.
"""
