/* Ends by an exception: "segv" writes through NULL, "ud" executes ud2, "kernel" reads the VMM's
 * page in the upper half. The sandbox must turn each into the matching signal. */
#include <string.h>

int main(int argc, char **argv) {
    const char *what = argc > 1 ? argv[1] : "segv";
    if (!strcmp(what, "ud")) __asm__ volatile("ud2");
    if (!strcmp(what, "kernel")) return *(volatile int *)0xffffff8000000000UL;
    *(volatile int *)0 = 1;
    return 0;
}
