/*
 * virtkit's direct 64-bit entry (--boot direct64): long mode, CPL0, paging on with virtkit's
 * identity map of 0-4 GiB, CS = 0x08, DS/ES/SS = 0x10, interrupts off, no IDT,
 * RAX = 0x2BADB002, RBX = address of a Multiboot information structure, RSP = a scratch stack.
 * This image has no Multiboot header, so virtkit's "auto" protocol picks direct64 for it.
 */
#include "asm.h"

	.section .text.entry, "ax"
	.code64
	.globl entry64
entry64:
	mov	%ebx, %edi              /* rt_start(mbi, magic); the MBI lies below 4 GiB */
	mov	%eax, %esi
	lgdt	gdt_ptr                 /* same selector values as virtkit's GDT: no reload needed */
	mov	$pml4, %eax             /* our tables have U/S = 1 everywhere; virtkit's need not */
	mov	%rax, %cr3
	mov	$MSR_EFER, %ecx         /* LME/LMA are already set: add SCE for SYSCALL */
	rdmsr
	or	$EFER_SCE, %eax
	wrmsr
	jmp	boot64
