/* Read-ahead of offline pages (component/readahead.c): when a fetch returns a page that is not
 * the last, the pages after it are read from the tiers at once, two pages' worth per read, so the
 * device's next fetch is answered without waiting for Redis. A client pages with after = the
 * last id it got, so it cannot ask for page k+1 before page k arrived; without read-ahead every
 * page waits for a round trip through Redis, queued behind the ack of the page before, while
 * Redis idles as the page travels to the client and the next fetch comes back.
 *
 * A page read ahead holds what a fetch would return now. It is given out only for the same
 * device, cursor, max and byte budget, while younger than READAHEAD_TTL_MS; never as a last page
 * (a page read before the fetch came would miss messages stored in between; appends cannot change
 * a page that is not the last); and it is forgotten when the device acknowledges anything after
 * its cursor, the only change that can take a message out of a non-final page for that device
 * (another device's ack purges a message only once this device acked it too). Memory is bounded:
 * READAHEAD_SLOTS pages at most, READAHEAD_DEPTH per device as a rule.
 *
 * Where two instances share the traffic (ejabberd, PROTOCOL.md 10), an ack handled by the other
 * instance does not reach this one's pages: for up to READAHEAD_TTL_MS a page may still hold a
 * message the device acknowledged there. That is a duplicate delivery, which at-least-once
 * delivery allows (clients dedupe by stanza-id), never a message missing. */
#ifndef RECEIPTD_READAHEAD_H
#define RECEIPTD_READAHEAD_H

#include "store.h"

#define READAHEAD_SLOTS 32
#define READAHEAD_DEPTH 2 /* another read starts when a device has fewer pages ahead */
#define READAHEAD_TTL_MS 2000

struct daemon;
typedef struct readahead readahead_t;

readahead_t *readahead_new(void);
/* After the loop ended: every read it started has called back by then. */
void readahead_free(readahead_t *ra);

/* tiers_fetch(), answered from a page read ahead when there is one (the callback may then run
 * before this returns); any page that is not the last starts the read of the pages after it. */
int readahead_fetch(struct daemon *d, const store_device_t *who, uint64_t after_seq, unsigned max,
                    size_t max_bytes, size_t overhead, store_fetch_cb cb, void *ud);

/* The device is acknowledging sids (n = 0: messages found by origin, whose place is unknown):
 * forgets its page read ahead if the ack may touch it. Call before the ack is sent. */
void readahead_forget(struct daemon *d, const char *user, const char *device,
                      const char *const *sids, size_t n);

#endif
