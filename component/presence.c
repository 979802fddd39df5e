/* The presence registry's front: who is online for receiptd (FIELD-NOTES decision 1) lives in
 * Redis; this file turns presence stanzas into registry changes, answers subscriptions, and
 * after every (re)attach pings the resources recorded under an older link epoch, since the
 * server does not repeat directed presence to a component that reconnects. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon.h"
#include "log.h"
#include "ns.h"
#include "stanza.h"
#include "tiers.h"

#define PING_PREFIX "rdping-"

static void send_presence(daemon_t *d, const char *to, const char *type)
{
    xmpp_stanza_t *p = xmpp_presence_new(d->ctx);
    if (!p)
        return;
    xmpp_stanza_set_from(p, d->cfg.jid);
    xmpp_stanza_set_to(p, to);
    if (type)
        xmpp_stanza_set_type(p, type);
    daemon_send(d, p);
}

static void record(daemon_t *d, store_presence_op_t op, const char *full, const char *bare,
                   const char *resource)
{
    /* Presence is activity: it keeps the user from eviction, or brings an evicted one back. */
    if (d->store)
        tiers_touch(d, bare);
    if (!d->store || store_presence(d->store, op, bare, resource, daemon_now_ms(), NULL, NULL) < 0)
        log_warn("presence: storage unavailable; presence of %s not recorded", full);
}

/* Presence that comes between the handshake and the moment this link's epoch is known is
 * recorded under epoch "0", which counts nobody online, and the verification pings the epoch
 * then starts can miss it: they go to the users of the online index, which a presence joins only
 * once its own script answered, after the epoch's. So such presence is kept (full JIDs, bounded)
 * and recorded again with the epoch (presence_on_epoch). */
#define EARLY_MAX 1024

static void early_forget(daemon_t *d, const char *full)
{
    for (size_t i = 0; i < d->nearly; i++) {
        if (strcmp(d->early[i], full) == 0) {
            free(d->early[i]);
            d->early[i] = d->early[--d->nearly];
            return;
        }
    }
}

static void early_keep(daemon_t *d, const char *full)
{
    early_forget(d, full);
    if (d->nearly == EARLY_MAX) {
        log_warn("presence: more than %d resources announced before the link epoch was known; "
                 "%s counts as online once it sends presence again",
                 EARLY_MAX, full);
        return;
    }
    if (!d->early && !(d->early = calloc(EARLY_MAX, sizeof *d->early)))
        return;
    char *copy = strdup(full);
    if (copy)
        d->early[d->nearly++] = copy;
}

void presence_free_early(daemon_t *d)
{
    while (d->nearly)
        free(d->early[--d->nearly]);
    free(d->early);
    d->early = NULL;
}

static void registry_update(daemon_t *d, store_presence_op_t op, const route_t *r)
{
    if (strcmp(d->epoch, "0") == 0) {
        if (op == STORE_PRESENCE_SET)
            early_keep(d, r->from);
        else
            early_forget(d, r->from);
    }
    record(d, op, r->from, r->from_bare, r->from_jid.resource);
}

void presence_handle(daemon_t *d, xmpp_stanza_t *pres, const route_t *r)
{
    const char *type = xmpp_stanza_get_type(pres);
    /* Foreign domains get no answer at all: a flood from them costs us nothing. */
    if (!r->from_served || r->peer_bare[0])
        return;
    if (!type || strcmp(type, "unavailable") == 0 || strcmp(type, "error") == 0) {
        if (!r->from_jid.resource[0])
            return;
        bool up = !type;
        log_debug("presence: %s is %s", r->from, up ? "online" : "offline");
        registry_update(d, up ? STORE_PRESENCE_SET : STORE_PRESENCE_DEL, r);
    } else if (strcmp(type, "subscribe") == 0) {
        /* Approve and subscribe back: presence then flows both ways (FIELD-NOTES). */
        send_presence(d, r->from_bare, "subscribed");
        send_presence(d, r->from_bare, "subscribe");
    } else if (strcmp(type, "probe") == 0) {
        send_presence(d, r->from, NULL);
    } else if (strcmp(type, "unsubscribe") == 0) {
        send_presence(d, r->from_bare, "unsubscribed");
    }
}

static void ping(daemon_t *d, const char *user, const char *res)
{
    char to[PROTO_JID_MAX * 2], id[48];
    snprintf(to, sizeof to, "%s/%s", user, res);
    /* The id carries our epoch: another instance that gets the answer (ejabberd splits traffic)
     * verifies with it, and learns of our attach at once. */
    snprintf(id, sizeof id, PING_PREFIX "%s-%" PRIu64, d->epoch, ++d->ping_counter);
    xmpp_stanza_t *iq = xmpp_iq_new(d->ctx, "get", id);
    xmpp_stanza_t *p = xmpp_stanza_new(d->ctx);
    if (!iq || !p) {
        if (iq)
            xmpp_stanza_release(iq);
        if (p)
            xmpp_stanza_release(p);
        return;
    }
    xmpp_stanza_set_name(p, "ping");
    xmpp_stanza_set_ns(p, NS_PING);
    xmpp_stanza_add_child_ex(iq, p, 0);
    xmpp_stanza_set_from(iq, d->cfg.jid);
    xmpp_stanza_set_to(iq, to);
    daemon_send(d, iq);
}

static void on_stale(void *ud, int err, const char *user, const char *const *resources, size_t n,
                     bool last)
{
    daemon_t *d = ud;
    if (last) {
        if (err)
            log_warn("presence: could not list all resources to verify after attaching");
        if (d->stale_pinged)
            log_info("presence: verifying %" PRIu64 " resource(s) recorded before this link",
                     d->stale_pinged);
        return;
    }
    for (size_t i = 0; i < n; i++)
        ping(d, user, resources[i]);
    d->stale_pinged += n;
    /* Subscribed users answer a probe with their presence, which re-registers them. */
    send_presence(d, user, "probe");
}

void presence_follow_epoch(daemon_t *d, const char *epoch)
{
    /* Only once this link has an epoch of its own, and only forward. */
    if (!d->store || strcmp(d->epoch, "0") == 0 ||
        strtoull(epoch, NULL, 10) <= strtoull(d->epoch, NULL, 10))
        return;
    size_t n = strcspn(epoch, "-");
    if (n == 0 || n >= sizeof d->epoch)
        return;
    memcpy(d->epoch, epoch, n);
    d->epoch[n] = '\0';
    store_set_epoch(d->store, d->epoch);
    log_info("presence: another instance attached (link epoch %s); following it", d->epoch);
    /* What we recorded under our old epoch in the meantime is unverified now: ping it too. */
    presence_on_epoch(d);
}

void presence_on_epoch(daemon_t *d)
{
    for (size_t i = 0; i < d->nearly; i++) {
        proto_jid_t jid;
        char bare[PROTO_JID_MAX];
        if (proto_jid_parse(d->early[i], &jid) == 0 &&
            proto_jid_format_bare(&jid, bare, sizeof bare) == 0)
            record(d, STORE_PRESENCE_SET, d->early[i], bare, jid.resource);
    }
    presence_free_early(d);
    d->stale_pinged = 0;
    if (d->store && store_presence_stale(d->store, on_stale, d) < 0)
        log_warn("presence: storage unavailable; resources from before the link stay offline");
}

void presence_handle_ping_reply(daemon_t *d, xmpp_stanza_t *iq, const route_t *r)
{
    const char *type = xmpp_stanza_get_type(iq);
    const char *id = xmpp_stanza_get_id(iq);
    if (!id || strncmp(id, PING_PREFIX, strlen(PING_PREFIX)) != 0)
        return; /* not an answer to one of our pings */
    if (!r->from_served || !r->from_jid.resource[0])
        return;
    /* A result proves the resource is there; any error means it is not (the server answers
     * for a resource that is gone). */
    bool alive = type && strcmp(type, "result") == 0;
    log_debug("presence: %s %s our ping", r->from, alive ? "answered" : "did not answer");
    presence_follow_epoch(d, id + strlen(PING_PREFIX));
    registry_update(d, alive ? STORE_PRESENCE_VERIFY : STORE_PRESENCE_DEL, r);
}
