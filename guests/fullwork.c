/*
 * fullwork: the unmodified guest of the full- vs para-virtualization comparison. It knows only
 * standard PC hardware and does its work at CPL3. One machine-parseable line per workload:
 *
 *   work=console mode=full bytes=N tsc=T wsum=H
 *   work=disk mode=full bytes=N tsc=T wtsc=W rtsc=R wsum=H rsum=H ok|MISMATCH
 *   work=null mode=full n=N tsc=T
 *   work=cpu mode=full n=N tsc=T
 *   work=<w> mode=full error=<word>          (after a line "fullwork: <what went wrong>")
 *
 * tsc is TSC cycles (rdtsc at CPL3) for the whole workload, including generating and checksumming
 * the data. Command line: work=console,disk,null,cpu (one or more, run in that order) and
 *   bytes=N   console: bytes written to the COM1 16550 (default 1 MiB)
 *   mib=M     disk: MiB written to and read back from the ATA master (default 16)
 *   sectors=N disk: that many 512-byte sectors instead (small tests; overrides mib=)
 *   lba=S     disk: first sector (default 0)
 *   req=K     disk: sectors per ATA command, 1..256 (default 256)
 *   lba48=1   disk: use the 48-bit commands even below 128 GiB
 *   n=N       null: OUT byte writes to the POST port 0x80 (default 100000)
 *   loop=N    cpu: iterations of the ALU loop (default 200000000)
 * Exit value 0 when every workload ran and checked out, 1 otherwise.
 */
#include "ata.h"
#include "work.h"

#define UART_THR  (PORT_COM1 + 0)
#define UART_IIR  (PORT_COM1 + 2)
#define UART_LSR  (PORT_COM1 + 5)
#define LSR_THRE  0x20

static bool error_line(const char *work, const char *word)
{
	printf("work=%s mode=full error=%s\n", work, word);
	return false;
}

/* Wait for the transmit holding register (and FIFO) to be empty: LSR.THRE. Bounded, like the
 * runtime's uart_putc, so a UART that never reports THRE cannot hang the guest. */
static void wait_thre(void)
{
	for (unsigned i = 0; i < 100000 && !(inb(UART_LSR) & LSR_THRE); i++)
		cpu_relax();
}

/*
 * Write n bytes of the console pattern as Linux's 8250 driver does with a 16550A: wait for THRE,
 * then fill the 16-byte transmit FIFO, repeat (the FIFO size comes from IIR bits 7:6, which read
 * 11 once lib/uart.c has enabled the FIFOs; without FIFOs it is one byte per THRE). Then wait for
 * THRE once more, so the FIFO is empty again when printf, which keeps its own count, goes on.
 */
static bool work_console(u64 n)
{
	unsigned fifo = (inb(UART_IIR) & 0xC0) == 0xC0 ? 16 : 1;
	u64 h = FNV64_BASIS;
	u64 t0 = rdtsc();

	for (u64 i = 0; i < n;) {
		wait_thre();
		for (unsigned k = 0; k < fifo && i < n; k++, i++) {
			u8 c = (u8)console_line[i % CONSOLE_LINE_LEN];
			outb(UART_THR, c);
			h = (h ^ c) * FNV64_PRIME;
		}
	}
	wait_thre();
	u64 tsc = rdtsc() - t0;
	if (n % CONSOLE_LINE_LEN)
		printf("\n");   /* the result line starts a line of its own */
	printf("work=console mode=full bytes=%lu tsc=%lu wsum=%016lx\n", n, tsc, h);
	return true;
}

static bool work_disk(u64 mib)
{
	struct ata_disk d = { .force48 = cmdline_u64("lba48", 0) != 0 };
	u64 first = cmdline_u64("lba", 0);
	u64 req = cmdline_u64("req", ATA_MAX_SECTORS_PER_CMD);
	u64 total = cmdline_u64("sectors", mib * (MiB / SECTOR_SIZE));  /* sectors= overrides mib= */

	if (req < 1 || req > ATA_MAX_SECTORS_PER_CMD) {
		printf("fullwork: req=%lu: an ATA command moves 1..256 sectors\n", req);
		return error_line("disk", "bad-parameter");
	}
	if (ata_identify(&d) < 0) {
		printf("fullwork: ata: %s\n", ata_error);
		return error_line("disk", ata_error_word);
	}
	printf("fullwork: ata: model=\"%s\" sectors=%lu lba48=%u\n", d.model, d.sectors, d.lba48);
	if (first + total > d.sectors) {
		printf("fullwork: the disk has %lu sectors; %lu from sector %lu need %lu\n", d.sectors,
		       total, first, first + total);
		return error_line("disk", "disk-too-small");
	}

	u64 wsum = FNV64_BASIS, rsum = FNV64_BASIS;
	u64 t0 = rdtsc(), t1;
	for (u64 s = first; s < first + total; s += req) {
		u32 count = (u32)(first + total - s < req ? first + total - s : req);
		wsum = disk_pattern_fill(work_wbuf, s, count, wsum);
		if (ata_rw(&d, true, s, count, work_wbuf) < 0)
			goto io_error;
	}
	t1 = rdtsc();
	for (u64 s = first; s < first + total; s += req) {
		u32 count = (u32)(first + total - s < req ? first + total - s : req);
		if (ata_rw(&d, false, s, count, work_rbuf) < 0)
			goto io_error;
		rsum = fnv1a_words(rsum, work_rbuf, (size_t)count * SECTOR_SIZE);
	}
	u64 t2 = rdtsc();
	bool ok = wsum == rsum;
	printf("work=disk mode=full bytes=%lu tsc=%lu wtsc=%lu rtsc=%lu wsum=%016lx rsum=%016lx %s\n",
	       total * SECTOR_SIZE, t2 - t0, t1 - t0, t2 - t1, wsum, rsum, ok ? "ok" : "MISMATCH");
	return ok;

io_error:
	printf("fullwork: ata: %s (status %#x error %#x)\n", ata_error, ata_last_status, ata_last_error);
	return error_line("disk", ata_error_word);
}

static bool work_null(u64 n)
{
	u64 t0 = rdtsc();
	for (u64 i = 0; i < n; i++)
		outb(PORT_POST, (u8)i);
	u64 tsc = rdtsc() - t0;
	printf("work=null mode=full n=%lu tsc=%lu\n", n, tsc);
	return true;
}

static bool work_cpu(u64 loops)
{
	u64 t0 = rdtsc();
	volatile u64 sink = work_alu_loop(loops);
	u64 tsc = rdtsc() - t0;
	(void)sink;
	printf("work=cpu mode=full n=%lu tsc=%lu\n", loops, tsc);
	return true;
}

static bool want(const char *w)
{
	return cmdline_list_has("work", w, false);
}

int main(void)
{
	const char *v;
	size_t len;
	bool ok = true;

	if (!cmdline_find("work", &v, &len) ||
	    !(want("console") || want("disk") || want("null") || want("cpu"))) {
		printf("fullwork: nothing to do; usage: work=console|disk|null|cpu[,...] [bytes=N] [mib=M] "
		       "[n=N] [loop=N]\n");
		return EXIT_FAIL;
	}
	if (want("console"))
		ok &= work_console(cmdline_u64("bytes", MiB));
	if (want("disk"))
		ok &= work_disk(cmdline_u64("mib", 16));
	if (want("null"))
		ok &= work_null(cmdline_u64("n", 100000));
	if (want("cpu"))
		ok &= work_cpu(cmdline_u64("loop", 200000000));
	return ok ? EXIT_OK : EXIT_FAIL;
}
