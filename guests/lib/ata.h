/*
 * ATA disk on the legacy primary channel in PIO mode, polled (lib/ata.c). Ports 0x1F0-0x1F7 and
 * 0x3F6, the master device, LBA28 or LBA48 addressing. Works at CPL3 (port I/O through the TSS
 * I/O permission bitmap).
 */
#ifndef GUEST_ATA_H
#define GUEST_ATA_H

#include "guest.h"

#define ATA_MAX_SECTORS_PER_CMD 256     /* sector count 0 means 256 in LBA28 commands */

struct ata_disk {
	u64 sectors;            /* capacity: IDENTIFY words 100-103 if LBA48, else words 60-61 */
	bool lba48;             /* IDENTIFY word 83 bit 10 */
	bool force48;           /* use the EXT commands even where LBA28 would do */
	char model[41];         /* IDENTIFY words 27-46, trailing spaces cut */
};

/* What went wrong in the last failed call: a short message for a human and one word for the
 * machine-parseable result line. */
extern const char *ata_error;
extern const char *ata_error_word;
extern u8 ata_last_status, ata_last_error;

/* Check a controller and a master drive are there and IDENTIFY it. 0 or -1 (see ata_error). */
int ata_identify(struct ata_disk *d);
/* Move count (1..256) sectors between buf and the disk from sector lba: WRITE SECTORS (EXT) with
 * one "rep outsw" per sector, or READ SECTORS (EXT) with one "rep insw" per sector. 0 or -1. */
int ata_rw(const struct ata_disk *d, bool write, u64 lba, u32 count, void *buf);

#endif
