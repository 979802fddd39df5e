/* hiredis async events on a libuv loop. Debian's hiredis 0.14 ships an adapter that ignores
 * poll errors, so a connect to a Redis that is down (ECONNREFUSED arrives as POLLERR) never
 * completes and never fails; this one hands errors to hiredis, which then reports them. */
#ifndef RECEIPTD_STORAGE_UVREDIS_H
#define RECEIPTD_STORAGE_UVREDIS_H

#include <hiredis/async.h>
#include <uv.h>

/* Returns 0, or -1 when out of memory or the descriptor cannot be polled. */
int store__attach_uv(redisAsyncContext *ac, uv_loop_t *loop);

#endif
