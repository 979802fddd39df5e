/* Redis Cluster key slots (CRC16/XMODEM of the key's hash tag, mod 16384) and receiptd's index
 * shards. Every key of one user carries the user's bare JID as its hash tag; the global indexes
 * (due retransmissions, online users, archive and eviction candidates) are split into
 * STORE_SHARDS shards, each in its own slot, so no single slot carries all of them. */
#ifndef RECEIPTD_STORAGE_SLOTS_H
#define RECEIPTD_STORAGE_SLOTS_H

#include <stddef.h>
#include <stdint.h>

#define STORE_SLOTS 16384
#define STORE_SHARDS 16

uint16_t store_crc16(const char *buf, size_t len);
/* The cluster slot of a key: of the part between the first '{' and the next '}' when that part
 * is not empty, else of the whole key. */
unsigned store_key_slot(const char *key, size_t len);
/* The index shard of a user (0 .. STORE_SHARDS - 1). */
unsigned store_user_shard(const char *user);
/* The key of index `name` ("due", "online", "arch", "act") in shard n: "rd:{#n}:name". */
int store_index_key(char *buf, size_t len, unsigned shard, const char *name);

#endif
