/* Logging for the daemon's top layer: lower layers return errors, this layer says what happened,
 * once. Lines go to stderr as "LEVEL module: text". */
#ifndef RECEIPTD_LOG_H
#define RECEIPTD_LOG_H

#include <stdbool.h>
#include <stdint.h>

typedef enum { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR } log_level_t;

void log_set_level(log_level_t level);
int log_parse_level(const char *s, log_level_t *out);
void log_write(log_level_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_debug(...) log_write(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_write(LOG_INFO, __VA_ARGS__)
#define log_warn(...) log_write(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_write(LOG_ERROR, __VA_ARGS__)

/* For failures that repeat while an outage lasts (reconnect attempts): true for the first one
 * and then at most once a minute, so an outage is logged without flooding. */
typedef struct log_throttle {
    uint64_t last_ms;
    unsigned suppressed;
    bool active;
} log_throttle_t;

bool log_throttle_pass(log_throttle_t *t, uint64_t now_ms);
void log_throttle_reset(log_throttle_t *t);

#endif
