/* accel-crr: connection rate the way netperf's TCP_CRR counts it (netperf is not in
 * Debian main): connect, send one request, read one response, close; one connection
 * at a time, for a fixed time. The server answers each request and waits for the
 * client's close, so the client closes first, as in TCP_CRR.
 *
 *   accel-crr server ADDR PORT [SIZE]
 *   accel-crr client ADDR PORT SECONDS [SIZE]
 *
 * The client prints one JSON object: connections, errors, seconds, conn_per_s and
 * percentiles of the per-connection time (connect to close). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SIZE 65536

static int parse_addr(const char *host, const char *port, struct sockaddr_storage *ss,
		      socklen_t *len)
{
	struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
	struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
	int p = atoi(port);

	memset(ss, 0, sizeof(*ss));
	if (p <= 0 || p > 65535)
		return -1;
	if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
		a4->sin_family = AF_INET;
		a4->sin_port = htons(p);
		*len = sizeof(*a4);
		return 0;
	}
	if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
		a6->sin6_family = AF_INET6;
		a6->sin6_port = htons(p);
		*len = sizeof(*a6);
		return 0;
	}
	return -1;
}

static int read_full(int fd, char *buf, size_t n)
{
	size_t got = 0;

	while (got < n) {
		ssize_t r = read(fd, buf + got, n - got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		got += (size_t)r;
	}
	return 0;
}

static int write_full(int fd, const char *buf, size_t n)
{
	size_t done = 0;

	while (done < n) {
		ssize_t w = write(fd, buf + done, n - done);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		done += (size_t)w;
	}
	return 0;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int serve(struct sockaddr_storage *ss, socklen_t len, size_t size)
{
	static char buf[MAX_SIZE];
	int one = 1;
	int lfd = socket(ss->ss_family, SOCK_STREAM, 0);

	if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
	    bind(lfd, (struct sockaddr *)ss, len) < 0 || listen(lfd, 4096) < 0) {
		perror("accel-crr server");
		return 1;
	}
	memset(buf, 'r', size);
	for (;;) {
		int fd = accept(lfd, NULL, NULL);

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			perror("accept");
			return 1;
		}
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		if (read_full(fd, buf, size) == 0 && write_full(fd, buf, size) == 0) {
			/* Wait for the client's close: it, not us, keeps the TIME_WAIT. */
			while (read(fd, buf, size) > 0)
				;
		}
		close(fd);
	}
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static double pct(const double *v, long n, double p)
{
	long i = (long)(p / 100.0 * (double)(n - 1) + 0.5);

	return n ? v[i] : 0.0;
}

static int client(struct sockaddr_storage *ss, socklen_t len, double seconds, size_t size)
{
	static char buf[MAX_SIZE];
	long cap = 1 << 20, n = 0, errors = 0, first_errno = 0;
	double *lat = malloc(sizeof(double) * cap);
	double start = now_s(), end = start + seconds, t;
	int one = 1;

	if (!lat)
		return 1;
	memset(buf, 'q', size);
	for (t = start; t < end; t = now_s()) {
		int fd = socket(ss->ss_family, SOCK_STREAM, 0);
		int ok;

		if (fd < 0) {
			perror("socket");
			return 1;
		}
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		ok = connect(fd, (struct sockaddr *)ss, len) == 0 && write_full(fd, buf, size) == 0 &&
		     read_full(fd, buf, size) == 0;
		if (!ok && !first_errno)
			first_errno = errno ? errno : EPIPE;
		close(fd);
		if (!ok) {
			errors++;
			continue;
		}
		if (n == cap) {
			double *more = realloc(lat, sizeof(double) * cap * 2);

			if (!more)
				return 1;
			lat = more;
			cap *= 2;
		}
		lat[n++] = (now_s() - t) * 1e6;
	}
	t = now_s() - start;
	qsort(lat, n, sizeof(double), cmp_double);
	printf("{\"connections\": %ld, \"errors\": %ld, \"first_error\": \"%s\", \"seconds\": %.6f, "
	       "\"conn_per_s\": %.1f, \"conn_p50_us\": %.3f, \"conn_p90_us\": %.3f, "
	       "\"conn_p99_us\": %.3f}\n",
	       n, errors, first_errno ? strerror((int)first_errno) : "", t, (double)n / t,
	       pct(lat, n, 50), pct(lat, n, 90), pct(lat, n, 99));
	return n ? 0 : 1;
}

int main(int argc, char **argv)
{
	struct sockaddr_storage ss;
	socklen_t len;
	size_t size = 64;

	signal(SIGPIPE, SIG_IGN);
	if (argc >= 4 && !strcmp(argv[1], "server")) {
		if (argc > 4)
			size = (size_t)atol(argv[4]);
		if (parse_addr(argv[2], argv[3], &ss, &len) || !size || size > MAX_SIZE)
			goto usage;
		return serve(&ss, len, size);
	}
	if (argc >= 5 && !strcmp(argv[1], "client")) {
		double seconds = atof(argv[4]);

		if (argc > 5)
			size = (size_t)atol(argv[5]);
		if (parse_addr(argv[2], argv[3], &ss, &len) || seconds <= 0 || !size || size > MAX_SIZE)
			goto usage;
		return client(&ss, len, seconds, size);
	}
usage:
	fprintf(stderr, "usage: accel-crr server ADDR PORT [SIZE]\n"
			"       accel-crr client ADDR PORT SECONDS [SIZE]\n");
	return 2;
}
