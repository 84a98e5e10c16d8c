/*
 * Finding the hypervisor through CPUID and calling virtkit's hypercalls (ABI version 1,
 * docs/HYPERCALLS.md): a 64-byte block in guest RAM, its guest-physical address written to the
 * doorbell port with a 32-bit OUT, usable from CPL3 (lib/hcall.c).
 */
#ifndef GUEST_HCALL_H
#define GUEST_HCALL_H

#include "guest.h"

#define HV_SIGNATURE_VIRTKIT "virtkitvirtk"
#define HV_FEATURE_HYPERCALL (1u << 0)
#define HV_FEATURE_VIRTIO    (1u << 1)
#define HCALL_ABI            1
#define HCALL_PORT_DEFAULT   0x0C40

enum hcall_nr {
	HC_QUERY = 0, HC_CONSOLE_WRITE = 1, HC_BLOCK_INFO = 2, HC_BLOCK_READ = 3, HC_BLOCK_WRITE = 4,
	HC_BLOCK_FLUSH = 5, HC_TIME_WALLCLOCK = 6, HC_TIME_MONOTONIC = 7, HC_YIELD = 8,
	HC_POWER_OFF = 9, HC_NULL = 10,
};
#define HC_MAX_CONSOLE_WRITE (1u << 20)
#define HC_MAX_BLOCK_SECTORS 2048u
/* ret values; HC_NO_ANSWER is the guest's own: nothing at the port filled the block in */
#define HC_NO_ANSWER         (-1000)

static inline void cpuid_count(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

/* What CPUID says about the hypervisor (Intel SDM vol. 2A, CPUID leaf 1 ECX bit 31; the
 * 0x40000000 range is the hypervisors' convention). */
struct hv_info {
	bool hypervisor_bit;    /* CPUID.1:ECX[31] */
	u32 max_leaf;           /* EAX of 0x40000000, as read */
	bool has_leaves;        /* max_leaf >= 0x40000000 and a printable signature */
	char signature[13];     /* EBX:ECX:EDX of 0x40000000, trailing NULs cut, "" if none */
	u32 features;           /* EAX of 0x40000001 (0 if the leaf is not there) */
	u32 abi;                /* EBX of 0x40000001 */
	u32 port;               /* ECX of 0x40000001 */
};
/* Executes CPUID at CPL0 (one kcall): on a PVM host, CPUID at CPL3 runs natively and answers
 * with the host processor's values, not the VMM's (docs/GUESTS.md, "Workload guests"). */
void hv_detect(struct hv_info *hv);
/* The same at the current privilege level, CPL3 for main(): what user code would see. */
void hv_detect_here(struct hv_info *hv);
/* Is it virtkit, offering hypercalls of our ABI? If not, *why says so. Sets the doorbell port. */
bool hv_is_virtkit(const struct hv_info *hv, const char **why);

/* One hypercall; returns ret (0 or a negative error) and stores value if value != NULL. */
long hcall(u32 nr, u64 a0, u64 a1, u64 a2, u64 *value);
const char *hcall_strerror(long ret);

#endif
