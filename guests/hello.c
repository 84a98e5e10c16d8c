/*
 * hello: the smallest useful guest. Prints a greeting and the command line the loader passed,
 * then exits through isa-debug-exit with value 0, or N if the command line says exit=N.
 */
#include "guest.h"

int main(void)
{
	printf("hello from virtkit guest\n");
	printf("cmdline: %s\n", cmdline());
	return (int)cmdline_u64("exit", EXIT_OK);
}
