/* Redis hot state: hiredis async connections on the caller's libuv loop, to one Redis or to the
 * masters of a Redis Cluster (storage/cluster.c).
 *
 * Contract for every request (hiredis' own): a call that returns 0 runs its callback exactly once,
 * with err != 0 when Redis failed or the connection dropped; a call that returns < 0 (not
 * connected, or over the in-flight bound) runs nothing. Results passed to a callback are valid
 * only during it. The store owns its connection and reconnects by itself with capped exponential
 * backoff; it never logs, it reports state changes through the state callback. */
#ifndef RECEIPTD_STORAGE_STORE_H
#define RECEIPTD_STORAGE_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

enum {
    STORE_EDOWN = -1,  /* not connected to Redis */
    STORE_EBUSY = -2,  /* too many requests in flight */
    STORE_ENOMEM = -3, /* out of memory */
    STORE_EREPLY = -4, /* Redis answered an error or an unexpected shape */
};

typedef struct store store_t;

typedef struct store_config {
    const char *host;
    int port;
    const char *socket;   /* unix socket path; when set, host and port are not used */
    const char *password; /* AUTH before anything else; NULL for none */
    unsigned max_inflight;
    /* A Redis that answers nothing for this long (paused, wedged, network black hole) is dropped:
     * requests in flight fail with STORE_EDOWN and the store reconnects. 0: 5000. */
    unsigned timeout_ms;
    /* Redis Cluster seeds, "host:port,host:port,..."; NULL or "" for the single Redis above. */
    const char *cluster;
    /* After each put, WAIT until this many replicas have it (0: do not wait) ... */
    unsigned wait_replicas;
    /* ... for at most this long (0: 1000); a put they did not confirm fails with STORE_EDOWN. */
    unsigned wait_timeout_ms;
    /* A message is stored once per (sender, original id) for at least this long. 0: 86400. */
    unsigned dedupe_s;
} store_config_t;

/* connected: 1 when (re)connected and scripts are loaded (in a cluster: on every master, with
 * every slot served), 0 when the connection was lost or a
 * connect attempt failed (err then says why). */
typedef void (*store_state_cb)(void *ud, int connected, const char *err);

int store_create(uv_loop_t *loop, const store_config_t *cfg, store_state_cb on_state, void *ud,
                 store_t **out);
/* Disconnects (pending callbacks run with an error) and frees once libuv closed its handles. */
void store_close(store_t *st);
bool store_is_connected(const store_t *st);
unsigned store_inflight(const store_t *st);

typedef struct store_item {
    const char *sid;
    const char *blob;
    size_t blob_len;
} store_item_t;

/* --- put ------------------------------------------------------------------------------------ */
typedef enum {
    STORE_PUT_LIVE,    /* recipient online: push to resources (sid "" when not kept pending) */
    STORE_PUT_OFFLINE, /* in the recipient's offline queue */
    STORE_PUT_DUP,     /* seen before within the dedupe window: sid is the first one's */
    STORE_PUT_FULL,    /* over the recipient's quota: nothing stored */
    STORE_PUT_COLD, /* the recipient has no state in Redis (new, or evicted): see store_restore */
} store_put_status_t;

typedef struct store_put {
    const char *user;    /* recipient bare JID */
    const char *sender;  /* sender bare JID */
    const char *orig_id; /* may be NULL */
    const char *blob;
    size_t blob_len;
    bool track; /* receipt requested: dedupe, keep pending until acked */
    int64_t now_ms;
    int64_t retry_ms, window_ms;
    uint64_t max_messages, max_bytes;
} store_put_t;

typedef struct store_put_result {
    store_put_status_t status;
    const char *sid;
    const char **resources;
    size_t nresources;
} store_put_result_t;

typedef void (*store_put_cb)(void *ud, int err, const store_put_result_t *res);
int store_put_message(store_t *st, const store_put_t *req, store_put_cb cb, void *ud);

/* Who reads or acks: the user's bare JID and the device (resource) asking. Every such request
 * records the device as known and seen at now_ms (see proto/PROTOCOL.md, per-device delivery).
 * device "" sees and acks only the shared queue. */
typedef struct store_device {
    const char *user;
    const char *device;
    int64_t now_ms;
} store_device_t;

typedef void (*store_items_cb)(void *ud, int err, const store_item_t *items, size_t n);

/* --- ack: by stanza ids, or by (sender, original id) for a <received/> ------------------------ */
typedef struct store_ack_result {
    const store_item_t *items; /* acked for the first time by any device: the receipts to relay */
    size_t n;
    bool archived;            /* the user has messages in the archive: ack there too */
    const char *known;        /* the user's known devices, newline-separated */
    const char *const *found; /* the sids that were in Redis */
    size_t nfound;
} store_ack_result_t;
typedef void (*store_ack_cb)(void *ud, int err, const store_ack_result_t *res);
int store_ack_sids(store_t *st, const store_device_t *who, const char *const *sids, size_t n,
                   store_ack_cb cb, void *ud);
int store_ack_origin(store_t *st, const store_device_t *who, const char *sender,
                     const char *orig_id, store_ack_cb cb, void *ud);

/* --- bounce: a push to resource of user bounced; it is gone, its pending deliveries queue ---- */
typedef void (*store_done_cb)(void *ud, int err);
int store_bounce(store_t *st, const char *user, const char *resource, store_done_cb cb, void *ud);

/* --- presence ---------------------------------------------------------------------------------
 * A resource is online when its registry entry carries the current link epoch (rd:epoch), which
 * every attach of any receiptd instance increments: see storage/SCHEMA.md. */
typedef enum { STORE_PRESENCE_SET, STORE_PRESENCE_DEL, STORE_PRESENCE_VERIFY } store_presence_op_t;
int store_presence(store_t *st, store_presence_op_t op, const char *user, const char *resource,
                   int64_t now_ms, store_done_cb cb, void *ud);
/* Resources registered under an older epoch than the store's (to ping): called once per user
 * with some, then once with last = true. */
typedef void (*store_stale_cb)(void *ud, int err, const char *user, const char *const *resources,
                               size_t n, bool last);
int store_presence_stale(store_t *st, store_stale_cb cb, void *ud);
/* The resources of user online for the store's link epoch, as the scripts count them (their
 * registry entry carries that epoch or a newer one), read with a plain HGETALL and no script: a
 * relayed receipt asks this before it is put (component/relay.c), since a put costs Redis eight
 * times what this read does. */
typedef void (*store_online_cb)(void *ud, int err, const char *const *resources, size_t n);
int store_online(store_t *st, const char *user, store_online_cb cb, void *ud);
/* INCR of the link epoch; the new value as a decimal string. */
typedef void (*store_epoch_cb)(void *ud, int err, const char *epoch);
int store_epoch_next(store_t *st, store_epoch_cb cb, void *ud);
/* The epoch every script runs with (decides who is online); "0" matches nobody. */
void store_set_epoch(store_t *st, const char *epoch);

/* --- retransmission ----------------------------------------------------------------------------
 */
typedef struct store_due {
    const char *user;
    const char *resource;
    store_item_t *items;
    size_t nitems;
} store_due_t;
/* Called once per user with something to resend (its groups, one per resource), then once with
 * last = true (err says whether the whole sweep went through). */
typedef void (*store_due_cb)(void *ud, int err, const store_due_t *due, size_t n, bool last);
int store_claim_due(store_t *st, int64_t now_ms, int64_t retry_ms, unsigned max_users,
                    store_due_cb cb, void *ud);

/* --- reading the offline queue: the device's own and the shared one ------------------------ */
/* ends[0] and ends[1] are the oldest and newest messages (sid NULL, blob_len 0 when the queue
 * is empty); items are the first max messages, oldest first. archived: the user also has
 * messages in the SQLite archive (storage/archive.h), which the caller reads too. */
typedef void (*store_summary_cb)(void *ud, int err, uint64_t count, uint64_t bytes,
                                 const store_item_t ends[2], const store_item_t *items, size_t n,
                                 bool archived);
int store_summary(store_t *st, const store_device_t *who, unsigned max, store_summary_cb cb,
                  void *ud);
/* cursor: where the next page starts (after='cursor'); NULL when the page examined nothing. It
 * can lie past the last item, when messages this device acked were skipped. */
typedef void (*store_fetch_cb)(void *ud, int err, bool complete, const char *cursor,
                               const store_item_t *items, size_t n, bool archived);
int store_fetch(store_t *st, const store_device_t *who, uint64_t after_seq, unsigned max,
                size_t max_bytes, size_t overhead, store_fetch_cb cb, void *ud);

/* --- archiving: messages older than a cutoff leave Redis for the archive -------------------- */
typedef struct store_old_msg {
    const char *sid;
    const char *blob;
    size_t blob_len;
    const char *acked;  /* devices that acknowledged it, newline-separated, "" for none */
    const char *origin; /* "<sender bare> <original id>", "" for none */
} store_old_msg_t;
typedef struct store_old {
    const char *user;
    store_old_msg_t *msgs;
    size_t n; /* 0: nothing to move yet; drop with no sids to re-index the user */
} store_old_t;
/* Called once per user, then once with user NULL and last = true. */
typedef void (*store_old_cb)(void *ud, int err, const store_old_t *user, bool last);
/* Reads (does not remove) up to max_msgs of the oldest messages stamped before cutoff_ms of up to
 * max_users users per index shard, and marks those users as having an archive. The users are
 * leased until lease_ms (no other instance takes them before); pass the same lease to drop. */
int store_archive_take(store_t *st, int64_t cutoff_ms, int64_t now_ms, int64_t lease_ms,
                       unsigned max_users, unsigned max_msgs, store_old_cb cb, void *ud);
/* Removes sids, now safely in the archive, and re-indexes the user for the next pass. */
int store_archive_drop(store_t *st, const char *user, int64_t now_ms, int64_t lease_ms,
                       const char *const *sids, size_t n, store_done_cb cb, void *ud);

/* --- activity and eviction --------------------------------------------------------------------
 * Users with no presence or IQ for a while have all their Redis state moved to the archive
 * (component/archiver.c); the first presence or IQ brings it back. */
typedef void (*store_flag_cb)(void *ud, int err, bool flag);
/* Records activity of user (for eviction) and forgets devices not seen for forget_ms; flag: the
 * user has no state in Redis (new or evicted), so the caller restores it before going on. */
int store_activity(store_t *st, const char *user, int64_t now_ms, int64_t forget_ms,
                   store_flag_cb cb, void *ud);
/* A user's state as eviction keeps it. devices: flat (device, last seen ms) pairs. */
typedef struct store_user_state {
    const char *user;
    uint64_t seq;
    const char *const *devices;
    size_t ndevices; /* pairs */
    bool archived;   /* the user has messages in the archive */
} store_user_state_t;
/* Puts state back (seq only ever grows; devices are added), or creates it for a new user. */
int store_restore(store_t *st, const store_user_state_t *s, int64_t now_ms, store_done_cb cb,
                  void *ud);
typedef struct store_evictee {
    store_user_state_t state;
    bool complete; /* msgs are all of the user's messages */
    store_old_msg_t *msgs;
    size_t n;
} store_evictee_t;
/* Called once per user to evict, then once with user NULL and last = true. */
typedef void (*store_evict_cb)(void *ud, int err, const store_evictee_t *user, bool last);
/* Users inactive since cutoff_ms with nobody online, with up to max_msgs of their messages;
 * leased as for store_archive_take. */
int store_evict_take(store_t *st, int64_t cutoff_ms, int64_t now_ms, int64_t lease_ms,
                     unsigned max_users, unsigned max_msgs, store_evict_cb cb, void *ud);
/* Deletes sids (now in the archive) and, with evict, the whole user when nothing is left and
 * nobody came online meanwhile; flag: the user was evicted. */
int store_evict_drop(store_t *st, const char *user, bool evict, int64_t now_ms, int64_t lease_ms,
                     const char *const *sids, size_t n, store_flag_cb cb, void *ud);

/* --- raw: INFO persistence and friends, for the startup durability warning -------------------- */
typedef void (*store_string_cb)(void *ud, int err, const char *str);
int store_config_get(store_t *st, const char *param, store_string_cb cb, void *ud);
/* The current value of the link epoch in Redis (NULL before any attach). */
int store_epoch_get(store_t *st, store_string_cb cb, void *ud);

#endif
