/* The sharded indexes (storage/SCHEMA.md): each global index (due retransmissions, online users,
 * archive and eviction candidates) is split into STORE_SHARDS shards, each in its own slot, and
 * every script touches one slot only: the user's keys, or one shard's index keys. Work over many
 * users is therefore a sweep: claim users from every shard (a lease keeps a second instance off
 * them), run the per-user script for each, then put each user back in its index with its next
 * score. Index writes that go with a user's change are sent before it (store.c), so a crash in
 * between leaves at worst an index entry with nothing behind it, which the next sweep drops.
 *
 * A sweep owns its requests' count: when the last reply is in, its callback runs one last time
 * with last = true, and it is freed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store_internal.h"

typedef enum { SW_DUE, SW_STALE, SW_ARCH, SW_EVICT, SW_AFTER } sweep_kind_t;
enum { STEP_CLAIM, STEP_USER, STEP_AFTER };

/* Which index a kind claims from (the index_* scripts' KEYS order). */
enum { IDX_DUE = 1, IDX_ONLINE = 2, IDX_ARCH = 3, IDX_ACT = 4 };

typedef struct sweep {
    store_t *st;
    sweep_kind_t kind;
    unsigned pending;
    int err;
    int64_t now, limit, lease, retry;
    unsigned max_users, max_msgs;
    union {
        store_due_cb due;
        store_stale_cb stale;
        store_old_cb old;
        store_evict_cb evict;
        store_done_cb done;
        store_flag_cb flag;
    } cb;
    void *ud;
    int64_t result; /* SW_AFTER: what the first reply said */
} sweep_t;

static void sweep_release(sweep_t *sw)
{
    if (--sw->pending)
        return;
    switch (sw->kind) {
    case SW_DUE:
        sw->cb.due(sw->ud, sw->err, NULL, 0, true);
        break;
    case SW_STALE:
        sw->cb.stale(sw->ud, sw->err, NULL, NULL, 0, true);
        break;
    case SW_ARCH:
        sw->cb.old(sw->ud, sw->err, NULL, true);
        break;
    case SW_EVICT:
        sw->cb.evict(sw->ud, sw->err, NULL, true);
        break;
    case SW_AFTER:
        break;
    }
    free(sw);
}

/* Sends c for the sweep; the reply comes back to sweep_on_reply with step and user. */
static void sweep_send(sweep_t *sw, cmd_t *c, int step, const char *user, unsigned shard,
                       const char *const *list, size_t n)
{
    req_t *rq = store_req_new(REQ_SWEEP, NULL);
    if (!rq || (user && !(rq->user = strdup(user)))) {
        store_req_free(rq);
        sw->err = STORE_ENOMEM;
        return;
    }
    rq->sweep = sw;
    rq->step = step;
    rq->shard = shard;
    sw->pending++;
    int rc = list ? store_send_list(sw->st, rq, c, list, n) : store_send(sw->st, rq, c);
    if (rc < 0) { /* rq is gone, and no reply will come */
        sw->err = rc;
        sw->pending--;
    }
}

/* An index script call without a reply to wait for. */
static void index_call(store_t *st, unsigned shard, store_script_t s, const char *const *args,
                       size_t n, bool put_lane)
{
    cmd_t c;
    char keys[4][INDEX_KEY_MAX];
    req_t *rq = store_req_new(REQ_IGNORE, NULL);
    if (!rq)
        return;
    rq->put_lane = put_lane;
    store_cmd_evalsha(&c, st, s, 4);
    store_cmd_add_index(&c, shard, keys);
    store_send_list(st, rq, &c, args, n);
}

void store_index_set(store_t *st, const char *user, int which, int64_t score, int64_t lease)
{
    char w[8], sc[24], ls[24];
    snprintf(w, sizeof w, "%d", which);
    snprintf(sc, sizeof sc, "%lld", (long long)score);
    snprintf(ls, sizeof ls, "%lld", (long long)lease);
    const char *args[] = {w, user, sc, ls};
    index_call(st, store_user_shard(user), STORE_SCRIPT_INDEX_SET, args, 4, false);
}

void store_index_user(store_t *st, const char *user, const char *op, int64_t now)
{
    char n[24];
    snprintf(n, sizeof n, "%lld", (long long)now);
    const char *args[] = {user, op, n};
    index_call(st, store_user_shard(user), STORE_SCRIPT_INDEX_USER, args, 3, false);
}

#define BATCH_MAX 200 /* users per index_put call */

static void index_flush_shard(store_t *st, unsigned shard)
{
    index_batch_t *b = &st->ixb[shard];
    if (!b->n)
        return;
    /* On the puts' own connection, the put lane when there is one. */
    index_call(st, shard, STORE_SCRIPT_INDEX_PUT, (const char *const *)b->args, b->n, true);
    for (size_t i = 0; i < b->n; i++)
        free(b->args[i]);
    b->n = 0;
}

void store__index_flush(store_t *st)
{
    for (unsigned i = 0; i < STORE_SHARDS; i++)
        index_flush_shard(st, i);
}

void store_index_put(store_t *st, const char *user, int64_t due, int64_t now)
{
    if (st->closing)
        return;
    unsigned shard = store_user_shard(user);
    index_batch_t *b = &st->ixb[shard];
    if (b->n + 3 > b->cap) {
        size_t cap = b->cap ? 2 * b->cap : 48;
        char **args = realloc(b->args, cap * sizeof *args);
        if (!args)
            return; /* the next put or presence of the user indexes it */
        b->args = args;
        b->cap = cap;
    }
    char d[24], n[24];
    snprintf(d, sizeof d, "%lld", (long long)due);
    snprintf(n, sizeof n, "%lld", (long long)now);
    char *u = strdup(user), *ds = strdup(d), *ns = strdup(n);
    if (!u || !ds || !ns) {
        free(u);
        free(ds);
        free(ns);
        return;
    }
    b->args[b->n++] = u;
    b->args[b->n++] = ds;
    b->args[b->n++] = ns;
    if (b->n >= 3 * BATCH_MAX)
        index_flush_shard(st, shard);
    else
        store__schedule_turn_end(st);
}

/* ---- starting a sweep: claim from every shard ------------------------------------------------ */

static int sweep_start(sweep_t *sw)
{
    static const int which[] = {[SW_DUE] = IDX_DUE, [SW_ARCH] = IDX_ARCH, [SW_EVICT] = IDX_ACT};
    sw->pending = 1; /* held until every claim is sent */
    for (unsigned shard = 0; shard < STORE_SHARDS && !sw->err; shard++) {
        cmd_t c;
        char keys[4][INDEX_KEY_MAX];
        if (sw->kind == SW_STALE) {
            c.argc = c.nnums = 0;
            c.epoch = NULL;
            store_index_key(keys[0], INDEX_KEY_MAX, shard, "online");
            store_cmd_add(&c, "SMEMBERS");
            store_cmd_add(&c, keys[0]);
        } else {
            store_cmd_evalsha(&c, sw->st, STORE_SCRIPT_INDEX_CLAIM, 4);
            store_cmd_add_index(&c, shard, keys);
            store_cmd_add_num(&c, which[sw->kind]);
            store_cmd_add_num(&c, sw->limit);
            store_cmd_add_num(&c, sw->lease);
            store_cmd_add_num(&c, sw->max_users);
        }
        sweep_send(sw, &c, STEP_CLAIM, NULL, shard, NULL, 0);
    }
    if (sw->err && sw->pending == 1) {
        int err = sw->err;
        free(sw);
        return err; /* nothing went out: no callback */
    }
    sweep_release(sw);
    return 0;
}

static sweep_t *sweep_new(store_t *st, sweep_kind_t kind, void *ud)
{
    if (!st->connected)
        return NULL;
    sweep_t *sw = calloc(1, sizeof *sw);
    if (sw) {
        sw->st = st;
        sw->kind = kind;
        sw->ud = ud;
    }
    return sw;
}

int store_claim_due(store_t *st, int64_t now_ms, int64_t retry_ms, unsigned max_users,
                    store_due_cb cb, void *ud)
{
    sweep_t *sw = sweep_new(st, SW_DUE, ud);
    if (!sw)
        return st->connected ? STORE_ENOMEM : STORE_EDOWN;
    sw->cb.due = cb;
    sw->now = sw->limit = now_ms;
    sw->retry = retry_ms;
    sw->lease = now_ms + retry_ms;
    sw->max_users = max_users;
    return sweep_start(sw);
}

int store_presence_stale(store_t *st, store_stale_cb cb, void *ud)
{
    sweep_t *sw = sweep_new(st, SW_STALE, ud);
    if (!sw)
        return st->connected ? STORE_ENOMEM : STORE_EDOWN;
    sw->cb.stale = cb;
    return sweep_start(sw);
}

/* The archive and eviction sweeps differ only in their index and per-user script. */
static int take_sweep(store_t *st, sweep_kind_t kind, int64_t cutoff_ms, int64_t now_ms,
                      int64_t lease_ms, unsigned max_users, unsigned max_msgs, sweep_t **out)
{
    sweep_t *sw = sweep_new(st, kind, NULL);
    if (!sw)
        return st->connected ? STORE_ENOMEM : STORE_EDOWN;
    sw->limit = cutoff_ms;
    sw->now = now_ms;
    sw->lease = lease_ms;
    sw->max_users = max_users;
    sw->max_msgs = max_msgs;
    *out = sw;
    return 0;
}

int store_archive_take(store_t *st, int64_t cutoff_ms, int64_t now_ms, int64_t lease_ms,
                       unsigned max_users, unsigned max_msgs, store_old_cb cb, void *ud)
{
    sweep_t *sw;
    int rc = take_sweep(st, SW_ARCH, cutoff_ms, now_ms, lease_ms, max_users, max_msgs, &sw);
    if (rc < 0)
        return rc;
    sw->cb.old = cb;
    sw->ud = ud;
    return sweep_start(sw);
}

int store_evict_take(store_t *st, int64_t cutoff_ms, int64_t now_ms, int64_t lease_ms,
                     unsigned max_users, unsigned max_msgs, store_evict_cb cb, void *ud)
{
    sweep_t *sw;
    int rc = take_sweep(st, SW_EVICT, cutoff_ms, now_ms, lease_ms, max_users, max_msgs, &sw);
    if (rc < 0)
        return rc;
    sw->cb.evict = cb;
    sw->ud = ud;
    return sweep_start(sw);
}

/* ---- per-user steps ----------------------------------------------------------------------- */

static void user_step(sweep_t *sw, const char *user, unsigned shard)
{
    cmd_t c;
    char prefix[PREFIX_MAX];
    if (store_user_prefix(prefix, sizeof prefix, user) < 0)
        return;
    switch (sw->kind) {
    case SW_DUE:
        store_cmd_evalsha(&c, sw->st, STORE_SCRIPT_DUE, 1);
        store_cmd_add(&c, prefix);
        store_cmd_add_num(&c, sw->now);
        store_cmd_add_num(&c, sw->retry);
        break;
    case SW_STALE:
        store_cmd_evalsha(&c, sw->st, STORE_SCRIPT_STALE, 1);
        store_cmd_add(&c, prefix);
        break;
    case SW_ARCH:
        store_cmd_evalsha(&c, sw->st, STORE_SCRIPT_ARCHIVE_TAKE, 1);
        store_cmd_add(&c, prefix);
        store_cmd_add_num(&c, sw->limit);
        store_cmd_add_num(&c, sw->now);
        store_cmd_add_num(&c, sw->max_msgs);
        break;
    case SW_EVICT:
        store_cmd_evalsha(&c, sw->st, STORE_SCRIPT_EVICT_TAKE, 1);
        store_cmd_add(&c, prefix);
        store_cmd_add_num(&c, sw->max_msgs);
        break;
    case SW_AFTER:
        return;
    }
    sweep_send(sw, &c, STEP_USER, user, shard, NULL, 0);
}

static int on_user_due(sweep_t *sw, const char *user, const redisReply *r)
{
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 1 || r->elements % 2 != 1 ||
        r->element[0]->type != REDIS_REPLY_INTEGER)
        return -1;
    size_t n = r->elements / 2;
    store_due_t *due = n ? calloc(n, sizeof *due) : NULL;
    int rc = -1;
    if (n && !due)
        return -1;
    for (size_t i = 0; i < n; i++) {
        const redisReply *res = r->element[1 + 2 * i];
        if (!store_reply_is_str(res) ||
            store_reply_pairs(r->element[2 + 2 * i], 0, &due[i].items, &due[i].nitems) < 0)
            goto out;
        due[i].user = user;
        due[i].resource = res->str;
    }
    store_index_set(sw->st, user, IDX_DUE, r->element[0]->integer, sw->lease);
    if (n)
        sw->cb.due(sw->ud, 0, due, n, false);
    rc = 0;
out:
    for (size_t i = 0; i < n; i++)
        free(due[i].items);
    free(due);
    return rc;
}

static int on_user_stale(sweep_t *sw, const char *user, const redisReply *r)
{
    if (r->type != REDIS_REPLY_ARRAY)
        return -1;
    if (!r->elements)
        return 0;
    const char **res = calloc(r->elements, sizeof *res);
    if (!res)
        return -1;
    for (size_t i = 0; i < r->elements; i++) {
        if (!store_reply_is_str(r->element[i])) {
            free(res);
            return -1;
        }
        res[i] = r->element[i]->str;
    }
    sw->cb.stale(sw->ud, 0, user, res, r->elements, false);
    free(res);
    return 0;
}

static int on_user_arch(sweep_t *sw, const char *user, const redisReply *r)
{
    store_old_t u = {user, NULL, 0};
    if (store_reply_old_msgs(r, &u.msgs, &u.n) < 0)
        return -1;
    sw->cb.old(sw->ud, 0, &u, false);
    free(u.msgs);
    return 0;
}

static int on_user_evict(sweep_t *sw, const char *user, const redisReply *r)
{
    if (r->type != REDIS_REPLY_ARRAY)
        return -1;
    if (r->elements == 0) {
        /* somebody is online or a delivery is pending: active, look again later */
        store_index_set(sw->st, user, IDX_ACT, sw->now, sw->lease);
        return 0;
    }
    redisReply **e = r->element;
    store_evictee_t u = {0};
    if (r->elements != 4 || !store_reply_is_str(e[0]) || e[1]->type != REDIS_REPLY_ARRAY ||
        e[1]->elements % 2 || e[2]->type != REDIS_REPLY_INTEGER ||
        store_reply_old_msgs(e[3], &u.msgs, &u.n) < 0)
        return -1;
    const char **devs = e[1]->elements ? calloc(e[1]->elements, sizeof *devs) : NULL;
    if (e[1]->elements && !devs) {
        free(u.msgs);
        return -1;
    }
    for (size_t k = 0; k < e[1]->elements; k++)
        devs[k] = store_reply_is_str(e[1]->element[k]) ? e[1]->element[k]->str : "";
    u.state =
        (store_user_state_t){user, strtoull(e[0]->str, NULL, 10), devs, e[1]->elements / 2, true};
    u.complete = e[2]->integer == 1;
    sw->cb.evict(sw->ud, 0, &u, false);
    free(devs);
    free(u.msgs);
    return 0;
}

/* ---- drops: a per-user change, then its index ------------------------------------------------ */

/* A drop is a one-request sweep: the per-user script with the sids after arg, then (on_after)
 * the user's index entry `which`. An eviction on a single Redis also gets the user's index shard,
 * to take the user off it in the same step (storage/scripts.c, evict_drop). */
static int drop_send(store_t *st, sweep_t *sw, store_script_t script, const char *user,
                     const char *arg, const char *const *sids, size_t n)
{
    char prefix[PREFIX_MAX], keys[4][INDEX_KEY_MAX];
    cmd_t c;
    if (store_user_prefix(prefix, sizeof prefix, user) < 0) {
        free(sw);
        return STORE_EREPLY;
    }
    bool indexed = script == STORE_SCRIPT_EVICT_DROP && !st->cluster;
    store_cmd_evalsha(&c, st, script, indexed ? 5 : 1);
    store_cmd_add(&c, prefix);
    if (indexed)
        store_cmd_add_index(&c, store_user_shard(user), keys);
    store_cmd_add(&c, arg);
    sweep_send(sw, &c, STEP_AFTER, user, 0, sids, n);
    if (!sw->pending) {
        int err = sw->err;
        free(sw);
        return err;
    }
    return 0;
}

int store_archive_drop(store_t *st, const char *user, int64_t now_ms, int64_t lease_ms,
                       const char *const *sids, size_t n, store_done_cb cb, void *ud)
{
    sweep_t *sw = sweep_new(st, SW_AFTER, ud);
    if (!sw)
        return st->connected ? STORE_ENOMEM : STORE_EDOWN;
    char now[24];
    snprintf(now, sizeof now, "%lld", (long long)now_ms);
    sw->cb.done = cb;
    sw->lease = lease_ms;
    sw->limit = IDX_ARCH;
    return drop_send(st, sw, STORE_SCRIPT_ARCHIVE_DROP, user, now, sids, n);
}

int store_evict_drop(store_t *st, const char *user, bool evict, int64_t now_ms, int64_t lease_ms,
                     const char *const *sids, size_t n, store_flag_cb cb, void *ud)
{
    sweep_t *sw = sweep_new(st, SW_AFTER, ud);
    if (!sw)
        return st->connected ? STORE_ENOMEM : STORE_EDOWN;
    sw->cb.flag = cb;
    sw->lease = lease_ms;
    sw->now = now_ms;
    sw->limit = IDX_ACT;
    return drop_send(st, sw, STORE_SCRIPT_EVICT_DROP, user, evict ? "1" : "0", sids, n);
}

static int on_after(sweep_t *sw, const char *user, const redisReply *r)
{
    if (r->type != REDIS_REPLY_INTEGER)
        return -1;
    if (sw->limit == IDX_ARCH) {
        store_index_set(sw->st, user, IDX_ARCH, r->integer, sw->lease);
        if (sw->cb.done)
            sw->cb.done(sw->ud, 0);
    } else {
        if (r->integer != 1) /* not all of it moved yet: claimable again at once */
            store_index_set(sw->st, user, IDX_ACT, 0, sw->lease);
        else if (sw->st->cluster) /* a single Redis: evict_drop took it off every index */
            store_index_user(sw->st, user, "forget", 0);
        if (sw->cb.flag)
            sw->cb.flag(sw->ud, 0, r->integer == 1);
    }
    return 0;
}

/* ---- replies ----------------------------------------------------------------------------------
 */

static void after_fail(sweep_t *sw, int err)
{
    if (sw->limit == IDX_ARCH) {
        if (sw->cb.done)
            sw->cb.done(sw->ud, err);
    } else if (sw->cb.flag) {
        sw->cb.flag(sw->ud, err, false);
    }
}

int sweep_on_reply(req_t *rq, const redisReply *r)
{
    sweep_t *sw = rq->sweep;
    int rc = 0;
    if (rq->step == STEP_AFTER) {
        rc = on_after(sw, rq->user, r);
        if (rc < 0)
            after_fail(sw, STORE_EREPLY);
        free(sw);
        return 0;
    }
    if (rq->step == STEP_CLAIM) {
        if (r->type != REDIS_REPLY_ARRAY) {
            rc = -1;
        } else {
            for (size_t i = 0; i < r->elements; i++)
                if (store_reply_is_str(r->element[i]))
                    user_step(sw, r->element[i]->str, rq->shard);
        }
    } else {
        switch (sw->kind) {
        case SW_DUE:
            rc = on_user_due(sw, rq->user, r);
            break;
        case SW_STALE:
            rc = on_user_stale(sw, rq->user, r);
            break;
        case SW_ARCH:
            rc = on_user_arch(sw, rq->user, r);
            break;
        case SW_EVICT:
            rc = on_user_evict(sw, rq->user, r);
            break;
        case SW_AFTER:
            break;
        }
    }
    if (rc < 0 && !sw->err)
        sw->err = STORE_EREPLY;
    sweep_release(sw);
    return 0;
}

void sweep_on_fail(req_t *rq, int err)
{
    sweep_t *sw = rq->sweep;
    if (rq->step == STEP_AFTER) {
        after_fail(sw, err);
        free(sw);
        return;
    }
    if (!sw->err)
        sw->err = err;
    sweep_release(sw);
}
