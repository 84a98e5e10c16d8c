/*
 * acpipower: power off or reset the machine the way an ACPI OS does on a hardware-reduced
 * platform, from the tables alone: find the RSDP, XSDT, FADT and DSDT (lib/acpi.c), then
 *   action=off (default): write SLP_TYP << 2 | SLP_EN to the FADT's SLEEP_CONTROL_REG, SLP_TYP
 *                         being \_S5's first value, after clearing WAK_STS in SLEEP_STATUS_REG
 *                         (ACPI 6.5 §4.8.3.7, §7.4.2; Linux's acpi_hw_extended_sleep does this);
 *   action=reset:         write RESET_VALUE to RESET_REG (§4.8.3.6, flag RESET_REG_SUP).
 * It prints what it found, e.g.
 *   acpipower: rsdp=0xe0000 fadt=0x... flags=0x100400 sleep_control=io:0xc48 sleep_status=io:0xc49
 *   acpipower: reset_reg=io:0xc4a reset_value=0x1 s5_slp_typ=5
 * and exits with EXIT_FAIL if a table is missing or bad, or if the machine still runs 100 ms after
 * the write.
 */
#include "acpi.h"

#define SLP_EN  (1u << 5)
#define WAK_STS (1u << 7)

static bool io_register(const char *name, const struct acpi_gas *g)
{
	if (g->space_id != ACPI_GAS_SYSTEM_IO || g->address == 0 || g->address > 0xFFFF || g->bit_width != 8) {
		printf("acpipower: %s is not a byte-wide I/O register (space %u, width %u, address %#lx)\n", name,
		       g->space_id, g->bit_width, (unsigned long)g->address);
		return false;
	}
	return true;
}

int main(void)
{
	struct acpi_power p = acpi_find_power();
	const char *action = "off";
	size_t len = 3;

	if (!p.ok) {
		printf("acpipower: %s\n", p.why);
		return EXIT_FAIL;
	}
	printf("acpipower: rsdp=%#lx fadt=%#lx flags=%#x sleep_control=io:%#lx sleep_status=io:%#lx\n",
	       (unsigned long)p.rsdp, (unsigned long)p.fadt, p.fadt_flags, (unsigned long)p.sleep_control.address,
	       (unsigned long)p.sleep_status.address);
	printf("acpipower: reset_reg=io:%#lx reset_value=%#x s5_slp_typ=%d\n", (unsigned long)p.reset_reg.address,
	       p.reset_value, p.s5_slp_typ);
	if (!(p.fadt_flags & ACPI_FADT_HW_REDUCED)) {
		printf("acpipower: the FADT does not say HW_REDUCED_ACPI\n");
		return EXIT_FAIL;
	}
	cmdline_find("action", &action, &len);
	if (len == 5 && memcmp(action, "reset", 5) == 0) {
		if (!(p.fadt_flags & ACPI_FADT_RESET_REG_SUP)) {
			printf("acpipower: the FADT does not say RESET_REG_SUP\n");
			return EXIT_FAIL;
		}
		if (!io_register("RESET_REG", &p.reset_reg))
			return EXIT_FAIL;
		printf("acpipower: writing %#x to the reset register\n", p.reset_value);
		outb((u16)p.reset_reg.address, p.reset_value);
	} else if (len == 3 && memcmp(action, "off", 3) == 0) {
		if (p.s5_slp_typ < 0 || p.s5_slp_typ > 7) {
			printf("acpipower: no usable \\_S5 package in the DSDT\n");
			return EXIT_FAIL;
		}
		if (!io_register("SLEEP_CONTROL_REG", &p.sleep_control) ||
		    !io_register("SLEEP_STATUS_REG", &p.sleep_status))
			return EXIT_FAIL;
		outb((u16)p.sleep_status.address, WAK_STS);
		printf("acpipower: entering S5 (SLP_TYP %d)\n", p.s5_slp_typ);
		outb((u16)p.sleep_control.address, (u8)(p.s5_slp_typ << 2) | SLP_EN);
	} else {
		printf("acpipower: action= must be off or reset\n");
		return EXIT_FAIL;
	}
	delay_us(100000);
	printf("acpipower: still running\n");
	return EXIT_FAIL;
}
