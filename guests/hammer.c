/*
 * hammer: n= (default 100000) accesses to things no device claims, for the VMM's unknown-port and
 * unknown-MMIO paths: in turn a byte read and a byte write of a port in 0x200-0x2FF, and a 32-bit
 * read and write of MMIO_UNASSIGNED + 0x1000 (in the 32-bit MMIO hole, below virtio's window).
 * Runs at CPL3. Prints what the reads returned (open bus reads as all ones on PC hardware), then
 * exits with value 0.
 */
#include "guest.h"

#define HAMMER_MMIO (MMIO_UNASSIGNED + 0x1000)

int main(void)
{
	u64 n = cmdline_u64("n", 100000);
	u64 port_ones = 0, mmio_ones = 0, reads = 0;
	u8 last_port = 0;
	u32 last_mmio = 0;

	printf("hammer: %lu accesses to ports 0x200-0x2ff and MMIO %#x\n", n, HAMMER_MMIO);
	u64 t0 = rdtsc();
	for (u64 i = 0; i < n; i++) {
		u16 port = (u16)(0x200 + ((i >> 2) & 0xFF));
		switch (i & 3) {
		case 0:
			last_port = inb(port);
			port_ones += last_port == 0xFF;
			reads++;
			break;
		case 1:
			outb(port, (u8)i);
			break;
		case 2:
			last_mmio = mmio_read32(HAMMER_MMIO);
			mmio_ones += last_mmio == 0xFFFFFFFF;
			break;
		default:
			mmio_write32(HAMMER_MMIO, (u32)i);
		}
	}
	u64 t = rdtsc() - t0;
	printf("hammer: port reads: %lu of %lu were 0xff (last %#x); last MMIO read %#x (%lu all ones)\n",
	       port_ones, reads, last_port, last_mmio, mmio_ones);
	printf("hammer: done n=%lu tsc=%lu\n", n, t);
	return EXIT_OK;
}
