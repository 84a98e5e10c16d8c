/*
 * Runtime start-up at CPL3, the IDT, exceptions, exit.
 */
#include "guest.h"

const struct mb_info *boot_info;
bool (*trap_hook)(struct trap_frame *f);

/* IDT gate (Intel SDM vol. 3A §6.14.1, "64-Bit Mode IDT") */
struct idt_gate {
	u16 offset0;
	u16 selector;
	u8 ist;
	u8 type;        /* P | DPL << 5 | 0xE (64-bit interrupt gate: IF cleared on entry) */
	u16 offset1;
	u32 offset2;
	u32 reserved;
} __attribute__((packed));

struct desc_ptr {
	u16 limit;
	u64 base;
} __attribute__((packed));

extern struct idt_gate idt[IDT_ENTRIES];        /* lib/tables.S; IDTR points at it from boot */
extern char isr_stubs[], isr_timer[], isr_spurious[], kcall_entry[];
extern char __bss_start[], __bss_end[];

static const struct desc_ptr idt_zero = { 0, 0 };

static void set_gate(unsigned vec, const void *handler, unsigned dpl)
{
	u64 a = (u64)(uintptr_t)handler;
	idt[vec] = (struct idt_gate){
		.offset0 = a & 0xFFFF, .selector = SEL_KCODE64, .ist = 0, .type = (u8)(0x8E | dpl << 5),
		.offset1 = (a >> 16) & 0xFFFF, .offset2 = a >> 32, .reserved = 0,
	};
}

/* Fill the IDT that boot64 loaded. Runs at CPL3: the table is ordinary memory. */
static void idt_init(void)
{
	for (unsigned v = 0; v < NUM_STUBS; v++)
		set_gate(v, isr_stubs + 16 * v, 0);
	set_gate(VEC_IRQ0, isr_timer, 0);
	set_gate(VEC_SPURIOUS, isr_spurious, 0);
	set_gate(VEC_KCALL, kcall_entry, 3);    /* DPL 3: INT3 is allowed from CPL3 */
}

long k_halt_forever(long unused)
{
	(void)unused;
	for (;;)
		__asm__ volatile("cli; hlt");
}

long k_lidt_zero(long unused)
{
	(void)unused;
	__asm__ volatile("lidt %0" : : "m"(idt_zero));
	return 0;
}

void guest_exit(u32 value)
{
	outl(PORT_DEBUG_EXIT, value);
	/* Still here: no isa-debug-exit device. Say so once and stop the CPU. */
	printf("guest: exit value %u: no debug-exit device at port %#x, halting\n", value, PORT_DEBUG_EXIT);
	kcall(k_halt_forever, 0);
	for (;;)
		;
}

static const char *const exception_names[32] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
	"#GP", "#PF", "?", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
};

/* Called at CPL0 from isr_common for every vector but the PIT tick. */
void trap_dispatch(struct trap_frame *f)
{
	if (f->vector >= 0x20) {
		/* 8259 IRQs (only IRQ0 is ever unmasked, and it has its own stub). A spurious IRQ7 or
		 * IRQ15 must not be acknowledged on the chip that raised it; for IRQ15 the master still
		 * saw a real IRQ2 (8259A datasheet, "Interrupt Sequence"). EOI is OCW2 = 0x20. */
		if (f->vector == 0x27)
			return;
		if (f->vector >= 0x28 && f->vector != 0x2F)
			outb(0xA0, 0x20);
		outb(0x20, 0x20);
		return;
	}
	if (trap_hook && trap_hook(f))
		return;
	u64 cr2;
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	const char *name = exception_names[f->vector] ? exception_names[f->vector] : "?";
	printf("guest: exception %s (vector %lu) error=%#lx rip=%#lx cs=%#lx rsp=%#lx cr2=%#lx\n", name,
	       f->vector, f->error, f->rip, f->cs, f->rsp, cr2);
	guest_exit(EXIT_EXCEPTION);
}

/* First C code, at CPL3, entered from lib/start.S with the loader's MBI address and magic. */
__attribute__((noreturn)) void rt_start(u64 mbi, u64 magic);
void rt_start(u64 mbi, u64 magic)
{
	memset(__bss_start, 0, (size_t)(__bss_end - __bss_start));
	idt_init();
	uart_init();
	if ((u32)magic == MB_BOOTLOADER_MAGIC && mbi) {
		boot_info = (const struct mb_info *)(uintptr_t)mbi;
		if (boot_info->flags & MB_INFO_CMDLINE)
			cmdline_init((const char *)(uintptr_t)boot_info->cmdline);
	} else {
		printf("guest: no Multiboot information (EAX was %#x, expected %#x)\n", (u32)magic,
		       MB_BOOTLOADER_MAGIC);
	}
	guest_exit((u32)main());
}

/* ---- Multiboot memory information ---- */
bool mb_ram_available(u64 addr, u64 len)
{
	const struct mb_info *mb = boot_info;

	if (!mb)
		return false;
	if (mb->flags & MB_INFO_MMAP) {
		u64 p = mb->mmap_addr, end = p + mb->mmap_length;
		while (p + sizeof(struct mb_mmap_entry) <= end) {
			const struct mb_mmap_entry *e = (const void *)(uintptr_t)p;
			if (e->type == 1 && addr >= e->base && addr + len <= e->base + e->length)
				return true;
			p += e->size + 4;
		}
		return false;
	}
	if (mb->flags & MB_INFO_MEM) {
		if (addr + len <= (u64)mb->mem_lower << 10)
			return true;
		return addr >= 0x100000 && addr + len <= 0x100000 + ((u64)mb->mem_upper << 10);
	}
	return false;
}

u64 mb_ram_top(void)
{
	if (!boot_info || !(boot_info->flags & MB_INFO_MEM))
		return 0;
	return 0x100000 + ((u64)boot_info->mem_upper << 10);
}
