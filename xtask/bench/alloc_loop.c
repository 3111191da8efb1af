/* alloc_loop PAIRS THREADS: the workload `cargo xtask bench` times.
 *
 * Prints "PID <pid>", waits for one line on stdin (so the tracer can attach
 * first), then each of THREADS threads does PAIRS malloc/free pairs of 16 to
 * 4096 bytes over its own window of SLOTS live blocks, and prints
 * "ns_per_pair <float>": wall ns from go to the last join, times THREADS,
 * divided by all pairs made, i.e. thread-time per pair (with one thread, plain
 * ns per pair). Frees everything and exits 0.
 *
 * The window keeps a few blocks live, as a real program does, so the
 * tracer's maps see inserts and deletes rather than one address reused. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SLOTS 64
#define MIN_SIZE 16
#define SIZE_SPAN 4081 /* sizes MIN_SIZE .. MIN_SIZE + SIZE_SPAN - 1 = 4096 */

static long pairs;
static pthread_barrier_t start_line;
/* Read back after the loop so the compiler cannot drop a malloc/free pair. */
static volatile unsigned char sink;

static void *alloc_loop(void *arg)
{
	unsigned char *slot[SLOTS] = { 0 };
	unsigned char sum = 0;

	(void)arg;
	pthread_barrier_wait(&start_line);
	for (long i = 0; i < pairs; i++) {
		int k = (int)(i % SLOTS);
		size_t size = MIN_SIZE + (size_t)((i * 37) % SIZE_SPAN);

		free(slot[k]);
		slot[k] = malloc(size);
		if (!slot[k]) {
			fprintf(stderr, "alloc_loop: malloc(%zu) failed\n", size);
			exit(1);
		}
		slot[k][0] = (unsigned char)i;
	}
	for (int k = 0; k < SLOTS; k++) {
		if (slot[k])
			sum += slot[k][0];
		free(slot[k]);
	}
	sink = sum;
	return NULL;
}

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	char line[64];
	long threads;
	pthread_t *tids;
	double start, end;

	if (argc != 3 || (pairs = atol(argv[1])) < 1 || (threads = atol(argv[2])) < 1) {
		fprintf(stderr, "usage: %s PAIRS THREADS (both at least 1)\n", argv[0]);
		return 2;
	}
	/* Threads and their stacks exist before go, so only the loop is timed. */
	tids = calloc((size_t)threads, sizeof(*tids));
	if (!tids || pthread_barrier_init(&start_line, NULL, (unsigned)threads + 1)) {
		fprintf(stderr, "alloc_loop: out of memory\n");
		return 1;
	}
	for (long t = 0; t < threads; t++) {
		int err = pthread_create(&tids[t], NULL, alloc_loop, NULL);

		if (err) {
			fprintf(stderr, "alloc_loop: pthread_create: %s\n", strerror(err));
			return 1;
		}
	}

	printf("PID %d\n", (int)getpid());
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin)) {
		fprintf(stderr, "alloc_loop: stdin closed before go\n");
		return 1;
	}

	start = now_ns();
	pthread_barrier_wait(&start_line);
	for (long t = 0; t < threads; t++)
		pthread_join(tids[t], NULL);
	end = now_ns();

	printf("ns_per_pair %.3f\n", (end - start) * (double)threads / ((double)pairs * (double)threads));
	fflush(stdout);
	pthread_barrier_destroy(&start_line);
	free(tids);
	return 0;
}
