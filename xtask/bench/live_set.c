/* live_set N: the workload for the live-set part of `cargo xtask bench`.
 *
 * Prints "PID <pid>", waits for one line on stdin (so the tracer can attach
 * first), then makes N allocations of 16 to 256 bytes and keeps every one,
 * prints "READY <N>", and idles until stdin closes. Exits 0 without freeing:
 * the point is a tracer holding N live allocations while the target is quiet.
 *
 * Nothing else is allocated after go: the table of pointers comes first and
 * stdio's buffers are in place by then, so a tracer that attached before go
 * should count exactly N. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define MIN_SIZE 16
#define SIZE_SPAN 241 /* sizes MIN_SIZE .. MIN_SIZE + SIZE_SPAN - 1 = 256 */

/* Global, so the compiler must assume the blocks are used. */
unsigned char **volatile blocks;

int main(int argc, char **argv)
{
	char line[64];
	long n;

	if (argc != 2 || (n = atol(argv[1])) < 1) {
		fprintf(stderr, "usage: %s N (at least 1)\n", argv[0]);
		return 2;
	}
	blocks = calloc((size_t)n, sizeof(*blocks));
	if (!blocks) {
		fprintf(stderr, "live_set: out of memory for %ld pointers\n", n);
		return 1;
	}

	printf("PID %d\n", (int)getpid());
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin)) {
		fprintf(stderr, "live_set: stdin closed before go\n");
		return 1;
	}

	for (long i = 0; i < n; i++) {
		size_t size = MIN_SIZE + (size_t)((i * 37) % SIZE_SPAN);

		blocks[i] = malloc(size);
		if (!blocks[i]) {
			fprintf(stderr, "live_set: malloc(%zu) failed after %ld blocks\n", size, i);
			return 1;
		}
		blocks[i][0] = (unsigned char)i;
	}
	printf("READY %ld\n", n);
	fflush(stdout);

	while (fgets(line, sizeof(line), stdin))
		;
	return 0;
}
