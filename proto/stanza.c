/* Stanza parsers and builders for urn:receiptd:0, XEP-0184 receipts and RFC 6120 errors. */
#include "stanza.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ns.h"

static bool is_tag(xmpp_stanza_t *s, const char *name, const char *ns)
{
    const char *n = xmpp_stanza_get_name(s);
    const char *x = xmpp_stanza_get_ns(s);
    return xmpp_stanza_is_tag(s) && n && strcmp(n, name) == 0 && (!ns || (x && strcmp(x, ns) == 0));
}

proto_receipt_t proto_parse_receipt(xmpp_stanza_t *msg, const char **id)
{
    proto_receipt_t kind = PROTO_RECEIPT_NONE;
    *id = NULL;
    for (xmpp_stanza_t *c = xmpp_stanza_get_children(msg); c; c = xmpp_stanza_get_next(c)) {
        if (is_tag(c, "request", NS_RECEIPTS))
            return PROTO_RECEIPT_REQUEST;
        if (is_tag(c, "received", NS_RECEIPTS)) {
            kind = PROTO_RECEIPT_RECEIVED;
            *id = xmpp_stanza_get_attribute(c, "id");
        }
    }
    return kind;
}

/* Strict decimal: digits only, no sign, no overflow. */
static int parse_u64(const char *s, size_t n, uint64_t *out)
{
    uint64_t v = 0;
    if (n == 0 || n > 19)
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    *out = v;
    return 0;
}

int proto_parse_sid(const char *sid, uint64_t *seq)
{
    const char *dash = strchr(sid, '-');
    if (!dash || dash[1] == '\0' || strlen(dash + 1) > 32)
        return -1;
    for (const char *p = dash + 1; *p; p++)
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f')))
            return -1;
    if (parse_u64(sid, (size_t)(dash - sid), seq) < 0 || *seq == 0)
        return -1;
    return 0;
}

int proto_parse_fetch(xmpp_stanza_t *fetch, unsigned cap, proto_fetch_t *out)
{
    const char *max = xmpp_stanza_get_attribute(fetch, "max");
    const char *after = xmpp_stanza_get_attribute(fetch, "after");
    out->max = cap;
    out->after_seq = 0;
    if (max) {
        uint64_t v;
        if (parse_u64(max, strlen(max), &v) < 0 || v == 0)
            return PROTO_EBADREQ;
        if (v < cap)
            out->max = (unsigned)v;
    }
    if (after && proto_parse_sid(after, &out->after_seq) < 0)
        return PROTO_ENOTFOUND;
    return PROTO_OK;
}

int proto_parse_summary(xmpp_stanza_t *summary, bool *with_ids)
{
    const char *ids = xmpp_stanza_get_attribute(summary, "ids");
    *with_ids = false;
    if (!ids)
        return PROTO_OK;
    if (strcmp(ids, "true") == 0 || strcmp(ids, "1") == 0)
        *with_ids = true;
    else if (strcmp(ids, "false") != 0 && strcmp(ids, "0") != 0)
        return PROTO_EBADREQ;
    return PROTO_OK;
}

int proto_parse_ack(xmpp_stanza_t *ack, const char **ids, size_t cap, size_t *n)
{
    *n = 0;
    for (xmpp_stanza_t *c = xmpp_stanza_get_children(ack); c; c = xmpp_stanza_get_next(c)) {
        if (!xmpp_stanza_is_tag(c))
            continue; /* whitespace between items */
        const char *name = xmpp_stanza_get_name(c);
        const char *id = xmpp_stanza_get_attribute(c, "id");
        if (!name || strcmp(name, "item") != 0 || !id || !*id)
            return PROTO_EBADREQ;
        if (*n == cap)
            return PROTO_ETOOMANY;
        ids[(*n)++] = id;
    }
    return *n ? PROTO_OK : PROTO_EBADREQ;
}

void proto_format_stamp(int64_t ms, char *buf, size_t len)
{
    time_t secs = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&secs, &tm);
    size_t n = strftime(buf, len, "%Y-%m-%dT%H:%M:%S", &tm);
    if (n && n + 6 <= len)
        snprintf(buf + n, len - n, ".%03dZ", (int)(ms % 1000));
}

static xmpp_stanza_t *new_tag(xmpp_ctx_t *ctx, const char *name, const char *ns)
{
    xmpp_stanza_t *s = xmpp_stanza_new(ctx);
    if (!s)
        return NULL;
    xmpp_stanza_set_name(s, name);
    if (ns)
        xmpp_stanza_set_ns(s, ns);
    return s;
}

/* Adds child to parent, handing over the caller's reference. */
static void adopt(xmpp_stanza_t *parent, xmpp_stanza_t *child)
{
    xmpp_stanza_add_child_ex(parent, child, 0);
}

xmpp_stanza_t *proto_build_error(xmpp_ctx_t *ctx, xmpp_stanza_t *stanza, const char *type,
                                 const char *condition, const char *text)
{
    const char *name = xmpp_stanza_get_name(stanza);
    xmpp_stanza_t *reply = new_tag(ctx, name ? name : "message", NULL);
    xmpp_stanza_t *err = new_tag(ctx, "error", NULL);
    xmpp_stanza_t *cond = new_tag(ctx, condition, NS_STANZAS);
    if (!reply || !err || !cond)
        goto fail;
    const char *id = xmpp_stanza_get_id(stanza);
    const char *from = xmpp_stanza_get_from(stanza);
    const char *to = xmpp_stanza_get_to(stanza);
    if (id)
        xmpp_stanza_set_id(reply, id);
    if (from)
        xmpp_stanza_set_to(reply, from);
    if (to)
        xmpp_stanza_set_from(reply, to);
    xmpp_stanza_set_type(reply, "error");
    xmpp_stanza_set_attribute(err, "type", type);
    adopt(err, cond);
    cond = NULL;
    if (text) {
        xmpp_stanza_t *t = new_tag(ctx, "text", NS_STANZAS);
        xmpp_stanza_t *body = xmpp_stanza_new(ctx);
        if (!t || !body) {
            if (t)
                xmpp_stanza_release(t);
            if (body)
                xmpp_stanza_release(body);
            goto fail;
        }
        xmpp_stanza_set_text(body, text);
        adopt(t, body);
        adopt(err, t);
    }
    adopt(reply, err);
    return reply;
fail:
    if (reply)
        xmpp_stanza_release(reply);
    if (err)
        xmpp_stanza_release(err);
    if (cond)
        xmpp_stanza_release(cond);
    return NULL;
}

xmpp_stanza_t *proto_build_iq_result(xmpp_ctx_t *ctx, xmpp_stanza_t *iq, xmpp_stanza_t *payload)
{
    xmpp_stanza_t *res = new_tag(ctx, "iq", NULL);
    if (!res)
        return NULL;
    const char *id = xmpp_stanza_get_id(iq);
    const char *from = xmpp_stanza_get_from(iq);
    const char *to = xmpp_stanza_get_to(iq);
    xmpp_stanza_set_type(res, "result");
    if (id)
        xmpp_stanza_set_id(res, id);
    if (from)
        xmpp_stanza_set_to(res, from);
    if (to)
        xmpp_stanza_set_from(res, to);
    if (payload)
        xmpp_stanza_add_child(res, payload);
    return res;
}

void proto_compose_message(proto_buf_t *b, const proto_msg_t *msg, const char *from, const char *to,
                           const char *sid, const char *by, bool xmlns_client)
{
    proto_buf_append_str(b, "<message");
    if (xmlns_client)
        proto_buf_append_attr(b, "xmlns", "jabber:client");
    proto_buf_append_attr(b, "from", from);
    proto_buf_append_attr(b, "to", to);
    proto_buf_append_attr(b, "type", msg->type);
    proto_buf_append_attr(b, "id", msg->id);
    proto_buf_append(b, ">", 1);
    proto_buf_append(b, msg->inner, msg->inner_len);
    if (sid) {
        proto_buf_append_str(b, "<stanza-id xmlns='" NS_SID "'");
        proto_buf_append_attr(b, "id", sid);
        proto_buf_append_attr(b, "by", by);
        proto_buf_append_str(b, "/>");
    }
    proto_buf_append_str(b, "</message>");
}

void proto_compose_forwarded(proto_buf_t *b, const proto_msg_t *msg, const char *to,
                             const char *sid, const char *by, int64_t stamp_ms)
{
    char stamp[40];
    proto_format_stamp(stamp_ms, stamp, sizeof stamp);
    proto_buf_append_str(b, "<forwarded xmlns='" NS_FORWARD "'><delay xmlns='" NS_DELAY "'");
    proto_buf_append_attr(b, "stamp", stamp);
    proto_buf_append_str(b, "/>");
    proto_compose_message(b, msg, msg->from, to, sid, by, true);
    proto_buf_append_str(b, "</forwarded>");
}

void proto_compose_stored(proto_buf_t *b, const char *from, const char *to, const char *orig_id,
                          const char *sid)
{
    proto_buf_append_str(b, "<message type='headline'");
    proto_buf_append_attr(b, "from", from);
    proto_buf_append_attr(b, "to", to);
    proto_buf_append_str(b, "><stored xmlns='" NS_RECEIPTD "'");
    proto_buf_append_attr(b, "id", orig_id);
    proto_buf_append_attr(b, "stanza-id", sid);
    proto_buf_append_str(b, "/></message>");
}

/* One element and what it holds, as XML text. The depth is bounded by the stream parser
 * (STREAM_MAX_DEPTH), so the recursion is too. */
static void append_element(proto_buf_t *b, xmpp_stanza_t *s)
{
    if (xmpp_stanza_is_text(s)) {
        const char *t = xmpp_stanza_get_text_ptr(s);
        proto_buf_append_xml(b, t ? t : "");
        return;
    }
    const char *name = xmpp_stanza_get_name(s);
    if (!name)
        return;
    proto_buf_append(b, "<", 1);
    proto_buf_append_str(b, name);
    int n = xmpp_stanza_get_attribute_count(s);
    if (n > 0) {
        const char *small[32], **attrs = small;
        if (2 * n > 32 && !(attrs = malloc(2 * (size_t)n * sizeof *attrs))) {
            b->failed = true;
            return;
        }
        int got = xmpp_stanza_get_attributes(s, attrs, 2 * n);
        for (int i = 0; i + 1 < got; i += 2)
            proto_buf_append_attr(b, attrs[i], attrs[i + 1]);
        if (attrs != small)
            free(attrs);
    }
    xmpp_stanza_t *c = xmpp_stanza_get_children(s);
    if (!c) {
        proto_buf_append(b, "/>", 2);
        return;
    }
    proto_buf_append(b, ">", 1);
    for (; c; c = xmpp_stanza_get_next(c))
        append_element(b, c);
    proto_buf_append(b, "</", 2);
    proto_buf_append_str(b, name);
    proto_buf_append(b, ">", 1);
}

int proto_serialize_inner(xmpp_stanza_t *msg, const char *by, proto_buf_t *b)
{
    for (xmpp_stanza_t *c = xmpp_stanza_get_children(msg); c; c = xmpp_stanza_get_next(c)) {
        if (is_tag(c, "stanza-id", NS_SID)) {
            const char *cby = xmpp_stanza_get_attribute(c, "by");
            if (cby && strcmp(cby, by) == 0)
                continue;
        }
        append_element(b, c);
    }
    return b->failed ? -1 : 0;
}
