/*
 * netping: a tiny virtio-net driver (virtio 1.2 §5.1) that answers ARP requests (RFC 826) and ICMP
 * echo requests (RFC 792) for one IPv4 address, so that `ping` from the host proves the whole path:
 * TAP -> virtkit's virtio-net device -> this driver -> back. With peer=, it also pings another
 * guest (or host) itself. The driver runs at CPL3 (native speed on PVM hosts) and sleeps in HLT
 * between frames: the device's used-buffer interrupt comes through the I/O APIC (vector 0x30), and
 * a local APIC timer (every ~17 ms) bounds each sleep, so a lost interrupt only makes it slower.
 *
 * Command line:
 *   ip=A.B.C.D     this guest's address (required)
 *   peer=A.B.C.D   also send count= echo requests to this address (after resolving it by ARP),
 *                  one a second until each is answered; exit 0 when all were answered, 1 if not
 *   count=N        echo requests to the peer (default 3)
 *   secs=S         stop after S seconds (default: never without peer=, 60 with peer=), exit 1
 *   virtio_mmio.device=<size>@<base>:<irq>   where the devices are (virtkit's command line)
 *
 * One line per handled packet:
 *   netping: ready mac=02:76:6b:xx:xx:xx ip=A.B.C.D irq=N
 *   netping: arp who-has A.B.C.D tell E.F.G.H: replied
 *   netping: icmp echo request from E.F.G.H id=I seq=S bytes=B: replied
 *   netping: arp E.F.G.H is-at xx:xx:xx:xx:xx:xx
 *   netping: icmp echo reply from E.F.G.H seq=S
 *   netping: done replies=R/N
 * Frames that are not for us, or malformed, are counted and ignored (ignored=N on exit).
 */
#include "pc.h"
#include "virtio.h"

#define VIRTIO_ID_NET           1
#define VIRTIO_NET_F_MAC        (1ull << 5)
#define VIRTIO_NET_F_STATUS     (1ull << 16)
#define RECEIVEQ                0
#define TRANSMITQ               1

/* struct virtio_net_hdr with VIRTIO_F_VERSION_1 (§5.1.6): 12 bytes, all zero on transmit since
 * no offload is negotiated */
#define NET_HDR_LEN             12
#define ETH_HLEN                14
#define ETH_MAX_FRAME           1518
#define RX_BUF_LEN              2048    /* header + the largest frame, rounded up */
#define RX_BUFS                 32

#define ETH_P_IP                0x0800
#define ETH_P_ARP               0x0806
#define IPPROTO_ICMP            1
#define ICMP_ECHO_REPLY         0
#define ICMP_ECHO_REQUEST       8
#define PING_ID                 0x766b  /* "vk" */

#define VEC_NET_IRQ             0x30
#define VEC_WAKE                0x31
#define WAKE_COUNT              (1u << 20)

static struct virtio_mmio_slot slots[VIRTIO_MAX_DEVICES];
static struct virtio_dev dev;
static struct virtq_mem rxq_mem, txq_mem;
static u8 rx_bufs[RX_BUFS][RX_BUF_LEN] __attribute__((aligned(64)));
static u8 tx_buf[NET_HDR_LEN + ETH_MAX_FRAME] __attribute__((aligned(64)));

static u8 my_mac[6];
static u32 my_ip, peer_ip;              /* host byte order */
static u8 peer_mac[6];
static bool peer_known;
static u64 replies_seen[64];            /* bit per sequence number answered, seq < 64 * 64 */
static u64 replies, ignored, tsc_per_ms;

/* ---- byte order and checksums ---- */
static u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static u32 get32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static void put32(u8 *p, u32 v) { put16(p, (u16)(v >> 16)); put16(p + 2, (u16)v); }

/* The Internet checksum (RFC 1071): one's complement of the one's complement sum of 16-bit words. */
static u16 inet_checksum(const u8 *p, u32 len)
{
	u32 sum = 0;
	for (u32 i = 0; i + 1 < len; i += 2)
		sum += get16(p + i);
	if (len & 1)
		sum += (u32)p[len - 1] << 8;
	while (sum >> 16)
		sum = (sum & 0xFFFF) + (sum >> 16);
	return (u16)~sum;
}

static bool parse_ip(const char *key, u32 *out)
{
	const char *v;
	size_t n;
	u32 ip = 0, part = 0;
	int dots = 0, digits = 0;

	if (!cmdline_find(key, &v, &n))
		return false;
	for (size_t i = 0; i <= n; i++) {
		char c = i < n ? v[i] : '.';
		if (c >= '0' && c <= '9' && digits < 3) {
			part = part * 10 + (u32)(c - '0');
			digits++;
		} else if (c == '.' && digits && part <= 255 && dots < 4) {
			ip = ip << 8 | part;
			part = 0;
			digits = 0;
			dots++;
		} else {
			dots = 99;
			break;
		}
	}
	if (dots != 4) {
		printf("netping: %s=%.*s is not an IPv4 address\n", key, (int)n, v);
		return false;
	}
	*out = ip;
	return true;
}

static void print_ip(u32 ip)
{
	printf("%u.%u.%u.%u", ip >> 24, (ip >> 16) & 0xFF, (ip >> 8) & 0xFF, ip & 0xFF);
}

static void print_mac(const u8 *m)
{
	printf("%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5]);
}

/* ---- the device ---- */

/* Post receive buffer i (one device-writable descriptor, its head i) (§5.1.6.3). */
static void post_rx(u16 i)
{
	struct virtq *q = &dev.vq[RECEIVEQ];
	virtq_set_desc(q, i, rx_bufs[i], RX_BUF_LEN, VIRTQ_DESC_F_WRITE, 0);
	virtq_publish(q, i);
}

/* Transmit the len-byte frame in tx_buf + NET_HDR_LEN (§5.1.6.2): header and frame in one
 * device-readable descriptor; wait for the device to take it. */
static bool transmit(u32 len)
{
	struct virtq *q = &dev.vq[TRANSMITQ];
	struct virtq_used_elem e;

	memset(tx_buf, 0, NET_HDR_LEN);
	virtq_set_desc(q, 0, tx_buf, NET_HDR_LEN + len, 0, 0);
	virtq_publish(q, 0);
	virtq_kick(q);
	if (virtq_wait_used(q, &e) < 0) {
		printf("netping: transmit: %s\n", virtio_error);
		return false;
	}
	return true;
}

static u8 *eth_start(const u8 *dst, u16 type)
{
	u8 *f = tx_buf + NET_HDR_LEN;
	memcpy(f, dst, 6);
	memcpy(f + 6, my_mac, 6);
	put16(f + 12, type);
	return f + ETH_HLEN;
}

/* ARP for IPv4 over Ethernet (RFC 826): htype 1, ptype 0x0800, hlen 6, plen 4. */
static void send_arp(u16 op, const u8 *tha, u32 tpa, const u8 *eth_dst)
{
	u8 *a = eth_start(eth_dst, ETH_P_ARP);
	put16(a, 1);
	put16(a + 2, ETH_P_IP);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, op);
	memcpy(a + 8, my_mac, 6);
	put32(a + 14, my_ip);
	memcpy(a + 18, tha, 6);
	put32(a + 24, tpa);
	/* 28 bytes of ARP, padded to the 60-byte Ethernet minimum */
	memset(a + 28, 0, 60 - ETH_HLEN - 28);
	transmit(60);
}

static void send_echo_request(u16 seq)
{
	u8 *ip = eth_start(peer_mac, ETH_P_IP);
	u8 *icmp = ip + 20;
	u32 payload = 56;       /* as ping's default */

	ip[0] = 0x45;
	ip[1] = 0;
	put16(ip + 2, (u16)(20 + 8 + payload));
	put16(ip + 4, seq);
	put16(ip + 6, 0x4000);  /* don't fragment */
	ip[8] = 64;
	ip[9] = IPPROTO_ICMP;
	put16(ip + 10, 0);
	put32(ip + 12, my_ip);
	put32(ip + 16, peer_ip);
	put16(ip + 10, inet_checksum(ip, 20));
	icmp[0] = ICMP_ECHO_REQUEST;
	icmp[1] = 0;
	put16(icmp + 2, 0);
	put16(icmp + 4, PING_ID);
	put16(icmp + 6, seq);
	for (u32 i = 0; i < payload; i++)
		icmp[8 + i] = (u8)i;
	put16(icmp + 2, inet_checksum(icmp, 8 + payload));
	transmit(ETH_HLEN + 20 + 8 + payload);
}

static void handle_arp(const u8 *f, u32 len)
{
	const u8 *a = f + ETH_HLEN;
	if (len < ETH_HLEN + 28 || get16(a) != 1 || get16(a + 2) != ETH_P_IP || a[4] != 6 || a[5] != 4) {
		ignored++;
		return;
	}
	u16 op = get16(a + 6);
	u32 spa = get32(a + 14), tpa = get32(a + 24);
	u8 sha[6];
	memcpy(sha, a + 8, 6);
	if (peer_ip && spa == peer_ip && !peer_known && (op == 1 || op == 2)) {
		memcpy(peer_mac, sha, 6);
		peer_known = true;
		printf("netping: arp ");
		print_ip(spa);
		printf(" is-at ");
		print_mac(sha);
		printf("\n");
	}
	if (op == 1 && tpa == my_ip) {
		send_arp(2, sha, spa, sha);
		printf("netping: arp who-has ");
		print_ip(tpa);
		printf(" tell ");
		print_ip(spa);
		printf(": replied\n");
	} else if (op != 2) {
		ignored++;
	}
}

static void handle_ip(const u8 *f, u32 len)
{
	const u8 *ip = f + ETH_HLEN;
	if (len < ETH_HLEN + 20 || ip[0] >> 4 != 4) {
		ignored++;
		return;
	}
	u32 ihl = (u32)(ip[0] & 0xF) * 4, total = get16(ip + 2);
	if (ihl < 20 || total < ihl + 8 || ETH_HLEN + total > len || ETH_HLEN + total > ETH_MAX_FRAME ||
	    inet_checksum(ip, ihl) != 0 ||
	    ip[9] != IPPROTO_ICMP || get32(ip + 16) != my_ip) {
		ignored++;
		return;
	}
	const u8 *icmp = ip + ihl;
	u32 icmp_len = total - ihl, src = get32(ip + 12);
	if (inet_checksum(icmp, icmp_len) != 0) {
		ignored++;
		return;
	}
	u16 id = get16(icmp + 4), seq = get16(icmp + 6);
	if (icmp[0] == ICMP_ECHO_REQUEST && icmp[1] == 0) {
		/* the reply: same IP options and payload, addresses swapped, type 0 (RFC 792) */
		u8 *r = eth_start(f + 6, ETH_P_IP);
		memcpy(r, ip, total);
		put32(r + 12, my_ip);
		put32(r + 16, src);
		r[8] = 64;
		put16(r + 10, 0);
		put16(r + 10, inet_checksum(r, ihl));
		r[ihl] = ICMP_ECHO_REPLY;
		put16(r + ihl + 2, 0);
		put16(r + ihl + 2, inet_checksum(r + ihl, icmp_len));
		u32 flen = ETH_HLEN + total;
		if (flen < 60) {
			memset(r + total, 0, 60 - flen);
			flen = 60;
		}
		transmit(flen);
		printf("netping: icmp echo request from ");
		print_ip(src);
		printf(" id=%u seq=%u bytes=%u: replied\n", id, seq, icmp_len);
	} else if (icmp[0] == ICMP_ECHO_REPLY && src == peer_ip && id == PING_ID && seq < 64 * 64) {
		if (!(replies_seen[seq / 64] & (1ull << (seq % 64)))) {
			replies_seen[seq / 64] |= 1ull << (seq % 64);
			replies++;
		}
		printf("netping: icmp echo reply from ");
		print_ip(src);
		printf(" seq=%u\n", seq);
	} else {
		ignored++;
	}
}

static void handle_frame(const u8 *buf, u32 used_len)
{
	/* the used length is the header plus the frame (§5.1.6.4); the device is trusted no more
	 * than it must be: a length outside the buffer is ignored */
	if (used_len < NET_HDR_LEN + ETH_HLEN || used_len > RX_BUF_LEN) {
		ignored++;
		return;
	}
	const u8 *f = buf + NET_HDR_LEN;
	u32 len = used_len - NET_HDR_LEN;
	bool for_us = memcmp(f, my_mac, 6) == 0 || (f[0] & 1);  /* ours, broadcast or multicast */
	u16 type = get16(f + 12);
	if (!for_us)
		ignored++;
	else if (type == ETH_P_ARP)
		handle_arp(f, len);
	else if (type == ETH_P_IP)
		handle_ip(f, len);
	else
		ignored++;
}

/* Handle every frame the device has put in the receive ring; repost their buffers. */
static unsigned poll_rx(void)
{
	struct virtq *q = &dev.vq[RECEIVEQ];
	unsigned n = 0;

	while (q->used->idx != q->used_seen) {
		__asm__ volatile("" ::: "memory");  /* the element after the index that covers it */
		volatile struct virtq_used_elem *e = &q->used->ring[q->used_seen & (q->size - 1)];
		u32 id = e->id, len = e->len;
		q->used_seen++;
		if (id >= RX_BUFS) {
			ignored++;
			continue;       /* not a buffer of ours: nothing to repost */
		}
		handle_frame(rx_bufs[id], len);
		post_rx((u16)id);
		n++;
	}
	if (n)
		virtq_kick(q);
	return n;
}

/* CPL0: halt until an interrupt (the device's or the wake-up timer's) unless a frame is already
 * there. The kcall gate cleared IF, so the check and STI; HLT cannot miss the interrupt. */
static long k_wait_rx(long unused)
{
	(void)unused;
	const struct virtq *q = &dev.vq[RECEIVEQ];
	if (q->used->idx == q->used_seen)
		__asm__ volatile("sti; hlt; cli" ::: "memory");
	return 0;
}

static bool setup(void)
{
	bool probed;
	int n = virtio_discover(slots, VIRTIO_MAX_DEVICES, &probed);
	const struct virtio_mmio_slot *s = NULL;

	for (int i = 0; i < n; i++)
		if (slots[i].device_id == VIRTIO_ID_NET)
			s = &slots[i];
	if (!s) {
		printf("netping: no virtio-net device (run with --net tap)\n");
		return false;
	}
	if (virtio_init(&dev, s, VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS) < 0 ||
	    virtq_setup(&dev, RECEIVEQ, &rxq_mem, RX_BUFS) < 0 ||
	    virtq_setup(&dev, TRANSMITQ, &txq_mem, 1) < 0) {
		printf("netping: virtio-net: %s\n", virtio_error);
		return false;
	}
	if (!(dev.features & VIRTIO_NET_F_MAC)) {
		printf("netping: the device offers no MAC address\n");
		virtio_fail(&dev);
		return false;
	}
	u32 lo = virtio_config32(&dev, 0), hi = virtio_config32(&dev, 4);
	for (int i = 0; i < 4; i++)
		my_mac[i] = (u8)(lo >> (8 * i));
	my_mac[4] = (u8)hi;
	my_mac[5] = (u8)(hi >> 8);
	if ((dev.features & VIRTIO_NET_F_STATUS) && !((hi >> 16) & 1))
		printf("netping: the link is down\n");

	/* interrupts for received frames, through the I/O APIC (see parawork irq=1) */
	unsigned pin = dev.slot.irq;
	u32 ver = ioapic_version();
	if (pin == 0 || ver == 0 || ver == 0xFFFFFFFF || pin > ((ver >> 16) & 0xFF)) {
		printf("netping: no usable interrupt pin (%u) for the device\n", pin);
		virtio_fail(&dev);
		return false;
	}
	lapic_enable();
	if (pin < 16)
		pic_mask_irq(pin, true);
	virtio_irq_install(&dev, VEC_NET_IRQ);
	idt_set_handler(VEC_WAKE, isr_lapic_timer);
	ioapic_route_edge(pin, VEC_NET_IRQ, (u8)lapic_id());
	lapic_timer_periodic(VEC_WAKE, WAKE_COUNT);
	virtq_interrupts(&dev.vq[RECEIVEQ], true);

	struct virtq *rq = &dev.vq[RECEIVEQ];
	for (u16 i = 0; i < rq->size; i++)
		post_rx(i);
	virtio_driver_ok(&dev);
	virtq_kick(rq);
	return true;
}

int main(void)
{
	if (!parse_ip("ip", &my_ip)) {
		printf("netping: give this guest an address: ip=A.B.C.D\n");
		return EXIT_FAIL;
	}
	bool pinger = cmdline_find("peer", &(const char *){ 0 }, &(size_t){ 0 });
	if (pinger && !parse_ip("peer", &peer_ip))
		return EXIT_FAIL;
	u64 count = cmdline_u64("count", 3);
	if (count == 0 || count >= 64 * 64)
		count = 3;
	u64 secs = cmdline_u64("secs", pinger ? 60 : 0);
	tsc_per_ms = delay_us(1000);
	if (!setup())
		return EXIT_FAIL;
	printf("netping: ready mac=");
	print_mac(my_mac);
	printf(" ip=");
	print_ip(my_ip);
	printf(" irq=%u\n", dev.slot.irq);

	static const u8 broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	static const u8 zero[6];
	u64 start = rdtsc(), last_sent = 0, sent = 0;
	u64 second = 1000 * tsc_per_ms;
	for (;;) {
		u64 now = rdtsc();
		if (secs && now - start > secs * second)
			break;
		if (pinger && replies >= count)
			break;
		if (pinger && (sent == 0 || now - last_sent > second)) {
			/* one probe a second: ARP until the peer answers, then the next unanswered echo */
			if (!peer_known) {
				send_arp(1, zero, peer_ip, broadcast);
			} else {
				u16 seq = 1;
				while (seq <= count && (replies_seen[seq / 64] & (1ull << (seq % 64))))
					seq++;
				send_echo_request(seq);
			}
			sent++;
			last_sent = now;
		}
		if (poll_rx() == 0)
			kcall(k_wait_rx, 0);
	}
	lapic_timer_stop();
	if (pinger) {
		printf("netping: done replies=%lu/%lu ignored=%lu\n", replies, count, ignored);
		return replies >= count ? EXIT_OK : EXIT_FAIL;
	}
	printf("netping: done ignored=%lu\n", ignored);
	return EXIT_FAIL;       /* a responder only stops when secs= runs out */
}
