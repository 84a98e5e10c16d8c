/*
 * Finding the ACPI tables the way an OS without firmware services does (ACPI 6.5 §5.2.5.1: scan
 * the BIOS read-only area 0xE0000-0xFFFFF for the RSDP on 16-byte boundaries), checking every
 * checksum on the way, and reading what the power-off and reset paths need from the FADT
 * (§5.2.9) and the DSDT's \_S5 package (§7.4.2). Reads only; usable at CPL3 (identity-mapped).
 */
#ifndef ACPI_H
#define ACPI_H

#include "guest.h"

/* generic address structure (§5.2.3.2) */
struct acpi_gas {
	u8 space_id;            /* 0 system memory, 1 system I/O */
	u8 bit_width, bit_offset, access_size;
	u64 address;
} __attribute__((packed));

#define ACPI_GAS_SYSTEM_IO      1
#define ACPI_FADT_RESET_REG_SUP (1u << 10)
#define ACPI_FADT_HW_REDUCED    (1u << 20)

/* What acpi_find_power() found; ok == false with why saying what was wrong. */
struct acpi_power {
	bool ok;
	const char *why;
	u64 rsdp, xsdt, fadt, dsdt;     /* where the tables are */
	u32 fadt_flags;
	struct acpi_gas reset_reg, sleep_control, sleep_status;
	u8 reset_value;
	int s5_slp_typ;                 /* SLP_TYPa of \_S5, -1 if the DSDT has none */
};

struct acpi_power acpi_find_power(void);

#endif
