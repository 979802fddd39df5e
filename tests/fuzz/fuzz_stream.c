/* libFuzzer target: the XMPP stream parser. The first byte picks the chunk size, so the fuzzer
 * also explores how reads split the input; a small stanza bound makes the oversize path common. */
#include <stddef.h>
#include <stdint.h>

#include "stream.h"

static xmpp_ctx_t *ctx;

static void on_open(void *ud, const char *id)
{
    (void)ud;
    (void)id;
}

static void on_stanza(void *ud, xmpp_stanza_t *s, bool oversize)
{
    char *text;
    size_t len;
    (void)ud;
    (void)oversize;
    /* Serializing walks the whole tree the parser built. */
    if (xmpp_stanza_to_text(s, &text, &len) == XMPP_EOK)
        xmpp_free(ctx, text);
}

static void on_close(void *ud)
{
    (void)ud;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const stream_callbacks_t cb = {on_open, on_stanza, on_close};
    if (!ctx)
        ctx = xmpp_ctx_new(NULL, NULL);
    if (size < 1)
        return 0;
    size_t chunk = (size_t)data[0] % 64 + 1;
    stream_parser_t *p = stream_parser_new(ctx, 512, &cb, NULL);
    for (size_t off = 1; off < size; off += chunk) {
        size_t n = size - off < chunk ? size - off : chunk;
        if (stream_parser_feed(p, (const char *)data + off, n) < 0)
            break;
    }
    stream_parser_free(p);
    return 0;
}
