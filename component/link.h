/* The XEP-0114 link to the XMPP server: one TCP connection on the libuv loop, the stream and
 * handshake, an outbox, and reconnection with capped exponential backoff and jitter.
 *
 * libstrophe's own connection code is not used: 0.12.2 crashes on the first stanza a component
 * connection receives (conn->sm_state is never allocated), so libstrophe is only the stanza model
 * and serializer here. The link owns its socket and parser; stanzas reach the owner through
 * on_stanza and are only valid during that call. */
#ifndef RECEIPTD_LINK_H
#define RECEIPTD_LINK_H

#include <stdbool.h>
#include <stddef.h>
#include <strophe.h>
#include <uv.h>

typedef struct link link_t;

typedef struct link_config {
    const char *host;
    int port;
    const char *jid;
    const char *secret;
    size_t max_stanza_bytes;
    size_t max_queued_bytes; /* outbox bound: past it, sends fail until the peer reads */
} link_config_t;

typedef struct link_callbacks {
    void (*on_up)(void *ud);
    void (*on_down)(void *ud);
    void (*on_stanza)(void *ud, xmpp_stanza_t *stanza, bool oversize);
} link_callbacks_t;

int link_create(uv_loop_t *loop, xmpp_ctx_t *ctx, const link_config_t *cfg,
                const link_callbacks_t *cb, void *ud, link_t **out);
/* Starts connecting; reconnects by itself until link_close. */
void link_start(link_t *l);
/* Closes the stream politely if it is up, then the socket; frees the link once libuv is done. */
void link_close(link_t *l);
bool link_is_up(const link_t *l);

/* Queue data for the server. Return 0, or -1 when the link is down or the outbox is full. */
int link_send_text(link_t *l, const char *data, size_t len);
int link_send_stanza(link_t *l, xmpp_stanza_t *stanza);

#endif
