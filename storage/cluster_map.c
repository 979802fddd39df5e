/* Redis Cluster routing without I/O (see cluster_map.h).
 *
 * Invariants: every m->slot[s] is -1 or the index of a used master entry below m->nnodes; the
 * node table never holds two used entries with the same host and port, and never grows past
 * CLUSTER_NODES_MAX. A refresh builds a complete copy (slot table and node table) before it
 * touches the map, so a malformed or partial reply, or a failed allocation, leaves the map as it
 * was: routing on a stale map only costs MOVED redirects, routing on a half-built one would send
 * commands to nodes that were never checked. */
#include "cluster_map.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ---- node table --------------------------------------------------------------------------- */

cluster_map_t *cluster_map_create(void)
{
    cluster_map_t *m = calloc(1, sizeof *m);
    if (!m)
        return NULL;
    for (unsigned s = 0; s < STORE_SLOTS; s++)
        m->slot[s] = -1;
    return m;
}

void cluster_map_free(cluster_map_t *m)
{
    if (m) {
        free(m->nodes);
        free(m);
    }
}

static int find_node(const cluster_node_t *nodes, int n, const char *host, int port)
{
    for (int i = 0; i < n; i++)
        if (nodes[i].used && nodes[i].port == port && strcasecmp(nodes[i].host, host) == 0)
            return i;
    return -1;
}

/* Makes room for entry n in nodes (and in the parallel array seen, when not NULL). */
static int reserve_nodes(cluster_node_t **nodes, bool **seen, int *cap, int n)
{
    if (n < *cap)
        return 0;
    if (n >= CLUSTER_NODES_MAX)
        return CLUSTER_EFULL;
    int ncap = *cap ? *cap * 2 : 8;
    if (ncap > CLUSTER_NODES_MAX)
        ncap = CLUSTER_NODES_MAX;
    cluster_node_t *nn = realloc(*nodes, (size_t)ncap * sizeof *nn);
    if (!nn)
        return CLUSTER_ENOMEM;
    *nodes = nn;
    if (seen) {
        bool *ns = realloc(*seen, (size_t)ncap * sizeof *ns);
        if (!ns)
            return CLUSTER_ENOMEM; /* *cap unchanged: the bigger nodes array is merely unused */
        *seen = ns;
    }
    *cap = ncap;
    return 0;
}

/* Returns the index of a free entry, reusing holes first so that indices stay small; the entry
 * is zeroed. A hole is an entry that is unused and, during a refresh, not a node of the old map
 * still waiting to be matched (those are used). */
static int alloc_node(cluster_node_t **nodes, bool **seen, int *n, int *cap)
{
    int i = 0;
    while (i < *n && (*nodes)[i].used)
        i++;
    if (i == *n) {
        int rc = reserve_nodes(nodes, seen, cap, *n);
        if (rc < 0)
            return rc;
        (*n)++;
    }
    memset(&(*nodes)[i], 0, sizeof **nodes);
    if (seen)
        (*seen)[i] = false;
    return i;
}

static bool host_ok(const char *host, size_t len)
{
    if (len == 0 || len >= CLUSTER_HOST_MAX)
        return false;
    for (size_t i = 0; i < len; i++)
        if (!isgraph((unsigned char)host[i]))
            return false;
    return true;
}

cluster_node_t *cluster_map_node(cluster_map_t *m, int i)
{
    return i >= 0 && i < m->nnodes && m->nodes[i].used ? &m->nodes[i] : NULL;
}

int cluster_map_find(const cluster_map_t *m, const char *host, int port)
{
    return find_node(m->nodes, m->nnodes, host, port);
}

int cluster_map_add_node(cluster_map_t *m, const char *host, int port, bool master)
{
    if (!host || !host_ok(host, strlen(host)) || port < 1 || port > 65535)
        return CLUSTER_EINVAL;
    int i = find_node(m->nodes, m->nnodes, host, port);
    if (i >= 0) {
        if (master && !m->nodes[i].master) {
            m->nodes[i].master = true;
            m->version++;
        }
        return i;
    }
    i = alloc_node(&m->nodes, NULL, &m->nnodes, &m->cap);
    if (i < 0)
        return i;
    cluster_node_t *nd = &m->nodes[i];
    strcpy(nd->host, host);
    nd->port = port;
    nd->master = master;
    nd->used = true;
    m->version++;
    return i;
}

/* ---- CLUSTER SLOTS ------------------------------------------------------------------------ */

typedef struct staging {
    cluster_node_t *nodes; /* starts as a copy of the map's, masters cleared */
    bool *seen;            /* per entry: the reply names this node */
    int n, cap;
} staging_t;

static bool is_str(const redisReply *r)
{
    return r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS;
}

/* Reads one [endpoint, port, id, metadata...] entry. Returns 1 with host, *port and id set, 0
 * when the node has no usable endpoint ("?": a hostname was preferred but never configured), or
 * CLUSTER_EINVAL. */
static int read_node(const redisReply *e, const char *from_host, char *host, int *port, char *id)
{
    if (e->type != REDIS_REPLY_ARRAY || e->elements < 2)
        return CLUSTER_EINVAL;
    const redisReply *ep = e->element[0], *pr = e->element[1];
    if (pr->type != REDIS_REPLY_INTEGER || pr->integer < 1 || pr->integer > 65535)
        return CLUSTER_EINVAL;
    /* NULL (Redis 7, cluster-preferred-endpoint-type unknown-endpoint) and "" (a node that does
     * not know its own address yet) both mean: where the reply came from. */
    if (ep->type == REDIS_REPLY_NIL || (is_str(ep) && ep->len == 0)) {
        if (!from_host || !host_ok(from_host, strlen(from_host)))
            return CLUSTER_EINVAL;
        strcpy(host, from_host);
    } else if (is_str(ep) && ep->len == 1 && ep->str[0] == '?') {
        return 0;
    } else if (is_str(ep) && host_ok(ep->str, ep->len)) {
        memcpy(host, ep->str, ep->len);
        host[ep->len] = '\0';
    } else {
        return CLUSTER_EINVAL;
    }
    *port = (int)pr->integer;
    id[0] = '\0';
    /* Before Redis 4 there was no id; it only helps a human reading a dump, so any oddity in it
     * leaves it empty rather than rejecting the reply. */
    if (e->elements > 2 && is_str(e->element[2]) && e->element[2]->len < CLUSTER_ID_MAX) {
        memcpy(id, e->element[2]->str, e->element[2]->len);
        id[e->element[2]->len] = '\0';
    }
    return 1;
}

static int staging_put(staging_t *st, const char *host, int port, const char *id, bool master)
{
    int i = find_node(st->nodes, st->n, host, port);
    if (i < 0) {
        i = alloc_node(&st->nodes, &st->seen, &st->n, &st->cap);
        if (i < 0)
            return i;
        strcpy(st->nodes[i].host, host);
        st->nodes[i].port = port;
        st->nodes[i].used = true;
    }
    st->seen[i] = true;
    if (master)
        st->nodes[i].master = true;
    if (id[0])
        strcpy(st->nodes[i].id, id);
    return i;
}

/* Fills slots and st from the reply; the map itself is not touched. */
static int read_slots(const redisReply *r, const char *from_host, int16_t *slots, staging_t *st)
{
    char host[CLUSTER_HOST_MAX], id[CLUSTER_ID_MAX];
    int port;
    /* There cannot be more ranges than slots: a longer reply is not CLUSTER SLOTS. */
    if (r->type != REDIS_REPLY_ARRAY || r->elements > STORE_SLOTS)
        return CLUSTER_EINVAL;
    for (size_t k = 0; k < r->elements; k++) {
        const redisReply *rg = r->element[k];
        if (rg->type != REDIS_REPLY_ARRAY || rg->elements < 3 ||
            rg->element[0]->type != REDIS_REPLY_INTEGER ||
            rg->element[1]->type != REDIS_REPLY_INTEGER)
            return CLUSTER_EINVAL;
        long long first = rg->element[0]->integer, last = rg->element[1]->integer;
        if (first < 0 || last < first || last >= STORE_SLOTS)
            return CLUSTER_EINVAL;
        for (size_t j = 2; j < rg->elements; j++) {
            int rc = read_node(rg->element[j], from_host, host, &port, id);
            if (rc < 0)
                return rc;
            if (rc == 0)
                continue; /* a master without an address leaves its range unserved */
            int i = staging_put(st, host, port, id, j == 2);
            if (i < 0)
                return i;
            if (j != 2)
                continue;
            for (long long s = first; s <= last; s++) {
                /* Two owners for one slot: a reply we cannot trust with any of them. */
                if (slots[s] != -1)
                    return CLUSTER_EINVAL;
                slots[s] = (int16_t)i;
            }
        }
    }
    return 0;
}

static bool node_differs(const cluster_node_t *a, const cluster_node_t *b)
{
    return a->used != b->used || a->master != b->master || a->port != b->port ||
           strcmp(a->host, b->host) != 0 || strcmp(a->id, b->id) != 0;
}

int cluster_map_from_slots(cluster_map_t *m, const redisReply *r, const char *from_host,
                           cluster_drop_cb drop, void *ud)
{
    staging_t st = {0};
    int16_t *slots = malloc(sizeof m->slot);
    int rc = CLUSTER_ENOMEM;
    if (!r) {
        rc = CLUSTER_EINVAL;
        goto out;
    }
    if (!slots)
        goto out;
    for (unsigned s = 0; s < STORE_SLOTS; s++)
        slots[s] = -1;
    if (m->nnodes > 0) {
        st.nodes = malloc((size_t)m->nnodes * sizeof *st.nodes);
        st.seen = calloc((size_t)m->nnodes, sizeof *st.seen);
        if (!st.nodes || !st.seen)
            goto out;
        memcpy(st.nodes, m->nodes, (size_t)m->nnodes * sizeof *st.nodes);
        st.n = st.cap = m->nnodes;
        for (int i = 0; i < st.n; i++)
            st.nodes[i].master = false; /* set again for each node the reply names as master */
    }
    rc = read_slots(r, from_host, slots, &st);
    if (rc < 0)
        goto out;

    bool changed = memcmp(slots, m->slot, sizeof m->slot) != 0 || st.n != m->nnodes;
    for (int i = 0; i < st.n && !changed; i++)
        changed = i >= m->nnodes || node_differs(&st.nodes[i], &m->nodes[i]) ||
                  (st.nodes[i].used && !st.seen[i]);
    free(m->nodes);
    m->nodes = st.nodes;
    m->cap = st.cap;
    m->nnodes = st.n;
    memcpy(m->slot, slots, sizeof m->slot);
    st.nodes = NULL;
    /* The new map is in place before drop runs, so that whatever the caller looks up from its
     * callback already routes around the node going away. */
    for (int i = 0; i < m->nnodes; i++) {
        if (m->nodes[i].used && !st.seen[i]) {
            if (drop)
                drop(ud, &m->nodes[i]);
            memset(&m->nodes[i], 0, sizeof m->nodes[i]);
        }
    }
    while (m->nnodes > 0 && !m->nodes[m->nnodes - 1].used)
        m->nnodes--;
    if (changed)
        m->version++;
    rc = 0;
out:
    free(slots);
    free(st.nodes);
    free(st.seen);
    return rc;
}

/* ---- routing ------------------------------------------------------------------------------ */

int cluster_map_node_for_slot(const cluster_map_t *m, unsigned slot)
{
    if (slot >= STORE_SLOTS || m->slot[slot] < 0)
        return CLUSTER_ENOROUTE;
    return m->slot[slot];
}

/* Where a command's keys are: argv[first], argv[first + step], ... up to argv[last] (-1: the
 * last argument). first 0: no keys. Only commands receiptd sends, or might plausibly send, are
 * here; an unknown one is an error rather than a guess, so a new command in store.c fails its
 * first test instead of landing on a random node. */
typedef struct cmd_keys {
    const char *name;
    signed char first, last, step;
} cmd_keys_t;

static const cmd_keys_t cmd_keys[] = {
    /* Without keys: any node answers for the cluster (or for itself, which the caller wants
     * when it sends one to every node, like SCRIPT LOAD). */
    {"AUTH", 0, 0, 0},
    {"ASKING", 0, 0, 0},
    {"CLIENT", 0, 0, 0},
    {"CLUSTER", 0, 0, 0},
    {"COMMAND", 0, 0, 0},
    {"CONFIG", 0, 0, 0},
    {"ECHO", 0, 0, 0},
    {"HELLO", 0, 0, 0},
    {"INFO", 0, 0, 0},
    {"PING", 0, 0, 0},
    {"READONLY", 0, 0, 0},
    {"READWRITE", 0, 0, 0},
    {"SCRIPT", 0, 0, 0},
    {"TIME", 0, 0, 0},
    /* One key, first argument. */
    {"DECR", 1, 1, 1},
    {"EXPIRE", 1, 1, 1},
    {"GET", 1, 1, 1},
    {"HDEL", 1, 1, 1},
    {"HGET", 1, 1, 1},
    {"HGETALL", 1, 1, 1},
    {"HINCRBY", 1, 1, 1},
    {"HLEN", 1, 1, 1},
    {"HMGET", 1, 1, 1},
    {"HSET", 1, 1, 1},
    {"INCR", 1, 1, 1},
    {"INCRBY", 1, 1, 1},
    {"PEXPIRE", 1, 1, 1},
    {"PTTL", 1, 1, 1},
    {"SADD", 1, 1, 1},
    {"SCARD", 1, 1, 1},
    {"SET", 1, 1, 1},
    {"SISMEMBER", 1, 1, 1},
    {"SMEMBERS", 1, 1, 1},
    {"SREM", 1, 1, 1},
    {"TTL", 1, 1, 1},
    {"TYPE", 1, 1, 1},
    {"ZADD", 1, 1, 1},
    {"ZCARD", 1, 1, 1},
    {"ZRANGE", 1, 1, 1},
    {"ZRANGEBYSCORE", 1, 1, 1},
    {"ZREM", 1, 1, 1},
    {"ZSCORE", 1, 1, 1},
    /* Several keys, all of which must share a slot. */
    {"DEL", 1, -1, 1},
    {"EXISTS", 1, -1, 1},
    {"MGET", 1, -1, 1},
    {"MSET", 1, -1, 2},
    {"UNLINK", 1, -1, 1},
};

static bool word_is(const char *s, size_t len, const char *word)
{
    return strlen(word) == len && strncasecmp(s, word, len) == 0;
}

/* Reads a non-negative decimal of at most 9 digits, or returns -1. */
static long read_count(const char *s, size_t len)
{
    long v = 0;
    if (len == 0 || len > 9)
        return -1;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v;
}

/* Returns 1 with *slot set to the slot of every key argv[first .. last] (step apart), or
 * CLUSTER_ECROSSSLOT. */
static int keys_slot(const char **argv, const size_t *lens, int first, int last, int step,
                     unsigned *slot)
{
    for (int i = first; i <= last; i += step) {
        size_t len = lens ? lens[i] : strlen(argv[i]);
        unsigned s = store_key_slot(argv[i], len);
        if (i == first)
            *slot = s;
        else if (s != *slot)
            return CLUSTER_ECROSSSLOT;
    }
    return 1;
}

int cluster_command_slot(int argc, const char **argv, const size_t *lens, unsigned *slot)
{
    if (argc < 1)
        return CLUSTER_EINVAL;
    size_t len0 = lens ? lens[0] : strlen(argv[0]);
    /* Scripts: "EVALSHA sha numkeys key... arg...". Redis itself refuses keys in several slots
     * with CROSSSLOT, but only in cluster mode; checking here too catches a script that breaks
     * the one-slot rule (storage/SCHEMA.md) against a single Redis as well. */
    if (word_is(argv[0], len0, "EVALSHA") || word_is(argv[0], len0, "EVAL") ||
        word_is(argv[0], len0, "EVALSHA_RO") || word_is(argv[0], len0, "EVAL_RO") ||
        word_is(argv[0], len0, "FCALL") || word_is(argv[0], len0, "FCALL_RO")) {
        if (argc < 3)
            return CLUSTER_EINVAL;
        long nkeys = read_count(argv[2], lens ? lens[2] : strlen(argv[2]));
        if (nkeys < 0 || nkeys > argc - 3)
            return CLUSTER_EINVAL;
        if (nkeys == 0)
            return 0;
        return keys_slot(argv, lens, 3, 3 + (int)nkeys - 1, 1, slot);
    }
    for (size_t k = 0; k < sizeof cmd_keys / sizeof cmd_keys[0]; k++) {
        const cmd_keys_t *c = &cmd_keys[k];
        if (!word_is(argv[0], len0, c->name))
            continue;
        if (c->first == 0)
            return 0;
        int last = c->last < 0 ? argc - 1 : c->last;
        if (last >= argc || c->first > last)
            return CLUSTER_EINVAL;
        return keys_slot(argv, lens, c->first, last, c->step, slot);
    }
    return CLUSTER_EUNKNOWN;
}

int cluster_map_node_for_command(const cluster_map_t *m, int argc, const char **argv,
                                 const size_t *lens)
{
    unsigned slot;
    int rc = cluster_command_slot(argc, argv, lens, &slot);
    if (rc < 0)
        return rc;
    if (rc == 1)
        return cluster_map_node_for_slot(m, slot);
    for (int i = 0; i < m->nnodes; i++)
        if (m->nodes[i].used && m->nodes[i].master)
            return i;
    return CLUSTER_ENOROUTE;
}

/* ---- redirects ---------------------------------------------------------------------------- */

/* Splits "host:port", "[v6]:port" or "v6:port" at the last colon: Redis writes IPv6 endpoints
 * in MOVED without brackets ("MOVED 3999 ::1:7001"). With cport, a trailing "@cport" (the bus
 * port of CLUSTER NODES' form) is accepted and ignored. The host may come out empty; the caller
 * decides whether that is allowed. */
static int parse_hostport(const char *s, size_t len, char *host, int *port, bool cport)
{
    const char *end = s + len;
    const char *at = cport ? memchr(s, '@', len) : NULL;
    if (at) {
        if (read_count(at + 1, (size_t)(end - at - 1)) < 0)
            return CLUSTER_EINVAL;
        end = at;
    }
    const char *colon = NULL;
    for (const char *p = s; p < end; p++)
        if (*p == ':')
            colon = p;
    if (!colon)
        return CLUSTER_EINVAL;
    long p = read_count(colon + 1, (size_t)(end - colon - 1));
    if (p < 1 || p > 65535)
        return CLUSTER_EINVAL;
    const char *h = s;
    size_t hlen = (size_t)(colon - s);
    if (hlen > 0 && h[0] == '[') {
        if (hlen < 3 || h[hlen - 1] != ']')
            return CLUSTER_EINVAL;
        h++;
        hlen -= 2;
    }
    if (hlen > 0 && !host_ok(h, hlen))
        return CLUSTER_EINVAL;
    memcpy(host, h, hlen);
    host[hlen] = '\0';
    *port = (int)p;
    return 0;
}

int cluster_parse_redirect(const char *err, size_t len, cluster_redirect_t *out)
{
    out->kind = CLUSTER_REPLY_OTHER;
    out->slot = 0;
    out->host[0] = '\0';
    out->port = 0;
    if (!err)
        return CLUSTER_REPLY_OTHER;
    if (len > 0 && err[0] == '-') {
        err++;
        len--;
    }
    const char *sp = memchr(err, ' ', len);
    size_t wlen = sp ? (size_t)(sp - err) : len;
    if (word_is(err, wlen, "TRYAGAIN"))
        out->kind = CLUSTER_REPLY_TRYAGAIN;
    else if (word_is(err, wlen, "CLUSTERDOWN"))
        out->kind = CLUSTER_REPLY_DOWN;
    else if (word_is(err, wlen, "LOADING"))
        out->kind = CLUSTER_REPLY_LOADING;
    else if (word_is(err, wlen, "MOVED"))
        out->kind = CLUSTER_REPLY_MOVED;
    else if (word_is(err, wlen, "ASK"))
        out->kind = CLUSTER_REPLY_ASK;
    if (out->kind != CLUSTER_REPLY_MOVED && out->kind != CLUSTER_REPLY_ASK)
        return (int)out->kind;

    /* "MOVED <slot> <endpoint>:<port>", exactly one space apart. */
    if (!sp)
        goto bad;
    const char *s = sp + 1, *end = err + len;
    const char *sp2 = memchr(s, ' ', (size_t)(end - s));
    if (!sp2)
        goto bad;
    long slot = read_count(s, (size_t)(sp2 - s));
    if (slot < 0 || slot >= STORE_SLOTS)
        goto bad;
    if (parse_hostport(sp2 + 1, (size_t)(end - sp2 - 1), out->host, &out->port, true) < 0)
        goto bad;
    /* "?": the node prefers hostnames but has none; there is nowhere to send the command. */
    if (strcmp(out->host, "?") == 0)
        goto bad;
    out->slot = (unsigned)slot;
    return (int)out->kind;
bad:
    out->kind = CLUSTER_REPLY_OTHER;
    out->host[0] = '\0';
    out->port = 0;
    return CLUSTER_EINVAL;
}

bool cluster_reply_is_retryable(cluster_reply_kind_t kind)
{
    return kind != CLUSTER_REPLY_OTHER;
}

int cluster_map_apply_moved(cluster_map_t *m, const cluster_redirect_t *rd, const char *from_host)
{
    if (rd->kind != CLUSTER_REPLY_MOVED || rd->slot >= STORE_SLOTS)
        return CLUSTER_EINVAL;
    const char *host = rd->host[0] ? rd->host : from_host;
    int i = cluster_map_add_node(m, host, rd->port, true);
    if (i < 0)
        return i;
    if (m->slot[rd->slot] != i) {
        m->slot[rd->slot] = (int16_t)i;
        m->version++;
    }
    return i;
}

/* ---- seeds -------------------------------------------------------------------------------- */

int cluster_parse_seeds(const char *s, cluster_seed_t *seeds, size_t max, size_t *n)
{
    size_t count = 0;
    int rc = 0;
    *n = 0;
    if (max > CLUSTER_SEEDS_MAX)
        max = CLUSTER_SEEDS_MAX;
    for (;;) {
        const char *comma = strchr(s, ',');
        const char *b = s, *e = comma ? comma : s + strlen(s);
        while (b < e && isspace((unsigned char)*b))
            b++;
        while (e > b && isspace((unsigned char)e[-1]))
            e--;
        if (b == e)
            return CLUSTER_EINVAL; /* an empty entry: "", "a:1,,b:2" or a trailing comma */
        if (count == max)
            return CLUSTER_EFULL;
        cluster_seed_t *sd = &seeds[count];
        rc = parse_hostport(b, (size_t)(e - b), sd->host, &sd->port, false);
        if (rc < 0 || !sd->host[0])
            return CLUSTER_EINVAL;
        for (size_t i = 0; i < count; i++)
            if (seeds[i].port == sd->port && strcasecmp(seeds[i].host, sd->host) == 0)
                return CLUSTER_EINVAL;
        count++;
        if (!comma)
            break;
        s = comma + 1;
    }
    *n = count;
    return 0;
}

const char *cluster_strerror(int err)
{
    switch (err) {
    case 0:
        return "success";
    case CLUSTER_EINVAL:
        return "malformed input";
    case CLUSTER_ENOMEM:
        return "out of memory";
    case CLUSTER_ENOROUTE:
        return "no node serves the slot";
    case CLUSTER_ECROSSSLOT:
        return "keys in more than one slot";
    case CLUSTER_EUNKNOWN:
        return "command unknown to the cluster router";
    case CLUSTER_EFULL:
        return "too many nodes or seeds";
    }
    return "unknown error";
}
