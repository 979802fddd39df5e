/* Key slots must match Redis Cluster's exactly, or every command lands on the wrong node. */
#include <string.h>

#include "check.h"
#include "slots.h"

static unsigned slot(const char *key)
{
    return store_key_slot(key, strlen(key));
}

int main(void)
{
    /* The check value of CRC16/XMODEM, as in the Redis Cluster specification. */
    CHECK(store_crc16("123456789", 9) == 0x31C3);
    /* `redis-cli cluster keyslot foo` and friends. */
    CHECK(slot("foo") == 12182);
    CHECK(slot("bar") == 5061);
    /* Hash tags: the first {...} with something in it decides; an empty one does not count. */
    CHECK(slot("{user1000}.following") == slot("user1000"));
    CHECK(slot("foo{}{bar}") == store_crc16("foo{}{bar}", 10) % STORE_SLOTS);
    CHECK(slot("foo{{bar}}zap") == slot("{bar"));
    CHECK(slot("foo{bar}{zap}") == slot("bar"));
    /* Every key of one user is in one slot. */
    CHECK(slot("rd:{bob@example.com}:q") == slot("rd:{bob@example.com}:m"));
    /* Index shards: stable, in range, and each shard's keys share one slot. */
    char a[64], b[64];
    unsigned s = store_user_shard("bob@example.com");
    CHECK(s < STORE_SHARDS && s == store_user_shard("bob@example.com"));
    CHECK(store_index_key(a, sizeof a, 3, "due") == 0 && strcmp(a, "rd:{#3}:due") == 0);
    CHECK(store_index_key(b, sizeof b, 3, "act") == 0 && slot(a) == slot(b));
    CHECK(store_index_key(a, sizeof a, 15, "online") == 0 && strcmp(a, "rd:{#15}:online") == 0);
    CHECK(store_index_key(a, 16, 15, "online") == 0 && strcmp(a, "rd:{#15}:online") == 0);
    CHECK(store_index_key(a, 15, 15, "online") == -1); /* no room for the NUL */
    unsigned seen = 0;
    for (unsigned i = 0; i < STORE_SHARDS; i++) {
        store_index_key(a, sizeof a, i, "due");
        for (unsigned k = 0; k < i; k++) {
            store_index_key(b, sizeof b, k, "due");
            seen += slot(a) == slot(b);
        }
    }
    CHECK(seen == 0); /* the shards are in distinct slots */
    return check_report();
}
