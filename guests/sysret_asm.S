/* Helpers for guests/sysret.c: a SYSRETQ issued from a genuine CPL0 context. */
#include "asm.h"

	.text
/*
 * long sysret_from_cpl0(void), called at CPL3: enter CPL0 through kcall (INT 0x80), then leave
 * CPL0 with SYSRETQ instead of IRETQ, landing back here at CPL3 on the caller's stack. Returns
 * the CS selector read after the landing. The CPL0 stack frame of the INT is abandoned, which is
 * harmless: the next entry from CPL3 starts again at TSS.RSP0.
 */
	.globl sysret_from_cpl0
sysret_from_cpl0:
	push	%rbx
	push	%rbp
	push	%r12
	push	%r13
	push	%r14
	push	%r15
	mov	%rsp, saved_user_rsp(%rip)
	lea	k_do_sysret(%rip), %rdi
	xor	%esi, %esi
	call	kcall
	ud2                             /* not reached: k_do_sysret does not return through kcall */

	.globl sysret_landing
sysret_landing:                         /* CPL3 again, if SYSRETQ did its job */
	mov	saved_user_rsp(%rip), %rsp
	mov	%cs, %eax
	pop	%r15
	pop	%r14
	pop	%r13
	pop	%r12
	pop	%rbp
	pop	%rbx
	ret

/* CPL0: RCX = where to go, R11 = user RFLAGS, RSP = the user stack (SYSRET leaves RSP alone). */
	.globl k_do_sysret, k_sysretq_insn
k_do_sysret:
	lea	sysret_landing(%rip), %rcx
	mov	$USER_RFLAGS, %r11d
	mov	saved_user_rsp(%rip), %rsp
k_sysretq_insn:
	sysretq

/* CPL0 or not: a privileged read whose #GP guests/sysret.c catches and skips (3 bytes). */
	.globl k_probe_cpl, probe_cr0_insn
k_probe_cpl:
	xor	%eax, %eax
probe_cr0_insn:
	mov	%cr0, %rax
	ret

/* long syscall_call(kfunc fn, long arg): SYSCALL with fn/arg in RDI/RSI, to whatever LSTAR says. */
	.globl syscall_call
syscall_call:
	syscall
	ret

	.data
	.balign 8
saved_user_rsp:
	.quad	0
