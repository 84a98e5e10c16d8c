/*
 * Hypervisor detection and virtkit hypercalls (docs/HYPERCALLS.md). Runs at CPL3: CPUID works
 * there, and the doorbell OUT is allowed by the TSS I/O permission bitmap (lib/tables.S).
 */
#include "hcall.h"

struct hc_block {
	u32 nr;
	u32 abi;
	u64 args[5];
	int64_t ret;
	u64 value;
} __attribute__((aligned(64)));
_Static_assert(sizeof(struct hc_block) == 64, "the hypercall block is 64 bytes");

static struct hc_block block;
static u16 doorbell = HCALL_PORT_DEFAULT;

/* The three leaves hv_detect needs, read in one go (so one CPL0 visit does it). */
struct cpuid_raw {
	u32 l1[4], base[4], feat[4];
};

static long read_leaves(long arg)
{
	struct cpuid_raw *r = (struct cpuid_raw *)arg;

	cpuid_count(1, 0, &r->l1[0], &r->l1[1], &r->l1[2], &r->l1[3]);
	cpuid_count(0x40000000, 0, &r->base[0], &r->base[1], &r->base[2], &r->base[3]);
	cpuid_count(0x40000001, 0, &r->feat[0], &r->feat[1], &r->feat[2], &r->feat[3]);
	return 0;
}

static void decode(struct hv_info *hv, const struct cpuid_raw *r)
{
	memset(hv, 0, sizeof(*hv));
	hv->hypervisor_bit = (r->l1[2] >> 31) & 1;
	/* Without hypervisor leaves, Intel CPUs (and KVM) answer 0x40000000 with the highest basic
	 * leaf's data, whose EAX is small: a real hypervisor range has max_leaf >= 0x40000000. */
	hv->max_leaf = r->base[0];
	char s[13];
	memcpy(s, &r->base[1], 12);     /* EBX, ECX, EDX: contiguous in the struct */
	s[12] = 0;
	size_t n = 12;
	while (n && s[n - 1] == 0)
		n--;
	bool printable = n > 0;
	for (size_t i = 0; i < n; i++)
		if (s[i] < 0x20 || s[i] > 0x7E)
			printable = false;
	hv->has_leaves = hv->max_leaf >= 0x40000000 && hv->max_leaf < 0x40000100 && printable;
	if (!hv->has_leaves)
		return;
	memcpy(hv->signature, s, n);
	hv->signature[n] = 0;
	if (hv->max_leaf >= 0x40000001) {
		hv->features = r->feat[0];
		hv->abi = r->feat[1];
		hv->port = r->feat[2];
	}
}

void hv_detect(struct hv_info *hv)
{
	struct cpuid_raw r;

	kcall(read_leaves, (long)&r);
	decode(hv, &r);
}

void hv_detect_here(struct hv_info *hv)
{
	struct cpuid_raw r;

	read_leaves((long)&r);
	decode(hv, &r);
}

bool hv_is_virtkit(const struct hv_info *hv, const char **why)
{
	if (!hv->has_leaves || memcmp(hv->signature, HV_SIGNATURE_VIRTKIT, 13) != 0) {
		*why = "the hypervisor signature is not \"" HV_SIGNATURE_VIRTKIT "\"";
		return false;
	}
	if (!(hv->features & HV_FEATURE_HYPERCALL)) {
		*why = "virtkit does not offer hypercalls here (CPUID 0x40000001 EAX bit 0 clear)";
		return false;
	}
	if (hv->abi != HCALL_ABI) {
		*why = "virtkit speaks another hypercall ABI version";
		return false;
	}
	if (hv->port > 0xFFFF) {
		*why = "the hypercall port in CPUID 0x40000001 ECX is not a port";
		return false;
	}
	doorbell = hv->port ? (u16)hv->port : HCALL_PORT_DEFAULT;
	*why = "";
	return true;
}

long hcall(u32 nr, u64 a0, u64 a1, u64 a2, u64 *value)
{
	volatile struct hc_block *blk = &block;

	blk->nr = nr;
	blk->abi = HCALL_ABI;
	blk->args[0] = a0;
	blk->args[1] = a1;
	blk->args[2] = a2;
	blk->args[3] = 0;
	blk->args[4] = 0;
	blk->ret = HC_NO_ANSWER;
	blk->value = 0;
	/* The block lies below 4 GiB (the image is linked at 1 MiB) and virtual = physical. The
	 * "memory" clobber keeps the block's stores before the OUT and its loads after it. */
	__asm__ volatile("outl %0, %1" : : "a"((u32)(uintptr_t)&block), "Nd"(doorbell) : "memory");
	if (value)
		*value = blk->value;
	return (long)blk->ret;
}

const char *hcall_strerror(long ret)
{
	switch (ret) {
	case 0: return "ok";
	case -1: return "EINVAL";
	case -2: return "EFAULT";
	case -3: return "ENOSYS";
	case -4: return "EIO";
	case -5: return "EROFS";
	case -6: return "E2BIG";
	case -7: return "ENODEV";
	case HC_NO_ANSWER: return "no-answer";
	default: return "unknown-error";
	}
}
