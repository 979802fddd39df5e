/* putlat: Redis alone, offered a fixed rate of script calls; the latency of each call.
 *
 * The latency target (issue #3: p99 store->ack <= 5 ms at 20 000 msg/s) covers receiptd and
 * Redis together. This asks what Redis alone gives at that rate: every millisecond it sends one
 * call carrying rate/1000 puts, as receiptd sends the puts one loop turn gathered when loadgen
 * offers them a millisecond's worth at a time, over one connection, never waiting for earlier
 * answers (open loop: a slow answer does not slow the offer, as a client's messages would not
 * wait either). The call is given after "--" as the words of the command, for rate/1000 puts;
 * every "__rand_int__" in it becomes a number below 1000 written with 12 digits, drawn anew for
 * each word of each call (as redis-benchmark -r 1000 does).
 *
 * Prints one line: puts=, calls=, seconds=, rate= (puts answered per second), p50_ms=, p99_ms=,
 * p999_ms= over the puts after the warm-up (each put of a call waited as long as its call, from
 * when the call left), late_p99_ms= (how late after its due time a call left: this generator's
 * own lag), errors= (error replies), cpu= (its own). --dump FILE writes "index sent_us latency_us"
 * per put as loadgen's --dump does, to tell the puts sent while Redis rewrote its AOF from the
 * others.
 *
 * --every-ms E sends a call every E ms instead, carrying E ms of puts: what Redis would spend,
 * and the puts wait, if receiptd held puts for E - 1 more milliseconds to send fewer, larger
 * calls (the wait counts from when each put's millisecond was due).
 *
 * usage: putlat --port P --rate PUTS_PER_S --seconds S [--warmup-seconds W] [--every-ms E]
 *               [--dump FILE] -- WORD...
 */
#include <errno.h>
#include <getopt.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "measure.h"

#define RAND_MARK "__rand_int__"

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The call's words with every mark replaced: one buffer for all of them, rebuilt per call. */
typedef struct call_tpl {
    int argc;
    char **words;
    const char **argv;
    size_t *lens;
    char *buf;
    size_t cap;
} call_tpl_t;

static int tpl_fill(call_tpl_t *t)
{
    size_t at = 0, mark = strlen(RAND_MARK);
    for (int i = 0; i < t->argc; i++) {
        size_t need = at + strlen(t->words[i]) + 1;
        if (need > t->cap) {
            /* Marks only shrink a word (12 digits for 12 characters), so its own length is
             * always enough. */
            size_t cap = need * 2;
            char *nb = realloc(t->buf, cap);
            if (!nb)
                return -1;
            t->buf = nb;
            t->cap = cap;
        }
        char *out = t->buf + at;
        size_t k = 0;
        const char *s = t->words[i];
        for (const char *m; (m = strstr(s, RAND_MARK)) != NULL; s = m + mark) {
            memcpy(out + k, s, (size_t)(m - s));
            k += (size_t)(m - s);
            k += (size_t)snprintf(out + k, 13, "%012d", rand() % 1000);
        }
        size_t rest = strlen(s);
        memcpy(out + k, s, rest + 1);
        k += rest;
        t->lens[i] = k;
        at += k + 1;
    }
    /* Pointers only after the buffer stopped moving. */
    at = 0;
    for (int i = 0; i < t->argc; i++) {
        t->argv[i] = t->buf + at;
        at += t->lens[i] + 1;
    }
    return 0;
}

/* The call in RESP. Written here rather than with redisFormatCommandArgv, which formats each
 * word's length with sprintf: a third of this generator's CPU for calls of a few hundred words. */
static size_t resp_size(const call_tpl_t *t)
{
    size_t n = 16;
    for (int i = 0; i < t->argc; i++)
        n += t->lens[i] + 24;
    return n;
}

static size_t put_num(char *out, char lead, size_t v)
{
    char tmp[24];
    size_t k = 0;
    do {
        tmp[k++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    out[0] = lead;
    for (size_t i = 0; i < k; i++)
        out[1 + i] = tmp[k - 1 - i];
    out[1 + k] = '\r';
    out[2 + k] = '\n';
    return k + 3;
}

static size_t resp_write(const call_tpl_t *t, char *out)
{
    size_t at = put_num(out, '*', (size_t)t->argc);
    for (int i = 0; i < t->argc; i++) {
        at += put_num(out + at, '$', t->lens[i]);
        memcpy(out + at, t->argv[i], t->lens[i]);
        at += t->lens[i];
        out[at++] = '\r';
        out[at++] = '\n';
    }
    return at;
}

/* Hands the kernel what it takes of the unsent calls now. */
static void send_some(int fd, const char *out, size_t len, size_t *at)
{
    if (*at < len) {
        ssize_t w = send(fd, out + *at, len - *at, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w > 0)
            *at += (size_t)w;
    }
}

static int connect_redis(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        perror("putlat: connect");
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static void usage(void)
{
    fprintf(stderr, "usage: putlat --port P --rate PUTS_PER_S --seconds S [--warmup-seconds W] "
                    "[--every-ms E] [--dump FILE] -- WORD...\n");
    exit(2);
}

int main(int argc, char **argv)
{
    int port = 0;
    long rate = 0;
    double seconds = 0, warm_s = 0;
    const char *dump = NULL;
    int every_ms = 1;
    static const struct option opts[] = {{"port", required_argument, NULL, 'p'},
                                         {"rate", required_argument, NULL, 'r'},
                                         {"seconds", required_argument, NULL, 's'},
                                         {"warmup-seconds", required_argument, NULL, 'w'},
                                         {"dump", required_argument, NULL, 'D'},
                                         {"every-ms", required_argument, NULL, 'e'},
                                         {NULL, 0, NULL, 0}};
    for (int c; (c = getopt_long(argc, argv, "", opts, NULL)) != -1;) {
        if (c == 'p')
            port = atoi(optarg);
        else if (c == 'r')
            rate = atol(optarg);
        else if (c == 's')
            seconds = atof(optarg);
        else if (c == 'w')
            warm_s = atof(optarg);
        else if (c == 'D')
            dump = optarg;
        else if (c == 'e')
            every_ms = atoi(optarg);
        else
            usage();
    }
    /* Whole puts every call, and at least one measured call. */
    if (!port || every_ms < 1 || rate * every_ms < 1000 || rate * every_ms % 1000 != 0 ||
        seconds * 1000.0 < every_ms || warm_s < 0 || optind >= argc)
        usage();

    call_tpl_t t = {.argc = argc - optind, .words = argv + optind};
    t.argv = calloc((size_t)t.argc, sizeof *t.argv);
    t.lens = calloc((size_t)t.argc, sizeof *t.lens);
    long per_call = rate * every_ms / 1000;
    uint64_t period = (uint64_t)every_ms * 1000000u;
    size_t calls = (size_t)((seconds + warm_s) * 1000.0) / (size_t)every_ms;
    size_t warm_calls = (size_t)(warm_s * 1000.0) / (size_t)every_ms;
    /* Per call: when it was due, when it left, how long its answer took from then. */
    uint64_t *due = calloc(calls, sizeof *due), *sent = calloc(calls, sizeof *sent);
    uint64_t *lat = calloc(calls, sizeof *lat);
    char *out = NULL;
    size_t out_len = 0, out_at = 0, out_cap = 0;
    redisReader *rd = redisReaderCreate();
    int fd = connect_redis(port);
    if (!t.argv || !t.lens || !due || !sent || !lat || !rd || fd < 0)
        return 1;

    size_t nsent = 0, nanswered = 0, errors = 0;
    uint64_t start = now_ns(), measure_ns = 0, end_ns = 0;
    while (nanswered < calls) {
        uint64_t now = now_ns();
        /* Every call that is due by now, timed from when it leaves, as loadgen times a message
         * from when it sent it; how late it left is reported apart (late_p99_ms), so that a
         * generator that falls behind says so. */
        while (nsent < calls && start + nsent * period <= now) {
            if (tpl_fill(&t) < 0)
                return 1;
            if (out_at > 0) {
                memmove(out, out + out_at, out_len - out_at);
                out_len -= out_at;
                out_at = 0;
            }
            size_t need = out_len + resp_size(&t);
            if (need > out_cap) {
                char *nb = realloc(out, need * 2);
                if (!nb)
                    return 1;
                out = nb;
                out_cap = need * 2;
            }
            out_len += resp_write(&t, out + out_len);
            due[nsent] = start + nsent * period;
            sent[nsent] = now_ns();
            if (nsent == warm_calls)
                measure_ns = sent[nsent];
            nsent++;
            send_some(fd, out, out_len, &out_at);
        }
        /* Wake exactly when the next call is due (poll's milliseconds would make each call up
         * to one late), or after a millisecond once all were sent. */
        struct timespec wait = {0, 1000000};
        if (nsent < calls) {
            uint64_t next = start + nsent * period, t2 = now_ns(), left = next > t2 ? next - t2 : 0;
            wait.tv_sec = (time_t)(left / 1000000000u);
            wait.tv_nsec = (long)(left % 1000000000u);
        }
        struct pollfd pfd = {.fd = fd, .events = POLLIN | (out_at < out_len ? POLLOUT : 0)};
        if (ppoll(&pfd, 1, &wait, NULL) < 0 && errno != EINTR)
            return 1;
        if (pfd.revents & POLLOUT)
            send_some(fd, out, out_len, &out_at);
        if (pfd.revents & (POLLIN | POLLHUP | POLLERR)) {
            char buf[65536];
            ssize_t r = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
            if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                fprintf(stderr, "putlat: Redis closed the connection\n");
                return 1;
            }
            if (r > 0 && redisReaderFeed(rd, buf, (size_t)r) != REDIS_OK)
                return 1;
            void *reply;
            while (redisReaderGetReply(rd, &reply) == REDIS_OK && reply) {
                uint64_t t2 = now_ns();
                if (((redisReply *)reply)->type == REDIS_REPLY_ERROR) {
                    if (errors++ == 0)
                        fprintf(stderr, "putlat: %s\n", ((redisReply *)reply)->str);
                }
                freeReplyObject(reply);
                lat[nanswered] = t2 - sent[nanswered];
                end_ns = t2;
                nanswered++;
            }
        }
    }

    /* Each put's own wait. With --every-ms E > 1 a call carries E one-millisecond bursts, as
     * if receiptd held the puts of E - 1 bursts to send them with the next: a put of burst b
     * (0 the oldest) arrived (E - 1 - b) ms before its call was due, and that hold counts. */
    size_t m = (calls - warm_calls) * (size_t)per_call;
    uint64_t *v = calloc(m ? m : 1, sizeof *v);
    uint64_t *late = calloc(calls, sizeof *late);
    FILE *f = dump ? fopen(dump, "w") : NULL;
    if (!v || !late || (dump && !f)) {
        perror("putlat: results");
        return 1;
    }
    for (size_t i = 0; i < calls; i++) {
        late[i] = sent[i] - due[i];
        for (long k = 0; k < per_call; k++) {
            uint64_t held = (uint64_t)(every_ms - 1 - k * every_ms / per_call) * 1000000u;
            uint64_t arrived = sent[i] - held, wait = lat[i] + held;
            size_t idx = i * (size_t)per_call + (size_t)k;
            if (f)
                fprintf(f, "%zu %" PRIu64 " %" PRIu64 "\n", idx, arrived / 1000, wait / 1000);
            if (i >= warm_calls)
                v[idx - warm_calls * (size_t)per_call] = wait;
        }
    }
    if (f)
        fclose(f);
    measure_sort(v, m);
    measure_sort(late + warm_calls, calls - warm_calls);
    double secs = (double)(end_ns - measure_ns) / 1e9;
    double cpu = measure_cpu_seconds();
    printf("puts=%zu calls=%zu seconds=%.3f rate=%.0f p50_ms=%.3f p99_ms=%.3f p999_ms=%.3f "
           "late_p99_ms=%.3f errors=%zu cpu=%.0f%%\n",
           m, calls - warm_calls, secs, (double)m / secs, measure_pct_ms(v, m, 0.5),
           measure_pct_ms(v, m, 0.99), measure_pct_ms(v, m, 0.999),
           measure_pct_ms(late + warm_calls, calls - warm_calls, 0.99), errors,
           100.0 * cpu / ((double)(end_ns - start) / 1e9));
    close(fd);
    redisReaderFree(rd);
    free(out);
    free(t.buf);
    free(t.argv);
    free(t.lens);
    free(due);
    free(sent);
    free(lat);
    free(late);
    free(v);
    return errors ? 1 : 0;
}
