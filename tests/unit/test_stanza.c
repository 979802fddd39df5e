#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blob.h"
#include "buf.h"
#include "check.h"
#include "stanza.h"

static xmpp_ctx_t *ctx;

static xmpp_stanza_t *parse(const char *xml)
{
    return xmpp_stanza_new_from_string(ctx, xml);
}

static void test_fetch(void)
{
    proto_fetch_t f;
    xmpp_stanza_t *s = parse("<fetch xmlns='urn:receiptd:0' max='10' after='12-ab'/>");
    CHECK(proto_parse_fetch(s, 100, &f) == PROTO_OK);
    CHECK(f.max == 10 && f.after_seq == 12);
    xmpp_stanza_release(s);
    s = parse("<fetch xmlns='urn:receiptd:0' max='99999999'/>");
    CHECK(proto_parse_fetch(s, 100, &f) == PROTO_OK && f.max == 100 && f.after_seq == 0);
    xmpp_stanza_release(s);
    const char *bad[] = {"-1", "0", "abc", "1e3", "", "99999999999999999999999"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        s = parse("<fetch xmlns='urn:receiptd:0'/>");
        xmpp_stanza_set_attribute(s, "max", bad[i]);
        CHECK(proto_parse_fetch(s, 100, &f) == PROTO_EBADREQ);
        xmpp_stanza_release(s);
    }
    const char *unknown[] = {"nope", "12", "-ab", "12-", "0-ab", "12-XYZ"};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        s = parse("<fetch xmlns='urn:receiptd:0'/>");
        xmpp_stanza_set_attribute(s, "after", unknown[i]);
        CHECK(proto_parse_fetch(s, 100, &f) == PROTO_ENOTFOUND);
        xmpp_stanza_release(s);
    }
}

static void test_ack_and_summary(void)
{
    const char *ids[3];
    size_t n;
    xmpp_stanza_t *s = parse("<ack xmlns='urn:receiptd:0'><item id='1-a'/> <item id='2-b'/></ack>");
    CHECK(proto_parse_ack(s, ids, 3, &n) == PROTO_OK && n == 2);
    CHECK_STR(ids[1], "2-b");
    xmpp_stanza_release(s);
    s = parse("<ack xmlns='urn:receiptd:0'><item id='1'/><item id='2'/><item id='3'/><item "
              "id='4'/></ack>");
    CHECK(proto_parse_ack(s, ids, 3, &n) == PROTO_ETOOMANY);
    xmpp_stanza_release(s);
    s = parse("<ack xmlns='urn:receiptd:0'><item/></ack>");
    CHECK(proto_parse_ack(s, ids, 3, &n) == PROTO_EBADREQ);
    xmpp_stanza_release(s);
    s = parse("<ack xmlns='urn:receiptd:0'/>");
    CHECK(proto_parse_ack(s, ids, 3, &n) == PROTO_EBADREQ);
    xmpp_stanza_release(s);

    bool ids_on;
    s = parse("<summary xmlns='urn:receiptd:0' ids='true'/>");
    CHECK(proto_parse_summary(s, &ids_on) == PROTO_OK && ids_on);
    xmpp_stanza_release(s);
    s = parse("<summary xmlns='urn:receiptd:0' ids='maybe'/>");
    CHECK(proto_parse_summary(s, &ids_on) == PROTO_EBADREQ);
    xmpp_stanza_release(s);
}

static void test_receipt(void)
{
    const char *id;
    xmpp_stanza_t *s =
        parse("<message id='1'><body>x</body><request xmlns='urn:xmpp:receipts'/></message>");
    CHECK(proto_parse_receipt(s, &id) == PROTO_RECEIPT_REQUEST);
    xmpp_stanza_release(s);
    s = parse("<message><received xmlns='urn:xmpp:receipts' id='m1'/></message>");
    CHECK(proto_parse_receipt(s, &id) == PROTO_RECEIPT_RECEIVED);
    CHECK_STR(id, "m1");
    xmpp_stanza_release(s);
    /* Same local name, other namespace: not a receipt. */
    s = parse("<message><request xmlns='urn:other'/></message>");
    CHECK(proto_parse_receipt(s, &id) == PROTO_RECEIPT_NONE);
    xmpp_stanza_release(s);
}

static void test_build(void)
{
    char *text;
    size_t len;
    xmpp_stanza_t *in = parse("<iq type='get' id='q1' from='a@b/c' to='r.b'><x/></iq>");
    xmpp_stanza_t *err = proto_build_error(ctx, in, "cancel", "service-unavailable", "no <way>");
    xmpp_stanza_to_text(err, &text, &len);
    CHECK(strstr(text, "type=\"error\"") && strstr(text, "to=\"a@b/c\"") &&
          strstr(text, "from=\"r.b\"") && strstr(text, "id=\"q1\""));
    CHECK(strstr(text, "<service-unavailable xmlns=\"urn:ietf:params:xml:ns:xmpp-stanzas\"/>"));
    CHECK(strstr(text, "no &lt;way&gt;"));
    xmpp_free(ctx, text);
    xmpp_stanza_release(err);
    xmpp_stanza_release(in);

    proto_buf_t sb;
    proto_buf_init(&sb);
    proto_compose_stored(&sb, "bob\\40b@r.b", "a@b/c", "m&1", "7-ab");
    CHECK(proto_buf_finish(&sb) == 0);
    xmpp_stanza_t *st = parse(sb.data);
    xmpp_stanza_t *sc = st ? xmpp_stanza_get_child_by_name(st, "stored") : NULL;
    CHECK(st && sc);
    if (sc) {
        CHECK_STR(xmpp_stanza_get_type(st), "headline");
        CHECK_STR(xmpp_stanza_get_from(st), "bob\\40b@r.b");
        CHECK_STR(xmpp_stanza_get_to(st), "a@b/c");
        CHECK_STR(xmpp_stanza_get_ns(sc), "urn:receiptd:0");
        CHECK_STR(xmpp_stanza_get_attribute(sc, "id"), "m&1");
        CHECK_STR(xmpp_stanza_get_attribute(sc, "stanza-id"), "7-ab");
    }
    if (st)
        xmpp_stanza_release(st);
    proto_buf_free(&sb);

    char stamp[40];
    proto_format_stamp(1764052406123LL, stamp, sizeof stamp);
    CHECK_STR(stamp, "2025-11-25T06:33:26.123Z");
}

static void test_inner_and_compose(void)
{
    xmpp_stanza_t *m = parse("<message id='x&amp;1' type='chat'><body>a &lt; b</body>"
                             "<stanza-id xmlns='urn:xmpp:sid:0' by='r.b' id='forged'/>"
                             "<stanza-id xmlns='urn:xmpp:sid:0' by='other' id='kept'/></message>");
    proto_buf_t inner, blob, out;
    proto_buf_init(&inner);
    proto_buf_init(&blob);
    proto_buf_init(&out);
    CHECK(proto_serialize_inner(m, "r.b", &inner) == 0);
    CHECK(strstr(inner.data, "forged") == NULL);
    CHECK(strstr(inner.data, "kept") != NULL);
    CHECK(strstr(inner.data, "a &lt; b") != NULL);

    store_blob_encode(&blob, 1000, STORE_BLOB_RECEIPT, "a@b/c", "chat", "x&1", inner.data,
                      inner.len);
    CHECK(proto_buf_finish(&blob) == 0);
    store_blob_t *b = malloc(sizeof *b);
    CHECK(store_blob_decode(blob.data, blob.len, b) == 0);
    CHECK(b->stamp_ms == 1000 && b->flags == STORE_BLOB_RECEIPT);
    CHECK_STR(b->from, "a@b/c");
    CHECK_STR(b->id, "x&1");
    CHECK(b->inner_len == inner.len && memcmp(b->inner, inner.data, inner.len) == 0);
    CHECK(store_blob_decode("garbage", 7, b) < 0);
    CHECK(store_blob_decode("1 5 0 99 0 0\nshort", 18, b) < 0);

    proto_msg_t pm = {b->from, b->type, b->id, b->inner, b->inner_len};
    proto_compose_forwarded(&out, &pm, "bob@b", "3-ab", "r.b", 1000);
    CHECK(proto_buf_finish(&out) == 0);
    /* The composed text parses back, with the message in jabber:client and our stanza-id. */
    xmpp_stanza_t *fwd = parse(out.data);
    CHECK(fwd != NULL);
    if (fwd) {
        xmpp_stanza_t *msg = xmpp_stanza_get_child_by_name(fwd, "message");
        CHECK(msg && strcmp(xmpp_stanza_get_ns(msg), "jabber:client") == 0);
        CHECK(msg && strcmp(xmpp_stanza_get_id(msg), "x&1") == 0);
        xmpp_stanza_t *sid =
            msg ? xmpp_stanza_get_child_by_name_and_ns(msg, "stanza-id", "urn:xmpp:sid:0") : NULL;
        const char *sid_id = sid ? xmpp_stanza_get_attribute(sid, "id") : NULL;
        /* The forged one is gone; ours is last. */
        xmpp_stanza_t *last = NULL;
        for (xmpp_stanza_t *c = msg ? xmpp_stanza_get_children(msg) : NULL; c;
             c = xmpp_stanza_get_next(c))
            last = c;
        CHECK(sid_id != NULL);
        CHECK(last && strcmp(xmpp_stanza_get_attribute(last, "id"), "3-ab") == 0);
        xmpp_stanza_release(fwd);
    }
    char num[PROTO_U64_MAX];
    CHECK(proto_format_u64(num, 0) == 1 && strcmp(num, "0") == 0);
    CHECK(proto_format_u64(num, UINT64_MAX) == 20 && strcmp(num, "18446744073709551615") == 0);
    /* Every digit count, against snprintf. */
    bool same = true;
    for (uint64_t v = 1, k = 0; k < 20; k++, v = v * 10 + k % 10) {
        const uint64_t tries[] = {v, v - 1, v + 1, v * 9 / 10};
        for (size_t t = 0; t < 4; t++) {
            char want[32];
            int wl = snprintf(want, sizeof want, "%" PRIu64, tries[t]);
            if (proto_format_u64(num, tries[t]) != (size_t)wl || strcmp(num, want) != 0)
                same = false;
        }
    }
    CHECK(same);
    store_blob_t *b2 = malloc(sizeof *b2);
    /* The header is exactly what the Lua scripts match: "1 STAMP FLAGS LF LT LI\n". */
    proto_buf_t h;
    proto_buf_init(&h);
    store_blob_encode(&h, -42, 3, "f", NULL, "", "<x/>", 4);
    CHECK(proto_buf_finish(&h) == 0 && h.len == 19 &&
          memcmp(h.data, "1 -42 3 1 0 0\nf<x/>", 19) == 0);
    CHECK(store_blob_decode(h.data, h.len, b2) == 0 && b2->stamp_ms == -42 && b2->flags == 3 &&
          strcmp(b2->from, "f") == 0 && b2->type[0] == '\0' && b2->inner_len == 4);
    proto_buf_free(&h);
    const char *bad[] = {"1 +5 0 0 0 0\n", "1  5 0 0 0 0\n",
                         "1 5 0 0 0 0",    "2 5 0 0 0 0\n",
                         "1 5 0 0 0 0 \n", "1 1234567890123456789 0 0 0 0\n",
                         "1 5 0 0 0 x\n",  "1 5 4294967296 0 0 0\n",
                         "1 -\n",          ""};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        CHECK(store_blob_decode(bad[i], strlen(bad[i]), b2) < 0);
    free(b2);
    free(b);
    proto_buf_free(&inner);
    proto_buf_free(&blob);
    proto_buf_free(&out);
    xmpp_stanza_release(m);
}

/* Same names, attributes (in any order: libstrophe keeps them in a hash), text and children. */
static bool same_tree(xmpp_stanza_t *a, xmpp_stanza_t *b)
{
    if (xmpp_stanza_is_text(a) || xmpp_stanza_is_text(b))
        return xmpp_stanza_is_text(a) && xmpp_stanza_is_text(b) &&
               strcmp(xmpp_stanza_get_text_ptr(a), xmpp_stanza_get_text_ptr(b)) == 0;
    int n = xmpp_stanza_get_attribute_count(a);
    if (strcmp(xmpp_stanza_get_name(a), xmpp_stanza_get_name(b)) != 0 ||
        n != xmpp_stanza_get_attribute_count(b) || n > 32)
        return false;
    const char *attrs[64];
    int got = xmpp_stanza_get_attributes(a, attrs, 64);
    for (int i = 0; i + 1 < got; i += 2) {
        const char *v = xmpp_stanza_get_attribute(b, attrs[i]);
        if (!v || strcmp(v, attrs[i + 1]) != 0)
            return false;
    }
    xmpp_stanza_t *x = xmpp_stanza_get_children(a), *y = xmpp_stanza_get_children(b);
    for (; x && y; x = xmpp_stanza_get_next(x), y = xmpp_stanza_get_next(y))
        if (!same_tree(x, y))
            return false;
    return !x && !y;
}

/* The inner serializer against libstrophe's own: the same tree either way, whatever it holds
 * (nesting, empty elements, many attributes, characters that need escaping, mixed text). */
static void test_inner_roundtrip(void)
{
    xmpp_stanza_t *m = parse(
        "<message><body>1 &amp; 2 &lt; 3 &gt; 0 &apos;q&apos; &quot;d&quot;</body>"
        "<x xmlns='jabber:x:data' type='form'><field var='a&amp;b' label='&lt;&apos;&quot;'>"
        "<value>v</value><value/></field>text <b>bold</b> tail</x>"
        "<many a='1' b='2' c='3' d='4' e='5' f='6' g='7' h='8' i='9' j='10' k='11' l='12' m='13' "
        "n='14' o='15' p='16' q='17' r='18'/></message>");
    proto_buf_t inner, wrapped;
    proto_buf_init(&inner);
    proto_buf_init(&wrapped);
    CHECK(m && proto_serialize_inner(m, "r.b", &inner) == 0);
    proto_buf_append_str(&wrapped, "<message>");
    proto_buf_append(&wrapped, inner.data, inner.len);
    proto_buf_append_str(&wrapped, "</message>");
    CHECK(proto_buf_finish(&wrapped) == 0);
    xmpp_stanza_t *back = parse(wrapped.data);
    CHECK(back != NULL);
    CHECK(m && back && same_tree(m, back));
    if (back)
        xmpp_stanza_release(back);
    if (m)
        xmpp_stanza_release(m);
    proto_buf_free(&inner);
    proto_buf_free(&wrapped);
}

/* Text escaped for XML: runs between the escaped characters are copied whole. */
static void test_escape(void)
{
    static const char *const cases[][2] = {
        {"", ""},
        {"plain text", "plain text"},
        {"&", "&amp;"},
        {"a<b>c", "a&lt;b&gt;c"},
        {"''\"\"", "&apos;&apos;&quot;&quot;"},
        {"ends with &", "ends with &amp;"},
        {"<start", "&lt;start"},
        {"\xc3\xa9t\xc3\xa9 & co", "\xc3\xa9t\xc3\xa9 &amp; co"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        proto_buf_t b;
        proto_buf_init(&b);
        proto_buf_append(&b, "[", 1);
        proto_buf_append_xml(&b, cases[i][0]);
        CHECK(proto_buf_finish(&b) == 0);
        CHECK_STR(b.data + 1, cases[i][1]);
        proto_buf_free(&b);
    }
}

int main(void)
{
    xmpp_initialize();
    ctx = xmpp_ctx_new(NULL, NULL);
    test_escape();
    test_fetch();
    test_inner_roundtrip();
    test_ack_and_summary();
    test_receipt();
    test_build();
    test_inner_and_compose();
    xmpp_ctx_free(ctx);
    xmpp_shutdown();
    return check_report();
}
