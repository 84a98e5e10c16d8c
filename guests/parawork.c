/*
 * parawork: the paravirtualized guest of the full- vs para-virtualization comparison. Same
 * workloads, data and checksums as fullwork (lib/work.c), but it knows it runs in a VM: it finds
 * virtkit through CPUID and uses its hypercalls (docs/HYPERCALLS.md), or drives virtio-mmio devices
 * with its own drivers (lib/virtio*.c). All work runs at CPL3. One line per workload:
 *
 *   work=console mode=para via=virtio|hcall bytes=N tsc=T wsum=H
 *   work=disk mode=para via=virtio|hcall bytes=N tsc=T wsum=H rsum=H [irqs=N] ok|MISMATCH
 *   work=null mode=para via=hcall|virtio n=N tsc=T
 *   work=cpu mode=para n=N tsc=T
 *   work=<w> mode=para via=<v> error=<word>          (after a line "parawork: <what went wrong>")
 *
 * Command line: work=console,disk,null,cpu (one or more, run in that order);
 *   via=virtio|hcall  the path for console, disk and null (default: virtio for console and disk,
 *                     hcall for null). null via hcall is n NULL hypercalls; null via virtio is n
 *                     notifications (QueueNotify writes) with no new buffers, the doorbell alone.
 *   bytes=N   console bytes (default 1 MiB)         mib=M  disk MiB (default 16)
 *   sectors=N disk sectors instead of mib= (small tests)
 *   lba=S     first disk sector (default 0)         n=N    null operations (default 100000)
 *   req=K     disk sectors per request (default 2048 = 1 MiB, the most one hypercall moves)
 *   seg=B     virtio: bytes per data descriptor / console buffer (default 65536)
 *   loop=N    cpu loop iterations (default 200000000)
 *   irq=1     disk via virtio: take the device's used-buffer interrupts through the I/O APIC
 *             (its pin from virtio_mmio.device=, edge, vector 0x30, to this CPU's local APIC) and
 *             wait for each request with STI; HLT instead of spinning; the line gains irqs=N
 *   exit=hcall  end with the POWER_OFF hypercall (status = exit value) instead of port 0xF4
 *   virtio_mmio.device=<size>@<base>:<irq>  where the virtio-mmio devices are (several allowed);
 *             without one, 0xD0000000 + k * 0x1000 (k < 32) is probed.
 * Exit value 0 when every workload ran and checked out, 1 otherwise.
 */
#include "hcall.h"
#include "pc.h"
#include "virtio.h"
#include "work.h"

enum via { VIA_VIRTIO, VIA_HCALL };

static struct hv_info hv;
static bool hcall_ok;
static const char *hcall_why = "";

static struct virtio_mmio_slot slots[VIRTIO_MAX_DEVICES];
static int nslots = -1;
static struct vblk blk;
static struct vcon con;
static bool blk_ready, con_ready;

static const char *via_name(enum via v) { return v == VIA_HCALL ? "hcall" : "virtio"; }

static bool error_line(const char *work, enum via v, const char *word)
{
	printf("work=%s mode=para via=%s error=%s\n", work, via_name(v), word);
	return false;
}

static bool need_hcall(const char *work)
{
	if (hcall_ok)
		return true;
	printf("parawork: refusing hypercalls: %s (CPUID 0x40000000 reads \"%s\")\n", hcall_why,
	       hv.has_leaves ? hv.signature : "");
	return error_line(work, VIA_HCALL, "not-virtkit");
}

/* Find the transports once; print what is there. */
static const struct virtio_mmio_slot *find_device(u32 id)
{
	if (nslots < 0) {
		bool probed;
		nslots = virtio_discover(slots, VIRTIO_MAX_DEVICES, &probed);
		for (int i = 0; i < nslots; i++)
			printf("parawork: virtio-mmio %#lx irq %u: %s (device id %u) version %u\n",
			       slots[i].base, slots[i].irq, virtio_device_name(slots[i].device_id),
			       slots[i].device_id, slots[i].version);
		if (nslots == 0)
			printf("parawork: no virtio-mmio device %s\n", probed ?
			       "at 0xd0000000 + k * 0x1000 (and none named by virtio_mmio.device=)" :
			       "at the addresses virtio_mmio.device= names");
	}
	for (int i = 0; i < nslots; i++)
		if (slots[i].device_id == id)
			return &slots[i];
	return NULL;
}

static bool virtio_error_line(const char *work, const char *what)
{
	printf("parawork: %s: %s\n", what, virtio_error);
	return error_line(work, VIA_VIRTIO, virtio_error_word);
}

static bool get_blk(const char *work)
{
	const struct virtio_mmio_slot *s;

	if (blk_ready)
		return true;
	if (!(s = find_device(VIRTIO_ID_BLOCK))) {
		printf("parawork: no virtio-blk device\n");
		return error_line(work, VIA_VIRTIO, "no-device");
	}
	if (vblk_init(&blk, s, (u32)cmdline_u64("seg", 65536)) < 0)
		return virtio_error_line(work, "virtio-blk");
	printf("parawork: virtio-blk capacity=%lu sectors%s queue=%u seg=%u max_segs=%u\n", blk.capacity,
	       blk.read_only ? " (read-only)" : "", blk.dev.vq[0].size, blk.seg_bytes, blk.max_segs);
	return blk_ready = true;
}

static bool get_con(const char *work)
{
	const struct virtio_mmio_slot *s;

	if (con_ready)
		return true;
	if (!(s = find_device(VIRTIO_ID_CONSOLE))) {
		printf("parawork: no virtio-console device\n");
		return error_line(work, VIA_VIRTIO, "no-device");
	}
	if (vcon_init(&con, s, (u32)cmdline_u64("seg", 65536)) < 0)
		return virtio_error_line(work, "virtio-console");
	printf("parawork: virtio-console queue=%u seg=%u\n", con.dev.vq[1].size, con.seg_bytes);
	return con_ready = true;
}

/* ---- console ---- */
static bool hcall_console(const u8 *p, u64 len)
{
	while (len) {
		u64 written;
		long r = hcall(HC_CONSOLE_WRITE, (u64)(uintptr_t)p, len, 0, &written);
		if (r < 0 || written == 0 || written > len) {
			printf("parawork: CONSOLE_WRITE: %s (ret %ld, wrote %lu of %lu)\n", hcall_strerror(r), r,
			       written, len);
			return false;
		}
		p += written;
		len -= written;
	}
	return true;
}

static bool work_console(enum via via, u64 n)
{
	if (via == VIA_HCALL ? !need_hcall("console") : !get_con("console"))
		return false;

	/* The stream is console_line repeated; WORK_BUF_SIZE is a multiple of its 64 bytes, so the
	 * buffer can be sent again and again for streams longer than it. */
	u64 h = FNV64_BASIS;
	u64 piece_max = via == VIA_HCALL ? HC_MAX_CONSOLE_WRITE : WORK_BUF_SIZE;
	if (piece_max > WORK_BUF_SIZE)
		piece_max = WORK_BUF_SIZE;
	u64 t0 = rdtsc();
	console_pattern_fill(work_wbuf, n < piece_max ? n : piece_max);
	for (u64 done = 0; done < n;) {
		u64 len = n - done < piece_max ? n - done : piece_max;
		h = fnv1a_bytes(h, work_wbuf, len);
		if (via == VIA_HCALL ? !hcall_console(work_wbuf, len) : vcon_write(&con, work_wbuf, len) < 0) {
			if (via == VIA_VIRTIO)
				return virtio_error_line("console", "virtio-console");
			return error_line("console", via, "io");
		}
		done += len;
	}
	u64 tsc = rdtsc() - t0;
	if (n % CONSOLE_LINE_LEN)
		printf("\n");   /* where both consoles end up in one stream, start a new line */
	printf("work=console mode=para via=%s bytes=%lu tsc=%lu wsum=%016lx\n", via_name(via), n, tsc, h);
	return true;
}

/* ---- disk ---- */

/* irq=1: the blk device's interrupt at VEC_BLK_IRQ through the I/O APIC, and a local APIC timer at
 * VEC_WAKE (every 2^20 * 16 bus clocks, 16.8 ms at KVM's 1 GHz) so that a lost interrupt makes
 * the wait slower, not endless: virtq_wait_used keeps its timeout. */
#define VEC_BLK_IRQ     0x30
#define VEC_WAKE        0x31
#define WAKE_COUNT      (1u << 20)

/* Interrupts already matched to a request: a request's wait ends when the used index has moved
 * and one more interrupt has come, so a request that the device completed before the guest got
 * round to waiting (notify handled in the MMIO exit) still waits for its interrupt. */
static u64 irqs_claimed;

/* CPL0: halt once unless both have happened. The kcall gate cleared IF, so the check and
 * STI; HLT cannot miss the interrupt (STI holds it off until after HLT, Intel SDM vol. 2B); one
 * already pending in the local APIC is taken at once. */
static long k_halt_for_irq(long arg)
{
	const struct virtq *q = (const struct virtq *)arg;

	if (q->used->idx == q->used_seen || virtio_irqs == irqs_claimed)
		__asm__ volatile("sti; hlt; cli" ::: "memory");
	return 0;
}

static bool wait_for_irq(struct virtq *q, bool moved)
{
	if (moved && virtio_irqs != irqs_claimed) {
		irqs_claimed = virtio_irqs;
		return true;
	}
	kcall(k_halt_for_irq, (long)q);
	return false;
}

static bool blk_irq_on(void)
{
	unsigned pin = blk.dev.slot.irq;
	u32 ver = ioapic_version();
	unsigned max_pin = (ver >> 16) & 0xFF;

	if (pin == 0) {
		printf("parawork: irq=1: no IRQ for the virtio-blk device (found by probing, not named "
		       "by virtio_mmio.device=)\n");
		return error_line("disk", VIA_VIRTIO, "no-irq");
	}
	if (ver == 0xFFFFFFFF || ver == 0 || pin > max_pin) {
		printf("parawork: irq=1: I/O APIC at %#x has version register %#x: no pin %u\n",
		       IOAPIC_BASE, ver, pin);
		return error_line("disk", VIA_VIRTIO, "no-ioapic");
	}
	lapic_enable();
	u32 apic = lapic_id();
	if (pin < 16)
		pic_mask_irq(pin, true);        /* only the I/O APIC path may deliver it */
	virtio_irq_install(&blk.dev, VEC_BLK_IRQ);
	idt_set_handler(VEC_WAKE, isr_lapic_timer);
	ioapic_route_edge(pin, VEC_BLK_IRQ, (u8)apic);
	lapic_timer_periodic(VEC_WAKE, WAKE_COUNT);
	virtq_interrupts(&blk.dev.vq[0], true);
	irqs_claimed = virtio_irqs;
	blk.dev.vq[0].wait = wait_for_irq;
	printf("parawork: irq=1: virtio-blk pin %u -> I/O APIC (version %#x, pins 0-%u) -> vector %#x "
	       "at local APIC %u\n", pin, ver & 0xFF, max_pin, VEC_BLK_IRQ, apic);
	return true;
}

static void blk_irq_off(void)
{
	blk.dev.vq[0].wait = NULL;
	virtq_interrupts(&blk.dev.vq[0], false);
	lapic_timer_stop();
	ioapic_mask(blk.dev.slot.irq);
}

static bool disk_io(enum via via, bool write, u64 sector, u64 count, void *buf)
{
	if (via == VIA_VIRTIO) {
		if (vblk_rw(&blk, write, sector, buf, count * SECTOR_SIZE) < 0)
			return virtio_error_line("disk", write ? "virtio-blk write" : "virtio-blk read");
		return true;
	}
	u64 done;
	long r = hcall(write ? HC_BLOCK_WRITE : HC_BLOCK_READ, sector, (u64)(uintptr_t)buf, count, &done);
	if (r < 0 || done != count) {
		printf("parawork: %s: %s (ret %ld, %lu of %lu sectors from %lu)\n",
		       write ? "BLOCK_WRITE" : "BLOCK_READ", hcall_strerror(r), r, done, count, sector);
		return error_line("disk", via, r < 0 ? hcall_strerror(r) : "short");
	}
	return true;
}

static bool work_disk(enum via via, u64 mib)
{
	u64 first = cmdline_u64("lba", 0);
	u64 req = cmdline_u64("req", HC_MAX_BLOCK_SECTORS);
	u64 total = cmdline_u64("sectors", mib * (MiB / SECTOR_SIZE));  /* sectors= overrides mib= */
	u64 capacity;
	bool read_only;

	if (via == VIA_HCALL) {
		if (!need_hcall("disk"))
			return false;
		long r = hcall(HC_BLOCK_INFO, 0, 0, 0, &capacity);
		if (r < 0) {
			printf("parawork: BLOCK_INFO: %s (ret %ld)\n", hcall_strerror(r), r);
			return error_line("disk", via, r == -7 ? "no-disk" : hcall_strerror(r));
		}
		read_only = capacity >> 63;
		capacity &= ~(1ull << 63);
		if (req > HC_MAX_BLOCK_SECTORS)
			req = HC_MAX_BLOCK_SECTORS;
	} else {
		if (!get_blk("disk"))
			return false;
		capacity = blk.capacity;
		read_only = blk.read_only;
		if (req > vblk_max_request(&blk) / SECTOR_SIZE)
			req = vblk_max_request(&blk) / SECTOR_SIZE;
	}
	if (req > WORK_BUF_SIZE / SECTOR_SIZE)
		req = WORK_BUF_SIZE / SECTOR_SIZE;
	if (req == 0) {
		printf("parawork: req=0: a request moves at least one sector\n");
		return error_line("disk", via, "bad-parameter");
	}
	if (read_only) {
		printf("parawork: the disk is read-only\n");
		return error_line("disk", via, "read-only");
	}
	if (first + total > capacity) {
		printf("parawork: the disk has %lu sectors; %lu from sector %lu need %lu\n", capacity,
		       total, first, first + total);
		return error_line("disk", via, "disk-too-small");
	}

	bool irq = via == VIA_VIRTIO && cmdline_u64("irq", 0) != 0;
	u64 irqs0 = virtio_irqs, wakes0 = lapic_timer_ticks;
	if (irq && !blk_irq_on())
		return false;

	u64 wsum = FNV64_BASIS, rsum = FNV64_BASIS;
	u64 t0 = rdtsc(), t1;
	for (u64 s = first; s < first + total; s += req) {
		u64 count = first + total - s < req ? first + total - s : req;
		wsum = disk_pattern_fill(work_wbuf, s, count, wsum);
		if (!disk_io(via, true, s, count, work_wbuf)) {
			if (irq)
				blk_irq_off();
			return false;
		}
	}
	t1 = rdtsc();
	for (u64 s = first; s < first + total; s += req) {
		u64 count = first + total - s < req ? first + total - s : req;
		if (!disk_io(via, false, s, count, work_rbuf)) {
			if (irq)
				blk_irq_off();
			return false;
		}
		rsum = fnv1a_words(rsum, work_rbuf, count * SECTOR_SIZE);
	}
	u64 t2 = rdtsc();
	bool ok = wsum == rsum;
	if (!irq) {
		printf("work=disk mode=para via=%s bytes=%lu tsc=%lu wtsc=%lu rtsc=%lu wsum=%016lx "
		       "rsum=%016lx %s\n", via_name(via), total * SECTOR_SIZE, t2 - t0, t1 - t0, t2 - t1,
		       wsum, rsum, ok ? "ok" : "MISMATCH");
		return ok;
	}
	blk_irq_off();
	printf("parawork: irq=1: InterruptStatus bits seen %#x, %lu local APIC timer ticks\n",
	       virtio_irq_status, lapic_timer_ticks - wakes0);
	printf("work=disk mode=para via=%s bytes=%lu tsc=%lu wtsc=%lu rtsc=%lu wsum=%016lx "
	       "rsum=%016lx irqs=%lu %s\n", via_name(via), total * SECTOR_SIZE, t2 - t0, t1 - t0,
	       t2 - t1, wsum, rsum, virtio_irqs - irqs0, ok ? "ok" : "MISMATCH");
	return ok;
}

/* ---- null ---- */
static bool work_null(enum via via, u64 n)
{
	u64 t0, tsc;

	if (via == VIA_HCALL) {
		if (!need_hcall("null"))
			return false;
		long bad = 0;
		t0 = rdtsc();
		for (u64 i = 0; i < n; i++)
			bad |= hcall(HC_NULL, 0, 0, 0, NULL);
		tsc = rdtsc() - t0;
		if (bad) {
			printf("parawork: a NULL hypercall failed: %s\n", hcall_strerror(bad));
			return error_line("null", via, hcall_strerror(bad));
		}
	} else {
		/* The doorbell of whichever device is there, console first */
		struct virtq *q;
		if (find_device(VIRTIO_ID_CONSOLE)) {
			if (!get_con("null"))
				return false;
			q = &con.dev.vq[1];
		} else if (find_device(VIRTIO_ID_BLOCK)) {
			if (!get_blk("null"))
				return false;
			q = &blk.dev.vq[0];
		} else {
			return error_line("null", via, "no-device");
		}
		t0 = rdtsc();
		for (u64 i = 0; i < n; i++)
			virtq_notify(q);
		tsc = rdtsc() - t0;
	}
	printf("work=null mode=para via=%s n=%lu tsc=%lu\n", via_name(via), n, tsc);
	return true;
}

static bool work_cpu(u64 loops)
{
	u64 t0 = rdtsc();
	volatile u64 sink = work_alu_loop(loops);
	u64 tsc = rdtsc() - t0;
	(void)sink;
	printf("work=cpu mode=para n=%lu tsc=%lu\n", loops, tsc);
	return true;
}

static bool want(const char *w)
{
	return cmdline_list_has("work", w, false);
}

static int finish(int value)
{
	if (cmdline_is("exit", "hcall")) {
		if (hcall_ok) {
			long r = hcall(HC_POWER_OFF, (u64)value, 0, 0, NULL);
			printf("parawork: POWER_OFF returned (%s); exiting through port %#x\n",
			       hcall_strerror(r), PORT_DEBUG_EXIT);
		} else {
			printf("parawork: exit=hcall: no hypercalls here; exiting through port %#x\n",
			       PORT_DEBUG_EXIT);
		}
	}
	return value;
}

int main(void)
{
	const char *v;
	size_t len;
	bool ok = true;
	enum via via_dev = VIA_VIRTIO, via_null = VIA_HCALL;

	hv_detect(&hv);
	hcall_ok = hv_is_virtkit(&hv, &hcall_why);
	printf("parawork: cpuid hypervisor_bit=%u signature=\"%s\" features=%#x abi=%u port=%#x%s\n",
	       hv.hypervisor_bit, hv.has_leaves ? hv.signature : "", hv.features, hv.abi, hv.port,
	       hcall_ok ? " (virtkit hypercalls)" : "");

	if (cmdline_find("via", &v, &len)) {
		if (cmdline_is("via", "virtio")) {
			via_dev = via_null = VIA_VIRTIO;
		} else if (cmdline_is("via", "hcall")) {
			via_dev = via_null = VIA_HCALL;
		} else {
			printf("parawork: via=%.*s: expected virtio or hcall\n", (int)len, v);
			return finish(EXIT_FAIL);
		}
	}
	if (!cmdline_find("work", &v, &len) ||
	    !(want("console") || want("disk") || want("null") || want("cpu"))) {
		printf("parawork: nothing to do; usage: work=console|disk|null|cpu[,...] [via=virtio|hcall] "
		       "[bytes=N] [mib=M] [n=N] [loop=N] [virtio_mmio.device=<size>@<base>:<irq>]\n");
		return finish(EXIT_FAIL);
	}
	if (want("console"))
		ok &= work_console(via_dev, cmdline_u64("bytes", MiB));
	if (want("disk"))
		ok &= work_disk(via_dev, cmdline_u64("mib", 16));
	if (want("null"))
		ok &= work_null(via_null, cmdline_u64("n", 100000));
	if (want("cpu"))
		ok &= work_cpu(cmdline_u64("loop", 200000000));
	return finish(ok ? EXIT_OK : EXIT_FAIL);
}
