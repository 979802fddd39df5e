/* Config keys form one table: section, key, kind, bounds, where the value goes. A key is either
 * in the table or an error, so a typo in component.ini never silently falls back to a default. */
#include "config.h"

#include <errno.h>
#include <ini.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cluster_map.h"
#include "jid.h"

typedef enum { K_STR, K_PORT, K_UINT, K_SECONDS, K_DOMAINS, K_LEVEL } kind_t;

typedef struct key {
    const char *section, *name;
    kind_t kind;
    uint64_t min, max;
    size_t offset;
} key_t_;

#define OFF(f) offsetof(config_t, f)
static const key_t_ keys[] = {
    {"component", "jid", K_STR, 0, 0, OFF(jid)},
    {"component", "secret", K_STR, 0, 0, OFF(secret)},
    {"component", "server_host", K_STR, 0, 0, OFF(server_host)},
    {"component", "server_port", K_PORT, 1, 65535, OFF(server_port)},
    {"component", "user_domains", K_DOMAINS, 0, 0, 0},
    {"component", "log_level", K_LEVEL, 0, 0, OFF(log_level)},
    {"redis", "host", K_STR, 0, 0, OFF(redis_host)},
    {"redis", "port", K_PORT, 1, 65535, OFF(redis_port)},
    {"redis", "socket", K_STR, 0, 0, OFF(redis_socket)},
    {"redis", "password", K_STR, 0, 0, OFF(redis_password)},
    {"redis", "max_inflight", K_UINT, 1, 1000000, OFF(redis_max_inflight)},
    {"redis", "timeout", K_SECONDS, 100, 3600000, OFF(redis_timeout_ms)},
    {"redis", "cluster", K_STR, 0, 0, OFF(redis_cluster)},
    {"redis", "wait_replicas", K_UINT, 0, 16, OFF(redis_wait_replicas)},
    {"redis", "wait_timeout", K_SECONDS, 10, 600000, OFF(redis_wait_timeout_ms)},
    {"sqlite", "path", K_STR, 0, 0, OFF(sqlite_path)},
    {"sqlite", "archive_after", K_SECONDS, 10, 86400000ull * 3650, OFF(archive_after_ms)},
    {"sqlite", "evict_after", K_SECONDS, 10, 86400000ull * 3650, OFF(evict_after_ms)},
    {"sqlite", "retention_days", K_UINT, 0, 36500, OFF(retention_days)},
    {"delivery", "retry_interval", K_SECONDS, 10, 86400000, OFF(retry_ms)},
    {"delivery", "delivery_window", K_SECONDS, 10, 86400000 * 30ull, OFF(window_ms)},
    {"delivery", "dedupe_window", K_UINT, 1, 86400 * 365, OFF(dedupe_s)},
    {"delivery", "fetch_max", K_UINT, 1, 10000, OFF(fetch_max)},
    {"delivery", "fetch_max_bytes", K_UINT, 1024, 64ull << 20, OFF(fetch_max_bytes)},
    {"delivery", "max_offline_messages", K_UINT, 1, 1ull << 40, OFF(max_offline_messages)},
    {"delivery", "max_offline_bytes", K_UINT, 1, 1ull << 50, OFF(max_offline_bytes)},
    {"delivery", "max_stanza_bytes", K_UINT, 1024, 64ull << 20, OFF(max_stanza_bytes)},
};

/* Integer fields are of different widths; store through the right one. */
static void store_uint(config_t *cfg, size_t off, uint64_t v)
{
    char *p = (char *)cfg + off;
    if (off == OFF(redis_max_inflight) || off == OFF(fetch_max) || off == OFF(redis_wait_replicas))
        *(unsigned *)p = (unsigned)v;
    else if (off == OFF(dedupe_s))
        *(int64_t *)p = (int64_t)v;
    else if (off == OFF(fetch_max_bytes) || off == OFF(max_stanza_bytes))
        *(size_t *)p = (size_t)v;
    else
        *(uint64_t *)p = v;
}

typedef struct parse_state {
    config_t *cfg;
    char *err;
    size_t errlen;
} parse_state_t;

static int fail(parse_state_t *ps, const char *section, const char *name, const char *why)
{
    snprintf(ps->err, ps->errlen, "[%s] %s: %s", section, name, why);
    return 0;
}

static int parse_uint(const char *s, uint64_t *out)
{
    char *end;
    if (!*s || *s == '-' || *s == '+')
        return -1;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end)
        return -1;
    *out = v;
    return 0;
}

static int set_domains(parse_state_t *ps, const char *value)
{
    config_t *cfg = ps->cfg;
    for (size_t i = 0; i < cfg->n_user_domains; i++)
        free(cfg->user_domains[i]);
    cfg->n_user_domains = 0;
    char *copy = strdup(value);
    if (!copy)
        return fail(ps, "component", "user_domains", "out of memory");
    for (char *save = NULL, *tok = strtok_r(copy, ", \t", &save); tok;
         tok = strtok_r(NULL, ", \t", &save)) {
        proto_jid_t jid;
        if (cfg->n_user_domains == CONFIG_MAX_DOMAINS) {
            free(copy);
            return fail(ps, "component", "user_domains", "too many domains (at most 32)");
        }
        if (proto_jid_parse(tok, &jid) < 0 || jid.node[0] || jid.resource[0]) {
            free(copy);
            return fail(ps, "component", "user_domains", "not a domain name");
        }
        cfg->user_domains[cfg->n_user_domains++] = strdup(tok);
    }
    free(copy);
    if (cfg->n_user_domains == 0)
        return fail(ps, "component", "user_domains", "needs at least one domain");
    return 1;
}

static int on_key(void *user, const char *section, const char *name, const char *value)
{
    parse_state_t *ps = user;
    config_t *cfg = ps->cfg;
    const key_t_ *k = NULL;
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        if (strcmp(keys[i].section, section) == 0 && strcmp(keys[i].name, name) == 0)
            k = &keys[i];
    if (!k)
        return fail(ps, section, name, "unknown key");
    char *p = (char *)cfg + k->offset;
    uint64_t v;
    switch (k->kind) {
    case K_STR:
        if (!*value)
            return fail(ps, section, name, "must not be empty");
        free(*(char **)p);
        *(char **)p = strdup(value);
        return 1;
    case K_PORT:
        if (parse_uint(value, &v) < 0 || v < k->min || v > k->max)
            return fail(ps, section, name, "must be a port number (1-65535)");
        *(int *)p = (int)v;
        return 1;
    case K_UINT:
        if (parse_uint(value, &v) < 0 || v < k->min || v > k->max) {
            char why[96];
            snprintf(why, sizeof why, "must be a whole number from %llu to %llu",
                     (unsigned long long)k->min, (unsigned long long)k->max);
            return fail(ps, section, name, why);
        }
        store_uint(cfg, k->offset, v);
        return 1;
    case K_SECONDS: {
        char *end;
        errno = 0;
        double secs = strtod(value, &end);
        double ms = secs * 1000.0;
        if (errno || *end || !*value || !isfinite(secs) || ms < (double)k->min ||
            ms > (double)k->max)
            return fail(ps, section, name, "must be a number of seconds, at least 0.01");
        *(int64_t *)p = (int64_t)llround(ms);
        return 1;
    }
    case K_DOMAINS:
        return set_domains(ps, value);
    case K_LEVEL:
        if (log_parse_level(value, (log_level_t *)p) < 0)
            return fail(ps, section, name, "must be debug, info, warn or error");
        return 1;
    }
    return 0;
}

static void set_defaults(config_t *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->server_host = strdup("127.0.0.1");
    cfg->server_port = 5347;
    cfg->log_level = LOG_INFO;
    cfg->redis_host = strdup("127.0.0.1");
    cfg->redis_port = 6379;
    cfg->redis_max_inflight = 10000;
    cfg->redis_timeout_ms = 5000;
    cfg->redis_wait_timeout_ms = 1000;
    cfg->sqlite_path = strdup("receiptd.sqlite3");
    cfg->archive_after_ms = 7 * 86400000ll;
    cfg->evict_after_ms = 30 * 86400000ll;
    cfg->retry_ms = 5000;
    cfg->window_ms = 30000;
    cfg->dedupe_s = 86400;
    cfg->fetch_max = 100;
    cfg->fetch_max_bytes = 65536;
    cfg->max_offline_messages = 10000;
    cfg->max_offline_bytes = 67108864;
    cfg->max_stanza_bytes = 65536;
}

int config_load(config_t *cfg, const char *path, char *err, size_t errlen)
{
    char why[512] = "";
    parse_state_t ps = {cfg, why, sizeof why};
    set_defaults(cfg);
    int rc = ini_parse(path, on_key, &ps);
    if (rc == -1) {
        snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    if (rc != 0) {
        snprintf(err, errlen, "%s:%d: %s", path, rc, why[0] ? why : "syntax error");
        return -1;
    }
    proto_jid_t jid;
    if (!cfg->jid || proto_jid_parse(cfg->jid, &jid) < 0 || jid.node[0] || jid.resource[0]) {
        snprintf(err, errlen,
                 "%s: [component] jid: required, a domain such as receipts.example.org", path);
        return -1;
    }
    if (!cfg->secret) {
        snprintf(err, errlen, "%s: [component] secret: required", path);
        return -1;
    }
    cluster_seed_t seeds[CLUSTER_SEEDS_MAX];
    size_t nseeds;
    if (cfg->redis_cluster &&
        cluster_parse_seeds(cfg->redis_cluster, seeds, CLUSTER_SEEDS_MAX, &nseeds) < 0) {
        snprintf(err, errlen,
                 "%s: [redis] cluster: must be host:port,host:port,... (at most %d, no duplicates)",
                 path, CLUSTER_SEEDS_MAX);
        return -1;
    }
    if (cfg->redis_cluster && cfg->redis_socket) {
        snprintf(err, errlen, "%s: [redis] cluster and socket exclude each other", path);
        return -1;
    }
    if (cfg->n_user_domains == 0) {
        snprintf(err, errlen, "%s: [component] user_domains: required", path);
        return -1;
    }
    return 0;
}

void config_free(config_t *cfg)
{
    free(cfg->jid);
    free(cfg->secret);
    free(cfg->server_host);
    for (size_t i = 0; i < cfg->n_user_domains; i++)
        free(cfg->user_domains[i]);
    free(cfg->redis_host);
    free(cfg->redis_socket);
    free(cfg->redis_password);
    free(cfg->redis_cluster);
    free(cfg->sqlite_path);
    memset(cfg, 0, sizeof *cfg);
}
