/* One Redis connection (one node): hiredis async on the store's libuv loop, AUTH and SCRIPT LOAD
 * on every connect, reconnect with capped, jittered exponential backoff, and the bookkeeping the
 * store's watchdog needs. A single Redis is one rconn; a cluster is one per master (plus a probe
 * that only asks for the slot map while no master is reachable).
 *
 * Ownership: the store creates and closes them. An rconn frees itself once it is closed, its timer
 * has closed and hiredis let go of the context, which after rconn_close can be later than the
 * close: hiredis first runs every callback still waiting, with a NULL reply. Internal to storage/.
 */
#ifndef RECEIPTD_STORAGE_RCONN_H
#define RECEIPTD_STORAGE_RCONN_H

#include <hiredis/async.h>
#include <stdbool.h>
#include <uv.h>

#include "cluster_map.h"
#include "store_internal.h"

struct store;

typedef struct rconn {
    struct store *st;
    char host[CLUSTER_HOST_MAX];
    int port;
    const char *socket; /* the store's; NULL for TCP */
    bool probe;         /* no scripts: only asks for the slot map */
    redisAsyncContext *ac;
    bool ready; /* connected, authenticated and (unless a probe) scripts loaded */
    bool closing;
    bool timer_closed;
    unsigned inflight; /* commands sent on this connection and not yet answered */
    uint64_t last_progress;
    unsigned scripts_pending;
    bool setup_failed;
    char setup_error[128];
    unsigned backoff_ms;
    uv_timer_t retry_timer;
    /* With [redis] wait_replicas, each node has a second connection, the put lane: WAIT blocks
     * the connection it is sent on, so it must not hold up reads, acks and presence. On it
     * receiptd group-commits: one WAIT in flight covers every put answered before it was sent
     * (storage/store.c). */
    struct rconn *twin;    /* on the main connection: its put lane */
    struct rconn *primary; /* on a put lane: its main connection */
    req_list_t gc_pending; /* puts answered, not yet covered by a WAIT */
    req_t *gc_batch;       /* the puts the WAIT in flight covers */
    bool gc_waiting;
    bool gc_degraded; /* the last WAIT fell short: the next ones wait less */
} rconn_t;

/* Creates the connection and starts connecting; NULL when out of memory. */
rconn_t *rconn_create(struct store *st, const char *host, int port, const char *socket, bool probe);
/* A node's connection, with its put lane when lane is true; NULL when out of memory. */
rconn_t *rconn_create_node(struct store *st, const char *host, int port, const char *socket,
                           bool lane);
/* Ready for requests: the connection, and its put lane if it has one. */
bool rconn_ready(const rconn_t *c);
/* Where a request goes: a put (put = true) to the put lane when there is one. */
rconn_t *rconn_lane(rconn_t *c, bool put);
/* Gracefully: replies in flight still reach their callbacks. NULL is fine. Closes the put lane
 * too. */
void rconn_close(rconn_t *c);
/* Sends one command; returns 0 (fn runs exactly once) or -1 (fn never runs). */
int rconn_send(rconn_t *c, redisCallbackFn *fn, void *priv, int argc, const char **argv,
               const size_t *lens);
/* Every reply callback of rconn_send calls this first. */
void rconn_on_reply(rconn_t *c);
/* Drops the connection (its commands fail with a NULL reply) and reconnects later. */
void rconn_reset(rconn_t *c, const char *why);
/* After NOSCRIPT: not ready until the scripts are loaded again on a new connection; replies in
 * flight still arrive. */
void rconn_reload(rconn_t *c, const char *why);
/* The watchdog: drops a connection whose oldest command waited more than timeout_ms. */
void rconn_check(rconn_t *c, uint64_t now, unsigned timeout_ms);

/* Implemented by the store: the connection became ready (1) or went down or failed (0, err). */
void store__on_conn(struct store *st, rconn_t *c, int ready, const char *err);
/* Implemented by the store: an rconn freed itself. */
void store__conn_gone(struct store *st);

#endif
