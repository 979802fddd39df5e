/* One uvredis_t per hiredis context: it owns the uv_poll_t and frees itself in the handle's
 * close callback, which hiredis triggers through the cleanup hook when the context goes away. */
#include "uvredis.h"

#include <stdlib.h>

typedef struct uvredis {
    redisAsyncContext *ac; /* NULL once hiredis let go of it */
    uv_poll_t poll;
    int events;
} uvredis_t;

static void on_poll(uv_poll_t *h, int status, int events)
{
    uvredis_t *u = h->data;
    if (!u->ac)
        return;
    if (status < 0) {
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
    u->events = (u->events | add) & ~del;
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

static void add_write(void *p)
{
    update(p, UV_WRITABLE, 0);
}

static void del_write(void *p)
{
    update(p, 0, UV_WRITABLE);
}

static void on_closed(uv_handle_t *h)
{
    free(h->data);
}

static void cleanup(void *p)
{
    uvredis_t *u = p;
    u->ac = NULL;
    uv_close((uv_handle_t *)&u->poll, on_closed);
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
    u->ac = ac;
    u->poll.data = u;
    ac->ev.data = u;
    ac->ev.addRead = add_read;
    ac->ev.delRead = del_read;
    ac->ev.addWrite = add_write;
    ac->ev.delWrite = del_write;
    ac->ev.cleanup = cleanup;
    return 0;
}
