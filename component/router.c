/* The one dispatch point: every stanza from the server passes router_dispatch, which checks the
 * addressing once, fills a route_t and hands the stanza to the handler for its kind. A reader
 * sees here every kind of stanza receiptd answers. */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "daemon.h"
#include "log.h"
#include "ns.h"
#include "stanza.h"

int64_t daemon_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void daemon_send(daemon_t *d, xmpp_stanza_t *s)
{
    if (!s)
        return;
    if (d->link && link_send_stanza(d->link, s) < 0)
        log_debug("router: could not send a <%s/>: link down or outbox full",
                  xmpp_stanza_get_name(s));
    xmpp_stanza_release(s);
}

void daemon_send_text(daemon_t *d, const char *text, size_t len)
{
    if (d->link && link_send_text(d->link, text, len) < 0)
        log_debug("router: could not send %zu bytes: link down or outbox full", len);
}

void daemon_reply_error(daemon_t *d, xmpp_stanza_t *stanza, const char *type, const char *condition,
                        const char *text)
{
    const char *t = xmpp_stanza_get_type(stanza);
    /* RFC 6120 8.3.1: never answer an error with an error. */
    if (t && (strcmp(t, "error") == 0 || strcmp(t, "result") == 0))
        return;
    daemon_send(d, proto_build_error(d->ctx, stanza, type, condition, text));
}

void daemon_reply_storage_error(daemon_t *d, xmpp_stanza_t *stanza, int err)
{
    d->stats.rejected_storage++;
    if (err == STORE_EBUSY)
        daemon_reply_error(d, stanza, "wait", "resource-constraint",
                           "too many requests in flight, retry later");
    else
        daemon_reply_error(d, stanza, "wait", "internal-server-error",
                           "storage unavailable, retry later");
}

int daemon_relay_address(const daemon_t *d, const char *bare, char *buf, size_t len)
{
    char node[PROTO_JID_MAX];
    if (proto_jid_escape_node(bare, node, sizeof node) < 0)
        return -1;
    int n = snprintf(buf, len, "%s@%s", node, d->cfg.jid);
    return n > 0 && (size_t)n < len ? 0 : -1;
}

bool daemon_serves_domain(const daemon_t *d, const char *domain)
{
    for (size_t i = 0; i < d->cfg.n_user_domains; i++)
        if (strcmp(d->cfg.user_domains[i], domain) == 0)
            return true;
    return false;
}

typedef void (*handler_fn)(daemon_t *d, xmpp_stanza_t *s, const route_t *r);

static const struct {
    const char *name;
    handler_fn fn;
} handlers[] = {
    {"message", relay_handle_message},
    {"presence", presence_handle},
    {"iq", query_handle_iq},
};

void router_dispatch(daemon_t *d, xmpp_stanza_t *s, bool oversize)
{
    const char *name = xmpp_stanza_get_name(s);
    const char *from = xmpp_stanza_get_from(s);
    const char *to = xmpp_stanza_get_to(s);
    handler_fn fn = NULL;
    for (size_t i = 0; name && i < sizeof handlers / sizeof handlers[0]; i++)
        if (strcmp(handlers[i].name, name) == 0)
            fn = handlers[i].fn;
    if (!fn) {
        log_debug("router: ignoring <%s/> from the server", name ? name : "?");
        return;
    }
    /* Not cleared whole: a route is 12 kB of JID buffers, and clearing it for every stanza was
     * 15% of receiptd's instructions per stored message. What is not set below starts empty. */
    route_t r;
    r.from_bare[0] = r.peer_bare[0] = '\0';
    r.from_served = false;
    /* The server stamps from and to; a stanza without them is not one we can answer. */
    if (!from || !to || proto_jid_parse(from, &r.from_jid) < 0 ||
        proto_jid_parse(to, &r.to_jid) < 0 || strcmp(r.to_jid.domain, d->cfg.jid) != 0) {
        log_debug("router: dropping <%s/> with unusable addressing", name);
        return;
    }
    r.from = from;
    proto_jid_format_bare(&r.from_jid, r.from_bare, sizeof r.from_bare);
    r.from_served = daemon_serves_domain(d, r.from_jid.domain);
    if (oversize) {
        d->stats.rejected_bad++;
        log_info("router: <%s/> from %s is over max_stanza_bytes (%zu)", name, from,
                 d->cfg.max_stanza_bytes);
        daemon_reply_error(d, s, "modify", "policy-violation", "stanza too large");
        return;
    }
    if (r.to_jid.node[0]) {
        char unescaped[PROTO_JID_MAX];
        proto_jid_t peer;
        if (proto_jid_unescape_node(r.to_jid.node, unescaped, sizeof unescaped) < 0 ||
            proto_jid_parse(unescaped, &peer) < 0 || !peer.node[0] || peer.resource[0]) {
            d->stats.rejected_bad++;
            daemon_reply_error(d, s, "modify", "jid-malformed",
                               "the node must be an escaped bare JID (XEP-0106)");
            return;
        }
        if (!daemon_serves_domain(d, peer.domain)) {
            d->stats.rejected_bad++;
            daemon_reply_error(d, s, "cancel", "item-not-found",
                               "that domain is not served by this relay");
            return;
        }
        proto_jid_format_bare(&peer, r.peer_bare, sizeof r.peer_bare);
    }
    fn(d, s, &r);
}
