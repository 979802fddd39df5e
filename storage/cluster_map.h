/* The client side of Redis Cluster, without I/O: the slot → node map built from CLUSTER SLOTS,
 * routing a command to a slot, MOVED/ASK and the retryable cluster errors, and the seed list of
 * the configuration. Debian's hiredis 0.14 has no cluster client; the store owns the sockets and
 * asks this module where each command goes.
 *
 * Ownership: a cluster_map_t owns its node table. Each node carries one opaque pointer (`conn`)
 * that belongs to the caller: the map copies it across refreshes and hands it back when the node
 * leaves the map, and never looks at it. Node indices are stable for as long as the node stays
 * in the map, so a caller may keep an index instead of a pointer; a pointer to a node is valid
 * only until the next call that changes the map. */
#ifndef RECEIPTD_STORAGE_CLUSTER_MAP_H
#define RECEIPTD_STORAGE_CLUSTER_MAP_H

#include <hiredis/hiredis.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "slots.h"

enum {
    CLUSTER_EINVAL = -1,     /* malformed reply, redirect, command arguments or seed list */
    CLUSTER_ENOMEM = -2,     /* out of memory */
    CLUSTER_ENOROUTE = -3,   /* no node serves the slot (yet): refresh the map */
    CLUSTER_ECROSSSLOT = -4, /* the command's keys are in more than one slot */
    CLUSTER_EUNKNOWN = -5,   /* a command the routing table does not know */
    CLUSTER_EFULL = -6,      /* more nodes or seeds than the bounds below */
};

/* A hostname is at most 253 characters; an IPv6 address with a zone fits easily. */
#define CLUSTER_HOST_MAX 256
#define CLUSTER_ID_MAX 41 /* 40 hex digits */
/* Redis recommends clusters of up to 1000 nodes; masters and replicas both count here. */
#define CLUSTER_NODES_MAX 1024
#define CLUSTER_SEEDS_MAX 64

typedef struct cluster_node {
    char host[CLUSTER_HOST_MAX];
    int port;
    char id[CLUSTER_ID_MAX]; /* "" when not known (learned from a redirect) */
    bool used;               /* false: a free entry, its index may be given to a new node */
    bool master;
    void *conn; /* the caller's; NULL for a new node */
} cluster_node_t;

/* Read-only for the caller, except for nodes[i].conn. */
typedef struct cluster_map {
    int16_t slot[STORE_SLOTS]; /* node index, -1 when no node serves the slot */
    cluster_node_t *nodes;
    int nnodes; /* entries in use or free below this index */
    int cap;
    uint64_t version; /* bumped by every call that changes a slot or a node */
} cluster_map_t;

/* Runs once for each node that leaves the map, while its entry (and conn) can still be read. It
 * must not call back into the map. */
typedef void (*cluster_drop_cb)(void *ud, cluster_node_t *node);

/* Returns an empty map (every slot unserved), or NULL when out of memory; cluster_map_free
 * frees it (without touching the nodes' conn: close them first). */
cluster_map_t *cluster_map_create(void);
void cluster_map_free(cluster_map_t *m); /* NULL is fine */

/* Rebuilds the map from a CLUSTER SLOTS reply. A node that still appears (same host and port)
 * keeps its index and conn; drop(ud, node) runs for each node that no longer does (drop may be
 * NULL). A node sent with an empty or NULL endpoint is at from_host, the host the reply came
 * from; one sent with "?" has no usable endpoint, and its slots stay unserved. Returns 0, or
 * CLUSTER_EINVAL / CLUSTER_ENOMEM / CLUSTER_EFULL with the map unchanged. */
int cluster_map_from_slots(cluster_map_t *m, const redisReply *r, const char *from_host,
                           cluster_drop_cb drop, void *ud);

/* Returns the node at index i, or NULL when i is out of range or the entry is free. */
cluster_node_t *cluster_map_node(cluster_map_t *m, int i);
/* Returns the index of the node at host:port (hostnames compare case-insensitively), or -1. */
int cluster_map_find(const cluster_map_t *m, const char *host, int port);
/* Returns the index of the node at host:port, adding it (without slots) when new: the target of
 * an ASK can be a node so new that CLUSTER SLOTS does not list it yet. CLUSTER_EFULL,
 * CLUSTER_EINVAL for an empty host or a port out of range. */
int cluster_map_add_node(cluster_map_t *m, const char *host, int port, bool master);

/* Returns the index of the master serving slot, or CLUSTER_ENOROUTE. */
int cluster_map_node_for_slot(const cluster_map_t *m, unsigned slot);
/* The routing key of a command: returns 1 with *slot set, 0 for a command without keys (any node
 * can run it), or CLUSTER_ECROSSSLOT, CLUSTER_EUNKNOWN, CLUSTER_EINVAL (a missing key, or an
 * EVAL/EVALSHA numkeys that is not a number or exceeds the arguments). lens may be NULL for
 * NUL-terminated arguments. */
int cluster_command_slot(int argc, const char **argv, const size_t *lens, unsigned *slot);
/* Returns the index of the node that should run the command: the slot's master, or for a
 * command without keys the first master in the map. Errors as above, and CLUSTER_ENOROUTE. */
int cluster_map_node_for_command(const cluster_map_t *m, int argc, const char **argv,
                                 const size_t *lens);

typedef enum {
    CLUSTER_REPLY_OTHER,    /* not a cluster error: the request's own reply */
    CLUSTER_REPLY_MOVED,    /* the slot has a new owner: update the map, send again there */
    CLUSTER_REPLY_ASK,      /* mid-migration: send ASKING then the command to that node, once */
    CLUSTER_REPLY_TRYAGAIN, /* multi-key command mid-migration: same node, after a pause */
    CLUSTER_REPLY_DOWN,     /* CLUSTERDOWN: refresh the map, then again after a pause */
    CLUSTER_REPLY_LOADING,  /* the node is loading its data set: same node, after a pause */
} cluster_reply_kind_t;

typedef struct cluster_redirect {
    cluster_reply_kind_t kind;
    unsigned slot;               /* MOVED, ASK */
    char host[CLUSTER_HOST_MAX]; /* MOVED, ASK; "" means the host that sent the error */
    int port;                    /* MOVED, ASK */
} cluster_redirect_t;

/* Classifies an error reply's text (hiredis' redisReply.str, with or without the leading '-').
 * Returns out->kind (>= 0), or CLUSTER_EINVAL for a MOVED or ASK it cannot read, including one
 * whose endpoint is "?" (a node with no usable address: refresh the map instead). */
int cluster_parse_redirect(const char *err, size_t len, cluster_redirect_t *out);
/* True for the kinds that send the same command again (not OTHER). */
bool cluster_reply_is_retryable(cluster_reply_kind_t kind);

/* Points slot rd->slot at the node of a MOVED (added when new; host "" is from_host) without a
 * full refresh, which the caller may schedule too. The former owner stays in the map, since it
 * may still serve other slots. Returns the node index, or an error with the map unchanged. */
int cluster_map_apply_moved(cluster_map_t *m, const cluster_redirect_t *rd, const char *from_host);

typedef struct cluster_seed {
    char host[CLUSTER_HOST_MAX];
    int port;
} cluster_seed_t;

/* Parses the configuration value "host:port, host:port, ..." (IPv6 as [addr]:port) into
 * seeds[0 .. *n). Whitespace around entries is ignored; an empty entry, a missing or invalid
 * port, a duplicate or more than max entries is an error. Returns 0, CLUSTER_EINVAL or
 * CLUSTER_EFULL. */
int cluster_parse_seeds(const char *s, cluster_seed_t *seeds, size_t max, size_t *n);

/* A short English description of a CLUSTER_E* code. */
const char *cluster_strerror(int err);

#endif
