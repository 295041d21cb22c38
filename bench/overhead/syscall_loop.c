/* One measured syscall in a loop: `syscall_loop NAME CALLS`.
 *
 * Sets up a TCP connection over loopback inside this process, waits for a line
 * on stdin (so the benchmark can start tracing this pid first), then makes CALLS
 * calls of NAME, each moving 128 bytes, and prints {"syscall", "calls",
 * "ns_per_call"}. Only the measured calls are timed: the peer's draining (for
 * writes) or filling (for reads) happens between timed batches. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MSG 128
#define BATCH 64

static char buf[MSG];
static char bulk[MSG * BATCH];

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void check(ssize_t n)
{
	if (n != MSG) {
		fprintf(stderr, "moved %zd bytes, expected %d\n", n, MSG);
		exit(1);
	}
}

/* ---- the ten measured calls: each moves exactly MSG bytes ---- */
static struct iovec two_iov[2];
static struct msghdr one_msg;
static struct mmsghdr one_mmsg;

static void setup_vectors(void)
{
	two_iov[0] = (struct iovec){ buf, MSG / 2 };
	two_iov[1] = (struct iovec){ buf + MSG / 2, MSG / 2 };
	one_msg.msg_iov = two_iov;
	one_msg.msg_iovlen = 2;
	one_mmsg.msg_hdr = one_msg;
}

static void op_write(int fd) { check(write(fd, buf, MSG)); }
static void op_writev(int fd) { check(writev(fd, two_iov, 2)); }
static void op_sendto(int fd) { check(sendto(fd, buf, MSG, 0, NULL, 0)); }
static void op_sendmsg(int fd) { check(sendmsg(fd, &one_msg, 0)); }
static void op_sendmmsg(int fd)
{
	if (sendmmsg(fd, &one_mmsg, 1, 0) != 1)
		die("sendmmsg");
	check(one_mmsg.msg_len);
}
static void op_read(int fd) { check(read(fd, buf, MSG)); }
static void op_readv(int fd) { check(readv(fd, two_iov, 2)); }
static void op_recvfrom(int fd) { check(recvfrom(fd, buf, MSG, 0, NULL, NULL)); }
static void op_recvmsg(int fd) { check(recvmsg(fd, &one_msg, 0)); }
static void op_recvmmsg(int fd)
{
	if (recvmmsg(fd, &one_mmsg, 1, 0, NULL) != 1)
		die("recvmmsg");
	check(one_mmsg.msg_len);
}

static const struct {
	const char *name;
	void (*op)(int fd);
	int ingress;
} OPS[] = {
	{ "read", op_read, 1 },       { "readv", op_readv, 1 },     { "recvfrom", op_recvfrom, 1 },
	{ "recvmsg", op_recvmsg, 1 }, { "recvmmsg", op_recvmmsg, 1 }, { "write", op_write, 0 },
	{ "writev", op_writev, 0 },   { "sendto", op_sendto, 0 },   { "sendmsg", op_sendmsg, 0 },
	{ "sendmmsg", op_sendmmsg, 0 },
};

static void tcp_pair(int *cli, int *srv)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(a);
	int one = 1, lst = socket(AF_INET, SOCK_STREAM, 0);

	if (lst < 0 || bind(lst, (void *)&a, sizeof(a)) || listen(lst, 1) || getsockname(lst, (void *)&a, &len))
		die("listen");
	*cli = socket(AF_INET, SOCK_STREAM, 0);
	if (*cli < 0 || connect(*cli, (void *)&a, sizeof(a)))
		die("connect");
	*srv = accept(lst, NULL, NULL);
	if (*srv < 0)
		die("accept");
	setsockopt(*cli, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	close(lst);
}

/* Move n bytes from `from` to `to` with large calls (not timed). */
static void pump(int from, int to, size_t n)
{
	if (to >= 0) {
		for (size_t done = 0; done < n;) {
			ssize_t k = write(to, bulk, n - done > sizeof(bulk) ? sizeof(bulk) : n - done);
			if (k <= 0)
				die("fill");
			done += k;
		}
		/* wait until it is all queued, so no measured read blocks */
		for (int queued = 0; queued < (int)n;)
			if (ioctl(from, FIONREAD, &queued))
				die("FIONREAD");
		return;
	}
	for (size_t done = 0; done < n;) {
		ssize_t k = read(from, bulk, sizeof(bulk));
		if (k <= 0)
			die("drain");
		done += k;
	}
}

int main(int argc, char **argv)
{
	int cli, srv, idx = -1;
	long calls = argc > 2 ? atol(argv[2]) : 100000;
	char line[16];

	for (unsigned i = 0; argc > 1 && i < sizeof(OPS) / sizeof(OPS[0]); i++)
		if (!strcmp(argv[1], OPS[i].name))
			idx = i;
	if (idx < 0) {
		fprintf(stderr, "usage: %s SYSCALL [CALLS]\n", argv[0]);
		return 2;
	}
	memset(buf, 'x', sizeof(buf));
	setup_vectors();
	tcp_pair(&cli, &srv);
	if (!fgets(line, sizeof(line), stdin))
		return 1;

	long long spent = 0;
	long done = 0;
	while (done < calls) {
		int n = calls - done < BATCH ? calls - done : BATCH;
		if (OPS[idx].ingress)
			pump(srv, cli, (size_t)n * MSG);
		long long t0 = now_ns();
		for (int i = 0; i < n; i++)
			OPS[idx].op(OPS[idx].ingress ? srv : cli);
		spent += now_ns() - t0;
		if (!OPS[idx].ingress)
			pump(srv, -1, (size_t)n * MSG);
		done += n;
	}
	printf("{\"syscall\": \"%s\", \"calls\": %ld, \"ns_per_call\": %.1f}\n", OPS[idx].name, calls,
	       (double)spent / calls);
	return 0;
}
