#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "stream.h"

static xmpp_ctx_t *ctx;

typedef struct seen {
    int opens, closes, stanzas, oversize;
    char id[64];
    char last[4096];
} seen_t;

static void on_open(void *ud, const char *id)
{
    seen_t *s = ud;
    s->opens++;
    snprintf(s->id, sizeof s->id, "%s", id ? id : "");
}

static void on_stanza(void *ud, xmpp_stanza_t *st, bool oversize)
{
    seen_t *s = ud;
    char *text;
    size_t len;
    s->stanzas++;
    s->oversize += oversize;
    xmpp_stanza_to_text(st, &text, &len);
    snprintf(s->last, sizeof s->last, "%s", text);
    xmpp_free(ctx, text);
}

static void on_close(void *ud)
{
    ((seen_t *)ud)->closes++;
}

static const stream_callbacks_t cb = {on_open, on_stanza, on_close};

#define HEADER                                                                                     \
    "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' "                         \
    "xmlns:stream='http://etherx.jabber.org/streams' id='abc123' from='r.b'>"

static void test_split_feed(void)
{
    seen_t s = {0};
    stream_parser_t *p = stream_parser_new(ctx, 65536, &cb, &s);
    const char *doc = HEADER "<handshake/><message from='a@b/c' to='r.b' xml:lang='en'>"
                             "<body>h&amp;i</body><request xmlns='urn:xmpp:receipts'/>"
                             "<x:y xmlns:x='urn:x'>t</x:y></message></stream:stream>";
    /* One byte at a time: the parser must not depend on how reads split the stream. */
    int rc = 0;
    for (size_t i = 0; doc[i] && rc == 0; i++)
        rc = stream_parser_feed(p, doc + i, 1);
    CHECK(rc == 0);
    CHECK(s.opens == 1 && s.stanzas == 2 && s.oversize == 0);
    CHECK_STR(s.id, "abc123");
    CHECK(strstr(s.last, "<body>h&amp;i</body>") != NULL);
    CHECK(strstr(s.last, "<request xmlns=\"urn:xmpp:receipts\"/>") != NULL);
    CHECK(strstr(s.last, "<y xmlns=\"urn:x\">t</y>") != NULL);
    CHECK(strstr(s.last, "xml:lang=\"en\"") != NULL);
    /* The stream's default namespace is not repeated on the stanza. */
    CHECK(strstr(s.last, "jabber:component:accept") == NULL);
    /* Fed whole, the stream's end is reported too (byte by byte, expat may wait for more). */
    memset(&s, 0, sizeof s);
    CHECK(stream_parser_reset(p) == 0);
    CHECK(stream_parser_feed(p, doc, strlen(doc)) == 0);
    CHECK(s.opens == 1 && s.closes == 1 && s.stanzas == 2);
    stream_parser_free(p);
}

static void test_oversize(void)
{
    seen_t s = {0};
    stream_parser_t *p = stream_parser_new(ctx, 1024, &cb, &s);
    CHECK(stream_parser_feed(p, HEADER, strlen(HEADER)) == 0);
    const char *head = "<message from='a@b/c' to='r.b' id='big'><body>";
    CHECK(stream_parser_feed(p, head, strlen(head)) == 0);
    char chunk[4096];
    memset(chunk, 'x', sizeof chunk);
    for (int i = 0; i < 256; i++) /* 1 MiB of text in a 1 KiB-bounded parser */
        CHECK(stream_parser_feed(p, chunk, sizeof chunk) == 0 || i < 0);
    const char *tail = "</body></message><message from='a@b/c' to='r.b' id='next'/>";
    CHECK(stream_parser_feed(p, tail, strlen(tail)) == 0);
    CHECK(s.stanzas == 2 && s.oversize == 1);
    CHECK(strstr(s.last, "next") != NULL);
    stream_parser_free(p);

    /* Deep nesting is cut at the same place. */
    memset(&s, 0, sizeof s);
    p = stream_parser_new(ctx, 1 << 20, &cb, &s);
    CHECK(stream_parser_feed(p, HEADER "<message id='deep'>", strlen(HEADER) + 19) == 0);
    for (int i = 0; i < 200; i++)
        stream_parser_feed(p, "<a>", 3);
    for (int i = 0; i < 200; i++)
        stream_parser_feed(p, "</a>", 4);
    CHECK(stream_parser_feed(p, "</message>", 10) == 0);
    CHECK(s.stanzas == 1 && s.oversize == 1);
    stream_parser_free(p);
}

static void test_hostile(void)
{
    const char *bad[] = {
        "<!DOCTYPE x [<!ENTITY a 'aaaa'>]><stream:stream xmlns:stream='http://etherx.jabber.org/streams'>",
        HEADER "<message><body>\xff\xfe</body></message>",
        HEADER "<message></iq>",
        "<notastream/>",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        seen_t s = {0};
        stream_parser_t *p = stream_parser_new(ctx, 65536, &cb, &s);
        CHECK(stream_parser_feed(p, bad[i], strlen(bad[i])) < 0);
        CHECK(stream_parser_error(p)[0] != '\0');
        CHECK(s.stanzas == 0);
        /* After a reset the same parser reads a good stream. */
        CHECK(stream_parser_reset(p) == 0);
        CHECK(stream_parser_feed(p, HEADER "<handshake/>", strlen(HEADER) + 12) == 0);
        CHECK(s.stanzas == 1);
        stream_parser_free(p);
    }
    /* Freeing mid-stanza releases what was built. */
    seen_t s = {0};
    stream_parser_t *p = stream_parser_new(ctx, 65536, &cb, &s);
    stream_parser_feed(p, HEADER "<message><body>half", strlen(HEADER) + 19);
    stream_parser_free(p);
}

int main(void)
{
    xmpp_initialize();
    ctx = xmpp_ctx_new(NULL, NULL);
    test_split_feed();
    test_oversize();
    test_hostile();
    xmpp_ctx_free(ctx);
    xmpp_shutdown();
    return check_report();
}
