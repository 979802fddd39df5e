/* The SQLite archive: offline messages that grew old leave Redis for this file, and stay
 * readable (summary, fetch) and acknowledgeable per device exactly as in Redis.
 *
 * Every request runs on the libuv thread pool, one at a time and in the order submitted, so the
 * loop never waits on SQLite or fsync and a later request always sees the effect of an earlier one
 * (an ack queued after the insert of the same message finds it). Callbacks run on the loop. The
 * database is in WAL mode; its schema version is PRAGMA user_version, migrated forward at open. */
#ifndef RECEIPTD_STORAGE_ARCHIVE_H
#define RECEIPTD_STORAGE_ARCHIVE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "store.h"

enum { ARCHIVE_EDB = -10, ARCHIVE_ENOMEM = -11, ARCHIVE_ECLOSED = -12 };

typedef struct archive archive_t;

/* Opens (creating and migrating as needed) before the loop serves traffic. Returns 0, or -1 with
 * a message in err. */
int archive_open(uv_loop_t *loop, const char *path, archive_t **out, char *err, size_t errlen);
/* Refuses new requests; the ones queued still run and call back, then the database is closed
 * and a freed. */
void archive_close(archive_t *a);
/* The schema version this build writes. */
int archive_schema_version(void);

/* One message as it leaves Redis. acked: the devices that acknowledged it, newline-separated (""
 * for none); origin: "<sender bare> <original id>" or NULL. */
typedef struct archive_msg {
    const char *sid;
    int64_t stamp_ms;
    const char *blob;
    size_t blob_len;
    const char *acked;
    const char *origin;
} archive_msg_t;

typedef void (*archive_done_cb)(void *ud, int err);
/* Inserts msgs of user in one transaction; a message already there (same seq) is left as it is,
 * so a retried batch duplicates nothing. */
int archive_put(archive_t *a, const char *user, const archive_msg_t *msgs, size_t n,
                archive_done_cb cb, void *ud);

/* The device acknowledges sids (or, with sids NULL, the message with this origin). receipt_ok[i]
 * false: the receipt for sids[i] was already relayed from Redis. known: the user's known devices
 * (newline-separated); a message every one of them acknowledged is deleted. The callback gets the
 * messages acknowledged for the first time (receipts to relay). */
typedef struct archive_ack {
    const store_device_t *who;
    const char *const *sids;
    const bool *receipt_ok;
    size_t n;
    const char *origin;
    const char *known;
} archive_ack_t;
int archive_ack(archive_t *a, const archive_ack_t *req, store_items_cb cb, void *ud);

/* The device's view of the archive, as store_summary and store_fetch for Redis. */
int archive_summary(archive_t *a, const store_device_t *who, unsigned max, store_summary_cb cb,
                    void *ud);
int archive_fetch(archive_t *a, const store_device_t *who, uint64_t after_seq, unsigned max,
                  size_t max_bytes, size_t overhead, store_fetch_cb cb, void *ud);

/* --- eviction -------------------------------------------------------------------------------- */
/* Inserts the user's messages and, when complete (they are all of them), records the user as
 * evicted with its state, in one transaction. */
int archive_evict(archive_t *a, const store_user_state_t *state, const archive_msg_t *msgs,
                  size_t n, bool complete, archive_done_cb cb, void *ud);
/* Takes the user out of the evicted list and returns the state to put back in Redis: the
 * evicted state, or for a user never evicted seq = the highest archived seq (so new ids never
 * collide with archived ones) and no devices. */
typedef void (*archive_state_cb)(void *ud, int err, const store_user_state_t *state);
int archive_restore(archive_t *a, const char *user, archive_state_cb cb, void *ud);
/* A message for a user who may be evicted: stored here directly if so (with the next seq of the
 * user, deduplicated by origin when origin is set), else nothing happens and seq is the highest
 * seq archived for the user: the state to create in Redis, as archive_restore would return it
 * (no devices, archived = seq > 0), so a new user's first message costs one trip here, not two. */
typedef enum {
    ARCHIVE_PUT_NOT_EVICTED,
    ARCHIVE_PUT_STORED,
    ARCHIVE_PUT_DUP,
} archive_put_status_t;
typedef void (*archive_put_cb)(void *ud, int err, archive_put_status_t status, const char *sid,
                               uint64_t seq);
int archive_put_evicted(archive_t *a, const char *user, const archive_msg_t *msg,
                        const char *suffix, archive_put_cb cb, void *ud);

/* Deletes archived messages stamped before cutoff_ms (retention). */
typedef void (*archive_count_cb)(void *ud, int err, uint64_t n);
int archive_expire(archive_t *a, int64_t cutoff_ms, archive_count_cb cb, void *ud);

/* Totals for --stats. */
typedef struct archive_totals {
    uint64_t users, messages, bytes, evicted;
} archive_totals_t;
typedef void (*archive_totals_cb)(void *ud, int err, const archive_totals_t *t);
int archive_totals(archive_t *a, archive_totals_cb cb, void *ud);

#endif
