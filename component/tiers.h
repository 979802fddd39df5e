/* One queue over two tiers: summary, fetch and ack of a device's messages across Redis and the
 * SQLite archive (component/tiers.c). Same contracts as the store_* calls they wrap: 0 means the
 * callback runs exactly once, < 0 means it never runs. */
#ifndef RECEIPTD_TIERS_H
#define RECEIPTD_TIERS_H

#include "store.h"

struct daemon;

int tiers_summary(struct daemon *d, const store_device_t *who, unsigned max, store_summary_cb cb,
                  void *ud);
int tiers_fetch(struct daemon *d, const store_device_t *who, uint64_t after_seq, unsigned max,
                size_t max_bytes, size_t overhead, store_fetch_cb cb, void *ud);
/* The callback gets the messages acknowledged for the first time by any device, from either
 * tier: the receipts to relay. */
int tiers_ack_sids(struct daemon *d, const store_device_t *who, const char *const *sids, size_t n,
                   store_items_cb cb, void *ud);
int tiers_ack_origin(struct daemon *d, const store_device_t *who, const char *sender,
                     const char *orig_id, store_items_cb cb, void *ud);

/* Puts a user's state back in Redis from the archive (or creates it for a new user). */
int tiers_restore(struct daemon *d, const char *user, store_done_cb done, void *ud);
/* Records activity of the user (presence), restoring its state when it was evicted. */
int tiers_touch(struct daemon *d, const char *user);

#endif
