#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "check.h"
#include "strophe_mem.h"

static bool aligned(const void *p)
{
    return ((uintptr_t)p & 15) == 0;
}

static bool filled(const unsigned char *p, size_t n, unsigned char v)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != v)
            return false;
    return true;
}

/* The allocator's own calls, also in a sanitizer build (where libstrophe is not given it). */
static void test_blocks(void)
{
    strophe_mem_t m;
    strophe_mem_init(&m, 4 * STROPHE_MEM_GRAIN);
    xmpp_mem_t *x = &m.mem;
    static const size_t sizes[] = {0, 1, 15, 16, 17, 100, 511, 512, 513, 4096, 100000};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        unsigned char *p = x->alloc(sizes[i], x->userdata);
        CHECK(p && aligned(p));
        memset(p, 0xab, sizes[i]);
        x->free(p, x->userdata);
    }
    CHECK(m.cached <= m.cached_max);

    /* A freed block of a class comes back for the next request of that class. */
    void *a = x->alloc(20, x->userdata);
    x->free(a, x->userdata);
    CHECK(x->alloc(30, x->userdata) == a);

    /* realloc: in place within the class, moved with its bytes beyond it, large ones too. */
    unsigned char *r = x->realloc(NULL, 10, x->userdata);
    memset(r, 1, 10);
    CHECK(x->realloc(r, 16, x->userdata) == r); /* class 1 holds 16 bytes */
    r = x->realloc(r, 300, x->userdata);
    CHECK(r && aligned(r) && filled(r, 10, 1));
    memset(r, 2, 300);
    r = x->realloc(r, 5000, x->userdata);
    CHECK(r && filled(r, 300, 2));
    memset(r, 3, 5000);
    r = x->realloc(r, 70000, x->userdata);
    CHECK(r && aligned(r) && filled(r, 5000, 3));
    r = x->realloc(r, 8, x->userdata);
    CHECK(r && filled(r, 8, 3));
    x->free(r, x->userdata);
    x->free(a, x->userdata);
    x->free(NULL, x->userdata);

    /* The cache stays within its bound however much is freed. */
    void *many[64];
    for (int i = 0; i < 64; i++)
        many[i] = x->alloc(16, x->userdata);
    for (int i = 0; i < 64; i++)
        x->free(many[i], x->userdata);
    CHECK(m.cached <= m.cached_max && m.cached > 0);
    strophe_mem_release(&m);
    CHECK(m.cached == 0);
}

/* libstrophe on it: a stanza built, serialized and freed. */
static void test_with_strophe(void)
{
    strophe_mem_t m;
    xmpp_ctx_t *ctx = xmpp_ctx_new(strophe_mem_init(&m, 1u << 20), NULL);
    CHECK(ctx != NULL);
    for (int round = 0; round < 3; round++) {
        xmpp_stanza_t *msg = xmpp_message_new(ctx, "chat", "bob@localhost", "m1");
        CHECK(xmpp_message_set_body(msg, "hello & goodbye") == XMPP_EOK);
        char *text;
        size_t len;
        CHECK(xmpp_stanza_to_text(msg, &text, &len) == XMPP_EOK);
        CHECK(strstr(text, "<body>hello &amp; goodbye</body>") != NULL);
        xmpp_free(ctx, text);
        xmpp_stanza_release(msg);
    }
    xmpp_ctx_free(ctx);
    strophe_mem_release(&m);
}

int main(void)
{
    xmpp_initialize();
    test_blocks();
    test_with_strophe();
    xmpp_shutdown();
    return check_report();
}
