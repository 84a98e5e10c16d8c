/*
 * triplefault: load an IDT with limit 0, then raise an exception. Delivering it needs IDT entry
 * n, which is beyond the limit: #GP; delivering the #GP fails the same way: #DF; and a fault while
 * delivering #DF shuts the CPU down (Intel SDM vol. 3A §6.15, "Interrupt 8 - Double Fault
 * Exception"). The VMM sees a triple fault (KVM_EXIT_SHUTDOWN). Command line: cpl=3 (default)
 * raises #UD with UD2 at CPL3; cpl=0 raises #DE (divide by zero) at CPL0.
 */
#include "guest.h"

/* One CPL0 visit: kcall() itself enters through the IDT, so nothing can follow the zero IDT. */
static long k_divide_by_zero(long zero)
{
	u64 a = 1, d = 0;

	k_lidt_zero(0);
	__asm__ volatile("divq %2" : "+a"(a), "+d"(d) : "r"((u64)zero));
	return (long)a;
}

int main(void)
{
	unsigned cpl = (unsigned)cmdline_u64("cpl", 3);

	printf("triplefault: loading a zero-limit IDT, then raising %s at CPL%u\n",
	       cpl == 0 ? "#DE" : "#UD", cpl == 0 ? 0 : 3);
	if (cpl == 0) {
		kcall(k_divide_by_zero, 0);
	} else {
		kcall(k_lidt_zero, 0);  /* back to CPL3 by IRETQ, which needs no IDT */
		__asm__ volatile("ud2");
	}
	printf("triplefault: still running: the exception did not shut the CPU down\n");
	return EXIT_FAIL;
}
