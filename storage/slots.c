/* CRC16 as Redis Cluster defines it (XMODEM: polynomial 0x1021, initial value 0), bit by bit:
 * it runs once per command, on a key of a few dozen bytes, so a table buys nothing. */
#include "slots.h"

#include <stdio.h>
#include <string.h>

#include "buf.h"

uint16_t store_crc16(const char *buf, size_t len)
{
    uint16_t crc = 0;
    for (size_t i = 0; i < len; i++) {
        crc ^= (uint16_t)((unsigned char)buf[i] << 8);
        for (int b = 0; b < 8; b++)
            crc = crc & 0x8000 ? (uint16_t)(crc << 1 ^ 0x1021) : (uint16_t)(crc << 1);
    }
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
