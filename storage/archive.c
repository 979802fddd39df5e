/* The SQLite archive. Ownership: archive_t owns the database handle, its prepared statements and
 * a FIFO of jobs; exactly one job is on the thread pool at a time, which serializes all use of
 * the handle and keeps requests in submission order. A job owns copies of its inputs (the
 * caller's buffers may be gone by the time it runs) and its outputs until its callback returned. */
#include "archive.h"

#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Forward migrations: entry i brings the schema from version i to i + 1. Never edit a released
 * entry; append a new one. */
static const char *const migrations[] = {
    "CREATE TABLE messages ("
    "  user TEXT NOT NULL,"
    "  seq INTEGER NOT NULL,"
    "  sid TEXT NOT NULL,"
    "  stamp INTEGER NOT NULL,"
    "  origin TEXT,"
    "  acked TEXT NOT NULL DEFAULT '',"
    "  blob BLOB NOT NULL,"
    "  PRIMARY KEY (user, seq)"
    ") WITHOUT ROWID;"
    "CREATE INDEX messages_origin ON messages (user, origin) WHERE origin IS NOT NULL;"
    "CREATE INDEX messages_stamp ON messages (stamp);",
    /* 2: users evicted from Redis; devices are "device\tseen_ms" lines */
    "CREATE TABLE evicted ("
    "  user TEXT PRIMARY KEY,"
    "  seq INTEGER NOT NULL,"
    "  devices TEXT NOT NULL,"
    "  stamp INTEGER NOT NULL"
    ") WITHOUT ROWID;",
};
#define SCHEMA_VERSION ((int)(sizeof migrations / sizeof migrations[0]))

/* "Not acknowledged by device ?2": the acked list, newline-separated, does not name it. */
#define NOT_ACKED "instr(char(10) || acked || char(10), char(10) || ?2 || char(10)) = 0"

typedef enum {
    ST_INSERT,
    ST_BY_SEQ,
    ST_BY_ORIGIN,
    ST_SET_ACKED,
    ST_DELETE,
    ST_VIEW,
    ST_COUNT,
    ST_BLOB,
    ST_EXPIRE,
    ST_TOTALS,
    ST_EVICTED_SET,
    ST_EVICTED_GET,
    ST_EVICTED_DEL,
    ST_EVICTED_SEQ,
    ST_MAX_SEQ,
    ST_EVICTED_COUNT,
    ST_COUNT_ALL
} stmt_id_t;

static const char *const stmt_sql[ST_COUNT_ALL] = {
    [ST_INSERT] = "INSERT INTO messages (user, seq, sid, stamp, origin, acked, blob)"
                  " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
    [ST_BY_SEQ] = "SELECT seq, sid, acked, blob FROM messages WHERE user = ?1 AND seq = ?3",
    [ST_BY_ORIGIN] = "SELECT seq, sid, acked, blob FROM messages WHERE user = ?1 AND origin = ?3",
    [ST_SET_ACKED] = "UPDATE messages SET acked = ?3 WHERE user = ?1 AND seq = ?2",
    [ST_DELETE] = "DELETE FROM messages WHERE user = ?1 AND seq = ?2",
    [ST_VIEW] = "SELECT sid, blob FROM messages WHERE user = ?1 AND seq > ?3 AND " NOT_ACKED
                " ORDER BY seq LIMIT ?4",
    [ST_COUNT] = "SELECT count(*), coalesce(sum(length(blob)), 0), min(seq), max(seq)"
                 " FROM messages WHERE user = ?1 AND " NOT_ACKED,
    [ST_BLOB] = "SELECT sid, blob FROM messages WHERE user = ?1 AND seq = ?2",
    [ST_EXPIRE] = "DELETE FROM messages WHERE stamp < ?1",
    [ST_TOTALS] = "SELECT count(DISTINCT user), count(*), coalesce(sum(length(blob)), 0)"
                  " FROM messages",
    [ST_EVICTED_SET] = "INSERT INTO evicted (user, seq, devices, stamp) VALUES (?1, ?2, ?3, ?4)"
                       " ON CONFLICT (user) DO UPDATE SET seq = max(seq, excluded.seq),"
                       " devices = excluded.devices, stamp = excluded.stamp",
    [ST_EVICTED_GET] = "SELECT seq, devices FROM evicted WHERE user = ?1",
    [ST_EVICTED_DEL] = "DELETE FROM evicted WHERE user = ?1",
    [ST_EVICTED_SEQ] = "UPDATE evicted SET seq = ?2 WHERE user = ?1",
    [ST_MAX_SEQ] = "SELECT max(seq) FROM messages WHERE user = ?1",
    [ST_EVICTED_COUNT] = "SELECT count(*) FROM evicted",
};

typedef struct job job_t;

#define CHAIN_MAX 32

struct archive {
    uv_loop_t *loop;
    sqlite3 *db;
    sqlite3_stmt *st[ST_COUNT_ALL];
    job_t *head, *tail;
    bool busy;
    bool closing;
};

typedef struct item {
    char *sid;
    char *blob;
    size_t len;
} item_t;

typedef enum {
    J_PUT,
    J_ACK,
    J_SUMMARY,
    J_FETCH,
    J_EXPIRE,
    J_TOTALS,
    J_EVICT,
    J_RESTORE,
    J_PUT_EVICTED
} job_kind_t;

struct job {
    uv_work_t work;
    archive_t *a;
    job_t *next;
    job_kind_t kind;
    int err;
    void *cb;
    void *ud;
    /* inputs */
    char *user, *device, *origin, *known;
    archive_msg_t *msgs; /* J_PUT: strings owned through the arena below */
    char **sids;
    bool *receipt_ok;
    size_t n;
    uint64_t after;
    unsigned max;
    size_t max_bytes, overhead;
    int64_t cutoff;
    char *devices; /* J_EVICT in, J_RESTORE out: "device\tseen" lines */
    uint64_t seq;
    bool complete_in, found, archived;
    char *suffix;
    /* outputs */
    item_t *items;
    size_t nitems, cap;
    item_t ends[2];
    uint64_t count, bytes;
    bool complete;
    char *cursor;
    archive_totals_t totals;
};

/* ---- helpers ----------------------------------------------------------------------------------
 */

static char *dup_n(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

static char *dup_s(const char *s)
{
    return s ? dup_n(s, strlen(s)) : NULL;
}

static uint64_t seq_of(const char *sid)
{
    return strtoull(sid, NULL, 10);
}

/* Resources never contain control characters, so this never matches a real device: the device
 * "" (a bare-JID requester) then sees everything and acknowledges as nobody in particular. */
static const char *device_param(const char *device)
{
    return device && *device ? device : "\x01";
}

static bool list_has(const char *list, const char *dev)
{
    size_t n = strlen(dev);
    for (const char *p = list; *p;) {
        const char *e = strchr(p, '\n');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == n && memcmp(p, dev, n) == 0)
            return true;
        if (!e)
            break;
        p = e + 1;
    }
    return false;
}

static int push_item(job_t *j, const char *sid, const void *blob, size_t len)
{
    if (j->nitems == j->cap) {
        size_t cap = j->cap ? 2 * j->cap : 16;
        item_t *it = realloc(j->items, cap * sizeof *it);
        if (!it)
            return -1;
        j->items = it;
        j->cap = cap;
    }
    item_t *it = &j->items[j->nitems];
    it->sid = dup_s(sid);
    it->blob = dup_n(blob ? blob : "", len);
    it->len = len;
    if (!it->sid || !it->blob) {
        free(it->sid);
        free(it->blob);
        return -1;
    }
    j->nitems++;
    return 0;
}

static sqlite3_stmt *stmt(archive_t *a, stmt_id_t id)
{
    sqlite3_stmt *s = a->st[id];
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    return s;
}

static void bind_text(sqlite3_stmt *s, int i, const char *v)
{
    if (v)
        sqlite3_bind_text(s, i, v, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(s, i);
}

static int exec(archive_t *a, const char *sql)
{
    return sqlite3_exec(a->db, sql, NULL, NULL, NULL) == SQLITE_OK ? 0 : -1;
}

/* ---- work (thread pool) -----------------------------------------------------------------------
 */

static int run_put(job_t *j)
{
    archive_t *a = j->a;
    for (size_t i = 0; i < j->n; i++) {
        const archive_msg_t *m = &j->msgs[i];
        sqlite3_stmt *s = stmt(a, ST_INSERT);
        bind_text(s, 1, j->user);
        sqlite3_bind_int64(s, 2, (sqlite3_int64)seq_of(m->sid));
        bind_text(s, 3, m->sid);
        sqlite3_bind_int64(s, 4, m->stamp_ms);
        bind_text(s, 5, m->origin && *m->origin ? m->origin : NULL);
        bind_text(s, 6, m->acked ? m->acked : "");
        sqlite3_bind_blob(s, 7, m->blob, (int)m->blob_len, SQLITE_STATIC);
        if (sqlite3_step(s) != SQLITE_DONE)
            return -1;
    }
    return 0;
}

/* Acknowledges the row s points at (columns seq, sid, acked, blob) for the job's device. */
static int ack_row(job_t *j, sqlite3_stmt *s, bool receipt_ok)
{
    archive_t *a = j->a;
    sqlite3_int64 seq = sqlite3_column_int64(s, 0);
    char *sid = dup_s((const char *)sqlite3_column_text(s, 1));
    char *acked = dup_s((const char *)sqlite3_column_text(s, 2));
    const void *blob = sqlite3_column_blob(s, 3);
    size_t len = (size_t)sqlite3_column_bytes(s, 3);
    int rc = -1;
    char *next = NULL;
    if (!sid || !acked)
        goto out;
    const char *dev = device_param(j->device);
    if (list_has(acked, dev)) {
        rc = 0;
        goto out;
    }
    if (!*acked && receipt_ok && push_item(j, sid, blob, len) < 0)
        goto out;
    size_t n = strlen(acked) + strlen(dev) + 2;
    if (!(next = malloc(n)))
        goto out;
    snprintf(next, n, "%s%s%s", acked, *acked ? "\n" : "", dev);
    bool all = true;
    for (const char *p = j->known ? j->known : ""; *p && all;) {
        const char *e = strchr(p, '\n');
        size_t l = e ? (size_t)(e - p) : strlen(p);
        char *one = dup_n(p, l);
        if (!one)
            goto out;
        all = list_has(next, one);
        free(one);
        p = e ? e + 1 : p + l;
    }
    sqlite3_stmt *w = stmt(a, all ? ST_DELETE : ST_SET_ACKED);
    bind_text(w, 1, j->user);
    sqlite3_bind_int64(w, 2, seq);
    if (!all)
        bind_text(w, 3, next);
    rc = sqlite3_step(w) == SQLITE_DONE ? 0 : -1;
out:
    free(sid);
    free(acked);
    free(next);
    return rc;
}

static int run_ack_one(job_t *j, stmt_id_t id, const char *key, bool receipt_ok)
{
    sqlite3_stmt *s = stmt(j->a, id);
    bind_text(s, 1, j->user);
    if (id == ST_BY_SEQ)
        sqlite3_bind_int64(s, 3, (sqlite3_int64)seq_of(key));
    else
        bind_text(s, 3, key);
    int rc = sqlite3_step(s);
    if (rc == SQLITE_DONE)
        return 0;
    if (rc != SQLITE_ROW)
        return -1;
    if (id == ST_BY_SEQ && strcmp((const char *)sqlite3_column_text(s, 1), key) != 0)
        return 0; /* same seq, another suffix: not this message */
    return ack_row(j, s, receipt_ok);
}

static int run_ack(job_t *j)
{
    if (!j->sids)
        return run_ack_one(j, ST_BY_ORIGIN, j->origin, true);
    for (size_t i = 0; i < j->n; i++)
        if (run_ack_one(j, ST_BY_SEQ, j->sids[i], j->receipt_ok[i]) < 0)
            return -1;
    return 0;
}

/* The device's view after j->after, oldest first, at most limit rows into j->items. */
static int run_view(job_t *j, uint64_t after, unsigned limit)
{
    sqlite3_stmt *s = stmt(j->a, ST_VIEW);
    bind_text(s, 1, j->user);
    bind_text(s, 2, device_param(j->device));
    sqlite3_bind_int64(s, 3, (sqlite3_int64)after);
    sqlite3_bind_int64(s, 4, limit);
    int rc;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW)
        if (push_item(j, (const char *)sqlite3_column_text(s, 0), sqlite3_column_blob(s, 1),
                      (size_t)sqlite3_column_bytes(s, 1)) < 0)
            return -1;
    return rc == SQLITE_DONE ? 0 : -1;
}

static int load_end(job_t *j, sqlite3_int64 seq, item_t *out)
{
    sqlite3_stmt *s = stmt(j->a, ST_BLOB);
    bind_text(s, 1, j->user);
    sqlite3_bind_int64(s, 2, seq);
    if (sqlite3_step(s) != SQLITE_ROW)
        return 0;
    out->sid = dup_s((const char *)sqlite3_column_text(s, 0));
    out->len = (size_t)sqlite3_column_bytes(s, 1);
    out->blob = dup_n(sqlite3_column_blob(s, 1) ? sqlite3_column_blob(s, 1) : "", out->len);
    return out->sid && out->blob ? 0 : -1;
}

static int run_summary(job_t *j)
{
    sqlite3_stmt *s = stmt(j->a, ST_COUNT);
    bind_text(s, 1, j->user);
    bind_text(s, 2, device_param(j->device));
    if (sqlite3_step(s) != SQLITE_ROW)
        return -1;
    j->count = (uint64_t)sqlite3_column_int64(s, 0);
    j->bytes = (uint64_t)sqlite3_column_int64(s, 1);
    sqlite3_int64 lo = sqlite3_column_int64(s, 2), hi = sqlite3_column_int64(s, 3);
    if (j->count == 0)
        return 0;
    if (load_end(j, lo, &j->ends[0]) < 0 || load_end(j, hi, &j->ends[1]) < 0)
        return -1;
    return j->max ? run_view(j, 0, j->max) : 0;
}

static int run_fetch(job_t *j)
{
    if (run_view(j, j->after, j->max + 1) < 0)
        return -1;
    size_t rows = j->nitems, taken = 0, used = 0;
    while (taken < rows && taken < j->max) {
        size_t cost = j->items[taken].len + j->overhead;
        if (taken > 0 && used + cost > j->max_bytes)
            break;
        used += cost;
        taken++;
    }
    for (size_t i = taken; i < rows; i++) {
        free(j->items[i].sid);
        free(j->items[i].blob);
    }
    j->nitems = taken;
    j->complete = taken == rows;
    if (taken && !(j->cursor = dup_s(j->items[taken - 1].sid)))
        return -1;
    return 0;
}

static int run_expire(job_t *j)
{
    sqlite3_stmt *s = stmt(j->a, ST_EXPIRE);
    sqlite3_bind_int64(s, 1, j->cutoff);
    if (sqlite3_step(s) != SQLITE_DONE)
        return -1;
    j->count = (uint64_t)sqlite3_changes(j->a->db);
    return 0;
}

static int run_totals(job_t *j)
{
    sqlite3_stmt *s = stmt(j->a, ST_TOTALS);
    if (sqlite3_step(s) != SQLITE_ROW)
        return -1;
    j->totals.users = (uint64_t)sqlite3_column_int64(s, 0);
    j->totals.messages = (uint64_t)sqlite3_column_int64(s, 1);
    j->totals.bytes = (uint64_t)sqlite3_column_int64(s, 2);
    s = stmt(j->a, ST_EVICTED_COUNT);
    if (sqlite3_step(s) != SQLITE_ROW)
        return -1;
    j->totals.evicted = (uint64_t)sqlite3_column_int64(s, 0);
    return 0;
}

static int run_evict(job_t *j)
{
    if (run_put(j) < 0)
        return -1;
    if (!j->complete_in)
        return 0;
    sqlite3_stmt *s = stmt(j->a, ST_EVICTED_SET);
    bind_text(s, 1, j->user);
    sqlite3_bind_int64(s, 2, (sqlite3_int64)j->seq);
    bind_text(s, 3, j->devices ? j->devices : "");
    sqlite3_bind_int64(s, 4, j->cutoff);
    return sqlite3_step(s) == SQLITE_DONE ? 0 : -1;
}

/* The highest seq archived for the user (0 for none). */
static int max_seq(job_t *j, uint64_t *out)
{
    sqlite3_stmt *s = stmt(j->a, ST_MAX_SEQ);
    bind_text(s, 1, j->user);
    if (sqlite3_step(s) != SQLITE_ROW)
        return -1;
    *out = (uint64_t)sqlite3_column_int64(s, 0);
    return 0;
}

static int run_restore(job_t *j)
{
    uint64_t top;
    if (max_seq(j, &top) < 0)
        return -1;
    j->seq = top;
    j->archived = top > 0;
    sqlite3_stmt *s = stmt(j->a, ST_EVICTED_GET);
    bind_text(s, 1, j->user);
    int rc = sqlite3_step(s);
    if (rc == SQLITE_DONE)
        return 0;
    if (rc != SQLITE_ROW)
        return -1;
    uint64_t seq = (uint64_t)sqlite3_column_int64(s, 0);
    if (seq > j->seq)
        j->seq = seq;
    j->found = true;
    if (!(j->devices = dup_s((const char *)sqlite3_column_text(s, 1))))
        return -1;
    /* Out of the evicted list now: from here on messages for the user go to Redis again. */
    sqlite3_stmt *d = stmt(j->a, ST_EVICTED_DEL);
    bind_text(d, 1, j->user);
    return sqlite3_step(d) == SQLITE_DONE ? 0 : -1;
}

static int run_put_evicted(job_t *j)
{
    archive_msg_t *m = &j->msgs[0];
    sqlite3_stmt *s = stmt(j->a, ST_EVICTED_GET);
    bind_text(s, 1, j->user);
    int rc = sqlite3_step(s);
    if (rc == SQLITE_DONE) {
        j->count = ARCHIVE_PUT_NOT_EVICTED;
        return max_seq(j, &j->seq);
    }
    if (rc != SQLITE_ROW)
        return -1;
    uint64_t seq = (uint64_t)sqlite3_column_int64(s, 0), top;
    if (m->origin) {
        sqlite3_stmt *o = stmt(j->a, ST_BY_ORIGIN);
        bind_text(o, 1, j->user);
        bind_text(o, 3, m->origin);
        rc = sqlite3_step(o);
        if (rc == SQLITE_ROW) {
            j->count = ARCHIVE_PUT_DUP;
            return (j->cursor = dup_s((const char *)sqlite3_column_text(o, 1))) ? 0 : -1;
        }
        if (rc != SQLITE_DONE)
            return -1;
    }
    if (max_seq(j, &top) < 0)
        return -1;
    seq = (seq > top ? seq : top) + 1;
    char sid[64];
    snprintf(sid, sizeof sid, "%llu-%s", (unsigned long long)seq, j->suffix);
    free((char *)m->sid);
    if (!(m->sid = dup_s(sid)) || run_put(j) < 0)
        return -1;
    sqlite3_stmt *u = stmt(j->a, ST_EVICTED_SEQ);
    bind_text(u, 1, j->user);
    sqlite3_bind_int64(u, 2, (sqlite3_int64)seq);
    if (sqlite3_step(u) != SQLITE_DONE)
        return -1;
    j->count = ARCHIVE_PUT_STORED;
    return (j->cursor = dup_s(sid)) ? 0 : -1;
}

static void run_job(job_t *j)
{
    archive_t *a = j->a;
    bool write = j->kind != J_SUMMARY && j->kind != J_FETCH && j->kind != J_TOTALS;
    int rc;
    /* Writes are one transaction each: a batch is in the archive entirely or not at all. */
    if (write && exec(a, "BEGIN IMMEDIATE") < 0) {
        j->err = ARCHIVE_EDB;
        return;
    }
    switch (j->kind) {
    case J_PUT:
        rc = run_put(j);
        break;
    case J_ACK:
        rc = run_ack(j);
        break;
    case J_SUMMARY:
        rc = run_summary(j);
        break;
    case J_FETCH:
        rc = run_fetch(j);
        break;
    case J_EXPIRE:
        rc = run_expire(j);
        break;
    case J_TOTALS:
        rc = run_totals(j);
        break;
    case J_EVICT:
        rc = run_evict(j);
        break;
    case J_RESTORE:
        rc = run_restore(j);
        break;
    case J_PUT_EVICTED:
        rc = run_put_evicted(j);
        break;
    default:
        rc = -1;
    }
    for (int i = 0; i < ST_COUNT_ALL; i++)
        sqlite3_reset(a->st[i]);
    if (write)
        rc = rc == 0 ? exec(a, "COMMIT") : (exec(a, "ROLLBACK"), -1);
    j->err = rc == 0 ? 0 : ARCHIVE_EDB;
}

/* A chain of jobs runs in one trip to the thread pool, in order: a burst of small jobs (the
 * lookups of many new users at once) would otherwise pay a thread hand-off each, one after the
 * other, and the last would wait for all of them. */
static void on_work(uv_work_t *w)
{
    for (job_t *j = w->data; j; j = j->next)
        run_job(j);
}

/* ---- completion (loop) ------------------------------------------------------------------------
 */

static void start_next(archive_t *a);

static void job_free(job_t *j)
{
    for (size_t i = 0; i < j->nitems; i++) {
        free(j->items[i].sid);
        free(j->items[i].blob);
    }
    for (int i = 0; i < 2; i++) {
        free(j->ends[i].sid);
        free(j->ends[i].blob);
    }
    if (j->msgs)
        for (size_t i = 0; i < j->n; i++) {
            free((char *)j->msgs[i].sid);
            free((char *)j->msgs[i].blob);
            free((char *)j->msgs[i].acked);
            free((char *)j->msgs[i].origin);
        }
    if (j->sids)
        for (size_t i = 0; i < j->n; i++)
            free(j->sids[i]);
    free(j->msgs);
    free(j->sids);
    free(j->receipt_ok);
    free(j->items);
    free(j->cursor);
    free(j->user);
    free(j->device);
    free(j->origin);
    free(j->known);
    free(j->devices);
    free(j->suffix);
    free(j);
}

/* "d1\ts1\nd2\ts2" <-> flat (device, seen) pairs; the pairs point into a copy owned by *buf. */
static size_t devices_split(const char *text, char **buf, const char ***pairs)
{
    size_t n = 0;
    *pairs = NULL;
    if (!(*buf = dup_s(text ? text : "")))
        return 0;
    for (const char *p = *buf; *p; p++)
        n += *p == '\n';
    n += **buf != '\0';
    if (!n || !(*pairs = calloc(2 * n, sizeof **pairs)))
        return 0;
    size_t k = 0;
    for (char *line = strtok(*buf, "\n"); line && k < n; line = strtok(NULL, "\n")) {
        char *tab = strchr(line, '\t');
        if (!tab)
            continue;
        *tab = '\0';
        (*pairs)[2 * k] = line;
        (*pairs)[2 * k + 1] = tab + 1;
        k++;
    }
    return k;
}

static store_item_t *as_store_items(const job_t *j)
{
    store_item_t *it = j->nitems ? calloc(j->nitems, sizeof *it) : NULL;
    for (size_t i = 0; it && i < j->nitems; i++)
        it[i] = (store_item_t){j->items[i].sid, j->items[i].blob, j->items[i].len};
    return it;
}

static void deliver(job_t *j)
{
    int err = j->err;
    store_item_t *items = err ? NULL : as_store_items(j);
    if (!err && j->nitems && !items)
        err = ARCHIVE_ENOMEM;
    size_t n = err ? 0 : j->nitems;
    switch (j->kind) {
    case J_PUT:
        if (j->cb)
            ((archive_done_cb)j->cb)(j->ud, err);
        break;
    case J_ACK:
        ((store_items_cb)j->cb)(j->ud, err, items, n);
        break;
    case J_SUMMARY: {
        store_item_t ends[2];
        for (int i = 0; i < 2; i++)
            ends[i] = (store_item_t){j->ends[i].sid, j->ends[i].blob ? j->ends[i].blob : "",
                                     j->ends[i].len};
        ((store_summary_cb)j->cb)(j->ud, err, err ? 0 : j->count, err ? 0 : j->bytes,
                                  err ? NULL : ends, items, n, false);
        break;
    }
    case J_FETCH:
        ((store_fetch_cb)j->cb)(j->ud, err, !err && j->complete, err ? NULL : j->cursor, items, n,
                                false);
        break;
    case J_EXPIRE:
        if (j->cb)
            ((archive_count_cb)j->cb)(j->ud, err, err ? 0 : j->count);
        break;
    case J_TOTALS:
        ((archive_totals_cb)j->cb)(j->ud, err, err ? NULL : &j->totals);
        break;
    case J_EVICT:
        if (j->cb)
            ((archive_done_cb)j->cb)(j->ud, err);
        break;
    case J_RESTORE: {
        char *buf = NULL;
        const char **pairs = NULL;
        size_t nd = err ? 0 : devices_split(j->devices, &buf, &pairs);
        store_user_state_t st = {j->user, j->seq, pairs, nd, j->archived || j->found};
        ((archive_state_cb)j->cb)(j->ud, err, err ? NULL : &st);
        free(pairs);
        free(buf);
        break;
    }
    case J_PUT_EVICTED:
        ((archive_put_cb)j->cb)(j->ud, err,
                                err ? ARCHIVE_PUT_NOT_EVICTED : (archive_put_status_t)j->count,
                                j->cursor, j->seq);
        break;
    }
    free(items);
}

static void finish(archive_t *a)
{
    for (int i = 0; i < ST_COUNT_ALL; i++)
        sqlite3_finalize(a->st[i]);
    sqlite3_close(a->db);
    free(a);
}

static void on_after(uv_work_t *w, int status)
{
    job_t *j = w->data;
    archive_t *a = j->a;
    a->busy = false;
    while (j) {
        job_t *next = j->next;
        if (status == UV_ECANCELED)
            j->err = ARCHIVE_ECLOSED;
        deliver(j);
        job_free(j);
        j = next;
    }
    start_next(a);
}

static void start_next(archive_t *a)
{
    if (a->busy)
        return;
    job_t *j = a->head;
    if (!j) {
        if (a->closing)
            finish(a);
        return;
    }
    /* Up to CHAIN_MAX jobs leave the queue together; the chain ends with next = NULL. */
    job_t *last = j;
    for (int n = 1; n < CHAIN_MAX && last->next; n++)
        last = last->next;
    a->head = last->next;
    if (!a->head)
        a->tail = NULL;
    last->next = NULL;
    a->busy = true;
    j->work.data = j;
    if (uv_queue_work(a->loop, &j->work, on_work, on_after) != 0) {
        a->busy = false;
        while (j) {
            job_t *next = j->next;
            j->err = ARCHIVE_EDB;
            deliver(j);
            job_free(j);
            j = next;
        }
        start_next(a);
    }
}

static job_t *job_new(archive_t *a, job_kind_t kind, void *cb, void *ud)
{
    if (!a || a->closing)
        return NULL;
    job_t *j = calloc(1, sizeof *j);
    if (j) {
        j->a = a;
        j->kind = kind;
        j->cb = cb;
        j->ud = ud;
    }
    return j;
}

static int submit(archive_t *a, job_t *j, bool ok)
{
    if (!ok) {
        job_free(j);
        return ARCHIVE_ENOMEM;
    }
    if (a->tail)
        a->tail->next = j;
    else
        a->head = j;
    a->tail = j;
    start_next(a);
    return 0;
}

/* ---- requests ---------------------------------------------------------------------------------
 */

/* Copies msgs into j (the J_PUT input layout, shared by J_EVICT and J_PUT_EVICTED). */
static bool copy_msgs(job_t *j, const archive_msg_t *msgs, size_t n)
{
    if (!(j->msgs = calloc(n ? n : 1, sizeof *j->msgs)))
        return false;
    for (size_t i = 0; i < n; i++) {
        archive_msg_t *m = &j->msgs[i];
        j->n = i + 1;
        m->stamp_ms = msgs[i].stamp_ms;
        m->blob_len = msgs[i].blob_len;
        if (!(m->sid = dup_s(msgs[i].sid ? msgs[i].sid : "")) ||
            !(m->blob = dup_n(msgs[i].blob, msgs[i].blob_len)) ||
            !(m->acked = dup_s(msgs[i].acked ? msgs[i].acked : "")) ||
            (msgs[i].origin && !(m->origin = dup_s(msgs[i].origin))))
            return false;
    }
    return true;
}

int archive_put(archive_t *a, const char *user, const archive_msg_t *msgs, size_t n,
                archive_done_cb cb, void *ud)
{
    job_t *j = job_new(a, J_PUT, (void *)cb, ud);
    if (!j)
        return a && a->closing ? ARCHIVE_ECLOSED : ARCHIVE_ENOMEM;
    bool ok = (j->user = dup_s(user)) && copy_msgs(j, msgs, n);
    return submit(a, j, ok);
}

int archive_evict(archive_t *a, const store_user_state_t *state, const archive_msg_t *msgs,
                  size_t n, bool complete, archive_done_cb cb, void *ud)
{
    job_t *j = job_new(a, J_EVICT, (void *)cb, ud);
    if (!j)
        return a && a->closing ? ARCHIVE_ECLOSED : ARCHIVE_ENOMEM;
    j->seq = state->seq;
    j->complete_in = complete;
    j->cutoff = (int64_t)time(NULL) * 1000;
    size_t len = 1;
    for (size_t i = 0; i < 2 * state->ndevices; i++)
        len += strlen(state->devices[i]) + 1;
    bool ok = (j->user = dup_s(state->user)) && (j->devices = malloc(len)) && copy_msgs(j, msgs, n);
    if (ok) {
        char *p = j->devices;
        *p = '\0';
        for (size_t i = 0; i < state->ndevices; i++)
            p += sprintf(p, "%s%s\t%s", i ? "\n" : "", state->devices[2 * i],
                         state->devices[2 * i + 1]);
    }
    return submit(a, j, ok);
}

int archive_restore(archive_t *a, const char *user, archive_state_cb cb, void *ud)
{
    job_t *j = job_new(a, J_RESTORE, (void *)cb, ud);
    if (!j)
        return a && a->closing ? ARCHIVE_ECLOSED : ARCHIVE_ENOMEM;
    return submit(a, j, (j->user = dup_s(user)) != NULL);
}

int archive_put_evicted(archive_t *a, const char *user, const archive_msg_t *msg,
                        const char *suffix, archive_put_cb cb, void *ud)
{
    job_t *j = job_new(a, J_PUT_EVICTED, (void *)cb, ud);
    if (!j)
        return a && a->closing ? ARCHIVE_ECLOSED : ARCHIVE_ENOMEM;
    return submit(a, j,
                  (j->user = dup_s(user)) && (j->suffix = dup_s(suffix)) && copy_msgs(j, msg, 1));
}

int archive_ack(archive_t *a, const archive_ack_t *req, store_items_cb cb, void *ud)
{
    job_t *j = job_new(a, J_ACK, (void *)cb, ud);
    if (!j)
        return a && a->closing ? ARCHIVE_ECLOSED : ARCHIVE_ENOMEM;
    bool ok = (j->user = dup_s(req->who->user)) && (j->device = dup_s(req->who->device)) &&
              (j->known = dup_s(req->known ? req->known : ""));
    if (ok && req->sids) {
        ok = (j->sids = calloc(req->n ? req->n : 1, sizeof *j->sids)) &&
             (j->receipt_ok = calloc(req->n ? req->n : 1, sizeof *j->receipt_ok));
        for (size_t i = 0; ok && i < req->n; i++) {
            j->n = i + 1;
            j->receipt_ok[i] = req->receipt_ok ? req->receipt_ok[i] : true;
            ok = (j->sids[i] = dup_s(req->sids[i])) != NULL;
        }
    } else if (ok) {
        ok = (j->origin = dup_s(req->origin ? req->origin : "")) != NULL;
    }
    return submit(a, j, ok);
}

int archive_summary(archive_t *a, const store_device_t *who, unsigned max, store_summary_cb cb,
                    void *ud)
{
    job_t *j = job_new(a, J_SUMMARY, (void *)cb, ud);
    if (!j)
        return a && a->closing ? ARCHIVE_ECLOSED : ARCHIVE_ENOMEM;
    j->max = max;
    return submit(a, j, (j->user = dup_s(who->user)) && (j->device = dup_s(who->device)));
}

int archive_fetch(archive_t *a, const store_device_t *who, uint64_t after_seq, unsigned max,
                  size_t max_bytes, size_t overhead, store_fetch_cb cb, void *ud)
{
    job_t *j = job_new(a, J_FETCH, (void *)cb, ud);
    if (!j)
        return a && a->closing ? ARCHIVE_ECLOSED : ARCHIVE_ENOMEM;
    j->after = after_seq;
    j->max = max ? max : 1;
    j->max_bytes = max_bytes;
    j->overhead = overhead;
    return submit(a, j, (j->user = dup_s(who->user)) && (j->device = dup_s(who->device)));
}

int archive_expire(archive_t *a, int64_t cutoff_ms, archive_count_cb cb, void *ud)
{
    job_t *j = job_new(a, J_EXPIRE, (void *)cb, ud);
    if (!j)
        return a && a->closing ? ARCHIVE_ECLOSED : ARCHIVE_ENOMEM;
    j->cutoff = cutoff_ms;
    return submit(a, j, true);
}

int archive_totals(archive_t *a, archive_totals_cb cb, void *ud)
{
    job_t *j = job_new(a, J_TOTALS, (void *)cb, ud);
    if (!j)
        return a && a->closing ? ARCHIVE_ECLOSED : ARCHIVE_ENOMEM;
    return submit(a, j, true);
}

/* ---- open / close -----------------------------------------------------------------------------
 */

int archive_schema_version(void)
{
    return SCHEMA_VERSION;
}

static int migrate(archive_t *a, char *err, size_t errlen)
{
    sqlite3_stmt *s;
    int version = -1;
    if (sqlite3_prepare_v2(a->db, "PRAGMA user_version", -1, &s, NULL) == SQLITE_OK &&
        sqlite3_step(s) == SQLITE_ROW)
        version = sqlite3_column_int(s, 0);
    sqlite3_finalize(s);
    if (version < 0) {
        snprintf(err, errlen, "cannot read the schema version: %s", sqlite3_errmsg(a->db));
        return -1;
    }
    if (version > SCHEMA_VERSION) {
        snprintf(err, errlen, "schema version %d is newer than this receiptd (%d)", version,
                 SCHEMA_VERSION);
        return -1;
    }
    for (int v = version; v < SCHEMA_VERSION; v++) {
        char bump[48];
        snprintf(bump, sizeof bump, "PRAGMA user_version = %d", v + 1);
        if (exec(a, "BEGIN IMMEDIATE") < 0 || exec(a, migrations[v]) < 0 || exec(a, bump) < 0 ||
            exec(a, "COMMIT") < 0) {
            snprintf(err, errlen, "migration to schema version %d failed: %s", v + 1,
                     sqlite3_errmsg(a->db));
            exec(a, "ROLLBACK");
            return -1;
        }
    }
    return 0;
}

int archive_open(uv_loop_t *loop, const char *path, archive_t **out, char *err, size_t errlen)
{
    archive_t *a = calloc(1, sizeof *a);
    if (!a) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    a->loop = loop;
    if (sqlite3_open_v2(path, &a->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL) !=
        SQLITE_OK) {
        snprintf(err, errlen, "cannot open %s: %s", path,
                 a->db ? sqlite3_errmsg(a->db) : "out of memory");
        goto fail;
    }
    /* Another process (receiptd --stats, an operator's sqlite3 shell) may hold a lock briefly. */
    sqlite3_busy_timeout(a->db, 5000);
    /* WAL: readers never block the archiver; FULL: a committed batch survives a power cut before
     * it is deleted from Redis. */
    if (exec(a, "PRAGMA journal_mode = WAL") < 0 || exec(a, "PRAGMA synchronous = FULL") < 0) {
        snprintf(err, errlen, "%s: %s", path, sqlite3_errmsg(a->db));
        goto fail;
    }
    if (migrate(a, err, errlen) < 0)
        goto fail;
    for (int i = 0; i < ST_COUNT_ALL; i++)
        if (sqlite3_prepare_v2(a->db, stmt_sql[i], -1, &a->st[i], NULL) != SQLITE_OK) {
            snprintf(err, errlen, "%s: %s", path, sqlite3_errmsg(a->db));
            goto fail;
        }
    *out = a;
    return 0;
fail:
    finish(a);
    return -1;
}

void archive_close(archive_t *a)
{
    if (!a || a->closing)
        return;
    a->closing = true;
    start_next(a); /* frees now if idle, else after the last queued job */
}
