/* component.ini, parsed with libinih. Every key has a default but the secret; unknown keys and
 * bad values are errors naming the line and key. The struct owns its strings. */
#ifndef RECEIPTD_CONFIG_H
#define RECEIPTD_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include "log.h"

#define CONFIG_MAX_DOMAINS 32

typedef struct config {
    char *jid;
    char *secret;
    char *server_host;
    int server_port;
    char *user_domains[CONFIG_MAX_DOMAINS];
    size_t n_user_domains;
    log_level_t log_level;

    char *redis_host;
    int redis_port;
    char *redis_socket;   /* NULL: TCP */
    char *redis_password; /* NULL: no AUTH */
    unsigned redis_max_inflight;
    int64_t redis_timeout_ms;
    char *redis_cluster;          /* NULL: the single Redis above; else the seed list */
    unsigned redis_wait_replicas; /* WAIT for this many replicas before <stored/> */
    int64_t redis_wait_timeout_ms;

    char *sqlite_path;
    int64_t archive_after_ms; /* offline messages older than this move to SQLite */
    int64_t evict_after_ms;   /* devices not seen for this long are forgotten */
    uint64_t retention_days;  /* 0: archived messages are kept forever */

    int64_t retry_ms;
    int64_t window_ms;
    int64_t dedupe_s;
    unsigned fetch_max;
    size_t fetch_max_bytes;
    uint64_t max_offline_messages;
    uint64_t max_offline_bytes;
    size_t max_stanza_bytes;
} config_t;

/* Loads path into cfg. Returns 0, or -1 with a message in err ("FILE:LINE: key 'k': why"). */
int config_load(config_t *cfg, const char *path, char *err, size_t errlen);
void config_free(config_t *cfg);

#endif
