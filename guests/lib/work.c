/*
 * Data patterns, checksums and the CPU loop shared by the workload guests (lib/work.h).
 * Everything here runs at CPL3.
 */
#include "work.h"

u8 work_wbuf[WORK_BUF_SIZE] __attribute__((aligned(4096)));
u8 work_rbuf[WORK_BUF_SIZE] __attribute__((aligned(4096)));

u64 fnv1a_bytes(u64 h, const void *p, size_t n)
{
	const u8 *b = p;

	for (size_t i = 0; i < n; i++)
		h = (h ^ b[i]) * FNV64_PRIME;
	return h;
}

u64 fnv1a_words(u64 h, const void *p, size_t n)
{
	const u64 *w = p;

	for (size_t i = 0; i < n / 8; i++)
		h = (h ^ w[i]) * FNV64_PRIME;
	return h;
}

#define LCG_A 6364136223846793005ull
#define LCG_C 1442695040888963407ull
#define SECTOR_KEY 0x9E3779B97F4A7C15ull

u64 disk_pattern_fill(void *buf, u64 first, u64 count, u64 h)
{
	u64 *w = buf;

	for (u64 s = first; s < first + count; s++) {
		u64 x = (s + 1) * SECTOR_KEY;
		for (unsigned i = 0; i < SECTOR_WORDS; i++) {
			x = x * LCG_A + LCG_C;
			u64 v = x ^ (x >> 31);  /* an LCG's low bits repeat with short periods */
			*w++ = v;
			h = (h ^ v) * FNV64_PRIME;
		}
	}
	return h;
}

const char console_line[CONSOLE_LINE_LEN + 1] =
	"virtkit console workload 0123456789 abcdefghijklmnopqrstuvwxyz.\n";
_Static_assert(sizeof(console_line) == CONSOLE_LINE_LEN + 1, "the console line is 64 bytes");

void console_pattern_fill(u8 *buf, size_t n)
{
	for (size_t i = 0; i < n; i++)
		buf[i] = (u8)console_line[i % CONSOLE_LINE_LEN];
}

/* Three ALU instructions and a branch per iteration; the asm keeps the compiler from folding it.
 * Identical to guests/trapcost.c's alu_loop and bench/native/cpuloop.c. */
u64 work_alu_loop(u64 n)
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

bool cmdline_is(const char *key, const char *word)
{
	const char *v;
	size_t n;

	return cmdline_find(key, &v, &n) && n == strlen(word) && memcmp(v, word, n) == 0;
}

bool cmdline_str(const char *key, char *out, size_t size)
{
	const char *v;
	size_t n;

	if (!size || !cmdline_find(key, &v, &n))
		return false;
	if (n > size - 1)
		n = size - 1;
	memcpy(out, v, n);
	out[n] = 0;
	return true;
}
