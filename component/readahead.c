/* Read-ahead of offline pages; the rules for when a page read ahead may be given out are in
 * readahead.h. A slot holds one page of one device: a read under way (PENDING, possibly with the
 * device's fetch already waiting for it) or a page that arrived (READY). A device paging through
 * its queue has a chain of up to READAHEAD_DEPTH slots, each starting where the one before ends:
 * with only the next page read ahead, its read would queue in Redis behind the ack of the page
 * before and the client's fetch would still wait for it. Reads carry the slot's generation, so
 * the answer of a read whose slot was given away meanwhile is dropped. */
#include <stdlib.h>
#include <string.h>

#include "daemon.h"
#include "items.h"
#include "readahead.h"
#include "tiers.h"

enum { SLOT_EMPTY, SLOT_PENDING, SLOT_READY };

typedef struct slot {
    int state;
    bool stale;   /* forgotten while its read was under way */
    uint64_t gen; /* the read this slot waits for */
    char *user, *device;
    uint64_t after;
    unsigned max;
    size_t max_bytes, overhead;
    int64_t at_ms;     /* when the read was sent */
    store_fetch_cb cb; /* the device's fetch, waiting for the read */
    void *ud;
    bool archived;
    char *cursor;
    items_t items;
} slot_t;

struct readahead {
    slot_t slot[READAHEAD_SLOTS];
    uint64_t gen;
};

/* What a chain of pages is read with: the device and the fetch's limits. */
typedef struct chain {
    const char *user, *device;
    unsigned max;
    size_t max_bytes, overhead;
} chain_t;

typedef struct read_ctx {
    daemon_t *d;
    slot_t *slot;
    uint64_t gen;
} read_ctx_t;

/* A fetch that no page read ahead could answer: it goes to the tiers, and its answer, when it
 * is not the last page, starts the chain after it. */
typedef struct ask_ctx {
    daemon_t *d;
    char *user, *device;
    unsigned max;
    size_t max_bytes, overhead;
    store_fetch_cb cb;
    void *ud;
} ask_ctx_t;

readahead_t *readahead_new(void)
{
    return calloc(1, sizeof(readahead_t));
}

static void slot_clear(slot_t *s)
{
    free(s->cursor);
    items_free(&s->items);
    free(s->user);
    free(s->device);
    *s = (slot_t){.state = SLOT_EMPTY};
}

void readahead_free(readahead_t *ra)
{
    if (!ra)
        return;
    for (size_t i = 0; i < READAHEAD_SLOTS; i++)
        slot_clear(&ra->slot[i]);
    free(ra);
}

static bool slot_of(const slot_t *s, const char *user, const char *device)
{
    return s->state != SLOT_EMPTY && strcmp(s->user, user) == 0 && strcmp(s->device, device) == 0;
}

static bool slot_fits(const slot_t *s, const chain_t *c)
{
    return s->max == c->max && s->max_bytes == c->max_bytes && s->overhead == c->overhead;
}

/* The device's slot for the page after `after`, read with c's limits. */
static slot_t *slot_find(readahead_t *ra, const chain_t *c, uint64_t after)
{
    for (size_t i = 0; i < READAHEAD_SLOTS; i++) {
        slot_t *s = &ra->slot[i];
        if (slot_of(s, c->user, c->device) && s->after == after && slot_fits(s, c))
            return s;
    }
    return NULL;
}

static size_t slot_count(const readahead_t *ra, const chain_t *c)
{
    size_t n = 0;
    for (size_t i = 0; i < READAHEAD_SLOTS; i++)
        n += slot_of(&ra->slot[i], c->user, c->device);
    return n;
}

/* A slot for a new read: an empty one, else the oldest nobody waits for. */
static slot_t *slot_pick(readahead_t *ra)
{
    slot_t *best = NULL;
    for (size_t i = 0; i < READAHEAD_SLOTS; i++) {
        slot_t *s = &ra->slot[i];
        if (s->state == SLOT_EMPTY)
            return s;
        if (!s->cb && (!best || s->at_ms < best->at_ms))
            best = s;
    }
    return best;
}

static void on_read(void *ud, int err, bool complete, const char *cursor, const store_item_t *items,
                    size_t n, bool archived);

/* Sends the read of the page after `after` for c's device into a free slot. */
static void read_start(daemon_t *d, const chain_t *c, uint64_t after)
{
    slot_t *s = slot_pick(d->readahead);
    if (!s)
        return;
    /* Copied before the slot is cleared: c may point into it. */
    char *user = items_dup(c->user, strlen(c->user));
    char *device = items_dup(c->device, strlen(c->device));
    read_ctx_t *rc = malloc(sizeof *rc);
    slot_clear(s);
    s->user = user;
    s->device = device;
    if (!rc || !s->user || !s->device) {
        free(rc);
        slot_clear(s);
        return;
    }
    s->state = SLOT_PENDING;
    s->after = after;
    s->max = c->max;
    s->max_bytes = c->max_bytes;
    s->overhead = c->overhead;
    s->gen = ++d->readahead->gen;
    s->at_ms = daemon_now_ms();
    *rc = (read_ctx_t){d, s, s->gen};
    store_device_t who = {s->user, s->device, s->at_ms};
    /* Two pages' worth in one call: the second page's read cannot start before the first's
     * cursor is known, and each read waits in Redis behind the acks sent before it. */
    if (tiers_fetch(d, &who, after, 2 * s->max, 2 * s->max_bytes, s->overhead, on_read, rc) < 0) {
        free(rc);
        slot_clear(s);
    }
}

/* The device has (or will have) everything up to `after`: makes sure the pages after it are
 * being read, READAHEAD_DEPTH of them, following the chain of pages already there. */
static void chain_extend(daemon_t *d, const chain_t *c, uint64_t after)
{
    while (slot_count(d->readahead, c) < READAHEAD_DEPTH) {
        slot_t *s = slot_find(d->readahead, c, after);
        if (!s) {
            read_start(d, c, after);
            return;
        }
        if (s->state != SLOT_READY)
            return; /* its answer extends the chain */
        after = items_seq_of(s->cursor);
    }
}

static int ask_start(daemon_t *d, const store_device_t *who, uint64_t after, unsigned max,
                     size_t max_bytes, size_t overhead, store_fetch_cb cb, void *ud);

/* A page as a fetch with the slot's limits would cut it from the front of a longer read: up to
 * max messages within the byte budget, at least one; the read's own end when it takes all. */
typedef struct page {
    const store_item_t *items;
    size_t n;
    bool complete;
    const char *cursor;
} page_t;

static page_t page_cut(const slot_t *s, const store_item_t *items, size_t n, bool complete,
                       const char *cursor)
{
    size_t k = items_fit(items, n, s->max, s->max_bytes, s->overhead);
    if (k == n)
        return (page_t){items, n, complete || !cursor, cursor};
    return (page_t){items, k, false, items[k - 1].sid};
}

/* Keeps a page that is not the last, for the device's fetch after `after`. */
static void page_keep(daemon_t *d, const chain_t *c, uint64_t after, const page_t *p, bool archived,
                      int64_t at_ms)
{
    slot_t *s = slot_pick(d->readahead);
    if (!s)
        return;
    slot_clear(s);
    *s = (slot_t){.state = SLOT_READY,
                  .after = after,
                  .max = c->max,
                  .max_bytes = c->max_bytes,
                  .overhead = c->overhead,
                  .at_ms = at_ms,
                  .archived = archived};
    s->user = items_dup(c->user, strlen(c->user));
    s->device = items_dup(c->device, strlen(c->device));
    s->cursor = items_dup(p->cursor, strlen(p->cursor));
    if (!s->user || !s->device || !s->cursor || items_add(&s->items, p->items, p->n) < 0)
        slot_clear(s);
}

/* A read brings two pages' worth (read_start): the first goes to the fetch waiting for it or is
 * kept, the second is kept, and the chain goes on after them. */
static void on_read(void *ud, int err, bool complete, const char *cursor, const store_item_t *items,
                    size_t n, bool archived)
{
    read_ctx_t *rc = ud;
    daemon_t *d = rc->d;
    slot_t *s = rc->slot;
    bool mine = s->state == SLOT_PENDING && s->gen == rc->gen;
    free(rc);
    if (!mine)
        return; /* the slot went to another read meanwhile */
    store_fetch_cb cb = s->cb;
    void *cb_ud = s->ud;
    s->cb = NULL;
    if (err) {
        slot_clear(s);
        if (cb)
            cb(cb_ud, err, false, NULL, NULL, 0, false);
        return;
    }
    page_t p1 = page_cut(s, items, n, complete, cursor), p2 = p1;
    if (cb && (s->stale || p1.complete)) {
        /* Read again for the waiting fetch: the device acked into these pages while they were
         * read, or this is the last page and was read before the fetch came, so messages stored
         * in between would be missing from it. */
        slot_t was = *s;
        /* The slot is free before the read: its answer may start reads that need a slot. */
        *s = (slot_t){.state = SLOT_EMPTY};
        store_device_t who = {was.user, was.device, daemon_now_ms()};
        int ret = ask_start(d, &who, was.after, was.max, was.max_bytes, was.overhead, cb, cb_ud);
        slot_clear(&was);
        if (ret < 0)
            cb(cb_ud, ret, false, NULL, NULL, 0, false);
        return;
    }
    if (s->stale) {
        slot_clear(s);
        return;
    }
    bool two = p1.n < n;
    if (two)
        p2 = page_cut(s, items + p1.n, n - p1.n, complete, cursor);
    char *user = items_dup(s->user, strlen(s->user));
    char *device = items_dup(s->device, strlen(s->device));
    chain_t c = {user, device, s->max, s->max_bytes, s->overhead};
    uint64_t after = s->after;
    int64_t at_ms = s->at_ms;
    slot_clear(s);
    if (cb) {
        d->stats.read_ahead++;
        cb(cb_ud, 0, p1.complete, p1.cursor, p1.items, p1.n, archived);
    }
    if (user && device) {
        /* A last page is never kept: a message stored since would be missing from it. */
        if (!cb && !p1.complete)
            page_keep(d, &c, after, &p1, archived, at_ms);
        if (two && !p2.complete)
            page_keep(d, &c, items_seq_of(p1.cursor), &p2, archived, at_ms);
        if (!p2.complete)
            chain_extend(d, &c, items_seq_of(p1.cursor));
    }
    free(user);
    free(device);
}

static void on_ask(void *ud, int err, bool complete, const char *cursor, const store_item_t *items,
                   size_t n, bool archived)
{
    ask_ctx_t *a = ud;
    a->cb(a->ud, err, complete, cursor, items, n, archived);
    if (!err && !complete && cursor && a->d->readahead) {
        chain_t c = {a->user, a->device, a->max, a->max_bytes, a->overhead};
        chain_extend(a->d, &c, items_seq_of(cursor));
    }
    free(a->user);
    free(a->device);
    free(a);
}

static int ask_start(daemon_t *d, const store_device_t *who, uint64_t after, unsigned max,
                     size_t max_bytes, size_t overhead, store_fetch_cb cb, void *ud)
{
    const char *device = who->device ? who->device : "";
    ask_ctx_t *a = calloc(1, sizeof *a);
    if (!a)
        return STORE_ENOMEM;
    *a = (ask_ctx_t){d,
                     items_dup(who->user, strlen(who->user)),
                     items_dup(device, strlen(device)),
                     max,
                     max_bytes,
                     overhead,
                     cb,
                     ud};
    int rc = a->user && a->device ? tiers_fetch(d, who, after, max, max_bytes, overhead, on_ask, a)
                                  : STORE_ENOMEM;
    if (rc < 0) {
        free(a->user);
        free(a->device);
        free(a);
    }
    return rc;
}

int readahead_fetch(daemon_t *d, const store_device_t *who, uint64_t after_seq, unsigned max,
                    size_t max_bytes, size_t overhead, store_fetch_cb cb, void *ud)
{
    readahead_t *ra = d->readahead;
    if (!ra)
        return tiers_fetch(d, who, after_seq, max, max_bytes, overhead, cb, ud);
    int64_t now = daemon_now_ms();
    for (size_t i = 0; i < READAHEAD_SLOTS; i++) {
        slot_t *s = &ra->slot[i];
        if (s->state == SLOT_READY && now - s->at_ms > READAHEAD_TTL_MS)
            slot_clear(s);
    }
    chain_t c = {who->user, who->device ? who->device : "", max, max_bytes, overhead};
    slot_t *s = slot_find(ra, &c, after_seq);
    if (!s || s->stale || s->cb)
        return ask_start(d, who, after_seq, max, max_bytes, overhead, cb, ud);
    if (s->state == SLOT_PENDING) {
        s->cb = cb;
        s->ud = ud;
        return 0;
    }
    d->stats.read_ahead++;
    cb(ud, 0, false, s->cursor, s->items.v, s->items.n, s->archived);
    uint64_t next = items_seq_of(s->cursor);
    slot_clear(s);
    chain_extend(d, &c, next);
    return 0;
}

void readahead_forget(daemon_t *d, const char *user, const char *device, const char *const *sids,
                      size_t n)
{
    if (!d->readahead)
        return;
    /* n = 0: the acked message's place is unknown, so every page of the device may hold it. */
    uint64_t last = n ? 0 : UINT64_MAX;
    for (size_t i = 0; i < n; i++) {
        uint64_t seq = items_seq_of(sids[i]);
        if (seq > last)
            last = seq;
    }
    for (size_t i = 0; i < READAHEAD_SLOTS; i++) {
        slot_t *s = &d->readahead->slot[i];
        if (!slot_of(s, user, device ? device : "") || last <= s->after)
            continue;
        if (s->state == SLOT_PENDING)
            s->stale = true; /* its answer is dropped, or read again for a fetch waiting on it */
        else
            slot_clear(s);
    }
}
