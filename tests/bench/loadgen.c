/* loadgen: plays the XMPP server for one receiptd and measures how fast it stores and acks.
 *
 * It listens on loopback as the XEP-0114 server, accepts receiptd's connection, checks its
 * handshake digest, then offers N receipt-requested messages (about 250-byte bodies) from S
 * senders to R offline recipients with at most W unacknowledged, and consumes the <stored/>
 * acks. At --rate 0 it runs at saturation; otherwise it offers that many messages per second.
 * Prints one line of key=value figures: rate, store->ack latency percentiles, its own CPU use
 * (so a generator that is the bottleneck says so).
 *
 * usage: loadgen --port P --secret S [-n N] [--senders S] [--recipients R] [--window W]
 *                [--rate MSGS_PER_S] [--domain C]
 */
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strophe.h>
#include <sys/resource.h>
#include <uv.h>

typedef struct gen {
    uv_loop_t *loop;
    uv_tcp_t server, conn;
    uv_timer_t pacer;
    const char *secret, *domain;
    long n, senders, recipients, window, rate;
    long sent, acked, in_flight;
    uint64_t *sent_at; /* ns, per message index */
    uint64_t *latency; /* ns, per acked message */
    uint64_t start_ns, end_ns;
    int phase; /* 0 header, 1 handshake, 2 running */
    char stream_id[64];
    char *in;
    size_t in_len, in_cap;
    char body[251];
    double credit;
    uint64_t last_pace;
} gen_t;

static void on_written(uv_write_t *w, int status)
{
    (void)status;
    free(w->data);
    free(w);
}

static void send_text(gen_t *g, const char *s, size_t len)
{
    uv_write_t *w = malloc(sizeof *w);
    char *copy = malloc(len);
    memcpy(copy, s, len);
    w->data = copy;
    uv_buf_t b = uv_buf_init(copy, (unsigned)len);
    uv_write(w, (uv_stream_t *)&g->conn, &b, 1, on_written);
}

/* Sends up to count messages, batched into one write. */
static void send_messages(gen_t *g, long count)
{
    static char buf[1 << 20];
    size_t off = 0;
    while (count-- > 0 && g->sent < g->n && g->in_flight < g->window &&
           off + 1024 < sizeof buf) {
        long i = g->sent++;
        g->in_flight++;
        g->sent_at[i] = uv_hrtime();
        off += (size_t)snprintf(buf + off, sizeof buf - off,
                                "<message from='s%ld@localhost/r' to='r%ld\\40localhost@%s' "
                                "id='g%ld' type='chat'><body>%s</body>"
                                "<request xmlns='urn:xmpp:receipts'/></message>",
                                i % g->senders, i % g->recipients, g->domain, i, g->body);
    }
    if (off)
        send_text(g, buf, off);
}

static void finish(gen_t *g)
{
    g->end_ns = uv_hrtime();
    uv_timer_stop(&g->pacer);
    uv_read_stop((uv_stream_t *)&g->conn);
    uv_stop(g->loop);
}

/* Scans complete stanzas for <stored id='gN'>: cheap, and enough for acks we generated. */
static void scan_acks(gen_t *g)
{
    char *p = g->in, *end = g->in + g->in_len;
    for (;;) {
        char *st = memmem(p, (size_t)(end - p), "<stored", 7);
        if (!st)
            break;
        char *close = memchr(st, '>', (size_t)(end - st));
        if (!close)
            break; /* incomplete: keep it for the next read */
        char *id = memmem(st, (size_t)(close - st), " id=", 4);
        if (id && id + 6 < close && id[5] == 'g') {
            long i = strtol(id + 6, NULL, 10);
            if (i >= 0 && i < g->n && g->sent_at[i]) {
                g->latency[g->acked++] = uv_hrtime() - g->sent_at[i];
                g->sent_at[i] = 0;
                g->in_flight--;
            }
        }
        p = close + 1;
    }
    /* Keep from the last unmatched '<stored' (or a short tail) for the next round. */
    size_t keep = (size_t)(end - p);
    if (keep > 16 && !memmem(p, keep, "<stored", 7))
        keep = 16;
    memmove(g->in, end - keep, keep);
    g->in_len = keep;
}

static void on_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b)
{
    gen_t *g = h->data;
    (void)sz;
    if (g->in_cap - g->in_len < 65536) {
        g->in_cap = g->in_cap * 2 + 65536;
        g->in = realloc(g->in, g->in_cap);
    }
    *b = uv_buf_init(g->in + g->in_len, (unsigned)(g->in_cap - g->in_len));
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
    gen_t *g = s->data;
    (void)b;
    if (n < 0) {
        fprintf(stderr, "loadgen: receiptd closed the connection after %ld acks\n", g->acked);
        finish(g);
        return;
    }
    g->in_len += (size_t)n;
    if (g->phase == 0 && memmem(g->in, g->in_len, "<stream:stream", 14)) {
        char hdr[256];
        snprintf(g->stream_id, sizeof g->stream_id, "lg%llu", (unsigned long long)uv_hrtime());
        int len = snprintf(hdr, sizeof hdr,
                           "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' "
                           "xmlns:stream='http://etherx.jabber.org/streams' id='%s' from='%s'>",
                           g->stream_id, g->domain);
        send_text(g, hdr, (size_t)len);
        g->phase = 1;
        g->in_len = 0;
        return;
    }
    if (g->phase == 1) {
        char *h = memmem(g->in, g->in_len, "</handshake>", 12);
        if (!h)
            return;
        char want[41];
        xmpp_ctx_t *ctx = xmpp_ctx_new(NULL, NULL);
        xmpp_sha1_t *sha = xmpp_sha1_new(ctx);
        xmpp_sha1_update(sha, (const unsigned char *)g->stream_id, strlen(g->stream_id));
        xmpp_sha1_update(sha, (const unsigned char *)g->secret, strlen(g->secret));
        xmpp_sha1_final(sha);
        xmpp_sha1_to_string(sha, want, sizeof want);
        xmpp_sha1_free(sha);
        xmpp_ctx_free(ctx);
        if (h - g->in < 40 || memcmp(h - 40, want, 40) != 0) {
            fprintf(stderr, "loadgen: bad handshake digest\n");
            exit(2);
        }
        send_text(g, "<handshake/>", 12);
        g->phase = 2;
        g->in_len = 0;
        g->start_ns = uv_hrtime();
        g->last_pace = g->start_ns;
        if (g->rate == 0)
            send_messages(g, g->window);
        return;
    }
    scan_acks(g);
    if (g->acked >= g->n) {
        finish(g);
        return;
    }
    if (g->rate == 0)
        send_messages(g, g->window - g->in_flight);
}

static void on_pace(uv_timer_t *t)
{
    gen_t *g = t->data;
    if (g->phase != 2)
        return;
    uint64_t now = uv_hrtime();
    g->credit += (double)(now - g->last_pace) * (double)g->rate / 1e9;
    g->last_pace = now;
    long due = (long)g->credit;
    if (due > 0) {
        g->credit -= (double)due;
        send_messages(g, due);
    }
}

static void on_connection(uv_stream_t *server, int status)
{
    gen_t *g = server->data;
    if (status < 0)
        return;
    uv_tcp_init(g->loop, &g->conn);
    g->conn.data = g;
    if (uv_accept(server, (uv_stream_t *)&g->conn) == 0) {
        uv_tcp_nodelay(&g->conn, 1);
        uv_read_start((uv_stream_t *)&g->conn, on_alloc, on_read);
    }
    uv_close((uv_handle_t *)&g->server, NULL); /* one receiptd only */
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(const uint64_t *v, long n, double p)
{
    if (n == 0)
        return 0;
    long i = (long)(p * (double)(n - 1));
    return (double)v[i] / 1e6;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"port", required_argument, NULL, 'p'},     {"secret", required_argument, NULL, 's'},
        {"senders", required_argument, NULL, 'S'},  {"recipients", required_argument, NULL, 'R'},
        {"window", required_argument, NULL, 'w'},   {"rate", required_argument, NULL, 'r'},
        {"domain", required_argument, NULL, 'd'},   {NULL, 0, NULL, 0},
    };
    gen_t g = {.secret = "bench", .domain = "receipts.localhost", .n = 200000, .senders = 100,
               .recipients = 1000, .window = 2000};
    int port = 0, opt;
    while ((opt = getopt_long(argc, argv, "n:", opts, NULL)) != -1) {
        switch (opt) {
        case 'p': port = atoi(optarg); break;
        case 's': g.secret = optarg; break;
        case 'n': g.n = atol(optarg); break;
        case 'S': g.senders = atol(optarg); break;
        case 'R': g.recipients = atol(optarg); break;
        case 'w': g.window = atol(optarg); break;
        case 'r': g.rate = atol(optarg); break;
        case 'd': g.domain = optarg; break;
        default: fprintf(stderr, "usage: see the comment at the top of loadgen.c\n"); return 2;
        }
    }
    memset(g.body, 'x', 250);
    g.sent_at = calloc((size_t)g.n, sizeof *g.sent_at);
    g.latency = calloc((size_t)g.n, sizeof *g.latency);
    g.loop = uv_default_loop();
    uv_tcp_init(g.loop, &g.server);
    g.server.data = &g;
    struct sockaddr_in addr;
    uv_ip4_addr("127.0.0.1", port, &addr);
    if (uv_tcp_bind(&g.server, (const struct sockaddr *)&addr, 0) ||
        uv_listen((uv_stream_t *)&g.server, 4, on_connection)) {
        fprintf(stderr, "loadgen: cannot listen on port %d\n", port);
        return 2;
    }
    uv_timer_init(g.loop, &g.pacer);
    g.pacer.data = &g;
    if (g.rate)
        uv_timer_start(&g.pacer, on_pace, 1, 1);
    printf("ready\n");
    fflush(stdout);
    uv_run(g.loop, UV_RUN_DEFAULT);

    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double secs = (double)(g.end_ns - g.start_ns) / 1e9;
    double cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
                 (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    qsort(g.latency, (size_t)g.acked, sizeof *g.latency, cmp_u64);
    printf("acked=%ld seconds=%.3f rate=%.0f p50_ms=%.3f p99_ms=%.3f p999_ms=%.3f gen_cpu=%.0f%%\n",
           g.acked, secs, (double)g.acked / secs, pct(g.latency, g.acked, 0.50),
           pct(g.latency, g.acked, 0.99), pct(g.latency, g.acked, 0.999),
           100.0 * cpu / (secs > 0 ? secs : 1));
    return g.acked == g.n ? 0 : 1;
}
