#include <string.h>

#include "check.h"
#include "jid.h"

static void test_escape(void)
{
    char out[256], back[256];
    CHECK(proto_jid_escape_node("bob@example.com", out, sizeof out) > 0);
    CHECK_STR(out, "bob\\40example.com");
    CHECK(proto_jid_unescape_node(out, back, sizeof back) > 0);
    CHECK_STR(back, "bob@example.com");
    /* Every one of the ten escapes round-trips. */
    const char *all = "a b\"c&d'e/f:g<h>i@j\\5ck";
    CHECK(proto_jid_escape_node(all, out, sizeof out) > 0);
    CHECK_STR(out, "a\\20b\\22c\\26d\\27e\\2ff\\3ag\\3ch\\3ei\\40j\\5c5ck");
    CHECK(proto_jid_unescape_node(out, back, sizeof back) > 0);
    CHECK_STR(back, all);
    /* A backslash that starts no escape stays as it is. */
    CHECK(proto_jid_escape_node("a\\zz", out, sizeof out) > 0);
    CHECK_STR(out, "a\\zz");
    CHECK(proto_jid_unescape_node("a\\zz\\", back, sizeof back) > 0);
    CHECK_STR(back, "a\\zz\\");
    /* Output that does not fit fails instead of truncating. */
    CHECK(proto_jid_escape_node("bob@example.com", out, 5) < 0);
    CHECK(proto_jid_unescape_node("bob\\40example.com", back, 4) < 0);
}

static void test_parse(void)
{
    proto_jid_t j;
    char bare[PROTO_JID_MAX];
    CHECK(proto_jid_parse("alice@localhost/phone", &j) == 0);
    CHECK_STR(j.node, "alice");
    CHECK_STR(j.domain, "localhost");
    CHECK_STR(j.resource, "phone");
    CHECK(proto_jid_format_bare(&j, bare, sizeof bare) == 0);
    CHECK_STR(bare, "alice@localhost");
    CHECK(proto_jid_parse("receipts.localhost", &j) == 0);
    CHECK(j.node[0] == '\0');
    CHECK(proto_jid_parse("a@b/with/slash", &j) == 0);
    CHECK_STR(j.resource, "with/slash");
    CHECK(proto_jid_parse("", &j) < 0);
    CHECK(proto_jid_parse("@localhost", &j) < 0);
    CHECK(proto_jid_parse("a@", &j) < 0);
    CHECK(proto_jid_parse("a@b/", &j) < 0);
    CHECK(proto_jid_parse("a b@c", &j) < 0);
    CHECK(proto_jid_parse("a@b@c", &j) < 0);
    char longnode[2000];
    memset(longnode, 'x', 1500);
    strcpy(longnode + 1500, "@d");
    CHECK(proto_jid_parse(longnode, &j) < 0);
}

int main(void)
{
    test_escape();
    test_parse();
    return check_report();
}
