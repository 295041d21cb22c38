/* Paced load for the reader benchmark: `load RATE SECONDS` (RATE 0 = as fast as
 * possible) makes 64-byte write() calls on a TCP loopback connection at RATE per
 * second for SECONDS, after a line on stdin. The peer is drained with one large
 * non-blocking read per 128 writes, so writes never block and reads are few.
 * Prints {"writes", "reads", "seconds"}. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

int main(int argc, char **argv)
{
	double rate = argc > 1 ? atof(argv[1]) : 0, seconds = argc > 2 ? atof(argv[2]) : 1;
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(a);
	static char msg[64], sink[1 << 20];
	char line[16];
	long writes = 0, reads = 0;

	int lst = socket(AF_INET, SOCK_STREAM, 0);
	if (lst < 0 || bind(lst, (void *)&a, sizeof(a)) || listen(lst, 1) || getsockname(lst, (void *)&a, &len))
		die("listen");
	int cli = socket(AF_INET, SOCK_STREAM, 0);
	if (cli < 0 || connect(cli, (void *)&a, sizeof(a)))
		die("connect");
	int srv = accept(lst, NULL, NULL);
	if (srv < 0)
		die("accept");
	if (!fgets(line, sizeof(line), stdin))
		return 1;

	double start = now_s(), end = start + seconds;
	for (;;) {
		double t = now_s();
		if (t >= end)
			break;
		/* writes due by now, in one batch (at most 256 so the drain keeps up) */
		long due = rate > 0 ? (long)((t - start) * rate) - writes : 256;
		if (due <= 0) {
			struct timespec nap = { 0, 20000 };
			nanosleep(&nap, NULL);
			continue;
		}
		if (due > 256)
			due = 256;
		for (long i = 0; i < due; i++, writes++) {
			if (write(cli, msg, sizeof(msg)) != sizeof(msg))
				die("write");
			if (writes % 128 == 127) /* 8 KiB queued: drain it in one read */
				while (recv(srv, sink, sizeof(sink), MSG_DONTWAIT) > 0)
					reads++;
		}
	}
	printf("{\"writes\": %ld, \"reads\": %ld, \"seconds\": %.3f}\n", writes, reads, now_s() - start);
	return 0;
}
