/*
 * Polled ATA PIO driver for the master device of the primary channel, as an unmodified PC OS
 * drives it. References: ATA/ATAPI-6 (T13 1410D) §7 (registers), §8.15 IDENTIFY DEVICE,
 * §8.27/8.28 READ SECTOR(S) (EXT), §8.62/8.63 WRITE SECTOR(S) (EXT), §9.5 PIO data-in and
 * data-out protocols. Interrupts are disabled at the device (nIEN) and the status register is
 * polled. Every access is a port-I/O exit in a VM; a sector's 256 data words move with one string
 * instruction, which a VMM can serve in one exit.
 */
#include "ata.h"

/* Command block (0x1F0 + offset) and control block registers */
#define ATA_DATA        0x1F0   /* 16-bit data port */
#define ATA_ERROR       0x1F1   /* read: error */
#define ATA_COUNT       0x1F2
#define ATA_LBA0        0x1F3   /* LBA low */
#define ATA_LBA1        0x1F4   /* LBA mid */
#define ATA_LBA2        0x1F5   /* LBA high */
#define ATA_DEVICE      0x1F6
#define ATA_STATUS      0x1F7   /* read: status (clears a pending interrupt) */
#define ATA_COMMAND     0x1F7   /* write: command */
#define ATA_ALTSTATUS   0x3F6   /* read: status without side effects */
#define ATA_DEVCTL      0x3F6   /* write: device control */

#define ST_ERR  0x01
#define ST_DRQ  0x08
#define ST_DF   0x20
#define ST_DRDY 0x40
#define ST_BSY  0x80

#define DEV_LBA 0x40            /* device register: LBA addressing; bit 4 = 0 selects the master */
#define DEV_OBS 0xA0            /* bits 7 and 5, obsolete, set by tradition (ATA-1 "must be one") */
#define CTL_NIEN 0x02

#define CMD_READ        0x20
#define CMD_READ_EXT    0x24
#define CMD_WRITE       0x30
#define CMD_WRITE_EXT   0x34
#define CMD_IDENTIFY    0xEC

/* Give up on a device that stays busy: about 13 s at 2.6 GHz (polls are exits, tens of us each) */
#define ATA_TIMEOUT_TSC (1ull << 35)

const char *ata_error = "";
const char *ata_error_word = "";
u8 ata_last_status, ata_last_error;

static inline void outsw(u16 port, const void *buf, u64 words)
{
	__asm__ volatile("rep outsw" : "+S"(buf), "+c"(words) : "d"(port) : "memory");
}

static inline void insw(u16 port, void *buf, u64 words)
{
	__asm__ volatile("rep insw" : "+D"(buf), "+c"(words) : "d"(port) : "memory");
}

static int fail(const char *word, const char *msg, u8 status)
{
	ata_error_word = word;
	ata_error = msg;
	ata_last_status = status;
	ata_last_error = (status & (ST_ERR | ST_DF)) ? inb(ATA_ERROR) : 0;
	return -1;
}

/* Poll the status register until BSY is clear; returns the status, or -1 on timeout. */
static int wait_not_busy(void)
{
	u64 t0 = rdtsc();
	u8 st;

	while ((st = inb(ATA_STATUS)) & ST_BSY)
		if (rdtsc() - t0 > ATA_TIMEOUT_TSC)
			return fail("timeout", "device stayed busy", st);
	return st;
}

/* PIO protocols (§9.5): before each sector's data, BSY clear and DRQ set, or an error. */
static int wait_drq(void)
{
	int st = wait_not_busy();

	if (st < 0)
		return -1;
	if (st & (ST_ERR | ST_DF))
		return fail("io", "device reported an error", (u8)st);
	if (!(st & ST_DRQ))
		return fail("protocol", "device did not ask for data (DRQ clear)", (u8)st);
	return 0;
}

/* The ATA string format: two characters per word, the first in the high byte (§7.16.7). */
static void ata_string(char *out, const u16 *words, unsigned nwords)
{
	unsigned n = 0;

	for (unsigned i = 0; i < nwords; i++) {
		out[n++] = (char)(words[i] >> 8);
		out[n++] = (char)(words[i] & 0xFF);
	}
	while (n && (out[n - 1] == ' ' || out[n - 1] == 0))
		n--;
	out[n] = 0;
}

int ata_identify(struct ata_disk *d)
{
	static u16 id[256];
	u8 st = inb(ATA_STATUS);

	if (st == 0xFF)
		return fail("no-controller", "no controller at 0x1F0 (status reads 0xff: floating bus)", st);
	outb(ATA_DEVCTL, CTL_NIEN);                     /* polled: no interrupts from the device */
	outb(ATA_DEVICE, DEV_OBS);                      /* select the master */
	(void)inb(ATA_ALTSTATUS);                       /* the 400 ns after a device selection */
	if (wait_not_busy() < 0)
		return -1;
	outb(ATA_COUNT, 0);
	outb(ATA_LBA0, 0);
	outb(ATA_LBA1, 0);
	outb(ATA_LBA2, 0);
	outb(ATA_COMMAND, CMD_IDENTIFY);
	(void)inb(ATA_ALTSTATUS);
	st = inb(ATA_STATUS);
	if (st == 0)
		return fail("no-drive", "no master drive on the primary channel (status 0)", st);
	if (wait_not_busy() < 0)
		return -1;
	/* A packet (ATAPI) or SATA device aborts IDENTIFY DEVICE and leaves its signature in the LBA
	 * mid/high registers (§9.12). */
	u8 mid = inb(ATA_LBA1), high = inb(ATA_LBA2);
	if (mid || high)
		return fail("not-ata", "the master is not an ATA disk (ATAPI or SATA signature)", st);
	if (wait_drq() < 0)
		return -1;
	insw(ATA_DATA, id, 256);
	if (!(id[49] & (1u << 9)))
		return fail("no-lba", "the drive does not support LBA addressing", 0);
	d->lba48 = (id[83] & (1u << 10)) != 0;
	if (d->lba48)
		d->sectors = (u64)id[100] | (u64)id[101] << 16 | (u64)id[102] << 32 | (u64)id[103] << 48;
	else
		d->sectors = (u64)id[60] | (u64)id[61] << 16;
	ata_string(d->model, id + 27, 20);
	return 0;
}

int ata_rw(const struct ata_disk *d, bool write, u64 lba, u32 count, void *buf)
{
	bool ext = d->force48 || lba + count > (1u << 28);
	u8 *p = buf;
	u8 cmd;

	if (count == 0 || count > ATA_MAX_SECTORS_PER_CMD || lba + count > d->sectors)
		return fail("range", "sector range outside the disk or bad count", 0);
	if (ext && !d->lba48)
		return fail("range", "sector beyond LBA28 and the drive has no LBA48", 0);
	/* Writing the device register needs BSY and DRQ clear (§9.7, device selection protocol). */
	int st = wait_not_busy();
	if (st < 0)
		return -1;
	if (st & ST_DRQ)
		return fail("protocol", "device still has data pending (DRQ set)", (u8)st);
	if (ext) {
		/* 48-bit: each register is a two-byte FIFO; the high-order byte goes first (§7.1.5) */
		outb(ATA_DEVICE, DEV_LBA);
		outb(ATA_COUNT, (u8)(count >> 8));
		outb(ATA_LBA0, (u8)(lba >> 24));
		outb(ATA_LBA1, (u8)(lba >> 32));
		outb(ATA_LBA2, (u8)(lba >> 40));
		outb(ATA_COUNT, (u8)count);
		outb(ATA_LBA0, (u8)lba);
		outb(ATA_LBA1, (u8)(lba >> 8));
		outb(ATA_LBA2, (u8)(lba >> 16));
		cmd = write ? CMD_WRITE_EXT : CMD_READ_EXT;
	} else {
		outb(ATA_DEVICE, (u8)(DEV_OBS | DEV_LBA | ((lba >> 24) & 0x0F)));
		outb(ATA_COUNT, (u8)count);             /* 256 is written as 0 */
		outb(ATA_LBA0, (u8)lba);
		outb(ATA_LBA1, (u8)(lba >> 8));
		outb(ATA_LBA2, (u8)(lba >> 16));
		cmd = write ? CMD_WRITE : CMD_READ;
	}
	outb(ATA_COMMAND, cmd);
	(void)inb(ATA_ALTSTATUS);                       /* the 400 ns before status is valid */
	for (u32 i = 0; i < count; i++, p += 512) {
		if (wait_drq() < 0)
			return -1;
		if (write)
			outsw(ATA_DATA, p, 256);
		else
			insw(ATA_DATA, p, 256);
	}
	/* After the last sector: data-out ends when the device has taken it (BSY clear); data-in
	 * must end with DRQ clear. Either way an error shows here. */
	st = wait_not_busy();
	if (st < 0)
		return -1;
	if (st & (ST_ERR | ST_DF))
		return fail("io", "device reported an error after the transfer", (u8)st);
	if (st & ST_DRQ)
		return fail("protocol", "device wants more data than the command moved", (u8)st);
	return 0;
}
