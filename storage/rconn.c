/* One Redis connection: see rconn.h. */
#include "rconn.h"

#include <hiredis/hiredis.h>
#include <hiredis/sds.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "scripts.h"
#include "store_internal.h"
#include "uvredis.h"

#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000

static void rconn_connect(rconn_t *c);

static void maybe_free(rconn_t *c)
{
    if (c->closing && c->timer_closed && !c->ac) {
        struct store *st = c->st;
        free(c);
        store__conn_gone(st);
    }
}

static void on_retry_timer(uv_timer_t *t)
{
    rconn_connect(t->data);
}

static void schedule_reconnect(rconn_t *c)
{
    if (c->closing)
        return;
    /* Jitter spreads the reconnects of several receiptd instances after a shared Redis restart. */
    unsigned delay = c->backoff_ms / 2 + (unsigned)rand() % (c->backoff_ms / 2 + 1);
    c->backoff_ms = c->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : c->backoff_ms * 2;
    uv_timer_start(&c->retry_timer, on_retry_timer, delay, 0);
}

/* The connection counts as ready only once every script is loaded: a Redis that is still
 * loading its AOF answers -LOADING, and EVALSHA would then fail with NOSCRIPT forever. */
static void on_setup_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    rconn_t *c = privdata;
    redisReply *r = reply;
    rconn_on_reply(c);
    if (!r)
        return; /* the connection went away; on_disconnect handles it */
    if (r->type == REDIS_REPLY_ERROR && !c->setup_failed) {
        c->setup_failed = true;
        snprintf(c->setup_error, sizeof c->setup_error, "setup failed: %s", r->str);
    }
    if (--c->scripts_pending > 0)
        return;
    if (c->setup_failed) {
        store__on_conn(c->st, c, 0, c->setup_error);
        redisAsyncDisconnect(ac); /* on_disconnect schedules the retry */
        return;
    }
    c->ready = true;
    c->backoff_ms = BACKOFF_MIN_MS;
    store__on_conn(c->st, c, 1, NULL);
}

static void setup_send(rconn_t *c, int argc, const char **argv)
{
    c->scripts_pending++;
    if (rconn_send(c, on_setup_reply, c, argc, argv, NULL) < 0)
        c->scripts_pending--;
}

static void on_connect(const redisAsyncContext *cac, int status)
{
    rconn_t *c = cac->data;
    if (status != REDIS_OK) {
        /* hiredis frees the context after this callback. */
        c->ac = NULL;
        if (c->closing) {
            maybe_free(c);
            return;
        }
        store__on_conn(c->st, c, 0, cac->errstr);
        schedule_reconnect(c);
        return;
    }
    c->scripts_pending = 0;
    c->setup_failed = false;
    /* AUTH first: Redis runs one connection's commands in order, so the loads are authorized. */
    if (c->st->password) {
        const char *argv[] = {"AUTH", c->st->password};
        setup_send(c, 2, argv);
    }
    if (!c->probe)
        for (int i = 0; i < STORE_SCRIPT_COUNT; i++) {
            const char *argv[] = {"SCRIPT", "LOAD", store_script_source((store_script_t)i)};
            setup_send(c, 3, argv);
        }
    if (c->scripts_pending == 0) {
        c->ready = true;
        c->backoff_ms = BACKOFF_MIN_MS;
        store__on_conn(c->st, c, 1, NULL);
    }
}

static void on_disconnect(const redisAsyncContext *cac, int status)
{
    rconn_t *c = cac->data;
    bool was = c->ready;
    c->ac = NULL;
    c->ready = false;
    c->inflight = 0;
    if (c->closing) {
        maybe_free(c);
        return;
    }
    if (was)
        store__on_conn(c->st, c, 0, status == REDIS_OK ? "disconnected" : cac->errstr);
    schedule_reconnect(c);
}

static void rconn_connect(rconn_t *c)
{
    redisAsyncContext *ac =
        c->socket ? redisAsyncConnectUnix(c->socket) : redisAsyncConnect(c->host, c->port);
    if (!ac || ac->err) {
        store__on_conn(c->st, c, 0, ac ? ac->errstr : "out of memory");
        if (ac)
            redisAsyncFree(ac);
        schedule_reconnect(c);
        return;
    }
    ac->data = c;
    if (store__attach_uv(ac, c->st->loop) < 0) {
        redisAsyncFree(ac);
        schedule_reconnect(c);
        return;
    }
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    c->ac = ac;
}

rconn_t *rconn_create(struct store *st, const char *host, int port, const char *socket, bool probe)
{
    rconn_t *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->st = st;
    st->conns++;
    snprintf(c->host, sizeof c->host, "%s", host ? host : "127.0.0.1");
    c->port = port;
    c->socket = socket;
    c->probe = probe;
    c->backoff_ms = BACKOFF_MIN_MS;
    uv_timer_init(st->loop, &c->retry_timer);
    c->retry_timer.data = c;
    /* From the loop, not from here: a failure must not call back into a caller that has not
     * stored the pointer yet. */
    uv_timer_start(&c->retry_timer, on_retry_timer, 0, 0);
    return c;
}

rconn_t *rconn_create_node(struct store *st, const char *host, int port, const char *socket,
                           bool lane)
{
    rconn_t *c = rconn_create(st, host, port, socket, false);
    if (c && lane) {
        if (!(c->twin = rconn_create(st, host, port, socket, false))) {
            rconn_close(c);
            return NULL;
        }
        c->twin->primary = c;
    }
    return c;
}

bool rconn_ready(const rconn_t *c)
{
    return c && c->ready && (!c->twin || c->twin->ready);
}

rconn_t *rconn_lane(rconn_t *c, bool put)
{
    return put && c->twin ? c->twin : c;
}

static void on_timer_closed(uv_handle_t *h)
{
    rconn_t *c = h->data;
    c->timer_closed = true;
    maybe_free(c);
}

void rconn_close(rconn_t *c)
{
    if (!c || c->closing)
        return;
    rconn_close(c->twin);
    bool was_connected = c->ac && (c->ac->c.flags & REDIS_CONNECTED);
    c->closing = true;
    c->ready = false;
    uv_timer_stop(&c->retry_timer);
    uv_close((uv_handle_t *)&c->retry_timer, on_timer_closed);
    if (c->ac && was_connected) {
        /* Graceful: replies in flight still reach their callbacks, then on_disconnect runs. */
        redisAsyncDisconnect(c->ac);
    } else if (c->ac) {
        /* Still connecting: hiredis would not call on_disconnect for it. */
        redisAsyncContext *ac = c->ac;
        c->ac = NULL;
        redisAsyncFree(ac);
    }
}

static char *resp_put_len(char *p, char kind, size_t n)
{
    *p++ = kind;
    p += proto_format_u64(p, n);
    *p++ = '\r';
    *p++ = '\n';
    return p;
}

/* The command in RESP, written here rather than by hiredis' redisAsyncCommandArgv: its
 * printf-style headers, sixteen or more per put, were a tenth of receiptd's instructions per
 * stored message. The room is reserved once and the command written straight into it. */
static int resp_format(proto_buf_t *b, int argc, const char **argv, const size_t *lens)
{
    enum { HEAD = 1 + PROTO_U64_MAX + 2 }; /* "$<len>\r\n", the longest */
    size_t need = HEAD;
    for (int i = 0; i < argc; i++)
        need += HEAD + (lens ? lens[i] : strlen(argv[i])) + 2;
    proto_buf_reset(b);
    char *start = proto_buf_claim(b, need);
    if (!start)
        return -1;
    char *p = resp_put_len(start, '*', (size_t)argc);
    for (int i = 0; i < argc; i++) {
        size_t n = lens ? lens[i] : strlen(argv[i]);
        p = resp_put_len(p, '$', n);
        memcpy(p, argv[i], n);
        p += n;
        *p++ = '\r';
        *p++ = '\n';
    }
    proto_buf_commit(b, (size_t)(p - start));
    return 0;
}

int rconn_send(rconn_t *c, redisCallbackFn *fn, void *priv, int argc, const char **argv,
               const size_t *lens)
{
    proto_buf_t *b = &c->st->resp;
    if (!c->ac || c->closing || resp_format(b, argc, argv, lens) < 0)
        return -1;
    int rc = redisAsyncFormattedCommand(c->ac, fn, priv, b->data, b->len);
    if (b->cap > (1u << 20)) /* a rare huge command (a restore, a long ack) does not stay */
        proto_buf_free(b);
    if (rc != REDIS_OK)
        return -1;
    if (c->inflight++ == 0)
        c->last_progress = uv_now(c->st->loop);
    return 0;
}

void rconn_on_reply(rconn_t *c)
{
    if (c->inflight)
        c->inflight--;
    c->last_progress = uv_now(c->st->loop);
}

void rconn_reset(rconn_t *c, const char *why)
{
    if (!c->ac || c->closing)
        return;
    redisAsyncContext *ac = c->ac;
    bool was = c->ready;
    c->ready = false;
    if (was)
        store__on_conn(c->st, c, 0, why);
    /* on_disconnect runs inside redisAsyncFree for a connected context and reschedules; a
     * context still connecting gets no on_disconnect. */
    redisAsyncFree(ac);
    if (c->ac == ac) {
        c->ac = NULL;
        c->inflight = 0;
        schedule_reconnect(c);
    }
}

void rconn_reload(rconn_t *c, const char *why)
{
    if (!c->ac || c->closing || !c->ready)
        return;
    c->ready = false;
    store__on_conn(c->st, c, 0, why);
    redisAsyncDisconnect(c->ac); /* on_disconnect reconnects */
}

/* hiredis has no request timeout: without this, a paused Redis would hold every sender's
 * request (and its memory) until it resumes. Dropping the context fails them all, so senders
 * get a wait error and retry; a write that did happen is found again by dedupe. */
void rconn_check(rconn_t *c, uint64_t now, unsigned timeout_ms)
{
    if (!c->ac || c->inflight == 0 || c->closing)
        return;
    if (now - c->last_progress < timeout_ms)
        return;
    char why[160];
    snprintf(why, sizeof why,
             "Redis did not answer in time (%u ms; %u commands waiting, %zu bytes not yet "
             "sent); reconnecting",
             timeout_ms, c->inflight, c->ac->c.obuf ? sdslen(c->ac->c.obuf) : 0);
    rconn_reset(c, why);
}
