/*
 * What fullwork and parawork have in common: the data they write (a console text pattern, a disk
 * pattern keyed by sector number), the checksums they print, the CPU loop, and the cmdline words
 * that choose the workloads. Both guests must produce identical data and checksums for the same
 * parameters, so that the full and para paths can be compared byte for byte (docs/GUESTS.md,
 * "Workload guests").
 */
#ifndef GUEST_WORK_H
#define GUEST_WORK_H

#include "guest.h"

#define SECTOR_SIZE     512u
#define SECTOR_WORDS    (SECTOR_SIZE / 8)
#define MiB             (1ull << 20)

/* Two 1 MiB buffers, page aligned: data to write, and what was read back. Separate buffers so a
 * read that silently did nothing leaves stale data of another sector there, which the checksum
 * catches. The console workloads use wbuf. */
#define WORK_BUF_SIZE   MiB
extern u8 work_wbuf[WORK_BUF_SIZE];
extern u8 work_rbuf[WORK_BUF_SIZE];

/* ---- checksums: 64-bit FNV-1a (offset basis and prime of the FNV reference) ---- */
#define FNV64_BASIS     0xcbf29ce484222325ull
#define FNV64_PRIME     0x100000001b3ull
/* FNV-1a over bytes: the console checksum (any host tool can recompute it). */
u64 fnv1a_bytes(u64 h, const void *p, size_t n);
/* FNV-1a over little-endian 64-bit words (one xor and one multiply per 8 bytes, so the checksum
 * costs little next to the I/O): the disk checksum. n is a multiple of 8. */
u64 fnv1a_words(u64 h, const void *p, size_t n);

/* ---- disk pattern: sector s holds 64 little-endian words v_i = x_i ^ (x_i >> 31), i = 1..64, of
 * the LCG x_i = x_{i-1} * 6364136223846793005 + 1442695040888963407 (mod 2^64; Knuth's MMIX
 * constants) started at x_0 = (s + 1) * 0x9E3779B97F4A7C15 ---- */
/* Fill count sectors from sector first into buf and return h updated over them (fnv1a_words). */
u64 disk_pattern_fill(void *buf, u64 first, u64 count, u64 h);

/* ---- console pattern: a 64-byte line of text repeated; byte i of the stream is line[i % 64] ---- */
#define CONSOLE_LINE_LEN 64u
extern const char console_line[CONSOLE_LINE_LEN + 1];
/* Fill n bytes (a multiple of CONSOLE_LINE_LEN, or the stream's end) starting at stream offset 0. */
void console_pattern_fill(u8 *buf, size_t n);

/* ---- the CPU-bound loop: the same three ALU instructions and branch as trapcost's cpu phase ---- */
u64 work_alu_loop(u64 n);

/* ---- cmdline ---- */
/* Does word (e.g. "virtio") equal the value of key= exactly? */
bool cmdline_is(const char *key, const char *word);
/* Copy the value of key= into out (at most size-1 bytes); false if key= is absent. */
bool cmdline_str(const char *key, char *out, size_t size);

#endif
