/* One measured OpenSSL call in a loop: `tls_loop ssl_write|ssl_read CALLS`.
 *
 * syscall_loop.c's twin for the TLS uprobes. Sets up a TLS 1.3 connection over TCP
 * loopback inside this process (both ends: a client and a server SSL, a self-signed
 * certificate made in memory), waits for a line on stdin (so the benchmark can start
 * tracing this pid first), then makes CALLS calls of SSL_write or SSL_read on the client,
 * each moving 128 bytes of plaintext (one TLS record each), and prints {"syscall",
 * "calls", "ns_per_call"}. Only the measured calls are timed: the server end's draining
 * (for writes) or filling (for reads) happens between timed batches. Each measured call
 * makes its socket syscalls too (one write; a read of the record header and one of its
 * body, OpenSSL without read-ahead), as it would in any program. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MSG 128
#define BATCH 64

static char buf[MSG];
static char bulk[MSG * BATCH];

static void die(const char *what)
{
	fprintf(stderr, "%s failed\n", what);
	ERR_print_errors_fp(stderr);
	exit(1);
}

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

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
	setsockopt(*srv, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	close(lst);
}

/* A P-256 key and a self-signed certificate for it, for the server end. */
static void server_identity(SSL_CTX *ctx)
{
	EVP_PKEY *key = EVP_EC_gen("P-256");
	X509 *cert = X509_new();

	if (!key || !cert)
		die("key");
	ASN1_INTEGER_set(X509_get_serialNumber(cert), 1);
	X509_gmtime_adj(X509_getm_notBefore(cert), 0);
	X509_gmtime_adj(X509_getm_notAfter(cert), 86400);
	X509_NAME_add_entry_by_txt(X509_get_subject_name(cert), "CN", MBSTRING_ASC, (unsigned char *)"localhost", -1,
				   -1, 0);
	X509_set_issuer_name(cert, X509_get_subject_name(cert));
	if (!X509_set_pubkey(cert, key) || !X509_sign(cert, key, EVP_sha256()) || !SSL_CTX_use_certificate(ctx, cert) ||
	    !SSL_CTX_use_PrivateKey(ctx, key))
		die("certificate");
	X509_free(cert);
	EVP_PKEY_free(key);
}

static void set_blocking(int fd, int blocking)
{
	int fl = fcntl(fd, F_GETFL);
	fcntl(fd, F_SETFL, blocking ? fl & ~O_NONBLOCK : fl | O_NONBLOCK);
}

/* Both ends' handshakes in one thread: non-blocking, each stepped until both are done. */
static void handshake(SSL *c, SSL *s, int cfd, int sfd)
{
	int cdone = 0, sdone = 0;

	set_blocking(cfd, 0);
	set_blocking(sfd, 0);
	for (int i = 0; !(cdone && sdone); i++) {
		if (i > 100000)
			die("handshake (no progress)");
		if (!cdone) {
			int r = SSL_do_handshake(c);
			int e = SSL_get_error(c, r);
			if (r == 1)
				cdone = 1;
			else if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
				die("client handshake");
		}
		if (!sdone) {
			int r = SSL_do_handshake(s);
			int e = SSL_get_error(s, r);
			if (r == 1)
				sdone = 1;
			else if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
				die("server handshake");
		}
	}
	set_blocking(cfd, 1);
	set_blocking(sfd, 1);
}

static void check(int n)
{
	if (n != MSG) {
		fprintf(stderr, "moved %d bytes, expected %d\n", n, MSG);
		ERR_print_errors_fp(stderr);
		exit(1);
	}
}

/* Read n plaintext bytes at `s` (not timed). */
static void drain(SSL *s, size_t n)
{
	for (size_t done = 0; done < n;) {
		int k = SSL_read(s, bulk, sizeof(bulk));
		if (k <= 0)
			die("drain");
		done += k;
	}
}

/* `count` records of MSG bytes from `from`, then wait until all their ciphertext is queued
 * at `to`'s socket, so that no measured read blocks (not timed). */
static void fill(SSL *from, SSL *to, int to_fd, int count)
{
	for (int i = 0; i < count; i++)
		check(SSL_write(from, buf, MSG));
	long want = (long)(BIO_number_written(SSL_get_wbio(from)) - BIO_number_read(SSL_get_rbio(to)));
	for (int queued = 0; queued < want;)
		if (ioctl(to_fd, FIONREAD, &queued))
			die("FIONREAD");
}

int main(int argc, char **argv)
{
	int cfd, sfd, reading;
	long calls = argc > 2 ? atol(argv[2]) : 100000;
	char line[16];

	if (argc < 2 || (strcmp(argv[1], "ssl_write") && strcmp(argv[1], "ssl_read"))) {
		fprintf(stderr, "usage: %s ssl_write|ssl_read [CALLS]\n", argv[0]);
		return 2;
	}
	reading = !strcmp(argv[1], "ssl_read");
	memset(buf, 'x', sizeof(buf));

	SSL_CTX *sctx = SSL_CTX_new(TLS_server_method()), *cctx = SSL_CTX_new(TLS_client_method());
	if (!sctx || !cctx)
		die("SSL_CTX_new");
	server_identity(sctx);
	SSL_CTX_set_num_tickets(sctx, 0); /* no session tickets after the handshake: nothing else in flight */
	SSL_CTX_set_verify(cctx, SSL_VERIFY_NONE, NULL);
	tcp_pair(&cfd, &sfd);
	SSL *c = SSL_new(cctx), *s = SSL_new(sctx);
	if (!c || !s || !SSL_set_fd(c, cfd) || !SSL_set_fd(s, sfd))
		die("SSL_new");
	SSL_set_connect_state(c);
	SSL_set_accept_state(s);
	handshake(c, s, cfd, sfd);

	if (!fgets(line, sizeof(line), stdin))
		return 1;

	long long spent = 0;
	long done = 0;
	while (done < calls) {
		int n = calls - done < BATCH ? calls - done : BATCH;
		if (reading)
			fill(s, c, cfd, n);
		long long t0 = now_ns();
		if (reading)
			for (int i = 0; i < n; i++)
				check(SSL_read(c, buf, MSG));
		else
			for (int i = 0; i < n; i++)
				check(SSL_write(c, buf, MSG));
		spent += now_ns() - t0;
		if (!reading)
			drain(s, (size_t)n * MSG);
		done += n;
	}
	printf("{\"syscall\": \"%s\", \"calls\": %ld, \"ns_per_call\": %.1f, \"protocol\": \"%s\", \"cipher\": \"%s\"}\n",
	       argv[1], calls, calls ? (double)spent / calls : 0.0, SSL_get_version(c), SSL_get_cipher_name(c));
	return 0;
}
