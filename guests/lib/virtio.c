/*
 * The virtio-mmio transport, version 2 (virtio 1.2 §4.2), and split virtqueues (§2.7) for a
 * polling driver at CPL3. Register offsets are §4.2.2's table. Interrupts are not used: the driver
 * asks the device not to send them (VIRTQ_AVAIL_F_NO_INTERRUPT, a hint) and polls the used ring,
 * which is ordinary memory and costs no exit. The only exits are register accesses: a handful at
 * set-up and one notification per batch of requests. A driver that wants interrupts after all
 * turns them on with virtq_interrupts() and waits through virtq.wait (parawork irq=1).
 */
#include "virtio.h"
#include "pc.h"

#define REG_MAGIC               0x000
#define REG_VERSION             0x004
#define REG_DEVICE_ID           0x008
#define REG_VENDOR_ID           0x00C
#define REG_DEVICE_FEATURES     0x010
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES     0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL           0x030
#define REG_QUEUE_NUM_MAX       0x034
#define REG_QUEUE_NUM           0x038
#define REG_QUEUE_READY         0x044
#define REG_QUEUE_NOTIFY        0x050
#define REG_INTERRUPT_STATUS    0x060
#define REG_INTERRUPT_ACK       0x064
#define REG_STATUS              0x070
#define REG_QUEUE_DESC_LOW      0x080
#define REG_QUEUE_DESC_HIGH     0x084
#define REG_QUEUE_DRIVER_LOW    0x090
#define REG_QUEUE_DRIVER_HIGH   0x094
#define REG_QUEUE_DEVICE_LOW    0x0A0
#define REG_QUEUE_DEVICE_HIGH   0x0A4
#define REG_CONFIG_GENERATION   0x0FC
#define REG_CONFIG              0x100

/* Wait at most this long for a device: about 13 s at 2.6 GHz. While waiting, look at the status
 * register (an exit) only every 2^21 cycles, to notice DEVICE_NEEDS_RESET. */
#define VIRTIO_TIMEOUT_TSC      (1ull << 35)
#define VIRTIO_STATUS_CHECK_TSC (1ull << 21)

const char *virtio_error = "";
const char *virtio_error_word = "";

static int fail(const char *word, const char *msg)
{
	virtio_error_word = word;
	virtio_error = msg;
	return -1;
}

/* x86 keeps stores in order and loads in order (Intel SDM vol. 3A §8.2.2), so the barriers
 * §2.7.13 asks for between ring writes are compiler barriers; the one store-then-load ordering
 * (avail->idx, then used->flags) needs MFENCE. */
#define barrier() __asm__ volatile("" ::: "memory")
#define mb()      __asm__ volatile("mfence" ::: "memory")

static inline u32 rd(uintptr_t base, unsigned reg)
{
	barrier();
	u32 v = mmio_read32(base + reg);
	barrier();
	return v;
}

static inline void wr(uintptr_t base, unsigned reg, u32 v)
{
	barrier();
	mmio_write32(base + reg, v);
	barrier();
}

/* ---- discovery ---- */

/* A number as Linux's memparse() reads it: decimal or 0x hex, then an optional K/M/G suffix. */
static const char *parse_num(const char *p, const char *end, u64 *out, bool suffix)
{
	unsigned base = 10;
	u64 x = 0;
	const char *start;

	if (end - p > 2 && p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
		base = 16;
		p += 2;
	}
	start = p;
	for (; p < end; p++) {
		unsigned d;
		if (*p >= '0' && *p <= '9')
			d = (unsigned)(*p - '0');
		else if (base == 16 && *p >= 'a' && *p <= 'f')
			d = (unsigned)(*p - 'a' + 10);
		else if (base == 16 && *p >= 'A' && *p <= 'F')
			d = (unsigned)(*p - 'A' + 10);
		else
			break;
		x = x * base + d;
	}
	if (p == start)
		return NULL;
	if (suffix && p < end) {
		unsigned shift = 0;
		switch (*p) {
		case 'k': case 'K': shift = 10; break;
		case 'm': case 'M': shift = 20; break;
		case 'g': case 'G': shift = 30; break;
		}
		if (shift) {
			x <<= shift;
			p++;
		}
	}
	*out = x;
	return p;
}

/* "<size>@<base>:<irq>[:<id>]" */
static bool parse_device(const char *p, const char *end, struct virtio_mmio_slot *s)
{
	u64 irq;

	if (!(p = parse_num(p, end, &s->size, true)) || p == end || *p++ != '@')
		return false;
	if (!(p = parse_num(p, end, &s->base, false)) || p == end || *p++ != ':')
		return false;
	if (!(p = parse_num(p, end, &irq, false)))
		return false;
	s->irq = (u32)irq;
	return p == end || *p == ':';   /* a platform-device id may follow; it names nothing here */
}

/* Read the identification registers; false if there is no virtio-mmio device there. */
static bool identify(struct virtio_mmio_slot *s)
{
	uintptr_t b = (uintptr_t)s->base;

	if (rd(b, REG_MAGIC) != VIRTIO_MMIO_MAGIC)
		return false;
	s->version = rd(b, REG_VERSION);
	s->device_id = rd(b, REG_DEVICE_ID);
	s->vendor_id = rd(b, REG_VENDOR_ID);
	return s->device_id != 0;       /* §4.2.3.1.1: ID 0 is a placeholder with no device behind */
}

int virtio_discover(struct virtio_mmio_slot *slots, int max, bool *probed)
{
	static const char key[] = "virtio_mmio.device=";
	const size_t klen = sizeof(key) - 1;
	const char *p = cmdline();
	int n = 0, named = 0;

	while (*p) {
		while (*p == ' ')
			p++;
		const char *word = p;
		while (*p && *p != ' ')
			p++;
		if ((size_t)(p - word) <= klen || memcmp(word, key, klen) != 0)
			continue;
		named++;
		struct virtio_mmio_slot s = { 0 };
		if (!parse_device(word + klen, p, &s) || s.base >= (1ull << 32) || s.size < 0x100) {
			printf("virtio: ignoring %.*s: not <size>@<base>:<irq> with a window below 4 GiB\n",
			       (int)(p - word), word);
			continue;
		}
		if (n < max && identify(&s))
			slots[n++] = s;
	}
	*probed = named == 0;
	if (named)
		return n;
	for (unsigned k = 0; k < VIRTIO_PROBE_COUNT && n < max; k++) {
		struct virtio_mmio_slot s = { .base = VIRTIO_PROBE_BASE + k * VIRTIO_PROBE_STRIDE,
					      .size = VIRTIO_PROBE_STRIDE };
		if (identify(&s))
			slots[n++] = s;
	}
	return n;
}

const char *virtio_device_name(u32 id)
{
	switch (id) {
	case 1: return "net";
	case VIRTIO_ID_BLOCK: return "block";
	case VIRTIO_ID_CONSOLE: return "console";
	case 4: return "entropy";
	default: return "other";
	}
}

/* ---- initialization ---- */

void virtio_fail(struct virtio_dev *d)
{
	wr(d->base, REG_STATUS, rd(d->base, REG_STATUS) | VIRTIO_STATUS_FAILED);
}

static int init_fail(struct virtio_dev *d, const char *word, const char *msg)
{
	virtio_fail(d);
	return fail(word, msg);
}

int virtio_init(struct virtio_dev *d, const struct virtio_mmio_slot *slot, u64 wanted)
{
	memset(d, 0, sizeof(*d));
	d->slot = *slot;
	d->base = (uintptr_t)slot->base;
	if (rd(d->base, REG_MAGIC) != VIRTIO_MMIO_MAGIC)
		return fail("no-device", "no virtio-mmio magic value at the device's address");
	if (rd(d->base, REG_VERSION) != 2)
		return fail("legacy-device", "the transport is not virtio-mmio version 2 (legacy devices "
			    "are not driven; QEMU: -global virtio-mmio.force-legacy=false)");

	/* §3.1.1: reset, and wait until the reset is complete (§4.2.2.2: until Status reads 0) */
	wr(d->base, REG_STATUS, 0);
	u64 t0 = rdtsc();
	while (rd(d->base, REG_STATUS) != 0)
		if (rdtsc() - t0 > VIRTIO_TIMEOUT_TSC)
			return fail("timeout", "the device does not finish its reset");
	wr(d->base, REG_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
	wr(d->base, REG_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);

	wr(d->base, REG_DEVICE_FEATURES_SEL, 0);
	u64 offered = rd(d->base, REG_DEVICE_FEATURES);
	wr(d->base, REG_DEVICE_FEATURES_SEL, 1);
	offered |= (u64)rd(d->base, REG_DEVICE_FEATURES) << 32;
	if (!(offered & VIRTIO_F_VERSION_1))
		return init_fail(d, "legacy-device", "the device does not offer VIRTIO_F_VERSION_1");
	d->features = offered & (wanted | VIRTIO_F_VERSION_1);
	wr(d->base, REG_DRIVER_FEATURES_SEL, 0);
	wr(d->base, REG_DRIVER_FEATURES, (u32)d->features);
	wr(d->base, REG_DRIVER_FEATURES_SEL, 1);
	wr(d->base, REG_DRIVER_FEATURES, (u32)(d->features >> 32));
	wr(d->base, REG_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
	   VIRTIO_STATUS_FEATURES_OK);
	if (!(rd(d->base, REG_STATUS) & VIRTIO_STATUS_FEATURES_OK))
		return init_fail(d, "features", "the device did not accept our features");
	return 0;
}

int virtq_setup(struct virtio_dev *d, unsigned index, struct virtq_mem *mem, u16 max_size)
{
	struct virtq *q = &d->vq[index < VIRTIO_MAX_QUEUES ? index : 0];

	if (index >= VIRTIO_MAX_QUEUES)
		return init_fail(d, "queue", "queue index beyond what this driver keeps");
	wr(d->base, REG_QUEUE_SEL, index);
	if (rd(d->base, REG_QUEUE_READY) != 0)
		return init_fail(d, "queue", "the queue is already live after a reset");
	u32 nmax = rd(d->base, REG_QUEUE_NUM_MAX);
	if (nmax == 0)
		return init_fail(d, "queue", "the device has no such queue (QueueNumMax 0)");
	u32 want = nmax < max_size ? nmax : max_size;
	if (want > VIRTQ_MAX_SIZE)
		want = VIRTQ_MAX_SIZE;
	u16 size = 1;
	while ((u32)size * 2 <= want)
		size = (u16)(size * 2);

	memset(mem, 0, sizeof(*mem));
	q->dev = d;
	q->index = (u16)index;
	q->size = size;
	q->avail_idx = q->used_seen = 0;
	q->kicks = 0;
	q->desc = mem->desc;
	q->avail = (volatile struct virtq_avail *)mem->avail;
	q->used = (volatile struct virtq_used *)mem->used;
	q->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;   /* we poll */

	u64 desc = (u64)(uintptr_t)mem->desc, avail = (u64)(uintptr_t)mem->avail;
	u64 used = (u64)(uintptr_t)mem->used;
	wr(d->base, REG_QUEUE_NUM, size);
	wr(d->base, REG_QUEUE_DESC_LOW, (u32)desc);
	wr(d->base, REG_QUEUE_DESC_HIGH, (u32)(desc >> 32));
	wr(d->base, REG_QUEUE_DRIVER_LOW, (u32)avail);
	wr(d->base, REG_QUEUE_DRIVER_HIGH, (u32)(avail >> 32));
	wr(d->base, REG_QUEUE_DEVICE_LOW, (u32)used);
	wr(d->base, REG_QUEUE_DEVICE_HIGH, (u32)(used >> 32));
	wr(d->base, REG_QUEUE_READY, 1);
	return 0;
}

void virtio_driver_ok(struct virtio_dev *d)
{
	wr(d->base, REG_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
	   VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK);
}

u32 virtio_config32(struct virtio_dev *d, unsigned offset)
{
	return rd(d->base, REG_CONFIG + offset);
}

u64 virtio_config64(struct virtio_dev *d, unsigned offset)
{
	u32 gen, lo, hi;

	/* §4.2.2.2 / §2.5.1: a value wider than 32 bits is consistent only if the generation did not
	 * change while it was read */
	do {
		gen = rd(d->base, REG_CONFIG_GENERATION);
		lo = rd(d->base, REG_CONFIG + offset);
		hi = rd(d->base, REG_CONFIG + offset + 4);
	} while (rd(d->base, REG_CONFIG_GENERATION) != gen);
	return (u64)hi << 32 | lo;
}

/* ---- the rings ---- */

void virtq_publish(struct virtq *q, u16 head)
{
	q->avail->ring[q->avail_idx & (q->size - 1)] = head;
	barrier();      /* the ring entry before the index that exposes it (§2.7.13.3) */
	q->avail_idx++;
	q->avail->idx = q->avail_idx;
}

void virtq_notify(struct virtq *q)
{
	/* Without VIRTIO_F_NOTIFICATION_DATA the value written is the queue index (§4.2.2, §4.2.3.3). */
	wr(q->dev->base, REG_QUEUE_NOTIFY, q->index);
	q->kicks++;
}

void virtq_kick(struct virtq *q)
{
	mb();           /* avail->idx must be visible before used->flags is read (§2.7.13.4) */
	if (!(q->used->flags & VIRTQ_USED_F_NO_NOTIFY))
		virtq_notify(q);
}

void virtq_interrupts(struct virtq *q, bool on)
{
	q->avail->flags = on ? 0 : VIRTQ_AVAIL_F_NO_INTERRUPT;
	mb();           /* the flag before the next avail->idx the device may act on */
}

int virtq_wait_used(struct virtq *q, struct virtq_used_elem *out)
{
	u64 t0 = rdtsc(), checked = t0;

	for (;;) {
		bool moved = q->used->idx != q->used_seen;
		if (q->wait ? q->wait(q, moved) : moved)
			break;
		if (!q->wait)
			cpu_relax();
		u64 now = rdtsc();
		if (now - checked > VIRTIO_STATUS_CHECK_TSC) {
			checked = now;
			if (rd(q->dev->base, REG_STATUS) & VIRTIO_STATUS_NEEDS_RESET)
				return fail("device-broken", "the device set DEVICE_NEEDS_RESET");
		}
		if (now - t0 > VIRTIO_TIMEOUT_TSC)
			return fail("timeout", "the device did not use the buffers it was given");
	}
	barrier();      /* read the element only after seeing the index that covers it */
	volatile struct virtq_used_elem *e = &q->used->ring[q->used_seen & (q->size - 1)];
	out->id = e->id;
	out->len = e->len;
	q->used_seen++;
	return 0;
}

/* ---- interrupts ---- */

volatile u64 virtio_irqs;
volatile u32 virtio_irq_status;
extern char isr_virtio[];
u64 virtio_irq_reg;             /* the device's InterruptStatus; InterruptACK is 4 bytes on */

void virtio_irq_install(struct virtio_dev *d, unsigned vec)
{
	virtio_irq_reg = d->base + REG_INTERRUPT_STATUS;
	idt_set_handler(vec, isr_virtio);
}

/* CPL0, every instruction emulated on PVM, so short: InterruptStatus, acknowledge exactly those
 * bits, count, EOI to the local APIC (any write to its EOI register), return. */
_Static_assert(REG_INTERRUPT_ACK == REG_INTERRUPT_STATUS + 4, "isr_virtio's ACK offset");
__asm__(
	"	.text\n"
	"	.globl isr_virtio\n"
	"isr_virtio:\n"
	"	push	%rax\n"
	"	push	%rdx\n"
	"	mov	virtio_irq_reg(%rip), %rax\n"
	"	mov	(%rax), %edx\n"
	"	mov	%edx, 4(%rax)\n"
	"	or	%edx, virtio_irq_status(%rip)\n"
	"	incq	virtio_irqs(%rip)\n"
	"	mov	$0xFEE000B0, %eax\n"
	"	movl	$0, (%rax)\n"
	"	pop	%rdx\n"
	"	pop	%rax\n"
	"	iretq\n");
