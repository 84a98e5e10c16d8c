/*
 * virtio-console driver (virtio 1.2 §5.3), output only. Without VIRTIO_CONSOLE_F_MULTIPORT the
 * device has one port, whose transmitq is queue 1 (§5.3.2); receiveq 0 is not set up, as nothing
 * is read. Each transmit buffer is one device-readable descriptor (§5.3.6.1).
 */
#include "virtio.h"

#define TRANSMITQ 1

static struct virtq_mem transmitq_mem;

int vcon_init(struct vcon *c, const struct virtio_mmio_slot *slot, u32 seg_bytes)
{
	memset(c, 0, sizeof(*c));
	if (virtio_init(&c->dev, slot, 0) < 0)
		return -1;
	if (virtq_setup(&c->dev, TRANSMITQ, &transmitq_mem, VIRTQ_MAX_SIZE) < 0)
		return -1;
	c->seg_bytes = seg_bytes ? seg_bytes : 65536;
	virtio_driver_ok(&c->dev);
	return 0;
}

int vcon_write(struct vcon *c, const void *buf, u64 len)
{
	struct virtq *q = &c->dev.vq[TRANSMITQ];
	const u8 *p = buf;

	while (len) {
		/* Every buffer goes in its own descriptor 0..k-1; all of them are used before the next
		 * batch reuses the table. */
		u16 k = 0;
		while (len && k < q->size) {
			u32 n = (u32)(len < c->seg_bytes ? len : c->seg_bytes);
			virtq_set_desc(q, k, p, n, 0, 0);
			virtq_publish(q, k);
			k++;
			p += n;
			len -= n;
		}
		virtq_kick(q);
		for (u16 i = 0; i < k; i++) {
			struct virtq_used_elem e;
			if (virtq_wait_used(q, &e) < 0)
				return -1;
		}
		c->buffers += k;
	}
	return 0;
}
