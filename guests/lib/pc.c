/*
 * The two legacy timer/interrupt chips every PC has: the 8259A PIC pair and the 8254 PIT.
 * Port I/O works at CPL3 here because user RFLAGS has IOPL = 3.
 */
#include "pc.h"

#define PIC1_CMD 0x20
#define PIC1_DATA 0x21
#define PIC2_CMD 0xA0
#define PIC2_DATA 0xA1

#define PIT_CH0 0x40
#define PIT_CH2 0x42
#define PIT_CTRL 0x43
#define PIT_HZ 1193182u         /* 8254 input clock on a PC: 14.31818 MHz / 12 */
#define PORT_B 0x61             /* bit 0: channel 2 gate, bit 1: speaker data, bit 5: channel 2 OUT */

/*
 * 8259A initialisation (8259A datasheet, "Initialization Command Words"): ICW1 = 0x11 (edge
 * triggered, cascade, ICW4 follows), ICW2 = vector base (multiple of 8), ICW3 = 0x04 on the master
 * (slave on IR2) and 0x02 on the slave (its cascade identity), ICW4 = 0x01 (8086 mode). Then OCW1
 * writes the interrupt masks (bit set = masked).
 */
void pic_remap(u8 master_base, u8 slave_base, u8 master_mask, u8 slave_mask)
{
	outb(PIC1_CMD, 0x11);
	outb(PIC2_CMD, 0x11);
	outb(PIC1_DATA, master_base);
	outb(PIC2_DATA, slave_base);
	outb(PIC1_DATA, 0x04);
	outb(PIC2_DATA, 0x02);
	outb(PIC1_DATA, 0x01);
	outb(PIC2_DATA, 0x01);
	outb(PIC1_DATA, master_mask);
	outb(PIC2_DATA, slave_mask);
}

void pic_mask_all(void)
{
	outb(PIC1_DATA, 0xFF);
	outb(PIC2_DATA, 0xFF);
}

/* OCW1 read-modify-write: the mask bit of one ISA IRQ (bit set = masked). */
void pic_mask_irq(unsigned irq, bool masked)
{
	u16 port = irq < 8 ? 0x21 : 0xA1;
	u8 bit = (u8)(1u << (irq & 7));
	u8 m = inb(port);
	outb(port, masked ? (u8)(m | bit) : (u8)(m & ~bit));
}

/*
 * Let the 8259's INTR reach the CPU through the local APIC ("virtual wire" mode, Intel MP spec 1.4
 * §3.6.2.2): LINT0 in ExtINT delivery mode, unmasked; LINT1 as NMI; the APIC software-enabled with
 * spurious vector 0xFF (Intel SDM vol. 3A, "Local Vector Table" and "Spurious Interrupt"). Firmware
 * such as SeaBIOS does this, but a guest cannot count on it: QEMU's microvm firmware does not, and
 * the register reset value masks LINT0.
 */
void lapic_virtual_wire(void)
{
	mmio_write32(LAPIC_BASE + LAPIC_SVR, 0x100 | VEC_SPURIOUS);
	mmio_write32(LAPIC_BASE + LAPIC_LVT0, 0x700);
	mmio_write32(LAPIC_BASE + LAPIC_LVT1, 0x400);
}

/*
 * Channel 0 as a rate generator (8254 datasheet, "Mode 2"): control word 0x34 = counter 0,
 * LSB then MSB, mode 2, binary. OUT0 drives IRQ0 once every divisor input clocks.
 */
void pit_periodic(u32 hz)
{
	u32 div = (PIT_HZ + hz / 2) / hz;

	if (div > 0xFFFF)
		div = 0xFFFF;
	if (div < 2)
		div = 2;
	outb(PIT_CTRL, 0x34);
	outb(PIT_CH0, div & 0xFF);
	outb(PIT_CH0, div >> 8);
}

/* Mode 0 with no count loaded leaves OUT0 low: no more ticks (8254 datasheet, "Mode 0"). */
void pit_stop(void)
{
	outb(PIT_CTRL, 0x30);
}

/*
 * Channel 2 in mode 0 ("interrupt on terminal count"): OUT2 goes low when the control word is
 * written and high once the count has run down with GATE2 high; port 0x61 shows OUT2 in bit 5 and
 * sets GATE2 with bit 0 (the PC/AT "port B" wiring). This is how PC firmware and Linux time short
 * delays without interrupts. One count is at most 65535 ticks (55 ms); longer waits loop.
 */
u64 pit_delay_us(u32 us)
{
	u64 start = rdtsc();

	while (us) {
		u32 chunk = us > 50000 ? 50000 : us;
		u32 count = (u32)(((u64)chunk * PIT_HZ + 999999) / 1000000);
		if (count < 2)
			count = 2;
		outb(PORT_B, (u8)((inb(PORT_B) & ~0x02) | 0x01));
		outb(PIT_CTRL, 0xB0);
		/* OUT2 is low from the control word until the count runs out. High here means no
		 * 8254 behind port 0x61 (QEMU's microvm has none without KVM's in-kernel PIT). */
		if (inb(PORT_B) & 0x20)
			return 0;
		outb(PIT_CH2, count & 0xFF);
		outb(PIT_CH2, count >> 8);
		/* A stuck OUT2 (port 0x61 not backed by an 8254) must not hang us: give up once the
		 * TSC says 10x the wait has passed on a 1 GHz TSC, or the wait on a 10 GHz one. */
		u64 t0 = rdtsc(), limit = (u64)chunk * 10000 + 10000000;
		while (!(inb(PORT_B) & 0x20)) {
			if (rdtsc() - t0 > limit)
				return 0;
		}
		us -= chunk;
	}
	return rdtsc() - start;
}

/* Busy-wait at least us microseconds: on the PIT if it answers, else on the TSC assuming it runs
 * no faster than 4 GHz (so the wait errs long). Returns TSC cycles per millisecond as measured, or
 * the 4 GHz assumption. */
u64 delay_us(u32 us)
{
	u64 t = pit_delay_us(us);

	if (t && us >= 1000)
		return t * 1000 / us;
	if (!t) {
		u64 t0 = rdtsc();
		while (rdtsc() - t0 < (u64)us * 4000)
			cpu_relax();
	}
	return 4000000;
}
