/* JIDs as receiptd needs them: split into parts, checked against RFC 7622's byte limits and the
 * characters a localpart may never contain. Full stringprep is the server's job; the server stamps
 * every 'from' we see, so the checks here only guard what we build keys and addresses from. */
#include "jid.h"

#include <string.h>

static const char node_forbidden[] = "\"&'/:<>@ \t\r\n";

static int copy_part(char *dst, const char *src, size_t n)
{
    if (n >= PROTO_JID_PART_MAX)
        return -1;
    memcpy(dst, src, n);
    dst[n] = '\0';
    return 0;
}

int proto_jid_parse(const char *s, proto_jid_t *out)
{
    const char *slash = strchr(s, '/');
    size_t head_len = slash ? (size_t)(slash - s) : strlen(s);
    const char *at = memchr(s, '@', head_len);
    const char *domain = at ? at + 1 : s;
    size_t domain_len = head_len - (size_t)(domain - s);

    out->node[0] = out->domain[0] = out->resource[0] = '\0';
    if (at) {
        size_t node_len = (size_t)(at - s);
        if (node_len == 0 || copy_part(out->node, s, node_len) < 0)
            return -1;
        if (strpbrk(out->node, node_forbidden))
            return -1;
    }
    if (domain_len == 0 || copy_part(out->domain, domain, domain_len) < 0)
        return -1;
    if (strpbrk(out->domain, "@ \t\r\n<>&'\""))
        return -1;
    if (slash) {
        size_t res_len = strlen(slash + 1);
        if (res_len == 0 || copy_part(out->resource, slash + 1, res_len) < 0)
            return -1;
    }
    return 0;
}

int proto_jid_format_bare(const proto_jid_t *jid, char *buf, size_t len)
{
    size_t nl = strlen(jid->node), dl = strlen(jid->domain);
    size_t need = (nl ? nl + 1 : 0) + dl + 1;
    if (need > len)
        return -1;
    if (nl) {
        memcpy(buf, jid->node, nl);
        buf[nl] = '@';
        memcpy(buf + nl + 1, jid->domain, dl + 1);
    } else {
        memcpy(buf, jid->domain, dl + 1);
    }
    return 0;
}

/* The ten characters XEP-0106 escapes, with their codes. */
static const struct {
    char c;
    const char *code;
} escapes[] = {
    {' ', "20"}, {'"', "22"}, {'&', "26"}, {'\'', "27"}, {'/', "2f"},
    {':', "3a"}, {'<', "3c"}, {'>', "3e"}, {'@', "40"},  {'\\', "5c"},
};

static int escape_code_of(char c)
{
    for (size_t i = 0; i < sizeof escapes / sizeof escapes[0]; i++)
        if (escapes[i].c == c)
            return (int)i;
    return -1;
}

static int code_at(const char *p)
{
    if (p[0] == '\0' || p[1] == '\0')
        return -1;
    for (size_t i = 0; i < sizeof escapes / sizeof escapes[0]; i++)
        if (p[0] == escapes[i].code[0] && p[1] == escapes[i].code[1])
            return (int)i;
    return -1;
}

int proto_jid_escape_node(const char *in, char *out, size_t len)
{
    size_t o = 0;
    for (const char *p = in; *p; p++) {
        int e = escape_code_of(*p);
        /* A backslash is escaped only where it would otherwise read as an escape sequence. */
        if (*p == '\\' && code_at(p + 1) < 0)
            e = -1;
        size_t need = e >= 0 ? 3 : 1;
        if (o + need >= len)
            return -1;
        if (e >= 0) {
            out[o++] = '\\';
            out[o++] = escapes[e].code[0];
            out[o++] = escapes[e].code[1];
        } else {
            out[o++] = *p;
        }
    }
    if (o >= len)
        return -1;
    out[o] = '\0';
    return (int)o;
}

int proto_jid_unescape_node(const char *in, char *out, size_t len)
{
    size_t o = 0;
    for (const char *p = in; *p; p++) {
        if (o + 1 >= len)
            return -1;
        int e = *p == '\\' ? code_at(p + 1) : -1;
        if (e >= 0) {
            out[o++] = escapes[e].c;
            p += 2;
        } else {
            out[o++] = *p;
        }
    }
    if (o >= len)
        return -1;
    out[o] = '\0';
    return (int)o;
}
