#include "blob.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void store_blob_encode(proto_buf_t *b, int64_t stamp_ms, unsigned flags, const char *from,
                       const char *type, const char *id, const char *inner, size_t inner_len)
{
    char head[96];
    size_t fl = strlen(from), tl = type ? strlen(type) : 0, il = id ? strlen(id) : 0;
    int n =
        snprintf(head, sizeof head, "1 %" PRId64 " %u %zu %zu %zu\n", stamp_ms, flags, fl, tl, il);
    proto_buf_append(b, head, (size_t)n);
    proto_buf_append(b, from, fl);
    proto_buf_append(b, type ? type : "", tl);
    proto_buf_append(b, id ? id : "", il);
    proto_buf_append(b, inner, inner_len);
}

static int copy_field(char *dst, size_t cap, const char **p, const char *end, size_t n)
{
    if (n >= cap || (size_t)(end - *p) < n)
        return -1;
    memcpy(dst, *p, n);
    dst[n] = '\0';
    *p += n;
    return 0;
}

int store_blob_decode(const char *blob, size_t len, store_blob_t *out)
{
    const char *nl = memchr(blob, '\n', len < 96 ? len : 96);
    char head[96];
    long long stamp;
    unsigned flags;
    size_t fl, tl, il;
    if (!nl)
        return -1;
    memcpy(head, blob, (size_t)(nl - blob));
    head[nl - blob] = '\0';
    if (sscanf(head, "1 %lld %u %zu %zu %zu", &stamp, &flags, &fl, &tl, &il) != 5)
        return -1;
    const char *p = nl + 1, *end = blob + len;
    if (copy_field(out->from, sizeof out->from, &p, end, fl) < 0 ||
        copy_field(out->type, sizeof out->type, &p, end, tl) < 0 ||
        copy_field(out->id, sizeof out->id, &p, end, il) < 0)
        return -1;
    out->stamp_ms = stamp;
    out->flags = flags;
    out->inner = p;
    out->inner_len = (size_t)(end - p);
    return 0;
}
