/* The allocator libstrophe builds stanzas with: freed blocks of up to 512 bytes are kept per
 * size for reuse, up to a bounded total, instead of going back to malloc. A stored message makes
 * about 28 such allocations (the stanza tree: elements, attribute tables, names, text); glibc's
 * malloc and free took a quarter of receiptd's instructions, and this allocator 16% fewer per
 * stored message in all (callgrind). Loop thread only. Off in an ASan build, whose e2e runs are
 * what check stanza memory: under valgrind it stays on, and memcheck then takes a cached block
 * for an allocated one. */
#ifndef RECEIPTD_STROPHE_MEM_H
#define RECEIPTD_STROPHE_MEM_H

#include <stddef.h>
#include <strophe.h>

enum { STROPHE_MEM_CLASSES = 32, STROPHE_MEM_GRAIN = 16 };

typedef struct strophe_mem {
    xmpp_mem_t mem;                      /* what xmpp_ctx_new gets; its userdata is this struct */
    void *free[STROPHE_MEM_CLASSES + 1]; /* per class, a list of cached blocks */
    size_t cached;                       /* bytes held in the free lists */
    size_t cached_max;                   /* past this, freed blocks go back to malloc */
} strophe_mem_t;

/* Returns the xmpp_mem_t to give xmpp_ctx_new, or NULL (libstrophe's own malloc) in a sanitizer
 * build, where reusing blocks would hide a use after free. */
xmpp_mem_t *strophe_mem_init(strophe_mem_t *m, size_t cached_max);
/* Frees the cached blocks; after xmpp_ctx_free. */
void strophe_mem_release(strophe_mem_t *m);

#endif
