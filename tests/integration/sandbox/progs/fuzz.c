/* A hostile program for the sandbox's fuzz test: reads records of 7 little-endian u64 (system
 * call number and six arguments) from stdin, all of them first, then makes each call and writes
 * its result. Prints "survived" at the end if it is still alive. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static uint64_t recs[4096][7];

/* the raw instruction, so that the result is the kernel's (-errno), not libc's -1 */
static long raw_syscall(uint64_t nr, uint64_t a, uint64_t b, uint64_t c, uint64_t d, uint64_t e, uint64_t f) {
    long ret;
    register uint64_t r10 __asm__("r10") = d, r8 __asm__("r8") = e, r9 __asm__("r9") = f;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

int main(void) {
    size_t got = 0, want = sizeof recs;
    char *p = (char *)recs;
    long r;
    while (got < want && (r = read(0, p + got, want - got)) > 0) got += (size_t)r;
    size_t n = got / sizeof recs[0];
    for (size_t i = 0; i < n; i++) {
        long ret = raw_syscall(recs[i][0], recs[i][1], recs[i][2], recs[i][3], recs[i][4], recs[i][5], recs[i][6]);
        char line[64];
        int len = snprintf(line, sizeof line, "%lu %ld\n", (unsigned long)recs[i][0], ret);
        syscall(SYS_write, 2, line, len);
    }
    const char done[] = "survived\n";
    syscall(SYS_write, 2, done, sizeof done - 1);
    return 0;
}
