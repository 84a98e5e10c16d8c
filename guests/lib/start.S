/*
 * The common 64-bit CPL0 boot path, the way back into CPL0 from CPL3 (kcall), and the interrupt
 * stubs.
 */
#include "asm.h"

	.section .text.entry, "ax"
	.code64
/*
 * Both boot protocols arrive here in 64-bit mode with RDI = MBI address, RSI = boot magic.
 * Load the IDT (its gates are filled in at CPL3 before anything can use them) and CPU 0's TSS,
 * whose RSP0 is the stack interrupts from CPL3 arrive on, then drop to CPL3.
 */
	.globl boot64
boot64:
	mov	$SEL_KDATA, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	mov	$stack0_top, %esp
	lidt	idt_ptr
	mov	$SEL_TSS0, %eax
	ltr	%ax
	ENTER_USER stack0_top, user_entry

/* CPL3 from here on: rt_start(mbi, magic) never returns. */
user_entry:
	call	rt_start
1:	jmp	1b

	.text
/*
 * long kcall(long (*fn)(long), long arg): run fn(arg) at CPL0 and return its result.
 *
 * From CPL3 the way in is INT3: a #BP through a DPL 3 interrupt gate switches to the TSS's RSP0
 * stack at CPL0 (Intel SDM vol. 3A §6.12.1), and IRETQ comes back. The architectural fast path,
 * SYSCALL, does not work on the PVM host: it reaches the LSTAR target but leaves the vCPU at CPL3,
 * and INT 0x80 arrives as #UD; exceptions raised at CPL3, on the other hand, are delivered through
 * the guest's IDT exactly as on hardware (guests/sysret.c measures this; docs/GUESTS.md).
 *
 * A caller already at CPL0 (the low bits of CS are the CPL; under PVM, CPL3 code reads the host's
 * user selector 0x33) just calls fn. Clobbers what a SysV call may clobber.
 */
	.globl kcall
kcall:
	mov	%cs, %eax
	test	$3, %al
	jz	1f
	int3
kcall_int3_next:
	ret
1:	mov	%rdi, %rax
	mov	%rsi, %rdi
	jmp	*%rax

/*
 * Vector 3 lands here at CPL0, interrupts off (interrupt gate), on the per-CPU RSP0 stack, which
 * the CPU aligned to 16 before pushing SS, RSP, RFLAGS, CS, RIP (40 bytes). #BP is a trap, so the
 * saved RIP is the instruction after INT3; any other #BP is a real breakpoint and gets reported.
 */
	.globl kcall_entry
kcall_entry:
	cmpq	$kcall_int3_next, (%rsp)
	jne	isr_stubs + 16 * 3
	sub	$8, %rsp                /* 16-byte alignment at the call (SysV ABI) */
	mov	%rdi, %rax
	mov	%rsi, %rdi
	call	*%rax
	add	$8, %rsp
	iretq

/*
 * SYSCALL entries, used only by guests/sysret.c to test SYSCALL/SYSRETQ on the host (RCX = user
 * RIP, R11 = user RFLAGS, RSP still the caller's stack; Intel SDM vol. 2B, SYSCALL).
 */
	.globl syscall_entry_sysret, syscall_entry_iret, syscall_sysretq_insn
syscall_entry_sysret:
	push	%rcx
	push	%r11
	sub	$8, %rsp
	mov	%rdi, %rax
	mov	%rsi, %rdi
	call	*%rax
	add	$8, %rsp
	pop	%r11
	pop	%rcx
syscall_sysretq_insn:
	sysretq                         /* CS = STAR[63:48]+16 | 3, SS = +8 | 3, RIP = RCX, RFLAGS = R11 */

syscall_entry_iret:
	push	%rcx
	push	%r11
	sub	$8, %rsp
	mov	%rdi, %rax
	mov	%rsi, %rdi
	call	*%rax
	add	$8, %rsp
	pop	%r11
	pop	%rcx
	mov	%rsp, %rdx
	push	$USER_DS                /* IRETQ frame: SS, RSP, RFLAGS, CS, RIP */
	push	%rdx
	push	%r11
	push	$USER_CS
	push	%rcx
	iretq

/*
 * Interrupt and exception stubs, one per vector 0..NUM_STUBS-1, 16 bytes apart so lib/rt.c can
 * compute their addresses. The CPU pushes an error code for vectors 8, 10-14, 17, 21, 29, 30
 * (Intel SDM vol. 3A §6.15); the others push a zero so every frame has the same shape.
 */
	.balign 16
	.globl isr_stubs
isr_stubs:
	.set	vec, 0
	.rept	NUM_STUBS
	.balign	16
	.if	(vec == 8) || (vec >= 10 && vec <= 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	.else
	push	$0
	.endif
	push	$vec
	jmp	isr_common
	.set	vec, vec + 1
	.endr

isr_common:
	push	%rax
	push	%rbx
	push	%rcx
	push	%rdx
	push	%rsi
	push	%rdi
	push	%rbp
	push	%r8
	push	%r9
	push	%r10
	push	%r11
	push	%r12
	push	%r13
	push	%r14
	push	%r15
	mov	%rsp, %rdi
	call	trap_dispatch           /* 22 quadwords on a 16-byte aligned stack: aligned call */
	pop	%r15
	pop	%r14
	pop	%r13
	pop	%r12
	pop	%r11
	pop	%r10
	pop	%r9
	pop	%r8
	pop	%rbp
	pop	%rdi
	pop	%rsi
	pop	%rdx
	pop	%rcx
	pop	%rbx
	pop	%rax
	add	$16, %rsp               /* vector and error code */
	iretq

/*
 * The PIT tick (IRQ0 at vector 0x20) gets its own short stub: at CPL0 on PVM each of these
 * instructions is emulated, and the timer phase of guests/trapcost.c measures exactly this path.
 * EOI is OCW2 = 0x20, non-specific, to the master 8259A (8259A datasheet, "Operation Command Words").
 */
	.globl isr_timer, timer_ticks
isr_timer:
	incq	timer_ticks(%rip)
	push	%rax
	mov	$0x20, %al
	outb	%al, $0x20
	pop	%rax
	iretq

/* The local APIC's spurious vector: no EOI (Intel SDM vol. 3A, "Spurious Interrupt"). */
	.globl isr_spurious
isr_spurious:
	iretq

	.data
	.balign 8
timer_ticks:
	.quad	0

/* CPU 0's boot and CPL3 stack (CPU 1's is in guests/smp_ap.S); the stack section is not zeroed. */
	.section .stack, "aw", @nobits
	.balign 16
	.space	16384
	.globl stack0_top
stack0_top:
