/* Owned copies of store results: what a store or archive callback passes is valid only during the
 * callback, and both the tier merge and the read-ahead keep pages past it. */
#ifndef RECEIPTD_ITEMS_H
#define RECEIPTD_ITEMS_H

#include <stddef.h>
#include <stdint.h>

#include "store.h"

typedef struct items {
    store_item_t *v;
    size_t n;
} items_t;

/* A NUL-terminated copy of the first n bytes of s (s may be NULL: ""); NULL when out of memory. */
char *items_dup(const char *s, size_t n);
/* Appends copies of items; -1 when out of memory (o keeps what was added so far). */
int items_add(items_t *o, const store_item_t *items, size_t n);
void items_free(items_t *o);

/* How many of items, from the first, one fetch page takes: at most max, within max_bytes counting
 * each blob plus overhead, and always at least one (so a single large message cannot stall a
 * reader); the Lua fetch script cuts its pages the same way. */
size_t items_fit(const store_item_t *items, size_t n, unsigned max, size_t max_bytes,
                 size_t overhead);

/* The seq a message id S = "<seq>-<suffix>" begins with (its place in the queue); 0 for NULL. */
uint64_t items_seq_of(const char *sid);

#endif
