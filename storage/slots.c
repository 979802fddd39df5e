/* CRC16 as Redis Cluster defines it (XMODEM: polynomial 0x1021, initial value 0), a byte at a
 * time from a table built on first use: it runs for every put (the user's index shard), and bit
 * by bit it was 2% of receiptd's instructions per stored message. Built on the loop thread
 * before anything else can ask. */
#include "slots.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "buf.h"

static uint16_t crc_table[256];
static bool crc_ready;

static void crc_table_build(void)
{
    for (unsigned i = 0; i < 256; i++) {
        uint16_t crc = (uint16_t)(i << 8);
        for (int b = 0; b < 8; b++)
            crc = crc & 0x8000 ? (uint16_t)(crc << 1 ^ 0x1021) : (uint16_t)(crc << 1);
        crc_table[i] = crc;
    }
    crc_ready = true;
}

uint16_t store_crc16(const char *buf, size_t len)
{
    if (!crc_ready)
        crc_table_build();
    uint16_t crc = 0;
    for (size_t i = 0; i < len; i++)
        crc = (uint16_t)(crc << 8 ^ crc_table[(crc >> 8 ^ (unsigned char)buf[i]) & 0xff]);
    return crc;
}

unsigned store_key_slot(const char *key, size_t len)
{
    const char *open = memchr(key, '{', len);
    if (open) {
        size_t rest = len - (size_t)(open - key) - 1;
        const char *close = memchr(open + 1, '}', rest);
        if (close && close > open + 1)
            return store_crc16(open + 1, (size_t)(close - open - 1)) % STORE_SLOTS;
    }
    return store_crc16(key, len) % STORE_SLOTS;
}

unsigned store_user_shard(const char *user)
{
    return store_crc16(user, strlen(user)) % STORE_SHARDS;
}

/* Four of these per put on a single Redis: no snprintf (see store_cmd_add_num). */
int store_index_key(char *buf, size_t len, unsigned shard, const char *name)
{
    char num[PROTO_U64_MAX];
    size_t dl = proto_format_u64(num, shard), nl = strlen(name);
    if (5 + dl + 2 + nl + 1 > len)
        return -1;
    memcpy(buf, "rd:{#", 5);
    memcpy(buf + 5, num, dl);
    memcpy(buf + 5 + dl, "}:", 2);
    memcpy(buf + 7 + dl, name, nl + 1);
    return 0;
}
