/* kmem_loop ITERATIONS: the kernel-allocation workload `cargo xtask bench`
 * times. Prints "PID <pid>", waits for one line on stdin (so the tracer can
 * attach first), then makes ITERATIONS eventfd()+close() pairs, each a few
 * kernel allocations (the file, the eventfd context) and their frees, and
 * prints "ns_per_iteration <float>". Exits 0. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	long iterations = argc > 1 ? atol(argv[1]) : 200000;
	char line[64];
	double start;

	printf("PID %d\n", (int)getpid());
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	start = now_ns();
	for (long i = 0; i < iterations; i++) {
		int fd = eventfd(0, 0);

		if (fd < 0) {
			perror("kmem_loop: eventfd");
			return 1;
		}
		close(fd);
	}
	printf("ns_per_iteration %.1f\n", (now_ns() - start) / (double)iterations);
	fflush(stdout);
	return 0;
}
