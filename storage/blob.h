/* The stored form of one message: a short header, then the sender's full JID, the message type
 * and id, then the serialized children. Lengths are explicit so no field needs escaping. The Lua
 * scripts read the header's stamp and the origin (sender, id) at most (storage/SCHEMA.md, Blob);
 * the header's layout is theirs too. */
#ifndef RECEIPTD_STORAGE_BLOB_H
#define RECEIPTD_STORAGE_BLOB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "jid.h"

#define STORE_BLOB_ID_MAX 1024
#define STORE_BLOB_TYPE_MAX 16

enum {
    STORE_BLOB_RECEIPT = 1u << 0, /* the sender asked for a receipt */
};

typedef struct store_blob {
    int64_t stamp_ms;
    unsigned flags;
    char from[PROTO_JID_MAX];
    char type[STORE_BLOB_TYPE_MAX]; /* "" when absent */
    char id[STORE_BLOB_ID_MAX];     /* "" when absent */
    const char *inner;              /* points into the decoded blob */
    size_t inner_len;
} store_blob_t;

/* Appends the encoded blob to b. type and id may be NULL. */
void store_blob_encode(proto_buf_t *b, int64_t stamp_ms, unsigned flags, const char *from,
                       const char *type, const char *id, const char *inner, size_t inner_len);

/* Returns 0, or -1 when blob is not one we wrote (or a field is over its bound). */
int store_blob_decode(const char *blob, size_t len, store_blob_t *out);

#endif
