/* Reads and acks across the two tiers: Redis (hot) and the SQLite archive (old). Redis answers
 * first and says whether the user has anything archived; only then is the archive asked, and the
 * two answers are merged by arrival order (seq), so callers see one queue. A message being
 * archived can briefly be in both tiers: merging keeps one copy (same seq). */
#include <stdlib.h>
#include <string.h>

#include "archive.h"
#include "daemon.h"
#include "items.h"
#include "log.h"
#include "tiers.h"

/* The union of a and b (each oldest first) by seq, one copy per seq, as views into a and b. */
static size_t merge(const items_t *a, const store_item_t *b, size_t nb, uint64_t bound,
                    store_item_t *out)
{
    size_t i = 0, k = 0, n = 0;
    while (i < a->n || k < nb) {
        const store_item_t *next;
        if (k >= nb || (i < a->n && items_seq_of(a->v[i].sid) <= items_seq_of(b[k].sid))) {
            next = &a->v[i++];
            if (k < nb && items_seq_of(b[k].sid) == items_seq_of(next->sid))
                k++;
        } else {
            next = &b[k++];
        }
        if (bound && items_seq_of(next->sid) > bound)
            break;
        out[n++] = *next;
    }
    return n;
}

typedef struct who_copy {
    char user[PROTO_JID_MAX];
    char device[PROTO_JID_MAX];
    store_device_t who;
} who_copy_t;

static void who_set(who_copy_t *w, const store_device_t *who)
{
    snprintf(w->user, sizeof w->user, "%s", who->user);
    snprintf(w->device, sizeof w->device, "%s", who->device ? who->device : "");
    w->who = (store_device_t){w->user, w->device, who->now_ms};
}

/* ---- restore and the activity gate ------------------------------------------------------------
 */

typedef struct restore_ctx {
    daemon_t *d;
    char user[PROTO_JID_MAX];
    store_done_cb done;
    void *ud;
} restore_ctx_t;

static void on_restored(void *ud, int err)
{
    restore_ctx_t *c = ud;
    if (err)
        log_warn("tiers: could not restore the state of %s in Redis", c->user);
    if (c->done)
        c->done(c->ud, err);
    free(c);
}

static void on_archive_state(void *ud, int err, const store_user_state_t *state)
{
    restore_ctx_t *c = ud;
    if (err || !c->d->store) {
        log_warn("tiers: could not read the archived state of %s", c->user);
        on_restored(c, err ? err : STORE_EDOWN);
        return;
    }
    if (state->ndevices || state->archived)
        log_info("tiers: %s is back: state restored (seq %llu, %zu device(s))", c->user,
                 (unsigned long long)state->seq, state->ndevices);
    int rc = store_restore(c->d->store, state, daemon_now_ms(), on_restored, c);
    if (rc < 0)
        on_restored(c, rc);
}

int tiers_restore(daemon_t *d, const char *user, store_done_cb done, void *ud)
{
    restore_ctx_t *c = calloc(1, sizeof *c);
    if (!c)
        return STORE_ENOMEM;
    *c = (restore_ctx_t){.d = d, .done = done, .ud = ud};
    snprintf(c->user, sizeof c->user, "%s", user);
    if (!d->archive) {
        /* No archive: nothing was ever evicted; a new user starts at seq 0. */
        store_user_state_t st = {c->user, 0, NULL, 0, false};
        int rc =
            d->store ? store_restore(d->store, &st, daemon_now_ms(), on_restored, c) : STORE_EDOWN;
        if (rc < 0)
            free(c);
        return rc;
    }
    int rc = archive_restore(d->archive, c->user, on_archive_state, c);
    if (rc < 0)
        free(c);
    return rc;
}

/* Every read or ack by a user first records the activity; a user without state in Redis (new,
 * or evicted) gets it restored, then the request goes on. */
typedef void (*gate_fn)(void *ctx, int err);
typedef struct gate {
    daemon_t *d;
    char user[PROTO_JID_MAX];
    gate_fn go;
    void *ctx;
} gate_t;

static void on_gate_restored(void *ud, int err)
{
    gate_t *g = ud;
    if (g->go)
        g->go(g->ctx, err);
    free(g);
}

static void on_activity(void *ud, int err, bool cold)
{
    gate_t *g = ud;
    if (err || !cold) {
        on_gate_restored(g, err);
        return;
    }
    int rc = tiers_restore(g->d, g->user, on_gate_restored, g);
    if (rc < 0)
        on_gate_restored(g, rc);
}

/* Returns < 0 (and go never runs) when the store cannot take the request. */
static int gate(daemon_t *d, const char *user, gate_fn go, void *ctx)
{
    if (!d->store)
        return STORE_EDOWN;
    gate_t *g = calloc(1, sizeof *g);
    if (!g)
        return STORE_ENOMEM;
    *g = (gate_t){.d = d, .go = go, .ctx = ctx};
    snprintf(g->user, sizeof g->user, "%s", user);
    int rc = store_activity(d->store, user, daemon_now_ms(), d->cfg.evict_after_ms, on_activity, g);
    if (rc < 0)
        free(g);
    return rc;
}

int tiers_touch(daemon_t *d, const char *user)
{
    return gate(d, user, NULL, NULL);
}

/* ---- summary ----------------------------------------------------------------------------------
 */

typedef struct summary_ctx {
    daemon_t *d;
    who_copy_t w;
    unsigned max;
    store_summary_cb cb;
    void *ud;
    uint64_t count, bytes;
    items_t ends; /* the Redis oldest and newest, always 2 entries */
    items_t items;
} summary_ctx_t;

static void summary_free(summary_ctx_t *c)
{
    items_free(&c->ends);
    items_free(&c->items);
    free(c);
}

static void on_archive_summary(void *ud, int err, uint64_t count, uint64_t bytes,
                               const store_item_t ends[2], const store_item_t *items, size_t n,
                               bool archived)
{
    summary_ctx_t *c = ud;
    (void)archived;
    if (err) {
        log_warn("archive: summary for %s failed", c->w.user);
        c->cb(c->ud, STORE_EREPLY, 0, 0, NULL, NULL, 0, false);
        summary_free(c);
        return;
    }
    store_item_t both[2] = {count ? ends[0] : c->ends.v[0], c->count ? c->ends.v[1] : ends[1]};
    store_item_t *merged = calloc(c->items.n + n + 1, sizeof *merged);
    size_t m = merged ? merge(&c->items, items, n, 0, merged) : 0;
    if (m > c->max)
        m = c->max;
    c->cb(c->ud, merged ? 0 : STORE_ENOMEM, c->count + count, c->bytes + bytes, both, merged, m,
          true);
    free(merged);
    summary_free(c);
}

static void on_redis_summary(void *ud, int err, uint64_t count, uint64_t bytes,
                             const store_item_t ends[2], const store_item_t *items, size_t n,
                             bool archived)
{
    summary_ctx_t *c = ud;
    if (err || !archived || !c->d->archive) {
        c->cb(c->ud, err, count, bytes, ends, items, n, archived);
        summary_free(c);
        return;
    }
    c->count = count;
    c->bytes = bytes;
    if (items_add(&c->ends, ends, 2) < 0 || items_add(&c->items, items, n) < 0 ||
        archive_summary(c->d->archive, &c->w.who, c->max, on_archive_summary, c) < 0) {
        c->cb(c->ud, STORE_ENOMEM, 0, 0, NULL, NULL, 0, false);
        summary_free(c);
    }
}

static void summary_go(void *ctx, int err)
{
    summary_ctx_t *c = ctx;
    if (!err)
        err = c->d->store ? store_summary(c->d->store, &c->w.who, c->max, on_redis_summary, c)
                          : STORE_EDOWN;
    if (err) {
        c->cb(c->ud, err, 0, 0, NULL, NULL, 0, false);
        summary_free(c);
    }
}

int tiers_summary(daemon_t *d, const store_device_t *who, unsigned max, store_summary_cb cb,
                  void *ud)
{
    summary_ctx_t *c = calloc(1, sizeof *c);
    if (!c)
        return STORE_ENOMEM;
    *c = (summary_ctx_t){.d = d, .max = max, .cb = cb, .ud = ud};
    who_set(&c->w, who);
    int rc = gate(d, c->w.user, summary_go, c);
    if (rc < 0)
        free(c);
    return rc;
}

/* ---- fetch ------------------------------------------------------------------------------------
 */

typedef struct fetch_ctx {
    daemon_t *d;
    who_copy_t w;
    uint64_t after;
    unsigned max;
    size_t max_bytes, overhead;
    store_fetch_cb cb;
    void *ud;
    bool complete;
    char *cursor;
    items_t items;
} fetch_ctx_t;

static void fetch_free(fetch_ctx_t *c)
{
    items_free(&c->items);
    free(c->cursor);
    free(c);
}

static void on_archive_fetch(void *ud, int err, bool complete, const char *cursor,
                             const store_item_t *items, size_t n, bool archived)
{
    fetch_ctx_t *c = ud;
    (void)archived;
    if (err) {
        log_warn("archive: fetch for %s failed", c->w.user);
        c->cb(c->ud, STORE_EREPLY, false, NULL, NULL, 0, false);
        fetch_free(c);
        return;
    }
    /* Each tier's page is exact up to its cursor when it is not complete; the merged page is exact
     * up to the smaller of those. */
    const char *bound_sid = NULL;
    if (!c->complete && c->cursor)
        bound_sid = c->cursor;
    if (!complete && cursor && (!bound_sid || items_seq_of(cursor) < items_seq_of(bound_sid)))
        bound_sid = cursor;
    store_item_t *merged = calloc(c->items.n + n + 1, sizeof *merged);
    if (!merged) {
        c->cb(c->ud, STORE_ENOMEM, false, NULL, NULL, 0, false);
        fetch_free(c);
        return;
    }
    size_t m = merge(&c->items, items, n, items_seq_of(bound_sid), merged);
    size_t taken = items_fit(merged, m, c->max, c->max_bytes, c->overhead);
    bool all = taken == m && c->complete && complete;
    const char *next = taken < m || !bound_sid ? (taken ? merged[taken - 1].sid : NULL) : bound_sid;
    c->cb(c->ud, 0, all, next, merged, taken, true);
    free(merged);
    fetch_free(c);
}

static void on_redis_fetch(void *ud, int err, bool complete, const char *cursor,
                           const store_item_t *items, size_t n, bool archived)
{
    fetch_ctx_t *c = ud;
    if (err || !archived || !c->d->archive) {
        c->cb(c->ud, err, complete, cursor, items, n, archived);
        fetch_free(c);
        return;
    }
    c->complete = complete;
    if ((cursor && !(c->cursor = items_dup(cursor, strlen(cursor)))) ||
        items_add(&c->items, items, n) < 0 ||
        archive_fetch(c->d->archive, &c->w.who, c->after, c->max, c->max_bytes, c->overhead,
                      on_archive_fetch, c) < 0) {
        c->cb(c->ud, STORE_ENOMEM, false, NULL, NULL, 0, false);
        fetch_free(c);
    }
}

static void fetch_go(void *ctx, int err)
{
    fetch_ctx_t *c = ctx;
    if (!err)
        err = c->d->store ? store_fetch(c->d->store, &c->w.who, c->after, c->max, c->max_bytes,
                                        c->overhead, on_redis_fetch, c)
                          : STORE_EDOWN;
    if (err) {
        c->cb(c->ud, err, false, NULL, NULL, 0, false);
        fetch_free(c);
    }
}

int tiers_fetch(daemon_t *d, const store_device_t *who, uint64_t after_seq, unsigned max,
                size_t max_bytes, size_t overhead, store_fetch_cb cb, void *ud)
{
    fetch_ctx_t *c = calloc(1, sizeof *c);
    if (!c)
        return STORE_ENOMEM;
    *c = (fetch_ctx_t){.d = d,
                       .after = after_seq,
                       .max = max,
                       .max_bytes = max_bytes,
                       .overhead = overhead,
                       .cb = cb,
                       .ud = ud};
    who_set(&c->w, who);
    int rc = gate(d, c->w.user, fetch_go, c);
    if (rc < 0)
        free(c);
    return rc;
}

/* ---- ack --------------------------------------------------------------------------------------
 */

typedef struct ack_ctx {
    daemon_t *d;
    who_copy_t w;
    char **sids; /* NULL for an ack by origin */
    size_t n;
    char *origin;
    char *sender, *orig_id;
    store_items_cb cb;
    void *ud;
    items_t receipts;
} ack_ctx_t;

static void ack_free(ack_ctx_t *c)
{
    for (size_t i = 0; c->sids && i < c->n; i++)
        free(c->sids[i]);
    free(c->sids);
    free(c->origin);
    free(c->sender);
    free(c->orig_id);
    items_free(&c->receipts);
    free(c);
}

static void on_archive_ack(void *ud, int err, const store_item_t *items, size_t n)
{
    ack_ctx_t *c = ud;
    if (err)
        log_warn("archive: ack by %s/%s failed; it applies in Redis only", c->w.user, c->w.device);
    else if (items_add(&c->receipts, items, n) < 0)
        log_warn("archive: out of memory; receipts from the archive for %s not relayed", c->w.user);
    c->cb(c->ud, 0, c->receipts.v, c->receipts.n);
    ack_free(c);
}

static bool in_list(const char *const *list, size_t n, const char *s)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(list[i], s) == 0)
            return true;
    return false;
}

static void on_redis_ack(void *ud, int err, const store_ack_result_t *res)
{
    ack_ctx_t *c = ud;
    if (err || !res->archived || !c->d->archive) {
        c->cb(c->ud, err, err ? NULL : res->items, err ? 0 : res->n);
        ack_free(c);
        return;
    }
    /* Also in the archive: the messages that were not in Redis (their receipts come from there),
     * and those found in both because they were being archived (receipt already handled). */
    bool *ok = calloc(c->n + 1, sizeof *ok);
    const char *one[1];
    archive_ack_t req = {.who = &c->w.who, .known = res->known};
    if (c->sids) {
        for (size_t i = 0; ok && i < c->n; i++)
            ok[i] = !in_list(res->found, res->nfound, c->sids[i]);
        req.sids = (const char *const *)c->sids;
        req.n = c->n;
    } else if (res->nfound) {
        one[0] = res->found[0];
        req.sids = one;
        req.n = 1;
    } else {
        req.origin = c->origin;
    }
    req.receipt_ok = ok;
    if (!ok || items_add(&c->receipts, res->items, res->n) < 0 ||
        archive_ack(c->d->archive, &req, on_archive_ack, c) < 0) {
        c->cb(c->ud, 0, res->items, res->n);
        ack_free(c);
    }
    free(ok);
}

static void ack_go(void *ctx, int err)
{
    ack_ctx_t *c = ctx;
    daemon_t *d = c->d;
    if (!err && !d->store)
        err = STORE_EDOWN;
    if (!err)
        err = c->sids
                  ? store_ack_sids(d->store, &c->w.who, (const char *const *)c->sids, c->n,
                                   on_redis_ack, c)
                  : store_ack_origin(d->store, &c->w.who, c->sender, c->orig_id, on_redis_ack, c);
    if (err) {
        c->cb(c->ud, err, NULL, 0);
        ack_free(c);
    }
}

static int ack_start(daemon_t *d, ack_ctx_t *c)
{
    int rc = gate(d, c->w.user, ack_go, c);
    if (rc < 0)
        ack_free(c);
    return rc;
}

int tiers_ack_sids(daemon_t *d, const store_device_t *who, const char *const *sids, size_t n,
                   store_items_cb cb, void *ud)
{
    ack_ctx_t *c = calloc(1, sizeof *c);
    if (!c || !(c->sids = calloc(n + 1, sizeof *c->sids))) {
        free(c);
        return STORE_ENOMEM;
    }
    c->d = d;
    c->cb = cb;
    c->ud = ud;
    who_set(&c->w, who);
    for (size_t i = 0; i < n; i++, c->n++)
        if (!(c->sids[i] = items_dup(sids[i], strlen(sids[i])))) {
            ack_free(c);
            return STORE_ENOMEM;
        }
    return ack_start(d, c);
}

int tiers_ack_origin(daemon_t *d, const store_device_t *who, const char *sender,
                     const char *orig_id, store_items_cb cb, void *ud)
{
    ack_ctx_t *c = calloc(1, sizeof *c);
    size_t len = strlen(sender) + strlen(orig_id) + 2;
    if (!c || !(c->origin = malloc(len)) || !(c->sender = strdup(sender)) ||
        !(c->orig_id = strdup(orig_id))) {
        if (c)
            ack_free(c);
        return STORE_ENOMEM;
    }
    snprintf(c->origin, len, "%s %s", sender, orig_id);
    c->d = d;
    c->cb = cb;
    c->ud = ud;
    who_set(&c->w, who);
    return ack_start(d, c);
}
