/*
 * virtio-blk driver (virtio 1.2 §5.2), one request in flight on requestq 0, polled.
 * A request is a descriptor chain (§5.2.6): the 16-byte header {le32 type, le32 reserved,
 * le64 sector} (device-readable), the data split into descriptors of at most seg_bytes
 * (device-readable for a write, device-writable for a read), and the status byte
 * (device-writable).
 */
#include "virtio.h"

#define VIRTIO_BLK_F_SIZE_MAX   (1ull << 1)
#define VIRTIO_BLK_F_SEG_MAX    (1ull << 2)
#define VIRTIO_BLK_F_RO         (1ull << 5)
#define VIRTIO_BLK_F_BLK_SIZE   (1ull << 6)

/* struct virtio_blk_config (§5.2.4) offsets */
#define CFG_CAPACITY            0
#define CFG_SIZE_MAX            8
#define CFG_SEG_MAX             12

#define VIRTIO_BLK_T_IN         0
#define VIRTIO_BLK_T_OUT        1
#define VIRTIO_BLK_S_OK         0
#define VIRTIO_BLK_S_IOERR      1
#define VIRTIO_BLK_S_UNSUPP     2

#define REQUESTQ                0

struct blk_req_header {
	u32 type;
	u32 reserved;
	u64 sector;
};

static struct virtq_mem requestq_mem;
static struct blk_req_header header;
static volatile u8 status_byte;

int vblk_init(struct vblk *b, const struct virtio_mmio_slot *slot, u32 seg_bytes)
{
	memset(b, 0, sizeof(*b));
	if (virtio_init(&b->dev, slot, VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX |
			VIRTIO_BLK_F_RO | VIRTIO_BLK_F_BLK_SIZE) < 0)
		return -1;
	if (virtq_setup(&b->dev, REQUESTQ, &requestq_mem, VIRTQ_MAX_SIZE) < 0)
		return -1;
	b->capacity = virtio_config64(&b->dev, CFG_CAPACITY);
	b->read_only = (b->dev.features & VIRTIO_BLK_F_RO) != 0;

	/* Data descriptors: whole sectors, within the device's size_max if it gave one (§5.2.4) */
	seg_bytes &= ~511u;
	if (seg_bytes == 0)
		seg_bytes = 512;
	if (b->dev.features & VIRTIO_BLK_F_SIZE_MAX) {
		u32 size_max = virtio_config32(&b->dev, CFG_SIZE_MAX) & ~511u;
		if (size_max && seg_bytes > size_max)
			seg_bytes = size_max;
	}
	b->seg_bytes = seg_bytes;
	/* A chain has the header, the data and the status: at most size - 2 data descriptors,
	 * and at most seg_max of them if the device says so. */
	b->max_segs = b->dev.vq[REQUESTQ].size - 2u;
	if (b->dev.features & VIRTIO_BLK_F_SEG_MAX) {
		u32 seg_max = virtio_config32(&b->dev, CFG_SEG_MAX);
		if (seg_max && seg_max < b->max_segs)
			b->max_segs = seg_max;
	}
	if (b->dev.vq[REQUESTQ].size < 3 || b->max_segs == 0) {
		virtio_fail(&b->dev);
		virtio_error_word = "queue";
		virtio_error = "the request queue is too small for a header, data and status";
		return -1;
	}
	virtio_driver_ok(&b->dev);
	return 0;
}

u64 vblk_max_request(const struct vblk *b)
{
	return (u64)b->max_segs * b->seg_bytes;
}

int vblk_rw(struct vblk *b, bool write, u64 sector, void *buf, u64 bytes)
{
	struct virtq *q = &b->dev.vq[REQUESTQ];
	u8 *p = buf;
	u16 i = 0;

	if (bytes == 0 || bytes % 512 || bytes > vblk_max_request(b) ||
	    sector + bytes / 512 > b->capacity) {
		virtio_error_word = "range";
		virtio_error = "request outside the disk, empty, or larger than one chain holds";
		return -1;
	}
	if (write && b->read_only) {
		virtio_error_word = "read-only";
		virtio_error = "the device is read-only (VIRTIO_BLK_F_RO)";
		return -1;
	}
	header.type = write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
	header.reserved = 0;
	header.sector = sector;
	status_byte = 0xFF;             /* anything but a status the device would write */

	virtq_set_desc(q, i, &header, sizeof(header), VIRTQ_DESC_F_NEXT, (u16)(i + 1));
	i++;
	for (u64 off = 0; off < bytes; off += b->seg_bytes, i++) {
		u32 len = (u32)(bytes - off < b->seg_bytes ? bytes - off : b->seg_bytes);
		virtq_set_desc(q, i, p + off, len,
			       (u16)(VIRTQ_DESC_F_NEXT | (write ? 0 : VIRTQ_DESC_F_WRITE)), (u16)(i + 1));
	}
	virtq_set_desc(q, i, (const void *)&status_byte, 1, VIRTQ_DESC_F_WRITE, 0);
	virtq_publish(q, 0);
	virtq_kick(q);

	struct virtq_used_elem e;
	if (virtq_wait_used(q, &e) < 0)
		return -1;
	b->requests++;
	if (e.id != 0) {
		virtio_error_word = "protocol";
		virtio_error = "the device returned a descriptor that was not the request's head";
		return -1;
	}
	if (status_byte != VIRTIO_BLK_S_OK) {
		virtio_error_word = status_byte == VIRTIO_BLK_S_UNSUPP ? "unsupported" : "io";
		virtio_error = status_byte == VIRTIO_BLK_S_IOERR ? "the device reported VIRTIO_BLK_S_IOERR" :
			       status_byte == VIRTIO_BLK_S_UNSUPP ? "the device reported VIRTIO_BLK_S_UNSUPP" :
			       "the device did not write a status byte";
		return -1;
	}
	return 0;
}
