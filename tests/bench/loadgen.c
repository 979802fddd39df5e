/* loadgen: plays the XMPP server for one receiptd and measures how fast it stores and acks.
 *
 * It listens on loopback as the XEP-0114 server, accepts receiptd's connection, checks its
 * handshake digest, then offers N receipt-requested messages (about 250-byte bodies) from S
 * senders to R offline recipients with at most W unacknowledged, and consumes the <stored/>
 * acks. At --rate 0 it runs at saturation; otherwise it offers that many messages per second.
 * Prints one line of key=value figures: rate, store->ack latency percentiles, its own CPU use
 * (so a generator that is the bottleneck says so), and the error answers instead of <stored/>
 * (a wait error when Redis did not answer in time: a client would retry, loadgen counts it).
 * With no answer at all for --stall seconds (60) it gives up and exits 1.
 *
 * --warmup W: the first W of the N messages are a warm-up at the same rate, so that the figures
 * describe the steady state: the percentiles and the rate count only the messages after them
 * (timed from the first of those being sent), and the warm-up's own p99 is printed apart as
 * warm_p99_ms. With W >= R every recipient gets state in Redis during the warm-up, which is the
 * one-time cost of a new user (storage/SCHEMA.md, "cold").
 *
 * --dump FILE writes a line per answered message, "index sent_us latency_us" (sent_us on the
 * monotonic clock, CLOCK_MONOTONIC): where the slow answers fall in time, which percentiles
 * cannot show, to set beside what other processes did meanwhile.
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
 *                [--rate MSGS_PER_S] [--warmup W] [--domain C] [--stall S] [--dump FILE]
 *                [--fetch [--batch B] [--max-acks A] [--pause] [--senders-online]]
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strophe.h>
#include <uv.h>

#include "fetcher.h"
#include "measure.h"
#include "xmlin.h"

typedef struct gen {
    uv_loop_t *loop;
    uv_tcp_t server, conn;
    uv_timer_t pacer;
    const char *secret, *domain;
    long n, senders, recipients, window, rate;
    long sent, acked, in_flight, errors;
    long warmup, measured, warmed;         /* --warmup; acked after it; acked within it */
    uint64_t *sent_at;                     /* ns, per message index */
    uint64_t *latency, *warm_latency;      /* ns, per acked message after / within the warm-up */
    const char *dump;                      /* --dump */
    uint64_t *dump_sent, *dump_ns;         /* --dump: per message index, sent at, latency (ns) */
    uint64_t start_ns, end_ns, measure_ns; /* measure_ns: message `warmup` was sent */
    int phase; /* 0 header, 1 handshake, 2 storing, 3 waiting for go, 4 retrieving */
    char stream_id[64];
    char *in;
    size_t in_len, in_cap;
    char body[251];
    double credit;
    uint64_t last_pace;
    /* retrieval (--fetch) */
    bool fetch, pause, senders_online;
    long receipts;
    int batch, max_acks;
    uv_pipe_t stdin_pipe;
    char stdin_buf[64];
    fetcher_t f;
    double cpu_at_go;
    /* input after the handshake, and what the current stanza is */
    xmlin_t *xml;
    bool st_error;
    long st_index; /* our message gN it is about, or -1 */
    /* giving up when nothing arrives */
    uv_timer_t watchdog;
    long stanzas, stanzas_seen;
    int stall_s, idle_s;
    bool stalled; /* or lost: the run failed */
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
        if (i == g->warmup)
            g->measure_ns = g->sent_at[i];
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
    uv_timer_stop(&g->watchdog);
    uv_read_stop((uv_stream_t *)&g->conn);
    uv_stop(g->loop);
}

static void print_store(gen_t *g, const char *prefix)
{
    double secs = (double)(g->end_ns - g->start_ns) / 1e9;
    uint64_t from = g->warmup && g->measure_ns ? g->measure_ns : g->start_ns;
    double measured_secs = (double)(g->end_ns - from) / 1e9;
    measure_sort(g->latency, (size_t)g->measured);
    measure_sort(g->warm_latency, (size_t)g->warmed);
    printf("%sacked=%ld errors=%ld seconds=%.3f rate=%.0f p50_ms=%.3f p99_ms=%.3f p999_ms=%.3f "
           "gen_cpu=%.0f%%",
           prefix, g->acked, g->errors, secs,
           (double)g->measured / (measured_secs > 0 ? measured_secs : 1),
           measure_pct_ms(g->latency, (size_t)g->measured, 0.50),
           measure_pct_ms(g->latency, (size_t)g->measured, 0.99),
           measure_pct_ms(g->latency, (size_t)g->measured, 0.999),
           100.0 * measure_cpu_seconds() / (secs > 0 ? secs : 1));
    if (g->warmup)
        printf(" warmup=%ld warm_p99_ms=%.3f", g->warmup,
               measure_pct_ms(g->warm_latency, (size_t)g->warmed, 0.99));
    printf("\n");
    fflush(stdout);
}

/* ---- retrieval (--fetch) ------------------------------------------------------------------ */

static void fetch_send(void *ud, const char *data, size_t len)
{
    send_text(ud, data, len);
}

static void start_retrieval(gen_t *g)
{
    g->phase = 4;
    g->cpu_at_go = measure_cpu_seconds();
    g->f = (fetcher_t){.send = fetch_send,
                       .ud = g,
                       .to = g->domain,
                       .from = "r0@localhost/bench",
                       .max = g->batch,
                       .max_acks = g->max_acks};
    for (long i = 0; g->senders_online && i < g->senders; i++) {
        char p[256];
        int len =
            snprintf(p, sizeof p, "<presence from='s%ld@localhost/r' to='%s'/>", i, g->domain);
        send_text(g, p, (size_t)len);
    }
    fetcher_start(&g->f);
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

/* ---- input after the handshake ----------------------------------------------------------- */

/* The index N of one of our message ids gN, or -1. */
static long our_index(gen_t *g, const char *id)
{
    if (!id || id[0] != 'g')
        return -1;
    char *end;
    long i = strtol(id + 1, &end, 10);
    return *end || i < 0 || i >= g->n ? -1 : i;
}

/* The answer for message i arrived: <stored/> (ok) or an error. */
static void answered(gen_t *g, long i, bool ok)
{
    if (i < 0 || !g->sent_at[i])
        return;
    if (ok) {
        uint64_t ns = uv_hrtime() - g->sent_at[i];
        g->acked++;
        if (g->dump_ns) {
            g->dump_sent[i] = g->sent_at[i];
            g->dump_ns[i] = ns;
        }
        if (i < g->warmup)
            g->warm_latency[g->warmed++] = ns;
        else
            g->latency[g->measured++] = ns;
    } else
        g->errors++;
    g->sent_at[i] = 0;
    g->in_flight--;
}

static void xml_start(void *ud, int depth, const char *name, const char **attrs)
{
    gen_t *g = ud;
    if (depth == 1) {
        const char *type = xmlin_attr(attrs, "type");
        g->st_error = type && strcmp(type, "error") == 0;
        g->st_index = strcmp(name, "message") == 0 ? our_index(g, xmlin_attr(attrs, "id")) : -1;
    } else if (depth == 2 && strcmp(name, "stored") == 0) {
        answered(g, our_index(g, xmlin_attr(attrs, "id")), true);
    } else if (depth == 2 && strcmp(name, "received") == 0) {
        g->receipts++;
    }
    if (g->phase == 4)
        fetcher_on_start(&g->f, depth, name, attrs);
}

static void xml_end(void *ud, int depth, const char *name)
{
    gen_t *g = ud;
    if (depth == 1) {
        g->stanzas++;
        if (g->st_error)
            answered(g, g->st_index, false);
    }
    if (g->phase == 4)
        fetcher_on_end(&g->f, depth, name);
}

static void on_watchdog(uv_timer_t *t)
{
    gen_t *g = t->data;
    bool waiting = g->phase == 4 || (g->phase == 2 && g->in_flight > 0);
    if (!waiting || g->stanzas != g->stanzas_seen) {
        g->stanzas_seen = g->stanzas;
        g->idle_s = 0;
        return;
    }
    if (++g->idle_s >= g->stall_s) {
        fprintf(stderr, "loadgen: no answer from receiptd for %d s; giving up\n", g->stall_s);
        g->stalled = true;
        finish(g);
    }
}

static void input(gen_t *g)
{
    int rc = xmlin_feed(g->xml, g->in, g->in_len);
    g->in_len = 0;
    if (rc < 0) {
        g->stalled = true;
        finish(g);
    } else if (g->phase == 2 && g->acked + g->errors >= g->n) {
        stored_all(g);
    } else if (g->phase == 2 && g->rate == 0) {
        send_messages(g, g->window - g->in_flight);
    } else if (g->phase == 4 && g->f.done) {
        finish(g);
    }
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
        g->stalled = true;
        finish(g);
        return;
    }
    g->in_len += (size_t)n;
    if (g->phase >= 2) {
        input(g);
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
        /* From here on everything receiptd sends is a stanza inside its stream; a stand-in root
         * lets expat take them as one document (receiptd sends nothing before our handshake). */
        g->xml = xmlin_new(xml_start, xml_end, g);
        xmlin_feed(g->xml, "<r>", 3);
        uv_timer_start(&g->watchdog, on_watchdog, 1000, 1000);
        g->start_ns = uv_hrtime();
        g->last_pace = g->start_ns;
        if (g->rate == 0)
            send_messages(g, g->window);
        return;
    }
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
        {"port", required_argument, NULL, 'p'},     {"secret", required_argument, NULL, 's'},
        {"senders", required_argument, NULL, 'S'},  {"recipients", required_argument, NULL, 'R'},
        {"window", required_argument, NULL, 'w'},   {"rate", required_argument, NULL, 'r'},
        {"domain", required_argument, NULL, 'd'},   {"fetch", no_argument, NULL, 'F'},
        {"batch", required_argument, NULL, 'b'},    {"max-acks", required_argument, NULL, 'A'},
        {"pause", no_argument, NULL, 'P'},          {"stall", required_argument, NULL, 'T'},
        {"senders-online", no_argument, NULL, 'O'}, {"warmup", required_argument, NULL, 'W'},
        {"dump", required_argument, NULL, 'D'},     {NULL, 0, NULL, 0},
    };
    gen_t g = {.secret = "bench",
               .domain = "receipts.localhost",
               .n = 200000,
               .senders = 100,
               .recipients = 1000,
               .window = 2000,
               .batch = 100,
               .max_acks = 4,
               .stall_s = 60};
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
        case 'T':
            g.stall_s = atoi(optarg);
            break;
        case 'W':
            g.warmup = atol(optarg);
            break;
        case 'D':
            g.dump = optarg;
            break;
        default:
            fprintf(stderr, "usage: see the comment at the top of loadgen.c\n");
            return 2;
        }
    }
    memset(g.body, 'x', 250);
    g.sent_at = calloc((size_t)g.n, sizeof *g.sent_at);
    if (g.warmup < 0 || g.warmup >= g.n) {
        fprintf(stderr, "loadgen: --warmup must be below -n\n");
        return 2;
    }
    g.latency = calloc((size_t)g.n, sizeof *g.latency);
    if (g.dump) {
        g.dump_sent = calloc((size_t)g.n, sizeof *g.dump_sent);
        g.dump_ns = calloc((size_t)g.n, sizeof *g.dump_ns);
    }
    g.warm_latency = calloc((size_t)(g.warmup ? g.warmup : 1), sizeof *g.warm_latency);
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
    uv_timer_init(g.loop, &g.watchdog);
    g.watchdog.data = &g;
    if (g.rate)
        uv_timer_start(&g.pacer, on_pace, 1, 1);
    printf("ready\n");
    fflush(stdout);
    uv_run(g.loop, UV_RUN_DEFAULT);
    if (g.dump) {
        FILE *f = fopen(g.dump, "w");
        for (long i = 0; f && i < g.n; i++)
            if (g.dump_ns[i])
                fprintf(f, "%ld %" PRIu64 " %" PRIu64 "\n", i, g.dump_sent[i] / 1000,
                        g.dump_ns[i] / 1000);
        if (!f || fclose(f) != 0)
            fprintf(stderr, "loadgen: cannot write %s\n", g.dump);
    }

    /* Error answers are figures, not failures; a stall or a lost connection is a failure. */
    bool answered_all = !g.stalled && g.acked + g.errors == g.n;
    if (!g.fetch || g.phase <= 2) {
        print_store(&g, g.fetch ? "queued " : "");
        return answered_all && !g.fetch ? 0 : 1;
    }
    fetcher_t *f = &g.f;
    uint64_t end = f->end_ns ? f->end_ns : fetcher_now_ns();
    double secs = (double)(end - f->start_ns) / 1e9;
    printf("retrieved items=%ld queued=%ld left=%ld batches=%ld errors=%ld receipts=%ld "
           "seconds=%.3f rate=%.0f gen_cpu=%.0f%%\n",
           f->items, f->queued, f->left, f->batches, f->errors, g.receipts, secs,
           (double)f->items / (secs > 0 ? secs : 1),
           100.0 * (measure_cpu_seconds() - g.cpu_at_go) / (secs > 0 ? secs : 1));
    bool ok = answered_all && f->done && !f->errors && f->items == g.acked && f->left == 0;
    fetcher_free(f);
    xmlin_free(g.xml);
    return ok ? 0 : 1;
}
