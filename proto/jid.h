/* JID splitting and XEP-0106 node escaping. Pure string functions: no allocation, callers own
 * every buffer, and every output is NUL-terminated or the call fails. */
#ifndef RECEIPTD_PROTO_JID_H
#define RECEIPTD_PROTO_JID_H

#include <stddef.h>

/* RFC 7622 caps each part at 1023 bytes; a bare JID fits in twice that plus the '@'. */
#define PROTO_JID_PART_MAX 1024
#define PROTO_JID_MAX (3 * PROTO_JID_PART_MAX)

typedef struct proto_jid {
    char node[PROTO_JID_PART_MAX];
    char domain[PROTO_JID_PART_MAX];
    char resource[PROTO_JID_PART_MAX];
} proto_jid_t;

/* Splits s into node, domain and resource. Returns 0, or -1 when s is not a well-formed JID
 * (empty domain, empty node before '@', empty resource after '/', a part over the limit,
 * characters RFC 7622 forbids in a node). */
int proto_jid_parse(const char *s, proto_jid_t *out);

/* Writes "node@domain" (or "domain") into buf. Returns 0, or -1 when buf is too small. */
int proto_jid_format_bare(const proto_jid_t *jid, char *buf, size_t len);

/* XEP-0106: escapes a bare JID's localpart-to-be (e.g. "bob@example.com" -> "bob\40example.com").
 * Returns the length written, or -1 when out is too small. */
int proto_jid_escape_node(const char *in, char *out, size_t len);

/* XEP-0106 unescaping. Returns the length written, or -1 when the result would not fit. Sequences
 * that are not one of the ten escapes are copied as they are, as the XEP says. */
int proto_jid_unescape_node(const char *in, char *out, size_t len);

#endif
