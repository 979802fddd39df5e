/* IQs addressed to the component: XEP-0199 ping, XEP-0030 disco#info, and the urn:receiptd:0
 * queries (summary, fetch, ack). A user only ever reads or clears its own queue: the user is the
 * bare JID of the server-stamped 'from', never anything in the payload. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blob.h"
#include "daemon.h"
#include "log.h"
#include "ns.h"
#include "readahead.h"
#include "stanza.h"
#include "tiers.h"

/* Bytes a fetched message adds around its stored blob (<forwarded/>, <delay/>, stanza-id). */
#define FORWARD_OVERHEAD 320
#define ACK_MAX_ITEMS 1000

typedef struct iq_ctx {
    daemon_t *d;
    xmpp_stanza_t *iq;
    char user[PROTO_JID_MAX];
    bool with_ids;
} iq_ctx_t;

/* The asking device: the IQ's server-stamped full JID. */
static store_device_t device_of(const route_t *r)
{
    return (store_device_t){r->from_bare, r->from_jid.resource, daemon_now_ms()};
}

static iq_ctx_t *iq_ctx_new(daemon_t *d, xmpp_stanza_t *iq, const route_t *r)
{
    iq_ctx_t *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->d = d;
    c->iq = xmpp_stanza_clone(iq);
    snprintf(c->user, sizeof c->user, "%s", r->from_bare);
    return c;
}

static void iq_ctx_free(iq_ctx_t *c)
{
    xmpp_stanza_release(c->iq);
    free(c);
}

/* Starts a text IQ result: <iq type='result' id to from>. */
static void result_open(proto_buf_t *b, xmpp_stanza_t *iq)
{
    proto_buf_append_str(b, "<iq type='result'");
    proto_buf_append_attr(b, "id", xmpp_stanza_get_id(iq));
    proto_buf_append_attr(b, "to", xmpp_stanza_get_from(iq));
    proto_buf_append_attr(b, "from", xmpp_stanza_get_to(iq));
    proto_buf_append_str(b, ">");
}

static void send_buf(daemon_t *d, proto_buf_t *b)
{
    if (proto_buf_finish(b) == 0)
        daemon_send_text(d, b->data, b->len);
}

/* ---- summary ------------------------------------------------------------------------------ */

static void on_summary(void *ud, int err, uint64_t count, uint64_t bytes,
                       const store_item_t ends[2], const store_item_t *items, size_t n,
                       bool archived)
{
    static const char *const end_names[2] = {"oldest", "newest"};
    (void)archived;
    iq_ctx_t *c = ud;
    daemon_t *d = c->d;
    if (err) {
        daemon_reply_storage_error(d, c->iq, err);
        iq_ctx_free(c);
        return;
    }
    store_blob_t *b = malloc(sizeof *b);
    proto_buf_t out;
    proto_buf_init(&out);
    char num[32], stamp[40];
    result_open(&out, c->iq);
    proto_buf_append_str(&out, "<summary xmlns='" NS_RECEIPTD "'");
    snprintf(num, sizeof num, "%" PRIu64, count);
    proto_buf_append_attr(&out, "count", num);
    snprintf(num, sizeof num, "%" PRIu64, bytes);
    proto_buf_append_attr(&out, "bytes", num);
    for (int i = 0; b && count && i < 2; i++) {
        if (store_blob_decode(ends[i].blob, ends[i].blob_len, b) == 0) {
            proto_format_stamp(b->stamp_ms, stamp, sizeof stamp);
            proto_buf_append_attr(&out, end_names[i], stamp);
        }
    }
    if (!c->with_ids) {
        proto_buf_append_str(&out, "/></iq>");
    } else {
        proto_buf_append_str(&out, ">");
        for (size_t i = 0; b && i < n; i++) {
            proto_jid_t from;
            char bare[PROTO_JID_MAX];
            if (store_blob_decode(items[i].blob, items[i].blob_len, b) < 0 ||
                proto_jid_parse(b->from, &from) < 0)
                continue;
            proto_jid_format_bare(&from, bare, sizeof bare);
            proto_format_stamp(b->stamp_ms, stamp, sizeof stamp);
            snprintf(num, sizeof num, "%zu", items[i].blob_len);
            proto_buf_append_str(&out, "<item");
            proto_buf_append_attr(&out, "id", items[i].sid);
            proto_buf_append_attr(&out, "bytes", num);
            proto_buf_append_attr(&out, "stamp", stamp);
            proto_buf_append_attr(&out, "from", bare);
            proto_buf_append_str(&out, "/>");
        }
        proto_buf_append_str(&out, "</summary></iq>");
    }
    send_buf(d, &out);
    proto_buf_free(&out);
    free(b);
    iq_ctx_free(c);
}

static void handle_summary(daemon_t *d, xmpp_stanza_t *iq, xmpp_stanza_t *payload, const route_t *r)
{
    bool with_ids;
    if (proto_parse_summary(payload, &with_ids) < 0) {
        daemon_reply_error(d, iq, "modify", "bad-request", "ids must be true or false");
        return;
    }
    iq_ctx_t *c = iq_ctx_new(d, iq, r);
    if (!c)
        return;
    c->with_ids = with_ids;
    store_device_t who = device_of(r);
    int rc = tiers_summary(d, &who, with_ids ? d->cfg.fetch_max : 0, on_summary, c);
    if (rc < 0)
        on_summary(c, rc, 0, 0, NULL, NULL, 0, false);
}

/* ---- fetch -------------------------------------------------------------------------------- */

static void on_fetch(void *ud, int err, bool complete, const char *cursor,
                     const store_item_t *items, size_t n, bool archived)
{
    (void)archived;
    iq_ctx_t *c = ud;
    daemon_t *d = c->d;
    if (err) {
        daemon_reply_storage_error(d, c->iq, err);
        iq_ctx_free(c);
        return;
    }
    store_blob_t *b = malloc(sizeof *b);
    proto_buf_t out;
    proto_buf_init(&out);
    result_open(&out, c->iq);
    proto_buf_append_str(&out, "<batch xmlns='" NS_RECEIPTD "'");
    proto_buf_append_attr(&out, "complete", complete ? "true" : "false");
    if (cursor)
        proto_buf_append_attr(&out, "last", cursor);
    proto_buf_append_str(&out, ">");
    for (size_t i = 0; b && i < n; i++) {
        if (store_blob_decode(items[i].blob, items[i].blob_len, b) < 0) {
            log_warn("query: stored message %s of %s is unreadable; skipped", items[i].sid,
                     c->user);
            continue;
        }
        proto_msg_t m = {b->from, b->type[0] ? b->type : NULL, b->id[0] ? b->id : NULL, b->inner,
                         b->inner_len};
        proto_compose_forwarded(&out, &m, c->user, items[i].sid, d->cfg.jid, b->stamp_ms);
    }
    proto_buf_append_str(&out, "</batch></iq>");
    send_buf(d, &out);
    proto_buf_free(&out);
    free(b);
    iq_ctx_free(c);
}

static void handle_fetch(daemon_t *d, xmpp_stanza_t *iq, xmpp_stanza_t *payload, const route_t *r)
{
    proto_fetch_t f;
    int prc = proto_parse_fetch(payload, d->cfg.fetch_max, &f);
    if (prc == PROTO_EBADREQ) {
        daemon_reply_error(d, iq, "modify", "bad-request", "max must be a positive integer");
        return;
    }
    if (prc == PROTO_ENOTFOUND) {
        daemon_reply_error(d, iq, "cancel", "item-not-found", "after is not a stanza id of ours");
        return;
    }
    iq_ctx_t *c = iq_ctx_new(d, iq, r);
    if (!c)
        return;
    store_device_t who = device_of(r);
    int rc = readahead_fetch(d, &who, f.after_seq, f.max, d->cfg.fetch_max_bytes, FORWARD_OVERHEAD,
                             on_fetch, c);
    if (rc < 0)
        on_fetch(c, rc, false, NULL, NULL, 0, false);
}

/* ---- ack ---------------------------------------------------------------------------------- */

typedef struct ack_iq_ctx {
    iq_ctx_t base;
    char acker_full[PROTO_JID_MAX];
} ack_iq_ctx_t;

static void on_ack(void *ud, int err, const store_item_t *items, size_t n)
{
    ack_iq_ctx_t *c = ud;
    daemon_t *d = c->base.d;
    if (err) {
        daemon_reply_storage_error(d, c->base.iq, err);
    } else {
        d->stats.acked += n;
        relay_send_receipts(d, c->acker_full, items, n);
        daemon_send(d, proto_build_iq_result(d->ctx, c->base.iq, NULL));
    }
    xmpp_stanza_release(c->base.iq);
    free(c);
}

static void handle_ack(daemon_t *d, xmpp_stanza_t *iq, xmpp_stanza_t *payload, const route_t *r)
{
    const char **ids = calloc(ACK_MAX_ITEMS, sizeof *ids);
    size_t n;
    if (!ids)
        return;
    int prc = proto_parse_ack(payload, ids, ACK_MAX_ITEMS, &n);
    if (prc == PROTO_ETOOMANY) {
        daemon_reply_error(d, iq, "modify", "policy-violation", "at most 1000 items per ack");
    } else if (prc < 0) {
        daemon_reply_error(d, iq, "modify", "bad-request", "ack needs <item id='...'/> children");
    } else {
        ack_iq_ctx_t *c = calloc(1, sizeof *c);
        if (c) {
            c->base.d = d;
            c->base.iq = xmpp_stanza_clone(iq);
            snprintf(c->acker_full, sizeof c->acker_full, "%s", r->from);
            store_device_t who = device_of(r);
            readahead_forget(d, who.user, who.device, ids, n);
            int rc = tiers_ack_sids(d, &who, ids, n, on_ack, c);
            if (rc < 0)
                on_ack(c, rc, NULL, 0);
        }
    }
    free(ids);
}

/* ---- ping, disco -------------------------------------------------------------------------- */

static void handle_ping(daemon_t *d, xmpp_stanza_t *iq, xmpp_stanza_t *payload, const route_t *r)
{
    (void)payload;
    (void)r;
    daemon_send(d, proto_build_iq_result(d->ctx, iq, NULL));
}

static void handle_disco_info(daemon_t *d, xmpp_stanza_t *iq, xmpp_stanza_t *payload,
                              const route_t *r)
{
    static const char *const features[] = {NS_DISCO_INFO, NS_PING, NS_RECEIPTS, NS_RECEIPTD,
                                           NS_SID};
    (void)payload;
    (void)r;
    proto_buf_t out;
    proto_buf_init(&out);
    result_open(&out, iq);
    proto_buf_append_str(&out, "<query xmlns='" NS_DISCO_INFO
                               "'><identity category='component' type='generic' "
                               "name='receiptd'/>");
    for (size_t i = 0; i < sizeof features / sizeof features[0]; i++) {
        proto_buf_append_str(&out, "<feature");
        proto_buf_append_attr(&out, "var", features[i]);
        proto_buf_append_str(&out, "/>");
    }
    proto_buf_append_str(&out, "</query></iq>");
    send_buf(d, &out);
    proto_buf_free(&out);
}

/* ---- dispatch ----------------------------------------------------------------------------- */

typedef void (*iq_fn)(daemon_t *d, xmpp_stanza_t *iq, xmpp_stanza_t *payload, const route_t *r);

static const struct {
    const char *type, *name, *ns;
    bool needs_user; /* only for users of the served domains */
    iq_fn fn;
} iq_handlers[] = {
    {"get", "ping", NS_PING, false, handle_ping},
    {"get", "query", NS_DISCO_INFO, false, handle_disco_info},
    {"get", "summary", NS_RECEIPTD, true, handle_summary},
    {"get", "fetch", NS_RECEIPTD, true, handle_fetch},
    {"set", "ack", NS_RECEIPTD, true, handle_ack},
};

void query_handle_iq(daemon_t *d, xmpp_stanza_t *iq, const route_t *r)
{
    const char *type = xmpp_stanza_get_type(iq);
    if (!type)
        return;
    if (strcmp(type, "result") == 0 || strcmp(type, "error") == 0) {
        presence_handle_ping_reply(d, iq, r);
        return;
    }
    if (strcmp(type, "get") != 0 && strcmp(type, "set") != 0) {
        daemon_reply_error(d, iq, "modify", "bad-request", "unknown iq type");
        return;
    }
    xmpp_stanza_t *payload = xmpp_stanza_get_children(iq);
    while (payload && !xmpp_stanza_is_tag(payload))
        payload = xmpp_stanza_get_next(payload);
    if (!payload) {
        daemon_reply_error(d, iq, "modify", "bad-request", "an iq get or set needs a payload");
        return;
    }
    const char *name = xmpp_stanza_get_name(payload);
    const char *ns = xmpp_stanza_get_ns(payload);
    for (size_t i = 0; i < sizeof iq_handlers / sizeof iq_handlers[0]; i++) {
        if (!name || !ns || strcmp(iq_handlers[i].name, name) != 0 ||
            strcmp(iq_handlers[i].ns, ns) != 0)
            continue;
        if (strcmp(iq_handlers[i].type, type) != 0) {
            daemon_reply_error(d, iq, "modify", "bad-request", "wrong iq type for this payload");
            return;
        }
        if (r->peer_bare[0] && iq_handlers[i].needs_user)
            break; /* queries are asked of the component itself, not of a relay address */
        if (iq_handlers[i].needs_user && !r->from_served) {
            daemon_reply_error(d, iq, "auth", "forbidden", "your domain is not served here");
            return;
        }
        iq_handlers[i].fn(d, iq, payload, r);
        return;
    }
    daemon_reply_error(d, iq, "cancel", "service-unavailable", NULL);
}
