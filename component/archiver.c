/* The archiver: a timer moves offline messages older than archive_after from Redis to SQLite,
 * then evicts users inactive for evict_after (all their Redis state to SQLite).
 *
 * Each pass is take (Redis, read only) -> insert (SQLite, one transaction, insert-or-ignore by
 * seq) -> drop (Redis) per user. A crash anywhere in between leaves the message in Redis, in
 * SQLite, or in both; the next pass finishes the move, and readers merge the tiers by seq, so
 * nothing is lost or shown twice. One pass at a time; retention runs at the end of a pass. */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "blob.h"
#include "daemon.h"
#include "log.h"

#define PASS_USERS 16 /* per index shard */
#define PASS_MESSAGES 1000
/* A user taken by a pass is leased for a while: another instance sharing Redis leaves it alone,
 * and if this one dies mid-move the next pass (of either) takes it again after that. Two
 * instances moving the same user at once (a lease that ran out during a slow pass) only repeat
 * idempotent work: insert-or-ignore, then deleting what is already gone. */
static int64_t lease_ms(const daemon_t *d)
{
    int64_t tick = (int64_t)uv_timer_get_repeat(&d->archive_timer);
    int64_t lease = 2 * tick;
    return lease < 1000 ? 1000 : lease > 60000 ? 60000 : lease;
}

typedef struct pass {
    daemon_t *d;
    unsigned pending; /* users still being moved, plus one while the take runs */
    uint64_t moved;
    int64_t lease;
} pass_t;

typedef struct user_move {
    pass_t *pass;
    char *user;
    char **sids;
    size_t n;
} user_move_t;

static void pass_end(pass_t *p);
static void evict_pass(daemon_t *d);

static void user_move_free(user_move_t *m)
{
    for (size_t i = 0; i < m->n; i++)
        free(m->sids[i]);
    free(m->sids);
    free(m->user);
    free(m);
}

static void on_expired(void *ud, int err, uint64_t n)
{
    daemon_t *d = ud;
    if (err)
        log_warn("archiver: retention purge failed");
    else if (n) {
        d->stats.expired += n;
        log_info("archiver: %" PRIu64 " archived message(s) past retention_days deleted", n);
    }
}

static void on_dropped(void *ud, int err)
{
    user_move_t *m = ud;
    pass_t *p = m->pass;
    if (err)
        log_warn("archiver: %zu message(s) of %s are archived but still in Redis; next pass",
                 m->n, m->user);
    else
        p->moved += m->n;
    user_move_free(m);
    if (--p->pending == 0)
        pass_end(p);
}

static void drop(user_move_t *m)
{
    daemon_t *d = m->pass->d;
    if (!d->store || store_archive_drop(d->store, m->user, daemon_now_ms(), m->pass->lease,
                                        (const char *const *)m->sids, m->n, on_dropped, m) < 0)
        on_dropped(m, STORE_EDOWN);
}

static void on_inserted(void *ud, int err)
{
    user_move_t *m = ud;
    if (err) {
        /* Still in Redis, nothing dropped: the next pass retries. */
        log_warn("archiver: writing %zu message(s) of %s to the archive failed", m->n, m->user);
        pass_t *p = m->pass;
        user_move_free(m);
        if (--p->pending == 0)
            pass_end(p);
        return;
    }
    drop(m);
}

static void move_user(pass_t *p, const store_old_t *u)
{
    daemon_t *d = p->d;
    user_move_t *m = calloc(1, sizeof *m);
    archive_msg_t *msgs = calloc(u->n + 1, sizeof *msgs);
    store_blob_t *b = malloc(sizeof *b);
    if (!m || !msgs || !b || !(m->user = strdup(u->user)) ||
        !(m->sids = calloc(u->n + 1, sizeof *m->sids)))
        goto oom;
    m->pass = p;
    for (size_t i = 0; i < u->n; i++, m->n++) {
        const store_old_msg_t *o = &u->msgs[i];
        if (!(m->sids[i] = strdup(o->sid)))
            goto oom;
        int64_t stamp = store_blob_decode(o->blob, o->blob_len, b) == 0 ? b->stamp_ms : 0;
        msgs[i] = (archive_msg_t){o->sid, stamp, o->blob, o->blob_len, o->acked,
                                  *o->origin ? o->origin : NULL};
    }
    p->pending++;
    if (u->n == 0)
        drop(m); /* nothing old enough yet: only re-index the user */
    else if (!d->archive || archive_put(d->archive, u->user, msgs, u->n, on_inserted, m) < 0)
        on_inserted(m, ARCHIVE_EDB);
    free(msgs);
    free(b);
    return;
oom:
    log_warn("archiver: out of memory moving messages of %s", u->user);
    if (m)
        user_move_free(m);
    free(msgs);
    free(b);
}

static void pass_end(pass_t *p)
{
    daemon_t *d = p->d;
    if (p->moved) {
        d->stats.archived += p->moved;
        log_info("archiver: %" PRIu64 " message(s) moved from Redis to the archive", p->moved);
    }
    if (d->cfg.retention_days && d->archive)
        archive_expire(d->archive, daemon_now_ms() - (int64_t)d->cfg.retention_days * 86400000,
                       on_expired, d);
    free(p);
    evict_pass(d);
}

/* ---- eviction ------------------------------------------------------------------------------ */

typedef struct evict_pass {
    daemon_t *d;
    unsigned pending; /* users still being evicted, plus one while the take runs */
    uint64_t evicted;
    int64_t lease;
} evict_pass_t;

typedef struct evictee {
    evict_pass_t *pass;
    char *user;
    char **sids;
    size_t n;
    bool complete;
} evictee_t;

static void evictee_free(evictee_t *e)
{
    for (size_t i = 0; i < e->n; i++)
        free(e->sids[i]);
    free(e->sids);
    free(e->user);
    free(e);
}

static void evict_end(evict_pass_t *p)
{
    if (p->evicted) {
        p->d->stats.evicted += p->evicted;
        log_info("archiver: %" PRIu64 " inactive user(s) evicted from Redis to the archive",
                 p->evicted);
    }
    p->d->archive_inflight = false;
    free(p);
}

static void evictee_done(evictee_t *e)
{
    evict_pass_t *p = e->pass;
    evictee_free(e);
    if (--p->pending == 0)
        evict_end(p);
}

static void on_evict_dropped(void *ud, int err, bool evicted)
{
    evictee_t *e = ud;
    if (err)
        log_warn("archiver: %s is in the archive but its Redis state could not be deleted; next "
                 "pass", e->user);
    else if (evicted) {
        e->pass->evicted++;
        log_debug("archiver: %s evicted (%zu message(s))", e->user, e->n);
    }
    evictee_done(e);
}

static void on_evict_written(void *ud, int err)
{
    evictee_t *e = ud;
    daemon_t *d = e->pass->d;
    if (err) {
        log_warn("archiver: writing the state of %s to the archive failed", e->user);
        evictee_done(e);
        return;
    }
    if (!d->store || store_evict_drop(d->store, e->user, e->complete, daemon_now_ms(),
                                      e->pass->lease, (const char *const *)e->sids, e->n,
                                      on_evict_dropped, e) < 0)
        on_evict_dropped(e, STORE_EDOWN, false);
}

static void evict_user(evict_pass_t *p, const store_evictee_t *u)
{
    daemon_t *d = p->d;
    evictee_t *e = calloc(1, sizeof *e);
    archive_msg_t *msgs = calloc(u->n + 1, sizeof *msgs);
    store_blob_t *b = malloc(sizeof *b);
    if (!e || !msgs || !b || !(e->user = strdup(u->state.user)) ||
        !(e->sids = calloc(u->n + 1, sizeof *e->sids)))
        goto oom;
    e->pass = p;
    e->complete = u->complete;
    for (size_t i = 0; i < u->n; i++, e->n++) {
        const store_old_msg_t *o = &u->msgs[i];
        if (!(e->sids[i] = strdup(o->sid)))
            goto oom;
        int64_t stamp = store_blob_decode(o->blob, o->blob_len, b) == 0 ? b->stamp_ms : 0;
        msgs[i] = (archive_msg_t){o->sid, stamp, o->blob, o->blob_len, o->acked,
                                  *o->origin ? o->origin : NULL};
    }
    p->pending++;
    if (archive_evict(d->archive, &u->state, msgs, u->n, u->complete, on_evict_written, e) < 0)
        on_evict_written(e, ARCHIVE_EDB);
    free(msgs);
    free(b);
    return;
oom:
    log_warn("archiver: out of memory evicting %s", u->state.user);
    if (e)
        evictee_free(e);
    free(msgs);
    free(b);
}

static void on_evict_taken(void *ud, int err, const store_evictee_t *user, bool last)
{
    evict_pass_t *p = ud;
    if (!err && user)
        evict_user(p, user);
    if (last && --p->pending == 0)
        evict_end(p);
}

static void evict_pass(daemon_t *d)
{
    evict_pass_t *p = calloc(1, sizeof *p);
    int64_t now = daemon_now_ms();
    if (p) {
        p->d = d;
        p->pending = 1;
        p->lease = now + lease_ms(d);
    }
    if (!p || !d->archive || !d->store ||
        store_evict_take(d->store, now - d->cfg.evict_after_ms, now, p->lease, PASS_USERS,
                         PASS_MESSAGES, on_evict_taken, p) < 0) {
        free(p);
        d->archive_inflight = false;
    }
}

static void on_taken(void *ud, int err, const store_old_t *user, bool last)
{
    pass_t *p = ud;
    if (!err && user)
        move_user(p, user);
    if (last && --p->pending == 0)
        pass_end(p);
}

static void on_tick(uv_timer_t *t)
{
    daemon_t *d = t->data;
    if (d->archive_inflight || !d->archive || !d->store || !store_is_connected(d->store))
        return;
    pass_t *p = calloc(1, sizeof *p);
    if (!p)
        return;
    int64_t now = daemon_now_ms();
    p->d = d;
    p->pending = 1;
    p->lease = now + lease_ms(d);
    if (store_archive_take(d->store, now - d->cfg.archive_after_ms, now, p->lease, PASS_USERS,
                           PASS_MESSAGES, on_taken, p) < 0) {
        free(p);
        return;
    }
    d->archive_inflight = true;
}

void archiver_start(daemon_t *d)
{
    /* A tenth of the shorter of archive_after and evict_after, between 100 ms and a minute:
     * messages and users move within 10% of their age limit, and an idle daemon wakes up
     * rarely. */
    int64_t limit = d->cfg.archive_after_ms < d->cfg.evict_after_ms ? d->cfg.archive_after_ms
                                                                     : d->cfg.evict_after_ms;
    uint64_t tick = (uint64_t)limit / 10;
    if (tick < 100)
        tick = 100;
    if (tick > 60000)
        tick = 60000;
    uv_timer_init(d->loop, &d->archive_timer);
    d->archive_timer.data = d;
    uv_timer_start(&d->archive_timer, on_tick, tick, tick);
}

void archiver_stop(daemon_t *d)
{
    uv_timer_stop(&d->archive_timer);
    uv_close((uv_handle_t *)&d->archive_timer, NULL);
}
