#include "strophe_mem.h"

#include <stdalign.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SANITIZE_ADDRESS__)
#define STROPHE_MEM_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define STROPHE_MEM_SANITIZED 1
#endif
#endif

/* Every block starts with this header, 16 bytes, which keeps the user's part as aligned as
 * malloc's. Class 1..STROPHE_MEM_CLASSES holds class * STROPHE_MEM_GRAIN bytes; class 0 is a
 * larger block of `size` bytes that malloc owns outright. A cached block keeps the next cached
 * one of its class in its first user bytes. */
typedef struct block {
    alignas(16) size_t cls;
    size_t size;
} block_t;

/* STROPHE_MEM_CLASSES + 1 for a size no class holds. */
static size_t class_of(size_t size)
{
    if (size > STROPHE_MEM_CLASSES * STROPHE_MEM_GRAIN)
        return STROPHE_MEM_CLASSES + 1;
    return size ? (size + STROPHE_MEM_GRAIN - 1) / STROPHE_MEM_GRAIN : 1;
}

static size_t block_bytes(const block_t *b)
{
    return b->cls ? b->cls * STROPHE_MEM_GRAIN : b->size;
}

static void *mem_alloc(size_t size, void *ud)
{
    strophe_mem_t *m = ud;
    size_t cls = class_of(size);
    block_t *b;
    if (cls > STROPHE_MEM_CLASSES) {
        if (size > SIZE_MAX - sizeof *b || !(b = malloc(sizeof *b + size)))
            return NULL;
        b->cls = 0;
        b->size = size;
        return b + 1;
    }
    b = m->free[cls];
    if (b) {
        memcpy(&m->free[cls], b + 1, sizeof(void *));
        m->cached -= cls * STROPHE_MEM_GRAIN;
    } else if (!(b = malloc(sizeof *b + cls * STROPHE_MEM_GRAIN))) {
        return NULL;
    }
    b->cls = cls;
    return b + 1;
}

static void mem_free(void *p, void *ud)
{
    strophe_mem_t *m = ud;
    if (!p)
        return;
    block_t *b = (block_t *)p - 1;
    size_t bytes = b->cls * STROPHE_MEM_GRAIN;
    if (!b->cls || m->cached + bytes > m->cached_max) {
        free(b);
        return;
    }
    memcpy(b + 1, &m->free[b->cls], sizeof(void *));
    m->free[b->cls] = b;
    m->cached += bytes;
}

static void *mem_realloc(void *p, size_t size, void *ud)
{
    if (!p)
        return mem_alloc(size, ud);
    block_t *b = (block_t *)p - 1;
    size_t have = block_bytes(b);
    if (b->cls && size <= have)
        return p;
    if (!b->cls && class_of(size) > STROPHE_MEM_CLASSES) {
        block_t *nb = size > SIZE_MAX - sizeof *b ? NULL : realloc(b, sizeof *b + size);
        if (!nb)
            return NULL;
        nb->size = size;
        return nb + 1;
    }
    void *q = mem_alloc(size, ud);
    if (!q)
        return NULL;
    memcpy(q, p, have < size ? have : size);
    mem_free(p, ud);
    return q;
}

xmpp_mem_t *strophe_mem_init(strophe_mem_t *m, size_t cached_max)
{
    memset(m, 0, sizeof *m);
    m->cached_max = cached_max;
    m->mem = (xmpp_mem_t){mem_alloc, mem_free, mem_realloc, m};
#ifdef STROPHE_MEM_SANITIZED
    return NULL;
#else
    return &m->mem;
#endif
}

void strophe_mem_release(strophe_mem_t *m)
{
    for (size_t c = 1; c <= STROPHE_MEM_CLASSES; c++) {
        while (m->free[c]) {
            block_t *b = m->free[c];
            memcpy(&m->free[c], b + 1, sizeof(void *));
            free(b);
        }
    }
    m->cached = 0;
}
