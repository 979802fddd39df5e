#include "blob.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

static void append_u64(proto_buf_t *b, uint64_t v, char after)
{
    char digits[PROTO_U64_MAX + 1];
    size_t n = proto_format_u64(digits, v);
    digits[n] = after;
    proto_buf_append(b, digits, n + 1);
}

void store_blob_encode(proto_buf_t *b, int64_t stamp_ms, unsigned flags, const char *from,
                       const char *type, const char *id, const char *inner, size_t inner_len)
{
    size_t fl = strlen(from), tl = type ? strlen(type) : 0, il = id ? strlen(id) : 0;
    proto_buf_append(b, stamp_ms < 0 ? "1 -" : "1 ", stamp_ms < 0 ? 3 : 2);
    append_u64(b, stamp_ms < 0 ? 0 - (uint64_t)stamp_ms : (uint64_t)stamp_ms, ' ');
    append_u64(b, flags, ' ');
    append_u64(b, fl, ' ');
    append_u64(b, tl, ' ');
    append_u64(b, il, '\n');
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

/* Digits up to the separator sep, which is consumed: at least one, at most 18 (no overflow). */
static int read_u64(const char **p, const char *end, char sep, uint64_t *out)
{
    uint64_t v = 0;
    const char *q = *p;
    for (; q < end && *q >= '0' && *q <= '9'; q++)
        v = v * 10 + (uint64_t)(*q - '0');
    if (q == *p || q - *p > 18 || q >= end || *q != sep)
        return -1;
    *p = q + 1;
    *out = v;
    return 0;
}

int store_blob_decode(const char *blob, size_t len, store_blob_t *out)
{
    const char *p = blob, *end = blob + len;
    uint64_t stamp, flags, fl, tl, il;
    bool neg;
    if (len < 2 || p[0] != '1' || p[1] != ' ')
        return -1;
    p += 2;
    if ((neg = p < end && *p == '-'))
        p++;
    if (read_u64(&p, end, ' ', &stamp) < 0 || read_u64(&p, end, ' ', &flags) < 0 ||
        read_u64(&p, end, ' ', &fl) < 0 || read_u64(&p, end, ' ', &tl) < 0 ||
        read_u64(&p, end, '\n', &il) < 0 || flags > UINT_MAX)
        return -1;
    if (copy_field(out->from, sizeof out->from, &p, end, fl) < 0 ||
        copy_field(out->type, sizeof out->type, &p, end, tl) < 0 ||
        copy_field(out->id, sizeof out->id, &p, end, il) < 0)
        return -1;
    out->stamp_ms = neg ? -(int64_t)stamp : (int64_t)stamp;
    out->flags = (unsigned)flags;
    out->inner = p;
    out->inner_len = (size_t)(end - p);
    return 0;
}
