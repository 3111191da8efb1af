/* A small "server" for `cargo xtask demo`: worker threads handle fake
 * requests. Most memory is freed properly (request buffers, a bounded
 * cache), but the error path of format_reply() forgets its buffer and
 * every new session leaks its name. Runs until killed. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define WORKERS 2
#define CACHE_SLOTS 64

struct session {
	char *name;
	int requests;
};

static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;
static struct session *cache[CACHE_SLOTS];

__attribute__((noinline)) static char *read_request(unsigned id)
{
	char *buf = malloc(512 + id % 1024);
	snprintf(buf, 512, "GET /item/%u HTTP/1.1", id);
	return buf;
}

/* Leak 1: the error path returns without freeing `reply`. */
__attribute__((noinline)) static int format_reply(unsigned id, char **out)
{
	char *reply = malloc(256);
	if (id % 10 == 0)
		return -1; /* "bad request": reply is lost */
	snprintf(reply, 256, "200 OK item %u", id);
	*out = reply;
	return 0;
}

/* Leak 2: an evicted session's name is never freed. */
__attribute__((noinline)) static struct session *session_for(unsigned id)
{
	unsigned slot = id % CACHE_SLOTS;
	pthread_mutex_lock(&cache_lock);
	struct session *s = cache[slot];
	if (!s || s->requests > 2) {
		if (s)
			free(s); /* forgets s->name */
		s = calloc(1, sizeof(*s));
		if (asprintf(&s->name, "session-%u-with-a-longer-name", id) < 0)
			s->name = NULL;
		cache[slot] = s;
	}
	s->requests++;
	pthread_mutex_unlock(&cache_lock);
	return s;
}

__attribute__((noinline)) static void handle_request(unsigned id)
{
	char *request = read_request(id);
	char *reply = NULL;
	session_for(id);
	if (format_reply(id, &reply) == 0)
		free(reply);
	free(request);
}

static void *worker(void *arg)
{
	unsigned id = (unsigned)(size_t)arg;
	for (;;) {
		handle_request(id);
		id += WORKERS;
		usleep(5000);
	}
	return NULL;
}

int main(void)
{
	pthread_t threads[WORKERS];
	printf("leaky_server: pid %d\n", (int)getpid());
	fflush(stdout);
	for (size_t i = 0; i < WORKERS; i++)
		pthread_create(&threads[i], NULL, worker, (void *)i);
	for (size_t i = 0; i < WORKERS; i++)
		pthread_join(threads[i], NULL);
	return 0;
}
