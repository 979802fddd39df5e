/* Messages addressed to relay addresses (bob\40example.com@C): store, acknowledge, push,
 * retransmit, and relay receipts back. Reads as parse -> validate -> store -> reply; everything
 * after the store happens in the store's callback, with a continuation that owns a reference to
 * the original stanza. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blob.h"
#include "daemon.h"
#include "log.h"
#include "readahead.h"
#include "ns.h"
#include "stanza.h"
#include "tiers.h"

typedef struct cold_user cold_user_t;

typedef struct put_ctx {
    daemon_t *d;
    xmpp_stanza_t *msg; /* our reference to the original; NULL for a receipt we relay */
    bool track;
    bool is_receipt;
    bool restored;             /* the recipient's state was restored once already */
    struct put_ctx *next_cold; /* queued behind a cold recipient (see put_cold), or a receipt
                                  behind the others of its group (receipt_group_t) */
    uint64_t arrival;          /* order of arrival, which the cold queue keeps */
    const char *recipient, *sender_bare, *sender_full, *orig_id; /* in strs; orig_id "" if none */
    int64_t stamp_ms;
    proto_buf_t blob; /* what was stored, pushed as it is when the recipient is online */
    /* Only as long as the JIDs are: under overload tens of thousands of these wait for Redis,
     * and fixed-size JID buffers (9 kB each, zeroed) made the loop spend seconds faulting in
     * memory. */
    char strs[];
} put_ctx_t;

static void put_start(put_ctx_t *pc);
static void put_cold(put_ctx_t *pc);
static cold_user_t *cold_find(daemon_t *d, const char *user);
static void cold_restore(daemon_t *d, cold_user_t *c);
static void on_cold_restored(void *ud, int err);
static void cold_remove_keep(daemon_t *d, cold_user_t *c);

/* Pushes one stored message to each online resource of user, from the relay address of the
 * one who wrote it. */
void relay_push(daemon_t *d, const char *user, const char *const *resources, size_t nres,
                const char *sid, const char *blob, size_t blob_len)
{
    store_blob_t *b = malloc(sizeof *b);
    proto_jid_t from;
    char from_bare[PROTO_JID_MAX], relay_from[PROTO_JID_MAX + 256];
    if (!b)
        return;
    if (store_blob_decode(blob, blob_len, b) < 0 || proto_jid_parse(b->from, &from) < 0 ||
        proto_jid_format_bare(&from, from_bare, sizeof from_bare) < 0 ||
        daemon_relay_address(d, from_bare, relay_from, sizeof relay_from) < 0) {
        log_warn("relay: stored message %s for %s is unreadable; left in place", sid, user);
        free(b);
        return;
    }
    proto_msg_t m = {b->from, b->type[0] ? b->type : NULL, b->id[0] ? b->id : NULL, b->inner,
                     b->inner_len};
    proto_buf_t out;
    proto_buf_init(&out);
    for (size_t i = 0; i < nres; i++) {
        char to[PROTO_JID_MAX * 2];
        snprintf(to, sizeof to, "%s/%s", user, resources[i]);
        proto_buf_reset(&out);
        proto_compose_message(&out, &m, relay_from, to, sid && *sid ? sid : NULL, d->cfg.jid,
                              false);
        if (proto_buf_finish(&out) == 0)
            daemon_send_text(d, out.data, out.len);
    }
    d->stats.delivered += nres;
    proto_buf_free(&out);
    free(b);
}

static void send_stored(daemon_t *d, xmpp_stanza_t *msg, const char *sid)
{
    proto_buf_t out;
    proto_buf_init(&out);
    proto_compose_stored(&out, xmpp_stanza_get_to(msg), xmpp_stanza_get_from(msg),
                         xmpp_stanza_get_id(msg), sid);
    if (proto_buf_finish(&out) == 0)
        daemon_send_text(d, out.data, out.len);
    proto_buf_free(&out);
}

static void put_ctx_free(put_ctx_t *pc)
{
    if (pc->msg)
        xmpp_stanza_release(pc->msg);
    proto_buf_free(&pc->blob);
    free(pc);
}

static void on_put(void *ud, int err, const store_put_result_t *res);

/* ---- recipients without state in Redis ----------------------------------------------------
 * Redis answers "cold" for a recipient it holds nothing for: new, or evicted to the archive.
 * Which one only the archive knows, asynchronously, and messages keep arriving meanwhile: they
 * queue behind the first one per recipient, in the order Redis answered (their arrival order),
 * so stanza-ids still follow arrival. An evicted recipient's messages go to the archive one by
 * one in that order; for anyone else the state is (re)created and the queue is put again in one
 * loop turn, ahead of anything that arrives later. */
struct cold_user {
    char user[PROTO_JID_MAX];
    put_ctx_t *head, *tail;
    struct cold_user *next;
};

static cold_user_t **cold_bucket(daemon_t *d, const char *user)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (const unsigned char *p = (const unsigned char *)user; *p; p++)
        h = (h ^ *p) * 16777619u;
    return &d->cold[h % (sizeof d->cold / sizeof d->cold[0])];
}

static cold_user_t *cold_find(daemon_t *d, const char *user)
{
    for (cold_user_t *c = *cold_bucket(d, user); c; c = c->next)
        if (strcmp(c->user, user) == 0)
            return c;
    return NULL;
}

static void cold_remove(daemon_t *d, cold_user_t *c)
{
    cold_remove_keep(d, c);
    free(c);
}

/* Unlinks c from the daemon's list; the caller frees it. */
static void cold_remove_keep(daemon_t *d, cold_user_t *c)
{
    for (cold_user_t **p = cold_bucket(d, c->user); *p; p = &(*p)->next)
        if (*p == c) {
            *p = c->next;
            break;
        }
}

static put_ctx_t *cold_pop(cold_user_t *c)
{
    put_ctx_t *pc = c->head;
    if (pc) {
        c->head = pc->next_cold;
        if (!c->head)
            c->tail = NULL;
        pc->next_cold = NULL;
    }
    return pc;
}

static void cold_next(daemon_t *d, cold_user_t *c);

/* In arrival order: a message sent to Redis before the queue existed comes back "cold" after
 * later ones were already queued here, and must still go before them. */
static void cold_insert(cold_user_t *c, put_ctx_t *pc)
{
    if (c->tail && c->tail->arrival < pc->arrival) { /* the usual case: the newest */
        c->tail->next_cold = pc;
        pc->next_cold = NULL;
        c->tail = pc;
        return;
    }
    put_ctx_t **p = &c->head;
    while (*p && (*p)->arrival < pc->arrival)
        p = &(*p)->next_cold;
    pc->next_cold = *p;
    *p = pc;
    if (!pc->next_cold)
        c->tail = pc;
}

static void on_put_evicted(void *ud, int err, archive_put_status_t status, const char *sid,
                           uint64_t seq)
{
    cold_user_t *c = ud;
    daemon_t *d = c->head->d;
    if (!err && status == ARCHIVE_PUT_NOT_EVICTED) {
        /* The archive's answer is the state to create: no second trip there (tiers_restore). */
        store_user_state_t st = {c->user, seq, NULL, 0, seq > 0};
        int rc = d->store ? store_restore(d->store, &st, daemon_now_ms(), on_cold_restored, c)
                          : STORE_EDOWN;
        if (rc < 0)
            on_cold_restored(c, rc);
        return;
    }
    put_ctx_t *pc = cold_pop(c);
    if (err) {
        on_put(pc, STORE_EREPLY, NULL);
    } else {
        log_debug("relay: %s is evicted; message from %s stored in the archive as %s",
                  pc->recipient, pc->sender_full, sid);
        store_put_result_t res = {status == ARCHIVE_PUT_DUP ? STORE_PUT_DUP : STORE_PUT_OFFLINE,
                                  sid, NULL, 0};
        on_put(pc, 0, &res);
    }
    cold_next(d, c);
}

/* The queue's head goes to the archive if the recipient is evicted. */
static void cold_next(daemon_t *d, cold_user_t *c)
{
    put_ctx_t *pc = c->head;
    if (!pc) {
        cold_remove(d, c);
        return;
    }
    const char *oid = pc->orig_id;
    char origin[PROTO_JID_MAX + 256], suffix[9];
    snprintf(origin, sizeof origin, "%s %s", pc->sender_bare, oid);
    snprintf(suffix, sizeof suffix, "%08x", (unsigned)rand());
    archive_msg_t m = {NULL,         pc->stamp_ms, pc->blob.data,
                       pc->blob.len, "",           pc->track && oid && *oid ? origin : NULL};
    int rc = d->archive
                 ? archive_put_evicted(d->archive, pc->recipient, &m, suffix, on_put_evicted, c)
                 : ARCHIVE_EDB;
    if (rc < 0)
        cold_restore(d, c);
}

static void on_cold_restored(void *ud, int err)
{
    cold_user_t *c = ud;
    daemon_t *d = c->head->d;
    put_ctx_t *pc;
    cold_remove_keep(d, c);
    while ((pc = cold_pop(c))) {
        if (err) {
            on_put(pc, err, NULL);
        } else {
            pc->restored = true;
            put_start(pc);
        }
    }
    free(c);
}

/* Not evicted: create (or restore) the state, then put the whole queue again. */
static void cold_restore(daemon_t *d, cold_user_t *c)
{
    int rc = tiers_restore(d, c->user, on_cold_restored, c);
    if (rc < 0)
        on_cold_restored(c, rc);
}

static void put_cold(put_ctx_t *pc)
{
    daemon_t *d = pc->d;
    if (pc->restored) {
        on_put(pc, STORE_EREPLY, NULL); /* evicted again in between: the sender retries */
        return;
    }
    cold_user_t *c = cold_find(d, pc->recipient);
    if (c) {
        cold_insert(c, pc);
        return;
    }
    if (!(c = calloc(1, sizeof *c))) {
        on_put(pc, STORE_ENOMEM, NULL);
        return;
    }
    snprintf(c->user, sizeof c->user, "%s", pc->recipient);
    c->head = c->tail = pc;
    cold_user_t **b = cold_bucket(d, c->user);
    c->next = *b;
    *b = c;
    cold_next(d, c);
}

static void on_put(void *ud, int err, const store_put_result_t *res)
{
    put_ctx_t *pc = ud;
    daemon_t *d = pc->d;
    if (!err && res->status == STORE_PUT_COLD) {
        put_cold(pc);
        return;
    }
    if (err) {
        log_info("relay: message from %s to %s not stored (%s); sender gets a wait error",
                 pc->sender_full, pc->recipient,
                 err == STORE_EBUSY ? "too much in flight" : "storage unavailable");
        if (!pc->is_receipt)
            daemon_reply_storage_error(d, pc->msg, err);
        else
            d->stats.rejected_storage++;
        goto done;
    }
    switch (res->status) {
    case STORE_PUT_FULL:
        d->stats.rejected_full++;
        log_info("relay: offline queue of %s is full; message from %s rejected", pc->recipient,
                 pc->sender_full);
        if (!pc->is_receipt)
            daemon_reply_error(d, pc->msg, "wait", "resource-constraint",
                               "the recipient's offline queue is full");
        break;
    case STORE_PUT_DUP:
        d->stats.duplicates++;
        if (pc->track)
            send_stored(d, pc->msg, res->sid);
        break;
    case STORE_PUT_COLD: /* handled above */
    case STORE_PUT_LIVE:
    case STORE_PUT_OFFLINE:
        if (*res->sid)
            d->stats.stored++;
        if (res->status == STORE_PUT_LIVE) {
            /* The push carries what the store holds, so a retransmission is identical. */
            relay_push(d, pc->recipient, res->resources, res->nresources, res->sid, pc->blob.data,
                       pc->blob.len);
        }
        if (pc->track)
            send_stored(d, pc->msg, res->sid);
        break;
    }
done:
    put_ctx_free(pc);
}

static void put_start(put_ctx_t *pc)
{
    daemon_t *d = pc->d;
    cold_user_t *c = pc->restored ? NULL : cold_find(d, pc->recipient);
    if (c) {
        /* Its state is being looked up: wait in line, or this message would overtake those. */
        cold_insert(c, pc);
        return;
    }
    store_put_t req = {
        .user = pc->recipient,
        .sender = pc->sender_bare,
        .orig_id = *pc->orig_id ? pc->orig_id : NULL,
        .blob = pc->blob.data,
        .blob_len = pc->blob.len,
        .track = pc->track,
        .now_ms = daemon_now_ms(),
        .retry_ms = d->cfg.retry_ms,
        .window_ms = d->cfg.window_ms,
        .max_messages = d->cfg.max_offline_messages,
        .max_bytes = d->cfg.max_offline_bytes,
    };
    int rc = d->store ? store_put_message(d->store, &req, on_put, pc) : STORE_EDOWN;
    if (rc < 0)
        on_put(pc, rc, NULL); /* not queued, so on_put would never run: answer now */
}

/* A put of a message for recipient, written by blob_from (full JID; sender_bare is its bare
 * JID) with the original id orig_id (NULL: none): the blob is the caller's to encode. */
static put_ctx_t *put_ctx_new(daemon_t *d, const char *recipient, const char *sender_bare,
                              const char *blob_from, const char *orig_id, bool track,
                              bool is_receipt)
{
    if (!orig_id)
        orig_id = "";
    size_t lr = strlen(recipient) + 1, lf = strlen(blob_from) + 1, lb = strlen(sender_bare) + 1,
           lo = strlen(orig_id) + 1;
    put_ctx_t *pc = malloc(sizeof *pc + lr + lf + lb + lo);
    if (!pc)
        return NULL;
    memset(pc, 0, sizeof *pc);
    pc->recipient = memcpy(pc->strs, recipient, lr);
    pc->sender_full = memcpy(pc->strs + lr, blob_from, lf);
    pc->sender_bare = memcpy(pc->strs + lr + lf, sender_bare, lb);
    pc->orig_id = memcpy(pc->strs + lr + lf + lb, orig_id, lo);
    proto_buf_init(&pc->blob);
    pc->stamp_ms = daemon_now_ms();
    pc->d = d;
    pc->arrival = ++d->put_arrivals;
    pc->track = track;
    pc->is_receipt = is_receipt;
    return pc;
}

/* Stores msg for recipient and continues in on_put. blob_from is who wrote it (full JID). */
static void relay_store(daemon_t *d, xmpp_stanza_t *msg, const char *recipient,
                        const char *sender_bare, const char *blob_from, bool track)
{
    proto_buf_t inner;
    proto_buf_init(&inner);
    put_ctx_t *pc =
        put_ctx_new(d, recipient, sender_bare, blob_from, xmpp_stanza_get_id(msg), track, false);
    if (!pc || proto_serialize_inner(msg, d->cfg.jid, &inner) < 0)
        goto oom;
    store_blob_encode(&pc->blob, pc->stamp_ms, track ? STORE_BLOB_RECEIPT : 0, blob_from,
                      xmpp_stanza_get_type(msg), xmpp_stanza_get_id(msg),
                      inner.data ? inner.data : "", inner.len);
    proto_buf_free(&inner);
    if (proto_buf_finish(&pc->blob) < 0)
        goto oom;
    pc->msg = xmpp_stanza_clone(msg);
    put_start(pc);
    return;
oom:
    if (pc)
        proto_buf_free(&pc->blob);
    free(pc);
    proto_buf_free(&inner);
    daemon_reply_error(d, msg, "wait", "resource-constraint", "out of memory");
}

/* ---- receipts ----------------------------------------------------------------------------- */

typedef struct ack_ctx {
    daemon_t *d;
    char acker_full[PROTO_JID_MAX];
} ack_ctx_t;

/* The receipts of one acked batch to one sender, chained through next_cold in the order of the
 * batch. They ask who is online once for all of them: a sender online gets them pushed without
 * a put, which is most of them (a put costs Redis eight times the read, tests/bench/RESULTS.md);
 * one offline gets them put in order, each put looking again. A receipt put that way may land in
 * the sender's queue after a message the acker sent meanwhile: receipts carry no order. */
typedef struct receipt_group {
    put_ctx_t *head, *tail;
} receipt_group_t;

static void on_receipts_online(void *ud, int err, const char *const *resources, size_t n)
{
    receipt_group_t *g = ud;
    put_ctx_t *pc = g->head;
    while (pc) {
        put_ctx_t *next = pc->next_cold;
        pc->next_cold = NULL;
        if (!err && n > 0) {
            relay_push(pc->d, pc->recipient, resources, n, "", pc->blob.data, pc->blob.len);
            put_ctx_free(pc);
        } else {
            put_start(pc); /* an error comes back from the put too, which reports it */
        }
        pc = next;
    }
    free(g);
}

static void receipts_send(daemon_t *d, receipt_group_t **groups, size_t ngroups)
{
    for (size_t i = 0; i < ngroups; i++) {
        receipt_group_t *g = groups[i];
        int rc = d->store ? store_online(d->store, g->head->recipient, on_receipts_online, g)
                          : STORE_EDOWN;
        if (rc < 0)
            on_receipts_online(g, rc, NULL, 0);
    }
}

/* Adds pc to its sender's group among the last few of groups[0..*n), making one if there is
 * none (NULL: out of memory; pc is then not taken). Looking further back would make a large ack
 * quadratic. A sender with two groups may get their receipts in either order (one group pushed,
 * the other put; or a cluster asking one read again): receipts carry no order. */
static receipt_group_t *receipt_group_add(receipt_group_t **groups, size_t *n, put_ctx_t *pc)
{
    for (size_t i = *n; i-- > 0 && *n - i <= 32;) {
        if (strcmp(groups[i]->head->recipient, pc->recipient) == 0) {
            groups[i]->tail->next_cold = pc;
            groups[i]->tail = pc;
            return groups[i];
        }
    }
    receipt_group_t *g = malloc(sizeof *g);
    if (!g)
        return NULL;
    g->head = g->tail = pc;
    groups[(*n)++] = g;
    return g;
}

void relay_send_receipts(daemon_t *d, const char *acker_full, const store_item_t *items, size_t n)
{
    proto_jid_t acker;
    char acker_bare[PROTO_JID_MAX], from[PROTO_JID_MAX + 256];
    /* The pushes of these receipts will come from the acker's relay address: it must exist. */
    if (proto_jid_parse(acker_full, &acker) < 0 ||
        proto_jid_format_bare(&acker, acker_bare, sizeof acker_bare) < 0 ||
        daemon_relay_address(d, acker_bare, from, sizeof from) < 0)
        return;
    store_blob_t *b = malloc(sizeof *b);
    receipt_group_t **groups = n ? malloc(n * sizeof *groups) : NULL;
    size_t ngroups = 0;
    if (!b || !groups) {
        free(b);
        free(groups);
        return;
    }
    proto_buf_t inner;
    proto_buf_init(&inner);
    for (size_t i = 0; i < n; i++) {
        proto_jid_t sender;
        char sender_bare[PROTO_JID_MAX], id[64];
        if (store_blob_decode(items[i].blob, items[i].blob_len, b) < 0 ||
            !(b->flags & STORE_BLOB_RECEIPT) || !b->id[0] || proto_jid_parse(b->from, &sender) < 0)
            continue;
        proto_jid_format_bare(&sender, sender_bare, sizeof sender_bare);
        /* The receipt travels like any message without a request: live to the sender's online
         * resources, else into the sender's offline queue. It is written as the stored text
         * directly, a few hundred times per acked page, rather than built as a stanza first.
         * Its id only has to be unique (daemon.h, receipt_instance). */
        proto_buf_reset(&inner);
        proto_buf_append_str(&inner, "<received xmlns='" NS_RECEIPTS "'");
        proto_buf_append_attr(&inner, "id", b->id);
        proto_buf_append_str(&inner, "/>");
        snprintf(id, sizeof id, "r%s-%" PRIx64, d->receipt_instance, ++d->receipt_ids);
        put_ctx_t *pc = put_ctx_new(d, sender_bare, acker_bare, acker_full, id, false, true);
        if (!pc)
            break;
        store_blob_encode(&pc->blob, pc->stamp_ms, 0, acker_full, NULL, id, inner.data, inner.len);
        if (inner.failed || proto_buf_finish(&pc->blob) < 0 ||
            !receipt_group_add(groups, &ngroups, pc)) {
            put_ctx_free(pc);
            break;
        }
        d->stats.receipts_relayed++;
    }
    proto_buf_free(&inner);
    free(b);
    receipts_send(d, groups, ngroups);
    free(groups);
}

static void on_received(void *ud, int err, const store_item_t *items, size_t n)
{
    ack_ctx_t *ac = ud;
    if (err)
        log_warn("relay: storage unavailable; a receipt from %s was not processed", ac->acker_full);
    else {
        ac->d->stats.acked += n;
        relay_send_receipts(ac->d, ac->acker_full, items, n);
    }
    free(ac);
}

/* ---- the handler ------------------------------------------------------------------------- */

void relay_handle_message(daemon_t *d, xmpp_stanza_t *msg, const route_t *r)
{
    const char *type = xmpp_stanza_get_type(msg);
    const char *id = xmpp_stanza_get_id(msg);
    bool is_error = type && strcmp(type, "error") == 0;

    if (!r->peer_bare[0]) {
        daemon_reply_error(d, msg, "cancel", "service-unavailable",
                           "address a user as user\\40domain@this-component");
        return;
    }
    if (!r->from_served) {
        d->stats.rejected_bad++;
        daemon_reply_error(d, msg, "auth", "forbidden", "your domain is not served here");
        return;
    }
    if (is_error) {
        /* A push of ours bounced: the resource is gone. The sender is the relay node. */
        if (id && r->from_jid.resource[0] && d->store)
            store_bounce(d->store, r->from_bare, r->from_jid.resource, NULL, NULL);
        return;
    }
    const char *rid;
    proto_receipt_t kind = proto_parse_receipt(msg, &rid);
    if (kind == PROTO_RECEIPT_RECEIVED) {
        /* One of the recipient's devices confirms: it no longer owes the message, and the
         * sender hears of it on the first confirmation only. Receipts for messages that are
         * not ours (or already cleared) end here, so a receipt is relayed at most once. */
        ack_ctx_t *ac = calloc(1, sizeof *ac);
        if (!rid || !ac) {
            free(ac);
            return;
        }
        ac->d = d;
        snprintf(ac->acker_full, sizeof ac->acker_full, "%s", r->from);
        store_device_t who = {r->from_bare, r->from_jid.resource, daemon_now_ms()};
        readahead_forget(d, who.user, who.device, NULL, 0);
        int rc = tiers_ack_origin(d, &who, r->peer_bare, rid, on_received, ac);
        if (rc < 0)
            on_received(ac, rc, NULL, 0);
        return;
    }
    bool track = kind == PROTO_RECEIPT_REQUEST;
    if (track && (!id || !*id)) {
        d->stats.rejected_bad++;
        daemon_reply_error(d, msg, "modify", "bad-request", "a receipt request needs a message id");
        return;
    }
    if ((id && strlen(id) >= STORE_BLOB_ID_MAX) || (type && strlen(type) >= STORE_BLOB_TYPE_MAX)) {
        d->stats.rejected_bad++;
        daemon_reply_error(d, msg, "modify", "bad-request", "id or type too long");
        return;
    }
    relay_store(d, msg, r->peer_bare, r->from_bare, r->from, track);
}
