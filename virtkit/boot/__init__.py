"""Boot loaders: Multiboot v1, direct 64-bit ELF entry, and the fixed guest-physical layout."""
