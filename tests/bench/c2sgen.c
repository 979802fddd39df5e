/* c2sgen: one XMPP client on a real server's c2s port, for the side-by-side benchmark. The same
 * client, sending the same stanzas, stores N messages for an offline user either with the server
 * itself (to bob@localhost: the server's offline storage) or through receiptd (to
 * bob\40localhost@C), and then, as the recipient, retrieves them either from the server's login
 * flood or with receiptd's summary / fetch / ack.
 *
 * It speaks just enough XMPP for that, over plaintext on loopback: stream, SASL PLAIN, bind. libuv
 * for the socket and expat (xmlin.h) for input keep its own cost small and visible: every mode
 * prints gen_cpu, this process' user+sys CPU over the measured wall time.
 *
 * usage: c2sgen --port P --user U --password PW [--domain D] [--timeout S] MODE
 *   --send N --to JID [--count-stored]  N receipt-requested messages (250-byte bodies, as
 *        loadgen), then an XEP-0199 ping to the server; done when the ping answer is back (the
 *        server handles a session's stanzas in order, so everything before it was stored), and
 *        with --count-stored also N <stored/> acks
 *   --flood N      initial presence, then count pushed messages with a body until N
 *   --fetch C      summary / fetch / ack with component C (fetcher.h) until the queue is empty
 *   --batch B, --max-acks A   fetch page size (100) and acks in flight (4)
 * Output: one line of key=value figures. Exit 0 when everything expected arrived.
 */
#include <getopt.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "fetcher.h"
#include "measure.h"
#include "xmlin.h"

enum { LOGIN_FEATURES, LOGIN_AUTH, LOGIN_FEATURES2, LOGIN_BIND, RUNNING };
enum { MODE_NONE, MODE_SEND, MODE_FLOOD, MODE_FETCH };

typedef struct client {
    uv_loop_t *loop;
    uv_tcp_t sock;
    uv_connect_t creq;
    uv_timer_t timer;
    const char *user, *password, *domain;
    int state, mode;
    bool restart, done, failed;
    long n;
    const char *to, *component;
    bool count_stored;
    /* the stanza being read */
    bool st_message, st_error, st_body, st_stored, st_ping;
    /* figures */
    long stored, errors, received;
    bool ping_back;
    uint64_t t0, t1;
    double cpu0;
    xmlin_t *xml;
    fetcher_t f;
    int batch, max_acks;
} client_t;

static void on_written(uv_write_t *w, int status)
{
    (void)status;
    free(w->data);
    free(w);
}

/* Takes ownership of data (malloc'ed). */
static void send_owned(client_t *c, char *data, size_t len)
{
    uv_write_t *w = malloc(sizeof *w);
    if (!w)
        abort();
    w->data = data;
    uv_buf_t b = uv_buf_init(data, (unsigned)len);
    if (uv_write(w, (uv_stream_t *)&c->sock, &b, 1, on_written) < 0) {
        free(data);
        free(w);
    }
}

static void send_text(client_t *c, const char *s, size_t len)
{
    char *copy = malloc(len);
    if (!copy)
        abort();
    memcpy(copy, s, len);
    send_owned(c, copy, len);
}

static void send_str(client_t *c, const char *s)
{
    send_text(c, s, strlen(s));
}

static void fetch_send(void *ud, const char *data, size_t len)
{
    send_text(ud, data, len);
}

static void stop(client_t *c)
{
    if (!c->t1)
        c->t1 = uv_hrtime();
    c->done = true;
    uv_timer_stop(&c->timer);
    uv_read_stop((uv_stream_t *)&c->sock);
    uv_stop(c->loop);
}

static void stream_open(client_t *c)
{
    char hdr[512];
    int len = snprintf(hdr, sizeof hdr,
                       "<?xml version='1.0'?><stream:stream to='%s' xmlns='jabber:client' "
                       "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>",
                       c->domain);
    send_text(c, hdr, (size_t)len);
}

static void auth_plain(client_t *c)
{
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    unsigned char raw[512];
    size_t ul = strlen(c->user), pl = strlen(c->password);
    if (ul + pl + 2 > sizeof raw) {
        fprintf(stderr, "c2sgen: user or password too long\n");
        exit(2);
    }
    /* authzid empty, authcid, password (RFC 4616) */
    raw[0] = 0;
    memcpy(raw + 1, c->user, ul);
    raw[1 + ul] = 0;
    memcpy(raw + 2 + ul, c->password, pl);
    size_t n = ul + pl + 2, o = 0;
    char enc[700];
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = (unsigned)raw[i] << 16 | (i + 1 < n ? (unsigned)raw[i + 1] << 8 : 0) |
                     (i + 2 < n ? raw[i + 2] : 0);
        enc[o++] = b64[v >> 18 & 63];
        enc[o++] = b64[v >> 12 & 63];
        enc[o++] = i + 1 < n ? b64[v >> 6 & 63] : '=';
        enc[o++] = i + 2 < n ? b64[v & 63] : '=';
    }
    enc[o] = 0;
    char out[800];
    int len =
        snprintf(out, sizeof out,
                 "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>%s</auth>", enc);
    send_text(c, out, (size_t)len);
}

/* All N messages are handed to libuv at once, in chunks; the kernel and the server pace them. */
static void send_messages(client_t *c)
{
    char body[251];
    memset(body, 'x', 250);
    body[250] = 0;
    const long chunk = 500;
    for (long i = 0; i < c->n; i += chunk) {
        size_t cap = (size_t)chunk * (strlen(c->to) + 400), off = 0;
        char *buf = malloc(cap);
        if (!buf)
            abort();
        for (long j = i; j < c->n && j < i + chunk; j++)
            off += (size_t)snprintf(buf + off, cap - off,
                                    "<message to='%s' id='c%ld' type='chat'><body>%s</body>"
                                    "<request xmlns='urn:xmpp:receipts'/></message>",
                                    c->to, j, body);
        send_owned(c, buf, off);
    }
    char ping[256];
    int len = snprintf(ping, sizeof ping,
                       "<iq type='get' id='bench-ping' to='%s'><ping xmlns='urn:xmpp:ping'/></iq>",
                       c->domain);
    send_text(c, ping, (size_t)len);
}

static void logged_in(client_t *c)
{
    c->state = RUNNING;
    c->cpu0 = measure_cpu_seconds();
    c->t0 = uv_hrtime();
    switch (c->mode) {
    case MODE_SEND:
        send_messages(c);
        break;
    case MODE_FLOOD:
        send_str(c, "<presence/>");
        break;
    case MODE_FETCH:
        c->f = (fetcher_t){.send = fetch_send,
                           .ud = c,
                           .to = c->component,
                           .max = c->batch,
                           .max_acks = c->max_acks};
        fetcher_start(&c->f);
        break;
    }
}

static void check_done(client_t *c)
{
    if (c->done || c->state != RUNNING)
        return;
    bool done = false;
    switch (c->mode) {
    case MODE_SEND:
        /* an error answer also ends a message's wait, so a failing run ends at once */
        done = c->ping_back && (!c->count_stored || c->stored + c->errors >= c->n);
        break;
    case MODE_FLOOD:
        done = c->received >= c->n;
        break;
    case MODE_FETCH:
        done = c->f.done;
        if (c->f.end_ns)
            c->t1 = c->t0 + (c->f.end_ns - c->f.start_ns);
        break;
    }
    if (done)
        stop(c);
}

static void on_start(void *ud, int depth, const char *name, const char **attrs)
{
    client_t *c = ud;
    if (c->state == RUNNING && c->mode == MODE_FETCH)
        fetcher_on_start(&c->f, depth, name, attrs);
    if (depth == 1) {
        const char *type = xmlin_attr(attrs, "type"), *id = xmlin_attr(attrs, "id");
        c->st_message = strcmp(name, "message") == 0;
        c->st_error = type && strcmp(type, "error") == 0;
        c->st_body = c->st_stored = false;
        c->st_ping = strcmp(name, "iq") == 0 && id &&
                     (strcmp(id, "bench-ping") == 0 || strcmp(id, "bench-bind") == 0);
    } else if (depth == 2 && c->st_message) {
        if (strcmp(name, "body") == 0)
            c->st_body = true;
        else if (strcmp(name, "stored") == 0)
            c->st_stored = true;
    }
}

static void on_end(void *ud, int depth, const char *name)
{
    client_t *c = ud;
    if (c->state == RUNNING && c->mode == MODE_FETCH)
        fetcher_on_end(&c->f, depth, name);
    if (depth != 1)
        return;
    switch (c->state) {
    case LOGIN_FEATURES:
    case LOGIN_FEATURES2:
        if (strcmp(name, "stream:features") != 0)
            return;
        if (c->state == LOGIN_FEATURES) {
            c->state = LOGIN_AUTH;
            auth_plain(c);
        } else {
            c->state = LOGIN_BIND;
            send_str(c, "<iq type='set' id='bench-bind'><bind "
                        "xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>bench</resource>"
                        "</bind></iq>");
        }
        return;
    case LOGIN_AUTH:
        if (strcmp(name, "success") == 0) {
            c->restart = true;
            c->state = LOGIN_FEATURES2;
        } else {
            fprintf(stderr, "c2sgen: SASL PLAIN as %s refused (%s)\n", c->user, name);
            c->failed = true;
            stop(c);
        }
        return;
    case LOGIN_BIND:
        if (c->st_ping && !c->st_error)
            logged_in(c);
        else if (c->st_ping) {
            fprintf(stderr, "c2sgen: bind refused\n");
            c->failed = true;
            stop(c);
        }
        return;
    }
    if (c->st_message && c->st_error)
        c->errors++;
    else if (c->st_message && c->st_stored)
        c->stored++;
    else if (c->st_message && c->st_body)
        c->received++;
    else if (c->st_ping)
        c->ping_back = true;
}

static void on_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b)
{
    static char buf[1 << 18];
    (void)h;
    (void)sz;
    *b = uv_buf_init(buf, sizeof buf);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
    client_t *c = s->data;
    if (n < 0) {
        fprintf(stderr, "c2sgen: the server closed the connection\n");
        c->failed = true;
        stop(c);
        return;
    }
    if (xmlin_feed(c->xml, b->base, (size_t)n) < 0) {
        c->failed = true;
        stop(c);
        return;
    }
    if (c->restart) {
        /* SASL success: a new stream, so a new document for the parser */
        c->restart = false;
        xmlin_reset(c->xml);
        stream_open(c);
    }
    check_done(c);
}

static void on_connect(uv_connect_t *req, int status)
{
    client_t *c = req->data;
    if (status < 0) {
        fprintf(stderr, "c2sgen: connect: %s\n", uv_strerror(status));
        c->failed = true;
        stop(c);
        return;
    }
    uv_tcp_nodelay(&c->sock, 1);
    uv_read_start((uv_stream_t *)&c->sock, on_alloc, on_read);
    stream_open(c);
}

static void on_timeout(uv_timer_t *t)
{
    client_t *c = t->data;
    fprintf(stderr, "c2sgen: timed out\n");
    c->failed = true;
    stop(c);
}

static void usage(void)
{
    fprintf(stderr, "usage: see the comment at the top of c2sgen.c\n");
    exit(2);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"port", required_argument, NULL, 'p'},
        {"user", required_argument, NULL, 'u'},
        {"password", required_argument, NULL, 'w'},
        {"domain", required_argument, NULL, 'd'},
        {"timeout", required_argument, NULL, 't'},
        {"send", required_argument, NULL, 's'},
        {"to", required_argument, NULL, 'T'},
        {"count-stored", no_argument, NULL, 'c'},
        {"flood", required_argument, NULL, 'f'},
        {"fetch", required_argument, NULL, 'F'},
        {"batch", required_argument, NULL, 'b'},
        {"max-acks", required_argument, NULL, 'A'},
        {NULL, 0, NULL, 0},
    };
    client_t c = {.domain = "localhost", .batch = 100, .max_acks = 4};
    int port = 0, opt;
    double timeout = 600;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'p':
            port = atoi(optarg);
            break;
        case 'u':
            c.user = optarg;
            break;
        case 'w':
            c.password = optarg;
            break;
        case 'd':
            c.domain = optarg;
            break;
        case 't':
            timeout = atof(optarg);
            break;
        case 's':
            c.mode = MODE_SEND, c.n = atol(optarg);
            break;
        case 'T':
            c.to = optarg;
            break;
        case 'c':
            c.count_stored = true;
            break;
        case 'f':
            c.mode = MODE_FLOOD, c.n = atol(optarg);
            break;
        case 'F':
            c.mode = MODE_FETCH, c.component = optarg;
            break;
        case 'b':
            c.batch = atoi(optarg);
            break;
        case 'A':
            c.max_acks = atoi(optarg);
            break;
        default:
            usage();
        }
    }
    if (!port || !c.user || !c.password || c.mode == MODE_NONE || (c.mode == MODE_SEND && !c.to))
        usage();
    c.xml = xmlin_new(on_start, on_end, &c);
    c.loop = uv_default_loop();
    uv_tcp_init(c.loop, &c.sock);
    c.sock.data = &c;
    c.creq.data = &c;
    uv_timer_init(c.loop, &c.timer);
    c.timer.data = &c;
    uv_timer_start(&c.timer, on_timeout, (uint64_t)(timeout * 1000), 0);
    struct sockaddr_in addr;
    uv_ip4_addr("127.0.0.1", port, &addr);
    uv_tcp_connect(&c.creq, &c.sock, (const struct sockaddr *)&addr, on_connect);
    uv_run(c.loop, UV_RUN_DEFAULT);

    uint64_t t1 = c.t1 ? c.t1 : uv_hrtime();
    double secs = c.t0 ? (double)(t1 - c.t0) / 1e9 : 0, div = secs > 0 ? secs : 1;
    double cpu = c.t0 ? 100.0 * (measure_cpu_seconds() - c.cpu0) / div : 0;
    bool ok = !c.failed;
    switch (c.mode) {
    case MODE_SEND: {
        long done = c.count_stored ? c.stored : (c.ping_back ? c.n - c.errors : 0);
        printf("sent=%ld stored=%ld errors=%ld seconds=%.3f rate=%.0f gen_cpu=%.0f%%\n", c.n, done,
               c.errors, secs, (double)done / div, cpu);
        ok = ok && done == c.n && c.errors == 0;
        break;
    }
    case MODE_FLOOD:
        printf("received=%ld errors=%ld seconds=%.3f rate=%.0f gen_cpu=%.0f%%\n", c.received,
               c.errors, secs, (double)c.received / div, cpu);
        ok = ok && c.received == c.n;
        break;
    case MODE_FETCH:
        printf("items=%ld queued=%ld left=%ld batches=%ld errors=%ld seconds=%.3f rate=%.0f "
               "gen_cpu=%.0f%%\n",
               c.f.items, c.f.queued, c.f.left, c.f.batches, c.f.errors, secs,
               (double)c.f.items / div, cpu);
        ok = ok && c.f.done && !c.f.errors && c.f.items == c.f.queued && c.f.left == 0;
        fetcher_free(&c.f);
        break;
    }
    xmlin_free(c.xml);
    return ok ? 0 : 1;
}
