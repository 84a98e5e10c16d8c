/*
 * Assembler macros for the CPL0 boot path. Every instruction here runs at CPL0, which the PVM host
 * emulates at about 1-2 us each: keep them few (docs/GUESTS.md, "Boot path").
 */
#ifndef GUEST_ASM_H
#define GUEST_ASM_H
#include "arch.h"

/*
 * From 32-bit protected mode with paging off to 64-bit mode (Intel SDM vol. 3A §9.8.5,
 * "Initializing IA-32e Mode"): CR4.PAE, CR3 = PML4, EFER.LME, then CR0.PG activates IA-32e mode in
 * compatibility mode, and a far jump to a code segment with L=1 enters 64-bit mode. EFER.SCE is
 * set in the same write so SYSCALL works later. The page tables are static (lib/tables.S) and
 * identity-map this code, as §9.8.5 requires. DS must already be flat: lgdt reads through it.
 */
.macro LONG_MODE_FROM_PM32 target
	lgdt	gdt_ptr
	mov	$CR4_PAE, %eax
	mov	%eax, %cr4
	mov	$pml4, %eax
	mov	%eax, %cr3
	mov	$MSR_EFER, %ecx
	mov	$(EFER_LME | EFER_SCE), %eax
	xor	%edx, %edx
	wrmsr
	mov	$(CR0_PG | CR0_NE | CR0_ET | CR0_PE), %eax
	mov	%eax, %cr0
	ljmp	$SEL_KCODE64, $\target
.endm

/*
 * Drop to CPL3 at \target with RSP = \stack, IOPL = 3 and interrupts off: IRETQ pops RIP, CS,
 * RFLAGS, RSP, SS (Intel SDM vol. 3A §6.14.3; vol. 2A IRET). RDI and RSI pass through unchanged.
 */
.macro ENTER_USER stack, target
	push	$USER_DS
	push	$\stack
	push	$USER_RFLAGS
	push	$USER_CS
	push	$\target
	iretq
.endm

#endif
