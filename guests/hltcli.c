/*
 * hltcli: CLI; HLT at CPL0. With interrupts off only NMI, SMI, INIT or reset can wake the CPU
 * (Intel SDM vol. 2A, HLT): the vCPU halts for good. A VMM should notice (e.g. KVM_EXIT_HLT
 * without an in-kernel irqchip) rather than spin.
 */
#include "guest.h"

int main(void)
{
	printf("hltcli: halting with interrupts disabled\n");
	kcall(k_halt_forever, 0);
	return EXIT_FAIL;
}
