/* Retransmission: a timer claims due pending deliveries from Redis (the due script moves expired
 * or orphaned ones to their device's queue in the same step) and pushes the rest again, each to
 * the one resource that still owes its ack. One claim
 * is in flight at a time, so a slow Redis slows retransmission instead of piling up requests. */
#include <stdlib.h>
#include <string.h>

#include "daemon.h"
#include "log.h"

#define DUE_MAX_USERS 64 /* per index shard */

static void on_due(void *ud, int err, const store_due_t *due, size_t n, bool last)
{
    daemon_t *d = ud;
    if (last) {
        d->due_inflight = false;
        return;
    }
    if (err)
        return; /* the store's state callback already told the operator */
    for (size_t i = 0; i < n; i++)
        for (size_t k = 0; k < due[i].nitems; k++) {
            relay_push(d, due[i].user, &due[i].resource, 1, due[i].items[k].sid,
                       due[i].items[k].blob, due[i].items[k].blob_len);
            d->stats.retransmitted++;
        }
}

/* Another instance sharing this Redis may have re-attached (ejabberd runs two at once): its
 * epoch supersedes ours, as if we had re-attached too. Scripts get the epoch from us, not from
 * Redis (a script may only touch its user's slot), so we follow it here, within a second. */
static void on_epoch_value(void *ud, int err, const char *value)
{
    daemon_t *d = ud;
    d->epoch_check_inflight = false;
    if (!err && value)
        presence_follow_epoch(d, value);
}

static void epoch_check(daemon_t *d)
{
    uint64_t now = uv_now(d->loop);
    if (d->epoch_check_inflight || now - d->epoch_checked_at < 1000)
        return;
    d->epoch_checked_at = now;
    if (store_epoch_get(d->store, on_epoch_value, d) == 0)
        d->epoch_check_inflight = true;
}

static void on_tick(uv_timer_t *t)
{
    daemon_t *d = t->data;
    if (d->due_inflight || !d->store || !store_is_connected(d->store) || !d->link ||
        !link_is_up(d->link))
        return;
    epoch_check(d);
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
