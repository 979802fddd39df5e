/* Expat runs in namespace mode with ' ' as separator, so every name arrives as "uri local" and
 * prefixes never matter: an element is rebuilt with an xmlns attribute wherever its namespace
 * differs from its parent's, which is what libstrophe serializes back. Namespaced attributes
 * other than xml:* are dropped (no stanza we read uses them). */
#include "stream.h"

#include <expat.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "ns.h"

#define XML_NS "http://www.w3.org/XML/1998/namespace"

struct stream_parser {
    xmpp_ctx_t *ctx;
    XML_Parser xp;
    size_t max_bytes;
    stream_callbacks_t cb;
    void *ud;
    int depth; /* 0 outside the stream, 1 inside the stream element, 2+ inside a stanza */
    xmpp_stanza_t *stack[STREAM_MAX_DEPTH + 2];
    const char *ns_stack[STREAM_MAX_DEPTH + 2];
    XML_Index stanza_start;
    bool oversize;
    proto_buf_t text;
    char error[128];
};

static void split_name(const char *name, char *uri, size_t urilen, const char **local)
{
    const char *sp = strchr(name, ' ');
    if (!sp) {
        uri[0] = '\0';
        *local = name;
        return;
    }
    size_t n = (size_t)(sp - name);
    if (n >= urilen)
        n = urilen - 1;
    memcpy(uri, name, n);
    uri[n] = '\0';
    *local = sp + 1;
}

static void stop(stream_parser_t *p, const char *why)
{
    if (!p->error[0])
        snprintf(p->error, sizeof p->error, "%s", why);
    XML_StopParser(p->xp, XML_FALSE);
}

static bool over_limit(stream_parser_t *p)
{
    return (size_t)(XML_GetCurrentByteIndex(p->xp) - p->stanza_start) > p->max_bytes;
}

/* Drops what was built of the stanza, keeping only the top element as a skeleton. */
static void go_oversize(stream_parser_t *p)
{
    if (p->oversize)
        return;
    p->oversize = true;
    xmpp_stanza_t *top = p->stack[2];
    xmpp_stanza_t *skel = xmpp_stanza_new(p->ctx);
    if (skel) {
        const char *attrs[64];
        int n = xmpp_stanza_get_attributes(top, attrs, 64);
        xmpp_stanza_set_name(skel, xmpp_stanza_get_name(top));
        for (int i = 0; i + 1 < n; i += 2)
            xmpp_stanza_set_attribute(skel, attrs[i], attrs[i + 1]);
    }
    xmpp_stanza_release(top);
    p->stack[2] = skel;
    proto_buf_reset(&p->text);
}

static void flush_text(stream_parser_t *p)
{
    if (p->text.len == 0 || p->depth < 2 || p->oversize)
        return;
    xmpp_stanza_t *t = xmpp_stanza_new(p->ctx);
    if (!t || xmpp_stanza_set_text_with_size(t, p->text.data, p->text.len) != XMPP_EOK) {
        if (t)
            xmpp_stanza_release(t);
        stop(p, "out of memory");
        return;
    }
    xmpp_stanza_add_child_ex(p->stack[p->depth], t, 0);
    proto_buf_reset(&p->text);
}

static void on_start(void *ud, const XML_Char *name, const XML_Char **atts)
{
    stream_parser_t *p = ud;
    char uri[256];
    const char *local;
    split_name(name, uri, sizeof uri, &local);

    if (p->depth == 0) {
        if (strcmp(uri, NS_STREAMS) != 0 || strcmp(local, "stream") != 0) {
            stop(p, "not an XMPP stream");
            return;
        }
        const char *id = NULL;
        for (int i = 0; atts[i]; i += 2)
            if (strcmp(atts[i], "id") == 0)
                id = atts[i + 1];
        p->depth = 1;
        p->ns_stack[1] = NS_COMPONENT;
        if (p->cb.on_open)
            p->cb.on_open(p->ud, id);
        return;
    }
    if (p->depth == 1) {
        p->stanza_start = XML_GetCurrentByteIndex(p->xp);
        p->oversize = false;
        proto_buf_reset(&p->text);
    } else {
        flush_text(p);
    }
    p->depth++;
    if (p->depth > STREAM_MAX_DEPTH + 1 || (p->depth > 2 && over_limit(p)))
        go_oversize(p);
    if (p->oversize)
        return;

    xmpp_stanza_t *s = xmpp_stanza_new(p->ctx);
    if (!s) {
        stop(p, "out of memory");
        return;
    }
    xmpp_stanza_set_name(s, local);
    const char *parent_ns = p->ns_stack[p->depth - 1];
    /* Elements keep pointers into the stanza's own copy of the namespace. */
    if (uri[0] && (!parent_ns || strcmp(uri, parent_ns) != 0) &&
        !(p->depth == 2 && strcmp(uri, NS_COMPONENT) == 0))
        xmpp_stanza_set_ns(s, uri);
    p->ns_stack[p->depth] = uri[0] ? xmpp_stanza_get_ns(s) : parent_ns;
    if (!p->ns_stack[p->depth])
        p->ns_stack[p->depth] = parent_ns;
    for (int i = 0; atts[i]; i += 2) {
        char auri[128];
        const char *alocal;
        split_name(atts[i], auri, sizeof auri, &alocal);
        if (!auri[0]) {
            xmpp_stanza_set_attribute(s, alocal, atts[i + 1]);
        } else if (strcmp(auri, XML_NS) == 0) {
            char qname[64];
            snprintf(qname, sizeof qname, "xml:%s", alocal);
            xmpp_stanza_set_attribute(s, qname, atts[i + 1]);
        }
    }
    if (p->depth == 2) {
        p->stack[2] = s;
        /* The stanza's own namespace is the stream's default unless it declares another. */
        if (!xmpp_stanza_get_ns(s))
            p->ns_stack[2] = NS_COMPONENT;
    } else {
        xmpp_stanza_add_child_ex(p->stack[p->depth - 1], s, 0);
        p->stack[p->depth] = s;
    }
}

static void on_end(void *ud, const XML_Char *name)
{
    stream_parser_t *p = ud;
    (void)name;
    if (p->depth == 1) {
        p->depth = 0;
        if (p->cb.on_close)
            p->cb.on_close(p->ud);
        return;
    }
    if (p->depth >= 2 && !p->oversize && over_limit(p))
        go_oversize(p);
    flush_text(p);
    if (p->depth == 2) {
        xmpp_stanza_t *s = p->stack[2];
        p->stack[2] = NULL;
        p->depth = 1;
        if (s) {
            if (p->cb.on_stanza)
                p->cb.on_stanza(p->ud, s, p->oversize);
            xmpp_stanza_release(s);
        }
        p->oversize = false;
        return;
    }
    p->depth--;
}

static void on_text(void *ud, const XML_Char *s, int len)
{
    stream_parser_t *p = ud;
    if (p->depth < 2 || p->oversize)
        return;
    if (over_limit(p)) {
        go_oversize(p);
        return;
    }
    proto_buf_append(&p->text, s, (size_t)len);
    if (p->text.failed)
        stop(p, "out of memory");
}

static void on_doctype(void *ud, const XML_Char *name, const XML_Char *sysid,
                       const XML_Char *pubid, int has_internal)
{
    (void)name;
    (void)sysid;
    (void)pubid;
    (void)has_internal;
    stop(ud, "DTDs are not allowed in XMPP");
}

static void on_entity(void *ud, const XML_Char *name, int is_param, const XML_Char *value,
                      int value_len, const XML_Char *base, const XML_Char *sysid,
                      const XML_Char *pubid, const XML_Char *notation)
{
    (void)name, (void)is_param, (void)value, (void)value_len, (void)base, (void)sysid;
    (void)pubid, (void)notation;
    stop(ud, "entity declarations are not allowed in XMPP");
}

static void release_open(stream_parser_t *p)
{
    if (p->depth >= 2 && p->stack[2])
        xmpp_stanza_release(p->stack[2]);
    p->stack[2] = NULL;
    p->depth = 0;
    p->oversize = false;
    proto_buf_reset(&p->text);
    p->error[0] = '\0';
}

static int setup(stream_parser_t *p)
{
    p->xp = XML_ParserCreateNS(NULL, ' ');
    if (!p->xp)
        return -1;
    XML_SetUserData(p->xp, p);
    XML_SetElementHandler(p->xp, on_start, on_end);
    XML_SetCharacterDataHandler(p->xp, on_text);
    XML_SetStartDoctypeDeclHandler(p->xp, on_doctype);
    XML_SetEntityDeclHandler(p->xp, on_entity);
    return 0;
}

stream_parser_t *stream_parser_new(xmpp_ctx_t *ctx, size_t max_stanza_bytes,
                                   const stream_callbacks_t *cb, void *ud)
{
    stream_parser_t *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->ctx = ctx;
    p->max_bytes = max_stanza_bytes;
    p->cb = *cb;
    p->ud = ud;
    proto_buf_init(&p->text);
    if (setup(p) < 0) {
        free(p);
        return NULL;
    }
    return p;
}

void stream_parser_free(stream_parser_t *p)
{
    if (!p)
        return;
    release_open(p);
    XML_ParserFree(p->xp);
    proto_buf_free(&p->text);
    free(p);
}

int stream_parser_reset(stream_parser_t *p)
{
    release_open(p);
    XML_ParserFree(p->xp);
    return setup(p);
}

int stream_parser_feed(stream_parser_t *p, const char *data, size_t len)
{
    if (p->error[0])
        return -1;
    if (XML_Parse(p->xp, data, (int)len, XML_FALSE) != XML_STATUS_OK) {
        if (!p->error[0])
            snprintf(p->error, sizeof p->error, "%s",
                     XML_ErrorString(XML_GetErrorCode(p->xp)));
        return -1;
    }
    return 0;
}

const char *stream_parser_error(const stream_parser_t *p)
{
    return p->error;
}
