/* The Redis connection and the request/reply plumbing around the Lua scripts.
 *
 * Ownership: store_t owns the hiredis context (NULL while disconnected) and the reconnect timer.
 * Each request is a req_t that rides along as hiredis privdata and is freed in on_reply, which
 * hiredis calls exactly once per command (with a NULL reply when the connection goes away). */
#include "store.h"

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strophe.h>

#include "buf.h"
#include "scripts.h"
#include "store_internal.h"
#include "rconn.h"

#define KEY_EPOCH "rd:epoch"
#define TICK_MS 50
/* Puts per put_many call: Redis runs a call without a break, and 32 puts take it about 1 ms. */
#define PUT_BATCH_MAX 32

static void put_flush(store_t *st);
static void fail_unsent_puts(store_t *st);

static void maybe_free(store_t *st)
{
    if (st->closing && st->handles_closed == 2 && st->conns == 0) {
        for (unsigned i = 0; i < STORE_SHARDS; i++) {
            for (size_t k = 0; k < st->ixb[i].n; k++)
                free(st->ixb[i].args[k]);
            free(st->ixb[i].args);
        }
        proto_buf_free(&st->resp);
        free(st->host);
        free(st->socket);
        free(st->password);
        free(st);
    }
}

void store__conn_gone(store_t *st)
{
    st->conns--;
    maybe_free(st);
}

void store__on_conn(store_t *st, rconn_t *c, int ready, const char *err)
{
    if (st->closing || c->closing)
        return;
    if (c->primary) /* a put lane: its node is ready when both are */
        c = c->primary;
    if (st->cluster) {
        cluster__on_conn(st, c, ready, err);
        return;
    }
    bool now = rconn_ready(st->single);
    if (now == st->connected && now)
        return;
    st->connected = now;
    if (st->on_state && (now || !ready))
        st->on_state(st->ud, now, err);
}

/* The watchdog of one node: a WAIT may rightly keep its put lane silent for wait_timeout. */
void store__check_conn(store_t *st, rconn_t *c, uint64_t now)
{
    rconn_check(c, now, st->timeout_ms);
    if (c->twin)
        rconn_check(c->twin, now, st->timeout_ms + st->wait_timeout_ms);
}

static void on_tick(uv_timer_t *t)
{
    store_t *st = t->data;
    uint64_t now = uv_now(st->loop);
    if (st->closing)
        return;
    if (st->cluster)
        cluster__tick(st, now);
    else
        store__check_conn(st, st->single, now);
}

int store_create(uv_loop_t *loop, const store_config_t *cfg, store_state_cb on_state, void *ud,
                 store_t **out)
{
    store_t *st = calloc(1, sizeof *st);
    if (!st)
        return STORE_ENOMEM;
    st->host = strdup(cfg->host ? cfg->host : "127.0.0.1");
    st->socket = cfg->socket ? strdup(cfg->socket) : NULL;
    st->password = cfg->password ? strdup(cfg->password) : NULL;
    if (!st->host || (cfg->socket && !st->socket) || (cfg->password && !st->password)) {
        free(st->host);
        free(st->socket);
        free(st->password);
        free(st);
        return STORE_ENOMEM;
    }
    st->loop = loop;
    store_set_epoch(st, "0");
    snprintf(st->dedupe, sizeof st->dedupe, "%" PRIu64,
             (uint64_t)(cfg->dedupe_s ? cfg->dedupe_s : 86400) * 1000);
    st->port = cfg->port;
    st->timeout_ms = cfg->timeout_ms ? cfg->timeout_ms : 5000;
    st->max_inflight = cfg->max_inflight ? cfg->max_inflight : 10000;
    st->wait_replicas = cfg->wait_replicas;
    st->wait_timeout_ms = cfg->wait_timeout_ms ? cfg->wait_timeout_ms : 1000;
    st->on_state = on_state;
    st->ud = ud;
    for (int i = 0; i < STORE_SCRIPT_COUNT; i++) {
        const char *src = store_script_source((store_script_t)i);
        unsigned char digest[XMPP_SHA1_DIGEST_SIZE];
        xmpp_sha1_digest((const unsigned char *)src, strlen(src), digest);
        for (int b = 0; b < XMPP_SHA1_DIGEST_SIZE; b++)
            snprintf(st->sha[i] + 2 * b, 3, "%02x", digest[b]);
    }
    if (cfg->cluster && *cfg->cluster) {
        st->cluster = true;
        int rc = cluster__create(st, cfg->cluster);
        if (rc < 0) {
            free(st->host);
            free(st->socket);
            free(st->password);
            free(st);
            return rc;
        }
    } else if (!(st->single = rconn_create_node(st, st->host, st->port, st->socket,
                                                st->wait_replicas > 0))) {
        free(st->host);
        free(st->socket);
        free(st->password);
        free(st);
        return STORE_ENOMEM;
    }
    uv_timer_init(loop, &st->tick);
    st->tick.data = st;
    uv_check_init(loop, &st->turn_end);
    st->turn_end.data = st;
    uv_timer_start(&st->tick, on_tick, TICK_MS, TICK_MS);
    *out = st;
    return 0;
}

static void on_handle_closed(uv_handle_t *h)
{
    store_t *st = h->data;
    st->handles_closed++;
    maybe_free(st);
}

void store_close(store_t *st)
{
    /* While the connections still take commands. */
    store__index_flush(st);
    put_flush(st);
    fail_unsent_puts(st); /* the turn_end handle closes now */
    st->closing = true;
    st->connected = false;
    uv_timer_stop(&st->tick);
    uv_close((uv_handle_t *)&st->tick, on_handle_closed);
    uv_close((uv_handle_t *)&st->turn_end, on_handle_closed);
    if (st->cluster)
        cluster__close(st);
    else
        rconn_close(st->single);
}

bool store_is_connected(const store_t *st)
{
    return st->connected;
}

unsigned store_inflight(const store_t *st)
{
    return st->inflight;
}

/* ---- replies ------------------------------------------------------------------------------ */

bool store_reply_is_str(const redisReply *r)
{
    return r && (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS);
}

/* Views elements [from, from + 2n) of an array reply as (sid, blob) pairs. Returns -1 on a
 * malformed reply; *items is NULL when n == 0 and otherwise freed by the caller. */
int store_reply_pairs(const redisReply *arr, size_t from, store_item_t **items, size_t *n)
{
    *items = NULL;
    *n = 0;
    if (!arr || arr->type != REDIS_REPLY_ARRAY || arr->elements < from ||
        (arr->elements - from) % 2)
        return -1;
    size_t count = (arr->elements - from) / 2;
    if (count == 0)
        return 0;
    store_item_t *it = calloc(count, sizeof *it);
    if (!it)
        return -1;
    for (size_t i = 0; i < count; i++) {
        const redisReply *a = arr->element[from + 2 * i], *b = arr->element[from + 2 * i + 1];
        if (!store_reply_is_str(a) || !store_reply_is_str(b)) {
            free(it);
            return -1;
        }
        it[i].sid = a->str;
        it[i].blob = b->str;
        it[i].blob_len = b->len;
    }
    *items = it;
    *n = count;
    return 0;
}

static int reply_put(req_t *rq, const redisReply *r)
{
    store_put_result_t res = {0};
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 1 || !store_reply_is_str(r->element[0]))
        return -1;
    const char *tag = r->element[0]->str;
    if (strcmp(tag, "full") == 0 || strcmp(tag, "cold") == 0) {
        res.status = tag[0] == 'f' ? STORE_PUT_FULL : STORE_PUT_COLD;
        res.sid = "";
        rq->cb.put(rq->ud, 0, &res);
        return 0;
    }
    if (r->elements < 2 || !store_reply_is_str(r->element[1]))
        return -1;
    res.sid = r->element[1]->str;
    if (strcmp(tag, "dup") == 0)
        res.status = STORE_PUT_DUP;
    else if (strcmp(tag, "offline") == 0)
        res.status = STORE_PUT_OFFLINE;
    else if (strcmp(tag, "live") == 0)
        res.status = STORE_PUT_LIVE;
    else
        return -1;
    const char **resources = NULL;
    if (r->elements > 2) {
        resources = calloc(r->elements - 2, sizeof *resources);
        if (!resources)
            return -1;
        for (size_t i = 2; i < r->elements; i++) {
            if (!store_reply_is_str(r->element[i])) {
                free(resources);
                return -1;
            }
            resources[i - 2] = r->element[i]->str;
        }
    }
    res.resources = resources;
    res.nresources = r->elements - 2;
    rq->cb.put(rq->ud, 0, &res);
    free(resources);
    return 0;
}

static int reply_ack(req_t *rq, const redisReply *r)
{
    store_ack_result_t res = {0};
    store_item_t *items;
    size_t n;
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 3 ||
        r->element[0]->type != REDIS_REPLY_INTEGER || !store_reply_is_str(r->element[1]) ||
        r->element[2]->type != REDIS_REPLY_ARRAY || store_reply_pairs(r, 3, &items, &n) < 0)
        return -1;
    const redisReply *f = r->element[2];
    const char **found = f->elements ? calloc(f->elements, sizeof *found) : NULL;
    if (f->elements && !found) {
        free(items);
        return -1;
    }
    for (size_t i = 0; i < f->elements; i++) {
        if (!store_reply_is_str(f->element[i])) {
            free(found);
            free(items);
            return -1;
        }
        found[i] = f->element[i]->str;
    }
    res.items = items;
    res.n = n;
    res.archived = r->element[0]->integer == 1;
    res.known = r->element[1]->str;
    res.found = found;
    res.nfound = f->elements;
    rq->cb.ack(rq->ud, 0, &res);
    free(found);
    free(items);
    return 0;
}

/* Views an array of (sid, blob, acked, origin) quadruples; *out is freed by the caller. */
int store_reply_old_msgs(const redisReply *m, store_old_msg_t **out, size_t *n)
{
    *out = NULL;
    *n = 0;
    if (m->type != REDIS_REPLY_ARRAY || m->elements % 4)
        return -1;
    if (!m->elements)
        return 0;
    store_old_msg_t *v = calloc(m->elements / 4, sizeof *v);
    if (!v)
        return -1;
    for (size_t k = 0; k < m->elements / 4; k++) {
        for (int f = 0; f < 4; f++)
            if (!store_reply_is_str(m->element[4 * k + f])) {
                free(v);
                return -1;
            }
        v[k] = (store_old_msg_t){m->element[4 * k]->str, m->element[4 * k + 1]->str,
                                 m->element[4 * k + 1]->len, m->element[4 * k + 2]->str,
                                 m->element[4 * k + 3]->str};
    }
    *out = v;
    *n = m->elements / 4;
    return 0;
}

static void req_done(req_t *rq);
static void reply_fail(req_t *rq, int err);

/* Hands each put of a put_many call its own reply. */
static int reply_put_many(req_t *rq, const redisReply *r)
{
    if (r->type != REDIS_REPLY_ARRAY || r->elements != rq->nchildren)
        return -1;
    req_t *child = rq->children;
    rq->children = NULL;
    for (size_t i = 0; child; i++) {
        req_t *next = child->next;
        if (reply_put(child, r->element[i]) < 0)
            reply_fail(child, STORE_EREPLY);
        req_done(child);
        child = next;
    }
    return 0;
}

/* A registry (resource, epoch, ...) as online() reads it in storage/scripts.c: an entry counts
 * from the store's epoch on, and nobody does while that is 0 (no link yet). */
static int reply_online(req_t *rq, const redisReply *r)
{
    if (r->type != REDIS_REPLY_ARRAY || r->elements % 2)
        return -1;
    const char **res = r->elements ? calloc(r->elements / 2, sizeof *res) : NULL;
    if (r->elements && !res)
        return -1;
    unsigned long long cur = strtoull(rq->st->epoch, NULL, 10);
    size_t n = 0;
    for (size_t i = 0; i < r->elements; i += 2) {
        if (!store_reply_is_str(r->element[i]) || !store_reply_is_str(r->element[i + 1])) {
            free(res);
            return -1;
        }
        if (cur > 0 && strtoull(r->element[i + 1]->str, NULL, 10) >= cur)
            res[n++] = r->element[i]->str;
    }
    rq->cb.online(rq->ud, 0, res, n);
    free(res);
    return 0;
}

static int reply_dispatch(req_t *rq, const redisReply *r)
{
    store_item_t *items;
    size_t n;
    switch (rq->kind) {
    case REQ_PUT:
        return reply_put(rq, r);
    case REQ_PUT_MANY:
        return reply_put_many(rq, r);
    case REQ_ITEMS:
        if (store_reply_pairs(r, 0, &items, &n) < 0)
            return -1;
        rq->cb.items(rq->ud, 0, items, n);
        free(items);
        return 0;
    case REQ_ACK:
        return reply_ack(rq, r);
    case REQ_SWEEP:
        return sweep_on_reply(rq, r);
    case REQ_REGISTRY:
        if (r->type != REDIS_REPLY_INTEGER)
            return -1;
        store_index_user(rq->st, rq->user, r->integer > 0 ? "online" : "offline", 0);
        if (rq->cb.done)
            rq->cb.done(rq->ud, 0);
        return 0;
    case REQ_ONLINE:
        return reply_online(rq, r);
    case REQ_FLAG:
        if (r->type != REDIS_REPLY_INTEGER)
            return -1;
        rq->cb.flag(rq->ud, 0, r->integer == 1);
        return 0;
    case REQ_DONE:
        if (rq->cb.done)
            rq->cb.done(rq->ud, 0);
        return 0;
    case REQ_EPOCH: {
        char buf[32];
        if (r->type != REDIS_REPLY_INTEGER)
            return -1;
        snprintf(buf, sizeof buf, "%lld", r->integer);
        rq->cb.epoch(rq->ud, 0, buf);
        return 0;
    }
    case REQ_SUMMARY: {
        store_item_t ends[2] = {{0}};
        if (r->type != REDIS_REPLY_ARRAY || r->elements < 5 ||
            r->element[0]->type != REDIS_REPLY_INTEGER ||
            r->element[1]->type != REDIS_REPLY_INTEGER || !store_reply_is_str(r->element[2]) ||
            !store_reply_is_str(r->element[3]) || r->element[4]->type != REDIS_REPLY_INTEGER ||
            store_reply_pairs(r, 5, &items, &n) < 0)
            return -1;
        for (int i = 0; i < 2; i++) {
            ends[i].blob = r->element[2 + i]->str;
            ends[i].blob_len = r->element[2 + i]->len;
        }
        rq->cb.summary(rq->ud, 0, (uint64_t)r->element[0]->integer,
                       (uint64_t)r->element[1]->integer, ends, items, n,
                       r->element[4]->integer == 1);
        free(items);
        return 0;
    }
    case REQ_FETCH:
        if (r->type != REDIS_REPLY_ARRAY || r->elements < 3 ||
            r->element[0]->type != REDIS_REPLY_INTEGER || !store_reply_is_str(r->element[1]) ||
            r->element[2]->type != REDIS_REPLY_INTEGER || store_reply_pairs(r, 3, &items, &n) < 0)
            return -1;
        rq->cb.fetch(rq->ud, 0, r->element[0]->integer == 1,
                     r->element[1]->len ? r->element[1]->str : NULL, items, n,
                     r->element[2]->integer == 1);
        free(items);
        return 0;
    case REQ_VALUE:
        rq->cb.string(rq->ud, 0, store_reply_is_str(r) ? r->str : NULL);
        return 0;
    case REQ_STRING:
        if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 || !store_reply_is_str(r->element[1]))
            return -1;
        rq->cb.string(rq->ud, 0, r->element[1]->str);
        return 0;
    case REQ_IGNORE:
        return 0;
    }
    return -1;
}

/* Runs the request's callback with an error and no results. */
static void reply_fail(req_t *rq, int err)
{
    switch (rq->kind) {
    case REQ_PUT:
        rq->cb.put(rq->ud, err, NULL);
        break;
    case REQ_PUT_MANY:
        while (rq->children) {
            req_t *child = rq->children;
            rq->children = child->next;
            reply_fail(child, err);
            req_done(child);
        }
        break;
    case REQ_ITEMS:
        rq->cb.items(rq->ud, err, NULL, 0);
        break;
    case REQ_ACK:
        rq->cb.ack(rq->ud, err, NULL);
        break;
    case REQ_SWEEP:
        sweep_on_fail(rq, err);
        break;
    case REQ_FLAG:
        if (rq->cb.flag)
            rq->cb.flag(rq->ud, err, false);
        break;
    case REQ_DONE:
    case REQ_REGISTRY:
        if (rq->cb.done)
            rq->cb.done(rq->ud, err);
        break;
    case REQ_EPOCH:
        rq->cb.epoch(rq->ud, err, NULL);
        break;
    case REQ_ONLINE:
        rq->cb.online(rq->ud, err, NULL, 0);
        break;
    case REQ_SUMMARY:
        rq->cb.summary(rq->ud, err, 0, 0, NULL, NULL, 0, false);
        break;
    case REQ_FETCH:
        rq->cb.fetch(rq->ud, err, false, NULL, NULL, 0, false);
        break;
    case REQ_STRING:
    case REQ_VALUE:
        rq->cb.string(rq->ud, err, NULL);
        break;
    case REQ_IGNORE:
        break;
    }
}

static void req_done(req_t *rq)
{
    rq->st->inflight--;
    store_req_free(rq);
}

void store__req_fail(req_t *rq, int err)
{
    reply_fail(rq, err);
    req_done(rq);
}

/* A deep copy, for a reply that must outlive its callback (hiredis frees it on return). */
static redisReply *reply_dup(const redisReply *r)
{
    redisReply *d = calloc(1, sizeof *d);
    if (!d)
        return NULL;
    d->type = r->type;
    d->integer = r->integer;
    if (r->str) {
        if (!(d->str = malloc(r->len + 1))) {
            free(d);
            return NULL;
        }
        memcpy(d->str, r->str, r->len);
        d->str[r->len] = '\0';
        d->len = r->len;
    }
    if (r->elements) {
        if (!(d->element = calloc(r->elements, sizeof *d->element))) {
            freeReplyObject(d);
            return NULL;
        }
        d->elements = r->elements;
        for (size_t i = 0; i < r->elements; i++)
            if (!(d->element[i] = reply_dup(r->element[i]))) {
                freeReplyObject(d);
                return NULL;
            }
    }
    return d;
}

/* ---- the put lane: group commit with WAIT ------------------------------------------------- */

static void gc_send(rconn_t *lane);

/* WAIT answers how many replicas acknowledged every write this connection sent before it: every
 * put of the batch. Only then are their replies handed on. */
static void on_gc_wait(redisAsyncContext *ac, void *reply, void *privdata)
{
    (void)ac;
    rconn_t *lane = privdata;
    redisReply *r = reply;
    store_t *st = lane->st;
    rconn_on_reply(lane);
    bool ok = r && r->type == REDIS_REPLY_INTEGER && r->integer >= (long long)st->wait_replicas;
    lane->gc_degraded = !ok;
    req_t *batch = lane->gc_batch;
    lane->gc_batch = NULL;
    lane->gc_waiting = false;
    while (batch) {
        req_t *rq = batch;
        batch = rq->next;
        if (!ok)
            reply_fail(rq, STORE_EDOWN); /* on the master only: the sender retries, dedupe */
        else if (reply_dispatch(rq, rq->held) < 0)
            reply_fail(rq, STORE_EREPLY);
        req_done(rq);
    }
    if (lane->gc_pending.head)
        gc_send(lane);
}

/* Sends one WAIT for every put answered so far. While the replicas fall short it waits at most
 * 100 ms, so that puts fail soon after wait_timeout rather than one wait_timeout after another. */
static void gc_send(rconn_t *lane)
{
    store_t *st = lane->st;
    unsigned timeout = st->wait_timeout_ms;
    if (lane->gc_degraded && timeout > 100)
        timeout = 100;
    char n[16], t[16];
    snprintf(n, sizeof n, "%u", st->wait_replicas);
    snprintf(t, sizeof t, "%u", timeout);
    const char *argv[] = {"WAIT", n, t};
    lane->gc_batch = req_list_take(&lane->gc_pending);
    if (rconn_send(lane, on_gc_wait, lane, 3, argv, NULL) == 0) {
        lane->gc_waiting = true;
        return;
    }
    while (lane->gc_batch) {
        req_t *rq = lane->gc_batch;
        lane->gc_batch = rq->next;
        store__req_fail(rq, STORE_EDOWN);
    }
}

/* A put answered on its lane: it waits for the next WAIT. */
static void gc_add(rconn_t *lane, req_t *rq, const redisReply *r)
{
    if (!(rq->held = reply_dup(r))) {
        store__req_fail(rq, STORE_ENOMEM);
        return;
    }
    req_list_push(&lane->gc_pending, rq);
    if (!lane->gc_waiting)
        gc_send(lane);
}

void store__on_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    (void)ac;
    req_t *rq = privdata;
    redisReply *r = reply;
    store_t *st = rq->st;
    rconn_t *c = rq->conn;
    rconn_on_reply(c);
    rq->conn = NULL;
    if (!r) {
        if (st->cluster)
            cluster__on_lost(st, c);
        store__req_fail(rq, STORE_EDOWN);
        return;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        /* Scripts vanish on SCRIPT FLUSH or when a replica without them is promoted: reconnect,
         * which loads them again. This request fails; its sender retries. */
        if (strncmp(r->str, "NOSCRIPT", 8) == 0)
            rconn_reload(c, "scripts missing in Redis (NOSCRIPT); reloading");
        else if (st->cluster && cluster__on_error(st, rq, c, r))
            return;
        store__req_fail(rq, STORE_EREPLY);
        return;
    }
    if ((rq->kind == REQ_PUT || rq->kind == REQ_PUT_MANY) && st->wait_replicas) {
        gc_add(c, rq, r);
        return;
    }
    if (reply_dispatch(rq, r) < 0)
        reply_fail(rq, STORE_EREPLY);
    req_done(rq);
}

/* A copy of the command in one allocation, for a cluster to send it again. */
static int req_own_argv(req_t *rq, int argc, const char **argv, const size_t *lens)
{
    size_t bytes = 0;
    for (int i = 0; i < argc; i++)
        bytes += lens[i] + 1;
    char *block = malloc((size_t)argc * (sizeof(char *) + sizeof(size_t)) + bytes);
    if (!block)
        return STORE_ENOMEM;
    rq->argv = (const char **)(void *)block;
    rq->lens = (size_t *)(void *)(block + (size_t)argc * sizeof(char *));
    char *p = block + (size_t)argc * (sizeof(char *) + sizeof(size_t));
    for (int i = 0; i < argc; i++) {
        memcpy(p, argv[i], lens[i]);
        p[lens[i]] = '\0';
        rq->argv[i] = p;
        rq->lens[i] = lens[i];
        p += lens[i] + 1;
    }
    rq->argc = argc;
    return 0;
}

/* Sends argv as one command; rq is consumed either way. */
static int send_argv(store_t *st, req_t *rq, int argc, const char **argv, const size_t *lens)
{
    int rc = 0;
    if (st->closing || (st->cluster ? !cluster__has_map(st) : !st->connected))
        rc = STORE_EDOWN;
    else if (st->inflight >= st->max_inflight)
        rc = STORE_EBUSY;
    if (rc < 0) {
        store_req_free(rq);
        return rc;
    }
    rq->st = st;
    if (st->cluster) {
        if (req_own_argv(rq, argc, argv, lens) < 0) {
            store_req_free(rq);
            return STORE_ENOMEM;
        }
        st->inflight++;
        rq->deadline = uv_now(st->loop) + st->timeout_ms;
        cluster__dispatch(st, rq);
        return 0;
    }
    put_flush(st);
    rq->conn = rconn_lane(st->single, rq->put_lane);
    if (rconn_send(rq->conn, store__on_reply, rq, argc, argv, lens) < 0) {
        store_req_free(rq);
        return STORE_EDOWN;
    }
    st->inflight++;
    return 0;
}

/* ---- puts gathered per loop turn (a single Redis) ---------------------------------------- */

/* The layout of a put's command on a single Redis (store_put_message): EVALSHA, sha, "5", the
 * five keys, the epoch and the dedupe window, then the put's own eleven arguments. */
enum { PUT_KEYS = 5, PUT_ARGS = 11, PUT_ARGC = 3 + PUT_KEYS + 2 + PUT_ARGS };

static void fail_unsent_puts(store_t *st)
{
    req_t *rq = req_list_take(&st->puts_failed);
    while (rq) {
        req_t *next = rq->next;
        store__req_fail(rq, STORE_EDOWN);
        rq = next;
    }
}

static void on_turn_end(uv_check_t *h)
{
    store_t *st = h->data;
    uv_check_stop(h);
    st->turn_scheduled = false;
    store__index_flush(st);
    put_flush(st);
    fail_unsent_puts(st);
}

void store__schedule_turn_end(store_t *st)
{
    if (!st->turn_scheduled) {
        uv_check_start(&st->turn_end, on_turn_end);
        st->turn_scheduled = true;
    }
}

/* One put_many call carrying the n puts chained from all (not yet sent). Its command points into
 * theirs, which live until it is answered; argv, lens and the key count are one allocation. */
static req_t *put_many_new(store_t *st, req_t *all, unsigned n)
{
    size_t argc = 3 + n * (PUT_KEYS + PUT_ARGS) + 2;
    req_t *rq = store_req_new(REQ_PUT_MANY, NULL);
    char *mem = malloc(argc * (sizeof(char *) + sizeof(size_t)) + 16);
    if (!rq || !mem) {
        free(rq);
        free(mem);
        return NULL;
    }
    const char **argv = (const char **)(void *)mem;
    size_t *lens = (size_t *)(void *)(mem + argc * sizeof(char *));
    char *nkeys = mem + argc * (sizeof(char *) + sizeof(size_t));
    snprintf(nkeys, 16, "%u", n * PUT_KEYS);
    argv[0] = "EVALSHA";
    argv[1] = st->sha[STORE_SCRIPT_PUT_MANY];
    argv[2] = nkeys;
    for (int k = 0; k < 3; k++)
        lens[k] = strlen(argv[k]);
    /* The keys of every put, then the epoch and dedupe window (the same for all), then the
     * arguments of every put. */
    size_t at = 3, at_args = 3 + n * PUT_KEYS + 2;
    for (req_t *p = all; p; p = p->next) {
        memcpy(argv + at, p->argv + 3, PUT_KEYS * sizeof *argv);
        memcpy(lens + at, p->lens + 3, PUT_KEYS * sizeof *lens);
        memcpy(argv + at_args, p->argv + 3 + PUT_KEYS + 2, PUT_ARGS * sizeof *argv);
        memcpy(lens + at_args, p->lens + 3 + PUT_KEYS + 2, PUT_ARGS * sizeof *lens);
        at += PUT_KEYS;
        at_args += PUT_ARGS;
    }
    memcpy(argv + at, all->argv + 3 + PUT_KEYS, 2 * sizeof *argv);
    memcpy(lens + at, all->lens + 3 + PUT_KEYS, 2 * sizeof *lens);
    rq->argv = argv;
    rq->lens = lens;
    rq->argc = (int)argc;
    rq->children = all;
    rq->nchildren = n;
    rq->st = st;
    rq->put_lane = true;
    return rq;
}

/* On the put lane (the only connection unless wait_replicas): a request that cannot be sent
 * fails when the turn ends, not inside the store call that flushed it. */
static void put_send(store_t *st, req_t *rq)
{
    rq->conn = rconn_lane(st->single, true);
    if (rconn_send(rq->conn, store__on_reply, rq, rq->argc, rq->argv, rq->lens) < 0) {
        rq->conn = NULL;
        req_list_push(&st->puts_failed, rq);
        store__schedule_turn_end(st);
    }
}

/* Sends the gathered puts: one alone as itself, more as one put_many call whose reply
 * reply_put_many splits. That call counts as one more request in flight until it is answered
 * (its puts were counted when they were made). */
static void put_flush(store_t *st)
{
    unsigned n = st->nputs;
    req_t *all = req_list_take(&st->puts);
    st->nputs = 0;
    if (!all)
        return;
    req_t *batch = n > 1 ? put_many_new(st, all, n) : NULL;
    if (batch) {
        st->inflight++;
        put_send(st, batch);
        return;
    }
    /* One put, or no memory for the call: each goes alone. */
    while (all) {
        req_t *next = all->next;
        all->next = NULL;
        put_send(st, all);
        all = next;
    }
}

/* Takes a put on a single Redis: it leaves with the others of this loop turn. rq is consumed
 * either way. */
static int put_queue(store_t *st, req_t *rq, cmd_t *c)
{
    int rc = 0;
    if (st->closing || !st->connected)
        rc = STORE_EDOWN;
    else if (st->inflight >= st->max_inflight)
        rc = STORE_EBUSY;
    else if (c->argc != PUT_ARGC || req_own_argv(rq, c->argc, c->argv, c->lens) < 0)
        rc = STORE_ENOMEM;
    if (rc < 0) {
        store_req_free(rq);
        return rc;
    }
    rq->st = st;
    st->inflight++;
    req_list_push(&st->puts, rq);
    if (++st->nputs >= PUT_BATCH_MAX)
        put_flush(st);
    else
        store__schedule_turn_end(st);
    return 0;
}

void store_req_free(req_t *rq)
{
    if (rq) {
        free(rq->user);
        free(rq->argv);
        if (rq->held)
            freeReplyObject(rq->held);
        free(rq);
    }
}

req_t *store_req_new(req_kind_t kind, void *ud)
{
    req_t *rq = calloc(1, sizeof *rq);
    if (rq) {
        rq->kind = kind;
        rq->ud = ud;
    }
    return rq;
}

static void cmd_push(cmd_t *c, const char *s, size_t n)
{
    c->argv[c->argc] = s;
    c->lens[c->argc++] = n;
}

/* The epoch and the dedupe window go right after the script's keys, whatever the caller adds
 * next. */
static void cmd_epoch(cmd_t *c)
{
    if (c->epoch && c->argc == 3 + c->nkeys) {
        const char *e = c->epoch;
        c->epoch = NULL;
        cmd_push(c, e, strlen(e));
        cmd_push(c, c->dedupe, strlen(c->dedupe));
    }
}

void store_cmd_add(cmd_t *c, const char *s)
{
    cmd_epoch(c);
    cmd_push(c, s, strlen(s));
}

void store_cmd_add_bin(cmd_t *c, const char *s, size_t n)
{
    cmd_epoch(c);
    cmd_push(c, s, n);
}

/* Every put adds five numbers, its key prefix and an id suffix: written by hand, since snprintf,
 * eleven calls per put with the index keys, stood out in receiptd's profile of the store path. */
void store_cmd_add_num(cmd_t *c, int64_t v)
{
    char *buf = c->nums[c->nnums++];
    if (v < 0)
        *buf = '-';
    proto_format_u64(buf + (v < 0), v < 0 ? 0 - (uint64_t)v : (uint64_t)v);
    store_cmd_add(c, buf);
}

void store_cmd_evalsha(cmd_t *c, store_t *st, store_script_t s, int nkeys)
{
    c->argc = c->nnums = 0;
    c->epoch = NULL;
    store_cmd_add(c, "EVALSHA");
    store_cmd_add(c, st->sha[s]);
    store_cmd_add_num(c, nkeys);
    c->nkeys = nkeys;
    c->epoch = st->epoch;
    c->dedupe = st->dedupe;
}

void store_cmd_add_index(cmd_t *c, unsigned shard, char keys[4][INDEX_KEY_MAX])
{
    static const char *const names[4] = {"due", "online", "arch", "act"};
    for (int i = 0; i < 4; i++) {
        store_index_key(keys[i], INDEX_KEY_MAX, shard, names[i]);
        store_cmd_add(c, keys[i]);
    }
}

/* The user's key prefix, "rd:{user}". */
int store_user_prefix(char *buf, size_t len, const char *user)
{
    size_t ul = strlen(user);
    if (ul + 6 > len)
        return -1;
    memcpy(buf, "rd:{", 4);
    memcpy(buf + 4, user, ul);
    memcpy(buf + 4 + ul, "}", 2);
    return 0;
}

#define OKEY_MAX 4200

/* The common start of a per-user request: a request of kind for ud, and c set up as EVALSHA of
 * script s with the user's key prefix (in prefix, PREFIX_MAX bytes) as its one key. Returns 0 or
 * the error to hand back (nothing was allocated then). */
static int user_cmd(store_t *st, req_kind_t kind, void *ud, store_script_t s, const char *user,
                    char *prefix, cmd_t *c, req_t **out)
{
    if (store_user_prefix(prefix, PREFIX_MAX, user) < 0)
        return STORE_EREPLY;
    if (!(*out = store_req_new(kind, ud)))
        return STORE_ENOMEM;
    store_cmd_evalsha(c, st, s, 1);
    store_cmd_add(c, prefix);
    return 0;
}

int store_put_message(store_t *st, const store_put_t *p, store_put_cb cb, void *ud)
{
    char prefix[PREFIX_MAX], suffix[9];
    cmd_t c;
    if (store_user_prefix(prefix, sizeof prefix, p->user) < 0)
        return STORE_EREPLY;
    unsigned r = (unsigned)rand();
    for (int i = 7; i >= 0; i--, r >>= 4)
        suffix[i] = "0123456789abcdef"[r & 15];
    suffix[8] = '\0';
    req_t *rq = store_req_new(REQ_PUT, ud);
    if (!rq)
        return STORE_ENOMEM;
    rq->cb.put = cb;
    rq->put_lane = true;
    /* A single Redis runs the index updates inside the put script, atomically; a cluster needs
     * them sent first, to the shard's own slot (storage/sweep.c). */
    char keys[4][INDEX_KEY_MAX];
    if (st->cluster)
        store_index_put(st, p->user, p->track ? p->now_ms + p->retry_ms : 0, p->now_ms);
    store_cmd_evalsha(&c, st, STORE_SCRIPT_PUT, st->cluster ? 1 : 5);
    store_cmd_add(&c, prefix);
    if (!st->cluster)
        store_cmd_add_index(&c, store_user_shard(p->user), keys);
    store_cmd_add(&c, p->user);
    store_cmd_add(&c, p->sender);
    store_cmd_add(&c, p->orig_id ? p->orig_id : "");
    store_cmd_add(&c, suffix);
    store_cmd_add_bin(&c, p->blob, p->blob_len);
    store_cmd_add(&c, p->track ? "1" : "0");
    store_cmd_add_num(&c, p->now_ms);
    store_cmd_add_num(&c, p->retry_ms);
    store_cmd_add_num(&c, p->window_ms);
    store_cmd_add_num(&c, (int64_t)p->max_messages);
    store_cmd_add_num(&c, (int64_t)p->max_bytes);
    if (st->cluster)
        return store_send(st, rq, &c);
    cmd_epoch(&c);
    return put_queue(st, rq, &c);
}

int store_send(store_t *st, req_t *rq, cmd_t *c)
{
    cmd_epoch(c);
    return send_argv(st, rq, c->argc, c->argv, c->lens);
}

int store_send_list(store_t *st, req_t *rq, cmd_t *c, const char *const *list, size_t n)
{
    cmd_epoch(c);
    size_t argc = (size_t)c->argc + n;
    const char **argv = calloc(argc, sizeof *argv);
    size_t *lens = calloc(argc, sizeof *lens);
    int rc = STORE_ENOMEM;
    if (argv && lens) {
        memcpy(argv, c->argv, (size_t)c->argc * sizeof *argv);
        memcpy(lens, c->lens, (size_t)c->argc * sizeof *lens);
        for (size_t i = 0; i < n; i++) {
            argv[c->argc + i] = list[i];
            lens[c->argc + i] = strlen(list[i]);
        }
        rc = send_argv(st, rq, (int)argc, argv, lens);
    } else {
        free(rq);
    }
    free(argv);
    free(lens);
    return rc;
}

int store_ack_sids(store_t *st, const store_device_t *who, const char *const *sids, size_t n,
                   store_ack_cb cb, void *ud)
{
    char prefix[PREFIX_MAX];
    cmd_t c;
    req_t *rq;
    int rc = user_cmd(st, REQ_ACK, ud, STORE_SCRIPT_ACK, who->user, prefix, &c, &rq);
    if (rc < 0)
        return rc;
    rq->cb.ack = cb;
    store_cmd_add(&c, who->device);
    store_cmd_add_num(&c, who->now_ms);
    store_cmd_add(&c, "sid");
    return store_send_list(st, rq, &c, sids, n);
}

static int origin_key(char *buf, size_t len, const char *sender, const char *orig_id)
{
    int n = snprintf(buf, len, "%s %s", sender, orig_id);
    return n > 0 && (size_t)n < len ? 0 : -1;
}

int store_ack_origin(store_t *st, const store_device_t *who, const char *sender,
                     const char *orig_id, store_ack_cb cb, void *ud)
{
    char prefix[PREFIX_MAX], okey[OKEY_MAX];
    cmd_t c;
    if (store_user_prefix(prefix, sizeof prefix, who->user) < 0 ||
        origin_key(okey, sizeof okey, sender, orig_id) < 0)
        return STORE_EREPLY;
    req_t *rq = store_req_new(REQ_ACK, ud);
    if (!rq)
        return STORE_ENOMEM;
    rq->cb.ack = cb;
    store_cmd_evalsha(&c, st, STORE_SCRIPT_ACK, 1);
    store_cmd_add(&c, prefix);
    store_cmd_add(&c, who->device);
    store_cmd_add_num(&c, who->now_ms);
    store_cmd_add(&c, "orig");
    store_cmd_add(&c, okey);
    return store_send(st, rq, &c);
}

/* Presence changes and bounces keep the online index in step with the registry (REQ_REGISTRY). */
static req_t *registry_req(const char *user, store_done_cb cb, void *ud)
{
    req_t *rq = store_req_new(REQ_REGISTRY, ud);
    if (rq && !(rq->user = strdup(user))) {
        free(rq);
        return NULL;
    }
    if (rq)
        rq->cb.done = cb;
    return rq;
}

int store_bounce(store_t *st, const char *user, const char *resource, store_done_cb cb, void *ud)
{
    char prefix[PREFIX_MAX];
    cmd_t c;
    if (store_user_prefix(prefix, sizeof prefix, user) < 0)
        return STORE_EREPLY;
    req_t *rq = registry_req(user, cb, ud);
    if (!rq)
        return STORE_ENOMEM;
    store_cmd_evalsha(&c, st, STORE_SCRIPT_BOUNCE, 1);
    store_cmd_add(&c, prefix);
    store_cmd_add(&c, user);
    store_cmd_add(&c, resource);
    return store_send(st, rq, &c);
}

int store_presence(store_t *st, store_presence_op_t op, const char *user, const char *resource,
                   int64_t now_ms, store_done_cb cb, void *ud)
{
    static const char *const ops[] = {"set", "del", "verify"};
    char prefix[PREFIX_MAX];
    cmd_t c;
    if (store_user_prefix(prefix, sizeof prefix, user) < 0)
        return STORE_EREPLY;
    req_t *rq = registry_req(user, cb, ud);
    if (!rq)
        return STORE_ENOMEM;
    store_cmd_evalsha(&c, st, STORE_SCRIPT_PRESENCE, 1);
    store_cmd_add(&c, prefix);
    store_cmd_add(&c, ops[op]);
    store_cmd_add(&c, user);
    store_cmd_add(&c, resource);
    store_cmd_add_num(&c, now_ms);
    return store_send(st, rq, &c);
}

void store_set_epoch(store_t *st, const char *epoch)
{
    snprintf(st->epoch, sizeof st->epoch, "%s", epoch && *epoch ? epoch : "0");
}

/* Sends a plain command (no script) of one argument for rq; rq is consumed either way. */
static int send_plain(store_t *st, req_t *rq, const char *name, const char *arg)
{
    cmd_t c; /* not cleared whole: store_online runs once per acked page and sender */
    c.argc = c.nnums = 0;
    c.epoch = NULL;
    store_cmd_add(&c, name);
    store_cmd_add(&c, arg);
    return store_send(st, rq, &c);
}

int store_online(store_t *st, const char *user, store_online_cb cb, void *ud)
{
    char key[PREFIX_MAX + 2];
    if (store_user_prefix(key, PREFIX_MAX, user) < 0)
        return STORE_EREPLY;
    strcat(key, ":r");
    req_t *rq = store_req_new(REQ_ONLINE, ud);
    if (!rq)
        return STORE_ENOMEM;
    rq->cb.online = cb;
    return send_plain(st, rq, "HGETALL", key);
}

int store_epoch_get(store_t *st, store_string_cb cb, void *ud)
{
    req_t *rq = store_req_new(REQ_VALUE, ud);
    if (!rq)
        return STORE_ENOMEM;
    rq->cb.string = cb;
    return send_plain(st, rq, "GET", KEY_EPOCH);
}

int store_epoch_next(store_t *st, store_epoch_cb cb, void *ud)
{
    req_t *rq = store_req_new(REQ_EPOCH, ud);
    if (!rq)
        return STORE_ENOMEM;
    rq->cb.epoch = cb;
    return send_plain(st, rq, "INCR", KEY_EPOCH);
}

int store_summary(store_t *st, const store_device_t *who, unsigned max, store_summary_cb cb,
                  void *ud)
{
    char prefix[PREFIX_MAX];
    cmd_t c;
    req_t *rq;
    int rc = user_cmd(st, REQ_SUMMARY, ud, STORE_SCRIPT_SUMMARY, who->user, prefix, &c, &rq);
    if (rc < 0)
        return rc;
    rq->cb.summary = cb;
    store_cmd_add(&c, who->device);
    store_cmd_add_num(&c, who->now_ms);
    store_cmd_add_num(&c, max);
    return store_send(st, rq, &c);
}

int store_fetch(store_t *st, const store_device_t *who, uint64_t after_seq, unsigned max,
                size_t max_bytes, size_t overhead, store_fetch_cb cb, void *ud)
{
    char prefix[PREFIX_MAX];
    cmd_t c;
    req_t *rq;
    int rc = user_cmd(st, REQ_FETCH, ud, STORE_SCRIPT_FETCH, who->user, prefix, &c, &rq);
    if (rc < 0)
        return rc;
    rq->cb.fetch = cb;
    store_cmd_add(&c, who->device);
    store_cmd_add_num(&c, who->now_ms);
    store_cmd_add_num(&c, (int64_t)after_seq);
    store_cmd_add_num(&c, max);
    store_cmd_add_num(&c, (int64_t)max_bytes);
    store_cmd_add_num(&c, (int64_t)overhead);
    return store_send(st, rq, &c);
}

int store_activity(store_t *st, const char *user, int64_t now_ms, int64_t forget_ms,
                   store_flag_cb cb, void *ud)
{
    char prefix[PREFIX_MAX];
    cmd_t c;
    req_t *rq;
    int rc = user_cmd(st, REQ_FLAG, ud, STORE_SCRIPT_ACTIVITY, user, prefix, &c, &rq);
    if (rc < 0)
        return rc;
    rq->cb.flag = cb;
    store_index_user(st, user, "active", now_ms);
    store_cmd_add_num(&c, now_ms);
    store_cmd_add_num(&c, forget_ms);
    return store_send(st, rq, &c);
}

int store_restore(store_t *st, const store_user_state_t *s, int64_t now_ms, store_done_cb cb,
                  void *ud)
{
    char prefix[PREFIX_MAX];
    cmd_t c;
    req_t *rq;
    int rc = user_cmd(st, REQ_DONE, ud, STORE_SCRIPT_RESTORE, s->user, prefix, &c, &rq);
    if (rc < 0)
        return rc;
    rq->cb.done = cb;
    store_index_user(st, s->user, "restored", now_ms);
    store_cmd_add_num(&c, (int64_t)s->seq);
    store_cmd_add(&c, s->archived ? "1" : "0");
    return store_send_list(st, rq, &c, s->devices, 2 * s->ndevices);
}

int store_config_get(store_t *st, const char *param, store_string_cb cb, void *ud)
{
    cmd_t c = {0};
    req_t *rq = store_req_new(REQ_STRING, ud);
    if (!rq)
        return STORE_ENOMEM;
    rq->cb.string = cb;
    store_cmd_add(&c, "CONFIG");
    store_cmd_add(&c, "GET");
    store_cmd_add(&c, param);
    return store_send(st, rq, &c);
}
