/*
 * The I/O APIC and the local APIC as an interrupt path for devices (lib/ioapic.c), and
 * pic_mask_irq (lib/pc.c); the other 8259 and PIT helpers of lib/pc.c are declared in guest.h.
 */
#ifndef GUEST_PC_H
#define GUEST_PC_H

#include "guest.h"

#define IOAPIC_BASE          0xFEC00000   /* default I/O APIC window (82093AA datasheet §3.0) */
#define LAPIC_EOI            0x0B0
#define LAPIC_LVT_TIMER      0x320
#define LAPIC_TIMER_INIT     0x380
#define LAPIC_TIMER_DIVIDE   0x3E0

/* Point IDT vector vec (at or above NUM_STUBS, so no runtime stub owns it) at handler, an
 * interrupt gate at DPL 0. Runs at CPL3: the IDT is ordinary memory. */
void idt_set_handler(unsigned vec, const void *handler);

/* I/O APIC version register (index 1): bits 0-7 version, 16-23 highest redirection entry. */
u32 ioapic_version(void);
/* Redirection entry of pin: vector vec, fixed delivery, physical destination apic_id,
 * active high, edge triggered, unmasked (82093AA datasheet §3.2.4). */
void ioapic_route_edge(unsigned pin, u8 vec, u8 apic_id);
void ioapic_mask(unsigned pin);
/* Set or clear the 8259 mask bit (OCW1) of ISA IRQ irq, master 0-7 or slave 8-15. */
void pic_mask_irq(unsigned irq, bool masked);
/* Software-enable the local APIC (SVR bit 8, spurious vector VEC_SPURIOUS); LINT0/1 untouched. */
void lapic_enable(void);
u32 lapic_id(void);
/* Local APIC timer, periodic at vec every count bus clocks / 16; its stub only counts and sends
 * EOI. A wake-up for HLT loops that wait for another interrupt, so a lost one cannot hang them. */
void lapic_timer_periodic(u8 vec, u32 count);
void lapic_timer_stop(void);
extern volatile u64 lapic_timer_ticks;
extern char isr_lapic_timer[];

#endif
