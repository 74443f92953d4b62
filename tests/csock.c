/* Socket calls as C programs make them, for tests/test_transparency.py.
 *
 *   csock client HOST PORT N SIZE    N connections one after another: write SIZE bytes,
 *                                    read the echo with blocking read() (no timeout);
 *                                    prints ok=N eagain=E errors=X
 *   csock splice-server HOST PORT    accept one connection, splice() it into a pipe until
 *                                    EOF; prints bytes=B <sha256 hex>  - (sha256sum
 *                                    reading the spliced bytes from the far end)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static int dial(const char *host, int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0 || inet_pton(AF_INET, host, &a.sin_addr) != 1 ||
	    connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		perror("connect");
		exit(2);
	}
	return fd;
}

static int client(const char *host, int port, int n, int size)
{
	char *buf = malloc(size), *in = malloc(size);
	int ok = 0, eagain = 0, errors = 0;

	memset(buf, 'c', size);
	for (int i = 0; i < n; i++) {
		int fd = dial(host, port), got = 0;

		if (write(fd, buf, size) != size) {
			errors++;
			close(fd);
			continue;
		}
		while (got < size) {
			ssize_t r = read(fd, in + got, size - got);
			if (r > 0) {
				got += r;
				continue;
			}
			if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
				eagain++;
			else
				errors++;
			break;
		}
		if (got == size && memcmp(buf, in, size) == 0)
			ok++;
		close(fd);
	}
	printf("ok=%d eagain=%d errors=%d\n", ok, eagain, errors);
	return 0;
}

static int splice_server(const char *host, int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	int one = 1, lfd = socket(AF_INET, SOCK_STREAM, 0), p[2], fd;
	long long total = 0;
	pid_t hasher;
	int h[2];

	inet_pton(AF_INET, host, &a.sin_addr);
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lfd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(lfd, 1) < 0) {
		perror("listen");
		return 2;
	}
	fd = accept(lfd, NULL, NULL);
	if (fd < 0 || pipe(p) < 0 || pipe(h) < 0)
		return 2;
	hasher = fork();
	if (hasher == 0) {
		dup2(h[0], 0);
		close(h[1]);
		execlp("sha256sum", "sha256sum", (char *)NULL);
		_exit(127);
	}
	close(h[0]);
	for (;;) {
		ssize_t n = splice(fd, NULL, p[1], NULL, 65536, SPLICE_F_MOVE);
		if (n < 0) {
			perror("splice");
			return 2;
		}
		if (n == 0)
			break;
		total += n;
		while (n > 0) {
			ssize_t m = splice(p[0], NULL, h[1], NULL, n, SPLICE_F_MOVE);
			if (m <= 0)
				return 2;
			n -= m;
		}
	}
	close(h[1]);
	printf("bytes=%lld ", total); /* then sha256sum's "<hex>  -" */
	fflush(stdout);
	waitpid(hasher, NULL, 0);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 6 && !strcmp(argv[1], "client"))
		return client(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
	if (argc == 4 && !strcmp(argv[1], "splice-server"))
		return splice_server(argv[2], atoi(argv[3]));
	fprintf(stderr, "usage: csock client HOST PORT N SIZE | csock splice-server HOST PORT\n");
	return 2;
}
