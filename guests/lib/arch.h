/*
 * Constants shared by the guests' assembly and C: selectors of the guest's own GDT, MSR numbers,
 * control-register bits and the fixed addresses the guests use. Included from .S and .c files.
 */
#ifndef GUEST_ARCH_H
#define GUEST_ARCH_H

/*
 * GDT layout (lib/tables.S). Slots 0x08/0x10/0x18 match virtkit's boot GDT (virtkit/boot/layout.py)
 * so the direct 64-bit entry needs no segment reload. The user slots follow the SYSCALL/SYSRET
 * rules (Intel SDM vol. 2B, SYSCALL and SYSRET): SYSCALL loads CS = STAR[47:32] and
 * SS = STAR[47:32] + 8; 64-bit SYSRET loads SS = STAR[63:48] + 8 and CS = STAR[63:48] + 16, both
 * with RPL 3. With STAR[47:32] = 0x08 and STAR[63:48] = 0x18 that is kernel 0x08/0x10 and user
 * 0x20 (data) / 0x28 (64-bit code).
 */
#define SEL_KCODE64   0x08
#define SEL_KDATA     0x10
#define SEL_KCODE32   0x18          /* 32-bit code: the AP trampoline's protected-mode step */
#define SEL_UDATA     0x20
#define SEL_UCODE64   0x28
#define SEL_TSS0      0x30          /* a 64-bit TSS descriptor takes 16 bytes (two slots) */
#define GDT_SIZE      0x50          /* bytes: 6 descriptors and 2 TSS descriptors */
#define SEL_TSS(cpu)  (SEL_TSS0 + 16 * (cpu))
#define MAX_CPUS      2
#define SEL_SYSRET_BASE SEL_KCODE32 /* STAR[63:48] */
#define USER_CS       (SEL_UCODE64 | 3)
#define USER_DS       (SEL_UDATA | 3)

/* RFLAGS for user mode: IOPL = 3 lets CPL3 code use in/out (Intel SDM vol. 1, "I/O Privilege
 * Level"); the PVM host ignores it and checks the TSS I/O bitmap instead (lib/tables.S).
 * Interrupts stay disabled; bit 1 is reserved and always 1. */
#define USER_RFLAGS   0x3002

/* MSRs (Intel SDM vol. 4, table 2-2) */
#define MSR_EFER      0xC0000080
#define MSR_STAR      0xC0000081
#define MSR_LSTAR     0xC0000082
#define MSR_SFMASK    0xC0000084
#define EFER_SCE      (1 << 0)      /* SYSCALL/SYSRET enable */
#define EFER_LME      (1 << 8)      /* IA-32e mode enable */
/* SYSCALL clears these RFLAGS bits on entry: TF, IF, DF, NT, AC. */
#define SFMASK_BITS   0x44700

#define CR0_PE        (1 << 0)
#define CR0_ET        (1 << 4)
#define CR0_NE        (1 << 5)
#define CR0_PG        (1 << 31)
#define CR4_PAE       (1 << 5)

/* Multiboot 0.6.96: header magic (§3.1.2) and the value the loader leaves in EAX (§3.2). */
#define MB_HEADER_MAGIC      0x1BADB002
#define MB_HEADER_MEMINFO    (1 << 1)   /* ask for mem_lower/mem_upper (and the memory map) */
#define MB_BOOTLOADER_MAGIC  0x2BADB002

/* Fixed guest-physical addresses; virtkit's values live in virtkit/boot/layout.py. */
#define AP_TRAMPOLINE_ADDR   0x80000      /* layout.py leaves 0x8_0000-0x9_FFFF to the guest */
#define MMIO_UNASSIGNED      0xC0000000   /* MMIO_HOLE_START: no device on QEMU or virtkit */
#define LAPIC_BASE           0xFEE00000   /* xAPIC default base (Intel SDM vol. 3A, APIC) */
#define LAPIC_ID             0x020        /* xAPIC register offsets */
#define LAPIC_SVR            0x0F0
#define LAPIC_ICR_LO         0x300
#define LAPIC_ICR_HI         0x310
#define LAPIC_LVT0           0x350
#define LAPIC_LVT1           0x360

/* Legacy PC ports */
#define PORT_COM1            0x3F8
#define PORT_POST            0x80
#define PORT_DEBUG_EXIT      0xF4         /* QEMU isa-debug-exit: status = (value << 1) | 1 */
#define PORT_I8042_CMD       0x64

/* Interrupt vectors: exceptions 0-31 (kcall() enters CPL0 from CPL3 with INT3, vector 3: see
 * lib/start.S for why), the two 8259s remapped to 0x20-0x2F. */
#define VEC_IRQ0             0x20
#define NUM_STUBS            0x30         /* vectors with a stub in lib/start.S */
#define VEC_KCALL            3            /* #BP */
#define VEC_SPURIOUS         0xFF         /* local APIC spurious interrupt: no EOI */
#define IDT_ENTRIES          256
#define KSTACK_SIZE          16384        /* per-CPU CPL0 stack (TSS.RSP0) */

#endif
