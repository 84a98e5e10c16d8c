/*
 * Device interrupts through the I/O APIC to the local APIC (Intel 82093AA I/O APIC datasheet,
 * Intel SDM vol. 3A "Advanced Programmable Interrupt Controller"). Everything here runs at CPL3
 * (MMIO through U=1 pages, the IDT is ordinary memory) except the timer stub at the end.
 */
#include "pc.h"

#define IOREGSEL        0x00
#define IOWIN           0x10
#define IOAPIC_REDTBL(pin) (0x10 + 2 * (pin))

/* 64-bit interrupt gate (Intel SDM vol. 3A §6.14.1), as lib/rt.c writes them */
struct gate {
	u16 offset0, selector;
	u8 ist, type;
	u16 offset1;
	u32 offset2, reserved;
} __attribute__((packed));
extern struct gate idt[IDT_ENTRIES];

void idt_set_handler(unsigned vec, const void *handler)
{
	u64 a = (u64)(uintptr_t)handler;
	idt[vec] = (struct gate){ .offset0 = a & 0xFFFF, .selector = SEL_KCODE64, .ist = 0,
				  .type = 0x8E, .offset1 = (a >> 16) & 0xFFFF, .offset2 = a >> 32 };
}

static u32 ioapic_read(unsigned reg)
{
	mmio_write32(IOAPIC_BASE + IOREGSEL, reg);
	return mmio_read32(IOAPIC_BASE + IOWIN);
}

static void ioapic_write(unsigned reg, u32 v)
{
	mmio_write32(IOAPIC_BASE + IOREGSEL, reg);
	mmio_write32(IOAPIC_BASE + IOWIN, v);
}

u32 ioapic_version(void)
{
	return ioapic_read(1);
}

/* Low word: bits 0-7 vector, 8-10 delivery mode (000 fixed), 11 destination mode (0 physical),
 * 13 polarity (0 high), 15 trigger mode (0 edge), 16 mask. High word: bits 24-31 (56-63 of the
 * entry) the destination APIC ID. The high word first, so the entry is complete when unmasked. */
void ioapic_route_edge(unsigned pin, u8 vec, u8 apic_id)
{
	ioapic_write(IOAPIC_REDTBL(pin), 1u << 16);
	ioapic_write(IOAPIC_REDTBL(pin) + 1, (u32)apic_id << 24);
	ioapic_write(IOAPIC_REDTBL(pin), vec);
}

void ioapic_mask(unsigned pin)
{
	ioapic_write(IOAPIC_REDTBL(pin), 1u << 16);
}

void lapic_enable(void)
{
	mmio_write32(LAPIC_BASE + LAPIC_SVR, 0x100 | VEC_SPURIOUS);
}

u32 lapic_id(void)
{
	return mmio_read32(LAPIC_BASE + LAPIC_ID) >> 24;
}

/* LVT timer: bits 0-7 vector, 16 mask, 17-18 mode (01 periodic); divide configuration 0x3 = 16. */
void lapic_timer_periodic(u8 vec, u32 count)
{
	mmio_write32(LAPIC_BASE + LAPIC_TIMER_DIVIDE, 0x3);
	mmio_write32(LAPIC_BASE + LAPIC_LVT_TIMER, (1u << 17) | vec);
	mmio_write32(LAPIC_BASE + LAPIC_TIMER_INIT, count);
}

void lapic_timer_stop(void)
{
	mmio_write32(LAPIC_BASE + LAPIC_TIMER_INIT, 0);
	mmio_write32(LAPIC_BASE + LAPIC_LVT_TIMER, 1u << 16);
}

volatile u64 lapic_timer_ticks;

/* CPL0, emulated instruction by instruction on PVM: count, EOI (any value written to the EOI
 * register, Intel SDM vol. 3A "EOI Register"), return. */
__asm__(
	"	.text\n"
	"	.globl isr_lapic_timer\n"
	"isr_lapic_timer:\n"
	"	incq	lapic_timer_ticks(%rip)\n"
	"	push	%rax\n"
	"	mov	$0xFEE000B0, %eax\n"
	"	movl	$0, (%rax)\n"
	"	pop	%rax\n"
	"	iretq\n");
