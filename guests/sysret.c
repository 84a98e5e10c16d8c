/*
 * sysret: how SYSCALL and SYSRETQ behave on this host. PLATFORM.md reported that SYSRETQ
 * triple-faulted; this guest repeats the experiment with a GDT laid out as SYSRET requires (user
 * data at STAR[63:48] + 8, user code at + 16; lib/arch.h) and an IDT that reports exceptions
 * instead of letting them triple-fault. Steps, one line each:
 *   1. wrmsr STAR/LSTAR/SFMASK at CPL0;
 *   2. SYSCALL from CPL3, and at the LSTAR target a privileged read (mov from CR0): at CPL0 it
 *      works, at CPL3 it raises #GP, which is caught and skipped;
 *   3. SYSRETQ from a genuine CPL0 context (entered through INT 0x80);
 *   4. a SYSCALL/SYSRETQ round trip, the classic fast system call.
 * Exit value 0 when SYSRETQ from CPL0 worked, EXIT_SYSRET_FAULT when it raised an exception.
 * Command line: step=N stops after step N.
 */
#include "guest.h"

long sysret_from_cpl0(void);
long syscall_call(kfunc fn, long arg);
long k_do_sysret(long unused);
long k_probe_cpl(long unused);
extern char probe_cr0_insn[], k_sysretq_insn[], syscall_sysretq_insn[], syscall_entry_iret[],
	syscall_entry_sysret[];

static volatile int probe_faulted;
static volatile unsigned probe_cpl;
static const char *step_name = "";

static bool hook(struct trap_frame *f)
{
	if (f->vector == 13 && f->rip == (u64)(uintptr_t)probe_cr0_insn) {
		probe_faulted = 1;
		probe_cpl = f->cs & 3;
		f->rip += 3;            /* skip the 3-byte mov %cr0, %rax */
		return true;
	}
	const char *where = "";
	if (f->rip == (u64)(uintptr_t)k_sysretq_insn || f->rip == (u64)(uintptr_t)syscall_sysretq_insn)
		where = (f->cs & 3) ? ", the sysretq instruction, executed at CPL3" : ", the sysretq instruction";
	printf("sysret: step %s raised exception vector %lu error=%#lx at rip=%#lx cs=%#lx%s\n", step_name,
	       f->vector, f->error, f->rip, f->cs, where);
	guest_exit(EXIT_SYSRET_FAULT);
}

static long k_setup_syscall(long lstar)
{
	u64 star = ((u64)SEL_SYSRET_BASE << 48) | ((u64)SEL_KCODE64 << 32);

	__asm__ volatile("wrmsr" : : "c"(MSR_STAR), "a"((u32)star), "d"((u32)(star >> 32)));
	__asm__ volatile("wrmsr" : : "c"(MSR_LSTAR), "a"((u32)lstar), "d"((u32)((u64)lstar >> 32)));
	__asm__ volatile("wrmsr" : : "c"(MSR_SFMASK), "a"(SFMASK_BITS), "d"(0));
	return 0;
}

int main(void)
{
	u64 last = cmdline_u64("step", 4);
	u16 cs;

	trap_hook = hook;

	step_name = "1 (wrmsr)";
	kcall(k_setup_syscall, (long)(uintptr_t)syscall_entry_iret);
	printf("sysret: step 1: STAR=%#lx LSTAR=%p SFMASK=%#x written at CPL0\n",
	       ((u64)SEL_SYSRET_BASE << 48) | ((u64)SEL_KCODE64 << 32), syscall_entry_iret, SFMASK_BITS);
	if (last < 2)
		return EXIT_OK;

	step_name = "2 (syscall)";
	probe_faulted = 0;
	syscall_call(k_probe_cpl, 0);
	if (probe_faulted)
		printf("sysret: step 2: SYSCALL reached LSTAR but at CPL%u: mov from CR0 raised #GP\n", probe_cpl);
	else
		printf("sysret: step 2: SYSCALL reached LSTAR at CPL0 (mov from CR0 worked); IRETQ back\n");
	if (last < 3)
		return EXIT_OK;

	step_name = "3 (sysretq from CPL0)";
	cs = (u16)sysret_from_cpl0();
	printf("sysret: step 3: SYSRETQ from CPL0 returned to CPL3 (CS reads %#x)\n", cs);
	if (last < 4)
		return EXIT_OK;

	step_name = "4 (syscall+sysretq)";
	kcall(k_setup_syscall, (long)(uintptr_t)syscall_entry_sysret);
	probe_faulted = 0;
	syscall_call(k_probe_cpl, 0);
	printf("sysret: step 4: SYSCALL/SYSRETQ round trip returned (handler ran at CPL%u)\n",
	       probe_faulted ? probe_cpl : 0);
	return EXIT_OK;
}
