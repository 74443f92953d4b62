/* connlat: new-connection latency, one connection at a time (accel bench connect).
 *
 *   connlat server PORT [PORT...]        echo one byte per connection on each port
 *   connlat client ADDR PORT COUNT WARMUP
 *
 * The client times connect() + a 1-byte request + the 1-byte answer + close(), COUNT times
 * after WARMUP untimed ones, and prints "errors N" then one line per connection: the time in
 * nanoseconds. The server answers each byte, waits for the client's close (so the client
 * closes first, as a client of a service does) and serves one connection at a time: the
 * client never has more than one in flight. IPv4 only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PORTS 64

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int serve(int argc, char **argv)
{
	struct pollfd fds[MAX_PORTS];
	int n = 0;

	for (int i = 0; i < argc && n < MAX_PORTS; i++) {
		struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[i]))};
		int one = 1;
		int fd = socket(AF_INET, SOCK_STREAM, 0);

		if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
		    bind(fd, (struct sockaddr *)&a, sizeof(a)) || listen(fd, 4096)) {
			perror("connlat server: listen");
			return 1;
		}
		fds[n].fd = fd;
		fds[n].events = POLLIN;
		n++;
	}
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		if (poll(fds, n, -1) < 0) {
			if (errno == EINTR)
				continue;
			perror("connlat server: poll");
			return 1;
		}
		for (int i = 0; i < n; i++) {
			char c, rest[64];
			int one = 1;
			int conn;

			if (!(fds[i].revents & POLLIN))
				continue;
			conn = accept(fds[i].fd, NULL, NULL);
			if (conn < 0)
				continue;
			setsockopt(conn, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
			if (read(conn, &c, 1) == 1 && write(conn, &c, 1) == 1)
				while (read(conn, rest, sizeof(rest)) > 0)
					;
			close(conn);
		}
	}
}

static int one_connection(const struct sockaddr_in *to)
{
	char c = 'x';
	int one = 1;
	int ok = -1;
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0)
		return -1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, (const struct sockaddr *)to, sizeof(*to)) == 0 && write(fd, &c, 1) == 1 &&
	    read(fd, &c, 1) == 1)
		ok = 0;
	close(fd);
	return ok;
}

static int client(char **argv)
{
	struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
	long count = atol(argv[2]), warmup = atol(argv[3]), errors = 0;
	long long *ns;

	if (inet_pton(AF_INET, argv[0], &to.sin_addr) != 1 || count < 1 || warmup < 0) {
		fprintf(stderr, "connlat client: bad arguments\n");
		return 2;
	}
	ns = calloc(count, sizeof(*ns));
	if (!ns)
		return 1;
	for (long i = 0; i < warmup; i++)
		errors += one_connection(&to) != 0;
	errors = 0;
	for (long i = 0; i < count; i++) {
		long long t0 = now_ns();

		if (one_connection(&to) != 0)
			errors++;
		ns[i] = now_ns() - t0;
	}
	printf("errors %ld\n", errors);
	for (long i = 0; i < count; i++)
		printf("%lld\n", ns[i]);
	free(ns);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 3 && !strcmp(argv[1], "server"))
		return serve(argc - 2, argv + 2);
	if (argc == 6 && !strcmp(argv[1], "client"))
		return client(argv + 2);
	fprintf(stderr, "usage: connlat server PORT...| connlat client ADDR PORT COUNT WARMUP\n");
	return 2;
}
