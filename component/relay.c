/* Messages addressed to relay addresses (bob\40example.com@C): store, acknowledge, push,
 * retransmit, and relay receipts back. Reads as parse -> validate -> store -> reply; everything
 * after the store happens in the store's callback, with a continuation that owns a reference to
 * the original stanza. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blob.h"
#include "daemon.h"
#include "log.h"
#include "ns.h"
#include "stanza.h"

typedef struct put_ctx {
    daemon_t *d;
    xmpp_stanza_t *msg; /* our reference to the original */
    bool track;
    bool is_receipt;
    char recipient[PROTO_JID_MAX];
    char sender_full[PROTO_JID_MAX];
    proto_buf_t blob; /* what was stored, pushed as it is when the recipient is online */
} put_ctx_t;

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
    daemon_send(d, proto_build_stored(d->ctx, xmpp_stanza_get_to(msg), xmpp_stanza_get_from(msg),
                                      xmpp_stanza_get_id(msg), sid));
}

static void on_put(void *ud, int err, const store_put_result_t *res)
{
    put_ctx_t *pc = ud;
    daemon_t *d = pc->d;
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
    case STORE_PUT_LIVE:
    case STORE_PUT_OFFLINE:
        if (*res->sid)
            d->stats.stored++;
        if (res->status == STORE_PUT_LIVE) {
            /* The push carries what the store holds, so a retransmission is identical. */
            relay_push(d, pc->recipient, res->resources, res->nresources, res->sid,
                       pc->blob.data, pc->blob.len);
        }
        if (pc->track)
            send_stored(d, pc->msg, res->sid);
        break;
    }
done:
    xmpp_stanza_release(pc->msg);
    proto_buf_free(&pc->blob);
    free(pc);
}

/* Stores msg for recipient and continues in on_put. blob_from is who wrote it (full JID). */
static void relay_store(daemon_t *d, xmpp_stanza_t *msg, const char *recipient,
                        const char *sender_bare, const char *blob_from, bool track,
                        bool is_receipt)
{
    proto_buf_t inner;
    proto_buf_init(&inner);
    put_ctx_t *pc = calloc(1, sizeof *pc);
    if (!pc || proto_serialize_inner(msg, d->cfg.jid, &inner) < 0)
        goto oom;
    proto_buf_init(&pc->blob);
    store_blob_encode(&pc->blob, daemon_now_ms(), track ? STORE_BLOB_RECEIPT : 0, blob_from,
                      xmpp_stanza_get_type(msg), xmpp_stanza_get_id(msg),
                      inner.data ? inner.data : "", inner.len);
    proto_buf_free(&inner);
    if (proto_buf_finish(&pc->blob) < 0) {
        proto_buf_free(&pc->blob);
        goto oom;
    }
    pc->d = d;
    pc->msg = xmpp_stanza_clone(msg);
    pc->track = track;
    pc->is_receipt = is_receipt;
    snprintf(pc->recipient, sizeof pc->recipient, "%s", recipient);
    snprintf(pc->sender_full, sizeof pc->sender_full, "%s", blob_from);
    store_put_t req = {
        .user = recipient,
        .sender = sender_bare,
        .orig_id = xmpp_stanza_get_id(msg),
        .blob = pc->blob.data,
        .blob_len = pc->blob.len,
        .track = track,
        .now_ms = daemon_now_ms(),
        .retry_ms = d->cfg.retry_ms,
        .window_ms = d->cfg.window_ms,
        .dedupe_s = d->cfg.dedupe_s,
        .max_messages = d->cfg.max_offline_messages,
        .max_bytes = d->cfg.max_offline_bytes,
    };
    int rc = d->store ? store_put_message(d->store, &req, on_put, pc) : STORE_EDOWN;
    if (rc < 0)
        on_put(pc, rc, NULL); /* not queued, so on_put would never run: answer now */
    return;
oom:
    free(pc);
    proto_buf_free(&inner);
    if (!is_receipt)
        daemon_reply_error(d, msg, "wait", "resource-constraint", "out of memory");
}

/* ---- receipts ----------------------------------------------------------------------------- */

typedef struct ack_ctx {
    daemon_t *d;
    char acker_full[PROTO_JID_MAX];
} ack_ctx_t;

void relay_send_receipts(daemon_t *d, const char *acker_full, const store_item_t *items, size_t n)
{
    proto_jid_t acker;
    char acker_bare[PROTO_JID_MAX], from[PROTO_JID_MAX + 256];
    if (proto_jid_parse(acker_full, &acker) < 0 ||
        proto_jid_format_bare(&acker, acker_bare, sizeof acker_bare) < 0 ||
        daemon_relay_address(d, acker_bare, from, sizeof from) < 0)
        return;
    store_blob_t *b = malloc(sizeof *b);
    if (!b)
        return;
    for (size_t i = 0; i < n; i++) {
        proto_jid_t sender;
        char sender_bare[PROTO_JID_MAX];
        if (store_blob_decode(items[i].blob, items[i].blob_len, b) < 0 ||
            !(b->flags & STORE_BLOB_RECEIPT) || !b->id[0] || proto_jid_parse(b->from, &sender) < 0)
            continue;
        proto_jid_format_bare(&sender, sender_bare, sizeof sender_bare);
        /* The receipt travels like any message without a request: live to the sender's online
         * resources, else into the sender's offline queue. */
        xmpp_stanza_t *msg = xmpp_message_new(d->ctx, NULL, sender_bare, NULL);
        xmpp_stanza_t *rcv = xmpp_stanza_new(d->ctx);
        if (!msg || !rcv) {
            if (msg)
                xmpp_stanza_release(msg);
            if (rcv)
                xmpp_stanza_release(rcv);
            break;
        }
        char *id = xmpp_uuid_gen(d->ctx);
        if (id) {
            xmpp_stanza_set_id(msg, id);
            xmpp_free(d->ctx, id);
        }
        xmpp_stanza_set_from(msg, from);
        xmpp_stanza_set_name(rcv, "received");
        xmpp_stanza_set_ns(rcv, NS_RECEIPTS);
        xmpp_stanza_set_attribute(rcv, "id", b->id);
        xmpp_stanza_add_child_ex(msg, rcv, 0);
        relay_store(d, msg, sender_bare, acker_bare, acker_full, false, true);
        xmpp_stanza_release(msg);
        d->stats.receipts_relayed++;
    }
    free(b);
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
        int rc = d->store ? store_ack_origin(d->store, &who, r->peer_bare, rid, on_received, ac)
                          : STORE_EDOWN;
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
    relay_store(d, msg, r->peer_bare, r->from_bare, r->from, track, false);
}
