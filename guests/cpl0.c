/*
 * cpl0: execute at CPL0 the instructions a PVM host's CPL0 emulator rejects and virtkit completes
 * (virtkit/cpl0.py, docs/LINUX.md), and check each result as the Intel SDM defines it. On a
 * VT-x/AMD-V host the same instructions run natively and must give the same results.
 *
 * Output: one "cpl0: features ..." line with the CPUID bits read at CPL0 (the vCPU's CPUID, which
 * decides between a result and #UD), then one line per check, "cpl0: ok NAME ..." or
 * "cpl0: FAIL NAME ...", and "cpl0: done failures=N". Exit value 0 when every check passed.
 */
#include "hcall.h"

/* What the exception hook saw (written at CPL0 by the hook, read at CPL3). */
static volatile u64 seen_vector, seen_rip, seen_cs, seen_rflags, seen_rsp, seen_ss, seen_count;
static volatile u64 ud_skip; /* on #UD: skip this many bytes (0: not expected) */

static bool hook(struct trap_frame *f)
{
	if (f->vector == 3 || f->vector == 0x10 || (f->vector == 6 && ud_skip)) {
		seen_vector = f->vector;
		seen_rip = f->rip;
		seen_cs = f->cs;
		seen_rflags = f->rflags;
		seen_rsp = f->rsp;
		seen_ss = f->ss;
		seen_count++;
		if (f->vector == 6) {
			f->rip += ud_skip;
			ud_skip = 0;
		}
		return true;
	}
	return false;
}

static int failures;
#define CHECK(name, cond, ...)                                                                   \
	do {                                                                                     \
		bool ok_ = (cond);                                                               \
		printf("cpl0: %s %s ", ok_ ? "ok" : "FAIL", name);                               \
		printf(__VA_ARGS__);                                                             \
		printf("\n");                                                                    \
		failures += !ok_;                                                                \
	} while (0)

/* ---- CPUID at CPL0: the vCPU's, not the host's (see guests/cpuid.c) ---- */
static u32 leaf1_ecx, leaf1_edx, leaf7_ebx, leaf80000008_ebx;
static long k_cpuid(long unused)
{
	u32 a, b, c, d, max_ext;
	(void)unused;
	cpuid_count(1, 0, &a, &b, &leaf1_ecx, &leaf1_edx);
	cpuid_count(7, 0, &a, &leaf7_ebx, &c, &d);
	cpuid_count(0x80000000, 0, &max_ext, &b, &c, &d);
	if (max_ext >= 0x80000008)
		cpuid_count(0x80000008, 0, &a, &leaf80000008_ebx, &c, &d);
	return 0;
}
#define HAS_XSAVE      (leaf1_ecx >> 26 & 1)
#define HAS_MOVBE      (leaf1_ecx >> 22 & 1)
#define HAS_CLFSH      (leaf1_edx >> 19 & 1)
#define HAS_INVPCID    (leaf7_ebx >> 10 & 1)
#define HAS_SMAP       (leaf7_ebx >> 20 & 1)
#define HAS_CLFLUSHOPT (leaf7_ebx >> 23 & 1)
#define HAS_CLWB       (leaf7_ebx >> 24 & 1)
#define HAS_RDPRU      (leaf80000008_ebx >> 4 & 1)

static inline u64 read_rflags(void)
{
	u64 f;
	__asm__ volatile("pushfq; pop %0" : "=r"(f));
	return f;
}

/* ---- int3 and int n: the frame the handler sees ---- */
extern char after_int3[], after_int10[];
static u64 int_rsp, int_rflags, int_ss;
static long k_int3(long unused)
{
	(void)unused;
	__asm__ volatile("mov %%ss, %%eax; mov %%rax, %2\n\t"
			 "pushfq; pop %1\n\t"
			 "mov %%rsp, %0\n\t"
			 "int3\n"
			 "after_int3:"
			 : "=m"(int_rsp), "=m"(int_rflags), "=m"(int_ss)
			 :
			 : "rax", "memory", "cc");
	return 0;
}
static long k_int10(long unused)
{
	(void)unused;
	__asm__ volatile("mov %%ss, %%eax; mov %%rax, %2\n\t"
			 "pushfq; pop %1\n\t"
			 "mov %%rsp, %0\n\t"
			 "int $0x10\n"
			 "after_int10:"
			 : "=m"(int_rsp), "=m"(int_rflags), "=m"(int_ss)
			 :
			 : "rax", "memory", "cc");
	return 0;
}

static void check_frame(const char *name, u64 vector, const char *next)
{
	CHECK(name,
	      seen_count == 1 && seen_vector == vector && seen_rip == (u64)(uintptr_t)next &&
		      seen_cs == SEL_KCODE64 && seen_rsp == int_rsp && seen_rflags == int_rflags &&
		      seen_ss == int_ss,
	      "vector=%lu rip=%#lx (next %#lx) cs=%#lx rsp=%#lx (was %#lx) rflags=%#lx (was %#lx) ss=%#lx (was %#lx)",
	      seen_vector, seen_rip, (u64)(uintptr_t)next, seen_cs, seen_rsp, int_rsp, seen_rflags, int_rflags,
	      seen_ss, int_ss);
}

/* ---- xgetbv ---- */
extern char xgetbv_ud[];
static long k_xgetbv_ud(long unused)
{
	(void)unused;
	u32 lo = 0, hi = 0;
	u64 cr4;
	__asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
	__asm__ volatile("mov %0, %%cr4" : : "r"(cr4 & ~(1ul << 18)));  /* CR4.OSXSAVE = 0 */
	ud_skip = 3;
	__asm__ volatile("xgetbv_ud: xgetbv" : "+a"(lo), "=d"(hi) : "c"(0) : "memory");
	return 0;
}
static long k_xgetbv(long unused)
{
	(void)unused;
	u32 lo, hi;
	u64 cr4;
	__asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
	__asm__ volatile("mov %0, %%cr4" : : "r"(cr4 | (1ul << 18)));   /* CR4.OSXSAVE = 1 */
	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	return (long)(((u64)hi << 32) | lo);
}

/* ---- stac / clac ---- */
static u64 flags_after_stac, flags_after_clac;
static long k_stac_clac(long unused)
{
	(void)unused;
	__asm__ volatile("stac" ::: "cc");
	flags_after_stac = read_rflags();
	__asm__ volatile("clac" ::: "cc");
	flags_after_clac = read_rflags();
	return 0;
}
extern char stac_ud[];
static long k_stac_ud(long unused)
{
	(void)unused;
	ud_skip = 3;
	__asm__ volatile("stac_ud: stac" ::: "memory", "cc");
	return 0;
}

/* ---- cache-line flushes ---- */
static volatile u64 line[8] __attribute__((aligned(64))) = { 0x1234567890abcdef };
static long k_clflush(long which)
{
	/* with (%rax): clflush is 0F AE 38 (3 bytes), clflushopt 66 0F AE 38 and clwb 66 0F AE 30 (4) */
	ud_skip = which == 0 ? 3 : 4;
	if (which == 0)
		__asm__ volatile("clflush (%0)" : : "a"(&line[0]) : "memory");
	else if (which == 1)
		__asm__ volatile("clflushopt (%0)" : : "a"(&line[0]) : "memory");
	else
		__asm__ volatile("clwb (%0)" : : "a"(&line[0]) : "memory");
	ud_skip = 0;
	return (long)line[0];
}

/* ---- movbe ---- */
static volatile u16 v16 = 0x1122;
static volatile u32 v32 = 0x11223344;
static volatile u64 v64 = 0x1122334455667788;
static volatile u64 out64;
static volatile u32 out32;
static u64 r16, r32, r64;
static u32 movbe_ud_mask;   /* bit i: form i raised #UD (the host's emulator, not virtkit) */
#define MOVBE_FORM(i, len, ...)                                                                  \
	do {                                                                                     \
		u64 before_ = seen_count;                                                        \
		ud_skip = (len);                                                                 \
		__VA_ARGS__;                                                                     \
		ud_skip = 0;                                                                     \
		if (seen_count != before_)                                                       \
			movbe_ud_mask |= 1u << (i);                                              \
	} while (0)
static long k_movbe(long unused)
{
	(void)unused;
	u64 r = ~0ull;
	/* RIP-relative forms: 66 0F 38 F0 05 disp32 (9), 0F 38 F0 05 disp32 (8), REX.W (9); stores
	 * 0F 38 F1: REX.W (9), REX.R for r9d (9); the mov before it is not counted: #UD points at
	 * the movbe */
	MOVBE_FORM(0, 9, __asm__ volatile("movbe v16(%%rip), %w0" : "+a"(r) : : "memory"));
	r16 = r;                                        /* bits 63:16 kept */
	r = ~0ull;
	MOVBE_FORM(1, 8, __asm__ volatile("movbe v32(%%rip), %k0" : "+a"(r) : : "memory"));
	r32 = r;                                        /* zero-extended */
	r = 0;
	MOVBE_FORM(2, 9, __asm__ volatile("movbe v64(%%rip), %0" : "+a"(r) : : "memory"));
	r64 = r;
	MOVBE_FORM(3, 9, __asm__ volatile("movbe %0, out64(%%rip)" : : "a"(0x0102030405060708ull) : "memory"));
	MOVBE_FORM(4, 9, __asm__ volatile("mov %0, %%r9d; movbe %%r9d, out32(%%rip)" : : "r"(0xAABBCCDDu) : "r9", "memory"));
	return 0;
}
extern char movbe_ud[];
static long k_movbe_ud(long unused)
{
	(void)unused;
	ud_skip = 4;                                    /* 0F 38 F0 08: movbe (%rax), %ecx */
	__asm__ volatile("movbe_ud: movbe (%%rax), %%ecx" : : "a"(&v32) : "rcx", "memory");
	return 0;
}

/* ---- rdpru and invpcid: only their #UD (a guest without the feature) is completed ---- */
static long k_rdpru_ud(long unused)
{
	(void)unused;
	ud_skip = 3;
	__asm__ volatile(".byte 0x0f, 0x01, 0xfd" : : "c"(0) : "rax", "rdx", "memory");   /* rdpru */
	return 0;
}
static long k_invpcid_ud(long unused)
{
	(void)unused;
	static u64 desc[2] __attribute__((aligned(16)));
	ud_skip = 5;                                    /* 66 0F 38 82 08: invpcid (%rax), %rcx */
	__asm__ volatile("invpcid (%%rax), %%rcx" : : "a"(desc), "c"(2ul) : "memory");
	return 0;
}

static void expect_ud(const char *name, kfunc fn)
{
	seen_count = 0;
	kcall(fn, 0);
	CHECK(name, seen_count == 1 && seen_vector == 6 && ud_skip == 0, "#UD raised (vector %lu, %lu times)",
	      seen_vector, seen_count);
}

int main(void)
{
	trap_hook = hook;
	kcall(k_cpuid, 0);
	printf("cpl0: features xsave=%u movbe=%u clflush=%u clflushopt=%u clwb=%u smap=%u invpcid=%u rdpru=%u\n",
	       HAS_XSAVE, HAS_MOVBE, HAS_CLFSH, HAS_CLFLUSHOPT, HAS_CLWB, HAS_SMAP, HAS_INVPCID, HAS_RDPRU);

	seen_count = 0;
	kcall(k_int3, 0);
	check_frame("int3", 3, after_int3);
	seen_count = 0;
	kcall(k_int10, 0);
	check_frame("int", 0x10, after_int10);

	seen_count = 0;
	kcall(k_xgetbv_ud, 0);
	CHECK("xgetbv(#UD)", seen_count == 1 && seen_vector == 6 && seen_rip == (u64)(uintptr_t)xgetbv_ud,
	      "with CR4.OSXSAVE=0: vector %lu at %#lx", seen_vector, seen_rip);
	if (HAS_XSAVE) {
		u64 xcr0 = (u64)kcall(k_xgetbv, 0);
		CHECK("xgetbv", (xcr0 & 1) == 1, "XCR0=%#lx (bit 0, x87, is always set)", xcr0);
	}

	if (HAS_SMAP) {
		kcall(k_stac_clac, 0);
		CHECK("stac", flags_after_stac & (1 << 18), "rflags=%#lx", flags_after_stac);
		CHECK("clac", !(flags_after_clac & (1 << 18)), "rflags=%#lx", flags_after_clac);
	} else {
		expect_ud("stac(#UD)", k_stac_ud);
	}

	const char *flush_names[3] = { "clflush", "clflushopt", "clwb" };
	u32 flush_has[3] = { HAS_CLFSH, HAS_CLFLUSHOPT, HAS_CLWB };
	for (int i = 0; i < 3; i++) {
		seen_count = 0;
		u64 v = (u64)kcall(k_clflush, i);
		bool ud = seen_count == 1 && seen_vector == 6;
		CHECK(flush_names[i], v == 0x1234567890abcdef && ud == !flush_has[i], "%s, line intact",
		      ud ? "#UD raised" : "completed");
	}

	if (HAS_MOVBE) {
		seen_count = 0;
		kcall(k_movbe, 0);
		if (movbe_ud_mask)
			printf("cpl0: note movbe: forms %#x raised #UD although CPUID has MOVBE (the host's "
			       "emulator did; virtkit never saw them)\n", movbe_ud_mask);
		bool good[5] = { r16 == 0xFFFFFFFFFFFF2211ull, r32 == 0x44332211, r64 == 0x8877665544332211ull,
				 out64 == 0x0807060504030201ull, out32 == 0xDDCCBBAA };
		bool all = true;
		for (int i = 0; i < 5; i++)
			all &= (movbe_ud_mask >> i & 1) || good[i];
		if (movbe_ud_mask == 0x1F)
			printf("cpl0: skip movbe (every form raised #UD on this host)\n");
		else
			CHECK("movbe", all, "r16=%#lx r32=%#lx r64=%#lx out64=%#lx out32=%#x (forms with #UD not checked)",
			      r16, r32, r64, out64, out32);
	} else {
		expect_ud("movbe(#UD)", k_movbe_ud);
	}

	if (!HAS_RDPRU)
		expect_ud("rdpru(#UD)", k_rdpru_ud);
	else
		printf("cpl0: skip rdpru (the guest has the feature; virtkit does not complete it)\n");
	if (!HAS_INVPCID)
		expect_ud("invpcid(#UD)", k_invpcid_ud);
	else
		printf("cpl0: skip invpcid (the guest has the feature; virtkit does not complete it)\n");

	printf("cpl0: done failures=%d\n", failures);
	return failures ? EXIT_FAIL : EXIT_OK;
}
