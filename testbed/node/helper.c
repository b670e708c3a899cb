/* The test images' only program (testbed/node/mkimage packs it): a static multi-call
 * binary, like busybox, whose applet is the name it runs as (/pause, /bin/echo, ...) or,
 * when run as "helper", each `;`-separated command of its arguments in turn:
 *   helper echo hi ; write /dev/termination-log boom ; exit 3
 * Applets:
 *   pause                 wait for SIGTERM/SIGINT (exit 0), reaping children (the sandbox)
 *   sleep SECONDS         sleep (fractions allowed); as PID 1 it ignores SIGTERM, like sleep
 *   echo WORD...          print the words and a newline on stdout
 *   write FILE WORD...    write the words and a newline to FILE (termination messages)
 *   cat FILE              print FILE
 *   exit CODE             exit with CODE
 *   alloc MIB             allocate and touch MIB MiB, 1 MiB at a time, reporting each 4 MiB;
 *                         then print "allocated" and exit 0 (past a memory limit: OOM kill)
 *   http HOST PORT [PATH] send `GET PATH HTTP/1.0` over plain TCP (HOST: IPv4 address),
 *                         print the answer; exit 0 if one came. To a TLS port (the API
 *                         server) the answer is Go's "Client sent an HTTP request to an
 *                         HTTPS server", proof enough that the port was reached.
 * Why not busybox: no image can be pulled here, and this builds from one file with gcc. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int term;
static void on_term(int sig) { (void)sig; term = 1; }
static void on_chld(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }

static int words(FILE *f, int argc, char **argv) {
  for (int i = 0; i < argc; i++) fprintf(f, "%s%s", i ? " " : "", argv[i]);
  fputc('\n', f);
  return fflush(f) ? 1 : 0;
}

static int run(int argc, char **argv) {
  const char *name = strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0];
  if (!strcmp(name, "pause")) {
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    signal(SIGCHLD, on_chld);
    while (!term) pause();
    return 0;
  }
  if (!strcmp(name, "sleep") && argc == 2) {
    double s = atof(argv[1]);
    struct timespec t = {(time_t)s, (long)((s - (time_t)s) * 1e9)};
    while (nanosleep(&t, &t) && errno == EINTR) {}
    return 0;
  }
  if (!strcmp(name, "echo")) return words(stdout, argc - 1, argv + 1);
  if (!strcmp(name, "write") && argc >= 2) {
    FILE *f = fopen(argv[1], "w");
    if (!f) { perror(argv[1]); return 1; }
    int rc = words(f, argc - 2, argv + 2);
    return fclose(f) ? 1 : rc;
  }
  if (!strcmp(name, "cat") && argc == 2) {
    char buf[4096];
    ssize_t n;
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) { perror(argv[1]); return 1; }
    while ((n = read(fd, buf, sizeof buf)) > 0) fwrite(buf, 1, (size_t)n, stdout);
    return close(fd) || n < 0;
  }
  if (!strcmp(name, "exit") && argc == 2) exit(atoi(argv[1]));
  if (!strcmp(name, "alloc") && argc == 2) {
    long mib = atol(argv[1]);
    for (long i = 1; i <= mib; i++) {
      char *p = malloc(1 << 20);
      if (!p) { fprintf(stderr, "malloc failed after %ld MiB\n", i - 1); return 1; }
      memset(p, (int)i, 1 << 20);
      if (i % 4 == 0) { printf("%ld MiB\n", i); fflush(stdout); }
    }
    printf("allocated %ld MiB\n", mib);
    return 0;
  }
  if (!strcmp(name, "http") && (argc == 3 || argc == 4)) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2]))};
    struct timeval tv = {10, 0};
    char buf[4096];
    ssize_t n, got = 0;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0 || inet_pton(AF_INET, argv[1], &a.sin_addr) != 1) { fprintf(stderr, "bad address\n"); return 2; }
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(s, (struct sockaddr *)&a, sizeof a)) { perror("connect"); return 1; }
    n = snprintf(buf, sizeof buf, "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n", argc == 4 ? argv[3] : "/", argv[1]);
    if (write(s, buf, (size_t)n) != n) { perror("write"); return 1; }
    while ((n = read(s, buf, sizeof buf)) > 0) { fwrite(buf, 1, (size_t)n, stdout); got += n; }
    putchar('\n');
    return got > 0 ? 0 : 1;
  }
  fprintf(stderr, "helper: unknown applet or arguments: %s\n", name);
  return 127;
}

int main(int argc, char **argv) {
  const char *name = strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0];
  if (strcmp(name, "helper")) return run(argc, argv);
  int rc = 0, start = 1;
  for (int i = 1; i <= argc; i++) {
    if (i < argc && strcmp(argv[i], ";")) continue;
    if (i > start) {
      argv[i < argc ? i : argc] = NULL;
      rc = run(i - start, argv + start);
    }
    start = i + 1;
  }
  return rc;
}
