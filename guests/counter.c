/*
 * counter: prints "count N" forever, N going up by one per line, so that a snapshot/restore, a
 * clone or a live migration can be checked from the outside: the first line after a resume must be
 * the one after the last line before it. Runs at CPL3 (native speed on PVM hosts).
 *
 * Command line ("key=value"):
 *   us=N      wait N microseconds between lines on PIT channel 2 (default 1000), so the PIT's
 *             state is part of what a restore must get right
 *   dirty=N   also stamp N pages of a memory buffer per line (a memory-dirtying workload for
 *             migration) and check the whole buffer every 64 lines; a page that does not hold
 *             what was last written to it ends the guest with "counter: lost write ..." and EXIT_FAIL
 *   buf=N     size of that buffer in MiB (default 16; clipped to the RAM there is)
 *   limit=N   exit with EXIT_OK after N lines (default 0: never)
 *
 * Every 64 lines it also reads its clone index from CMOS NVRAM bytes 0x50-0x51 (virtkit writes it
 * when it starts a clone from a snapshot, docs/FAILOVER.md) and prints "counter: clone N" when it
 * changes, so a clone shows from the inside that it knows which one it is.
 */
#include "guest.h"

#define PAGE 4096ull
#define MiB (1ull << 20)

static u64 *buf;
static u64 buf_pages;

/* Stamp page p with the line number n that wrote it (and its own index, to catch misplaced pages). */
static void stamp(u64 p, u64 n)
{
	volatile u64 *w = (volatile u64 *)((uintptr_t)buf + p * PAGE);
	w[0] = n;
	w[1] = p ^ 0x5a5a5a5a5a5a5a5aull;
}

/* Lines 1..n have stamped pages (line i: pages (i-1)*per .. i*per-1, modulo the buffer). What each
 * page must hold is therefore computable; compare. */
static void verify(u64 n, u64 per)
{
	u64 total = n * per;    /* stamps done so far; stamp k went to page k % buf_pages */
	for (u64 p = 0; p < buf_pages && p < total; p++) {
		u64 last = total - 1 - ((total - 1 - p) % buf_pages);  /* last stamp index k with k % pages == p */
		u64 want = last / per + 1;
		volatile u64 *w = (volatile u64 *)((uintptr_t)buf + p * PAGE);
		if (w[0] != want || w[1] != (p ^ 0x5a5a5a5a5a5a5a5aull)) {
			printf("counter: lost write: page %lu holds %lu, expected %lu (line %lu)\n", p, w[0], want, n);
			guest_exit(EXIT_FAIL);
		}
	}
}

/* MC146818 NVRAM through the index/data ports 0x70/0x71 (bit 7 of the index keeps NMIs enabled). */
static u8 cmos_read(u8 reg)
{
	outb(0x70, reg & 0x7f);
	return inb(0x71);
}

int main(void)
{
	u32 clone_seen = 0;
	u64 us = cmdline_u64("us", 1000);
	u64 per = cmdline_u64("dirty", 0);
	u64 limit = cmdline_u64("limit", 0);
	u64 want_mib = cmdline_u64("buf", 16);

	if (per) {
		u64 start = ((u64)(uintptr_t)__image_end + MiB - 1) & ~(MiB - 1);
		u64 top = mb_ram_top();
		if (top <= start + MiB) {
			printf("counter: no RAM for a dirty buffer (top %#lx)\n", top);
			return EXIT_FAIL;
		}
		u64 size = top - start;
		if (size > want_mib * MiB)
			size = want_mib * MiB;
		buf = (u64 *)(uintptr_t)start;
		buf_pages = size / PAGE;
		printf("counter: dirtying %lu pages per line in a %lu KiB buffer at %#lx\n", per,
		       buf_pages * 4, start);
	}
	for (u64 n = 1; limit == 0 || n <= limit; n++) {
		if (per) {
			for (u64 i = 0; i < per; i++)
				stamp(((n - 1) * per + i) % buf_pages, n);
			if (n % 64 == 0)
				verify(n, per);
		}
		if (n % 64 == 0) {
			u32 clone = cmos_read(0x50) | (u32)cmos_read(0x51) << 8;
			if (clone != clone_seen) {
				clone_seen = clone;
				printf("counter: clone %u\n", clone);
			}
		}
		printf("count %lu\n", n);
		if (us)
			pit_delay_us((u32)us);
	}
	return EXIT_OK;
}
