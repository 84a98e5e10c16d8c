/*
 * cpuid: what the processor tells a guest about the hypervisor under it. Prints one line
 *
 *   cpuid hypervisor_bit=0|1 leaf40000000=<signature|none> max=<hex> features=<hex>
 *
 * hypervisor_bit is CPUID.1:ECX[31]; leaf40000000 the 12-byte signature in EBX:ECX:EDX of leaf
 * 0x40000000 (trailing NULs cut: QEMU/KVM's reads "KVMKVMKVM"), or "none" when there is no
 * hypervisor range (its EAX below 0x40000000 or no printable signature); max that leaf's EAX as
 * read; features the EAX of 0x40000001 (0 when absent). On virtkit, --mode full must show bit 0
 * and none, --mode para bit 1, "virtkitvirtk", max 0x40000001 and the feature bits of
 * docs/HYPERCALLS.md. Exit value 0.
 *
 * CPUID is executed at CPL0 (one kcall), as a kernel would: on a PVM host, CPUID at CPL3 does not
 * reach the VMM at all but runs natively and reports the host's processor (on our machines the
 * outer hypervisor's "KVMKVMKVM"). When the CPL3 view differs, a second line says so, worded
 * without the key=value fields above.
 */
#include "hcall.h"

int main(void)
{
	struct hv_info hv, user;

	hv_detect(&hv);
	hv_detect_here(&user);
	printf("cpuid hypervisor_bit=%u leaf40000000=%s max=%#x features=%#x\n", hv.hypervisor_bit,
	       hv.has_leaves ? hv.signature : "none", hv.max_leaf, hv.features);
	if (user.hypervisor_bit != hv.hypervisor_bit || user.has_leaves != hv.has_leaves ||
	    memcmp(user.signature, hv.signature, sizeof(hv.signature)) != 0)
		printf("cpuid: note: at CPL3 the same instruction reads bit %u and signature \"%s\": "
		       "user-mode CPUID bypasses the VMM on this host\n", user.hypervisor_bit,
		       user.has_leaves ? user.signature : "");
	return EXIT_OK;
}
