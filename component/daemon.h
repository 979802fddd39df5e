/* The daemon's one context: configuration, the libstrophe context, the server link, the Redis
 * store, the retransmission timer and the counters. main() owns it; handlers get it as their
 * first argument (never through a global), so tests can build two.
 *
 * Flow of every stanza: link (socket, parse) -> router (one dispatch table) -> handler in
 * relay.c, presence.c or query.c -> store request with a continuation -> reply via the link. */
#ifndef RECEIPTD_DAEMON_H
#define RECEIPTD_DAEMON_H

#include <stdbool.h>
#include <stdint.h>
#include <strophe.h>
#include <uv.h>

#include "config.h"
#include "jid.h"
#include "link.h"
#include "archive.h"
#include "store.h"
#include "strophe_mem.h"

typedef struct stats {
    uint64_t stored, duplicates, delivered, retransmitted, receipts_relayed, acked;
    uint64_t rejected_storage, rejected_full, rejected_bad;
    uint64_t archived, expired, evicted;
    uint64_t read_ahead; /* fetches answered by a page read ahead (component/readahead.h) */
} stats_t;

typedef struct daemon {
    uv_loop_t *loop;
    xmpp_ctx_t *ctx;
    strophe_mem_t stanza_mem; /* ctx allocates from it */
    config_t cfg;
    link_t *link;                /* NULL once closed */
    store_t *store;              /* NULL once closed */
    archive_t *archive;          /* NULL once closed */
    struct readahead *readahead; /* NULL: every fetch goes to the tiers */
    /* Recipients waiting for their state (component/relay.c), hashed: every message looks here. */
    struct cold_user *cold[256];
    uint64_t put_arrivals; /* messages to store so far, numbering their arrival */
    /* Ids of the receipts this process relays: "r<instance>-<counter>", the instance drawn at
     * start (time and a random number), so that two instances never hand out the same one. */
    char receipt_instance[32];
    uint64_t receipt_ids;
    uv_timer_t archive_timer;
    bool archive_inflight;
    uv_timer_t due_timer;
    bool due_inflight;
    /* The link epoch: bumped in Redis at every (re)attach, so presence recorded before it is
     * known to be unverified. "0" (matches nothing) until the bump for this link is known. */
    char epoch[24];
    uint64_t link_generation, epoch_generation;
    bool epoch_pending;
    bool epoch_check_inflight;
    uint64_t epoch_checked_at;
    uint64_t ping_counter;
    uint64_t stale_pinged; /* resources pinged after the last attach */
    char **early;          /* presence before this link's epoch was known (presence.c) */
    size_t nearly;
    stats_t stats;
    log_throttle_t store_log;
} daemon_t;

/* Who a routed stanza is from and, for relay addresses, whom it is for. Filled by the router. */
typedef struct route {
    const char *from; /* full JID as stamped by the server */
    proto_jid_t from_jid;
    char from_bare[PROTO_JID_MAX];
    bool from_served;              /* from one of the configured user domains */
    proto_jid_t to_jid;            /* the node is still escaped */
    char peer_bare[PROTO_JID_MAX]; /* unescaped relay target, "" when addressed to C itself */
} route_t;

/* Wall clock in ms: stored stamps and due times outlive the process. */
int64_t daemon_now_ms(void);

/* Sends a stanza error in reply to stanza (type: cancel, modify, wait, auth). */
void daemon_reply_error(daemon_t *d, xmpp_stanza_t *stanza, const char *type, const char *condition,
                        const char *text);
/* The wait error for a store request that failed with err: resource-constraint when over the
 * in-flight bound, internal-server-error when Redis is unreachable. Counted in the stats. */
void daemon_reply_storage_error(daemon_t *d, xmpp_stanza_t *stanza, int err);
/* Sends and releases s. */
void daemon_send(daemon_t *d, xmpp_stanza_t *s);
void daemon_send_text(daemon_t *d, const char *text, size_t len);
/* "bob\40example.com@C" for bare JID "bob@example.com". Returns 0 or -1 when it does not fit. */
int daemon_relay_address(const daemon_t *d, const char *bare, char *buf, size_t len);
bool daemon_serves_domain(const daemon_t *d, const char *domain);

/* Handlers (one per kind of stanza) and the hooks the link and store call. */
void router_dispatch(daemon_t *d, xmpp_stanza_t *stanza, bool oversize);
void relay_handle_message(daemon_t *d, xmpp_stanza_t *msg, const route_t *r);
void relay_send_receipts(daemon_t *d, const char *acker_full, const store_item_t *items, size_t n);
void relay_push(daemon_t *d, const char *user, const char *const *resources, size_t nres,
                const char *sid, const char *blob, size_t blob_len);
void presence_handle(daemon_t *d, xmpp_stanza_t *pres, const route_t *r);
void presence_on_epoch(daemon_t *d);
void presence_free_early(daemon_t *d);
/* Adopts a newer link epoch of another instance sharing the Redis ("N" or "N-..."), and pings
 * what is registered under older ones. */
void presence_follow_epoch(daemon_t *d, const char *epoch);
void presence_handle_ping_reply(daemon_t *d, xmpp_stanza_t *iq, const route_t *r);
void query_handle_iq(daemon_t *d, xmpp_stanza_t *iq, const route_t *r);
void retry_start(daemon_t *d);
void retry_stop(daemon_t *d);
void archiver_start(daemon_t *d);
void archiver_stop(daemon_t *d);

#endif
