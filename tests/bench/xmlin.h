/* Streaming reader for one XMPP stream, for the bench clients: reports each element's start and
 * end with its depth (0 = the stream root, 1 = a stanza) and never builds a tree or keeps text, so
 * a client costs little next to what it measures. */
#ifndef BENCH_XMLIN_H
#define BENCH_XMLIN_H

#include <stddef.h>

typedef struct xmlin xmlin_t;
typedef void (*xmlin_start_fn)(void *ud, int depth, const char *name, const char **attrs);
typedef void (*xmlin_end_fn)(void *ud, int depth, const char *name);

xmlin_t *xmlin_new(xmlin_start_fn on_start, xmlin_end_fn on_end, void *ud);
/* 0, or -1 on malformed input (the reason goes to stderr). */
int xmlin_feed(xmlin_t *x, const char *data, size_t len);
/* A new document on the same connection: the stream restart after SASL. */
void xmlin_reset(xmlin_t *x);
void xmlin_free(xmlin_t *x);
/* The value of attribute name in an expat attribute list, or NULL. */
const char *xmlin_attr(const char **attrs, const char *name);

#endif
