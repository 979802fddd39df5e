#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

/* The one piece of process-wide state: the level, set once at startup from the config. */
static log_level_t min_level = LOG_INFO;

void log_set_level(log_level_t level)
{
    min_level = level;
}

int log_parse_level(const char *s, log_level_t *out)
{
    static const char *const names[] = {"debug", "info", "warn", "error"};
    for (int i = 0; i < 4; i++)
        if (strcmp(s, names[i]) == 0) {
            *out = (log_level_t)i;
            return 0;
        }
    return -1;
}

void log_write(log_level_t level, const char *fmt, ...)
{
    static const char *const tags[] = {"DEBUG", "INFO", "WARN", "ERROR"};
    if (level < min_level)
        return;
    struct timespec ts;
    struct tm tm;
    char stamp[32];
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    char line[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s.%03ldZ %s %s\n", stamp, ts.tv_nsec / 1000000, tags[level], line);
}

bool log_throttle_pass(log_throttle_t *t, uint64_t now_ms)
{
    if (!t->active || now_ms - t->last_ms >= 60000) {
        t->active = true;
        t->last_ms = now_ms;
        t->suppressed = 0;
        return true;
    }
    t->suppressed++;
    return false;
}

void log_throttle_reset(log_throttle_t *t)
{
    t->active = false;
    t->suppressed = 0;
}
