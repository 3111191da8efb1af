/* link_floor KIND LIBRARY MALLOC_OFFSET FREE_OFFSET PID: the trap floor of
 * one malloc/free pair by the kind of kernel link the probes go through.
 *
 * Attaches an empty BPF program (`return 0`) to malloc's entry and return
 * and to free, at the file offsets leaktrace itself uses (the bench reads
 * them from the `probed` list of a `leaktrace --floor --json` report), for
 * process PID only, then prints "attached" and waits for SIGINT or SIGTERM.
 *
 * KIND:
 *   perf     perf-event uprobes with the program attached by ioctl: the links
 *            aya 0.14 makes, so this should match `leaktrace --floor`;
 *   multi    BPF_TRACE_UPROBE_MULTI links (kernel 6.6+), which aya 0.14 cannot
 *            load (it sets no expected attach type for uprobes);
 *   session  one BPF_TRACE_UPROBE_SESSION link (kernel 6.13+) on malloc, whose
 *            program runs at entry and at return, and a multi link on free.
 *
 * Raw bpf(2) and perf_event_open(2), because Debian's libbpf 1.1 predates
 * both link kinds; the constants are the kernel's UAPI values. */
#include <errno.h>
#include <linux/bpf.h>
#include <linux/perf_event.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#define TRACE_UPROBE_MULTI 48   /* enum bpf_attach_type, 6.6+ */
#define TRACE_UPROBE_SESSION 57 /* enum bpf_attach_type, 6.13+ */
#define UPROBE_MULTI_RETURN 1   /* BPF_F_UPROBE_MULTI_RETURN */
#define UPROBE_RETPROBE_BIT 1   /* config bit of /sys/bus/event_source/devices/uprobe/format/retprobe */

/* union bpf_attr's link_create member with its uprobe_multi part (6.6+),
 * which Debian's 6.1 headers do not have. */
struct link_create_uprobe_multi {
	uint32_t prog_fd;
	uint32_t target_fd;
	uint32_t attach_type;
	uint32_t flags;
	uint64_t path;
	uint64_t offsets;
	uint64_t ref_ctr_offsets;
	uint64_t cookies;
	uint32_t cnt;
	uint32_t multi_flags;
	uint32_t pid;
	uint32_t pad[9];
};

static const char *library;
static int pid;

static void die(const char *what)
{
	fprintf(stderr, "link_floor: %s: %s\n", what, strerror(errno));
	exit(1);
}

static int load(uint32_t expected_attach_type)
{
	struct bpf_insn insns[] = {
		{ .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 0, .imm = 0 },
		{ .code = BPF_JMP | BPF_EXIT },
	};
	union bpf_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.prog_type = BPF_PROG_TYPE_KPROBE;
	attr.insns = (uint64_t)(uintptr_t)insns;
	attr.insn_cnt = sizeof(insns) / sizeof(insns[0]);
	attr.license = (uint64_t)(uintptr_t)"GPL";
	attr.expected_attach_type = expected_attach_type;
	int fd = syscall(__NR_bpf, BPF_PROG_LOAD, &attr, sizeof(attr));
	if (fd < 0)
		die("BPF_PROG_LOAD");
	return fd;
}

static int uprobe_pmu_type(void)
{
	FILE *f = fopen("/sys/bus/event_source/devices/uprobe/type", "r");
	int type;

	if (!f || fscanf(f, "%d", &type) != 1)
		die("reading the uprobe PMU type");
	fclose(f);
	return type;
}

static void perf_link(int prog, uint64_t offset, int retprobe)
{
	struct perf_event_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.size = sizeof(attr);
	attr.type = uprobe_pmu_type();
	attr.config = retprobe ? 1 << (UPROBE_RETPROBE_BIT - 1) : 0;
	attr.config1 = (uint64_t)(uintptr_t)library;
	attr.config2 = offset;
	int fd = syscall(__NR_perf_event_open, &attr, pid, -1, -1, PERF_FLAG_FD_CLOEXEC);
	if (fd < 0)
		die("perf_event_open (uprobe)");
	if (ioctl(fd, PERF_EVENT_IOC_SET_BPF, prog) < 0)
		die("PERF_EVENT_IOC_SET_BPF");
	if (ioctl(fd, PERF_EVENT_IOC_ENABLE, 0) < 0)
		die("PERF_EVENT_IOC_ENABLE");
}

static void multi_link(int prog, uint32_t attach_type, uint64_t offset, uint32_t flags)
{
	struct link_create_uprobe_multi attr;

	memset(&attr, 0, sizeof(attr));
	attr.prog_fd = prog;
	attr.attach_type = attach_type;
	attr.path = (uint64_t)(uintptr_t)library;
	attr.offsets = (uint64_t)(uintptr_t)&offset;
	attr.cnt = 1;
	attr.multi_flags = flags;
	attr.pid = pid;
	if (syscall(__NR_bpf, BPF_LINK_CREATE, &attr, sizeof(attr)) < 0)
		die("BPF_LINK_CREATE (uprobe_multi)");
}

static void stop(int sig)
{
	(void)sig;
	_exit(0);
}

int main(int argc, char **argv)
{
	if (argc != 6) {
		fprintf(stderr, "usage: link_floor perf|multi|session LIBRARY MALLOC_OFFSET FREE_OFFSET PID\n");
		return 2;
	}
	const char *kind = argv[1];
	library = argv[2];
	uint64_t malloc_offset = strtoull(argv[3], NULL, 0);
	uint64_t free_offset = strtoull(argv[4], NULL, 0);
	pid = atoi(argv[5]);

	signal(SIGINT, stop);
	signal(SIGTERM, stop);
	if (!strcmp(kind, "perf")) {
		int prog = load(0);
		/* Return probe first, as leaktrace attaches them. */
		perf_link(prog, malloc_offset, 1);
		perf_link(prog, malloc_offset, 0);
		perf_link(prog, free_offset, 0);
	} else if (!strcmp(kind, "multi")) {
		int prog = load(TRACE_UPROBE_MULTI);
		multi_link(prog, TRACE_UPROBE_MULTI, malloc_offset, UPROBE_MULTI_RETURN);
		multi_link(prog, TRACE_UPROBE_MULTI, malloc_offset, 0);
		multi_link(prog, TRACE_UPROBE_MULTI, free_offset, 0);
	} else if (!strcmp(kind, "session")) {
		multi_link(load(TRACE_UPROBE_SESSION), TRACE_UPROBE_SESSION, malloc_offset, 0);
		multi_link(load(TRACE_UPROBE_MULTI), TRACE_UPROBE_MULTI, free_offset, 0);
	} else {
		fprintf(stderr, "link_floor: unknown kind %s\n", kind);
		return 2;
	}
	printf("attached\n");
	fflush(stdout);
	for (;;)
		pause();
}
