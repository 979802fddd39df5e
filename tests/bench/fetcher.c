#include "fetcher.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "xmlin.h"

uint64_t fetcher_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void buf_printf(fetcher_buf_t *b, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->data ? b->data + b->len : NULL, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0)
            abort();
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        b->cap = (b->cap + (size_t)n + 1) * 2;
        b->data = realloc(b->data, b->cap);
        if (!b->data)
            abort();
    }
}

/* <iq type id to [from]>: through a server 'from' is stamped by the server, on the component
 * stream loadgen is the server and stamps it itself. */
static void iq_open(fetcher_t *f, fetcher_buf_t *b, const char *type, char kind)
{
    buf_printf(b, "<iq type='%s' id='rb%c%ld' to='%s'", type, kind, f->seq++, f->to);
    if (f->from)
        buf_printf(b, " from='%s'", f->from);
    buf_printf(b, ">");
}

static void add_fetch(fetcher_t *f)
{
    iq_open(f, &f->out, "get", 'f');
    buf_printf(&f->out, "<fetch xmlns='urn:receiptd:0' max='%d'", f->max);
    if (f->last[0])
        buf_printf(&f->out, " after='%s'", f->last);
    buf_printf(&f->out, "/></iq>");
}

static void flush(fetcher_t *f)
{
    if (f->out.len)
        f->send(f->ud, f->out.data, f->out.len);
    f->out.len = 0;
}

/* The fetch after the page being read, sent at once unless max_acks acks are unanswered (then
 * when one is). */
static void fetch_next(fetcher_t *f)
{
    if (f->acks_out >= f->max_acks) {
        f->fetch_waiting = true;
        return;
    }
    add_fetch(f);
    flush(f);
}

static void add_summary(fetcher_t *f, char kind)
{
    iq_open(f, &f->out, "get", kind);
    buf_printf(&f->out, "<summary xmlns='urn:receiptd:0'/></iq>");
}

void fetcher_start(fetcher_t *f)
{
    f->left = -1;
    f->start_ns = fetcher_now_ns();
    add_summary(f, 's');
    flush(f);
}

/* Stanza-ids are "<seq>-<hex>"; anything else would not be safe to echo in an attribute. */
static bool plain_id(const char *s)
{
    if (!*s || strlen(s) >= sizeof((fetcher_t *)0)->last)
        return false;
    for (; *s; s++)
        if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'f') || *s == '-'))
            return false;
    return true;
}

void fetcher_on_start(fetcher_t *f, int depth, const char *name, const char **attrs)
{
    if (depth == 1) {
        const char *id = xmlin_attr(attrs, "id"), *type = xmlin_attr(attrs, "type");
        f->kind = 0;
        if (strcmp(name, "iq") == 0 && id && strncmp(id, "rb", 2) == 0 && id[2] &&
            strchr("sfaz", id[2]) && type) {
            f->kind = id[2];
            f->is_error = strcmp(type, "error") == 0;
        }
        return;
    }
    if (!f->kind || f->is_error)
        return;
    if (depth == 2 && strcmp(name, "summary") == 0) {
        const char *count = xmlin_attr(attrs, "count");
        long n = count ? atol(count) : -1;
        if (f->kind == 's')
            f->queued = n;
        else
            f->left = n;
    } else if (depth == 2 && strcmp(name, "batch") == 0) {
        const char *complete = xmlin_attr(attrs, "complete"), *last = xmlin_attr(attrs, "last");
        f->complete = complete && strcmp(complete, "true") == 0;
        if (last && plain_id(last))
            snprintf(f->last, sizeof f->last, "%s", last);
        f->page_items = 0;
        f->ack.len = 0;
        iq_open(f, &f->ack, "set", 'a');
        buf_printf(&f->ack, "<ack xmlns='urn:receiptd:0'>");
        /* The page says where it ends before its items: the next fetch leaves now, and
         * receiptd prepares that page while this one is read. */
        if (!f->complete)
            fetch_next(f);
    } else if (depth == 5 && strcmp(name, "stanza-id") == 0) {
        /* iq(1) > batch > forwarded > message > stanza-id(5); only ours (by = the component) */
        const char *id = xmlin_attr(attrs, "id"), *by = xmlin_attr(attrs, "by");
        if (id && by && strcmp(by, f->to) == 0 && plain_id(id)) {
            buf_printf(&f->ack, "<item id='%s'/>", id);
            f->page_items++;
        }
    }
}

static void on_page(fetcher_t *f)
{
    f->batches++;
    f->items += f->page_items;
    if (f->page_items) {
        buf_printf(&f->ack, "</ack></iq>");
        buf_printf(&f->out, "%.*s", (int)f->ack.len, f->ack.data);
        f->acks_out++;
    }
    if (f->complete)
        f->seen_complete = true;
}

static void on_ack_result(fetcher_t *f)
{
    f->acks_out--;
    if (f->fetch_waiting) {
        f->fetch_waiting = false;
        add_fetch(f);
    }
}

void fetcher_on_end(fetcher_t *f, int depth, const char *name)
{
    (void)name;
    if (depth != 1 || !f->kind)
        return;
    char kind = f->kind;
    f->kind = 0;
    if (f->is_error) {
        fprintf(stderr, "fetcher: error answer to a %c iq\n", kind);
        f->errors++;
        f->done = true;
        return;
    }
    switch (kind) {
    case 's':
        add_fetch(f);
        break;
    case 'f':
        on_page(f);
        break;
    case 'a':
        on_ack_result(f);
        break;
    case 'z':
        f->done = true;
        return;
    }
    if (f->seen_complete && f->acks_out == 0 && !f->end_ns) {
        f->end_ns = fetcher_now_ns();
        add_summary(f, 'z');
    }
    flush(f);
}

void fetcher_free(fetcher_t *f)
{
    free(f->out.data);
    free(f->ack.data);
    f->out = f->ack = (fetcher_buf_t){0};
}
