#include <stdlib.h>
#include <string.h>

#include "items.h"

char *items_dup(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (p) {
        memcpy(p, s ? s : "", n);
        p[n] = '\0';
    }
    return p;
}

void items_free(items_t *o)
{
    for (size_t i = 0; i < o->n; i++) {
        free((char *)o->v[i].sid);
        free((char *)o->v[i].blob);
    }
    free(o->v);
    o->v = NULL;
    o->n = 0;
}

int items_add(items_t *o, const store_item_t *items, size_t n)
{
    if (!n)
        return 0;
    store_item_t *v = realloc(o->v, (o->n + n) * sizeof *v);
    if (!v)
        return -1;
    o->v = v;
    for (size_t i = 0; i < n; i++) {
        char *sid = items_dup(items[i].sid, items[i].sid ? strlen(items[i].sid) : 0);
        char *blob = items_dup(items[i].blob, items[i].blob_len);
        if (!sid || !blob) {
            free(sid);
            free(blob);
            return -1;
        }
        o->v[o->n++] = (store_item_t){sid, blob, items[i].blob_len};
    }
    return 0;
}

uint64_t items_seq_of(const char *sid)
{
    return sid ? strtoull(sid, NULL, 10) : 0;
}

size_t items_fit(const store_item_t *items, size_t n, unsigned max, size_t max_bytes,
                 size_t overhead)
{
    size_t k = 0, used = 0;
    while (k < n && k < max) {
        size_t cost = items[k].blob_len + overhead;
        if (k > 0 && used + cost > max_bytes)
            break;
        used += cost;
        k++;
    }
    return k;
}
