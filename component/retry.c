/* Retransmission: a timer claims due pending deliveries from Redis (the due script moves expired
 * or orphaned ones to their device's queue in the same step) and pushes the rest again, each to
 * the one resource that still owes its ack. One claim
 * is in flight at a time, so a slow Redis slows retransmission instead of piling up requests. */
#include "daemon.h"
#include "log.h"

#define DUE_MAX_USERS 256

static void on_due(void *ud, int err, const store_due_t *due, size_t n)
{
    daemon_t *d = ud;
    d->due_inflight = false;
    if (err)
        return; /* the store's state callback already told the operator */
    for (size_t i = 0; i < n; i++)
        for (size_t k = 0; k < due[i].nitems; k++) {
            relay_push(d, due[i].user, &due[i].resource, 1, due[i].items[k].sid,
                       due[i].items[k].blob, due[i].items[k].blob_len);
            d->stats.retransmitted++;
        }
}

static void on_tick(uv_timer_t *t)
{
    daemon_t *d = t->data;
    if (d->due_inflight || !d->store || !store_is_connected(d->store) || !d->link ||
        !link_is_up(d->link))
        return;
    if (store_claim_due(d->store, daemon_now_ms(), d->cfg.retry_ms, DUE_MAX_USERS, on_due,
                        d) == 0)
        d->due_inflight = true;
}

void retry_start(daemon_t *d)
{
    /* A tenth of the retry interval keeps retransmissions within 10% of their due time. */
    uint64_t tick = (uint64_t)d->cfg.retry_ms / 10;
    if (tick < 10)
        tick = 10;
    if (tick > 1000)
        tick = 1000;
    uv_timer_init(d->loop, &d->due_timer);
    d->due_timer.data = d;
    uv_timer_start(&d->due_timer, on_tick, tick, tick);
}

void retry_stop(daemon_t *d)
{
    uv_timer_stop(&d->due_timer);
    uv_close((uv_handle_t *)&d->due_timer, NULL);
}
