/* Reading the guest's own static page tables (lib/tables.S) at CPL3, where they are mapped. */
#include "guest.h"

extern u64 pml4[];

#define PTE_P 0x1ull
#define PTE_W 0x2ull
#define PTE_U 0x4ull
#define PTE_PS 0x80ull
#define PTE_ADDR 0x000FFFFFFFFFF000ull

/* 4-level walk (Intel SDM vol. 3A §4.5); every level must allow user writes (§4.6). */
bool pt_user_writable(u64 va)
{
	const u64 *table = pml4;

	for (int level = 3; level >= 0; level--) {
		u64 e = table[(va >> (12 + 9 * level)) & 0x1FF];
		if ((e & (PTE_P | PTE_W | PTE_U)) != (PTE_P | PTE_W | PTE_U))
			return false;
		if (level == 0 || (level <= 2 && (e & PTE_PS)))
			return true;
		table = (const u64 *)(uintptr_t)(e & PTE_ADDR);
	}
	return false;
}
