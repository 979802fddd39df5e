/* loadgen: plays the XMPP server for one receiptd and measures how fast it stores and acks.
 *
 * It listens on loopback as the XEP-0114 server, accepts receiptd's connection, checks its
 * handshake digest, then offers N receipt-requested messages (about 250-byte bodies) from S
 * senders to R offline recipients with at most W unacknowledged, and consumes the <stored/>
 * acks. At --rate 0 it runs at saturation; otherwise it offers that many messages per second.
 * Prints one line of key=value figures: rate, store->ack latency percentiles, its own CPU use
 * (so a generator that is the bottleneck says so).
 *
 * With --fetch it then plays recipient r0@localhost (use --recipients 1 so that all N messages are
 * in that one queue) and retrieves the queue as a client would (fetcher.h): prints the store line
 * prefixed "queued", then with --pause waits for a line on stdin (so the caller can measure
 * receiptd between the phases), retrieves, and prints a "retrieved" line. Acking relays a receipt
 * to each sender: into the sender's offline queue (a Redis write each), or, with
 * --senders-online (directed presence from every sender before the retrieval), pushed to
 * loadgen, which counts them.
 *
 * usage: loadgen --port P --secret S [-n N] [--senders S] [--recipients R] [--window W]
 *                [--rate MSGS_PER_S] [--domain C] [--fetch [--batch B] [--max-acks A] [--pause]
 * [--senders-online]]
 */
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strophe.h>
#include <sys/resource.h>
#include <uv.h>

#include "fetcher.h"
#include "xmlin.h"

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
    int phase; /* 0 header, 1 handshake, 2 storing, 3 waiting for go, 4 retrieving */
    char stream_id[64];
    char *in;
    size_t in_len, in_cap;
    char body[251];
    double credit;
    uint64_t last_pace;
    /* retrieval (--fetch) */
    bool fetch, pause, synced, senders_online;
    long receipts;
    int batch, max_acks;
    uv_pipe_t stdin_pipe;
    char stdin_buf[64];
    xmlin_t *xml;
    fetcher_t f;
    double cpu_at_go;
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
    while (count-- > 0 && g->sent < g->n && g->in_flight < g->window && off + 1024 < sizeof buf) {
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
    if (g->phase <= 2)
        g->end_ns = uv_hrtime();
    uv_timer_stop(&g->pacer);
    uv_read_stop((uv_stream_t *)&g->conn);
    uv_stop(g->loop);
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
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

static void print_store(gen_t *g, const char *prefix)
{
    double secs = (double)(g->end_ns - g->start_ns) / 1e9;
    qsort(g->latency, (size_t)g->acked, sizeof *g->latency, cmp_u64);
    printf("%sacked=%ld seconds=%.3f rate=%.0f p50_ms=%.3f p99_ms=%.3f p999_ms=%.3f "
           "gen_cpu=%.0f%%\n",
           prefix, g->acked, secs, (double)g->acked / secs, pct(g->latency, g->acked, 0.50),
           pct(g->latency, g->acked, 0.99), pct(g->latency, g->acked, 0.999),
           100.0 * cpu_seconds() / (secs > 0 ? secs : 1));
    fflush(stdout);
}

/* ---- retrieval (--fetch) ------------------------------------------------------------------ */

static void fetch_send(void *ud, const char *data, size_t len)
{
    send_text(ud, data, len);
}

static void xml_start(void *ud, int depth, const char *name, const char **attrs)
{
    gen_t *g = ud;
    if (depth == 2 && strcmp(name, "received") == 0)
        g->receipts++;
    fetcher_on_start(&g->f, depth, name, attrs);
}

static void xml_end(void *ud, int depth, const char *name)
{
    fetcher_on_end(&((gen_t *)ud)->f, depth, name);
}

static void start_retrieval(gen_t *g)
{
    g->phase = 4;
    g->cpu_at_go = cpu_seconds();
    g->f = (fetcher_t){.send = fetch_send,
                       .ud = g,
                       .to = g->domain,
                       .from = "r0@localhost/bench",
                       .max = g->batch,
                       .max_acks = g->max_acks};
    g->xml = xmlin_new(xml_start, xml_end, g);
    for (long i = 0; g->senders_online && i < g->senders; i++) {
        char p[256];
        int len =
            snprintf(p, sizeof p, "<presence from='s%ld@localhost/r' to='%s'/>", i, g->domain);
        send_text(g, p, (size_t)len);
    }
    fetcher_start(&g->f);
}

/* The stream is mid-document: what is left of the store phase is the tail of the last <stored/>
 * message, and receiptd sends nothing else unasked, so parsing starts at the first <iq (the
 * summary answer) under a stand-in root element. */
static void retrieval_input(gen_t *g)
{
    size_t from = 0;
    if (!g->synced) {
        char *iq = memmem(g->in, g->in_len, "<iq", 3);
        if (!iq) {
            size_t keep = g->in_len < 2 ? g->in_len : 2;
            memmove(g->in, g->in + g->in_len - keep, keep);
            g->in_len = keep;
            return;
        }
        from = (size_t)(iq - g->in);
        g->synced = true;
        xmlin_feed(g->xml, "<r>", 3);
    }
    if (xmlin_feed(g->xml, g->in + from, g->in_len - from) < 0)
        g->f.errors++, g->f.done = true;
    g->in_len = 0;
    if (g->f.done)
        finish(g);
}

static void on_stdin_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b)
{
    gen_t *g = h->data;
    (void)sz;
    *b = uv_buf_init(g->stdin_buf, sizeof g->stdin_buf);
}

static void on_stdin(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
    gen_t *g = s->data;
    (void)b;
    if (n == 0)
        return;
    uv_read_stop(s);
    uv_close((uv_handle_t *)s, NULL);
    if (g->phase == 3)
        start_retrieval(g);
}

static void stored_all(gen_t *g)
{
    g->end_ns = uv_hrtime();
    if (!g->fetch) {
        finish(g);
        return;
    }
    print_store(g, "queued ");
    g->phase = 3;
    if (!g->pause) {
        start_retrieval(g);
        return;
    }
    uv_pipe_init(g->loop, &g->stdin_pipe, 0);
    g->stdin_pipe.data = g;
    if (uv_pipe_open(&g->stdin_pipe, 0) ||
        uv_read_start((uv_stream_t *)&g->stdin_pipe, on_stdin_alloc, on_stdin)) {
        fprintf(stderr, "loadgen: --pause needs stdin to be a pipe\n");
        exit(2);
    }
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
    if (g->phase >= 3) {
        if (g->phase == 4)
            retrieval_input(g);
        return;
    }
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
        stored_all(g);
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

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"port", required_argument, NULL, 'p'},
        {"secret", required_argument, NULL, 's'},
        {"senders", required_argument, NULL, 'S'},
        {"recipients", required_argument, NULL, 'R'},
        {"window", required_argument, NULL, 'w'},
        {"rate", required_argument, NULL, 'r'},
        {"domain", required_argument, NULL, 'd'},
        {"fetch", no_argument, NULL, 'F'},
        {"batch", required_argument, NULL, 'b'},
        {"max-acks", required_argument, NULL, 'A'},
        {"pause", no_argument, NULL, 'P'},
        {"senders-online", no_argument, NULL, 'O'},
        {NULL, 0, NULL, 0},
    };
    gen_t g = {.secret = "bench",
               .domain = "receipts.localhost",
               .n = 200000,
               .senders = 100,
               .recipients = 1000,
               .window = 2000,
               .batch = 100,
               .max_acks = 4};
    int port = 0, opt;
    while ((opt = getopt_long(argc, argv, "n:", opts, NULL)) != -1) {
        switch (opt) {
        case 'p':
            port = atoi(optarg);
            break;
        case 's':
            g.secret = optarg;
            break;
        case 'n':
            g.n = atol(optarg);
            break;
        case 'S':
            g.senders = atol(optarg);
            break;
        case 'R':
            g.recipients = atol(optarg);
            break;
        case 'w':
            g.window = atol(optarg);
            break;
        case 'r':
            g.rate = atol(optarg);
            break;
        case 'd':
            g.domain = optarg;
            break;
        case 'F':
            g.fetch = true;
            break;
        case 'b':
            g.batch = atoi(optarg);
            break;
        case 'A':
            g.max_acks = atoi(optarg);
            break;
        case 'P':
            g.pause = true;
            break;
        case 'O':
            g.senders_online = true;
            break;
        default:
            fprintf(stderr, "usage: see the comment at the top of loadgen.c\n");
            return 2;
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

    if (!g.fetch || g.phase <= 2) {
        print_store(&g, g.fetch ? "queued " : "");
        return g.acked == g.n && !g.fetch ? 0 : 1;
    }
    fetcher_t *f = &g.f;
    uint64_t end = f->end_ns ? f->end_ns : fetcher_now_ns();
    double secs = (double)(end - f->start_ns) / 1e9;
    printf("retrieved items=%ld queued=%ld left=%ld batches=%ld errors=%ld receipts=%ld "
           "seconds=%.3f rate=%.0f gen_cpu=%.0f%%\n",
           f->items, f->queued, f->left, f->batches, f->errors, g.receipts, secs,
           (double)f->items / (secs > 0 ? secs : 1),
           100.0 * (cpu_seconds() - g.cpu_at_go) / (secs > 0 ? secs : 1));
    bool ok = f->done && !f->errors && f->items == g.n && f->left == 0;
    fetcher_free(f);
    xmlin_free(g.xml);
    return ok ? 0 : 1;
}
