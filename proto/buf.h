/* A growable byte string for composing stanzas as text. The owner frees it with proto_buf_free;
 * after a failed append the buffer is marked failed and every later append is a no-op, so a
 * composer checks once at the end instead of after every call. */
#ifndef RECEIPTD_PROTO_BUF_H
#define RECEIPTD_PROTO_BUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct proto_buf {
    char *data;
    size_t len;
    size_t cap;
    bool failed;
} proto_buf_t;

void proto_buf_init(proto_buf_t *b);
void proto_buf_free(proto_buf_t *b);
void proto_buf_reset(proto_buf_t *b);
void proto_buf_append(proto_buf_t *b, const char *s, size_t n);
void proto_buf_append_str(proto_buf_t *b, const char *s);
/* Room for n more bytes and a NUL: returns where they go, or NULL (the buffer is then failed).
 * The caller writes at most n bytes there and then calls proto_buf_commit with how many. */
char *proto_buf_claim(proto_buf_t *b, size_t n);
void proto_buf_commit(proto_buf_t *b, size_t n);
/* Appends s with the five XML special characters escaped, fit for text or a quoted attribute. */
void proto_buf_append_xml(proto_buf_t *b, const char *s);
/* Appends " name='value'" with value escaped; nothing when value is NULL. */
void proto_buf_append_attr(proto_buf_t *b, const char *name, const char *value);
/* Writes v in decimal and a NUL into buf (PROTO_U64_MAX bytes); returns the digits' length. By
 * hand, not snprintf: it runs several times for every message stored. */
#define PROTO_U64_MAX 21
size_t proto_format_u64(char *buf, uint64_t v);
/* Returns 0 and a NUL-terminated data, or -1 when any append failed for lack of memory. */
int proto_buf_finish(proto_buf_t *b);

#endif
