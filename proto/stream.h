/* The XMPP stream parser: bytes in, stanzas out. Expat does the XML; this turns each top-level
 * element into a libstrophe stanza tree. No I/O: the caller feeds what it read.
 *
 * Bounds: a stanza over max_stanza_bytes, or nested deeper than STREAM_MAX_DEPTH, is not built;
 * its end is still found and it is handed over as a skeleton (top element and attributes, no
 * children) with oversize set, so the caller can answer with an error instead of dropping the
 * stream. DTDs and entity declarations stop the parse. */
#ifndef RECEIPTD_PROTO_STREAM_H
#define RECEIPTD_PROTO_STREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <strophe.h>

#define STREAM_MAX_DEPTH 48

typedef struct stream_callbacks {
    /* The stream header arrived; id is its id attribute or NULL. */
    void (*on_open)(void *ud, const char *id);
    /* One stanza. It belongs to the parser and is released after the call: take a reference
     * (xmpp_stanza_clone) to keep it. */
    void (*on_stanza)(void *ud, xmpp_stanza_t *stanza, bool oversize);
    /* The peer closed the stream. */
    void (*on_close)(void *ud);
} stream_callbacks_t;

typedef struct stream_parser stream_parser_t;

/* Returns NULL when out of memory. Callbacks must not free or reset the parser. */
stream_parser_t *stream_parser_new(xmpp_ctx_t *ctx, size_t max_stanza_bytes,
                                   const stream_callbacks_t *cb, void *ud);
void stream_parser_free(stream_parser_t *p);
/* Starts over for a new stream (after a reconnect). Returns 0 or -1 when out of memory. */
int stream_parser_reset(stream_parser_t *p);
/* Returns 0, or -1 on malformed XML; stream_parser_error then says why. */
int stream_parser_feed(stream_parser_t *p, const char *data, size_t len);
const char *stream_parser_error(const stream_parser_t *p);

#endif
