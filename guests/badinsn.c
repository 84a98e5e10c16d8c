/*
 * badinsn: execute XGETBV at CPL0 with an empty IDT. CR4.OSXSAVE is clear, so on hardware (and
 * VT-x/AMD-V) it raises #UD (Intel SDM vol. 2C, XGETBV), which with a zero-limit IDT ends in a
 * triple fault. On the PVM host the CPL0 instruction emulator does not know XGETBV and KVM reports
 * an internal error (emulation failure) to the VMM instead.
 */
#include "guest.h"

/* One CPL0 visit: kcall() itself enters through the IDT, so nothing can follow the zero IDT. */
static long k_xgetbv(long unused)
{
	u32 lo, hi;

	k_lidt_zero(unused);
	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	return (long)(((u64)hi << 32) | lo);
}

int main(void)
{
	printf("badinsn: executing xgetbv at CPL0 with a zero-limit IDT\n");
	long v = kcall(k_xgetbv, 0);
	printf("badinsn: xgetbv returned %#lx: the instruction was not rejected\n", (u64)v);
	return EXIT_FAIL;
}
