/* receiptd --stats. Redis is read with a plain blocking hiredis connection (SCAN over the
 * per-user queue keys, so it is proportional to the number of users, and fine for an operator's
 * occasional look; on a cluster, every master in turn); the archive is read through
 * storage/archive on a private loop. */
#include "stats.h"

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <string.h>

#include "archive.h"
#include "cluster_map.h"

typedef struct tier {
    uint64_t users, messages, bytes, evicted;
    int err;
} tier_t;

static redisContext *redis_open(const config_t *cfg, const char *host, int port)
{
    struct timeval tv = {5, 0};
    redisContext *c = cfg->redis_socket && !host
                          ? redisConnectUnixWithTimeout(cfg->redis_socket, tv)
                          : redisConnectWithTimeout(host ? host : cfg->redis_host,
                                                    host ? port : cfg->redis_port, tv);
    if (!c || c->err) {
        fprintf(stderr, "receiptd: --stats: Redis: %s\n", c ? c->errstr : "out of memory");
        if (c)
            redisFree(c);
        return NULL;
    }
    if (cfg->redis_password) {
        redisReply *r = redisCommand(c, "AUTH %s", cfg->redis_password);
        bool ok = r && r->type != REDIS_REPLY_ERROR;
        freeReplyObject(r);
        if (!ok) {
            fprintf(stderr, "receiptd: --stats: Redis refused AUTH\n");
            redisFree(c);
            return NULL;
        }
    }
    return c;
}

/* Adds what the node behind c holds to t; returns -1 when a command failed. */
static int scan_node(redisContext *c, tier_t *t)
{
    char cursor[32] = "0";
    do {
        redisReply *r = redisCommand(c, "SCAN %s MATCH rd:{*}:q COUNT 1000", cursor);
        if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
            fprintf(stderr, "receiptd: --stats: Redis SCAN failed\n");
            freeReplyObject(r);
            return -1;
        }
        snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
        for (size_t i = 0; i < r->element[1]->elements; i++) {
            const char *key = r->element[1]->element[i]->str;
            redisReply *n = redisCommand(c, "ZCARD %s", key);
            redisReply *b = redisCommand(c, "GET %s%s", key, "b");
            if (n && n->type == REDIS_REPLY_INTEGER && n->integer > 0) {
                t->users++;
                t->messages += (uint64_t)n->integer;
                if (b && b->type == REDIS_REPLY_STRING)
                    t->bytes += strtoull(b->str, NULL, 10);
            }
            freeReplyObject(n);
            freeReplyObject(b);
        }
        freeReplyObject(r);
    } while (strcmp(cursor, "0") != 0);
    return 0;
}

/* A cluster: the first seed that answers CLUSTER SLOTS names the masters; each is scanned. */
static void cluster_totals(const config_t *cfg, tier_t *t)
{
    cluster_seed_t seeds[CLUSTER_SEEDS_MAX];
    size_t nseeds = 0;
    cluster_map_t *m = cluster_map_create();
    bool have = false;
    t->err = 1;
    if (!m || cluster_parse_seeds(cfg->redis_cluster, seeds, CLUSTER_SEEDS_MAX, &nseeds) < 0) {
        cluster_map_free(m);
        return;
    }
    for (size_t i = 0; i < nseeds && !have; i++) {
        redisContext *c = redis_open(cfg, seeds[i].host, seeds[i].port);
        redisReply *r = c ? redisCommand(c, "CLUSTER SLOTS") : NULL;
        have = r && cluster_map_from_slots(m, r, seeds[i].host, NULL, NULL) == 0;
        freeReplyObject(r);
        if (c)
            redisFree(c);
    }
    if (have) {
        t->err = 0;
        for (int i = 0; i < m->nnodes && !t->err; i++) {
            cluster_node_t *n = cluster_map_node(m, i);
            if (!n || !n->master)
                continue;
            redisContext *c = redis_open(cfg, n->host, n->port);
            if (!c || scan_node(c, t) < 0)
                t->err = 1;
            if (c)
                redisFree(c);
        }
    } else {
        fprintf(stderr, "receiptd: --stats: no seed of the Redis Cluster answered CLUSTER SLOTS\n");
    }
    cluster_map_free(m);
}

static tier_t redis_totals(const config_t *cfg)
{
    tier_t t = {0};
    if (cfg->redis_cluster) {
        cluster_totals(cfg, &t);
        return t;
    }
    redisContext *c = redis_open(cfg, NULL, 0);
    if (!c || scan_node(c, &t) < 0)
        t.err = 1;
    if (c)
        redisFree(c);
    return t;
}

static void on_totals(void *ud, int err, const archive_totals_t *tot)
{
    tier_t *t = ud;
    t->err = err ? 1 : 0;
    if (!err)
        *t = (tier_t){tot->users, tot->messages, tot->bytes, tot->evicted, 0};
}

static tier_t sqlite_totals(const config_t *cfg)
{
    tier_t t = {.err = 1};
    uv_loop_t loop;
    archive_t *a;
    char err[512];
    uv_loop_init(&loop);
    if (archive_open(&loop, cfg->sqlite_path, &a, err, sizeof err) < 0) {
        fprintf(stderr, "receiptd: --stats: %s\n", err);
    } else {
        if (archive_totals(a, on_totals, &t) < 0)
            fprintf(stderr, "receiptd: --stats: out of memory\n");
        archive_close(a);
        uv_run(&loop, UV_RUN_DEFAULT);
    }
    uv_loop_close(&loop);
    return t;
}

int stats_print(const config_t *cfg, FILE *out)
{
    tier_t r = redis_totals(cfg), s = sqlite_totals(cfg);
    fprintf(out, "%-8s %12s %12s %14s\n", "tier", "users", "messages", "bytes");
    if (!r.err)
        fprintf(out, "%-8s %12" PRIu64 " %12" PRIu64 " %14" PRIu64 "\n", "redis", r.users,
                r.messages, r.bytes);
    if (!s.err)
        fprintf(out, "%-8s %12" PRIu64 " %12" PRIu64 " %14" PRIu64 "\n", "sqlite", s.users,
                s.messages, s.bytes);
    if (!s.err)
        fprintf(out, "evicted users (all their state in SQLite): %" PRIu64 "\n", s.evicted);
    return r.err || s.err ? 1 : 0;
}
