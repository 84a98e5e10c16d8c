/* ACPI table discovery (see acpi.h). Every length read from a table is bounded before use. */
#include "acpi.h"

#define RSDP_AREA_START 0xE0000ull
#define RSDP_AREA_END   0x100000ull
#define MAX_TABLE       (64u << 10)     /* no table of ours is near this; a bigger one is bad */

static u8 sum(const u8 *p, u32 n)
{
	u8 s = 0;
	for (u32 i = 0; i < n; i++)
		s += p[i];
	return s;
}

static u32 rd32(const u8 *p) { return (u32)p[0] | (u32)p[1] << 8 | (u32)p[2] << 16 | (u32)p[3] << 24; }
static u64 rd64(const u8 *p) { return (u64)rd32(p) | (u64)rd32(p + 4) << 32; }

/* A system description table at addr with this signature, its length sane and its checksum
 * right (§5.2.6); its length in *len. */
static const u8 *table(u64 addr, const char *sig, u32 *len)
{
	const u8 *t = (const u8 *)(uintptr_t)addr;

	if (addr < 0x1000 || addr >= 0xC0000000ull || memcmp(t, sig, 4) != 0)
		return NULL;
	*len = rd32(t + 4);
	if (*len < 36 || *len > MAX_TABLE || sum(t, *len) != 0)
		return NULL;
	return t;
}

static struct acpi_power fail(struct acpi_power p, const char *why)
{
	p.ok = false;
	p.why = why;
	return p;
}

/* SLP_TYPa of Name(\_S5_, Package(){...}) in the DSDT's AML (§20.2.5.4 DefPackage: PackageOp
 * 0x12, PkgLength, NumElements, then the elements; the first a ZeroOp, OneOp or BytePrefix). */
static int s5_slp_typ(const u8 *dsdt, u32 len)
{
	for (u32 i = 36; i + 4 < len; i++) {
		if (memcmp(dsdt + i, "_S5_", 4) != 0)
			continue;
		u32 j = i + 4;
		if (j >= len || dsdt[j] != 0x12)
			continue;
		j++;
		if (j >= len)
			return -1;
		j += 1 + (dsdt[j] >> 6);        /* PkgLength: lead byte plus bits 6-7 more bytes */
		j++;                            /* NumElements */
		if (j >= len)
			return -1;
		switch (dsdt[j]) {
		case 0x00: return 0;
		case 0x01: return 1;
		case 0x0A: return j + 1 < len ? dsdt[j + 1] : -1;
		default: return -1;
		}
	}
	return -1;
}

struct acpi_power acpi_find_power(void)
{
	struct acpi_power p = {.s5_slp_typ = -1};
	const u8 *rsdp = NULL;

	for (u64 a = RSDP_AREA_START; a < RSDP_AREA_END; a += 16) {
		const u8 *c = (const u8 *)(uintptr_t)a;
		if (memcmp(c, "RSD PTR ", 8) == 0 && sum(c, 20) == 0) {
			rsdp = c;
			break;
		}
	}
	if (!rsdp)
		return fail(p, "no RSDP in 0xE0000-0xFFFFF");
	p.rsdp = (uintptr_t)rsdp;
	if (rsdp[15] < 2 || rd32(rsdp + 20) != 36 || sum(rsdp, 36) != 0)
		return fail(p, "RSDP is not revision 2 with a valid extended checksum");
	p.xsdt = rd64(rsdp + 24);
	u32 xlen;
	const u8 *xsdt = table(p.xsdt, "XSDT", &xlen);
	if (!xsdt)
		return fail(p, "XSDT missing or bad checksum");
	const u8 *fadt = NULL;
	u32 flen = 0;
	for (u32 off = 36; off + 8 <= xlen; off += 8) {
		u64 a = rd64(xsdt + off);
		if ((fadt = table(a, "FACP", &flen)) != NULL) {
			p.fadt = a;
			break;
		}
	}
	if (!fadt)
		return fail(p, "no FADT (FACP) in the XSDT");
	if (flen < 276)
		return fail(p, "FADT shorter than ACPI 6.5's 276 bytes");
	p.fadt_flags = rd32(fadt + 112);
	memcpy(&p.reset_reg, fadt + 116, sizeof p.reset_reg);
	p.reset_value = fadt[128];
	memcpy(&p.sleep_control, fadt + 244, sizeof p.sleep_control);
	memcpy(&p.sleep_status, fadt + 256, sizeof p.sleep_status);
	p.dsdt = rd64(fadt + 140);
	u32 dlen;
	const u8 *dsdt = table(p.dsdt, "DSDT", &dlen);
	if (!dsdt)
		return fail(p, "DSDT missing or bad checksum");
	p.s5_slp_typ = s5_slp_typ(dsdt, dlen);
	p.ok = true;
	p.why = "";
	return p;
}
