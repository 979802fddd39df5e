/* receiptd: an external XEP-0114 component that gives XMPP deployments server-side receipts,
 * durable offline queues in Redis and batched offline retrieval. main() parses arguments and the
 * config, wires the link and the store to the router on one libuv loop, and shuts down cleanly
 * on SIGTERM/SIGINT. */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "daemon.h"
#include "log.h"
#include "readahead.h"
#include "stats.h"

#ifndef RECEIPTD_VERSION
#define RECEIPTD_VERSION "dev"
#endif

typedef struct app {
    daemon_t d;
    uv_signal_t sigterm, sigint;
    /* The link attaches once Redis is connected, or when [redis] timeout passed without it: a
     * message arriving before the store can take it would only get a wait error. */
    uv_timer_t link_gate;
    bool link_started;
    bool stopping;
} app_t;

static void usage(FILE *f)
{
    fprintf(f, "Usage: receiptd [-c FILE] [--check-config | --stats]\n"
               "\n"
               "Reliable delivery for XMPP as an external component (XEP-0114): server-side\n"
               "receipts, durable offline queues in Redis, batched offline retrieval.\n"
               "\n"
               "  -c, --config FILE   configuration file (default: component.ini)\n"
               "      --check-config  validate the configuration and exit\n"
               "      --stats         print users, messages and bytes per tier (Redis, SQLite\n"
               "                      archive) and exit\n"
               "      --version       print the version and exit\n"
               "  -h, --help          print this help and exit\n"
               "\n"
               "Stops cleanly on SIGTERM or SIGINT. Logs go to standard error.\n");
}

/* ---- link and store events ----------------------------------------------------------------- */

static void on_epoch(void *ud, int err, const char *epoch)
{
    daemon_t *d = ud;
    d->epoch_pending = false;
    if (err) {
        log_warn("receiptd: could not start a link epoch in Redis; retrying when it is back");
        return;
    }
    snprintf(d->epoch, sizeof d->epoch, "%s", epoch);
    if (d->store)
        store_set_epoch(d->store, d->epoch);
    log_info("receiptd: link epoch %s; ready", d->epoch);
    presence_on_epoch(d);
}

/* A new link needs a new epoch, which needs Redis: whichever comes second asks for it. */
static void maybe_start_epoch(daemon_t *d)
{
    if (!d->link || !link_is_up(d->link) || !d->store || !store_is_connected(d->store) ||
        d->epoch_pending || d->epoch_generation == d->link_generation)
        return;
    if (store_epoch_next(d->store, on_epoch, d) == 0) {
        d->epoch_pending = true;
        d->epoch_generation = d->link_generation;
    }
}

/* "0" matches no registry entry: until this link's epoch is known nobody counts as online. */
static void epoch_reset(daemon_t *d)
{
    snprintf(d->epoch, sizeof d->epoch, "0");
    if (d->store)
        store_set_epoch(d->store, d->epoch);
}

static void on_link_up(void *ud)
{
    daemon_t *d = ud;
    d->link_generation++;
    epoch_reset(d);
    maybe_start_epoch(d);
}

static void on_link_down(void *ud)
{
    /* Presence kept for an epoch this link never got is stale: the next link verifies those
     * resources by pinging them (the online index has them by then). */
    presence_free_early(ud);
    epoch_reset(ud);
}

static void on_link_stanza(void *ud, xmpp_stanza_t *s, bool oversize)
{
    router_dispatch(ud, s, oversize);
}

static void on_persistence(void *ud, int err, const char *value)
{
    daemon_t *d = ud;
    if (err || !value)
        return;
    if (strcmp(value, "no") == 0)
        log_warn(
            "store: Redis has AOF off (appendonly no): <stored/> then survives a crash only as "
            "far as RDB snapshots reach; see README, Durability");
    else if (d)
        log_info("store: Redis AOF is on");
}

static void on_fsync(void *ud, int err, const char *value)
{
    (void)ud;
    if (!err && value)
        log_info("store: Redis appendfsync is '%s'%s", value,
                 strcmp(value, "always") == 0 ? ""
                                              : " (up to ~1 s of stored messages can be lost "
                                                "on power failure)");
}

/* Where Redis is, for the logs: a socket, a cluster's seeds, or host:port. */
static const char *redis_where(const config_t *cfg, char *buf, size_t len)
{
    if (cfg->redis_socket)
        snprintf(buf, len, "Redis at %s", cfg->redis_socket);
    else if (cfg->redis_cluster)
        snprintf(buf, len, "Redis Cluster (seeds %s)", cfg->redis_cluster);
    else
        snprintf(buf, len, "Redis at %s:%d", cfg->redis_host, cfg->redis_port);
    return buf;
}

static void start_link(app_t *app)
{
    if (app->link_started || app->stopping)
        return;
    app->link_started = true;
    uv_timer_stop(&app->link_gate);
    link_start(app->d.link);
}

static void on_link_gate(uv_timer_t *t)
{
    app_t *app = t->data;
    if (!app->link_started)
        log_warn("store: not connected after %u ms; attaching to the server anyway (senders get "
                 "wait errors until Redis is back)",
                 (unsigned)app->d.cfg.redis_timeout_ms);
    start_link(app);
}

static void on_store_state(void *ud, int connected, const char *err)
{
    app_t *app = ud;
    daemon_t *d = &app->d;
    uint64_t now = (uint64_t)daemon_now_ms();
    char where[1200];
    if (connected) {
        log_throttle_reset(&d->store_log);
        log_info("store: connected to %s", redis_where(&d->cfg, where, sizeof where));
        store_config_get(d->store, "appendonly", on_persistence, d);
        store_config_get(d->store, "appendfsync", on_fsync, d);
        maybe_start_epoch(d);
        start_link(app);
    } else if (log_throttle_pass(&d->store_log, now)) {
        log_warn("store: %s unavailable: %s (senders get wait errors; retrying with backoff; "
                 "logged once a minute)",
                 redis_where(&d->cfg, where, sizeof where), err ? err : "?");
    }
}

/* ---- shutdown ---------------------------------------------------------------------------- */

static void on_signal(uv_signal_t *s, int signum)
{
    app_t *app = s->data;
    daemon_t *d = &app->d;
    if (app->stopping)
        return;
    app->stopping = true;
    log_info("receiptd: %s received, shutting down", signum == SIGTERM ? "SIGTERM" : "SIGINT");
    retry_stop(d);
    archiver_stop(d);
    if (d->link) {
        link_close(d->link);
        d->link = NULL;
    }
    if (d->store) {
        store_t *st = d->store;
        d->store = NULL;
        store_close(st);
    }
    if (d->archive) {
        archive_t *a = d->archive;
        d->archive = NULL;
        archive_close(a); /* queued archive work still finishes before the loop ends */
    }
    uv_close((uv_handle_t *)&app->sigterm, NULL);
    uv_close((uv_handle_t *)&app->sigint, NULL);
    uv_close((uv_handle_t *)&app->link_gate, NULL);
}

static void log_stats(const daemon_t *d)
{
    const stats_t *s = &d->stats;
    log_info("receiptd: stored %llu, duplicates %llu, pushed %llu, retransmitted %llu, acked %llu, "
             "receipts relayed %llu, archived %llu, expired %llu, evicted %llu; rejected: "
             "storage %llu, "
             "queue full %llu, bad input %llu; fetches answered by read-ahead %llu",
             (unsigned long long)s->stored, (unsigned long long)s->duplicates,
             (unsigned long long)s->delivered, (unsigned long long)s->retransmitted,
             (unsigned long long)s->acked, (unsigned long long)s->receipts_relayed,
             (unsigned long long)s->archived, (unsigned long long)s->expired,
             (unsigned long long)s->evicted, (unsigned long long)s->rejected_storage,
             (unsigned long long)s->rejected_full, (unsigned long long)s->rejected_bad,
             (unsigned long long)s->read_ahead);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'}, {"check-config", no_argument, NULL, 'k'},
        {"version", no_argument, NULL, 'v'},      {"help", no_argument, NULL, 'h'},
        {"stats", no_argument, NULL, 's'},        {NULL, 0, NULL, 0},
    };
    const char *path = "component.ini";
    bool check_only = false, stats_only = false;
    int opt;
    while ((opt = getopt_long(argc, argv, "c:h", opts, NULL)) != -1) {
        switch (opt) {
        case 'c':
            path = optarg;
            break;
        case 'k':
            check_only = true;
            break;
        case 's':
            stats_only = true;
            break;
        case 'v':
            printf("receiptd %s\n", RECEIPTD_VERSION);
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "receiptd: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }

    static app_t app; /* static only for its size; reached through handle data, never by name */
    daemon_t *d = &app.d;
    char err[768];
    if (config_load(&d->cfg, path, err, sizeof err) < 0) {
        fprintf(stderr, "receiptd: %s\n", err);
        config_free(&d->cfg);
        return 1;
    }
    if (check_only) {
        char where[1200];
        printf("receiptd: %s is valid (component %s, server %s:%d, %s)\n", path, d->cfg.jid,
               d->cfg.server_host, d->cfg.server_port, redis_where(&d->cfg, where, sizeof where));
        config_free(&d->cfg);
        return 0;
    }
    if (stats_only) {
        int src = stats_print(&d->cfg, stdout);
        config_free(&d->cfg);
        return src;
    }
    log_set_level(d->cfg.log_level);
    srand((unsigned)time(NULL) ^ (unsigned)getpid());
    snprintf(d->epoch, sizeof d->epoch, "0");
    snprintf(d->receipt_instance, sizeof d->receipt_instance, "%" PRIx64 "%08x",
             (uint64_t)time(NULL), (unsigned)rand());

    uv_loop_t loop;
    uv_loop_init(&loop);
    d->loop = &loop;
    xmpp_initialize();
    d->ctx = xmpp_ctx_new(strophe_mem_init(&d->stanza_mem, 1u << 20), NULL);
    if (!d->ctx) {
        fprintf(stderr, "receiptd: out of memory\n");
        return 1;
    }

    store_config_t scfg = {d->cfg.redis_host,
                           d->cfg.redis_port,
                           d->cfg.redis_socket,
                           d->cfg.redis_password,
                           d->cfg.redis_max_inflight,
                           (unsigned)d->cfg.redis_timeout_ms,
                           d->cfg.redis_cluster,
                           d->cfg.redis_wait_replicas,
                           (unsigned)d->cfg.redis_wait_timeout_ms,
                           (unsigned)d->cfg.dedupe_s};
    link_config_t lcfg = {d->cfg.server_host, d->cfg.server_port,      d->cfg.jid,
                          d->cfg.secret,      d->cfg.max_stanza_bytes, 64u << 20};
    link_callbacks_t lcb = {on_link_up, on_link_down, on_link_stanza};
    if (archive_open(&loop, d->cfg.sqlite_path, &d->archive, err, sizeof err) < 0) {
        fprintf(stderr, "receiptd: [sqlite] path: %s\n", err);
        return 1;
    }
    uv_timer_init(&loop, &app.link_gate);
    app.link_gate.data = &app;
    d->readahead = readahead_new(); /* without it (no memory) fetches just go to the tiers */
    if (store_create(&loop, &scfg, on_store_state, &app, &d->store) < 0 ||
        link_create(&loop, d->ctx, &lcfg, &lcb, d, &d->link) < 0) {
        fprintf(stderr, "receiptd: out of memory\n");
        return 1;
    }
    uv_signal_init(&loop, &app.sigterm);
    uv_signal_init(&loop, &app.sigint);
    app.sigterm.data = app.sigint.data = &app;
    uv_signal_start(&app.sigterm, on_signal, SIGTERM);
    uv_signal_start(&app.sigint, on_signal, SIGINT);
    signal(SIGPIPE, SIG_IGN);
    retry_start(d);
    archiver_start(d);
    char where[1200];
    log_info("receiptd %s: component %s, server %s:%d, %s", RECEIPTD_VERSION, d->cfg.jid,
             d->cfg.server_host, d->cfg.server_port, redis_where(&d->cfg, where, sizeof where));
    if ((long long)d->cfg.dedupe_s * 1000 * 63 < d->cfg.archive_after_ms)
        log_warn(
            "config: dedupe_window (%lld s) is under a 63rd of archive_after: a message queued "
            "longer than 63 windows is no longer found by its (sender, id), so a retry of it "
            "is stored again and a <received/> for it is not matched (storage/SCHEMA.md)",
            (long long)d->cfg.dedupe_s);
    if (d->cfg.redis_wait_replicas)
        log_info("store: <stored/> waits for %u Redis replica(s) to have each message (WAIT, at "
                 "most %lld ms; unconfirmed puts get a wait error)",
                 d->cfg.redis_wait_replicas, (long long)d->cfg.redis_wait_timeout_ms);
    uv_timer_start(&app.link_gate, on_link_gate, d->cfg.redis_timeout_ms, 0);

    uv_run(&loop, UV_RUN_DEFAULT);

    log_stats(d);
    readahead_free(d->readahead);
    presence_free_early(d);
    int rc = uv_loop_close(&loop);
    if (rc != 0)
        log_warn("receiptd: event loop closed with handles open: %s", uv_strerror(rc));
    xmpp_ctx_free(d->ctx);
    strophe_mem_release(&d->stanza_mem);
    xmpp_shutdown();
    config_free(&d->cfg);
    log_info("receiptd: stopped");
    return rc == 0 ? 0 : 1;
}
