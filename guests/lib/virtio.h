/*
 * virtio over MMIO, version 2 (virtio 1.2 §4.2), with split virtqueues (§2.7) that the driver
 * polls, and drivers for virtio-blk (§5.2) and virtio-console (§5.3). lib/virtio.c is the
 * transport and the rings, lib/virtio_blk.c and lib/virtio_console.c the devices. Everything runs
 * at CPL3: the registers are MMIO (the page tables map all of 0-4 GiB with U=1) and the rings are
 * ordinary memory in the image (virtual address = guest-physical address).
 */
#ifndef GUEST_VIRTIO_H
#define GUEST_VIRTIO_H

#include "guest.h"

/* ---- device discovery ---- */
#define VIRTIO_MMIO_MAGIC       0x74726976u     /* "virt" */
#define VIRTIO_ID_BLOCK         2
#define VIRTIO_ID_CONSOLE       3
/* virtkit's fixed window (virtkit/boot/layout.py), probed when the command line names no device */
#define VIRTIO_PROBE_BASE       0xD0000000u
#define VIRTIO_PROBE_STRIDE     0x1000u
#define VIRTIO_PROBE_COUNT      32
#define VIRTIO_MAX_DEVICES      32

struct virtio_mmio_slot {
	u64 base, size;
	u32 irq;                /* from the command line; 0 if probed */
	u32 version, device_id, vendor_id;
};
/*
 * Fill slots with the transports found: from every virtio_mmio.device=<size>@<base>:<irq>[:<id>]
 * word of the command line (Linux's syntax, Documentation/admin-guide/kernel-parameters.txt), or,
 * if there is none, by probing VIRTIO_PROBE_COUNT windows from VIRTIO_PROBE_BASE for the magic.
 * Transports whose DeviceID is 0 (no device behind them) are left out. Returns how many were
 * found; *probed says which way.
 */
int virtio_discover(struct virtio_mmio_slot *slots, int max, bool *probed);
const char *virtio_device_name(u32 id);

/* ---- split virtqueues ---- */
#define VIRTQ_MAX_SIZE          256
#define VIRTQ_DESC_F_NEXT       1
#define VIRTQ_DESC_F_WRITE      2       /* device-writable */
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY  1

struct virtq_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};
struct virtq_avail {
	u16 flags;
	u16 idx;
	u16 ring[];             /* then u16 used_event (VIRTIO_F_EVENT_IDX only) */
};
struct virtq_used_elem {
	u32 id;
	u32 len;
};
struct virtq_used {
	u16 flags;
	u16 idx;
	struct virtq_used_elem ring[];  /* then u16 avail_event */
};

/* Memory for one queue of up to VIRTQ_MAX_SIZE entries: the descriptor table (16 bytes each, 16
 * aligned), the driver area (avail ring, 2 aligned) and the device area (used ring, 4 aligned),
 * one page each (§2.7, table "Virtqueue Part Alignment"). */
struct virtq_mem {
	struct virtq_desc desc[VIRTQ_MAX_SIZE];
	u8 avail[4096];
	u8 used[4096];
} __attribute__((aligned(4096)));

struct virtio_dev;
struct virtq {
	struct virtio_dev *dev;
	u16 index;              /* queue number */
	u16 size;               /* entries, a power of 2 */
	u16 avail_idx;          /* the driver's copy of avail->idx */
	u16 used_seen;          /* used entries consumed so far */
	volatile struct virtq_desc *desc;
	volatile struct virtq_avail *avail;
	volatile struct virtq_used *used;
	u64 kicks;              /* notifications sent */
	/* NULL: virtq_wait_used spins until the used index moves. Else it asks wait(q, moved) each
	 * time round whether the wait is over (e.g. parawork irq=1: moved and the interrupt taken);
	 * if not, wait waits a while (halts until an interrupt) and returns false. */
	bool (*wait)(struct virtq *q, bool moved);
};

#define VIRTIO_MAX_QUEUES       2
struct virtio_dev {
	struct virtio_mmio_slot slot;
	uintptr_t base;
	u64 features;           /* negotiated */
	struct virtq vq[VIRTIO_MAX_QUEUES];
};

/* Status bits (§2.1) */
#define VIRTIO_STATUS_ACKNOWLEDGE       1
#define VIRTIO_STATUS_DRIVER            2
#define VIRTIO_STATUS_DRIVER_OK         4
#define VIRTIO_STATUS_FEATURES_OK       8
#define VIRTIO_STATUS_NEEDS_RESET       64
#define VIRTIO_STATUS_FAILED            128
#define VIRTIO_F_VERSION_1              (1ull << 32)

/* Set when a call below fails: a message and a word for the result line. */
extern const char *virtio_error;
extern const char *virtio_error_word;

/* Device initialization (§3.1.1, §4.2.3.1) up to and including FEATURES_OK, accepting the device's
 * features among wanted (VIRTIO_F_VERSION_1 is always required). 0 or -1 (then status FAILED). */
int virtio_init(struct virtio_dev *d, const struct virtio_mmio_slot *slot, u64 wanted);
/* Queue setup (§4.2.3.2): at most max_size entries (rounded down to a power of 2). 0 or -1. */
int virtq_setup(struct virtio_dev *d, unsigned index, struct virtq_mem *mem, u16 max_size);
/* Set DRIVER_OK: the device is live. */
void virtio_driver_ok(struct virtio_dev *d);
void virtio_fail(struct virtio_dev *d);
/* Configuration space: one 32-bit (or 64-bit, generation-checked, §4.2.2.2) read at offset. */
u32 virtio_config32(struct virtio_dev *d, unsigned offset);
u64 virtio_config64(struct virtio_dev *d, unsigned offset);

static inline void virtq_set_desc(struct virtq *q, u16 i, const void *addr, u32 len, u16 flags,
				  u16 next)
{
	q->desc[i].addr = (u64)(uintptr_t)addr;
	q->desc[i].len = len;
	q->desc[i].flags = flags;
	q->desc[i].next = next;
}
/* Make the chain starting at descriptor head available (§2.7.13): ring entry, then index. */
void virtq_publish(struct virtq *q, u16 head);
/* Notify the device (§2.7.13.4) unless it asked not to be (VIRTQ_USED_F_NO_NOTIFY). */
void virtq_kick(struct virtq *q);
/* Notify unconditionally: the "null" operation of the virtio path. */
void virtq_notify(struct virtq *q);
/* Ask the device for used-buffer interrupts (on) or not (off, the default: clears or sets
 * VIRTQ_AVAIL_F_NO_INTERRUPT, §2.7.7). */
void virtq_interrupts(struct virtq *q, bool on);
/* Wait, polling the used ring (or through q->wait), for the next used element; 0 or -1 on timeout or a broken
 * device. */
int virtq_wait_used(struct virtq *q, struct virtq_used_elem *out);

/* ---- interrupts (lib/virtio.c; the routing is lib/ioapic.c's) ---- */
/* Make IDT vector vec the interrupt of device d: a CPL0 stub that reads InterruptStatus, writes
 * it back to InterruptACK (§4.2.2), counts, and sends the local APIC an EOI. One device at a
 * time. Route the device's pin to vec yourself (ioapic_route_edge). */
void virtio_irq_install(struct virtio_dev *d, unsigned vec);
extern volatile u64 virtio_irqs;        /* interrupts taken */
extern volatile u32 virtio_irq_status;  /* every InterruptStatus bit seen, ORed */

/* ---- virtio-blk (lib/virtio_blk.c) ---- */
struct vblk {
	struct virtio_dev dev;
	u64 capacity;           /* 512-byte sectors */
	bool read_only;
	u32 seg_bytes;          /* data bytes per descriptor */
	u32 max_segs;           /* data descriptors per request */
	u64 requests;
};
/* Initialize the device in slot with data descriptors of at most seg_bytes (rounded to sectors,
 * lowered to the device's size_max). 0 or -1. */
int vblk_init(struct vblk *b, const struct virtio_mmio_slot *slot, u32 seg_bytes);
/* Largest request vblk_rw takes, in bytes. */
u64 vblk_max_request(const struct vblk *b);
/* One request: bytes (a multiple of 512) between buf and the disk from sector. 0 or -1. */
int vblk_rw(struct vblk *b, bool write, u64 sector, void *buf, u64 bytes);

/* ---- virtio-console (lib/virtio_console.c), port 0 without MULTIPORT: transmitq = queue 1 ---- */
struct vcon {
	struct virtio_dev dev;
	u32 seg_bytes;          /* bytes per transmit buffer */
	u64 buffers;
};
int vcon_init(struct vcon *c, const struct virtio_mmio_slot *slot, u32 seg_bytes);
/* Transmit len bytes from buf: as many buffers of seg_bytes as the queue holds, one notification,
 * then wait for all of them; repeat. 0 or -1. */
int vcon_write(struct vcon *c, const void *buf, u64 len);

#endif
