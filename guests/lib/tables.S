/*
 * Static descriptor and page tables. They are data in the image so the boot path only loads
 * pointers to them: building them with a loop at boot would cost thousands of emulated CPL0
 * instructions on PVM.
 */
#include "arch.h"

	.section .data.pagetables, "aw"
	.balign 4096
/*
 * Identity map of 0-4 GiB with 2 MiB pages (Intel SDM vol. 3A §4.5, "4-Level Paging"): one PML4
 * entry -> one PDPT whose first four entries -> four page directories of 512 2 MiB pages.
 * Every level has U/S = 1 so CPL3 code can reach all of it, RAM and MMIO alike (the guests do their
 * work at CPL3; SMEP/SMAP stay off). Flags: P (0x1) | R/W (0x2) | U/S (0x4), and PS (0x80) in the
 * page-directory entries.
 */
#define PTE_DIR   0x07
#define PTE_2M    0x87
	.globl pml4, pdpt, pd
pml4:
	.quad	pdpt + PTE_DIR
	.fill	511, 8, 0
pdpt:
	.quad	pd + 0x0000 + PTE_DIR
	.quad	pd + 0x1000 + PTE_DIR
	.quad	pd + 0x2000 + PTE_DIR
	.quad	pd + 0x3000 + PTE_DIR
	.fill	508, 8, 0
pd:
	.set	addr, 0
	.rept	2048
	.quad	addr + PTE_2M
	.set	addr, addr + 0x200000
	.endr

	.data
	.balign 16
/*
 * Global descriptor table (Intel SDM vol. 3A §3.4.5, "Segment Descriptors"; §5.2.1 for 64-bit code
 * segments, L = 1). Access bytes have the accessed bit set so loading a selector never writes here.
 * The 16-byte TSS descriptors (§7.2.3) split the TSS base over several fields; the linker script
 * computes them (__tss0_desc, __tss1_desc), so the table is complete before the first instruction.
 */
	.globl gdt, gdt_ptr
gdt:
	.quad	0                       /* 0x00 null */
	.quad	0x00AF9B000000FFFF      /* 0x08 kernel code, 64-bit (L=1), DPL 0 */
	.quad	0x00CF93000000FFFF      /* 0x10 kernel data, flat 4 GiB, DPL 0 */
	.quad	0x00CF9B000000FFFF      /* 0x18 kernel code, 32-bit flat, DPL 0 */
	.quad	0x00CFF3000000FFFF      /* 0x20 user data, flat, DPL 3 */
	.quad	0x00AFFB000000FFFF      /* 0x28 user code, 64-bit (L=1), DPL 3 */
	.quad	__tss0_desc, 0          /* 0x30 TSS of CPU 0 (base below 4 GiB: upper half 0) */
	.quad	__tss1_desc, 0          /* 0x40 TSS of CPU 1 */
gdt_end:
	.if	gdt_end - gdt != GDT_SIZE
	.error	"GDT_SIZE in lib/arch.h does not match the table"
	.endif

/* LGDT/LIDT operands: 16-bit limit, then the base (4 bytes read in 32-bit mode, 8 in 64-bit mode). */
	.balign 8
	.short	0
gdt_ptr:
	.short	GDT_SIZE - 1
	.quad	gdt
	.short	0, 0, 0
	.globl idt_ptr
idt_ptr:
	.short	IDT_ENTRIES * 16 - 1
	.quad	idt

/*
 * 64-bit TSS per CPU (Intel SDM vol. 3A §7.7, "Task Management in 64-bit Mode"). RSP0 is the stack
 * the CPU switches to when an interrupt takes it from CPL3 to CPL0. The TSS ends in an all-zero
 * I/O permission bitmap (Intel SDM vol. 1, "I/O Permission Bit Map"): every port is allowed at
 * CPL3 whatever IOPL says. User RFLAGS also has IOPL = 3, which is enough on VT-x/AMD-V, but the
 * PVM host runs CPL3 code with the hardware IOPL at 0 and its emulator then consults this bitmap.
 */
#define IOMAP_BYTES 8192                /* one bit per port 0-0xFFFF */

.macro TSS64 rsp0
	.long	0                       /* reserved */
	.quad	\rsp0                   /* RSP0 */
	.fill	11, 8, 0                /* RSP1, RSP2, reserved, IST1-7, reserved */
	.short	0, 104                  /* reserved, I/O map base: the bitmap follows */
	.fill	IOMAP_BYTES, 1, 0       /* I/O permission bitmap: 0 = allowed */
.endm
	.balign 16
	.globl tss0, tss1
tss0:	TSS64 kstack0_top
	.balign 16
tss1:	TSS64 kstack1_top

/* The IDT: loaded at boot, its gates written by lib/rt.c at CPL3 (they are only read when an
 * interrupt arrives, and every one stays masked until then). */
	.bss
	.balign 16
	.globl idt
idt:
	.space	IDT_ENTRIES * 16

	.section .stack, "aw", @nobits
	.balign 16
	.space	KSTACK_SIZE
kstack0_top:
	.space	KSTACK_SIZE
kstack1_top:
