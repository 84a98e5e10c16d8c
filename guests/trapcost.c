/*
 * trapcost: what a trap costs. Each phase runs a fixed amount of work that exits to the VMM (or
 * not) at CPL3 and, where it makes sense, at CPL0, and prints one line per measurement:
 *
 *   trapcost phase=<name> cpl=<0|3> n=<count> tsc=<TSC cycles>
 *
 * then "trapcost done". The host turns TSC cycles into time (it knows the TSC rate from KVM).
 * Phases (command line phases=a,b,...; default all, in this order):
 *   pio    n OUT byte writes to the POST port 0x80 at CPL3, n/100 at CPL0
 *   mmio   n 32-bit writes to 0xC0000000, unassigned on QEMU and virtkit, at CPL3; n/100 at CPL0
 *   cpu    a loop of ALU instructions (loop= iterations) at CPL3, loop/1000 at CPL0: no exits,
 *          but CPL0 is instruction-emulated on PVM
 *   pages  first writes to pages= fresh 4 KiB pages at CPL3 (host page faults, shadow paging)
 *   kcall  n/100 round trips CPL3 -> CPL0 -> CPL3 through kcall() (INT3 + IRETQ)
 *   timer  ticks= PIT interrupts at 1000 Hz through the 8259, waited for with STI; HLT at CPL0
 * Parameters: n= (100000), loop= (100000000), pages= (4096), ticks= (100).
 */
#include "guest.h"

#define POST_PORT PORT_POST
#define MMIO_ADDR MMIO_UNASSIGNED

struct work {
	u64 n;
	u64 tsc;
};

static void report(const char *phase, unsigned cpl, u64 n, u64 tsc)
{
	printf("trapcost phase=%s cpl=%u n=%lu tsc=%lu\n", phase, cpl, n, tsc);
}

/* ---- the loops, usable at either CPL ---- */
static void pio_loop(u64 n)
{
	for (u64 i = 0; i < n; i++)
		outb(POST_PORT, (u8)i);
}

static void mmio_loop(u64 n)
{
	for (u64 i = 0; i < n; i++)
		mmio_write32(MMIO_ADDR, (u32)i);
}

/* Three ALU instructions and a branch per iteration; the asm keeps the compiler from folding it. */
static u64 alu_loop(u64 n)
{
	u64 a = 0, b = 1;

	if (!n)
		return 0;
	__asm__ volatile("1:\n\t"
			 "add %[b], %[a]\n\t"
			 "xor %[a], %[b]\n\t"
			 "dec %[n]\n\t"
			 "jnz 1b"
			 : [a] "+r"(a), [b] "+r"(b), [n] "+r"(n));
	return a ^ b;
}

/* ---- CPL0 halves, entered through kcall() ---- */
static long k_pio(long arg)
{
	struct work *w = (struct work *)arg;
	u64 t0 = rdtsc();
	pio_loop(w->n);
	w->tsc = rdtsc() - t0;
	return 0;
}

static long k_mmio(long arg)
{
	struct work *w = (struct work *)arg;
	u64 t0 = rdtsc();
	mmio_loop(w->n);
	w->tsc = rdtsc() - t0;
	return 0;
}

static long k_cpu(long arg)
{
	struct work *w = (struct work *)arg;
	u64 t0 = rdtsc();
	long r = (long)alu_loop(w->n);
	w->tsc = rdtsc() - t0;
	return r;
}

static long k_nothing(long arg)
{
	return arg;
}

/*
 * Wait for w->n timer ticks with interrupts on. STI delays interrupts until after the next
 * instruction (Intel SDM vol. 2B, STI), so a tick cannot slip in between the check and HLT.
 */
static long k_timer(long arg)
{
	struct work *w = (struct work *)arg;
	u64 t0;

	timer_ticks = 0;
	t0 = rdtsc();
	while (timer_ticks < w->n)
		__asm__ volatile("sti; hlt; cli" ::: "memory");
	w->tsc = rdtsc() - t0;
	return 0;
}

/* ---- phases ---- */
static u64 at_least_1(u64 n) { return n ? n : 1; }

static void phase_pio(u64 n)
{
	u64 t0 = rdtsc();
	pio_loop(n);
	report("pio", 3, n, rdtsc() - t0);
	struct work w = { at_least_1(n / 100), 0 };
	kcall(k_pio, (long)&w);
	report("pio", 0, w.n, w.tsc);
}

static bool phase_mmio(u64 n)
{
	/* The user-mode page tables must let CPL3 write there, or the loop would measure #PFs. */
	if (!pt_user_writable(MMIO_ADDR)) {
		printf("trapcost: %#x is not mapped user-writable in the guest page tables\n", MMIO_ADDR);
		return false;
	}
	u64 t0 = rdtsc();
	mmio_loop(n);
	report("mmio", 3, n, rdtsc() - t0);
	struct work w = { at_least_1(n / 100), 0 };
	kcall(k_mmio, (long)&w);
	report("mmio", 0, w.n, w.tsc);
	return true;
}

static void phase_cpu(u64 loops)
{
	u64 t0 = rdtsc();
	volatile u64 sink = alu_loop(loops);
	report("cpu", 3, loops, rdtsc() - t0);
	struct work w = { at_least_1(loops / 1000), 0 };
	sink = (u64)kcall(k_cpu, (long)&w);
	(void)sink;
	report("cpu", 0, w.n, w.tsc);
}

static bool phase_pages(u64 pages)
{
	/* Fresh RAM: past the image and the 2 MiB after it, where the loader may have put the
	 * Multiboot information (QEMU puts it right after the kernel). */
	u64 base = (((u64)(uintptr_t)__image_end + 0x1FFFFF) & ~0x1FFFFFull) + 0x200000;
	u64 top = mb_ram_top();

	if (top && base + pages * 4096 > top) {
		u64 fit = top > base ? (top - base) / 4096 : 0;
		printf("trapcost: only %lu pages of RAM above %#lx; touching %lu\n", fit, base, fit);
		pages = fit;
	}
	if (!mb_ram_available(base, pages * 4096) && top) {
		printf("trapcost: %#lx-%#lx is not available RAM in the memory map\n", base,
		       base + pages * 4096);
		return false;
	}
	u64 t0 = rdtsc();
	for (u64 i = 0; i < pages; i++)
		*(volatile u8 *)(uintptr_t)(base + i * 4096) = 1;
	report("pages", 3, pages, rdtsc() - t0);
	return true;
}

static void phase_kcall(u64 n)
{
	n = at_least_1(n);
	u64 t0 = rdtsc();
	for (u64 i = 0; i < n; i++)
		kcall(k_nothing, (long)i);
	report("kcall", 3, n, rdtsc() - t0);
}

/* Is PIT channel 0 counting? Latch it twice (8254 datasheet, "Counter Latch Command"). */
static bool pit_counting(void)
{
	u16 a, b;

	outb(0x43, 0x00);
	a = inb(0x40);
	a |= (u16)(inb(0x40) << 8);
	for (int i = 0; i < 1000; i++)
		cpu_relax();
	outb(0x43, 0x00);
	b = inb(0x40);
	b |= (u16)(inb(0x40) << 8);
	return a != b;
}

static void phase_timer(u64 ticks)
{
	lapic_virtual_wire();
	pic_remap(VEC_IRQ0, VEC_IRQ0 + 8, 0xFE, 0xFF);  /* only IRQ0 unmasked */
	pit_periodic(1000);
	if (!pit_counting()) {
		pic_mask_all();
		printf("trapcost: PIT channel 0 is not counting; timer phase skipped\n");
		return;
	}
	struct work w = { at_least_1(ticks), 0 };
	kcall(k_timer, (long)&w);
	pit_stop();
	pic_mask_all();
	report("timer", 0, w.n, w.tsc);
}

static bool want(const char *phase)
{
	return cmdline_list_has("phases", phase, true);
}

int main(void)
{
	u64 n = cmdline_u64("n", 100000);
	u64 loops = cmdline_u64("loop", 100000000);
	u64 pages = cmdline_u64("pages", 4096);
	u64 ticks = cmdline_u64("ticks", 100);

	printf("trapcost start n=%lu loop=%lu pages=%lu ticks=%lu\n", n, loops, pages, ticks);
	if (want("pio"))
		phase_pio(n);
	if (want("mmio") && !phase_mmio(n))
		return EXIT_FAIL;
	if (want("cpu"))
		phase_cpu(loops);
	if (want("pages") && !phase_pages(pages))
		return EXIT_FAIL;
	if (want("kcall"))
		phase_kcall(n / 100);
	if (want("timer"))
		phase_timer(ticks);
	printf("trapcost done\n");
	return EXIT_OK;
}
