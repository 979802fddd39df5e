/* Internals of storage/store.c shared with storage/sweep.c (the index sweeps); nothing else
 * includes this. */
#ifndef RECEIPTD_STORAGE_STORE_INTERNAL_H
#define RECEIPTD_STORAGE_STORE_INTERNAL_H

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdbool.h>

#include "buf.h"
#include "scripts.h"
#include "slots.h"
#include "store.h"

struct cluster;

/* The index_put calls of one shard gathered during one turn of the loop (storage/sweep.c). */
typedef struct index_batch {
    char **args; /* user, due, now, user, ... (owned) */
    size_t n, cap;
} index_batch_t;

typedef enum {
    REQ_PUT,
    REQ_PUT_MANY, /* the puts of a loop turn in one script call (children) */
    REQ_ITEMS,
    REQ_ACK,
    REQ_FLAG,
    REQ_DONE,
    REQ_EPOCH,
    REQ_SUMMARY,
    REQ_FETCH,
    REQ_STRING,
    REQ_VALUE,    /* a plain string reply (or nil) */
    REQ_REGISTRY, /* presence and bounce: keeps the online index in step */
    REQ_ONLINE,   /* store_online: a user's registry, filtered by the epoch */
    REQ_IGNORE,
    REQ_SWEEP /* storage/sweep.c */
} req_kind_t;

struct sweep;

typedef struct req {
    store_t *st;
    req_kind_t kind;
    union {
        store_put_cb put;
        store_items_cb items;
        store_ack_cb ack;
        store_flag_cb flag;
        store_done_cb done;
        store_epoch_cb epoch;
        store_summary_cb summary;
        store_fetch_cb fetch;
        store_string_cb string;
        store_online_cb online;
    } cb;
    void *ud;
    struct sweep *sweep; /* REQ_SWEEP */
    int step;            /* REQ_SWEEP: which reply this is */
    char *user;          /* REQ_SWEEP, REQ_REGISTRY: owned */
    unsigned shard;
    struct rconn *conn; /* where the command waits for its reply */
    redisReply *held;   /* a put's reply, kept while WAIT runs (owned) */
    /* A cluster may have to send the command again (MOVED, ASK, TRYAGAIN): it keeps a copy. */
    int argc;
    const char **argv; /* one allocation with lens and the bytes */
    size_t *lens;
    uint64_t deadline;    /* loop time after which a parked request fails */
    uint64_t not_before;  /* loop time before which a parked request is not sent again */
    unsigned redirects;   /* MOVED followed */
    unsigned tries;       /* times parked and sent again */
    bool put_lane;        /* a put or its index write: to the put lane, when there is one */
    struct req *next;     /* the parked list */
    struct req *children; /* REQ_PUT_MANY: its puts, oldest first, chained through next */
    unsigned nchildren;
} req_t;

/* A FIFO of requests linked through their next field: parked requests, puts waiting for WAIT. */
typedef struct req_list {
    req_t *head, *tail;
} req_list_t;

static inline void req_list_push(req_list_t *l, req_t *rq)
{
    rq->next = NULL;
    if (l->tail)
        l->tail->next = rq;
    else
        l->head = rq;
    l->tail = rq;
}

/* Empties the list and returns its chain, oldest first. */
static inline req_t *req_list_take(req_list_t *l)
{
    req_t *all = l->head;
    l->head = l->tail = NULL;
    return all;
}

struct store {
    uv_loop_t *loop;
    char *host;
    int port;
    char *socket;
    char *password;
    unsigned timeout_ms;
    uv_timer_t tick; /* the watchdog; in a cluster also parked requests and map refreshes */
    unsigned max_inflight;
    bool connected; /* a single Redis: its connection is ready; a cluster: every master's is */
    bool closing;
    int handles_closed; /* of tick and turn_end */
    unsigned conns;     /* rconns not yet freed: the store outlives them */
    unsigned inflight;  /* requests accepted and not yet answered (sent, parked or waiting) */
    char sha[STORE_SCRIPT_COUNT][41];
    store_state_cb on_state;
    void *ud;
    char epoch[24];  /* the link epoch every script gets as its first argument */
    char dedupe[24]; /* and the dedupe window in ms, its second (storage/scripts.c) */
    bool cluster;    /* Redis Cluster (storage/cluster.c): no script may touch two slots */
    struct rconn *single;
    struct cluster *cl;
    index_batch_t ixb[STORE_SHARDS];
    /* A single Redis: the puts of a loop turn, sent as one put_many call when the turn ends or
     * before any other command (so Redis still sees every command in the order it was made). */
    req_list_t puts;
    unsigned nputs;
    /* Gathered puts that could not be sent: they fail when the turn ends, so that no put's
     * callback runs inside another store call (put_flush runs from several). */
    req_list_t puts_failed;
    uv_check_t turn_end; /* flushes what a loop turn gathered: ixb and puts */
    bool turn_scheduled;
    proto_buf_t resp;       /* rconn_send writes each command's RESP here, then hiredis copies it */
    unsigned wait_replicas; /* WAIT for this many replicas after a put, before answering it */
    unsigned wait_timeout_ms;
};

/* Most commands are an EVALSHA of short string arguments; this builds and sends one. args may
 * hold up to 24 entries, plus an optional binary blob appended last. */
#define MAX_ARGS 32
typedef struct cmd {
    const char *argv[MAX_ARGS];
    size_t lens[MAX_ARGS];
    int argc;
    char nums[8][24];
    int nnums;
    int nkeys;
    const char *epoch;  /* still to add after the keys; NULL once added (or not a script) */
    const char *dedupe; /* added with the epoch */
} cmd_t;

#define PREFIX_MAX 3200
#define INDEX_KEY_MAX 32

req_t *store_req_new(req_kind_t kind, void *ud);
void store_req_free(req_t *rq); /* NULL is fine */
void store_cmd_add(cmd_t *c, const char *s);
void store_cmd_add_bin(cmd_t *c, const char *s, size_t n);
void store_cmd_add_num(cmd_t *c, int64_t v);
/* EVALSHA of script s with nkeys keys; the epoch and the dedupe window go in as the first two
 * arguments after them. */
void store_cmd_evalsha(cmd_t *c, store_t *st, store_script_t s, int nkeys);
/* Adds the four index keys of a shard (due, online, arch, act); keys points at 4 buffers. */
void store_cmd_add_index(cmd_t *c, unsigned shard, char keys[4][INDEX_KEY_MAX]);
/* Sends c (then list[0..n)); rq is consumed either way. */
int store_send(store_t *st, req_t *rq, cmd_t *c);
int store_send_list(store_t *st, req_t *rq, cmd_t *c, const char *const *list, size_t n);
int store_user_prefix(char *buf, size_t len, const char *user);
bool store_reply_is_str(const redisReply *r);
int store_reply_pairs(const redisReply *arr, size_t from, store_item_t **items, size_t *n);
int store_reply_old_msgs(const redisReply *m, store_old_msg_t **out, size_t *n);

/* Completes a request with an error (its callback runs) and frees it. */
void store__req_fail(req_t *rq, int err);
/* hiredis' reply callback of every request (privdata: the req_t). */
void store__on_reply(redisAsyncContext *ac, void *reply, void *privdata);
/* The watchdog for one node's connection(s). */
void store__check_conn(store_t *st, struct rconn *c, uint64_t now);

/* storage/cluster.c */
int cluster__create(store_t *st, const char *seeds);
void cluster__close(store_t *st);
void cluster__on_conn(store_t *st, struct rconn *c, int ready, const char *err);
/* Routes rq (which owns its argv) to its slot's master, or parks it for a retry. */
void cluster__dispatch(store_t *st, req_t *rq);
/* An error reply from c: true when it was a redirect or a retryable cluster error and rq was
 * sent again or parked; false when it is the request's own error. */
bool cluster__on_error(store_t *st, req_t *rq, struct rconn *c, const redisReply *r);
/* c dropped a request (NULL reply): the map may have changed. */
void cluster__on_lost(store_t *st, struct rconn *c);
void cluster__tick(store_t *st, uint64_t now);
bool cluster__has_map(const store_t *st);

/* storage/sweep.c: index writes (fire and forget), and the replies and failures of REQ_SWEEP
 * requests. which: 1 due, 3 arch, 4 act (the index scripts' KEYS order). */
/* In a cluster the index writes of the puts are gathered per shard and sent at the end of the
 * loop turn, one script call per shard (store__index_flush); a single Redis has them inside the
 * put script. */
void store_index_put(store_t *st, const char *user, int64_t due, int64_t now);
void store__index_flush(store_t *st);
/* Makes the loop call store__index_flush (and send the gathered puts) when this turn ends. */
void store__schedule_turn_end(store_t *st);
void store_index_set(store_t *st, const char *user, int which, int64_t score, int64_t lease);
void store_index_user(store_t *st, const char *user, const char *op, int64_t now);
int sweep_on_reply(req_t *rq, const redisReply *r);
void sweep_on_fail(req_t *rq, int err);

#endif
