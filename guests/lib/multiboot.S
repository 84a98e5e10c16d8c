/*
 * Multiboot v1 entry (Multiboot Specification 0.6.96). Linked first so the header sits in the
 * first 8 KiB of the file, 4-byte aligned (§3.1.1).
 */
#include "asm.h"

	.section .multiboot, "a"
	.balign 4
/*
 * §3.1.1/§3.1.2: magic, flags, checksum (the three add up to 0 mod 2^32). Flags: bit 1 asks for
 * mem_lower/mem_upper and the memory map; bit 16 is clear, so the loader takes the load addresses
 * from the ELF program headers instead of the a.out address fields.
 */
mb_header:
	.long	MB_HEADER_MAGIC
	.long	MB_HEADER_MEMINFO
	.long	-(MB_HEADER_MAGIC + MB_HEADER_MEMINFO)

	.section .text.entry, "ax"
	.code32
/*
 * §3.2 machine state: 32-bit protected mode, paging off, interrupts off, CS/DS/ES/SS flat,
 * EAX = 0x2BADB002, EBX = physical address of the Multiboot information. No stack.
 * Both values go on to rt_start() as its arguments (RDI, RSI).
 */
	.globl mb_entry32
mb_entry32:
	mov	%ebx, %edi
	mov	%eax, %esi
	LONG_MODE_FROM_PM32 boot64
