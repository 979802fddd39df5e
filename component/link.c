/* Each connection attempt is a conn_t holding the uv_tcp_t; it is freed in the handle's close
 * callback, so a late libuv callback never sees freed memory. The link itself outlives all its
 * connections and frees itself when the last handle it owns has closed. */
#include "link.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "stream.h"

#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000
/* A server that refuses us with <conflict/> (Prosody: another connection holds our domain) is a
 * hot standby's normal state: retry at least every 2 s so that it takes over within about 2 s of
 * the holder's death, while an unreachable server is retried at the 5 s cap. */
#define BACKOFF_STANDBY_MAX_MS 2000
#define READ_CHUNK 65536
#define OUT_KEEP (1u << 20) /* the largest write buffer kept between turns */

typedef enum { ST_IDLE, ST_CONNECTING, ST_OPENING, ST_UP, ST_CLOSED } state_t;

typedef struct conn {
    uv_tcp_t tcp;
    uv_connect_t connect_req;
    struct link *link;
    bool closing;
} conn_t;

struct link {
    uv_loop_t *loop;
    xmpp_ctx_t *ctx;
    link_config_t cfg;
    link_callbacks_t cb;
    void *ud;
    state_t state;
    conn_t *conn;
    uv_getaddrinfo_t gai;
    bool resolving;
    uv_timer_t retry_timer;
    unsigned backoff_ms;
    stream_parser_t *parser;
    bool drop_pending; /* set from parser callbacks; acted on once the feed returns */
    char drop_why[256];
    size_t queued; /* bytes accepted and not yet written: in out[] and in libuv's queue */
    /* What this turn of the loop sent, written at once before the loop next waits for I/O: one
     * write() for a burst of acks instead of one per stanza. */
    uv_prepare_t flusher;
    char *out;
    size_t out_len, out_cap;
    unsigned open_handles;
    log_throttle_t fail_log;
    bool conflict;      /* the current attempt ended in a stream error <conflict/> */
    bool last_conflict; /* ... and so did the previous failed one (what the log last said) */
    char read_buf[READ_CHUNK];
};

typedef struct write_req {
    uv_write_t req;
    link_t *link;
    size_t len;
    char data[];
} write_req_t;

static uint64_t now_ms(link_t *l)
{
    return uv_now(l->loop);
}

static void maybe_free(link_t *l)
{
    if (l->state == ST_CLOSED && l->open_handles == 0 && !l->resolving) {
        stream_parser_free(l->parser);
        free(l->out);
        free(l);
    }
}

static void on_conn_closed(uv_handle_t *h)
{
    conn_t *c = h->data;
    link_t *l = c->link;
    free(c);
    l->open_handles--;
    maybe_free(l);
}

static void on_retry(uv_timer_t *t);

/* Drops the current connection and, unless the link is closing, schedules a new attempt. */
static void link_drop(link_t *l, const char *why)
{
    bool was_up = l->state == ST_UP;
    bool conflict = l->conflict;
    l->conflict = false;
    if (l->conn && !l->conn->closing) {
        l->conn->closing = true;
        uv_close((uv_handle_t *)&l->conn->tcp, on_conn_closed);
    }
    l->conn = NULL;
    l->queued = 0;
    l->out_len = 0;
    uv_prepare_stop(&l->flusher);
    if (l->state == ST_CLOSED)
        return;
    if (was_up) {
        log_warn("link: lost connection to %s:%d: %s", l->cfg.host, l->cfg.port, why);
        log_throttle_reset(&l->fail_log);
    } else {
        if (conflict != l->last_conflict) /* the kind of failure changed: say so right away */
            log_throttle_reset(&l->fail_log);
        l->last_conflict = conflict;
        if (log_throttle_pass(&l->fail_log, now_ms(l))) {
            if (conflict)
                log_warn("link: %s:%d refused %s: another component holds the link (stream error "
                         "<conflict/>); standing by, retrying at least every %d s (logged once a "
                         "minute)",
                         l->cfg.host, l->cfg.port, l->cfg.jid, BACKOFF_STANDBY_MAX_MS / 1000);
            else
                log_warn("link: cannot attach to %s:%d: %s (retrying with backoff; logged once "
                         "a minute)",
                         l->cfg.host, l->cfg.port, why);
        }
    }
    l->state = ST_IDLE;
    unsigned cap = conflict ? BACKOFF_STANDBY_MAX_MS : BACKOFF_MAX_MS;
    if (l->backoff_ms > cap)
        l->backoff_ms = cap;
    unsigned delay = l->backoff_ms / 2 + (unsigned)rand() % (l->backoff_ms / 2 + 1);
    l->backoff_ms = l->backoff_ms * 2 > cap ? cap : l->backoff_ms * 2;
    uv_timer_start(&l->retry_timer, on_retry, delay, 0);
    if (was_up && l->cb.on_down)
        l->cb.on_down(l->ud);
}

static void on_write(uv_write_t *req, int status)
{
    write_req_t *w = (write_req_t *)req;
    link_t *l = w->link;
    (void)status; /* a failed write also fails the read side, which drops the connection */
    if (l->queued >= w->len)
        l->queued -= w->len;
    free(w);
}

/* Writes what the turn sent, dropping the link if that cannot be done. */
static void flush_out(link_t *l, size_t len)
{
    uv_buf_t buf = uv_buf_init(l->out, (unsigned)len);
    int n = uv_try_write((uv_stream_t *)&l->conn->tcp, &buf, 1);
    size_t done = n > 0 ? (size_t)n : 0;
    l->queued -= done;
    if (done == len)
        return;
    /* The socket is full (or earlier writes still queue): libuv keeps the rest. */
    write_req_t *w = malloc(sizeof *w + (len - done));
    if (!w) {
        link_drop(l, "out of memory");
        return;
    }
    memcpy(w->data, l->out + done, len - done);
    w->len = len - done;
    w->link = l;
    buf = uv_buf_init(w->data, (unsigned)w->len);
    if (uv_write(&w->req, (uv_stream_t *)&l->conn->tcp, &buf, 1, on_write) != 0) {
        free(w);
        link_drop(l, "write failed");
    }
}

static void on_flush(uv_prepare_t *p)
{
    link_t *l = p->data;
    uv_prepare_stop(p);
    size_t len = l->out_len;
    l->out_len = 0;
    if (len && l->conn && !l->conn->closing)
        flush_out(l, len);
    if (l->out_cap > OUT_KEEP) { /* a burst (a big fetch page): do not keep its buffer */
        free(l->out);
        l->out = NULL;
        l->out_cap = 0;
    }
}

static int send_raw(link_t *l, const char *data, size_t len)
{
    log_debug("link: out %.*s", len > 1500 ? 1500 : (int)len, data);
    if (!l->conn || l->conn->closing)
        return -1;
    if (l->queued + len > l->cfg.max_queued_bytes)
        return -1;
    if (l->out_len + len > l->out_cap) {
        size_t cap = l->out_cap ? l->out_cap : 16384;
        while (cap < l->out_len + len)
            cap *= 2;
        char *out = realloc(l->out, cap);
        if (!out)
            return -1;
        l->out = out;
        l->out_cap = cap;
    }
    memcpy(l->out + l->out_len, data, len);
    if (!l->out_len)
        uv_prepare_start(&l->flusher, on_flush);
    l->out_len += len;
    l->queued += len;
    return 0;
}

int link_send_text(link_t *l, const char *data, size_t len)
{
    if (l->state != ST_UP)
        return -1;
    return send_raw(l, data, len);
}

int link_send_stanza(link_t *l, xmpp_stanza_t *stanza)
{
    char *text;
    size_t len;
    if (l->state != ST_UP)
        return -1;
    if (xmpp_stanza_to_text(stanza, &text, &len) != XMPP_EOK)
        return -1;
    int rc = send_raw(l, text, len);
    xmpp_free(l->ctx, text);
    return rc;
}

/* ---- stream events -------------------------------------------------------------------------- */

static void defer_drop(link_t *l, const char *why)
{
    if (!l->drop_pending)
        snprintf(l->drop_why, sizeof l->drop_why, "%s", why);
    l->drop_pending = true;
}

static void on_stream_open(void *ud, const char *id)
{
    link_t *l = ud;
    if (!id) {
        defer_drop(l, "stream header without id");
        return;
    }
    /* XEP-0114: the handshake is hex(SHA-1(stream id + secret)). */
    xmpp_sha1_t *sha = xmpp_sha1_new(l->ctx);
    if (!sha) {
        defer_drop(l, "out of memory");
        return;
    }
    xmpp_sha1_update(sha, (const unsigned char *)id, strlen(id));
    xmpp_sha1_update(sha, (const unsigned char *)l->cfg.secret, strlen(l->cfg.secret));
    xmpp_sha1_final(sha);
    char hex[XMPP_SHA1_DIGEST_SIZE * 2 + 1];
    xmpp_sha1_to_string(sha, hex, sizeof hex);
    xmpp_sha1_free(sha);
    char msg[128];
    int n = snprintf(msg, sizeof msg, "<handshake>%s</handshake>", hex);
    send_raw(l, msg, (size_t)n);
}

static void on_stream_stanza(void *ud, xmpp_stanza_t *s, bool oversize)
{
    link_t *l = ud;
    const char *name = xmpp_stanza_get_name(s);
    if (l->drop_pending)
        return;
    if (name && strcmp(name, "error") == 0) {
        /* A stream error: the first child names the condition. */
        xmpp_stanza_t *c = xmpp_stanza_get_children(s);
        while (c && !xmpp_stanza_is_tag(c))
            c = xmpp_stanza_get_next(c);
        char why[128];
        snprintf(why, sizeof why, "stream error <%s/>",
                 c && xmpp_stanza_get_name(c) ? xmpp_stanza_get_name(c) : "?");
        l->conflict =
            c && xmpp_stanza_get_name(c) && strcmp(xmpp_stanza_get_name(c), "conflict") == 0;
        defer_drop(l, why);
        return;
    }
    if (l->state == ST_OPENING) {
        if (name && strcmp(name, "handshake") == 0) {
            l->state = ST_UP;
            l->backoff_ms = BACKOFF_MIN_MS;
            l->last_conflict = false;
            log_throttle_reset(&l->fail_log);
            log_info("link: authenticated as %s to %s:%d", l->cfg.jid, l->cfg.host, l->cfg.port);
            if (l->cb.on_up)
                l->cb.on_up(l->ud);
        }
        return;
    }
    if (l->state == ST_UP && l->cb.on_stanza)
        l->cb.on_stanza(l->ud, s, oversize);
}

static void on_stream_close(void *ud)
{
    defer_drop(ud, "server closed the stream");
}

static const stream_callbacks_t stream_cb = {on_stream_open, on_stream_stanza, on_stream_close};

/* ---- socket --------------------------------------------------------------------------------- */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    conn_t *c = h->data;
    (void)suggested;
    *buf = uv_buf_init(c->link->read_buf, READ_CHUNK);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    conn_t *c = s->data;
    link_t *l = c->link;
    if (c->closing || c != l->conn)
        return;
    if (n < 0) {
        link_drop(l, n == UV_EOF ? "connection closed by server" : uv_strerror((int)n));
        return;
    }
    if (n == 0)
        return;
    log_debug("link: in %.*s", n > 1500 ? 1500 : (int)n, buf->base);
    if (stream_parser_feed(l->parser, buf->base, (size_t)n) < 0) {
        char why[200];
        snprintf(why, sizeof why, "malformed XML from server: %s", stream_parser_error(l->parser));
        defer_drop(l, why);
    }
    if (l->drop_pending && l->conn == c) {
        l->drop_pending = false;
        link_drop(l, l->drop_why);
    }
}

static void on_connect(uv_connect_t *req, int status)
{
    conn_t *c = req->data;
    link_t *l = c->link;
    if (c->closing || c != l->conn)
        return;
    if (status < 0) {
        link_drop(l, uv_strerror(status));
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    if (stream_parser_reset(l->parser) < 0) {
        link_drop(l, "out of memory");
        return;
    }
    l->drop_pending = false;
    l->state = ST_OPENING;
    char header[512];
    int n = snprintf(header, sizeof header,
                     "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' "
                     "xmlns:stream='http://etherx.jabber.org/streams' to='%s'>",
                     l->cfg.jid);
    send_raw(l, header, (size_t)n);
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    link_t *l = req->data;
    l->resolving = false;
    if (l->state == ST_CLOSED) {
        uv_freeaddrinfo(res);
        maybe_free(l);
        return;
    }
    if (status < 0) {
        link_drop(l, uv_strerror(status));
        return;
    }
    conn_t *c = calloc(1, sizeof *c);
    if (!c) {
        uv_freeaddrinfo(res);
        link_drop(l, "out of memory");
        return;
    }
    c->link = l;
    uv_tcp_init(l->loop, &c->tcp);
    c->tcp.data = c;
    c->connect_req.data = c;
    l->open_handles++;
    l->conn = c;
    l->state = ST_CONNECTING;
    int rc = uv_tcp_connect(&c->connect_req, &c->tcp, res->ai_addr, on_connect);
    uv_freeaddrinfo(res);
    if (rc < 0)
        link_drop(l, uv_strerror(rc));
}

static void link_connect(link_t *l)
{
    char port[16];
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    snprintf(port, sizeof port, "%d", l->cfg.port);
    l->gai.data = l;
    l->state = ST_CONNECTING;
    if (uv_getaddrinfo(l->loop, &l->gai, on_resolved, l->cfg.host, port, &hints) < 0) {
        link_drop(l, "cannot resolve server_host");
        return;
    }
    l->resolving = true;
}

static void on_retry(uv_timer_t *t)
{
    link_t *l = t->data;
    if (l->state == ST_IDLE)
        link_connect(l);
}

static void on_handle_closed(uv_handle_t *h)
{
    link_t *l = h->data;
    l->open_handles--;
    maybe_free(l);
}

int link_create(uv_loop_t *loop, xmpp_ctx_t *ctx, const link_config_t *cfg,
                const link_callbacks_t *cb, void *ud, link_t **out)
{
    link_t *l = calloc(1, sizeof *l);
    if (!l)
        return -1;
    l->loop = loop;
    l->ctx = ctx;
    l->cfg = *cfg;
    if (!l->cfg.max_queued_bytes)
        l->cfg.max_queued_bytes = 64u << 20;
    l->cb = *cb;
    l->ud = ud;
    l->backoff_ms = BACKOFF_MIN_MS;
    l->parser = stream_parser_new(ctx, cfg->max_stanza_bytes, &stream_cb, l);
    if (!l->parser) {
        free(l);
        return -1;
    }
    uv_timer_init(loop, &l->retry_timer);
    l->retry_timer.data = l;
    uv_prepare_init(loop, &l->flusher);
    l->flusher.data = l;
    l->open_handles = 2;
    *out = l;
    return 0;
}

void link_start(link_t *l)
{
    link_connect(l);
}

bool link_is_up(const link_t *l)
{
    return l->state == ST_UP;
}

void link_close(link_t *l)
{
    if (l->state == ST_UP && l->conn) {
        /* Best effort: what this turn sent, then the server learns we left on purpose, not from
         * a reset. */
        static const char bye[] = "</stream:stream>";
        on_flush(&l->flusher);
        uv_buf_t buf = uv_buf_init((char *)bye, sizeof bye - 1);
        uv_try_write((uv_stream_t *)&l->conn->tcp, &buf, 1);
    }
    l->state = ST_CLOSED;
    if (l->resolving)
        uv_cancel((uv_req_t *)&l->gai);
    if (l->conn && !l->conn->closing) {
        l->conn->closing = true;
        uv_close((uv_handle_t *)&l->conn->tcp, on_conn_closed);
    }
    l->conn = NULL;
    uv_timer_stop(&l->retry_timer);
    uv_close((uv_handle_t *)&l->retry_timer, on_handle_closed);
    uv_close((uv_handle_t *)&l->flusher, on_handle_closed);
}
