/* libFuzzer target: the stanza router and every handler (relay, presence, query) over a fake
 * store and a fake link. The input is a component stream (parsed by the real stream parser); a
 * PRNG seeded from the input decides what the fake store answers (live, offline, duplicate, full,
 * error; blobs good or garbage), and its callbacks run after the handler returned, as hiredis'
 * would. Everything the handlers send must parse as XML again. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "blob.h"
#include "daemon.h"
#include "stream.h"

/* ---- fake link: every output must be well-formed ------------------------------------------ */

struct link {
    int unused;
};
static xmpp_ctx_t *ctx;

int link_send_text(link_t *l, const char *data, size_t len)
{
    (void)l;
    char *copy = malloc(len + 1);
    memcpy(copy, data, len);
    copy[len] = '\0';
    xmpp_stanza_t *s = xmpp_stanza_new_from_string(ctx, copy);
    if (!s)
        abort(); /* a handler built broken XML */
    xmpp_stanza_release(s);
    free(copy);
    return 0;
}

int link_send_stanza(link_t *l, xmpp_stanza_t *stanza)
{
    char *text;
    size_t len;
    if (xmpp_stanza_to_text(stanza, &text, &len) != XMPP_EOK)
        return -1;
    link_send_text(l, text, len);
    xmpp_free(ctx, text);
    return 0;
}

bool link_is_up(const link_t *l)
{
    (void)l;
    return true;
}

/* ---- fake store: answers queued, run after the handler ------------------------------------- */

struct store {
    int unused;
};
static uint64_t rng;
static unsigned next(void)
{
    rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
    return (unsigned)(rng >> 33);
}

typedef enum {
    P_PUT, P_ITEMS, P_ACK, P_DONE, P_EPOCH, P_SUMMARY, P_FETCH, P_FLAG, P_STALE, P_ONLINE
} pending_kind_t;
typedef struct pending {
    pending_kind_t kind;
    void *cb, *ud;
} pending_t;
static pending_t queue[64];
static size_t queued;

static int enqueue(pending_kind_t kind, void *cb, void *ud)
{
    if (queued == 64 || next() % 16 == 0)
        return STORE_EDOWN + (int)(next() % 2) * (STORE_EBUSY - STORE_EDOWN);
    queue[queued++] = (pending_t){kind, cb, ud};
    return 0;
}

static char blobs[4][512];
static size_t blob_len[4];
static void make_blobs(void)
{
    proto_buf_t b;
    for (int i = 0; i < 4; i++) {
        proto_buf_init(&b);
        if (i == 3) {
            proto_buf_append_str(&b, "garbage\n");
        } else {
            store_blob_encode(&b, 1764052406123LL + i, i % 2 ? STORE_BLOB_RECEIPT : 0,
                              i == 2 ? "not a jid@" : "alice@localhost/r", i ? "chat" : NULL,
                              i == 1 ? "m<&'\"1" : "m1", "<body>x</body>", 14);
        }
        proto_buf_finish(&b);
        blob_len[i] = b.len < sizeof blobs[i] ? b.len : sizeof blobs[i] - 1;
        memcpy(blobs[i], b.data, blob_len[i]);
        proto_buf_free(&b);
    }
}

static void run_pending(void)
{
    static const char *resources[] = {"phone", "a/b", "x"};
    static const char *const sids[] = {"1-ab", "2-cd", "99-ff", "7-00"};
    while (queued) {
        pending_t p = queue[--queued];
        int err = next() % 8 == 0 ? STORE_EREPLY : 0;
        store_item_t items[4];
        size_t n = next() % 5;
        for (size_t i = 0; i < n; i++) {
            unsigned k = next() % 4;
            items[i] = (store_item_t){sids[i], blobs[k], blob_len[k]};
        }
        switch (p.kind) {
        case P_PUT: {
            store_put_result_t r = {(store_put_status_t)(next() % 5), next() % 3 ? "5-aa" : "",
                                    resources, next() % 4};
            ((store_put_cb)p.cb)(p.ud, err, err ? NULL : &r);
            break;
        }
        case P_ITEMS: ((store_items_cb)p.cb)(p.ud, err, err ? NULL : items, err ? 0 : n); break;
        case P_ACK: {
            /* archived stays false: the fuzzed daemon has no archive */
            store_ack_result_t r = {items, n, false, "phone", sids, next() % 4};
            ((store_ack_cb)p.cb)(p.ud, err, err ? NULL : &r);
            break;
        }
        case P_DONE:
            if (p.cb)
                ((store_done_cb)p.cb)(p.ud, err);
            break;
        case P_EPOCH: ((store_epoch_cb)p.cb)(p.ud, err, err ? NULL : "7"); break;
        case P_ONLINE:
            ((store_online_cb)p.cb)(p.ud, err, err ? NULL : resources, err ? 0 : next() % 4);
            break;
        case P_STALE:
            if (!err)
                ((store_stale_cb)p.cb)(p.ud, 0, "bob@localhost", resources, next() % 3, false);
            ((store_stale_cb)p.cb)(p.ud, err, NULL, NULL, 0, true);
            break;
        case P_FLAG:
            if (p.cb)
                ((store_flag_cb)p.cb)(p.ud, err, next() % 2);
            break;
        case P_SUMMARY: {
            store_item_t ends[2] = {items[0], items[n ? n - 1 : 0]};
            if (!n)
                ends[0] = ends[1] = (store_item_t){NULL, "", 0};
            ((store_summary_cb)p.cb)(p.ud, err, n, 100 * n, err ? NULL : ends, err ? NULL : items,
                                     err ? 0 : n, next() % 2);
            break;
        }
        case P_FETCH:
            ((store_fetch_cb)p.cb)(p.ud, err, next() % 2, n ? sids[next() % 4] : NULL,
                                   err ? NULL : items, err ? 0 : n, next() % 2);
            break;
        }
    }
}

bool store_is_connected(const store_t *st) { (void)st; return true; }
int store_put_message(store_t *st, const store_put_t *req, store_put_cb cb, void *ud)
{ (void)st; (void)req; return enqueue(P_PUT, (void *)cb, ud); }
int store_ack_sids(store_t *st, const store_device_t *who, const char *const *sids, size_t n,
                   store_ack_cb cb, void *ud)
{ (void)st; (void)who; (void)sids; (void)n; return enqueue(P_ACK, (void *)cb, ud); }
int store_ack_origin(store_t *st, const store_device_t *who, const char *sender,
                     const char *orig_id, store_ack_cb cb, void *ud)
{ (void)st; (void)who; (void)sender; (void)orig_id; return enqueue(P_ACK, (void *)cb, ud); }
int store_bounce(store_t *st, const char *user, const char *resource, store_done_cb cb, void *ud)
{ (void)st; (void)user; (void)resource; return enqueue(P_DONE, (void *)cb, ud); }
int store_presence(store_t *st, store_presence_op_t op, const char *user, const char *resource,
                   int64_t now_ms, store_done_cb cb, void *ud)
{ (void)st; (void)op; (void)user; (void)resource; (void)now_ms;
  return enqueue(P_DONE, (void *)cb, ud); }
void store_set_epoch(store_t *st, const char *epoch) { (void)st; (void)epoch; }
int store_online(store_t *st, const char *user, store_online_cb cb, void *ud)
{ (void)st; (void)user; return enqueue(P_ONLINE, (void *)cb, ud); }
int store_presence_stale(store_t *st, store_stale_cb cb, void *ud)
{ (void)st; return enqueue(P_STALE, (void *)cb, ud); }
int store_summary(store_t *st, const store_device_t *who, unsigned max, store_summary_cb cb,
                  void *ud)
{ (void)st; (void)who; (void)max; return enqueue(P_SUMMARY, (void *)cb, ud); }
int store_fetch(store_t *st, const store_device_t *who, uint64_t after_seq, unsigned max,
                size_t max_bytes, size_t overhead, store_fetch_cb cb, void *ud)
{ (void)st; (void)who; (void)after_seq; (void)max; (void)max_bytes; (void)overhead;
  return enqueue(P_FETCH, (void *)cb, ud); }

int store_activity(store_t *st, const char *user, int64_t now_ms, int64_t forget_ms,
                   store_flag_cb cb, void *ud)
{ (void)st; (void)user; (void)now_ms; (void)forget_ms; return enqueue(P_FLAG, (void *)cb, ud); }
int store_restore(store_t *st, const store_user_state_t *s, int64_t now_ms, store_done_cb cb,
                  void *ud)
{ (void)st; (void)s; (void)now_ms; return enqueue(P_DONE, (void *)cb, ud); }

/* The archive is never opened here (d.archive stays NULL), so these only satisfy the linker. */
int archive_summary(archive_t *a, const store_device_t *who, unsigned max, store_summary_cb cb,
                    void *ud)
{ (void)a; (void)who; (void)max; (void)cb; (void)ud; return ARCHIVE_EDB; }
int archive_fetch(archive_t *a, const store_device_t *who, uint64_t after_seq, unsigned max,
                  size_t max_bytes, size_t overhead, store_fetch_cb cb, void *ud)
{ (void)a; (void)who; (void)after_seq; (void)max; (void)max_bytes; (void)overhead; (void)cb;
  (void)ud; return ARCHIVE_EDB; }
int archive_ack(archive_t *a, const archive_ack_t *req, store_items_cb cb, void *ud)
{ (void)a; (void)req; (void)cb; (void)ud; return ARCHIVE_EDB; }
int archive_restore(archive_t *a, const char *user, archive_state_cb cb, void *ud)
{ (void)a; (void)user; (void)cb; (void)ud; return ARCHIVE_EDB; }
int archive_put_evicted(archive_t *a, const char *user, const archive_msg_t *msg,
                        const char *suffix, archive_put_cb cb, void *ud)
{ (void)a; (void)user; (void)msg; (void)suffix; (void)cb; (void)ud; return ARCHIVE_EDB; }

/* ---- the target ---------------------------------------------------------------------------- */

static daemon_t d;
static struct store fake_store;
static struct link fake_link;

static void on_open(void *ud, const char *id) { (void)ud; (void)id; }
static void on_close(void *ud) { (void)ud; }
static void on_stanza(void *ud, xmpp_stanza_t *s, bool oversize)
{
    router_dispatch(ud, s, oversize);
    run_pending();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const stream_callbacks_t cb = {on_open, on_stanza, on_close};
    static const char header[] =
        "<stream:stream xmlns='jabber:component:accept' "
        "xmlns:stream='http://etherx.jabber.org/streams' id='f'>";
    if (!ctx) {
        ctx = xmpp_ctx_new(NULL, NULL);
        log_set_level(LOG_ERROR);
        make_blobs();
        static char jid[] = "receipts.localhost", dom[] = "localhost";
        d.ctx = ctx;
        d.cfg.jid = jid;
        d.cfg.user_domains[0] = dom;
        d.cfg.n_user_domains = 1;
        d.cfg.fetch_max = 10;
        d.cfg.fetch_max_bytes = 4096;
        d.cfg.max_stanza_bytes = 2048;
        d.cfg.retry_ms = 100;
        d.cfg.window_ms = 1000;
        d.cfg.dedupe_s = 60;
        d.cfg.max_offline_messages = 10;
        d.cfg.max_offline_bytes = 10000;
        strcpy(d.epoch, "7");
        d.store = &fake_store;
        d.link = &fake_link;
    }
    rng = 0x9e3779b97f4a7c15ULL;
    for (size_t i = 0; i < size && i < 64; i++)
        rng = (rng ^ data[i]) * 1099511628211ULL;
    stream_parser_t *p = stream_parser_new(ctx, d.cfg.max_stanza_bytes, &cb, &d);
    stream_parser_feed(p, header, sizeof header - 1);
    stream_parser_feed(p, (const char *)data, size);
    stream_parser_free(p);
    run_pending();
    return 0;
}
