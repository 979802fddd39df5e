/* The Redis Cluster side of the store: the slot map (storage/cluster_map.c) kept fresh from
 * CLUSTER SLOTS, one rconn per master, routing each request to its slot's master, and what a
 * cluster client must do with MOVED, ASK, TRYAGAIN, CLUSTERDOWN and LOADING.
 *
 * A request that cannot be sent now (its master is down or still connecting, its slot is
 * moving, the cluster is failing over) is parked and tried again every few tens of
 * milliseconds until the store's timeout, then fails with STORE_EDOWN: a failover then costs the
 * senders a delay rather than an error. A request whose connection dropped after it was sent is
 * not sent again (it may have run); it fails, and its sender retries (dedupe).
 *
 * ASK is followed only for plain commands. Our scripts declare one key, the user's prefix
 * `rd:{user}`, which never exists: during a slot migration the source node therefore answers ASK
 * even while the user's keys are still on it, and the target would run the script on the half
 * that already moved. Such a request waits instead, until the migration ends and MOVED names the
 * new owner (storage/SCHEMA.md, "Cluster").
 *
 * Ownership: struct cluster belongs to the store; node->conn of every master in the map is an
 * rconn it owns; `probe` is a connection used only to fetch the map while no master answers. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cluster_map.h"
#include "rconn.h"
#include "store_internal.h"

#define REFRESH_MIN_MS 100   /* between two CLUSTER SLOTS while something is wrong */
#define REFRESH_IDLE_MS 5000 /* between two CLUSTER SLOTS when all is well */
#define PARK_MAX_MS 200      /* the longest pause before a parked request is tried again */
#define REDIRECTS_MAX 16

struct cluster {
    cluster_map_t *map;
    cluster_seed_t seeds[CLUSTER_SEEDS_MAX];
    size_t nseeds;
    bool have_map;
    rconn_t *probe;
    unsigned probe_next; /* rotates over the seeds, then the known nodes */
    bool refreshing;     /* a CLUSTER SLOTS in flight (or a probe connecting to send one) */
    bool refresh_wanted;
    uint64_t last_refresh;
    char down_reason[CLUSTER_HOST_MAX + 256];
    req_list_t parked;
};

bool cluster__has_map(const store_t *st)
{
    return st->cl && st->cl->have_map;
}

static void park(store_t *st, req_t *rq, unsigned delay_ms)
{
    struct cluster *cl = st->cl;
    rq->not_before = uv_now(st->loop) + delay_ms;
    req_list_push(&cl->parked, rq);
}

/* The backoff of one request: 10, 20, 40 ... ms, at most PARK_MAX_MS. */
static unsigned park_delay(req_t *rq)
{
    unsigned n = rq->tries < 5 ? rq->tries : 5;
    unsigned d = 10u << n;
    return d > PARK_MAX_MS ? PARK_MAX_MS : d;
}

static void want_refresh(struct cluster *cl)
{
    cl->refresh_wanted = true;
}

static rconn_t *node_conn(store_t *st, cluster_node_t *node)
{
    if (!node->conn)
        node->conn = rconn_create_node(st, node->host, node->port, NULL, st->wait_replicas > 0);
    return node->conn;
}

/* Connected means: a map with every slot served, and every master's connection ready. */
static void update_state(store_t *st, const char *err)
{
    struct cluster *cl = st->cl;
    bool ok = cl->have_map;
    for (unsigned s = 0; ok && s < STORE_SLOTS; s++)
        if (cl->map->slot[s] < 0) {
            ok = false;
            snprintf(cl->down_reason, sizeof cl->down_reason, "slot %u has no master", s);
        }
    for (int i = 0; ok && i < cl->map->nnodes; i++) {
        cluster_node_t *n = cluster_map_node(cl->map, i);
        if (!n || !n->master)
            continue;
        rconn_t *c = n->conn;
        if (!rconn_ready(c)) {
            ok = false;
            snprintf(cl->down_reason, sizeof cl->down_reason, "master %s:%d %s", n->host, n->port,
                     err ? err : "not connected");
        }
    }
    if (!cl->have_map)
        snprintf(cl->down_reason, sizeof cl->down_reason, "no slot map yet%s%s", err ? ": " : "",
                 err ? err : "");
    if (ok == st->connected && (ok || !err))
        return;
    st->connected = ok;
    if (!ok)
        want_refresh(cl);
    if (st->on_state)
        st->on_state(st->ud, ok, ok ? NULL : cl->down_reason);
}

static void on_drop(void *ud, cluster_node_t *node)
{
    (void)ud;
    rconn_close(node->conn);
    node->conn = NULL;
}

static void on_slots(redisAsyncContext *ac, void *reply, void *privdata)
{
    (void)ac;
    rconn_t *c = privdata;
    store_t *st = c->st;
    struct cluster *cl = st->cl;
    redisReply *r = reply;
    rconn_on_reply(c);
    if (st->closing)
        return;
    cl->refreshing = false;
    if (c == cl->probe) {
        cl->probe = NULL;
        rconn_close(c);
    }
    if (!r || r->type != REDIS_REPLY_ARRAY ||
        cluster_map_from_slots(cl->map, r, c->host, on_drop, st) < 0) {
        want_refresh(cl);
        update_state(st, r && r->type == REDIS_REPLY_ERROR ? r->str : "bad CLUSTER SLOTS reply");
        return;
    }
    cl->have_map = true;
    /* A master demoted to replica keeps no connection; a new master gets one. */
    for (int i = 0; i < cl->map->nnodes; i++) {
        cluster_node_t *n = cluster_map_node(cl->map, i);
        if (!n)
            continue;
        if (n->master)
            node_conn(st, n);
        else if (n->conn) {
            rconn_close(n->conn);
            n->conn = NULL;
        }
    }
    update_state(st, NULL);
    /* Whatever waited for a route may have one now. */
    for (req_t *p = cl->parked.head; p; p = p->next)
        p->not_before = 0;
}

static void send_slots(store_t *st, rconn_t *c)
{
    struct cluster *cl = st->cl;
    const char *argv[] = {"CLUSTER", "SLOTS"};
    if (rconn_send(c, on_slots, c, 2, argv, NULL) == 0) {
        cl->refreshing = true;
        cl->refresh_wanted = false;
        cl->last_refresh = uv_now(st->loop);
    }
}

/* Asks a ready master for the map, or, when none is, opens a probe to the next address: the
 * seeds first, then every node the map knows (a whole cluster may have moved to new ports). */
static void refresh(store_t *st)
{
    struct cluster *cl = st->cl;
    if (cl->refreshing || cl->probe)
        return;
    int n = cl->map->nnodes;
    for (int k = 0; k < n; k++) {
        cluster_node_t *node =
            cluster_map_node(cl->map, (int)((cl->probe_next + (unsigned)k) % (unsigned)n));
        rconn_t *c = node && node->master ? node->conn : NULL;
        if (c && c->ready) {
            cl->probe_next++;
            send_slots(st, c);
            return;
        }
    }
    unsigned total = (unsigned)cl->nseeds + (unsigned)n;
    for (unsigned k = 0; k < total; k++) {
        unsigned i = cl->probe_next++ % total;
        const char *host;
        int port;
        if (i < cl->nseeds) {
            host = cl->seeds[i].host;
            port = cl->seeds[i].port;
        } else {
            cluster_node_t *node = cluster_map_node(cl->map, (int)(i - cl->nseeds));
            if (!node)
                continue;
            host = node->host;
            port = node->port;
        }
        cl->probe = rconn_create(st, host, port, NULL, true);
        cl->last_refresh = uv_now(st->loop);
        return;
    }
}

void cluster__on_conn(store_t *st, rconn_t *c, int ready, const char *err)
{
    struct cluster *cl = st->cl;
    if (c == cl->probe) {
        if (ready && (send_slots(st, c), cl->refreshing)) {
            return;
        } else {
            /* Unreachable: try the next address at the next tick. */
            cl->probe = NULL;
            rconn_close(c);
            want_refresh(cl);
            if (!cl->have_map)
                update_state(st, err);
        }
        return;
    }
    if (!ready)
        want_refresh(cl); /* a master that went away may have been replaced */
    update_state(st, err);
    if (ready)
        for (req_t *p = cl->parked.head; p; p = p->next)
            p->not_before = 0;
}

int cluster__create(store_t *st, const char *seeds)
{
    struct cluster *cl = calloc(1, sizeof *cl);
    if (!cl)
        return STORE_ENOMEM;
    if (cluster_parse_seeds(seeds, cl->seeds, CLUSTER_SEEDS_MAX, &cl->nseeds) < 0 ||
        cl->nseeds == 0) {
        free(cl);
        return STORE_EREPLY;
    }
    if (!(cl->map = cluster_map_create())) {
        free(cl);
        return STORE_ENOMEM;
    }
    st->cl = cl;
    snprintf(cl->down_reason, sizeof cl->down_reason, "no slot map yet");
    refresh(st);
    return 0;
}

void cluster__close(store_t *st)
{
    struct cluster *cl = st->cl;
    if (!cl)
        return;
    /* Parked requests fail now; those in flight fail as their connections close. */
    for (req_t *next, *rq = req_list_take(&cl->parked); rq; rq = next) {
        next = rq->next;
        store__req_fail(rq, STORE_EDOWN);
    }
    rconn_close(cl->probe);
    cl->probe = NULL;
    for (int i = 0; i < cl->map->nnodes; i++) {
        cluster_node_t *n = cluster_map_node(cl->map, i);
        if (n && n->conn) {
            rconn_close(n->conn);
            n->conn = NULL;
        }
    }
    cluster_map_free(cl->map);
    free(cl);
    st->cl = NULL;
}

static void send_to(store_t *st, req_t *rq, rconn_t *c)
{
    rq->conn = c = rconn_lane(c, rq->put_lane);
    if (rconn_send(c, store__on_reply, rq, rq->argc, rq->argv, rq->lens) < 0) {
        rq->conn = NULL;
        park(st, rq, park_delay(rq));
    }
}

void cluster__dispatch(store_t *st, req_t *rq)
{
    struct cluster *cl = st->cl;
    int i = cluster_map_node_for_command(cl->map, rq->argc, rq->argv, rq->lens);
    if (i == CLUSTER_ENOROUTE) {
        want_refresh(cl);
        park(st, rq, park_delay(rq));
        return;
    }
    if (i < 0) { /* a command of ours that a cluster cannot run: a bug, not a wait */
        store__req_fail(rq, STORE_EREPLY);
        return;
    }
    rconn_t *c = node_conn(st, cluster_map_node(cl->map, i));
    if (!rconn_ready(c)) {
        park(st, rq, park_delay(rq));
        return;
    }
    send_to(st, rq, c);
}

static void on_asking(redisAsyncContext *ac, void *reply, void *privdata)
{
    (void)ac;
    (void)reply;
    rconn_on_reply(privdata);
}

static bool is_script(const req_t *rq)
{
    return rq->argc > 0 &&
           (strcasecmp(rq->argv[0], "EVALSHA") == 0 || strcasecmp(rq->argv[0], "EVAL") == 0);
}

bool cluster__on_error(store_t *st, req_t *rq, rconn_t *c, const redisReply *r)
{
    struct cluster *cl = st->cl;
    cluster_redirect_t rd;
    if (!cl) /* closing: replies still arrive on the connections being closed */
        return false;
    int kind = cluster_parse_redirect(r->str, r->len, &rd);
    if (kind < 0) {
        /* A MOVED or ASK without a usable address: the map knows better. */
        if (strncmp(r->str, "MOVED", 5) != 0 && strncmp(r->str, "ASK", 3) != 0)
            return false;
        want_refresh(cl);
        park(st, rq, park_delay(rq));
        return true;
    }
    if (kind == CLUSTER_REPLY_OTHER)
        return false;
    if (kind == CLUSTER_REPLY_MOVED && ++rq->redirects > REDIRECTS_MAX)
        return false; /* a redirect loop: the request fails, its sender retries */
    switch (kind) {
    case CLUSTER_REPLY_MOVED:
        want_refresh(cl);
        if (cluster_map_apply_moved(cl->map, &rd, c->host) < 0) {
            park(st, rq, park_delay(rq));
            return true;
        }
        cluster__dispatch(st, rq);
        return true;
    case CLUSTER_REPLY_ASK: {
        if (is_script(rq)) {
            park(st, rq, park_delay(rq)); /* wait for the migration to end (see the top) */
            return true;
        }
        int i = cluster_map_add_node(cl->map, rd.host[0] ? rd.host : c->host, rd.port, true);
        rconn_t *to = i >= 0 ? node_conn(st, cluster_map_node(cl->map, i)) : NULL;
        const char *asking[] = {"ASKING"};
        /* ASKING holds for the next command on the same connection only; nothing can come in
         * between, as both are written before the loop runs again. */
        if (!to || !to->ready || rconn_send(to, on_asking, to, 1, asking, NULL) < 0) {
            park(st, rq, park_delay(rq));
            return true;
        }
        send_to(st, rq, to);
        return true;
    }
    case CLUSTER_REPLY_DOWN:
        want_refresh(cl);
        park(st, rq, park_delay(rq));
        return true;
    default: /* TRYAGAIN, LOADING */
        park(st, rq, park_delay(rq));
        return true;
    }
}

void cluster__on_lost(store_t *st, rconn_t *c)
{
    (void)c;
    if (st->cl)
        want_refresh(st->cl);
}

void cluster__tick(store_t *st, uint64_t now)
{
    struct cluster *cl = st->cl;
    for (int i = 0; i < cl->map->nnodes; i++) {
        cluster_node_t *n = cluster_map_node(cl->map, i);
        if (n && n->conn)
            store__check_conn(st, n->conn, now);
    }
    if (cl->probe)
        rconn_check(cl->probe, now, st->timeout_ms);
    /* While something is wrong, ask for the map every REFRESH_MIN_MS; when all is well, every
     * few seconds anyway, so that a failover with no traffic on the moved slots is still seen. */
    uint64_t every = (cl->refresh_wanted || !st->connected) ? REFRESH_MIN_MS : REFRESH_IDLE_MS;
    if (now - cl->last_refresh >= every)
        refresh(st);
    req_t *list = req_list_take(&cl->parked);
    while (list) {
        req_t *rq = list;
        list = rq->next;
        if (now >= rq->deadline)
            store__req_fail(rq, STORE_EDOWN);
        else if (now >= rq->not_before) {
            rq->tries++;
            cluster__dispatch(st, rq);
        } else
            park(st, rq, (unsigned)(rq->not_before - now));
    }
}
