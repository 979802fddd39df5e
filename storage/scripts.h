/* The Lua scripts that make every multi-key change atomic. Each is loaded once per Redis
 * connection and called by SHA-1 (computed here, so a call never waits for SCRIPT LOAD's reply).
 * Key names are in storage/SCHEMA.md. */
#ifndef RECEIPTD_STORAGE_SCRIPTS_H
#define RECEIPTD_STORAGE_SCRIPTS_H

typedef enum {
    STORE_SCRIPT_PUT,
    STORE_SCRIPT_PUT_MANY,
    STORE_SCRIPT_ACK,
    STORE_SCRIPT_BOUNCE,
    STORE_SCRIPT_DUE,
    STORE_SCRIPT_PRESENCE,
    STORE_SCRIPT_STALE,
    STORE_SCRIPT_SUMMARY,
    STORE_SCRIPT_FETCH,
    STORE_SCRIPT_ARCHIVE_TAKE,
    STORE_SCRIPT_ARCHIVE_DROP,
    STORE_SCRIPT_ACTIVITY,
    STORE_SCRIPT_RESTORE,
    STORE_SCRIPT_EVICT_TAKE,
    STORE_SCRIPT_EVICT_DROP,
    STORE_SCRIPT_INDEX_PUT,
    STORE_SCRIPT_INDEX_CLAIM,
    STORE_SCRIPT_INDEX_SET,
    STORE_SCRIPT_INDEX_USER,
    STORE_SCRIPT_COUNT
} store_script_t;

/* The script's source text. */
const char *store_script_source(store_script_t s);

#endif
