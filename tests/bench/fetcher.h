/* The recipient's side of offline retrieval (proto/PROTOCOL.md 7, 8, 6) the way a client does it:
 * summary, then fetch pages with after='{last}' until complete='true', acking each page as soon as
 * it was read. A page's <batch/> start tag carries its last id, so the fetch of page k+1 leaves as
 * soon as page k starts to arrive and receiptd prepares it while page k is read (a client cannot
 * ask for page k+2 before page k+1 starts). A fetch leaves only while fewer than max_acks acks
 * are unanswered (else at the next answer), so with the ack of the page being read at most
 * max_acks + 1 are in flight. A closing summary checks that the queue is empty. Shared by loadgen (on the component
 * stream, where it plays the server that stamps 'from') and c2sgen (through a real server). */
#ifndef BENCH_FETCHER_H
#define BENCH_FETCHER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef void (*fetcher_send_fn)(void *ud, const char *data, size_t len);

typedef struct fetcher_buf {
    char *data;
    size_t len, cap;
} fetcher_buf_t;

typedef struct fetcher {
    /* set by the caller */
    fetcher_send_fn send;
    void *ud;
    const char *to;   /* the component domain */
    const char *from; /* the recipient's full JID on a component stream; NULL through a server */
    int max;          /* items per fetch */
    int max_acks;
    /* results */
    long queued; /* count in the first summary */
    long left;   /* count in the closing summary; -1 until it came */
    long items, batches, errors;
    uint64_t start_ns, end_ns; /* first summary sent, last ack answered */
    bool done;
    /* state of the stanza being read */
    char kind; /* our iq ids are rb<kind><n>: s(ummary) f(etch) a(ck) z (closing summary) */
    bool is_error, complete;
    char last[128];
    long page_items;
    /* state of the run */
    fetcher_buf_t out, ack;
    long seq, acks_out;
    bool seen_complete, fetch_waiting;
} fetcher_t;

void fetcher_start(fetcher_t *f);
/* Feed every element event of the stream here (see xmlin.h); others' stanzas are ignored. */
void fetcher_on_start(fetcher_t *f, int depth, const char *name, const char **attrs);
void fetcher_on_end(fetcher_t *f, int depth, const char *name);
void fetcher_free(fetcher_t *f);
uint64_t fetcher_now_ns(void);

#endif
