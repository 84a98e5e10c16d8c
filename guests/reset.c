/*
 * reset: ask the keyboard controller to pulse the CPU reset line, the PC/AT way to reboot:
 * command 0xFE to the i8042 at port 0x64 ("pulse output port bit 0", which is wired to RESET).
 * If the machine is still running 100 ms later (no i8042, e.g. QEMU microvm), say so and exit
 * with value 4 (EXIT_NO_RESET).
 */
#include "guest.h"

int main(void)
{
	printf("reset: writing 0xfe to the i8042 command port 0x64\n");
	outb(PORT_I8042_CMD, 0xFE);
	delay_us(100000);
	printf("reset: still running: no reset happened\n");
	return EXIT_NO_RESET;
}
