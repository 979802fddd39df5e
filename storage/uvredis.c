/* One uvredis_t per hiredis context: it owns a uv_poll_t and a uv_prepare_t and frees itself in
 * the last handle's close callback, which hiredis triggers through the cleanup hook when the
 * context goes away.
 *
 * Writes: hiredis asks for a writable event with every command. Polling for it costs two
 * epoll_ctl calls per loop turn (watch, unwatch) and a wakeup, so instead the commands of a
 * turn are written from a prepare callback, just before the loop waits for I/O. Only a socket
 * that is still connecting, or too full to take everything, is polled for writability. */
#include "uvredis.h"

#include <stdbool.h>
#include <stdlib.h>

typedef struct uvredis {
    redisAsyncContext *ac; /* NULL once hiredis let go of it */
    uv_poll_t poll;
    uv_prepare_t flusher;
    int events;
    bool flushing; /* inside the flush: a request to write again means the socket is full */
    int open;      /* handles not yet closed */
} uvredis_t;

static void on_poll(uv_poll_t *h, int status, int events)
{
    uvredis_t *u = h->data;
    if (!u->ac)
        return;
    if (status < 0) {
        u->events = 0; /* libuv stopped the handle: the next request must start it again */
        /* Let hiredis find the error itself: a connecting context checks SO_ERROR on write,
         * a connected one sees the failure on read. Either way it calls its callbacks. */
        if (!(u->ac->c.flags & REDIS_CONNECTED))
            redisAsyncHandleWrite(u->ac);
        else
            redisAsyncHandleRead(u->ac);
        return;
    }
    if (events & UV_READABLE)
        redisAsyncHandleRead(u->ac);
    /* The read may have freed the context (disconnect): check again. */
    if (u->ac && (events & UV_WRITABLE))
        redisAsyncHandleWrite(u->ac);
}

static void update(uvredis_t *u, int add, int del)
{
    int events = (u->events | add) & ~del;
    if (events == u->events)
        return;
    u->events = events;
    if (u->events)
        uv_poll_start(&u->poll, u->events, on_poll);
    else
        uv_poll_stop(&u->poll);
}

static void add_read(void *p)
{
    update(p, UV_READABLE, 0);
}

static void del_read(void *p)
{
    update(p, 0, UV_READABLE);
}

static void on_flush(uv_prepare_t *h)
{
    uvredis_t *u = h->data;
    uv_prepare_stop(h);
    if (!u->ac)
        return;
    u->flushing = true;
    redisAsyncHandleWrite(u->ac); /* may drop the context: then cleanup ran */
    u->flushing = false;
}

static void add_write(void *p)
{
    uvredis_t *u = p;
    if (u->flushing || !(u->ac->c.flags & REDIS_CONNECTED))
        update(u, UV_WRITABLE, 0);
    else
        uv_prepare_start(&u->flusher, on_flush);
}

static void del_write(void *p)
{
    update(p, 0, UV_WRITABLE);
}

static void on_closed(uv_handle_t *h)
{
    uvredis_t *u = h->data;
    if (--u->open == 0)
        free(u);
}

static void cleanup(void *p)
{
    uvredis_t *u = p;
    u->ac = NULL;
    uv_close((uv_handle_t *)&u->poll, on_closed);
    uv_close((uv_handle_t *)&u->flusher, on_closed);
}

int store__attach_uv(redisAsyncContext *ac, uv_loop_t *loop)
{
    if (ac->ev.data)
        return -1;
    uvredis_t *u = calloc(1, sizeof *u);
    if (!u)
        return -1;
    if (uv_poll_init(loop, &u->poll, ac->c.fd) != 0) {
        free(u);
        return -1;
    }
    uv_prepare_init(loop, &u->flusher);
    u->open = 2;
    u->ac = ac;
    u->poll.data = u;
    u->flusher.data = u;
    ac->ev.data = u;
    ac->ev.addRead = add_read;
    ac->ev.delRead = del_read;
    ac->ev.addWrite = add_write;
    ac->ev.delWrite = del_write;
    ac->ev.cleanup = cleanup;
    return 0;
}
