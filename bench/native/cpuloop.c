/*
 * cpuloop: the workload guests' CPU-bound loop (guests/lib/work.c, work_alu_loop, the same as
 * guests/trapcost.c's cpu phase) run natively on the host, as the baseline the guests' work=cpu is
 * compared against. Usage: cpuloop [N] (default 200000000 iterations). Prints
 *
 *   work=cpu mode=native n=N ns=<elapsed nanoseconds, CLOCK_MONOTONIC>
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* Three ALU instructions and a branch per iteration; the asm keeps the compiler from folding it.
 * Keep it identical to the guests' loop. */
static uint64_t alu_loop(uint64_t n)
{
	uint64_t a = 0, b = 1;

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

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	uint64_t n = 200000000;

	if (argc > 2) {
		fprintf(stderr, "usage: %s [N]\n", argv[0]);
		return 2;
	}
	if (argc == 2) {
		char *end;
		n = strtoull(argv[1], &end, 0);
		if (*argv[1] == '\0' || *argv[1] == '-' || *end != '\0') {
			fprintf(stderr, "%s: %s: not a loop count\n", argv[0], argv[1]);
			return 2;
		}
	}
	uint64_t t0 = now_ns();
	volatile uint64_t sink = alu_loop(n);
	uint64_t ns = now_ns() - t0;
	(void)sink;
	printf("work=cpu mode=native n=%" PRIu64 " ns=%" PRIu64 "\n", n, ns);
	return 0;
}
