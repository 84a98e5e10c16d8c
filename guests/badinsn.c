/*
 * badinsn: execute LOCK CMPXCHG16B at CPL0 with an empty IDT: an instruction that neither PVM's
 * CPL0 emulator nor virtkit can perform (a locked 16-byte read-modify-write cannot be made atomic
 * from the VMM while other vCPUs run; virtkit/cpl0.py). On hardware (and VT-x/AMD-V) with CX16 it
 * succeeds and the guest says so (exit value 1); without CX16 it raises #UD (Intel SDM vol. 2A,
 * CMPXCHG8B/CMPXCHG16B), which with a zero-limit IDT ends in a triple fault. On the PVM host KVM
 * reports an internal error (emulation failure) to the VMM, which reports it.
 */
#include "guest.h"

static u64 pair[2] __attribute__((aligned(16))) = { 1, 2 };

/* One CPL0 visit: kcall() itself enters through the IDT, so nothing can follow the zero IDT. */
static long k_cmpxchg16b(long unused)
{
	u64 lo = 1, hi = 2;

	k_lidt_zero(unused);
	__asm__ volatile("lock cmpxchg16b %2"
			 : "+a"(lo), "+d"(hi), "+m"(pair)
			 : "b"(3ul), "c"(4ul)
			 : "memory", "cc");
	return (long)pair[0];
}

int main(void)
{
	printf("badinsn: executing lock cmpxchg16b at CPL0 with a zero-limit IDT\n");
	long v = kcall(k_cmpxchg16b, 0);
	printf("badinsn: cmpxchg16b stored %#lx: the instruction was not rejected\n", (u64)v);
	return EXIT_FAIL;
}
