/*
 * spin: loop forever without exits, for the VMM's timeouts and kill paths. Command line: cpl=3
 * (default) spins at CPL3, natively fast on PVM; cpl=0 spins at CPL0 with interrupts off, where
 * PVM emulates every iteration inside the kernel (still no exit to the VMM).
 */
#include "guest.h"

/* A one-instruction loop: nothing for the VMM to see at either CPL. */
static long k_spin(long unused)
{
	(void)unused;
	__asm__ volatile("cli; 1: jmp 1b");
	return 0;
}

int main(void)
{
	unsigned cpl = cmdline_u64("cpl", 3) == 0 ? 0 : 3;

	printf("spin: looping forever at CPL%u\n", cpl);
	if (cpl == 0)
		kcall(k_spin, 0);
	__asm__ volatile("1: jmp 1b");
	return EXIT_FAIL;
}
