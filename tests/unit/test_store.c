/* storage/ against a real redis-server (tests/unit/with-redis.sh starts one and sets
 * REDIS_PORT). Each step runs the loop until its callback has run. */
#include <hiredis/hiredis.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "archive.h"
#include "blob.h"
#include "check.h"
#include "slots.h"
#include "store.h"

static uv_loop_t loop;
static store_t *st;
static int done;
static int connected;

static void run_until_done(void)
{
    done = 0;
    while (!done)
        uv_run(&loop, UV_RUN_ONCE);
}

static void on_state(void *ud, int c, const char *err)
{
    (void)ud;
    (void)err;
    connected = c;
    done = 1;
}

/* ---- captured results ---- */
static store_put_result_t put_res;
static char put_sid[64], put_res0[64];
static int put_err;

static void on_put(void *ud, int err, const store_put_result_t *r)
{
    (void)ud;
    put_err = err;
    if (!err) {
        put_res = *r;
        snprintf(put_sid, sizeof put_sid, "%s", r->sid);
        snprintf(put_res0, sizeof put_res0, "%s", r->nresources ? r->resources[0] : "");
        put_res.sid = put_sid;
        put_res.resources = NULL;
    }
    done = 1;
}

static void on_done_put(void *ud, int err)
{
    *(int *)ud = err;
    done = 1;
}

static int put(const char *user, const char *sender, const char *id, bool track, uint64_t max_n,
               int64_t now)
{
    proto_buf_t b;
    char from[128];
    snprintf(from, sizeof from, "%s/phone", sender); /* the origin is read back from the blob */
    proto_buf_init(&b);
    store_blob_encode(&b, now, track ? STORE_BLOB_RECEIPT : 0, from, "chat", id, "<body>x</body>",
                      14);
    store_put_t req = {.user = user,
                       .sender = sender,
                       .orig_id = id,
                       .blob = b.data,
                       .blob_len = b.len,
                       .track = track,
                       .now_ms = now,
                       .retry_ms = 100,
                       .window_ms = 1000,
                       .max_messages = max_n,
                       .max_bytes = 1 << 20};
    int rc = store_put_message(st, &req, on_put, NULL);
    if (rc == 0)
        run_until_done();
    if (rc == 0 && put_err == 0 && put_res.status == STORE_PUT_COLD) {
        /* A user's first message: its state is created (seq 0), then the put goes through. */
        int err = -1;
        store_user_state_t fresh = {user, 0, NULL, 0, false};
        CHECK(store_restore(st, &fresh, now, on_done_put, &err) == 0);
        run_until_done();
        CHECK(err == 0);
        rc = store_put_message(st, &req, on_put, NULL);
        if (rc == 0)
            run_until_done();
    }
    proto_buf_free(&b);
    return rc;
}

static size_t items_n;
static char items_sid[8][64];
static bool fetch_complete;
static uint64_t sum_count, sum_bytes;

static void on_items(void *ud, int err, const store_item_t *items, size_t n)
{
    (void)ud;
    items_n = err ? (size_t)-1 : n;
    for (size_t i = 0; i < n && i < 8; i++)
        snprintf(items_sid[i], sizeof items_sid[i], "%s", items[i].sid);
    done = 1;
}

static char fetch_cursor[64];
static bool last_archived;
static void on_fetch(void *ud, int err, bool complete, const char *cursor,
                     const store_item_t *items, size_t n, bool archived)
{
    fetch_complete = complete;
    last_archived = archived;
    snprintf(fetch_cursor, sizeof fetch_cursor, "%s", cursor ? cursor : "");
    on_items(ud, err, items, n);
}

static void on_summary(void *ud, int err, uint64_t count, uint64_t bytes,
                       const store_item_t ends[2], const store_item_t *items, size_t n,
                       bool archived)
{
    sum_count = count;
    last_archived = archived;
    sum_bytes = bytes;
    CHECK(err || count == 0 || (ends[0].blob_len > 0 && ends[1].blob_len > 0));
    on_items(ud, err, items, n);
}

static char ack_known[256];
static void on_ack(void *ud, int err, const store_ack_result_t *res)
{
    if (!err) {
        last_archived = res->archived;
        snprintf(ack_known, sizeof ack_known, "%s", res->known);
    }
    on_items(ud, err, err ? NULL : res->items, err ? 0 : res->n);
}

/* Sweeps call back once per user, then once with last: the counters are reset by the caller. */
static size_t due_users, due_items;
static void on_due(void *ud, int err, const store_due_t *due, size_t n, bool last)
{
    (void)ud;
    if (err)
        due_users = 999;
    due_users += n; /* groups: one per resource */
    for (size_t i = 0; i < n; i++)
        due_items += due[i].nitems;
    if (last)
        done = 1;
}

static int claim_due(int64_t now)
{
    due_users = due_items = 0;
    int rc = store_claim_due(st, now, 100, 10, on_due, NULL);
    if (rc == 0)
        run_until_done();
    return rc;
}

static size_t stale_n;
static void on_stale(void *ud, int err, const char *user, const char *const *res, size_t n,
                     bool last)
{
    (void)ud;
    (void)user;
    (void)res;
    stale_n += err ? 999 : n;
    if (last)
        done = 1;
}

static void on_done(void *ud, int err)
{
    *(int *)ud = err;
    done = 1;
}

static char epoch[32];
static void on_epoch(void *ud, int err, const char *e)
{
    (void)ud;
    snprintf(epoch, sizeof epoch, "%s", err ? "" : e);
    /* As the daemon does: scripts run with the epoch of the latest attach. */
    if (!err && ud != (void *)1)
        store_set_epoch(st, e);
    done = 1;
}

static void test_offline_queue(void)
{
    const char *bob = "bob@t1", *alice = "alice@t1";
    /* bob has no known device yet: his messages wait in the shared queue, which any device of
     * his reads. */
    const store_device_t bob_dev = {bob, "phone", 1}, mallory = {"mallory@t1", "x", 1};
    char sids[3][64];
    for (int i = 0; i < 3; i++) {
        char id[8];
        snprintf(id, sizeof id, "m%d", i);
        CHECK(put(bob, alice, id, true, 100, 1000 + i) == 0);
        CHECK(put_err == 0 && put_res.status == STORE_PUT_OFFLINE);
        snprintf(sids[i], sizeof sids[i], "%s", put_sid);
    }
    CHECK(strncmp(sids[0], "1-", 2) == 0 && strncmp(sids[2], "3-", 2) == 0);
    /* The same (sender, id) again: the first stanza id, nothing stored. */
    CHECK(put(bob, alice, "m1", true, 100, 2000) == 0);
    CHECK(put_res.status == STORE_PUT_DUP);
    CHECK_STR(put_sid, sids[1]);

    CHECK(store_summary(st, &bob_dev, 10, on_summary, NULL) == 0);
    run_until_done();
    CHECK(sum_count == 3 && items_n == 3 && sum_bytes > 0);
    CHECK_STR(items_sid[0], sids[0]);

    CHECK(store_fetch(st, &bob_dev, 0, 2, 1 << 20, 0, on_fetch, NULL) == 0);
    run_until_done();
    CHECK(items_n == 2 && !fetch_complete);
    CHECK(store_fetch(st, &bob_dev, 2, 2, 1 << 20, 0, on_fetch, NULL) == 0);
    run_until_done();
    CHECK(items_n == 1 && fetch_complete);
    CHECK_STR(items_sid[0], sids[2]);
    /* A byte budget smaller than one message still yields one, so a reader always advances. */
    CHECK(store_fetch(st, &bob_dev, 0, 10, 1, 0, on_fetch, NULL) == 0);
    run_until_done();
    CHECK(items_n == 1 && !fetch_complete);

    /* Quota: 3 queued, at most 3. */
    CHECK(put(bob, alice, "m9", true, 3, 3000) == 0);
    CHECK(put_res.status == STORE_PUT_FULL);

    /* Another user's ack of bob's ids clears nothing. */
    const char *ack1[] = {sids[0]};
    CHECK(store_ack_sids(st, &mallory, ack1, 1, on_ack, NULL) == 0);
    run_until_done();
    CHECK(items_n == 0);
    CHECK(store_ack_sids(st, &bob_dev, ack1, 1, on_ack, NULL) == 0);
    run_until_done();
    CHECK(items_n == 1);
    /* Acks are idempotent. */
    CHECK(store_ack_sids(st, &bob_dev, ack1, 1, on_ack, NULL) == 0);
    run_until_done();
    CHECK(items_n == 0);
    /* A <received/> finds the message by sender and original id. */
    CHECK(store_ack_origin(st, &bob_dev, "alice@t1", "m1", on_ack, NULL) == 0);
    run_until_done();
    CHECK(items_n == 1);
    CHECK_STR(items_sid[0], sids[1]);
    CHECK(store_summary(st, &bob_dev, 0, on_summary, NULL) == 0);
    run_until_done();
    CHECK(sum_count == 1);
}

static size_t online_n;
static char online0[64];
static void on_online(void *ud, int err, const char *const *res, size_t n)
{
    (void)ud;
    online_n = err ? 999 : n;
    snprintf(online0, sizeof online0, "%s", n ? res[0] : "");
    done = 1;
}

/* store_online, which relayed receipts ask first: who a put would find online. */
static size_t online_of(const char *user)
{
    CHECK(store_online(st, user, on_online, NULL) == 0);
    run_until_done();
    return online_n;
}

static void test_live_and_due(void)
{
    const char *carol = "carol@t1", *alice = "alice@t1";
    const store_device_t carol_tab = {carol, "tab", 1};
    int err = -1;
    CHECK(store_epoch_next(st, on_epoch, NULL) == 0);
    run_until_done();
    CHECK(epoch[0] != '\0');
    CHECK(store_presence(st, STORE_PRESENCE_SET, carol, "tab", 0, on_done, &err) == 0);
    run_until_done();
    CHECK(err == 0);

    CHECK(put(carol, alice, "l1", true, 100, 10000) == 0);
    CHECK(put_res.status == STORE_PUT_LIVE && put_res.nresources == 1);
    CHECK_STR(put_res0, "tab");
    CHECK(online_of(carol) == 1);
    CHECK_STR(online0, "tab");
    CHECK(online_of("nobody@t1") == 0);
    /* After another attach (any instance's) the resource is unverified: not online. */
    char before[32];
    snprintf(before, sizeof before, "%s", epoch);
    CHECK(store_epoch_next(st, on_epoch, NULL) == 0);
    run_until_done();
    CHECK(put(carol, alice, "l2", true, 100, 10000) == 0);
    CHECK(put_res.status == STORE_PUT_OFFLINE);
    CHECK(online_of(carol) == 0);
    /* Verified again (it answered a ping): online. */
    CHECK(store_presence(st, STORE_PRESENCE_VERIFY, carol, "tab", 0, on_done, &err) == 0);
    run_until_done();
    CHECK(strcmp(before, epoch) != 0);
    /* Without a receipt request a live message is pushed, not kept. */
    CHECK(put(carol, alice, "l3", false, 100, 10000) == 0);
    CHECK(put_res.status == STORE_PUT_LIVE && put_sid[0] == '\0');
    CHECK(online_of(carol) == 1);
    /* Before any link epoch is known nobody is online, as for the scripts. */
    char cur[32];
    snprintf(cur, sizeof cur, "%s", epoch);
    store_set_epoch(st, "0");
    CHECK(online_of(carol) == 0);
    store_set_epoch(st, cur);

    /* Due after retry (100 ms): resent. */
    CHECK(claim_due(10150) == 0);
    CHECK(due_users == 1 && due_items == 1);
    /* Not yet due again. */
    CHECK(claim_due(10200) == 0);
    CHECK(due_users == 0);
    /* Past the delivery window (1000 ms): moved to the offline queue, not resent. */
    CHECK(claim_due(11100) == 0);
    CHECK(due_users == 0);
    CHECK(store_summary(st, &carol_tab, 0, on_summary, NULL) == 0);
    run_until_done();
    CHECK(sum_count == 2);

    /* A bounce with nobody else online moves the message offline at once. */
    CHECK(put(carol, alice, "l4", true, 100, 20000) == 0);
    CHECK(put_res.status == STORE_PUT_LIVE);
    CHECK(store_bounce(st, carol, "tab", on_done, &err) == 0);
    run_until_done();
    CHECK(store_summary(st, &carol_tab, 0, on_summary, NULL) == 0);
    run_until_done();
    CHECK(sum_count == 3);
    /* And the bounced resource is no longer online. */
    CHECK(put(carol, alice, "l5", true, 100, 20000) == 0);
    CHECK(put_res.status == STORE_PUT_OFFLINE);

    /* Stale resources after a new epoch. */
    CHECK(store_presence(st, STORE_PRESENCE_SET, carol, "pc", 0, on_done, &err) == 0);
    run_until_done();
    char old[32];
    snprintf(old, sizeof old, "%s", epoch);
    CHECK(store_epoch_next(st, on_epoch, NULL) == 0);
    run_until_done();
    CHECK(strcmp(old, epoch) != 0);
    stale_n = 0;
    CHECK(store_presence_stale(st, on_stale, NULL) == 0);
    run_until_done();
    CHECK(stale_n == 1);
    CHECK(store_presence(st, STORE_PRESENCE_VERIFY, carol, "pc", 0, on_done, &err) == 0);
    run_until_done();
    stale_n = 0;
    CHECK(store_presence_stale(st, on_stale, NULL) == 0);
    run_until_done();
    CHECK(stale_n == 0);
}

static int ack_ids(const store_device_t *who, const char *sid)
{
    const char *ids[] = {sid};
    CHECK(store_ack_sids(st, who, ids, 1, on_ack, NULL) == 0);
    run_until_done();
    return (int)items_n;
}

static uint64_t summary_count(const store_device_t *who)
{
    CHECK(store_summary(st, who, 10, on_summary, NULL) == 0);
    run_until_done();
    return sum_count;
}

/* Per-device delivery: a message is pushed to each online resource until that resource acks,
 * the receipt comes once, a known device that was offline still fetches it, and it is purged
 * once every known device acked it. */
static void test_per_device(void)
{
    const char *dan = "dan@t1", *alice = "alice@t1";
    const store_device_t a = {dan, "a", 1}, b = {dan, "b", 1}, c = {dan, "c", 1},
                         fresh = {dan, "new", 1};
    int err = -1;
    CHECK(store_epoch_next(st, on_epoch, NULL) == 0);
    run_until_done();
    const char *devs[] = {"a", "b", "c"};
    for (int i = 0; i < 3; i++) {
        CHECK(store_presence(st, STORE_PRESENCE_SET, dan, devs[i], 5, on_done, &err) == 0);
        run_until_done();
    }
    /* c becomes a known device by acking something; acked by all three, m0 is purged. */
    CHECK(put(dan, alice, "pd0", true, 100, 40000) == 0);
    CHECK(put_res.status == STORE_PUT_LIVE && put_res.nresources == 3);
    char sid0[64];
    snprintf(sid0, sizeof sid0, "%s", put_sid);
    CHECK(ack_ids(&c, sid0) == 1);
    CHECK(ack_ids(&a, sid0) == 0 && ack_ids(&b, sid0) == 0);
    CHECK(summary_count(&fresh) == 0);
    CHECK(store_presence(st, STORE_PRESENCE_DEL, dan, "c", 5, on_done, &err) == 0);
    run_until_done();
    CHECK(err == 0);

    CHECK(put(dan, alice, "pd1", true, 100, 50000) == 0);
    CHECK(put_res.status == STORE_PUT_LIVE && put_res.nresources == 2);
    char sid[64];
    snprintf(sid, sizeof sid, "%s", put_sid);
    /* Everyone who has not acked it sees it, a device never seen before included. */
    CHECK(summary_count(&c) == 1 && items_n == 1);
    CHECK(summary_count(&fresh) == 1);
    /* Both online resources are retransmitted to, one delivery each. */
    CHECK(claim_due(50150) == 0);
    CHECK(due_users == 2 && due_items == 2);
    /* a acks: the receipt is relayed now, b is still owed its push. */
    CHECK(ack_ids(&a, sid) == 1);
    CHECK(summary_count(&a) == 0 && summary_count(&b) == 1);
    CHECK(claim_due(50300) == 0);
    CHECK(due_users == 1 && due_items == 1);
    /* b acks by <received/>: no second receipt, no more pushes. */
    CHECK(store_ack_origin(st, &b, alice, "pd1", on_ack, NULL) == 0);
    run_until_done();
    CHECK(items_n == 0);
    CHECK(claim_due(50500) == 0);
    CHECK(due_users == 0);
    /* c, offline all along, still fetches it; after c's ack it is gone for everyone. */
    CHECK(store_fetch(st, &c, 0, 10, 1 << 20, 0, on_fetch, NULL) == 0);
    run_until_done();
    CHECK(items_n == 1 && fetch_complete);
    CHECK_STR(items_sid[0], sid);
    CHECK(ack_ids(&c, sid) == 0);
    CHECK(summary_count(&fresh) == 0);
    /* Purged, so the quota (1 message) is free again. */
    CHECK(put(dan, alice, "pd2", true, 1, 60000) == 0);
    CHECK(put_res.status == STORE_PUT_LIVE);
    /* b leaves: its push ends, but as a known device it still sees pd2. */
    CHECK(store_presence(st, STORE_PRESENCE_DEL, dan, "b", 60001, on_done, &err) == 0);
    run_until_done();
    CHECK(summary_count(&b) == 1);

    /* A page skips what the device acked, and its cursor moves past the skipped ones. */
    CHECK(store_presence(st, STORE_PRESENCE_DEL, dan, "a", 60001, on_done, &err) == 0);
    run_until_done();
    char q[3][64];
    for (int i = 0; i < 3; i++) {
        char id[8];
        snprintf(id, sizeof id, "sk%d", i);
        CHECK(put(dan, alice, id, true, 100, 70000 + i) == 0);
        CHECK(put_res.status == STORE_PUT_OFFLINE);
        snprintf(q[i], sizeof q[i], "%s", put_sid);
    }
    CHECK(ack_ids(&a, q[0]) == 1 && ack_ids(&a, q[1]) == 1);
    CHECK(store_fetch(st, &a, 0, 1, 1 << 20, 0, on_fetch, NULL) == 0);
    run_until_done();
    CHECK(items_n == 1 && !fetch_complete); /* pd2 (seq before sk0) first */
    uint64_t after = strtoull(fetch_cursor, NULL, 10);
    CHECK(store_fetch(st, &a, after, 1, 1 << 20, 0, on_fetch, NULL) == 0);
    run_until_done();
    CHECK(items_n == 1 && fetch_complete);
    CHECK_STR(items_sid[0], q[2]);
    CHECK_STR(fetch_cursor, q[2]);
    CHECK(summary_count(&a) == 2 && summary_count(&b) == 4);
}

static int ack_many(const store_device_t *who, const char *const *ids, size_t n)
{
    CHECK(store_ack_sids(st, who, ids, n, on_ack, NULL) == 0);
    run_until_done();
    return (int)items_n;
}

static uint64_t summary_bytes(const store_device_t *who)
{
    summary_count(who);
    return sum_bytes;
}

/* One ack naming many ids (a page, repeats, unknown ids): each message gets its receipt once, is
 * purged when the last known device acks it, and every device's counts stay right, including
 * those of devices whose earlier acks of a purged message are taken back. */
static void test_ack_many(void)
{
    const char *erin = "erin@t1", *alice = "alice@t1";
    const store_device_t x = {erin, "x", 1}, y = {erin, "y", 1};
    CHECK(put(erin, alice, "e0", true, 100, 1000) == 0);
    CHECK(ack_ids(&x, put_sid) == 1);
    CHECK(ack_ids(&y, "1-nothere") == 0); /* y is now a known device too */
    char e[5][64];
    for (int i = 1; i <= 4; i++) {
        char id[8];
        snprintf(id, sizeof id, "e%d", i);
        CHECK(put(erin, alice, id, true, 100, 1000 + i) == 0);
        CHECK(put_res.status == STORE_PUT_OFFLINE);
        snprintf(e[i], sizeof e[i], "%s", put_sid);
    }
    uint64_t all = summary_bytes(&x), one = all / 4;
    CHECK(sum_count == 4 && all == 4 * one && summary_count(&y) == 4);

    const char *xa[] = {e[1], e[2], e[2], "9-nothere"};
    CHECK(ack_many(&x, xa, 4) == 2); /* two receipts, nothing purged: y has not acked */
    CHECK(summary_bytes(&x) == 2 * one && sum_count == 2 && summary_count(&y) == 4);

    const char *ya[] = {e[2], e[3], e[1]};
    CHECK(ack_many(&y, ya, 3) == 1); /* e3's receipt; e1 and e2 are purged */
    CHECK(summary_bytes(&x) == 2 * one && sum_count == 2);
    CHECK(summary_bytes(&y) == one && sum_count == 1);

    const char *xb[] = {e[3], e[4]};
    CHECK(ack_many(&x, xb, 2) == 1); /* e4's receipt; e3 is purged */
    CHECK(summary_count(&x) == 0 && summary_bytes(&y) == one && sum_count == 1);
    CHECK(store_ack_origin(st, &y, alice, "e4", on_ack, NULL) == 0);
    run_until_done();
    CHECK(items_n == 0);
    CHECK(summary_bytes(&x) == 0 && sum_count == 0 && summary_bytes(&y) == 0 && sum_count == 0);
    /* Purged messages free the quota: four more fit in a quota of four. */
    for (int i = 5; i <= 8; i++) {
        char id[8];
        snprintf(id, sizeof id, "e%d", i);
        CHECK(put(erin, alice, id, true, 4, 2000 + i) == 0);
        CHECK(put_res.status == STORE_PUT_OFFLINE);
    }
}

/* ---- the archive ---- */
static store_old_t old_users[8]; /* every user the tests before stored for */
static store_old_msg_t old_msgs[16];
static char old_store[16][4][128], old_user[8][64];
static size_t old_n;
static size_t old_k;
static void on_old(void *ud, int err, const store_old_t *user, bool last)
{
    (void)ud;
    if (err)
        old_n = (size_t)-1;
    if (last) {
        done = 1;
        return;
    }
    if (err || old_n >= 8)
        return;
    store_old_t *u = &old_users[old_n];
    *u = *user;
    snprintf(old_user[old_n], sizeof old_user[old_n], "%s", user->user);
    u->user = old_user[old_n];
    u->msgs = &old_msgs[old_k];
    for (size_t j = 0; j < user->n && old_k < 16; j++, old_k++) {
        const store_old_msg_t *m = &user->msgs[j];
        snprintf(old_store[old_k][0], 128, "%s", m->sid);
        memcpy(old_store[old_k][1], m->blob, m->blob_len < 127 ? m->blob_len : 127);
        snprintf(old_store[old_k][2], 128, "%s", m->acked);
        snprintf(old_store[old_k][3], 128, "%s", m->origin);
        old_msgs[old_k] = (store_old_msg_t){old_store[old_k][0], old_store[old_k][1], m->blob_len,
                                            old_store[old_k][2], old_store[old_k][3]};
    }
    old_n++;
}

static archive_put_status_t put_evicted_status;
static char put_evicted_sid[64];
static uint64_t put_evicted_seq;
static void on_put_evicted(void *ud, int err, archive_put_status_t status, const char *sid,
                           uint64_t seq)
{
    (void)ud;
    put_evicted_status = err ? (archive_put_status_t)-1 : status;
    put_evicted_seq = seq;
    snprintf(put_evicted_sid, sizeof put_evicted_sid, "%s", sid ? sid : "");
    done = 1;
}

static void on_count(void *ud, int err, uint64_t n)
{
    *(uint64_t *)ud = err ? (uint64_t)-1 : n;
    done = 1;
}

static void on_archived(void *ud, int err)
{
    *(int *)ud = err;
    done = 1;
}

/* Old messages move to SQLite (take -> put -> drop) and stay readable and acknowledgeable per
 * device there; a repeated move duplicates nothing; the schema survives a reopen. */
/* Runs one command on the single Redis, beside the store (NULL in a cluster: the test's keys
 * would need routing). The reply is freed by the caller. */
static redisReply *raw(const char *fmt, ...)
{
    const char *port = getenv("REDIS_PORT");
    if (!port || getenv("CLUSTER_PORTS"))
        return NULL;
    redisContext *c = redisConnect("127.0.0.1", atoi(port));
    if (!c || c->err) {
        redisFree(c);
        return NULL;
    }
    const char *pw = getenv("REDIS_PASSWORD");
    if (pw)
        freeReplyObject(redisCommand(c, "AUTH %s", pw));
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    redisFree(c);
    return r;
}

/* Redis' clock in dedupe windows (86400 s by default), as the scripts compute it. */
static long long window_now(void)
{
    redisReply *r = raw("TIME");
    long long w = -1;
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2)
        w = (atoll(r->element[0]->str) * 1000 + atoll(r->element[1]->str) / 1000) / 86400000LL;
    freeReplyObject(r);
    return w;
}

static long long raw_int(const char *fmt, const char *a, const char *b)
{
    redisReply *r = raw(fmt, a, b);
    long long v = r && r->type == REDIS_REPLY_INTEGER ? r->integer : -999;
    if (r && r->type == REDIS_REPLY_STRING)
        v = atoll(r->str);
    freeReplyObject(r);
    return v;
}

/* Dedupe outlives the message: its origin stays in the hash of the window it arrived in after
 * the purge, and a repeat is answered with the first stanza id. P:k entries of earlier versions
 * go with the purge. */
static void test_dedupe_marks(void)
{
    const char *gil = "gil@t1", *alice = "alice@t1";
    const store_device_t g = {gil, "g", 1};
    CHECK(put(gil, alice, "d1", true, 100, 1000) == 0);
    CHECK(put_res.status == STORE_PUT_OFFLINE);
    char first[64];
    snprintf(first, sizeof first, "%s", put_sid);
    CHECK(ack_ids(&g, first) == 1);
    CHECK(summary_count(&g) == 0); /* purged: f is the only known device */
    CHECK(put(gil, alice, "d1", true, 100, 2000) == 0);
    CHECK(put_res.status == STORE_PUT_DUP);
    CHECK_STR(put_sid, first);
    /* Another sender's same id is another message. */
    CHECK(put(gil, "bob@t1", "d1", true, 100, 2001) == 0);
    CHECK(put_res.status == STORE_PUT_OFFLINE);
    CHECK(ack_ids(&g, put_sid) == 1);

    long long w = window_now();
    if (w < 0)
        return; /* a cluster: the rest needs the raw connection */
    char key[128], og[128];
    snprintf(key, sizeof key, "rd:{%s}:o:%lld", gil, w);
    snprintf(og, sizeof og, "rd:{%s}:og", gil);
    CHECK(raw_int("HLEN %s", key, NULL) == 2);
    CHECK(raw_int("PTTL %s", key, NULL) == -1); /* this window's: no TTL while it is current */
    CHECK(raw_int("GET %s", og, NULL) == w);

    CHECK(put(gil, alice, "d2", true, 100, 3001) == 0);
    CHECK(put_res.status == STORE_PUT_OFFLINE);
    char second[64];
    snprintf(second, sizeof second, "%s", put_sid);
    freeReplyObject(raw("HSET rd:{%s}:k %s %s", gil, second, "alice@t1 d2"));
    CHECK(ack_ids(&g, second) == 1);
    redisReply *r = raw("EXISTS rd:{%s}:k rd:{%s}:o", gil, gil);
    CHECK(r && r->type == REDIS_REPLY_INTEGER && r->integer == 0);
    freeReplyObject(r);

    /* Hashes of windows whose messages are all gone get a TTL of two windows after their own
     * (past: deleted), and P:og moves on to the window before now. */
    char old[128];
    snprintf(old, sizeof old, "rd:{%s}:o:%lld", gil, w - 3);
    freeReplyObject(raw("HSET %s %s %s", old, "carol@t1 x", "1-old"));
    r = raw("SET %s %lld", og, w - 3);
    freeReplyObject(r);
    CHECK(put(gil, "carol@t1", "x", true, 100, 4000) == 0);
    CHECK(put_res.status == STORE_PUT_DUP); /* P:og says w - 3 may hold a queued message */
    CHECK_STR(put_sid, "1-old");
    CHECK(put(gil, alice, "d3", true, 100, 4001) == 0);
    CHECK(ack_ids(&g, put_sid) == 1);
    CHECK(raw_int("EXISTS %s", old, NULL) == 0);
    CHECK(raw_int("GET %s", og, NULL) == w - 1);
}

/* A user's dedupe state as versions before 2026-12 left it (P:o: queued origins; P:dd:<w>: the
 * origins purged in window w) becomes this window's and the last window's origin hashes at its
 * first put: every origin still dedupes. */
static void test_dedupe_upgrade(void)
{
    const char *hal = "hal@t1", *alice = "alice@t1";
    const store_device_t h = {hal, "h", 1};
    CHECK(put(hal, alice, "u0", true, 100, 1000) == 0); /* creates the user's state */
    CHECK(put_res.status == STORE_PUT_OFFLINE);
    CHECK(ack_ids(&h, put_sid) == 1);
    long long w = window_now();
    if (w < 0)
        return;
    char k[128], v[64];
    /* back to the old layout: no generations */
    snprintf(k, sizeof k, "rd:{%s}:og", hal);
    freeReplyObject(raw("DEL %s", k));
    snprintf(k, sizeof k, "rd:{%s}:o:%lld", hal, w);
    freeReplyObject(raw("DEL %s", k));
    snprintf(k, sizeof k, "rd:{%s}:o", hal);
    snprintf(v, sizeof v, "%s q1", alice);
    freeReplyObject(raw("HSET %s %s 5-queued", k, v));
    snprintf(k, sizeof k, "rd:{%s}:dd:%lld", hal, w);
    snprintf(v, sizeof v, "%s p1", alice);
    freeReplyObject(raw("HSET %s %s 6-purged", k, v));
    freeReplyObject(raw("PEXPIRE %s 100000000", k));
    snprintf(k, sizeof k, "rd:{%s}:dd:%lld", hal, w - 1);
    snprintf(v, sizeof v, "%s p0", alice);
    freeReplyObject(raw("HSET %s %s 4-purged", k, v));
    freeReplyObject(raw("PEXPIRE %s 10000000", k));

    const char *const want[][2] = {{"q1", "5-queued"}, {"p1", "6-purged"}, {"p0", "4-purged"}};
    for (size_t i = 0; i < 3; i++) {
        CHECK(put(hal, alice, want[i][0], true, 100, 2000) == 0);
        CHECK(put_res.status == STORE_PUT_DUP);
        CHECK_STR(put_sid, want[i][1]);
    }
    snprintf(k, sizeof k, "rd:{%s}:o:%lld", hal, w);
    CHECK(raw_int("HLEN %s", k, NULL) == 2);
    CHECK(raw_int("PTTL %s", k, NULL) == -1); /* holds queued origins: no TTL */
    snprintf(k, sizeof k, "rd:{%s}:o:%lld", hal, w - 1);
    CHECK(raw_int("HLEN %s", k, NULL) == 1);
    CHECK(raw_int("PTTL %s", k, NULL) > 0);
    snprintf(k, sizeof k, "rd:{%s}:o", hal);
    snprintf(v, sizeof v, "rd:{%s}:dd:%lld", hal, w);
    CHECK(raw_int("EXISTS %s %s", k, v) == 0);

    /* As after an eviction (every origin hash has a TTL, no P:og): the next put's origin goes
     * into this window's hash, which must then keep it while the message is queued. */
    snprintf(k, sizeof k, "rd:{%s}:o:%lld", hal, w);
    freeReplyObject(raw("PEXPIRE %s 100000", k));
    snprintf(v, sizeof v, "rd:{%s}:og", hal);
    freeReplyObject(raw("DEL %s", v));
    CHECK(put(hal, alice, "u9", true, 100, 3000) == 0);
    CHECK(put_res.status == STORE_PUT_OFFLINE);
    CHECK(raw_int("PTTL %s", k, NULL) == -1);
    CHECK(raw_int("HLEN %s", k, NULL) == 3);
}

/* ---- puts made in one loop turn ---- */
typedef struct turn_put {
    int calls, err;
    store_put_status_t status;
    char sid[64];
    size_t nres;
} turn_put_t;
static int turn_pending;

static void on_turn_put(void *ud, int err, const store_put_result_t *r)
{
    turn_put_t *t = ud;
    t->calls++;
    t->err = err;
    if (!err) {
        t->status = r->status;
        snprintf(t->sid, sizeof t->sid, "%s", r->sid);
        t->nres = r->nresources;
    }
    turn_pending--;
}

/* Makes the put without running the loop: its reply comes with the others of the turn. */
static void put_in_turn(const char *user, const char *id, bool track, uint64_t max_n, turn_put_t *t)
{
    proto_buf_t b;
    proto_buf_init(&b);
    store_blob_encode(&b, 20000, track ? STORE_BLOB_RECEIPT : 0, "alice@t1/phone", "chat", id,
                      "<body>x</body>", 14);
    store_put_t req = {.user = user,
                       .sender = "alice@t1",
                       .orig_id = id,
                       .blob = b.data,
                       .blob_len = b.len,
                       .track = track,
                       .now_ms = 20000,
                       .retry_ms = 100,
                       .window_ms = 1000,
                       .max_messages = max_n,
                       .max_bytes = 1 << 20};
    memset(t, 0, sizeof *t);
    t->err = 1;
    if (store_put_message(st, &req, on_turn_put, t) == 0)
        turn_pending++;
    proto_buf_free(&b); /* the store keeps its own copy */
}

static void run_until_turn_done(void)
{
    while (turn_pending > 0 || !done)
        uv_run(&loop, UV_RUN_ONCE);
}

/* On a single Redis the puts of a loop turn go to Redis in one call (put_many): each still gets
 * its own answer, in order, as if sent alone, and a request made after them sees them. */
static void test_puts_in_one_turn(void)
{
    const char *bat = "bat@t1", *live = "batlive@t1";
    const store_device_t b = {bat, "b", 1};
    int err = -1;
    CHECK(put(bat, "alice@t1", "b0", true, 100, 20000) == 0);
    CHECK(put(live, "alice@t1", "l0", false, 100, 20000) == 0);
    CHECK(store_presence(st, STORE_PRESENCE_SET, live, "ph", 20000, on_done, &err) == 0);
    run_until_done();
    CHECK(err == 0);

    turn_put_t t[6];
    put_in_turn(bat, "b1", true, 100, &t[0]);
    put_in_turn(bat, "b1", true, 100, &t[1]);         /* the same message again */
    put_in_turn("batnew@t1", "n1", true, 100, &t[2]); /* no state yet */
    put_in_turn(live, "l1", false, 100, &t[3]);       /* online, no receipt requested */
    put_in_turn(bat, "b2", true, 2, &t[4]);           /* b0 and b1 fill a quota of 2 */
    put_in_turn(bat, "b3", false, 100, &t[5]);
    CHECK(turn_pending == 6);
    done = 0;
    CHECK(store_summary(st, &b, 0, on_summary, NULL) == 0);
    run_until_turn_done();
    for (int i = 0; i < 6; i++)
        CHECK(t[i].calls == 1 && t[i].err == 0);
    CHECK(t[0].status == STORE_PUT_OFFLINE);
    CHECK(t[1].status == STORE_PUT_DUP);
    CHECK_STR(t[1].sid, t[0].sid);
    CHECK(t[2].status == STORE_PUT_COLD);
    CHECK(t[3].status == STORE_PUT_LIVE && t[3].nres == 1 && t[3].sid[0] == '\0');
    CHECK(t[4].status == STORE_PUT_FULL);
    CHECK(t[5].status == STORE_PUT_OFFLINE);
    CHECK(sum_count == 3); /* b0, b1, b3: the summary was asked for after the puts */

    /* More puts in a turn than one call takes: every one answered, the queue in their order. */
    turn_put_t many[40];
    char id[16];
    for (int i = 0; i < 40; i++) {
        snprintf(id, sizeof id, "m%d", i);
        put_in_turn(bat, id, true, 100, &many[i]);
    }
    done = 1;
    run_until_turn_done();
    bool ordered = true;
    for (int i = 0; i < 40; i++) {
        CHECK(many[i].calls == 1 && many[i].err == 0 && many[i].status == STORE_PUT_OFFLINE);
        if (i && strtoull(many[i].sid, NULL, 10) != strtoull(many[i - 1].sid, NULL, 10) + 1)
            ordered = false;
    }
    CHECK(ordered);
    CHECK(summary_count(&b) == 43);
}

/* Score of user in an index of its shard (which: "arch", "act"), -1 when it is not there. */
static long long index_score(const char *which, const char *user)
{
    char key[64];
    store_index_key(key, sizeof key, store_user_shard(user), which);
    redisReply *r = raw("ZSCORE %s %s", key, user);
    long long v = r && r->type == REDIS_REPLY_STRING ? atoll(r->str) : -1;
    freeReplyObject(r);
    return v;
}

/* On a single Redis the put keeps the archive and eviction indexes itself, writing them only
 * when the user's queue was empty. The archive entry is then set, not only added: a sweep's
 * claim (its lease as the score) must not survive a put that came after the sweep emptied the
 * queue, or finishing the sweep would take the user off the index. */
static void test_index_on_put(void)
{
    const char *ivy = "ivy@t1";
    const store_device_t i = {ivy, "i", 1};
    if (window_now() < 0)
        return; /* a cluster: index_put writes them, NX, before each put */
    CHECK(put(ivy, "alice@t1", "x1", true, 100, 5000) == 0);
    CHECK(put_res.status == STORE_PUT_OFFLINE);
    char first[64];
    snprintf(first, sizeof first, "%s", put_sid);
    CHECK(index_score("arch", ivy) == 5000);
    CHECK(put(ivy, "alice@t1", "x2", true, 100, 6000) == 0);
    CHECK(index_score("arch", ivy) == 5000); /* x1 is still the oldest */
    CHECK(ack_ids(&i, first) == 1 && ack_ids(&i, put_sid) == 1);

    char arch[64], act[64];
    store_index_key(arch, sizeof arch, store_user_shard(ivy), "arch");
    store_index_key(act, sizeof act, store_user_shard(ivy), "act");
    freeReplyObject(raw("ZADD %s 99999 %s", arch, ivy)); /* a sweep's lease */
    freeReplyObject(raw("ZREM %s %s", act, ivy));        /* as if lost */
    CHECK(put(ivy, "alice@t1", "x3", true, 100, 7000) == 0);
    CHECK(index_score("arch", ivy) == 7000);
    CHECK(index_score("act", ivy) == 7000);
    CHECK(put(ivy, "alice@t1", "x4", true, 100, 8000) == 0);
    CHECK(index_score("arch", ivy) == 7000 && index_score("act", ivy) == 7000);

    /* Lost with messages queued: back, if absent, at the user's 64th message (seq 64). */
    freeReplyObject(raw("ZREM %s %s", arch, ivy));
    freeReplyObject(raw("ZREM %s %s", act, ivy));
    char id[16];
    for (int k = 5; k < 64; k++) {
        snprintf(id, sizeof id, "x%d", k);
        CHECK(put(ivy, "alice@t1", id, true, 100, 8000 + k) == 0);
    }
    CHECK(index_score("arch", ivy) == -1 && index_score("act", ivy) == -1);
    CHECK(put(ivy, "alice@t1", "x64", true, 100, 9000) == 0);
    CHECK(strtoull(put_sid, NULL, 10) == 64);
    CHECK(index_score("arch", ivy) == 9000 && index_score("act", ivy) == 9000);
}

/* The archive's files and their directory, so that test runs leave nothing in /tmp. */
static void remove_archive_dir(const char *dir, const char *path)
{
    static const char *const ext[] = {"", "-wal", "-shm", "-journal"};
    char f[160];
    for (size_t i = 0; i < sizeof ext / sizeof ext[0]; i++) {
        snprintf(f, sizeof f, "%s%s", path, ext[i]);
        unlink(f);
    }
    CHECK(rmdir(dir) == 0);
}

static void test_archive(void)
{
    const char *eve = "eve@t1", *alice = "alice@t1";
    const store_device_t e1 = {eve, "e1", 1}, e2 = {eve, "e2", 1};
    char dir[] = "/tmp/receiptd-test-archive-XXXXXX", path[128], err[256];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(path, sizeof path, "%s/a.sqlite3", dir);
    archive_t *a;
    CHECK(archive_open(&loop, path, &a, err, sizeof err) == 0);
    char sids[3][64];
    for (int i = 0; i < 3; i++) {
        char id[8];
        snprintf(id, sizeof id, "ar%d", i);
        CHECK(put(eve, alice, id, true, 100, 1000 + i) == 0);
        snprintf(sids[i], sizeof sids[i], "%s", put_sid);
    }
    /* e1 and e2 are known devices (an ack of anything makes one); e2 acked the first one. */
    CHECK(ack_ids(&e1, "0-none") == 0);
    CHECK(ack_ids(&e2, sids[0]) == 1);
    /* Cutoff 1001.5: only the first two are old enough. */
    old_n = old_k = 0;
    CHECK(store_archive_take(st, 1002, 5000, 65000, 10, 100, on_old, NULL) == 0);
    run_until_done();
    size_t mine = (size_t)-1;
    for (size_t i = 0; i < old_n; i++)
        if (strcmp(old_users[i].user, eve) == 0)
            mine = i;
    CHECK(mine != (size_t)-1);
    if (mine == (size_t)-1)
        return;
    CHECK(old_users[mine].n == 2);
    CHECK_STR(old_users[mine].msgs[1].sid, sids[1]);
    CHECK_STR(old_users[mine].msgs[0].acked, "e2");
    CHECK_STR(old_users[mine].msgs[1].origin, "alice@t1 ar1"); /* for receipts from the archive */
    archive_msg_t msgs[2];
    const char *drop[2];
    for (int i = 0; i < 2; i++) {
        const store_old_msg_t *o = &old_users[mine].msgs[i];
        msgs[i] = (archive_msg_t){o->sid, 1000 + i, o->blob, o->blob_len, o->acked, NULL};
        drop[i] = o->sid;
    }
    int rc = -1;
    /* Twice, as after a crash between insert and drop: still one copy. */
    for (int k = 0; k < 2; k++) {
        CHECK(archive_put(a, eve, msgs, 2, on_archived, &rc) == 0);
        run_until_done();
        CHECK(rc == 0);
    }
    CHECK(store_archive_drop(st, eve, 5000, 65000, drop, 2, on_archived, &rc) == 0);
    run_until_done();
    CHECK(rc == 0);
    /* Redis now holds only the third, and says the user has an archive. */
    CHECK(summary_count(&e1) == 1 && last_archived);
    CHECK(store_summary(st, &e1, 10, on_summary, NULL) == 0);
    run_until_done();
    CHECK(items_n == 1);
    CHECK_STR(items_sid[0], sids[2]);
    /* The archive: e1 sees both, e2 only the one it did not ack. */
    CHECK(archive_summary(a, &e1, 10, on_summary, NULL) == 0);
    run_until_done();
    CHECK(sum_count == 2 && items_n == 2);
    CHECK_STR(items_sid[0], sids[0]);
    CHECK(archive_summary(a, &e2, 10, on_summary, NULL) == 0);
    run_until_done();
    CHECK(sum_count == 1);
    CHECK(archive_fetch(a, &e1, 0, 1, 1 << 20, 0, on_fetch, NULL) == 0);
    run_until_done();
    CHECK(items_n == 1 && !fetch_complete);
    CHECK_STR(fetch_cursor, sids[0]);
    CHECK(archive_fetch(a, &e1, strtoull(sids[0], NULL, 10), 10, 1 << 20, 0, on_fetch, NULL) == 0);
    run_until_done();
    CHECK(items_n == 1 && fetch_complete);
    CHECK_STR(items_sid[0], sids[1]);
    /* e1 acks both: the receipt comes only for the one nobody acked yet; with e1 and e2 the
     * known devices, the first is then acked by all and deleted. */
    const char *both[] = {sids[0], sids[1]};
    const bool ok[] = {true, true};
    archive_ack_t req = {.who = &e1, .sids = both, .receipt_ok = ok, .n = 2, .known = "e1\ne2"};
    CHECK(archive_ack(a, &req, on_items, NULL) == 0);
    run_until_done();
    CHECK(items_n == 1);
    CHECK_STR(items_sid[0], sids[1]);
    CHECK(archive_summary(a, &e2, 10, on_summary, NULL) == 0);
    run_until_done();
    CHECK(sum_count == 1 && items_n == 1);
    CHECK_STR(items_sid[0], sids[1]);
    archive_close(a);
    uv_run(&loop, UV_RUN_NOWAIT);
    /* Reopen: the schema is current, the data is there, and retention deletes by age. */
    CHECK(archive_open(&loop, path, &a, err, sizeof err) == 0);
    uint64_t expired = 0;
    CHECK(archive_expire(a, 1001, on_count, &expired) == 0);
    run_until_done();
    CHECK(expired == 0);
    CHECK(archive_expire(a, 1002, on_count, &expired) == 0);
    run_until_done();
    CHECK(expired == 1);
    archive_close(a);
    uv_run(&loop, UV_RUN_NOWAIT);
    remove_archive_dir(dir, path);
}

static bool flag_value;
static void on_flag(void *ud, int err, bool flag)
{
    (void)ud;
    flag_value = !err && flag;
    done = 1;
}

static store_user_state_t restored;
static char restored_user[64];
static void on_state_read(void *ud, int err, const store_user_state_t *state)
{
    (void)ud;
    CHECK(err == 0);
    if (!err) {
        restored = *state;
        snprintf(restored_user, sizeof restored_user, "%s", state->user);
        restored.user = restored_user;
        restored.devices = NULL; /* pointers die with the callback */
    }
    done = 1;
}

static size_t evict_n, evict_msgs;
static bool evict_complete;
static uint64_t evict_seq;
static void on_evict(void *ud, int err, const store_evictee_t *u, bool last)
{
    (void)ud;
    if (!err && u && strcmp(u->state.user, "fay@t1") == 0) {
        evict_n++;
        evict_msgs = u->n;
        evict_complete = u->complete;
        evict_seq = u->state.seq;
    }
    if (last)
        done = 1;
}

/* An inactive user's whole state moves to the archive; its first activity brings the state
 * back, and new messages continue its numbering. */
static void test_evict(void)
{
    const char *fay = "fay@t1", *alice = "alice@t1";
    char dir[] = "/tmp/receiptd-test-evict-XXXXXX", path[128], err[256];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(path, sizeof path, "%s/a.sqlite3", dir);
    archive_t *a;
    CHECK(archive_open(&loop, path, &a, err, sizeof err) == 0);
    char s1[64], s2[64];
    CHECK(put(fay, alice, "ev1", true, 100, 2000) == 0 && put_res.status == STORE_PUT_OFFLINE);
    snprintf(s1, sizeof s1, "%s", put_sid);
    CHECK(put(fay, alice, "ev2", true, 100, 2001) == 0);
    snprintf(s2, sizeof s2, "%s", put_sid);
    const char *fay_sids[] = {s1, s2};
    /* Active since 2000: not evicted with a cutoff before that. */
    evict_n = 0;
    CHECK(store_evict_take(st, 1999, 9000, 69000, 100, 100, on_evict, NULL) == 0);
    run_until_done();
    CHECK(evict_n == 0);
    evict_n = 0;
    CHECK(store_evict_take(st, 5000, 9000, 69000, 100, 100, on_evict, NULL) == 0);
    run_until_done();
    CHECK(evict_n == 1 && evict_msgs == 2 && evict_complete && evict_seq == 2);
    store_user_state_t state = {fay, evict_seq, NULL, 0, true};
    int rc = -1;
    archive_msg_t msgs[2] = {{s1, 2000, "1 2000 0 0 0 0\n", 15, "", NULL},
                             {s2, 2001, "1 2001 0 0 0 0\n", 15, "", NULL}};
    CHECK(archive_evict(a, &state, msgs, 2, true, on_archived, &rc) == 0);
    run_until_done();
    CHECK(rc == 0);
    CHECK(store_evict_drop(st, fay, true, 9000, 69000, fay_sids, 2, on_flag, NULL) == 0);
    run_until_done();
    CHECK(flag_value); /* gone from Redis: a put now says cold */
    bool single = window_now() >= 0;
    /* On a single Redis off every index in the same step, with no later 'forget' to race a put
     * that brings the user back, and nothing sent after it puts the user back either: a round
     * trip first, so that whatever the drop's reply led to has reached Redis. */
    CHECK(store_epoch_get(st, on_epoch, (void *)1) == 0);
    run_until_done();
    CHECK(!single || (index_score("arch", fay) == -1 && index_score("act", fay) == -1));
    CHECK(store_activity(st, fay, 9500, 1000000, on_flag, NULL) == 0);
    run_until_done();
    CHECK(flag_value);
    /* While evicted, a message goes straight to the archive, with the next seq. */
    archive_msg_t m = {NULL, 9600, "1 9600 0 0 0 0\n", 15, "", "alice@t1 ev3"};
    CHECK(archive_put_evicted(a, fay, &m, "cc", on_put_evicted, NULL) == 0);
    run_until_done();
    CHECK(put_evicted_status == ARCHIVE_PUT_STORED);
    CHECK_STR(put_evicted_sid, "3-cc");
    CHECK(archive_put_evicted(a, fay, &m, "dd", on_put_evicted, NULL) == 0);
    run_until_done();
    CHECK(put_evicted_status == ARCHIVE_PUT_DUP);
    CHECK_STR(put_evicted_sid, "3-cc");
    /* Back: the archive hands the state over (once), Redis continues at seq 4. */
    CHECK(archive_restore(a, fay, on_state_read, NULL) == 0);
    run_until_done();
    CHECK(restored.seq == 3 && restored.archived);
    CHECK(store_restore(st, &restored, 9700, on_done, &rc) == 0);
    run_until_done();
    CHECK(archive_put_evicted(a, fay, &m, "ee", on_put_evicted, NULL) == 0);
    run_until_done();
    /* Not evicted any more: with the state a restore would create (fay's archive ends at 3). */
    CHECK(put_evicted_status == ARCHIVE_PUT_NOT_EVICTED && put_evicted_seq == 3);
    CHECK(archive_put_evicted(a, "nobody@t1", &m, "ff", on_put_evicted, NULL) == 0);
    run_until_done();
    CHECK(put_evicted_status == ARCHIVE_PUT_NOT_EVICTED && put_evicted_seq == 0);
    CHECK(put(fay, alice, "ev4", true, 100, 9800) == 0 && put_res.status == STORE_PUT_OFFLINE);
    CHECK(strncmp(put_sid, "4-", 2) == 0);
    /* act: the activity at 9500 (a restore only adds it when missing). */
    CHECK(!single || (index_score("arch", fay) == 9800 && index_score("act", fay) == 9500));
    archive_close(a);
    uv_run(&loop, UV_RUN_NOWAIT);
    remove_archive_dir(dir, path);
}

static void on_guard(uv_timer_t *t)
{
    (void)t;
}

/* Runs the loop until the state callback reports, or about 3 s pass. A ticking timer makes
 * each loop turn return, so a missing report fails instead of hanging. */
static uv_timer_t tick;
static void wait_state(void)
{
    uv_timer_start(&tick, on_guard, 10, 10);
    for (int i = 0; i < 300 && connected == -1; i++)
        uv_run(&loop, UV_RUN_ONCE);
    uv_timer_stop(&tick);
}

/* A Redis that is down must be reported (and retried), not waited on forever: a refused
 * connect arrives as a poll error, which the stock hiredis libuv adapter dropped. */
static void test_refused_connect_is_reported(void)
{
    store_t *dead;
    store_config_t cfg = {
        .host = "127.0.0.1", .port = atoi(getenv("REDIS_DEAD_PORT")), .max_inflight = 10};
    connected = -1;
    CHECK(store_create(&loop, &cfg, on_state, NULL, &dead) == 0);
    wait_state();
    CHECK(connected == 0);
    /* Requests on a store that is down fail at once, without a callback. */
    CHECK(store_epoch_next(dead, on_epoch, NULL) == STORE_EDOWN);
    store_close(dead);
}

static void test_socket_and_auth(void)
{
    store_t *s2;
    store_config_t cfg = {
        .socket = getenv("REDIS_SOCKET"), .password = getenv("REDIS_PASSWORD"), .max_inflight = 1};
    connected = -1;
    CHECK(store_create(&loop, &cfg, on_state, NULL, &s2) == 0);
    wait_state();
    CHECK(connected == 1);
    /* The in-flight bound: a second request while one is pending is refused at once. */
    CHECK(store_epoch_next(s2, on_epoch, NULL) == 0);
    CHECK(store_epoch_next(s2, on_epoch, NULL) == STORE_EBUSY);
    run_until_done();
    CHECK(store_inflight(s2) == 0);
    store_close(s2);

    /* A wrong password is reported as a failure, not taken for a connection. */
    store_config_t bad = {.host = "127.0.0.1",
                          .port = atoi(getenv("REDIS_PORT")),
                          .password = "wrong",
                          .max_inflight = 10};
    connected = -1;
    CHECK(store_create(&loop, &bad, on_state, NULL, &s2) == 0);
    wait_state();
    CHECK(connected == 0);
    CHECK(store_epoch_next(s2, on_epoch, NULL) == STORE_EDOWN);
    store_close(s2);
}

/* wait_replicas: without a replica to confirm it, a put is answered with a wait error (after
 * wait_timeout), never with success, although the master has it: the retry is then a dup. */
static void test_wait_replicas(const store_config_t *base)
{
    store_config_t cfg = *base;
    cfg.wait_replicas = 1;
    cfg.wait_timeout_ms = 100;
    store_t *keep = st, *s2;
    connected = -1;
    CHECK(store_create(&loop, &cfg, on_state, NULL, &s2) == 0);
    wait_state();
    CHECK(connected == 1);
    CHECK(put("waiter@t1", "alice@t1", "w0", true, 100, 5000) == 0); /* creates the user */
    CHECK(put_err == 0);
    st = s2;
    CHECK(put("waiter@t1", "alice@t1", "w1", true, 100, 5000) == 0);
    CHECK(put_err == STORE_EDOWN);
    /* Puts of one turn go as one call, held for one WAIT: each fails once, on its own. */
    turn_put_t t[3];
    for (int i = 0; i < 3; i++)
        put_in_turn("waiter@t1", i == 0 ? "wa" : i == 1 ? "wb" : "wc", true, 100, &t[i]);
    done = 1;
    run_until_turn_done();
    for (int i = 0; i < 3; i++)
        CHECK(t[i].calls == 1 && t[i].err == STORE_EDOWN);
    st = keep;
    CHECK(put("waiter@t1", "alice@t1", "w1", true, 100, 5000) == 0);
    CHECK(put_err == 0 && put_res.status == STORE_PUT_DUP);
    store_close(s2);
}

/* A paused Redis must not hold requests forever: past the timeout they fail and the store
 * reconnects once Redis answers again. */
static void test_paused_redis_times_out(void)
{
    pid_t pid = (pid_t)atoi(getenv("REDIS_PID"));
    kill(pid, SIGSTOP);
    turn_put_t t[3];
    for (int i = 0; i < 3; i++)
        put_in_turn("bat@t1", i == 0 ? "p0" : i == 1 ? "p1" : "p2", true, 100, &t[i]);
    epoch[0] = 'x';
    CHECK(store_epoch_next(st, on_epoch, NULL) == 0);
    connected = -1;
    done = 0;
    run_until_turn_done(); /* the callbacks, with an error, after ~300 ms */
    CHECK(epoch[0] == '\0');
    for (int i = 0; i < 3; i++)
        CHECK(t[i].calls == 1 && t[i].err == STORE_EDOWN);
    wait_state(); /* the state change may have come first */
    CHECK(connected == 0 || !store_is_connected(st));
    kill(pid, SIGCONT);
    connected = -1;
    wait_state();
    CHECK(connected == 1);
    CHECK(store_epoch_next(st, on_epoch, NULL) == 0);
    run_until_done();
    CHECK(epoch[0] != '\0');
}

static void test_closed_store_refuses(void)
{
    uv_close((uv_handle_t *)&tick, NULL);
    store_close(st);
    st = NULL;
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&loop) == 0);
}

int main(void)
{
    /* The same tests run against a single Redis (with-redis.sh) and against a three-master
     * Redis Cluster (with-cluster.sh), through the same store API. */
    const char *port = getenv("REDIS_PORT");
    const char *cports = getenv("CLUSTER_PORTS");
    char seeds[512] = "";
    if (cports) {
        char copy[256];
        snprintf(copy, sizeof copy, "%s", cports);
        for (char *save, *p = strtok_r(copy, " ", &save); p; p = strtok_r(NULL, " ", &save))
            snprintf(seeds + strlen(seeds), sizeof seeds - strlen(seeds), "%s127.0.0.1:%s",
                     seeds[0] ? "," : "", p);
    } else if (!port) {
        fprintf(stderr, "REDIS_PORT is not set: run through tests/unit/with-redis.sh or "
                        "with-cluster.sh\n");
        return 1;
    }
    uv_loop_init(&loop);
    uv_timer_init(&loop, &tick);
    store_config_t cfg = {.host = "127.0.0.1",
                          .port = port ? atoi(port) : 0,
                          .password = getenv("REDIS_PASSWORD"),
                          .max_inflight = 100,
                          .timeout_ms = 300,
                          .cluster = cports ? seeds : NULL};
    CHECK(store_create(&loop, &cfg, on_state, NULL, &st) == 0);
    run_until_done();
    CHECK(connected == 1);
    if (connected) {
        test_offline_queue();
        test_live_and_due();
        test_per_device();
        test_ack_many();
        test_dedupe_marks();
        test_dedupe_upgrade();
        test_puts_in_one_turn();
        test_index_on_put();
        test_archive();
        test_evict();
        test_wait_replicas(&cfg);
        if (!cports) {
            test_socket_and_auth();
            test_paused_redis_times_out();
        }
    }
    if (!cports)
        test_refused_connect_is_reported();
    test_closed_store_refuses();
    return check_report();
}
