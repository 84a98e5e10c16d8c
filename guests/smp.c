/*
 * smp: start the second CPU the way PC firmware and operating systems do, then prove that both
 * vCPUs run at the same time. The BSP sends INIT and two STARTUP IPIs through its local APIC
 * (Intel MP spec 1.4, appendix B.4); the AP climbs from real mode to long mode (guests/smp_ap.S)
 * and drops to CPL3. Then both play ping-pong on one shared variable at CPL3: CPU 0 writes an odd
 * value and spins until CPU 1 answers with the next even one, rounds= times. Nothing in the loop
 * exits to the VMM, so it can only finish if both vCPUs are inside KVM_RUN at once.
 *
 * Output: "smp: cpu1 online", "smp: pingpong rounds=K ok", "smp: pingpong tsc=T", "smp: 2 cpus";
 * exit value 0. If the AP does not answer within wait_ms= (default 1000) milliseconds:
 * "smp: cpu1 did not start", exit value 3 (EXIT_NO_AP).
 */
#include "guest.h"

extern char ap_tramp_start[], ap_tramp_end[];

static volatile u64 ap_online;
static volatile u64 pingpong;
static u64 rounds;

static u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }
static void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }

/* ICR (Intel SDM vol. 3A, "Interrupt Command Register"): destination in ICR[63:56], written first;
 * writing the low half sends. Bit 12 is the delivery status (1 = send pending). */
#define ICR_INIT_ASSERT 0x0000C500u     /* INIT, level triggered, assert */
#define ICR_STARTUP     0x00004600u     /* STARTUP, vector in bits 7:0 */
#define ICR_PENDING     (1u << 12)

static void send_ipi(u32 apic_id, u32 icr)
{
	lapic_write(LAPIC_ICR_HI, apic_id << 24);
	lapic_write(LAPIC_ICR_LO, icr);
	for (int i = 0; i < 100000 && (lapic_read(LAPIC_ICR_LO) & ICR_PENDING); i++)
		cpu_relax();
}

/* CPU 1, at CPL3, once it is up. */
void ap_main(void);
void ap_main(void)
{
	ap_online = 1;
	for (u64 v = 2; v <= 2 * rounds; v += 2) {
		while (pingpong != v - 1)
			cpu_relax();
		pingpong = v;
	}
	kcall(k_halt_forever, 0);
}

int main(void)
{
	u64 wait_ms = cmdline_u64("wait_ms", 1000);
	size_t tramp_size = (size_t)(ap_tramp_end - ap_tramp_start);

	rounds = cmdline_u64("rounds", 1000000);
	if (!mb_ram_available(AP_TRAMPOLINE_ADDR, 4096)) {
		printf("smp: %#x is not free RAM in the memory map: nowhere to put the AP trampoline\n",
		       AP_TRAMPOLINE_ADDR);
		return EXIT_FAIL;
	}
	memcpy((void *)(uintptr_t)AP_TRAMPOLINE_ADDR, ap_tramp_start, tramp_size);

	lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x100 | VEC_SPURIOUS);   /* APIC on */
	u32 self = lapic_read(LAPIC_ID) >> 24;
	u32 ap = self == 1 ? 0 : 1;

	/* MP spec B.4: INIT, wait 10 ms, STARTUP, wait 200 us, STARTUP again, wait 200 us. The first
	 * wait, on PIT channel 2, also calibrates the TSC for the bounded wait below. */
	send_ipi(ap, ICR_INIT_ASSERT);
	u64 tsc_per_ms = delay_us(10000);
	send_ipi(ap, ICR_STARTUP | (AP_TRAMPOLINE_ADDR >> 12));
	delay_us(200);
	send_ipi(ap, ICR_STARTUP | (AP_TRAMPOLINE_ADDR >> 12));
	delay_us(200);

	u64 deadline = rdtsc() + wait_ms * tsc_per_ms;
	while (!ap_online && rdtsc() < deadline)
		cpu_relax();
	if (!ap_online) {
		printf("smp: cpu1 did not start\n");
		return EXIT_NO_AP;
	}
	printf("smp: cpu1 online\n");

	u64 t0 = rdtsc();
	for (u64 v = 1; v < 2 * rounds; v += 2) {
		pingpong = v;
		while (pingpong != v + 1)
			cpu_relax();
	}
	u64 t = rdtsc() - t0;
	printf("smp: pingpong rounds=%lu ok\n", rounds);
	printf("smp: pingpong tsc=%lu\n", t);
	printf("smp: %lu cpus\n", 1 + ap_online);
	return EXIT_OK;
}
