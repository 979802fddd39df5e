/* storage/cluster_map: CLUSTER SLOTS replies built by hand (hiredis' redisReply is a plain
 * struct), refreshes that must keep the caller's per-node pointers, redirects, routing and the
 * seed list. No Redis needed. */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "cluster_map.h"

/* ---- fake replies ------------------------------------------------------------------------- */

static redisReply *new_reply(int type)
{
    redisReply *r = calloc(1, sizeof *r);
    if (!r)
        abort();
    r->type = type;
    return r;
}

static redisReply *r_int(long long v)
{
    redisReply *r = new_reply(REDIS_REPLY_INTEGER);
    r->integer = v;
    return r;
}

static redisReply *r_str(const char *s)
{
    redisReply *r = new_reply(REDIS_REPLY_STRING);
    r->len = strlen(s);
    r->str = strdup(s);
    if (!r->str)
        abort();
    return r;
}

static redisReply *r_nil(void)
{
    return new_reply(REDIS_REPLY_NIL);
}

static redisReply *r_arr(size_t n, ...)
{
    redisReply *r = new_reply(REDIS_REPLY_ARRAY);
    va_list ap;
    r->elements = n;
    r->element = n ? calloc(n, sizeof *r->element) : NULL;
    if (n && !r->element)
        abort();
    va_start(ap, n);
    for (size_t i = 0; i < n; i++)
        r->element[i] = va_arg(ap, redisReply *);
    va_end(ap);
    return r;
}

static void r_free(redisReply *r)
{
    if (!r)
        return;
    for (size_t i = 0; i < r->elements; i++)
        r_free(r->element[i]);
    free(r->element);
    free(r->str);
    free(r);
}

/* A node entry as Redis 7 sends it: endpoint, port, id, then a (RESP2: flat) metadata map. */
static redisReply *node(const char *host, int port, const char *id)
{
    return r_arr(4, host ? r_str(host) : r_nil(), r_int(port), r_str(id),
                 r_arr(2, r_str("hostname"), r_str("")));
}

static redisReply *range2(int first, int last, redisReply *master, redisReply *replica)
{
    return r_arr(4, r_int(first), r_int(last), master, replica);
}

static redisReply *range1(int first, int last, redisReply *master)
{
    return r_arr(3, r_int(first), r_int(last), master);
}

/* ---- helpers ------------------------------------------------------------------------------ */

static int port_of_slot(cluster_map_t *m, unsigned slot)
{
    cluster_node_t *n = cluster_map_node(m, cluster_map_node_for_slot(m, slot));
    return n ? n->port : -1;
}

static unsigned key_slot(const char *key)
{
    return store_key_slot(key, strlen(key));
}

typedef struct dropped {
    void *conn[16];
    int port[16];
    int n;
} dropped_t;

static void on_drop(void *ud, cluster_node_t *node)
{
    dropped_t *d = ud;
    if (d->n < 16) {
        d->conn[d->n] = node->conn;
        d->port[d->n] = node->port;
    }
    d->n++;
}

static int count_used(cluster_map_t *m)
{
    int n = 0;
    for (int i = 0; i < m->nnodes; i++)
        n += cluster_map_node(m, i) != NULL;
    return n;
}

/* The usual three masters with one replica each, as redis-cli --cluster create lays them out. */
static redisReply *three_masters(void)
{
    return r_arr(
        3, range2(0, 5460, node("127.0.0.1", 7000, "a0"), node("127.0.0.1", 7003, "a3")),
        range2(5461, 10922, node("127.0.0.1", 7001, "a1"), node("127.0.0.1", 7004, "a4")),
        range2(10923, 16383, node("127.0.0.1", 7002, "a2"), node("127.0.0.1", 7005, "a5")));
}

/* ---- CLUSTER SLOTS ------------------------------------------------------------------------ */

static char conns[8]; /* stand-ins for the caller's connections: only their addresses matter */

static void test_slots_basic(void)
{
    cluster_map_t *m = cluster_map_create();
    CHECK(m != NULL);
    CHECK(cluster_map_node_for_slot(m, 0) == CLUSTER_ENOROUTE);
    CHECK(cluster_map_node_for_command(m, 1, (const char *[]){"PING"}, NULL) == CLUSTER_ENOROUTE);

    redisReply *r = three_masters();
    dropped_t d = {0};
    CHECK(cluster_map_from_slots(m, r, "127.0.0.1", on_drop, &d) == 0);
    CHECK(d.n == 0);
    CHECK(count_used(m) == 6);
    CHECK(m->version == 1);
    CHECK(port_of_slot(m, 0) == 7000);
    CHECK(port_of_slot(m, 5460) == 7000);
    CHECK(port_of_slot(m, 5461) == 7001);
    CHECK(port_of_slot(m, 10922) == 7001);
    CHECK(port_of_slot(m, 10923) == 7002);
    CHECK(port_of_slot(m, 16383) == 7002);
    CHECK(cluster_map_node_for_slot(m, STORE_SLOTS) == CLUSTER_ENOROUTE);
    int i7000 = cluster_map_find(m, "127.0.0.1", 7000);
    int i7003 = cluster_map_find(m, "127.0.0.1", 7003);
    CHECK(i7000 >= 0 && i7003 >= 0);
    CHECK(cluster_map_find(m, "127.0.0.1", 7009) == -1);
    CHECK(cluster_map_node(m, i7000)->master && !cluster_map_node(m, i7003)->master);
    CHECK_STR(cluster_map_node(m, i7000)->id, "a0");
    CHECK(cluster_map_node(m, -1) == NULL && cluster_map_node(m, m->nnodes) == NULL);
    /* Every slot is served by a master. */
    int bad = 0;
    for (unsigned s = 0; s < STORE_SLOTS; s++) {
        cluster_node_t *n = cluster_map_node(m, m->slot[s]);
        bad += !n || !n->master;
    }
    CHECK(bad == 0);

    /* The caller opens connections; the same reply again changes nothing and keeps them. */
    for (int i = 0; i < m->nnodes; i++)
        m->nodes[i].conn = &conns[i];
    CHECK(cluster_map_from_slots(m, r, "127.0.0.1", on_drop, &d) == 0);
    CHECK(d.n == 0 && m->version == 1);
    CHECK(cluster_map_node(m, i7000)->conn == &conns[i7000]);
    r_free(r);

    /* Resharding moves slots 0..999 from 7000 to 7001: indices and connections survive. */
    int i7001 = cluster_map_find(m, "127.0.0.1", 7001);
    r = r_arr(4, range2(0, 999, node("127.0.0.1", 7001, "a1"), node("127.0.0.1", 7004, "a4")),
              range2(1000, 5460, node("127.0.0.1", 7000, "a0"), node("127.0.0.1", 7003, "a3")),
              range2(5461, 10922, node("127.0.0.1", 7001, "a1"), node("127.0.0.1", 7004, "a4")),
              range2(10923, 16383, node("127.0.0.1", 7002, "a2"), node("127.0.0.1", 7005, "a5")));
    CHECK(cluster_map_from_slots(m, r, "127.0.0.1", on_drop, &d) == 0);
    r_free(r);
    CHECK(d.n == 0 && m->version == 2);
    CHECK(m->slot[0] == i7001 && m->slot[999] == i7001 && m->slot[1000] == i7000);
    CHECK(cluster_map_find(m, "127.0.0.1", 7001) == i7001);
    CHECK(cluster_map_node(m, i7001)->conn == &conns[i7001]);
    CHECK(count_used(m) == 6);

    /* 7002 fails and its replica 7005 takes over; 7002 leaves the map, reported with its
     * connection so the caller can close it. */
    int i7002 = cluster_map_find(m, "127.0.0.1", 7002);
    int i7005 = cluster_map_find(m, "127.0.0.1", 7005);
    r = r_arr(4, range2(0, 999, node("127.0.0.1", 7001, "a1"), node("127.0.0.1", 7004, "a4")),
              range2(1000, 5460, node("127.0.0.1", 7000, "a0"), node("127.0.0.1", 7003, "a3")),
              range2(5461, 10922, node("127.0.0.1", 7001, "a1"), node("127.0.0.1", 7004, "a4")),
              range1(10923, 16383, node("127.0.0.1", 7005, "a5")));
    CHECK(cluster_map_from_slots(m, r, "127.0.0.1", on_drop, &d) == 0);
    r_free(r);
    CHECK(d.n == 1 && d.port[0] == 7002 && d.conn[0] == &conns[i7002]);
    CHECK(m->version == 3);
    CHECK(count_used(m) == 5);
    CHECK(cluster_map_find(m, "127.0.0.1", 7002) == -1);
    CHECK(cluster_map_node(m, i7002) == NULL);
    CHECK(m->slot[16383] == i7005 && cluster_map_node(m, i7005)->master);
    CHECK(cluster_map_node(m, i7005)->conn == &conns[i7005]);

    /* A new replica for 7005 takes the freed entry, with no connection yet. */
    d.n = 0;
    r = r_arr(4, range2(0, 999, node("127.0.0.1", 7001, "a1"), node("127.0.0.1", 7004, "a4")),
              range2(1000, 5460, node("127.0.0.1", 7000, "a0"), node("127.0.0.1", 7003, "a3")),
              range2(5461, 10922, node("127.0.0.1", 7001, "a1"), node("127.0.0.1", 7004, "a4")),
              range2(10923, 16383, node("127.0.0.1", 7005, "a5"), node("127.0.0.1", 7006, "a6")));
    CHECK(cluster_map_from_slots(m, r, "127.0.0.1", on_drop, &d) == 0);
    r_free(r);
    CHECK(d.n == 0 && m->version == 4);
    int i7006 = cluster_map_find(m, "127.0.0.1", 7006);
    CHECK(i7006 == i7002);
    CHECK(cluster_map_node(m, i7006)->conn == NULL && !cluster_map_node(m, i7006)->master);

    /* An empty reply (every node gone) drops all of them. */
    d.n = 0;
    r = r_arr(0);
    CHECK(cluster_map_from_slots(m, r, "127.0.0.1", on_drop, &d) == 0);
    r_free(r);
    CHECK(d.n == 6 && m->nnodes == 0 && cluster_map_node_for_slot(m, 0) == CLUSTER_ENOROUTE);
    cluster_map_free(m);
    cluster_map_free(NULL);
}

static void test_slots_endpoints(void)
{
    cluster_map_t *m = cluster_map_create();
    /* "" (a node that does not know its address) and NULL (unknown-endpoint) both mean: the
     * host the reply came from. */
    redisReply *r = r_arr(2, range1(0, 8191, node("", 7000, "a0")),
                          range1(8192, 16383, node(NULL, 7001, "a1")));
    CHECK(cluster_map_from_slots(m, r, NULL, NULL, NULL) == CLUSTER_EINVAL);
    CHECK(m->version == 0 && m->nnodes == 0);
    CHECK(cluster_map_from_slots(m, r, "", NULL, NULL) == CLUSTER_EINVAL);
    CHECK(cluster_map_from_slots(m, r, "10.0.0.5", NULL, NULL) == 0);
    r_free(r);
    CHECK(cluster_map_find(m, "10.0.0.5", 7000) == m->slot[0]);
    CHECK(cluster_map_find(m, "10.0.0.5", 7001) == m->slot[16383]);
    CHECK(count_used(m) == 2);

    /* "?": no usable endpoint (hostname preferred, none set). Its range is unserved, the rest
     * routes; an IPv6 endpoint and a hostname are kept as they are. */
    r = r_arr(3, range1(0, 99, node("?", 7000, "a0")), range1(100, 200, node("::1", 7001, "a1")),
              range1(201, 16383, node("Redis-2.Example", 7002, "a2")));
    CHECK(cluster_map_from_slots(m, r, "10.0.0.5", NULL, NULL) == 0);
    r_free(r);
    CHECK(cluster_map_node_for_slot(m, 0) == CLUSTER_ENOROUTE);
    CHECK(cluster_map_node_for_slot(m, 99) == CLUSTER_ENOROUTE);
    CHECK(port_of_slot(m, 100) == 7001);
    CHECK_STR(cluster_map_node(m, m->slot[100])->host, "::1");
    CHECK(cluster_map_find(m, "redis-2.example", 7002) == m->slot[201]);

    /* Redis before 4.0: [ip, port] without an id. */
    r = r_arr(1, r_arr(3, r_int(0), r_int(16383), r_arr(2, r_str("127.0.0.1"), r_int(6379))));
    CHECK(cluster_map_from_slots(m, r, NULL, NULL, NULL) == 0);
    r_free(r);
    CHECK(port_of_slot(m, 42) == 6379 && cluster_map_node(m, m->slot[42])->id[0] == '\0');
    cluster_map_free(m);
}

/* A reply that is not a clean CLUSTER SLOTS leaves the map exactly as it was. */
static void test_slots_malformed(void)
{
    cluster_map_t *m = cluster_map_create();
    redisReply *good = three_masters();
    CHECK(cluster_map_from_slots(m, good, NULL, NULL, NULL) == 0);
    r_free(good);
    for (int i = 0; i < m->nnodes; i++)
        m->nodes[i].conn = &conns[i];
    cluster_map_t *copy = malloc(sizeof *copy);
    CHECK(copy != NULL);
    memcpy(copy, m, sizeof *m);
    cluster_node_t nodes[8];
    memcpy(nodes, m->nodes, (size_t)m->nnodes * sizeof *nodes);

    redisReply *bad[] = {
        NULL,
        new_reply(REDIS_REPLY_ERROR),
        r_int(3),
        /* overlapping ranges */
        r_arr(2, range1(0, 100, node("h", 1, "x")), range1(100, 200, node("h", 2, "y"))),
        range1(0, 16383, node("h", 1, "x")), /* a range, not an array of ranges */
        r_arr(1, range1(0, 16384, node("h", 1, "x"))),
        r_arr(1, range1(-1, 5, node("h", 1, "x"))),
        r_arr(1, range1(9, 5, node("h", 1, "x"))),
        r_arr(1, range1(0, 5, node("h", 0, "x"))),
        r_arr(1, range1(0, 5, node("h", 65536, "x"))),
        r_arr(1, range1(0, 5, node("two words", 1, "x"))),
        r_arr(1, r_arr(2, r_int(0), r_int(5))),
        r_arr(1, r_arr(3, r_str("0"), r_int(5), node("h", 1, "x"))),
        r_arr(1, r_arr(3, r_int(0), r_int(5), r_arr(1, r_str("h")))),
        r_arr(1, r_arr(3, r_int(0), r_int(5), r_arr(2, r_int(1), r_int(1)))),
        /* a bad replica spoils the reply too, even after new nodes were staged */
        r_arr(2, range1(0, 5, node("new", 1, "x")), range2(6, 9, node("new", 2, "y"), r_int(1))),
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        int rc = cluster_map_from_slots(m, bad[k], "127.0.0.1", NULL, NULL);
        if (rc != CLUSTER_EINVAL)
            fprintf(stderr, "malformed reply %zu accepted (%d)\n", k, rc);
        CHECK(rc == CLUSTER_EINVAL);
        CHECK(memcmp(m->slot, copy->slot, sizeof m->slot) == 0);
        CHECK(m->version == copy->version && m->nnodes == copy->nnodes);
        CHECK(memcmp(nodes, m->nodes, (size_t)m->nnodes * sizeof *nodes) == 0);
        r_free(bad[k]);
    }
    free(copy);
    cluster_map_free(m);
}

/* ---- redirects ---------------------------------------------------------------------------- */

static int redirect(const char *s, cluster_redirect_t *rd)
{
    return cluster_parse_redirect(s, strlen(s), rd);
}

static void test_redirects(void)
{
    cluster_redirect_t rd;
    CHECK(redirect("MOVED 3999 127.0.0.1:6381", &rd) == CLUSTER_REPLY_MOVED);
    CHECK(rd.kind == CLUSTER_REPLY_MOVED && rd.slot == 3999 && rd.port == 6381);
    CHECK_STR(rd.host, "127.0.0.1");
    CHECK(redirect("-ASK 0 10.1.2.3:7000", &rd) == CLUSTER_REPLY_ASK);
    CHECK(rd.slot == 0 && rd.port == 7000);
    CHECK_STR(rd.host, "10.1.2.3");
    /* Redis writes IPv6 without brackets; brackets are read too. */
    CHECK(redirect("MOVED 16383 ::1:7001", &rd) == CLUSTER_REPLY_MOVED);
    CHECK(rd.slot == 16383 && rd.port == 7001);
    CHECK_STR(rd.host, "::1");
    CHECK(redirect("ASK 12 [fe80::1%eth0]:7002", &rd) == CLUSTER_REPLY_ASK);
    CHECK_STR(rd.host, "fe80::1%eth0");
    CHECK(rd.port == 7002);
    /* Redis 7 unknown-endpoint: same host as the connection, this port. */
    CHECK(redirect("MOVED 3999 :6380", &rd) == CLUSTER_REPLY_MOVED);
    CHECK(rd.host[0] == '\0' && rd.port == 6380);
    CHECK(redirect("MOVED 5 redis-1.example.org:6380@16380", &rd) == CLUSTER_REPLY_MOVED);
    CHECK_STR(rd.host, "redis-1.example.org");
    CHECK(rd.port == 6380);
    /* Not hiredis' NUL-terminated string: only len bytes count. */
    CHECK(cluster_parse_redirect("MOVED 7 h:1234567", 14, &rd) == CLUSTER_REPLY_MOVED);
    CHECK(rd.port == 1234);

    const char *bad[] = {"MOVED",        "MOVED ",          "MOVED 3999",      "MOVED 3999 ",
                         "MOVED x h:1",  "MOVED 16384 h:1", "MOVED -1 h:1",    "MOVED 1 h",
                         "MOVED 1 h:",   "MOVED 1 h:0",     "MOVED 1 h:65536", "MOVED 1 h:1x",
                         "MOVED 1  h:1", "MOVED 1 ?:7000",  "ASK 1 [::1:7000", "MOVED 1 h:1@",
                         "MOVED 1 []:1", "MOVED 1 h h:1"};
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        int rc = redirect(bad[k], &rd);
        if (rc != CLUSTER_EINVAL)
            fprintf(stderr, "bad redirect '%s' read as %d\n", bad[k], rc);
        CHECK(rc == CLUSTER_EINVAL && rd.kind == CLUSTER_REPLY_OTHER);
    }

    CHECK(redirect("TRYAGAIN Multiple keys request during rehashing of slot", &rd) ==
          CLUSTER_REPLY_TRYAGAIN);
    CHECK(redirect("CLUSTERDOWN The cluster is down", &rd) == CLUSTER_REPLY_DOWN);
    CHECK(redirect("CLUSTERDOWN Hash slot not served", &rd) == CLUSTER_REPLY_DOWN);
    CHECK(redirect("LOADING Redis is loading the dataset in memory", &rd) == CLUSTER_REPLY_LOADING);
    CHECK(redirect("TRYAGAIN", &rd) == CLUSTER_REPLY_TRYAGAIN);
    CHECK(cluster_reply_is_retryable(CLUSTER_REPLY_DOWN));
    CHECK(!cluster_reply_is_retryable(CLUSTER_REPLY_OTHER));
    const char *other[] = {"ERR unknown command",
                           "NOSCRIPT No matching script",
                           "MOVEDX 1 h:1",
                           "CROSSSLOT Keys in request don't hash to the same slot",
                           "",
                           "-"};
    for (size_t k = 0; k < sizeof other / sizeof other[0]; k++)
        CHECK(redirect(other[k], &rd) == CLUSTER_REPLY_OTHER && rd.kind == CLUSTER_REPLY_OTHER);
}

static void test_apply_moved(void)
{
    cluster_map_t *m = cluster_map_create();
    redisReply *r = three_masters();
    CHECK(cluster_map_from_slots(m, r, NULL, NULL, NULL) == 0);
    r_free(r);
    uint64_t v = m->version;
    cluster_redirect_t rd;

    /* To a known master: one slot changes hands, nothing else. */
    CHECK(redirect("MOVED 42 127.0.0.1:7002", &rd) == CLUSTER_REPLY_MOVED);
    int i = cluster_map_apply_moved(m, &rd, "127.0.0.1");
    CHECK(i == cluster_map_find(m, "127.0.0.1", 7002) && m->slot[42] == i);
    CHECK(port_of_slot(m, 41) == 7000 && port_of_slot(m, 43) == 7000);
    CHECK(m->version == v + 1 && count_used(m) == 6);
    CHECK(cluster_map_apply_moved(m, &rd, "127.0.0.1") == i && m->version == v + 1);

    /* To a replica promoted since the last refresh. */
    CHECK(redirect("MOVED 43 127.0.0.1:7003", &rd) == CLUSTER_REPLY_MOVED);
    i = cluster_map_apply_moved(m, &rd, NULL);
    CHECK(i >= 0 && cluster_map_node(m, i)->master && port_of_slot(m, 43) == 7003);

    /* To a node the map does not know: added, without a connection. */
    CHECK(redirect("MOVED 44 127.0.0.1:7010", &rd) == CLUSTER_REPLY_MOVED);
    i = cluster_map_apply_moved(m, &rd, NULL);
    CHECK(i >= 0 && count_used(m) == 7 && port_of_slot(m, 44) == 7010);
    CHECK(cluster_map_node(m, i)->conn == NULL && cluster_map_node(m, i)->master);

    /* No host: the one the error came from. */
    CHECK(redirect("MOVED 45 :7011", &rd) == CLUSTER_REPLY_MOVED);
    CHECK(cluster_map_apply_moved(m, &rd, NULL) == CLUSTER_EINVAL);
    i = cluster_map_apply_moved(m, &rd, "10.9.9.9");
    CHECK(i >= 0 && cluster_map_find(m, "10.9.9.9", 7011) == i && m->slot[45] == i);

    /* ASK does not change the map. */
    CHECK(redirect("ASK 46 127.0.0.1:7012", &rd) == CLUSTER_REPLY_ASK);
    v = m->version;
    CHECK(cluster_map_apply_moved(m, &rd, NULL) == CLUSTER_EINVAL && m->version == v);
    /* ... but its target can be looked up or added. */
    i = cluster_map_add_node(m, rd.host, rd.port, true);
    CHECK(i >= 0 && m->version == v + 1 && port_of_slot(m, 46) == 7000);
    CHECK(cluster_map_add_node(m, rd.host, rd.port, true) == i && m->version == v + 1);
    CHECK(cluster_map_add_node(m, "", 7000, true) == CLUSTER_EINVAL);
    CHECK(cluster_map_add_node(m, "h", 0, true) == CLUSTER_EINVAL);
    CHECK(cluster_map_add_node(m, NULL, 1, true) == CLUSTER_EINVAL);

    /* The next refresh drops the nodes that only redirects knew. */
    dropped_t d = {0};
    r = three_masters();
    CHECK(cluster_map_from_slots(m, r, NULL, on_drop, &d) == 0);
    r_free(r);
    CHECK(d.n == 3 && count_used(m) == 6 && port_of_slot(m, 42) == 7000);
    CHECK(!cluster_map_node(m, cluster_map_find(m, "127.0.0.1", 7003))->master);
    cluster_map_free(m);
}

static void test_bounds(void)
{
    cluster_map_t *m = cluster_map_create();
    char host[32];
    int ok = 0;
    for (int i = 0; i < CLUSTER_NODES_MAX; i++) {
        snprintf(host, sizeof host, "10.0.%d.%d", i / 256, i % 256);
        ok += cluster_map_add_node(m, host, 7000, true) == i;
    }
    CHECK(ok == CLUSTER_NODES_MAX);
    CHECK(cluster_map_add_node(m, "10.1.0.0", 7000, true) == CLUSTER_EFULL);
    CHECK(cluster_map_add_node(m, "10.0.0.0", 7000, true) == 0); /* known: still found */

    /* A reply naming more nodes than fit is refused whole. */
    redisReply *r = r_arr(2, range1(0, 0, node("10.0.0.0", 7000, "a")),
                          range1(1, 1, node("10.9.0.0", 7000, "b")));
    CHECK(cluster_map_from_slots(m, r, NULL, NULL, NULL) == CLUSTER_EFULL);
    CHECK(m->nnodes == CLUSTER_NODES_MAX && m->slot[0] == -1);
    r_free(r);
    cluster_map_free(m);
}

/* ---- routing ------------------------------------------------------------------------------ */

static int route(cluster_map_t *m, int argc, const char **argv)
{
    return cluster_map_node_for_command(m, argc, argv, NULL);
}

static void test_routing(void)
{
    cluster_map_t *m = cluster_map_create();
    redisReply *r = three_masters();
    CHECK(cluster_map_from_slots(m, r, NULL, NULL, NULL) == 0);
    r_free(r);
    const char *sha = "0123456789abcdef0123456789abcdef01234567";
    unsigned slot;

    /* A user's script: KEYS[1] is the user's prefix, routed by the hash tag. */
    const char *put[] = {"EVALSHA", sha, "1", "rd:{bob@x}", "7", "bob@x", "alice@y"};
    CHECK(cluster_command_slot(7, put, NULL, &slot) == 1 && slot == key_slot("bob@x"));
    CHECK(route(m, 7, put) == m->slot[key_slot("bob@x")]);
    /* A shard's index script: four keys, one slot. */
    const char *idx[] = {"EVALSHA",      sha,           "4", "rd:{#3}:due", "rd:{#3}:online",
                         "rd:{#3}:arch", "rd:{#3}:act", "7"};
    CHECK(cluster_command_slot(8, idx, NULL, &slot) == 1 && slot == key_slot("#3"));
    CHECK(route(m, 8, idx) == m->slot[key_slot("#3")]);
    /* The first keys agreeing is not enough: every key is checked. */
    const char *mixed[] = {"EVALSHA", sha, "3", "rd:{#3}:due", "rd:{#3}:online", "rd:{#4}:arch"};
    CHECK(cluster_command_slot(6, mixed, NULL, &slot) == CLUSTER_ECROSSSLOT);
    CHECK(route(m, 6, mixed) == CLUSTER_ECROSSSLOT);
    const char *two_users[] = {"EVAL", "return 1", "2", "rd:{bob@x}:q", "rd:{alice@x}:q"};
    CHECK(route(m, 5, two_users) == CLUSTER_ECROSSSLOT);
    /* Arguments after the keys are not keys. */
    const char *args[] = {"evalsha", sha, "1", "rd:{bob@x}", "rd:{alice@x}"};
    CHECK(cluster_command_slot(5, args, NULL, &slot) == 1 && slot == key_slot("bob@x"));
    /* No keys: any master. */
    const char *nokeys[] = {"EVALSHA", sha, "0", "arg"};
    CHECK(cluster_command_slot(4, nokeys, NULL, &slot) == 0);
    int any = route(m, 4, nokeys);
    CHECK(any >= 0 && cluster_map_node(m, any)->master);
    const char *badkeys[][4] = {{"EVALSHA", sha, "2", "k"},
                                {"EVALSHA", sha, "-1", "k"},
                                {"EVALSHA", sha, "x", "k"},
                                {"EVALSHA", sha, "", "k"}};
    for (int k = 0; k < 4; k++)
        CHECK(route(m, 4, badkeys[k]) == CLUSTER_EINVAL);
    CHECK(route(m, 2, (const char *[]){"EVALSHA", sha}) == CLUSTER_EINVAL);

    /* Plain commands. */
    CHECK(route(m, 2, (const char *[]){"GET", "rd:epoch"}) == m->slot[key_slot("rd:epoch")]);
    CHECK(route(m, 2, (const char *[]){"incr", "rd:epoch"}) == m->slot[key_slot("rd:epoch")]);
    CHECK(route(m, 2, (const char *[]){"SMEMBERS", "rd:{#3}:online"}) == m->slot[key_slot("#3")]);
    CHECK(route(m, 4, (const char *[]){"ZADD", "rd:{#3}:due", "1", "bob@x"}) ==
          m->slot[key_slot("#3")]);
    CHECK(route(m, 1, (const char *[]){"GET"}) == CLUSTER_EINVAL);
    CHECK(route(m, 3, (const char *[]){"DEL", "{a}1", "{a}2"}) == m->slot[key_slot("a")]);
    CHECK(route(m, 3, (const char *[]){"DEL", "a", "b"}) == CLUSTER_ECROSSSLOT);
    CHECK(route(m, 5, (const char *[]){"MSET", "{a}1", "v", "{a}2", "b"}) ==
          m->slot[key_slot("a")]);
    CHECK(route(m, 5, (const char *[]){"MSET", "{a}1", "v", "{b}2", "v"}) == CLUSTER_ECROSSSLOT);
    CHECK(route(m, 1, (const char *[]){"DEL"}) == CLUSTER_EINVAL);
    /* Keyless commands go to any node; unknown ones are refused, not guessed. */
    CHECK(cluster_command_slot(3, (const char *[]){"SCRIPT", "LOAD", "return 1"}, NULL, &slot) ==
          0);
    CHECK(cluster_command_slot(3, (const char *[]){"CONFIG", "GET", "maxmemory"}, NULL, &slot) ==
          0);
    CHECK(cluster_command_slot(2, (const char *[]){"AUTH", "pw"}, NULL, &slot) == 0);
    CHECK(cluster_command_slot(3, (const char *[]){"CLUSTER", "SLOTS"}, NULL, &slot) == 0);
    CHECK(route(m, 1, (const char *[]){"FLUSHALL"}) == CLUSTER_EUNKNOWN);
    CHECK(route(m, 2, (const char *[]){"GETX", "k"}) == CLUSTER_EUNKNOWN);
    CHECK(route(m, 0, NULL) == CLUSTER_EINVAL);

    /* With lengths: arguments need not be NUL-terminated, and may hold NULs. */
    const char buf[] = "GETrd:{bob@x}:qXYZ";
    const char *lv[] = {buf, buf + 3};
    size_t ll[] = {3, 12};
    CHECK(cluster_command_slot(2, lv, ll, &slot) == 1 && slot == key_slot("bob@x"));
    const char bin[] = {'k', '\0', 'x'};
    const char *bv[] = {"GET", bin};
    size_t bl[] = {3, 3};
    CHECK(cluster_command_slot(2, bv, bl, &slot) == 1 && slot == store_key_slot(bin, 3));

    /* A slot nobody serves. */
    m->slot[key_slot("bob@x")] = -1;
    CHECK(route(m, 7, put) == CLUSTER_ENOROUTE);
    cluster_map_free(m);
}

/* ---- seeds -------------------------------------------------------------------------------- */

static void test_seeds(void)
{
    cluster_seed_t s[CLUSTER_SEEDS_MAX + 1];
    size_t n = 99;
    CHECK(cluster_parse_seeds("127.0.0.1:7000", s, CLUSTER_SEEDS_MAX, &n) == 0 && n == 1);
    CHECK_STR(s[0].host, "127.0.0.1");
    CHECK(s[0].port == 7000);
    CHECK(cluster_parse_seeds(" redis-a:7000 ,\tredis-b:7001,[::1]:7002 , ::1:7003\n", s,
                              CLUSTER_SEEDS_MAX, &n) == 0);
    CHECK(n == 4);
    CHECK_STR(s[0].host, "redis-a");
    CHECK_STR(s[1].host, "redis-b");
    CHECK_STR(s[2].host, "::1");
    CHECK_STR(s[3].host, "::1");
    CHECK(s[1].port == 7001 && s[2].port == 7002 && s[3].port == 7003);

    const char *bad[] = {"",          "   ",     "a:1,",  "a:1,,b:2", ",a:1",
                         "a",         "a:",      ":7000", "a:0",      "a:65536",
                         "a:12x",     "a:-1",    "a b:1", "a :1",     "a:1,A:1",
                         "[::1:7000", "[]:7000", "a:1@2", "a:1 b:2",  "a:99999999999"};
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        int rc = cluster_parse_seeds(bad[k], s, CLUSTER_SEEDS_MAX, &n);
        if (rc != CLUSTER_EINVAL)
            fprintf(stderr, "bad seeds '%s' read as %d\n", bad[k], rc);
        CHECK(rc == CLUSTER_EINVAL && n == 0);
    }

    /* At most max, and never more than CLUSTER_SEEDS_MAX whatever max says. */
    CHECK(cluster_parse_seeds("a:1,b:2,c:3", s, 2, &n) == CLUSTER_EFULL && n == 0);
    char many[CLUSTER_SEEDS_MAX * 16 + 16] = "";
    for (int i = 0; i <= CLUSTER_SEEDS_MAX; i++) {
        char one[16];
        snprintf(one, sizeof one, "%sh:%d", i ? "," : "", 7000 + i);
        strcat(many, one);
    }
    CHECK(cluster_parse_seeds(many, s, CLUSTER_SEEDS_MAX + 1, &n) == CLUSTER_EFULL);
    *strrchr(many, ',') = '\0';
    CHECK(cluster_parse_seeds(many, s, CLUSTER_SEEDS_MAX, &n) == 0 && n == CLUSTER_SEEDS_MAX);
    CHECK(s[CLUSTER_SEEDS_MAX - 1].port == 7000 + CLUSTER_SEEDS_MAX - 1);

    CHECK_STR(cluster_strerror(CLUSTER_ECROSSSLOT), "keys in more than one slot");
    CHECK_STR(cluster_strerror(12345), "unknown error");
}

/* ---- against a real cluster (tests/unit/with-cluster.sh) ---------------------------------- */

static redisContext *live_conn(cluster_node_t *n)
{
    /* The node's conn is the test's: a synchronous context opened on first use, which is what
     * the store will do with an async one. */
    if (!n->conn) {
        redisContext *c = redisConnect(n->host, n->port);
        CHECK(c && !c->err);
        n->conn = c;
    }
    return n->conn;
}

static void live_close(void *ud, cluster_node_t *n)
{
    (void)ud;
    if (n->conn)
        redisFree(n->conn);
    n->conn = NULL;
}

static redisReply *live_cmd(redisContext *c, int argc, const char **argv)
{
    redisReply *r = redisCommandArgv(c, argc, argv, NULL);
    CHECK(r != NULL);
    return r;
}

/* Every master line of CLUSTER NODES must agree with the map on each of its slots. */
static void live_check_nodes(cluster_map_t *m, redisContext *c)
{
    redisReply *r = redisCommand(c, "CLUSTER NODES");
    CHECK(r && r->type == REDIS_REPLY_STRING);
    if (!r || r->type != REDIS_REPLY_STRING) {
        freeReplyObject(r);
        return;
    }
    unsigned covered = 0, wrong = 0;
    char *save = NULL;
    for (char *line = strtok_r(r->str, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char *f[64], *save2 = NULL;
        int nf = 0;
        for (char *w = strtok_r(line, " ", &save2); w && nf < 64; w = strtok_r(NULL, " ", &save2))
            f[nf++] = w;
        if (nf < 8 || !strstr(f[2], "master"))
            continue;
        char *at = strchr(f[1], '@');
        if (at)
            *at = '\0';
        int port = atoi(strrchr(f[1], ':') + 1);
        for (int k = 8; k < nf; k++) {
            if (f[k][0] == '[')
                continue; /* a migration in progress, not ownership */
            unsigned a, b;
            if (sscanf(f[k], "%u-%u", &a, &b) != 2)
                b = a = (unsigned)atoi(f[k]);
            for (unsigned s = a; s <= b && s < STORE_SLOTS; s++) {
                cluster_node_t *n = cluster_map_node(m, m->slot[s]);
                covered++;
                wrong += !n || n->port != port || strcmp(n->id, f[0]) != 0;
            }
        }
    }
    CHECK(covered == STORE_SLOTS && wrong == 0);
    freeReplyObject(r);
}

static void live_refresh(cluster_map_t *m, redisContext *c)
{
    redisReply *r = redisCommand(c, "CLUSTER SLOTS");
    CHECK(r != NULL);
    CHECK(cluster_map_from_slots(m, r, "127.0.0.1", live_close, NULL) == 0);
    freeReplyObject(r);
}

/* Sends the command to another master than the map's choice and returns its redirect. */
static int live_misroute(cluster_map_t *m, int argc, const char **argv, cluster_redirect_t *rd)
{
    int right = cluster_map_node_for_command(m, argc, argv, NULL);
    int other = -1;
    for (int i = 0; i < m->nnodes && other < 0; i++)
        if (i != right && cluster_map_node(m, i) && m->nodes[i].master)
            other = i;
    redisReply *r = live_cmd(live_conn(&m->nodes[other]), argc, argv);
    int kind = r && r->type == REDIS_REPLY_ERROR ? cluster_parse_redirect(r->str, r->len, rd)
                                                 : CLUSTER_REPLY_OTHER;
    freeReplyObject(r);
    return kind;
}

static void test_live(const char *ports)
{
    int port0 = atoi(ports);
    cluster_map_t *m = cluster_map_create();
    int i0 = cluster_map_add_node(m, "127.0.0.1", port0, true); /* the seed */
    redisContext *seed = live_conn(&m->nodes[i0]);
    live_refresh(m, seed);
    CHECK(count_used(m) == 3);
    CHECK(cluster_map_find(m, "127.0.0.1", port0) == i0 && m->nodes[i0].conn == seed);
    live_check_nodes(m, seed);

    /* The map's node runs each kind of command receiptd sends; the slots agree with Redis. */
    char keys[STORE_SHARDS + 3][32] = {"rd:{bob@x}", "rd:{alice@y}:q", "rd:epoch"};
    for (unsigned i = 0; i < STORE_SHARDS; i++)
        store_index_key(keys[3 + i], sizeof keys[0], i, "due");
    int agree = 0, served = 0, moved = 0;
    for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
        redisReply *r = redisCommand(seed, "CLUSTER KEYSLOT %s", keys[k]);
        agree += r && r->type == REDIS_REPLY_INTEGER &&
                 r->integer == (long long)store_key_slot(keys[k], strlen(keys[k]));
        freeReplyObject(r);
        const char *ev[] = {"EVAL", "return redis.call('SET', KEYS[1], ARGV[1])", "1", keys[k],
                            "v"};
        int i = cluster_map_node_for_command(m, 5, ev, NULL);
        CHECK(i >= 0);
        r = live_cmd(live_conn(&m->nodes[i]), 5, ev);
        served += r && r->type == REDIS_REPLY_STATUS;
        freeReplyObject(r);
        cluster_redirect_t rd;
        moved += live_misroute(m, 5, ev, &rd) == CLUSTER_REPLY_MOVED &&
                 rd.slot == store_key_slot(keys[k], strlen(keys[k])) && rd.port == m->nodes[i].port;
    }
    CHECK(agree == STORE_SHARDS + 3 && served == STORE_SHARDS + 3 && moved == STORE_SHARDS + 3);

    /* Redis refuses keys in two slots as we do. */
    const char *cross[] = {"EVAL", "return 1", "2", "rd:{bob@x}:q", "rd:{alice@y}:q"};
    CHECK(cluster_map_node_for_command(m, 5, cross, NULL) == CLUSTER_ECROSSSLOT);
    const char *first[] = {"GET", "rd:{bob@x}:q"};
    redisReply *r =
        live_cmd(live_conn(&m->nodes[cluster_map_node_for_command(m, 2, first, NULL)]), 5, cross);
    CHECK(r && r->type == REDIS_REPLY_ERROR && strncmp(r->str, "CROSSSLOT", 9) == 0);
    freeReplyObject(r);

    /* Move bob's slot from its master A to B by hand, watching ASK, TRYAGAIN and MOVED. */
    unsigned slot = store_key_slot("bob@x", 5);
    int a = m->slot[slot], b = a == 0 ? 1 : 0;
    while (!cluster_map_node(m, b) || b == a)
        b++;
    redisContext *ca = live_conn(&m->nodes[a]), *cb = live_conn(&m->nodes[b]);
    freeReplyObject(redisCommand(ca, "DEL rd:{bob@x}"));
    freeReplyObject(redisCommand(ca, "SET rd:{bob@x}:a 1"));
    r = redisCommand(cb, "CLUSTER SETSLOT %u IMPORTING %s", slot, m->nodes[a].id);
    CHECK(r && r->type == REDIS_REPLY_STATUS);
    freeReplyObject(r);
    r = redisCommand(ca, "CLUSTER SETSLOT %u MIGRATING %s", slot, m->nodes[b].id);
    CHECK(r && r->type == REDIS_REPLY_STATUS);
    freeReplyObject(r);
    cluster_redirect_t rd;
    r = redisCommand(ca, "GET rd:{bob@x}:b"); /* missing at A: asked to try B */
    CHECK(r && r->type == REDIS_REPLY_ERROR &&
          cluster_parse_redirect(r->str, r->len, &rd) == CLUSTER_REPLY_ASK);
    CHECK(rd.slot == slot && rd.port == m->nodes[b].port);
    CHECK(cluster_map_add_node(m, rd.host, rd.port, true) == b);
    freeReplyObject(r);
    freeReplyObject(redisCommand(cb, "ASKING"));
    r = redisCommand(cb, "GET rd:{bob@x}:b");
    CHECK(r && r->type == REDIS_REPLY_NIL);
    freeReplyObject(r);
    r = redisCommand(ca, "MGET rd:{bob@x}:a rd:{bob@x}:b"); /* half here, half not */
    CHECK(r && r->type == REDIS_REPLY_ERROR &&
          cluster_parse_redirect(r->str, r->len, &rd) == CLUSTER_REPLY_TRYAGAIN);
    freeReplyObject(r);
    freeReplyObject(redisCommand(ca, "DEL rd:{bob@x}:a"));
    for (int i = 0; i < m->nnodes; i++) {
        r = redisCommand(live_conn(&m->nodes[i]), "CLUSTER SETSLOT %u NODE %s", slot,
                         m->nodes[b].id);
        CHECK(r && r->type == REDIS_REPLY_STATUS);
        freeReplyObject(r);
    }
    r = redisCommand(ca, "GET rd:{bob@x}:b");
    CHECK(r && r->type == REDIS_REPLY_ERROR &&
          cluster_parse_redirect(r->str, r->len, &rd) == CLUSTER_REPLY_MOVED);
    freeReplyObject(r);
    uint64_t v = m->version;
    CHECK(cluster_map_apply_moved(m, &rd, "127.0.0.1") == b && m->slot[slot] == b);
    CHECK(m->version == v + 1);
    /* A full refresh agrees with the MOVED, keeps every connection and drops none. */
    void *before[3] = {m->nodes[0].conn, m->nodes[1].conn, m->nodes[2].conn};
    live_refresh(m, seed);
    CHECK(m->slot[slot] == b && count_used(m) == 3 && m->version == v + 1);
    CHECK(before[0] == m->nodes[0].conn && before[1] == m->nodes[1].conn &&
          before[2] == m->nodes[2].conn);
    live_check_nodes(m, seed);

    for (int i = 0; i < m->nnodes; i++)
        if (cluster_map_node(m, i))
            live_close(NULL, &m->nodes[i]);
    cluster_map_free(m);
}

int main(void)
{
    test_slots_basic();
    test_slots_endpoints();
    test_slots_malformed();
    test_redirects();
    test_apply_moved();
    test_bounds();
    test_routing();
    test_seeds();
    if (getenv("CLUSTER_PORTS"))
        test_live(getenv("CLUSTER_PORTS"));
    return check_report();
}
