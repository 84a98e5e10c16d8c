/*
 * The guests' small runtime. Guests run main() at CPL3 (natively fast on PVM) and enter CPL0 only
 * through kcall() for the few things that need it. See docs/GUESTS.md.
 */
#ifndef GUEST_H
#define GUEST_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "arch.h"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

/* Debug-exit values the guests use (the VMM exits with status (value << 1) | 1). */
enum guest_exit_value {
	EXIT_OK = 0,
	EXIT_FAIL = 1,          /* a check inside the guest failed */
	EXIT_EXCEPTION = 2,     /* unexpected CPU exception */
	EXIT_NO_AP = 3,         /* smp: the second CPU did not start */
	EXIT_NO_RESET = 4,      /* reset: the i8042 reset did not happen */
	EXIT_SYSRET_FAULT = 5,  /* sysret: SYSRETQ raised an exception */
};

/* ---- port I/O, MMIO, CPU helpers (usable at CPL3: user RFLAGS has IOPL = 3) ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline void mmio_write32(uintptr_t addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u32 mmio_read32(uintptr_t addr) { return *(volatile u32 *)addr; }
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

/* ---- CPL transitions (lib/start.S) ---- */
typedef long (*kfunc)(long);
/* Run fn(arg) at CPL0 and return its result; callable from CPL3 or CPL0. */
long kcall(kfunc fn, long arg);
/* Ready-made CPL0 functions for kcall(). */
long k_halt_forever(long unused);       /* cli; hlt, forever */
long k_lidt_zero(long unused);          /* load an IDT with limit 0: any exception triple-faults */

/* ---- runtime (lib/rt.c) ---- */
int main(void);                         /* each guest's; runs at CPL3; return value = exit value */
__attribute__((noreturn)) void guest_exit(u32 value);
extern volatile u64 timer_ticks;        /* incremented by the IRQ0 stub */
/* A guest may claim an exception before the default report; return true to resume. */
struct trap_frame;
extern bool (*trap_hook)(struct trap_frame *f);

struct trap_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;   /* pushed by the CPU (Intel SDM vol. 3A §6.14.2) */
};

/* ---- Multiboot information (Multiboot 0.6.96 §3.3) ---- */
struct mb_info {
	u32 flags;
	u32 mem_lower, mem_upper;       /* KiB below 1 MiB / above 1 MiB; flags bit 0 */
	u32 boot_device;
	u32 cmdline;                    /* flags bit 2 */
	u32 mods_count, mods_addr;      /* flags bit 3 */
	u32 syms[4];
	u32 mmap_length, mmap_addr;     /* flags bit 6 */
} __attribute__((packed));
#define MB_INFO_MEM     (1u << 0)
#define MB_INFO_CMDLINE (1u << 2)
#define MB_INFO_MODS    (1u << 3)
#define MB_INFO_MMAP    (1u << 6)
struct mb_mmap_entry {
	u32 size;                       /* of the rest of this entry; the next starts size + 4 on */
	u64 base, length;
	u32 type;                       /* 1 = available RAM */
} __attribute__((packed));
extern const struct mb_info *boot_info;     /* NULL if the loader's magic was wrong */
/* Is [addr, addr+len) inside one available-RAM range of the memory map (or of mem_lower/upper)? */
bool mb_ram_available(u64 addr, u64 len);
/* Highest end of RAM that is contiguous from 1 MiB (from mem_upper), 0 if unknown. */
u64 mb_ram_top(void);

/* ---- command line (lib/cmdline.c): "key=value" words ---- */
void cmdline_init(const char *s);      /* copy the loader's string (rt_start does it) */
const char *cmdline(void);
bool cmdline_find(const char *key, const char **val, size_t *len);
u64 cmdline_u64(const char *key, u64 dflt);
/* Does the comma list in key= contain word? Absent key: dflt. */
bool cmdline_list_has(const char *key, const char *word, bool dflt);

/* ---- console (lib/uart.c, lib/print.c): 16550 at 0x3F8, polled ---- */
void uart_init(void);
void uart_putc(char c);
void console_putc(char c);              /* "\n" goes out as "\r\n" */
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- legacy PC chips (lib/pc.c) ---- */
void pic_remap(u8 master_base, u8 slave_base, u8 master_mask, u8 slave_mask);
void pic_mask_all(void);
void lapic_virtual_wire(void);          /* route the 8259 through LINT0 (ExtINT) */
void pit_periodic(u32 hz);
void pit_stop(void);
/* Busy-wait at least us microseconds on PIT channel 2; returns the TSC cycles that took, or 0 if
 * the PIT did not answer (then the wait may have been cut short). */
u64 pit_delay_us(u32 us);
/* Wait at least us microseconds, on the PIT or else the TSC; returns TSC cycles per millisecond
 * (measured when the PIT answered and us >= 1000, else assumed for a 4 GHz TSC). */
u64 delay_us(u32 us);

/* ---- paging (lib/paging.c) ---- */
/* Walk the guest's own page tables: is va mapped present, writable and user-accessible? */
bool pt_user_writable(u64 va);

/* ---- freestanding string functions (lib/string.c); GCC may emit calls to them ---- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

extern char __image_start[], __image_end[];

#endif
