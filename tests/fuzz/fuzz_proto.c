/* libFuzzer target: everything in proto/ and the blob decoder that reads client-controlled or
 * stored bytes: the input is parsed as one stanza and fed to each payload parser, its attribute
 * values to the JID functions, and the raw bytes to the blob decoder. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "blob.h"
#include "jid.h"
#include "stanza.h"

static xmpp_ctx_t *ctx;

static void try_jid(const char *s)
{
    proto_jid_t j;
    char buf[PROTO_JID_MAX * 3], bare[PROTO_JID_MAX];
    if (!s)
        return;
    proto_jid_unescape_node(s, buf, sizeof buf);
    proto_jid_escape_node(s, buf, sizeof buf);
    if (proto_jid_parse(s, &j) == 0)
        proto_jid_format_bare(&j, bare, sizeof bare);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!ctx)
        ctx = xmpp_ctx_new(NULL, NULL);
    static store_blob_t blob;
    store_blob_decode((const char *)data, size, &blob);

    char *text = malloc(size + 1);
    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    try_jid(text);
    xmpp_stanza_t *s = xmpp_stanza_new_from_string(ctx, text);
    free(text);
    if (!s)
        return 0;
    proto_fetch_t f;
    bool ids;
    const char *items[16];
    size_t n;
    const char *rid;
    uint64_t seq;
    proto_parse_fetch(s, 100, &f);
    proto_parse_summary(s, &ids);
    proto_parse_ack(s, items, 16, &n);
    proto_parse_receipt(s, &rid);
    try_jid(xmpp_stanza_get_from(s));
    try_jid(xmpp_stanza_get_to(s));
    if (xmpp_stanza_get_id(s))
        proto_parse_sid(xmpp_stanza_get_id(s), &seq);
    proto_buf_t b;
    proto_buf_init(&b);
    proto_serialize_inner(s, "r.example", &b);
    xmpp_stanza_t *err = proto_build_error(ctx, s, "cancel", "bad-request", "x");
    if (err)
        xmpp_stanza_release(err);
    proto_buf_free(&b);
    xmpp_stanza_release(s);
    return 0;
}
