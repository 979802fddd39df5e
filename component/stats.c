/* receiptd --stats. Redis is read with a plain blocking hiredis connection (SCAN over the
 * per-user queue keys, so it is proportional to the number of users, and fine for an operator's
 * occasional look); the archive is read through storage/archive on a private loop. */
#include "stats.h"

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <string.h>

#include "archive.h"

typedef struct tier {
    uint64_t users, messages, bytes, evicted;
    int err;
} tier_t;

static redisContext *redis_open(const config_t *cfg)
{
    struct timeval tv = {5, 0};
    redisContext *c = cfg->redis_socket ? redisConnectUnixWithTimeout(cfg->redis_socket, tv)
                                        : redisConnectWithTimeout(cfg->redis_host, cfg->redis_port,
                                                                  tv);
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

static tier_t redis_totals(const config_t *cfg)
{
    tier_t t = {0};
    redisContext *c = redis_open(cfg);
    if (!c) {
        t.err = 1;
        return t;
    }
    char cursor[32] = "0";
    do {
        redisReply *r = redisCommand(c, "SCAN %s MATCH rd:{*}:q COUNT 1000", cursor);
        if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
            fprintf(stderr, "receiptd: --stats: Redis SCAN failed\n");
            freeReplyObject(r);
            t.err = 1;
            break;
        }
        snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
        for (size_t i = 0; i < r->element[1]->elements; i++) {
            const char *key = r->element[1]->element[i]->str;
            redisReply *n = redisCommand(c, "ZCARD %s", key);
            redisReply *b = redisCommand(c, "GET %s%s", key, "b");
            if (n && n->type == REDIS_REPLY_INTEGER && n->integer > 0) {
                t.users++;
                t.messages += (uint64_t)n->integer;
                if (b && b->type == REDIS_REPLY_STRING)
                    t.bytes += strtoull(b->str, NULL, 10);
            }
            freeReplyObject(n);
            freeReplyObject(b);
        }
        freeReplyObject(r);
    } while (strcmp(cursor, "0") != 0);
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
