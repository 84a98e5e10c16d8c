/*
 * Bring-up path of the second CPU: real mode -> protected mode -> long mode -> CPL3.
 * Intel MP spec 1.4 appendix B.4: a STARTUP IPI with vector VV starts the AP in real mode at
 * CS:IP = VV00:0000, i.e. physical 0xVV000. guests/smp.c copies the trampoline there.
 */
#include "asm.h"

	.text
	.code16
	.globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
	cli
	mov	%cs, %ax
	mov	%ax, %ds
	lgdtl	ap_tramp_gdtr - ap_tramp_start  /* DS-relative: the copy's own GDTR image */
	mov	%cr0, %eax
	or	$CR0_PE, %eax
	mov	%eax, %cr0                      /* protected mode (Intel SDM vol. 3A §9.9.1) */
	ljmpl	$SEL_KCODE32, $ap_entry32       /* flat 32-bit code in the kernel image */
	.balign 4
ap_tramp_gdtr:
	.short	GDT_SIZE - 1
	.long	gdt
ap_tramp_end:

	.code32
ap_entry32:
	mov	$SEL_KDATA, %eax                /* DS was the real-mode segment: lgdt reads through it */
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	LONG_MODE_FROM_PM32 ap_entry64

	.code64
ap_entry64:
	mov	$SEL_KDATA, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	mov	$ap_stack_top, %esp
	lidt	idt_ptr                         /* the IDT CPU 0 filled in */
	mov	$SEL_TSS(1), %eax
	ltr	%ax
	ENTER_USER ap_stack_top, ap_user_entry

ap_user_entry:                                  /* CPL3 */
	call	ap_main
1:	jmp	1b

	.section .stack, "aw", @nobits
	.balign 16
	.space	16384
ap_stack_top:
