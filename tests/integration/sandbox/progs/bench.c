/* Sandbox measurements: the round trip of getpid, of a 4 KiB pread, and a CPU-bound loop.
 * Prints "name value unit" lines; run natively and in the sandbox to compare. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 2000;
    const char *file = argc > 2 ? argv[2] : "/data4k";
    double t0 = now_us();
    for (long i = 0; i < n; i++) syscall(SYS_getpid);
    printf("getpid %.2f us\n", (now_us() - t0) / n);
    int fd = open(file, O_RDONLY);
    if (fd >= 0) {
        static char buf[4096];
        t0 = now_us();
        for (long i = 0; i < n; i++) pread(fd, buf, sizeof buf, 0);
        printf("pread4k %.2f us\n", (now_us() - t0) / n);
        close(fd);
    }
    volatile unsigned long x = 0;
    t0 = now_us();
    for (unsigned long i = 0; i < 200000000UL; i++) x += i ^ (x >> 3);
    printf("cpuloop %.0f ms\n", (now_us() - t0) / 1000);
    return 0;
}
