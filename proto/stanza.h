/* Parsing and building the stanzas of the namespaces receiptd speaks (proto/PROTOCOL.md).
 * Pure functions over libstrophe stanzas and strings: no I/O, no global state. Parsers return
 * pointers into the stanza they were given (valid while it lives); builders return a new stanza
 * the caller releases, or NULL when out of memory. */
#ifndef RECEIPTD_PROTO_STANZA_H
#define RECEIPTD_PROTO_STANZA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <strophe.h>

#include "buf.h"

/* Parse failures, mapped by the caller onto RFC 6120 conditions. */
enum {
    PROTO_OK = 0,
    PROTO_EBADREQ = -1,   /* bad-request */
    PROTO_ENOTFOUND = -2, /* item-not-found */
    PROTO_ETOOMANY = -3,  /* policy-violation: over a configured bound */
};

typedef enum { PROTO_RECEIPT_NONE, PROTO_RECEIPT_REQUEST, PROTO_RECEIPT_RECEIVED } proto_receipt_t;

/* Which XEP-0184 element a message carries. For <received/>, *id is its id attribute (NULL when
 * absent). A message carrying both is treated as a request: the receipt is then lost to the
 * sender's client too, so nothing is gained by guessing. */
proto_receipt_t proto_parse_receipt(xmpp_stanza_t *msg, const char **id);

/* <fetch max='N' after='S'/>: max defaults to cap and is capped by it; a max that is not a
 * positive integer is PROTO_EBADREQ, an after that is not one of our stanza ids PROTO_ENOTFOUND. */
typedef struct proto_fetch {
    unsigned max;
    uint64_t after_seq; /* 0: from the start */
} proto_fetch_t;
int proto_parse_fetch(xmpp_stanza_t *fetch, unsigned cap, proto_fetch_t *out);

/* <summary ids='true|1|false|0'/>. */
int proto_parse_summary(xmpp_stanza_t *summary, bool *with_ids);

/* <ack><item id='S'/>...</ack>: stores up to cap id pointers. No items, an item without id, or a
 * child that is not <item/> is PROTO_EBADREQ; more than cap items PROTO_ETOOMANY. */
int proto_parse_ack(xmpp_stanza_t *ack, const char **ids, size_t cap, size_t *n);

/* Stanza ids are "<seq>-<suffix>": seq is the recipient's arrival counter, so they sort by
 * arrival and an id keeps its place after it was acked. Returns 0 and the seq, or -1. */
int proto_parse_sid(const char *sid, uint64_t *seq);

/* XEP-0082 UTC stamp with milliseconds, e.g. 2026-11-25T06:33:26.123Z. buf holds >= 32 bytes. */
void proto_format_stamp(int64_t ms, char *buf, size_t len);

/* An error reply to stanza: same element and id, from/to swapped, type='error', and
 * <error type='TYPE'><CONDITION/><text>TEXT</text></error> (text optional). */
xmpp_stanza_t *proto_build_error(xmpp_ctx_t *ctx, xmpp_stanza_t *stanza, const char *type,
                                 const char *condition, const char *text);

/* An IQ result to iq, optionally holding payload (the caller keeps its own reference). */
xmpp_stanza_t *proto_build_iq_result(xmpp_ctx_t *ctx, xmpp_stanza_t *iq, xmpp_stanza_t *payload);

/* The message parts kept in storage, as composed back into text by the functions below. */
typedef struct proto_msg {
    const char *from; /* who wrote it, as the server stamped it */
    const char *type; /* NULL when absent */
    const char *id;   /* NULL when absent */
    const char *inner;
    size_t inner_len; /* serialized children, as received */
} proto_msg_t;

/* Appends <message from to type id>INNER<stanza-id id=sid by=by/></message>. from and to are
 * given, not taken from msg, since a live push comes from the relay address. With xmlns_client
 * the message declares jabber:client, as it must inside <forwarded/>. */
void proto_compose_message(proto_buf_t *b, const proto_msg_t *msg, const char *from, const char *to,
                           const char *sid, const char *by, bool xmlns_client);

/* Appends <message type='headline' from to><stored xmlns='urn:receiptd:0' id stanza-id/>
 * </message>, the acknowledgement of a stored message (NULL attributes are left out). */
void proto_compose_stored(proto_buf_t *b, const char *from, const char *to, const char *orig_id,
                          const char *sid);

/* Appends <forwarded><delay stamp/>MESSAGE</forwarded> for a fetch result. */
void proto_compose_forwarded(proto_buf_t *b, const proto_msg_t *msg, const char *to,
                             const char *sid, const char *by, int64_t stamp_ms);

/* Serializes the children of msg that are kept in storage into b: everything but our own
 * stanza-id (a sender may not forge one, XEP-0359). Written here rather than with libstrophe's
 * xmpp_stanza_to_text, which allocates and formats a string per element and attribute: that was
 * a tenth of receiptd's CPU per stored message. Returns 0 or -1 on allocation failure. */
int proto_serialize_inner(xmpp_stanza_t *msg, const char *by, proto_buf_t *b);

#endif
