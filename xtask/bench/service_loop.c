/* service_loop PAIRS THREADS: a workload shaped like a service, which
 * `cargo xtask bench` times beside alloc_loop. Prints "PID <pid>", waits
 * for one line on stdin, then each of THREADS threads makes PAIRS
 * malloc/free pairs: sizes spread over 16..4096 bytes, into a window of
 * 1024 live blocks per thread shared by all threads, each step replacing a
 * pseudo-random slot (so blocks are freed in another order than they were
 * allocated, and with two threads, often by the other thread). Prints
 * "ns_per_pair <float>" (thread-time per pair, as alloc_loop does) and
 * exits 0. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define WINDOW 1024

static long pairs;
static int threads;
static void **slots;
static pthread_barrier_t start_line;

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static void *worker(void *arg)
{
	uint64_t state = 0x9E3779B97F4A7C15ull * ((uintptr_t)arg + 1);
	long count = (long)WINDOW * threads;

	pthread_barrier_wait(&start_line);
	for (long i = 0; i < pairs; i++) {
		/* xorshift64: the slot and the size. */
		state ^= state << 13;
		state ^= state >> 7;
		state ^= state << 17;
		long k = (long)(state % (uint64_t)count);
		size_t size = 16 + (size_t)((state >> 32) % 4081);
		unsigned char *block = malloc(size);

		if (!block) {
			fprintf(stderr, "service_loop: malloc(%zu) failed\n", size);
			exit(1);
		}
		block[0] = (unsigned char)i;
		free(__atomic_exchange_n(&slots[k], block, __ATOMIC_ACQ_REL));
	}
	return NULL;
}

int main(int argc, char **argv)
{
	char line[64];
	pthread_t *ids;
	double start;

	pairs = argc > 1 ? atol(argv[1]) : 200000;
	threads = argc > 2 ? atoi(argv[2]) : 1;
	if (pairs < 1 || threads < 1)
		return 2;
	slots = calloc((size_t)WINDOW * (size_t)threads, sizeof(void *));
	ids = calloc((size_t)threads, sizeof(pthread_t));
	pthread_barrier_init(&start_line, NULL, (unsigned)threads + 1);
	for (int t = 0; t < threads; t++)
		pthread_create(&ids[t], NULL, worker, (void *)(uintptr_t)t);
	printf("PID %d\n", (int)getpid());
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	start = now_ns();
	pthread_barrier_wait(&start_line);
	for (int t = 0; t < threads; t++)
		pthread_join(ids[t], NULL);
	printf("ns_per_pair %.1f\n", (now_ns() - start) * threads / ((double)pairs * threads));
	fflush(stdout);
	for (long k = 0; k < (long)WINDOW * threads; k++)
		free(slots[k]);
	return 0;
}
