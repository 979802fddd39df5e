"""End-to-end scenarios for receiptd (see proto/PROTOCOL.md for the contract).

Each scenario is `async def name(t)` registered with @scenario(...); `t` is a Ctx giving access to
the process stack (t.stack) and creating connected clients (await t.client('alice')).
A scenario fails by raising AssertionError (use t.check / t.eq); every check prints what it saw.
"""

import asyncio
import datetime
import math
import os
import re
import signal
import sqlite3
import subprocess
import time
import xml.etree.ElementTree as ET

from harness import COMPONENT, OTHER_DOMAIN, USERS, HarnessError
from xclient import (Client, NS_RD, NS_RECEIPTS, NS_SID, NS_FORWARD, NS_DELAY, NS_CLIENT, NS_PING,
                     NS_DISCO_INFO, q, find, error_condition, xml_str, relay_jid, sid_seq,
                     forwarded_message, forwarded_sid)

SCENARIOS = {}


ALL_SERVERS = ("prosody", "ejabberd")


class Scenario:
    def __init__(self, name, func, delivery, doc, timeout, servers, receiptds, extra=None):
        self.name = name
        self.extra = extra or {}
        self.func = func
        self.delivery = delivery or {}
        self.doc = (doc or "").strip().splitlines()[0] if doc else ""
        self.timeout = timeout
        self.servers = tuple(servers)
        self.receiptds = receiptds


def scenario(name, delivery=None, timeout=60, servers=ALL_SERVERS, receiptds=1, extra=None):
    """Register a scenario; `servers` it runs on, `receiptds` = receiptd processes to start,
    `extra` = more component.ini settings, {section: {key: value}}."""
    def deco(f):
        SCENARIOS[name] = Scenario(name, f, delivery, f.__doc__, timeout, servers, receiptds, extra)
        return f
    return deco


def names(server=None, redis=None):
    """Scenario names (those that run on `server` if given; with redis='cluster', those of
    CLUSTER_SCENARIOS only)."""
    return [n for n, sc in SCENARIOS.items() if (server is None or server in sc.servers)
            and (redis != "cluster" or n in CLUSTER_SCENARIOS)]


class Ctx:
    def __init__(self, stack, verbose=False):
        self.stack = stack
        self.server = getattr(stack, "server_name", "prosody")   # 'prosody' or 'ejabberd': branch on it
        self.clients = []
        self.verbose = verbose
        self.t0 = time.monotonic()

    def say(self, fmt, *args):
        print("[%6.2fs] %s" % (time.monotonic() - self.t0, fmt % args if args else fmt), flush=True)

    async def client(self, user, announce=True, auto_receipts=False, initial_presence=True,
                     resource=None):
        domain, pw = USERS[user]
        jid = "%s@%s" % (user, domain) + ("/" + resource if resource else "")
        c = Client(jid, pw, self.stack.c2s_port, auto_receipts=auto_receipts)
        self.clients.append(c)
        await c.start(initial_presence=initial_presence)
        if announce:
            await self.announce(c)
        return c

    async def announce(self, c):
        c.announce()
        # round trip to the component so the presence has been processed before we go on
        await c.iq("get", "<ping xmlns='%s'/>" % NS_PING)
        await asyncio.sleep(0.2)

    async def close_clients(self):
        for c in self.clients:
            try:
                await c.stop()
            except Exception:
                pass

    async def sync(self, fn, *args):
        """Run a blocking harness call (process restart etc.) without blocking the event loop."""
        return await asyncio.to_thread(fn, *args)

    # -- assertions
    def check(self, cond, msg, *args):
        if not cond:
            raise AssertionError(msg % args if args else msg)

    def eq(self, got, want, what):
        if got != want:
            raise AssertionError("%s: expected %r, got %r" % (what, want, got))


def bare(user):
    return "%s@%s" % (user, USERS[user][0])


def rj(user):
    return relay_jid(bare(user))


def parse_stamp(s, what):
    if not s:
        raise AssertionError("%s: missing XEP-0082 stamp" % what)
    try:
        return datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise AssertionError("%s: %r is not a XEP-0082 date-time" % (what, s))


def stored_sid(t, m, mid, sender_user_domain_bare_rcpt):
    """Validate a <stored/> message and return its stanza-id."""
    st = find(m, NS_RD, "stored")
    t.check(st is not None, "no <stored/> in %s", xml_str(m))
    t.eq(st.get("id"), mid, "<stored/> id")
    sid = st.get("stanza-id")
    sid_seq(sid)
    t.eq(m["type"], "headline", "type of the <stored/> message (%s)" % xml_str(m))
    t.eq(str(m["from"]), relay_jid(sender_user_domain_bare_rcpt), "from of <stored/> (%s)" % xml_str(m))
    return sid


async def send_stored(t, c, rcpt_user, mid, body="hello", **kw):
    c.send_msg(bare(rcpt_user), body=body, mid=mid, request=True, **kw)
    m = await c.wait_stored_or_error(mid, timeout=5)
    if m["type"] == "error":
        raise AssertionError("expected <stored/> for %s, got error %s: %s" % (
            mid, error_condition(m), xml_str(m)))
    return stored_sid(t, m, mid, bare(rcpt_user))


async def expect_error(t, c, mid, cond, etype=None, timeout=5, what=""):
    def pred(m):
        return m["type"] == "error" and (mid is None or m["id"] == mid)
    m = await c.wait_msg(pred, timeout, "message error (%s) for id %r %s" % (cond, mid, what))
    et, ec, text = error_condition(m)
    t.check(ec == cond, "%s: expected error condition %s, got %s (type %s, text %r): %s",
            what or mid, cond, ec, et, text, xml_str(m))
    if etype:
        t.check(et == etype, "%s: expected error type %s, got %s: %s", what or mid, etype, et, xml_str(m))
    return m


async def expect_iq_error(t, c, itype, payload, cond, etype=None):
    kind, res = await c.iq(itype, payload)
    t.check(kind == "error", "expected IQ error %s for %s, got result %s", cond, payload, xml_str(res))
    et, ec, text = error_condition(res)
    t.check(ec == cond, "expected IQ error %s for %s, got %s (type %s): %s", cond, payload, ec, et,
            xml_str(res))
    if etype:
        t.check(et == etype, "expected IQ error type %s for %s, got %s: %s", etype, payload, et, xml_str(res))
    return res


def no_messages(t, c, pred, what):
    got = [m for m in c.inbox if pred(m)]
    t.check(not got, "%s: unexpected message(s):\n  %s", what, "\n  ".join(xml_str(m) for m in got))


def is_push(m):
    return m["type"] != "error" and find(m, NS_SID, "stanza-id") is not None


def push_sid(m):
    return find(m, NS_SID, "stanza-id").get("id")


# ============================================================== scenarios

@scenario("cli")
async def cli(t):
    """--help, --version, --check-config on a good and on broken configs."""
    import subprocess

    def run(*args):
        r = subprocess.run([t.stack.binary] + list(args), capture_output=True, text=True, timeout=10)
        return r.returncode, r.stdout + r.stderr
    code, out = await t.sync(run, "--help")
    t.eq(code, 0, "exit code of --help (%s)" % out.strip()[:200])
    t.check("-c" in out, "--help does not mention -c: %s", out)
    code, out = await t.sync(run, "--version")
    t.eq(code, 0, "exit code of --version")
    t.check("receiptd" in out, "--version output: %r", out)
    code, out = await t.sync(run, "--check-config", "-c", t.stack.receiptd.ini)
    t.eq(code, 0, "--check-config on the test config (%s)" % out.strip()[:300])
    good = open(t.stack.receiptd.ini).read()
    broken = {
        "missing jid": good.replace("jid = %s\n" % COMPONENT, ""),
        "retry_interval=abc": good.replace("retry_interval = ", "retry_interval = abc ; "),
        "port out of range": good.replace("server_port = ", "server_port = 99999 ; "),
    }
    for what, text in broken.items():
        t.check(text != good, "could not build the broken config %r", what)
        path = t.stack.receiptd.ini + ".broken"
        with open(path, "w") as f:
            f.write(text)
        code, out = await t.sync(run, "--check-config", "-c", path)
        t.check(code != 0, "--check-config accepted a config with %s:\n%s", what, text)
        t.say("%s -> exit %d: %s", what, code, out.strip().splitlines()[-1] if out.strip() else "")
    code, out = await t.sync(run, "--check-config", "-c", "/nonexistent/receiptd.ini")
    t.check(code != 0, "--check-config accepted a missing file")


@scenario("addressing")
async def addressing(t):
    """Relay addressing errors: jid-malformed, item-not-found, forbidden; a valid address works."""
    alice = await t.client("alice")
    bob = await t.client("bob")
    eve = await t.client("eve", announce=False)

    # positive control
    sid = await send_stored(t, alice, "bob", "ok-1")
    t.say("valid address stored as %s", sid)
    await bob.wait_push("ok-1")

    for i, node in enumerate([r"\40localhost", "bob\\40", r"bob\40\40localhost", "bob"]):
        mid = "malformed-%d" % i
        alice.send_msg(None, mid=mid, raw_to="%s@%s" % (node, COMPONENT))
        await expect_error(t, alice, mid, "jid-malformed", "modify", what="node %r" % node)
        t.say("node %r -> jid-malformed", node)

    for i, rcpt in enumerate(["carol@" + OTHER_DOMAIN, "x@nowhere.example"]):
        mid = "foreign-%d" % i
        alice.send_msg(rcpt, mid=mid)
        await expect_error(t, alice, mid, "item-not-found", "cancel", what="recipient %s" % rcpt)
        t.say("recipient %s -> item-not-found", rcpt)

    eve.send_msg(bare("bob"), mid="from-eve")
    await expect_error(t, eve, "from-eve", "forbidden", what="sender eve@" + OTHER_DOMAIN)
    t.say("sender from %s -> forbidden", OTHER_DOMAIN)
    await expect_iq_error(t, eve, "get", "<summary xmlns='%s'/>" % NS_RD, "forbidden")

    alice.send_msg(None, mid="to-component", raw_to=COMPONENT)
    await expect_error(t, alice, "to-component", "service-unavailable", what="message to the component itself")

    await asyncio.sleep(0.5)
    no_messages(t, bob, lambda m: True, "bob after rejected messages")
    no_messages(t, alice, lambda m: find(m, NS_RD, "stored") is not None, "alice <stored/> for rejected messages")


@scenario("stored")
async def stored(t):
    """<stored/> ack with a well-formed, increasing stanza-id; goes to the sending full JID even unannounced."""
    alice = await t.client("alice")
    s1 = await send_stored(t, alice, "bob", "st-1")
    s2 = await send_stored(t, alice, "bob", "st-2")
    t.say("stanza-ids %s %s", s1, s2)
    t.check(s1 != s2, "two messages got the same stanza-id %s", s1)
    t.check(sid_seq(s2) > sid_seq(s1), "stanza-ids do not sort by arrival: %s then %s", s1, s2)
    # second resource of alice that never announced itself still gets its <stored/>
    alice2 = await t.client("alice", announce=False, resource="second")
    s3 = await send_stored(t, alice2, "bob", "st-3")
    t.check(sid_seq(s3) > sid_seq(s2), "stanza-ids do not sort by arrival: %s then %s", s2, s3)
    await asyncio.sleep(0.3)
    no_messages(t, alice, lambda m: find(m, NS_RD, "stored") is not None,
                "the other resource of alice got a <stored/> for st-3")


@scenario("dedupe")
async def dedupe(t):
    """Same (sender bare JID, id) again -> same <stored/>, stored/delivered once."""
    alice = await t.client("alice")
    s1 = await send_stored(t, alice, "bob", "dup-1", body="first")
    s1b = await send_stored(t, alice, "bob", "dup-1", body="second copy")
    t.eq(s1b, s1, "stanza-id of the duplicate")
    alice2 = await t.client("alice", announce=False, resource="other")
    s1c = await send_stored(t, alice2, "bob", "dup-1", body="third copy")
    t.eq(s1c, s1, "stanza-id of the duplicate from another resource of the same bare JID")
    carol = await t.client("carol")
    s2 = await send_stored(t, carol, "bob", "dup-1", body="carol")
    t.check(s2 != s1, "same id from another sender was deduplicated against alice's (%s)", s2)

    bob = await t.client("bob", announce=False)
    n = await bob.count()
    t.eq(n, 2, "bob's offline count (alice's dup-1 once + carol's)")
    items = await bob.fetch_all()
    t.eq(sorted(s for s, _ in items), sorted([s1, s2]), "stanza-ids in bob's queue")

    # live: bob online, the same id sent twice quickly -> one push
    await t.announce(bob)
    bob.auto_receipts = True
    alice.send_msg(bare("bob"), mid="dup-live", request=True)
    alice.send_msg(bare("bob"), mid="dup-live", request=True)
    a = await alice.wait_stored("dup-live")
    b = await alice.wait_stored("dup-live")
    t.eq(find(a, NS_RD, "stored").get("stanza-id"), find(b, NS_RD, "stored").get("stanza-id"),
         "stanza-id of live duplicate")
    await bob.wait_push("dup-live")
    extra = await bob.collect(lambda m: is_push(m) and m["id"] == "dup-live", 1.0)
    t.check(not extra, "duplicate was pushed again: %s", [xml_str(m) for m in extra])


@scenario("live", delivery={"retry_interval": 0.5, "delivery_window": 5})
async def live(t):
    """Live delivery to every announced resource with request + stanza-id; receipt relayed to the sender."""
    alice = await t.client("alice")
    bob = await t.client("bob", resource="phone")
    bob2 = await t.client("bob", resource="laptop")
    extra = "<x xmlns='urn:example:e2e'><y a='1'>payload</y></x>"
    sid = await send_stored(t, alice, "bob", "live-1", body="hi bob", extra=[extra])
    for c in (bob, bob2):
        m = await c.wait_push("live-1")
        t.say("%s got %s", c.boundjid, xml_str(m))
        t.eq(str(m["from"]), rj("alice"), "from of the push")
        t.eq(str(m["to"]), str(c.boundjid), "to of the push (the full JID)")
        t.eq(m["type"], "chat", "type of the push")
        t.eq(m["body"], "hi bob", "body of the push")
        x = m.xml.find("{urn:example:e2e}x")
        t.check(x is not None and x.find("{urn:example:e2e}y") is not None
                and x.find("{urn:example:e2e}y").text == "payload", "custom child not kept: %s", xml_str(m))
        t.check(find(m, NS_RECEIPTS, "request") is not None, "push without <request/>: %s", xml_str(m))
        si = find(m, NS_SID, "stanza-id")
        t.eq(si.get("id"), sid, "stanza-id of the push")
        t.eq(si.get("by"), COMPONENT, "stanza-id 'by'")
    bob.send_receipt(m, to=rj("alice"))
    r = await alice.wait_receipt("live-1")
    t.eq(str(r["from"]), rj("bob"), "from of the relayed receipt")
    t.say("alice got receipt %s", xml_str(r))
    # bob acked: no more pushes to him; the laptop has not acked, so it is still owed its own
    await bob.collect(lambda m: True, 0.3)
    again = await bob.collect(lambda m: is_push(m) and m["id"] == "live-1", 1.5)
    t.check(not again, "retransmitted to bob after his receipt: %s", [xml_str(m) for m in again])
    t.eq(await bob.count(), 0, "bob's (phone) count after his receipt")
    later = await bob2.collect(lambda m: is_push(m) and m["id"] == "live-1", 1.0)
    t.check(later, "the laptop got no retransmission after the phone's receipt (it never acked)")
    t.eq(await bob2.count(), 1, "the laptop's count before its own ack")
    bob2.send_receipt(later[-1], to=rj("alice"))
    await asyncio.sleep(0.5)
    await bob2.collect(lambda m: True, 0.2)
    again = await bob2.collect(lambda m: is_push(m) and m["id"] == "live-1", 1.5)
    t.check(not again, "retransmitted to the laptop after its receipt: %s", [xml_str(m) for m in again])
    dup = await alice.collect(lambda m: find(m, NS_RECEIPTS, "received") is not None, 0.5)
    t.check(not dup, "second receipt relayed to alice: %s", [xml_str(m) for m in dup])
    t.eq(await bob2.count(), 0, "the laptop's count after its receipt")

    # type normal kept as well
    alice.send_msg(bare("bob"), mid="live-2", body="normal", mtype="normal", request=True)
    await alice.wait_stored("live-2")
    m = await bob.wait_push("live-2")
    t.check(m.xml.get("type") in (None, "normal"), "type normal not kept: %s", xml_str(m))
    bob.send_receipt(m, to=rj("alice"))
    await alice.wait_receipt("live-2")


@scenario("devices", delivery={"retry_interval": 0.5, "delivery_window": 4})
async def devices(t):
    """Per device: two resources each get and ack independently (one receipt); a known device that was away fetches what it never acked."""
    alice = await t.client("alice")
    phone = await t.client("bob", resource="phone")
    laptop = await t.client("bob", resource="laptop")
    tablet = await t.client("bob", resource="tablet")
    # each device acks once, which makes it a known device; acked by all three, dv-0 is purged
    await send_stored(t, alice, "bob", "dv-0")
    for c in (phone, laptop, tablet):
        c.send_receipt(await c.wait_push("dv-0"), to=rj("alice"))
    await alice.wait_receipt("dv-0")
    await asyncio.sleep(0.5)
    t.eq(await phone.count(), 0, "phone's count after every device acked dv-0")
    await tablet.stop()
    await asyncio.sleep(0.5)
    mids = ["dv-1", "dv-2", "dv-3"]
    sids = [await send_stored(t, alice, "bob", mid) for mid in mids]
    # the phone acks each by receipt: one receipt per message reaches alice
    for mid in mids:
        phone.send_receipt(await phone.wait_push(mid), to=rj("alice"))
        await alice.wait_receipt(mid)
    # the laptop has not acked: it is still owed its own deliveries, retransmitted
    for mid in mids:
        await laptop.wait_push(mid)
    again = await laptop.collect(lambda m: is_push(m) and m["id"] in mids, 1.2)
    t.check(again, "no retransmission to the laptop after the phone's receipts")
    t.eq(await laptop.count(), 3, "laptop's count before its own ack")
    t.eq(await phone.count(), 0, "phone's count after its receipts")
    await laptop.ack(sids)
    await laptop.collect(lambda m: True, 0.3)
    late = await laptop.collect(lambda m: is_push(m) and m["id"] in mids, 1.5)
    late += await phone.collect(lambda m: is_push(m) and m["id"] in mids, 0)
    t.check(not late, "pushed again after both acked: %s", [xml_str(m) for m in late])
    dup = await alice.collect(lambda m: find(m, NS_RECEIPTS, "received") is not None, 0)
    t.check(not dup, "receipts relayed twice: %s", [xml_str(m) for m in dup])
    # the tablet comes back (same resource, a known device): it fetches exactly what it never acked
    tablet2 = await t.client("bob", resource="tablet", announce=False)
    t.eq(await tablet2.count(), 3, "tablet's count when it comes back")
    items = await tablet2.fetch_all(page=2)
    t.eq([s for s, _ in items], sids, "tablet's fetch, oldest first")
    t.eq([forwarded_message(f).get("id") for _, f in items], mids, "ids in the tablet's fetch")
    await tablet2.ack(sids)
    t.eq(await tablet2.count(), 0, "tablet's count after its ack")
    # acked by every known device: purged, so even a device never seen before gets nothing
    fresh = await t.client("bob", resource="fresh", announce=False)
    t.eq(await fresh.count(), 0, "a new device's count once every known device acked")
    dup = await alice.collect(lambda m: find(m, NS_RECEIPTS, "received") is not None, 0.5)
    t.check(not dup, "receipts relayed again after the tablet's ack: %s", [xml_str(m) for m in dup])


@scenario("retransmit", delivery={"retry_interval": 0.5, "delivery_window": 2})
async def retransmit(t):
    """An announced recipient that never acks gets retransmissions, then the message is in its offline queue."""
    alice = await t.client("alice")
    bob = await t.client("bob")
    sid = await send_stored(t, alice, "bob", "rt-1")
    first = await bob.wait_push("rt-1")
    t0 = time.monotonic()
    pushes = [first] + await bob.collect(lambda m: is_push(m) and m["id"] == "rt-1", 3.0)
    t.say("%d pushes of rt-1 in the first ~3 s", len(pushes))
    t.check(len(pushes) >= 3, "expected >= 3 pushes (retry 0.5 s, window 2 s), got %d", len(pushes))
    t.check(len(pushes) <= 7, "too many pushes for retry 0.5 s / window 2 s: %d", len(pushes))
    for m in pushes:
        t.eq(push_sid(m), sid, "stanza-id of retransmission")
    late = await bob.collect(lambda m: is_push(m) and m["id"] == "rt-1", 1.5)
    t.check(not late, "still retransmitting %.1f s after the window: %s", time.monotonic() - t0,
            [xml_str(m) for m in late])
    t.eq(await bob.count(), 1, "bob's offline count after the window")
    items = await bob.fetch_all()
    t.eq([s for s, _ in items], [sid], "stanza-ids in bob's queue")
    await bob.ack([sid])
    await alice.wait_receipt("rt-1")
    t.eq(await bob.count(), 0, "bob's offline count after ack")


@scenario("unavailable-requeue", delivery={"retry_interval": 0.5, "delivery_window": 30})
async def unavailable_requeue(t):
    """A pending push moves to the offline queue as soon as the recipient's last resource goes unavailable."""
    alice = await t.client("alice")
    bob = await t.client("bob", resource="a")
    bob2 = await t.client("bob", resource="b")
    sid = await send_stored(t, alice, "bob", "ur-1")
    await bob.wait_push("ur-1")
    await bob2.wait_push("ur-1")
    bob.announce("unavailable")
    await asyncio.sleep(0.3)
    bob.clear_inbox()
    # still pushed to the remaining resource only
    again = await bob2.wait_push("ur-1", timeout=3)
    t.eq(push_sid(again), sid, "stanza-id of the retransmission")
    extra = await bob.collect(lambda m: is_push(m), 1.0)
    t.check(not extra, "push to a resource after its unavailable: %s", [xml_str(m) for m in extra])
    bob2.announce("unavailable")
    t0 = time.monotonic()
    deadline = t0 + 5
    while time.monotonic() < deadline:
        if await bob.count() == 1:
            break
        await asyncio.sleep(0.2)
    t.say("queued %.1f s after the last unavailable (window 30 s)", time.monotonic() - t0)
    t.eq(await bob.count(), 1, "bob's queue 5 s after his last resource went unavailable (window 30 s)")
    bob2.clear_inbox()
    await asyncio.sleep(1.0)
    no_messages(t, bob2, is_push, "push after the last unavailable")
    t.eq([s for s, _ in await bob.fetch_all()], [sid], "bob's queue")


@scenario("offline-login")
async def offline_login(t):
    """A recipient offline all along gets NOTHING from the server at login; all is in its queue."""
    alice = await t.client("alice")
    ids = ["off-%d" % i for i in range(3)]
    for mid in ids:
        await send_stored(t, alice, "bob", mid)
    alice.send_msg(bare("bob"), mid="off-noreq", request=False)
    await asyncio.sleep(0.5)
    bob = await t.client("bob", announce=False)   # initial broadcast presence: mod_offline would flood now
    await asyncio.sleep(2.0)
    t.check(not bob.all_messages, "bob got messages at login (server offline store got copies?):\n  %s",
            "\n  ".join(xml_str(m) for m in bob.all_messages))
    n = await bob.count()
    t.eq(n, 4, "bob's offline count (3 with request + 1 without)")
    items = await bob.fetch_all()
    got_ids = sorted(forwarded_message(f).get("id") for _, f in items)
    t.eq(got_ids, sorted(ids + ["off-noreq"]), "ids in bob's queue")
    # control: the server's own offline store is on (mod_offline / Prosody's offline) and floods at
    # login, so the check above is not vacuous: a direct (not relayed) message to offline carol
    alice.send_message(mto=bare("carol"), mbody="direct, not through receiptd", mtype="chat")
    await asyncio.sleep(0.5)
    carol = await t.client("carol", announce=False)
    m = await carol.wait_msg(lambda m: m["body"] == "direct, not through receiptd", 5,
                             "the server's offline copy of a direct message (control)")
    t.say("control: %s's offline store flooded carol at login: %s", t.server, xml_str(m))


@scenario("norequest", delivery={"retry_interval": 0.5, "delivery_window": 2})
async def norequest(t):
    """Without <request/>: no <stored/>, pushed once when online, else queued; no receipt relay."""
    alice = await t.client("alice")
    bob = await t.client("bob")
    alice.send_msg(bare("bob"), mid="nr-1", request=False)
    # (a push without <request/> may or may not carry a stanza-id)
    m = await bob.wait_msg(lambda m: m["type"] != "error" and m["id"] == "nr-1", 5, "push of nr-1")
    t.eq(str(m["from"]), rj("alice"), "from of the push")
    t.check(find(m, NS_RECEIPTS, "request") is None, "push of a message without request has <request/>: %s",
            xml_str(m))
    t.say("push without request: %s", xml_str(m))
    more = await bob.collect(lambda m: m["type"] != "error" and m["id"] == "nr-1", 1.5)
    t.check(not more, "message without request was retransmitted: %s", [xml_str(x) for x in more])
    no_messages(t, alice, lambda m: find(m, NS_RD, "stored") is not None, "alice got <stored/> without request")
    bob.send_receipt(m, to=rj("alice"))
    await asyncio.sleep(0.7)
    no_messages(t, alice, lambda m: find(m, NS_RECEIPTS, "received") is not None,
                "receipt relayed for a message without request")
    t.eq(await bob.count(), 0, "bob's queue after a live push without request")
    # offline recipient: queued
    carol = await t.client("carol", announce=False)
    alice.send_msg(bare("carol"), mid="nr-2", request=False)
    await asyncio.sleep(1.0)
    no_messages(t, carol, lambda m: True, "carol (not announced) got a push")
    t.eq(await carol.count(), 1, "carol's queue")
    items = await carol.fetch_all()
    t.eq([forwarded_message(f).get("id") for _, f in items], ["nr-2"], "ids in carol's queue")


@scenario("paging")
async def paging(t):
    """25 offline messages: summary 25, fetch 10/10/5, ack all, summary 0, sender holds 25 receipts."""
    alice = await t.client("alice", announce=False)   # sender never announces
    ids = ["pg-%02d" % i for i in range(25)]
    for mid in ids:
        alice.send_msg(bare("bob"), mid=mid, body="body of %s" % mid)
    sids = {}
    for mid in ids:
        m = await alice.wait_stored_or_error(mid, timeout=10)
        t.check(m["type"] != "error", "error for %s: %s", mid, xml_str(m))
        sids[mid] = stored_sid(t, m, mid, bare("bob"))
    order = [sids[mid] for mid in ids]
    seqs = [sid_seq(s) for s in order]
    t.check(seqs == sorted(seqs), "stanza-ids not increasing in send order: %s", order)

    bob = await t.client("bob", announce=False)
    s = await bob.summary()
    t.say("summary %s", xml_str(s))
    t.eq(int(s.get("count")), 25, "summary count")
    t.check(int(s.get("bytes", "0")) > 0, "summary bytes not > 0: %s", xml_str(s))
    o, n = parse_stamp(s.get("oldest"), "oldest"), parse_stamp(s.get("newest"), "newest")
    t.check(o <= n, "oldest %s after newest %s", o, n)

    got, after, pages = [], None, []
    for want_n, want_complete in ((10, "false"), (10, "false"), (5, "true")):
        b = await bob.fetch(10, after)
        fw = b.findall(q(NS_FORWARD, "forwarded"))
        pages.append(len(fw))
        t.eq(len(fw), want_n, "page %d size" % len(pages))
        t.eq(b.get("complete"), want_complete, "page %d complete" % len(pages))
        for f in fw:
            d = f.find(q(NS_DELAY, "delay"))
            t.check(d is not None, "forwarded without <delay/>: %s", xml_str(f))
            parse_stamp(d.get("stamp"), "delay stamp")
            m = forwarded_message(f)
            t.check(m is not None, "forwarded without a jabber:client <message/>: %s", xml_str(f))
            t.eq(m.get("from"), str(alice.boundjid), "from of the forwarded message")
            t.eq(m.get("to"), bare("bob"), "to of the forwarded message")
            body = m.find(q(NS_CLIENT, "body"))
            t.check(body is not None and body.text == "body of %s" % m.get("id"),
                    "body not kept: %s", xml_str(f))
            got.append((m.get("id"), forwarded_sid(f)))
        t.eq(b.get("last"), got[-1][1], "page %d last" % len(pages))
        after = b.get("last")
    t.eq([g[0] for g in got], ids, "ids in fetch order")
    t.eq([g[1] for g in got], order, "stanza-ids in fetch order")
    # fetch never deletes
    t.eq(await bob.count(), 25, "count after fetching")
    await bob.ack(order)
    s = await bob.summary()
    t.eq(int(s.get("count")), 0, "summary count after ack")
    t.check(s.get("oldest") is None and s.get("newest") is None, "stamps on an empty summary: %s", xml_str(s))
    b = await bob.fetch(10)
    t.eq(len(b.findall(q(NS_FORWARD, "forwarded"))), 0, "fetch after ack")
    t.eq(b.get("complete"), "true", "complete of an empty fetch")

    # the sender never announced: its 25 receipts are queued for it
    await asyncio.sleep(0.5)
    no_messages(t, alice, lambda m: find(m, NS_RECEIPTS, "received") is not None,
                "receipts pushed to an unannounced sender")
    t.eq(await alice.count(), 25, "alice's queue (receipts)")
    items = await alice.fetch_all()
    rids = []
    for _, f in items:
        m = forwarded_message(f)
        r = m.find(q(NS_RECEIPTS, "received")) if m is not None else None
        t.check(r is not None, "queued item for alice is not a receipt: %s", xml_str(f))
        rids.append(r.get("id"))
    t.eq(sorted(rids), ids, "receipt ids in alice's queue")


@scenario("readahead")
async def readahead(t):
    """Pages read ahead (component/readahead.h) are what a fetch reads now: ids the device acked
    since (by ack IQ, by <received/>) are gone, messages stored since are there, and a last page
    is read fresh; receiptd's exit line counts the fetches the read-ahead answered."""
    alice = await t.client("alice", announce=False)
    ids = ["ra-%02d" % i for i in range(40)]
    sids = {mid: await send_stored(t, alice, "bob", mid, body="body of %s" % mid) for mid in ids}
    bob = await t.client("bob", announce=False)
    got = []

    async def page(after, what):
        b = await bob.fetch(10, after)
        items = [(forwarded_message(f).get("id"), forwarded_sid(f))
                 for f in b.findall(q(NS_FORWARD, "forwarded"))]
        t.say("%s: %s complete=%s", what, [i for i, _ in items], b.get("complete"))
        if items:
            t.eq(b.get("last"), items[-1][1], "%s: last" % what)
        got.extend(items)
        return b

    b = await page(None, "page 1")
    # pages 2 and 3 are being read ahead now; let them arrive, then ack one id of each
    await asyncio.sleep(0.5)
    await bob.ack([sids["ra-12"], sids["ra-25"]])
    b = await page(b.get("last"), "page 2")
    # a <received/> (found by origin: its place is unknown) forgets every page read ahead
    bob.send_receipt({"id": "ra-22", "from": None}, to=rj("alice"))
    for _ in range(50):
        if await bob.count() == 37:
            break
        await asyncio.sleep(0.1)
    t.eq(await bob.count(), 37, "bob's count after acking three")
    more = ["ra-%02d" % i for i in range(40, 45)]
    for mid in more:
        sids[mid] = await send_stored(t, alice, "bob", mid, body="body of %s" % mid)
    b = await page(b.get("last"), "page 3")
    await asyncio.sleep(0.5)       # page 4 is read ahead and kept
    b = await page(b.get("last"), "page 4")
    t.eq(b.get("complete"), "false", "page 4 complete")
    b = await page(b.get("last"), "page 5")
    t.eq(b.get("complete"), "true", "page 5 complete")
    want = [m for m in ids + more if m not in ("ra-12", "ra-22", "ra-25")]
    t.eq([i for i, _ in got], want, "ids fetched, in order")
    t.eq([s for _, s in got], [sids[m] for m in want], "stanza-ids fetched")
    t.eq(len(got), len(set(s for _, s in got)), "no message fetched twice")

    await t.sync(t.stack.stop_receiptd_checked)
    m = re.search(r"fetches answered by read-ahead (\d+)", t.stack.receiptd.log_text())
    t.check(m is not None, "no read-ahead count in receiptd's exit line")
    t.check(int(m.group(1)) >= 1, "no fetch was answered by the read-ahead: %s", m.group(0))


@scenario("summary-ids", delivery={"fetch_max": 5})
async def summary_ids(t):
    """summary ids='true' lists items oldest first, at most fetch_max, with bytes/stamp/from."""
    alice = await t.client("alice")
    carol = await t.client("carol")
    sids = [await send_stored(t, alice, "bob", "si-%d" % i) for i in range(6)]
    sids.append(await send_stored(t, carol, "bob", "si-carol"))
    bob = await t.client("bob", announce=False)
    s = await bob.summary(ids=False)
    t.eq(len(list(s)), 0, "children of a summary without ids")
    t.eq(int(s.get("count")), 7, "count")
    s = await bob.summary(ids=True)
    t.say("summary %s", xml_str(s))
    t.eq(int(s.get("count")), 7, "count with ids")
    items = s.findall(q(NS_RD, "item"))
    t.eq(len(items), 5, "number of items (fetch_max=5)")
    t.eq([i.get("id") for i in items], sids[:5], "item ids, oldest first")
    for i in items:
        t.eq(i.get("from"), bare("alice"), "item from")
        t.check(int(i.get("bytes", "0")) > 0, "item bytes: %s", xml_str(i))
        parse_stamp(i.get("stamp"), "item stamp")
    total = sum(int(i.get("bytes")) for i in items)
    t.check(int(s.get("bytes")) >= total, "summary bytes %s < sum of 5 item bytes %d", s.get("bytes"), total)
    b = await bob.fetch(100)
    n = len(b.findall(q(NS_FORWARD, "forwarded")))
    t.check(n <= 5, "fetch max=100 returned %d items although fetch_max=5", n)
    t.eq(b.get("complete"), "false", "complete when capped by fetch_max")


@scenario("foreign-ack")
async def foreign_ack(t):
    """Another user's ack of my stanza-ids changes nothing."""
    alice = await t.client("alice")
    s1 = await send_stored(t, alice, "bob", "fa-1")
    s2 = await send_stored(t, alice, "bob", "fa-2")
    carol = await t.client("carol")
    res = await carol.ack([s1, s2])
    t.say("carol's ack answered %s", xml_str(res))
    res = await alice.ack([s1, s2])   # the sender cannot ack the recipient's copy either
    await asyncio.sleep(0.7)
    no_messages(t, alice, lambda m: find(m, NS_RECEIPTS, "received") is not None,
                "receipt relayed after a foreign ack")
    bob = await t.client("bob", announce=False)
    t.eq(await bob.count(), 2, "bob's count after carol's and alice's acks")
    t.eq(sorted(s for s, _ in await bob.fetch_all()), sorted([s1, s2]), "bob's queue")
    await bob.ack([s1])
    await alice.wait_receipt("fa-1")
    t.eq(await bob.count(), 1, "bob's count after his own ack")


@scenario("ack-relay")
async def ack_relay(t):
    """Ack IQ returns an empty result, clears the ids and relays <received/> to the online sender."""
    alice = await t.client("alice")
    s1 = await send_stored(t, alice, "bob", "ar-1")
    s2 = await send_stored(t, alice, "bob", "ar-2")
    bob = await t.client("bob", announce=False)
    items = await bob.fetch_all()
    t.eq(sorted(s for s, _ in items), sorted([s1, s2]), "bob's queue")
    res = await bob.ack([s1, s2, "999999-deadbeef"])
    t.eq(len(list(res.xml)), 0, "children of the ack result (%s)" % xml_str(res))
    for mid in ("ar-1", "ar-2"):
        r = await alice.wait_receipt(mid)
        t.eq(str(r["from"]), rj("bob"), "from of the relayed receipt")
    t.eq(await bob.count(), 0, "bob's count after ack")
    # a <received/> message (instead of the ack IQ) also clears an item of the offline queue
    s3 = await send_stored(t, alice, "bob", "ar-3")
    t.eq([s for s, _ in await bob.fetch_all()], [s3], "bob's queue")
    bob.send_msg(None, raw_to=rj("alice"), mid="rcpt-ar-3", request=False, body=None,
                 extra=["<received xmlns='%s' id='ar-3'/>" % NS_RECEIPTS], mtype=None)
    await alice.wait_receipt("ar-3")
    t.eq(await bob.count(), 0, "bob's count after a <received/> message for a queued item")
    # One ack of messages from an online sender and an unannounced one, interleaved: receiptd
    # asks who is online once per sender (component/relay.c), so alice's receipts are pushed,
    # and not stored, and carol's go into her queue, each in the order of the ack.
    carol = await t.client("carol", announce=False)
    mixed = []
    for i in range(3):
        for c, name in ((alice, "alice"), (carol, "carol")):
            mid = "mx-%s-%d" % (name, i)
            mixed.append((name, mid, await send_stored(t, c, "bob", mid)))
    t.eq(sorted(s for s, _ in await bob.fetch_all()), sorted(s for _, _, s in mixed),
         "bob's queue of mixed senders")
    await bob.ack([s for _, _, s in mixed])
    for name, mid, _ in mixed:
        if name == "alice":
            await alice.wait_receipt(mid)
    t.eq(await alice.count(), 0, "alice's queue: her receipts were pushed, not stored")
    queued = []
    for _, f in await carol.fetch_all():
        m = forwarded_message(f)
        r = m.find(q(NS_RECEIPTS, "received")) if m is not None else None
        t.check(r is not None, "queued item for carol is not a receipt: %s", xml_str(f))
        queued.append(r.get("id"))
    t.eq(queued, [mid for name, mid, _ in mixed if name == "carol"], "carol's queued receipts")
    no_messages(t, carol, lambda m: find(m, NS_RECEIPTS, "received") is not None,
                "receipts pushed to an unannounced sender")


@scenario("errors", delivery={"max_stanza_bytes": 4096})
async def errors(t):
    """service-unavailable, bad-request (fetch max, request without id), policy-violation (oversize)."""
    alice = await t.client("alice")
    await expect_iq_error(t, alice, "get", "<bogus xmlns='urn:example:nothing'/>", "service-unavailable")
    await expect_iq_error(t, alice, "set", "<bogus xmlns='urn:example:nothing'/>", "service-unavailable")
    await expect_iq_error(t, alice, "get", "<fetch xmlns='%s' max='abc'/>" % NS_RD, "bad-request")
    await expect_iq_error(t, alice, "get", "<fetch xmlns='%s' max='-3'/>" % NS_RD, "bad-request")
    await expect_iq_error(t, alice, "get", "<summary xmlns='%s' ids='maybe'/>" % NS_RD, "bad-request")
    await expect_iq_error(t, alice, "set", "<ack xmlns='%s'/>" % NS_RD, "bad-request")
    await expect_iq_error(t, alice, "get", "<fetch xmlns='%s' after='garbage'/>" % NS_RD, "item-not-found")
    t.say("IQ errors ok")
    # request without id
    m = alice.make_message(mto=rj("bob"), mbody="no id", mtype="chat")
    del m["id"]
    m.append(ET.Element(q(NS_RECEIPTS, "request")))
    m.send()
    await expect_error(t, alice, None, "bad-request", what="request without id")
    t.say("request without id -> bad-request")
    # oversize
    alice.send_msg(bare("bob"), mid="big-1", body="x" * 8000)
    await expect_error(t, alice, "big-1", "policy-violation", what="8000-byte stanza, max_stanza_bytes=4096")
    t.say("oversize -> policy-violation")
    bob = await t.client("bob", announce=False)
    t.eq(await bob.count(), 0, "bob's queue after rejected messages")
    # a normal message still works
    await send_stored(t, alice, "bob", "small-1")


@scenario("quota", delivery={"max_offline_messages": 3})
async def quota(t):
    """Full offline queue -> resource-constraint (type wait) to the sender, nothing stored."""
    alice = await t.client("alice")
    sids = [await send_stored(t, alice, "bob", "qt-%d" % i) for i in range(3)]
    alice.send_msg(bare("bob"), mid="qt-3")
    await expect_error(t, alice, "qt-3", "resource-constraint", "wait", what="4th message, quota 3")
    no_messages(t, alice, lambda m: find(m, NS_RD, "stored") is not None, "<stored/> for a rejected message")
    bob = await t.client("bob", announce=False)
    t.eq(await bob.count(), 3, "bob's queue at quota")
    await bob.ack(sids[:1])
    await alice.wait_receipt("qt-0")
    await send_stored(t, alice, "bob", "qt-3")   # retry of the same id after room was made
    t.eq(await bob.count(), 3, "bob's queue after ack + retry")


@scenario("quota-bytes", delivery={"max_offline_bytes": 3000})
async def quota_bytes(t):
    """Offline queue over max_offline_bytes -> resource-constraint (type wait)."""
    alice = await t.client("alice")
    stored_ids, rejected = [], None
    for i in range(10):
        mid = "qb-%d" % i
        alice.send_msg(bare("bob"), mid=mid, body="y" * 700)
        m = await alice.wait_stored_or_error(mid)
        if m["type"] == "error":
            et, ec, _ = error_condition(m)
            t.eq((et, ec), ("wait", "resource-constraint"), "error when the byte quota is full (%s)" % xml_str(m))
            rejected = i
            break
        stored_ids.append(mid)
    t.check(rejected is not None, "10 messages of ~700 bytes all stored with max_offline_bytes=3000")
    t.say("%d stored, then resource-constraint", len(stored_ids))
    t.check(2 <= len(stored_ids) <= 4, "%d messages of ~700 bytes stored with max_offline_bytes=3000",
            len(stored_ids))
    bob = await t.client("bob", announce=False)
    s = await bob.summary()
    t.eq(int(s.get("count")), len(stored_ids), "bob's count")
    t.check(int(s.get("bytes")) <= 3000, "bob's bytes over the quota: %s", xml_str(s))


@scenario("ping-disco")
async def ping_disco(t):
    """XEP-0199 ping and disco#info at the component."""
    alice = await t.client("alice", announce=False)
    res = await alice.iq_ok("get", "<ping xmlns='%s'/>" % NS_PING)
    t.eq(res["type"], "result", "ping")
    res = await alice.iq_ok("get", "<query xmlns='%s'/>" % NS_DISCO_INFO)
    qel = find(res, NS_DISCO_INFO, "query")
    t.check(qel is not None, "disco#info result without query: %s", xml_str(res))
    idents = qel.findall(q(NS_DISCO_INFO, "identity"))
    feats = [f.get("var") for f in qel.findall(q(NS_DISCO_INFO, "feature"))]
    t.say("disco#info %s", xml_str(qel))
    t.check(idents, "disco#info without identity: %s", xml_str(res))
    for f in (NS_DISCO_INFO, NS_PING):
        t.check(f in feats, "feature %s not advertised (features %s)", f, feats)
    if NS_RD not in feats:
        t.say("note: %s not advertised in disco#info", NS_RD)


@scenario("subscription")
async def subscription(t):
    """subscribe is approved and returned; mutual subscription makes the user online; unavailable ends it."""
    # available (broadcast) but not announced: presence only reaches the component via the subscription
    bob = await t.client("bob", announce=False)
    bob.send_presence(pto=COMPONENT, ptype="subscribe")
    # Prosody does not forward 'subscribed' to the client: it shows as a roster push (subscription 'to',
    # then 'both' once slixmpp auto-approved the component's own 'subscribe')
    loop = asyncio.get_event_loop()
    deadline = loop.time() + 5
    sub = None
    while loop.time() < deadline:
        sub = bob.client_roster[COMPONENT]["subscription"] if COMPONENT in bob.client_roster else None
        if sub == "both":
            break
        await asyncio.sleep(0.2)
        await bob.get_roster()
    types = [(str(p["from"]), p["type"]) for p in bob.presences]
    t.check((COMPONENT, "subscribe") in types, "component did not subscribe back: %s", types)
    t.eq(sub, "both", "bob's roster subscription with the component (presences seen: %s)" % types)
    await asyncio.sleep(0.5)   # slixmpp auto-approves the component's subscribe
    bob.send_presence()        # broadcast available: reaches the component through the subscription
    await bob.iq("get", "<ping xmlns='%s'/>" % NS_PING)
    await asyncio.sleep(0.5)
    alice = await t.client("alice")
    await send_stored(t, alice, "bob", "sub-1")
    m = await bob.wait_push("sub-1")
    bob.send_receipt(m, to=rj("alice"))
    await alice.wait_receipt("sub-1")
    bob.send_presence(ptype="unavailable")
    await asyncio.sleep(0.7)
    await send_stored(t, alice, "bob", "sub-2")
    await asyncio.sleep(0.7)
    no_messages(t, bob, lambda m: is_push(m) and m["id"] == "sub-2", "push after broadcast unavailable")
    t.eq(await bob.count(), 1, "bob's queue after going unavailable")


@scenario("restart-ping", delivery={"retry_interval": 0.5, "delivery_window": 2}, timeout=90)
async def restart_ping(t):
    """After a receiptd restart, announced resources are pinged and online again; a vanished one is offline."""
    alice = await t.client("alice")
    bob = await t.client("bob", auto_receipts=True)
    carol = await t.client("carol")
    await send_stored(t, alice, "bob", "rp-0")
    await bob.wait_push("rp-0")
    await alice.wait_receipt("rp-0")
    await t.sync(t.stack.stop_receiptd_checked)
    # carol vanishes while receiptd is down: her unavailable is bounced by the server and lost
    await carol.stop()
    await asyncio.sleep(0.3)
    await t.sync(t.stack.receiptd.start)
    t.say("receiptd restarted")
    await asyncio.sleep(1.5)    # time for the pings
    # bob did NOT re-announce: the ping from the component made him online again
    t.check(COMPONENT in bob.pings, "bob was not pinged by the component after its restart (pings: %s)",
            bob.pings)
    await send_stored(t, alice, "bob", "rp-1")
    m = await bob.wait_push("rp-1", timeout=5)
    await alice.wait_receipt("rp-1")
    # carol's old full JID answered the ping with an error: offline, the message waits in her queue
    await send_stored(t, alice, "carol", "rp-2")
    await asyncio.sleep(3.0)
    carol2 = await t.client("carol", announce=False)
    await asyncio.sleep(1.5)
    t.check(not carol2.all_messages, "carol got messages from the server at login:\n  %s",
            "\n  ".join(xml_str(x) for x in carol2.all_messages))
    items = await carol2.fetch_all()
    t.eq([forwarded_message(f).get("id") for _, f in items], ["rp-2"], "carol's queue")


@scenario("kill9")
async def kill9(t):
    """kill -9 of receiptd right after a <stored/>: after restart the message is fetchable, dedupe survives."""
    alice = await t.client("alice")
    sid = await send_stored(t, alice, "bob", "k9-1")
    t.stack.receiptd.kill9()
    t.say("receiptd killed right after <stored/> %s", sid)
    # while no component is connected the server answers itself (see down-retry and send_while_down)
    m = await send_while_down(t, alice, "bob", "k9-down")
    t.say("while down: %s", error_condition(m))
    t.eq(error_condition(m)[1], SERVER_DOWN_CONDITION[t.server], "the server's error while receiptd is down")
    await t.sync(t.stack.receiptd.start)
    t.say("receiptd restarted")
    await t.announce(alice)
    bob = await t.client("bob", announce=False)
    items = await bob.fetch_all()
    t.eq([s for s, _ in items], [sid], "bob's queue after kill -9 + restart")
    t.eq(await send_stored(t, alice, "bob", "k9-1"), sid, "stanza-id of a resend after restart (dedupe)")
    s2 = await send_stored(t, alice, "bob", "k9-2")
    t.check(sid_seq(s2) > sid_seq(sid), "stanza-id after restart does not sort after the old one: %s %s",
            sid, s2)
    # burst: kill -9 while 40 messages are in flight; every <stored/> seen must survive
    ids = ["k9-burst-%03d" % i for i in range(150)]
    for mid in ids:
        alice.send_msg(bare("bob"), mid=mid)
    await alice.wait_stored(ids[0], timeout=10)
    t.stack.receiptd.kill9()
    await asyncio.sleep(0.3)
    acked = {find(m, NS_RD, "stored").get("id"): find(m, NS_RD, "stored").get("stanza-id")
             for m in alice.all_messages if find(m, NS_RD, "stored") is not None}
    acked = {k: v for k, v in acked.items() if k.startswith("k9-burst")}
    t.say("%d of %d burst messages acknowledged before kill -9", len(acked), len(ids))
    await t.sync(t.stack.receiptd.start)
    items = await bob.fetch_all()
    have = {forwarded_message(f).get("id"): s for s, f in items}
    missing = {k: v for k, v in acked.items() if have.get(k) != v}
    t.check(not missing, "acknowledged before kill -9 but missing after restart: %s", missing)
    # the client retries everything without <stored/>: all end up stored exactly once
    await t.announce(alice)
    for mid in ids:
        if mid not in acked:
            alice.send_msg(bare("bob"), mid=mid)
    for mid in ids:
        if mid not in acked:
            await alice.wait_stored(mid, timeout=10)
    items = await bob.fetch_all()
    got = sorted(forwarded_message(f).get("id") for _, f in items)
    t.eq(got, sorted(ids + ["k9-1", "k9-2"]), "bob's queue after retrying (each message exactly once)")


# What the XMPP server answers a client's message to the component while no component is connected.
# Both mean "receiptd is not attached: retry later with the same id" (proto/PROTOCOL.md).
SERVER_DOWN_CONDITION = {
    "prosody": "remote-server-timeout",
    "ejabberd": "forbidden",        # with s2s_access: none; type auth, "Access denied by service policy"
}


async def send_while_down(t, c, rcpt, mid, **kw):
    """Send to the relay while receiptd is not attached; return the server's error.

    A stanza sent in the instant after the component connection died, before the server noticed, is
    written to the dead connection and dropped without any answer (seen on both servers right after
    a kill -9: ejabberd in ~1 of 8 runs, Prosody more rarely). A client retries the same id after a
    timeout, so we do too."""
    tries = 3
    for i in range(tries):
        c.send_msg(bare(rcpt), mid=mid, **kw)
        try:
            m = await c.wait_stored_or_error(mid, timeout=2 if i < tries - 1 else 10)
        except AssertionError:
            if i == tries - 1:
                raise
            t.say("%s: no answer to %s within 2 s while receiptd is down (dropped by the server in the "
                  "instant after the disconnect?); retrying the same id", t.server, mid)
            continue
        t.check(m["type"] == "error", "no error while receiptd is down: %s", xml_str(m))
        return m


@scenario("down-retry")
async def down_retry(t):
    """receiptd stopped: the server's own error to the sender; the retry with the same id afterwards is stored once."""
    alice = await t.client("alice")
    await t.sync(t.stack.stop_receiptd_checked)
    t.say("receiptd stopped")
    m = await send_while_down(t, alice, "bob", "dr-1", body="sent while receiptd is down")
    et, ec, text = error_condition(m)
    t.say("while down (%s): type=%s condition=%s text=%r from=%s", t.server, et, ec, text, m["from"])
    # ejabberd and Prosody differ here: forbidden vs remote-server-timeout (both: retry later)
    t.eq(ec, SERVER_DOWN_CONDITION[t.server], "condition of the server's error while receiptd is down")
    kind, res = await alice.iq("get", "<summary xmlns='%s'/>" % NS_RD, timeout=10)
    t.eq(kind, "error", "summary IQ while receiptd is down (%s)" % xml_str(res))
    t.say("summary IQ while down: %s", error_condition(res))
    await t.sync(t.stack.receiptd.start)
    t.say("receiptd started again")
    # the client retries with the same id; a second retry (lost <stored/>) is deduplicated
    s1 = await send_stored(t, alice, "bob", "dr-1", body="sent while receiptd is down")
    s2 = await send_stored(t, alice, "bob", "dr-1", body="sent while receiptd is down")
    t.eq(s2, s1, "stanza-id of the second retry")
    bob = await t.client("bob", announce=False)
    await asyncio.sleep(1.0)
    t.check(not bob.all_messages, "bob got messages from the server at login:\n  %s",
            "\n  ".join(xml_str(x) for x in bob.all_messages))
    t.eq(int((await bob.summary()).get("count")), 1, "bob's summary count")
    items = await bob.fetch_all()
    t.eq([(s, forwarded_message(f).get("id")) for s, f in items], [(s1, "dr-1")], "bob's queue")


TWIN_DELIVERY = {"retry_interval": 0.5, "delivery_window": 2}


def parse_stats(log_text):
    """The counters of the 'receiptd: stored N, duplicates N, pushed N, ...' exit lines of a log,
    summed over all runs."""
    import re
    found = re.findall(r"receiptd: stored (\d+), duplicates (\d+), pushed (\d+), retransmitted (\d+), "
                       r"acked (\d+), receipts relayed (\d+)", log_text)
    if not found:
        return None
    return dict(zip(("stored", "duplicates", "pushed", "retransmitted", "acked", "relayed"),
                    (sum(int(f[i]) for f in found) for i in range(6))))


@scenario("twin", delivery=TWIN_DELIVERY, servers=("ejabberd",), receiptds=2)
async def twin(t):
    """Two receiptd with one ini on one ejabberd + Redis (stanzas split at random): nothing lost or doubled."""
    retry, window = TWIN_DELIVERY["retry_interval"], TWIN_DELIVERY["delivery_window"]
    one_instance_max = 1 + math.ceil(window / retry)   # first push + one per retry_interval in the window
    t.eq(len(t.stack.receiptds), 2, "receiptd instances")
    t.check(all(rd.alive() for rd in t.stack.receiptds), "a receiptd instance is not running")
    # (1) 25 offline messages, each sent twice at once (the copies may reach different instances)
    alice = await t.client("alice", announce=False)
    ids = ["tw-%02d" % i for i in range(25)]
    for mid in ids:
        alice.send_msg(bare("bob"), mid=mid, body="body of %s" % mid)
        alice.send_msg(bare("bob"), mid=mid, body="body of %s" % mid)
    sids = {}
    for mid in ids:
        got = set()
        for _ in range(2):
            m = await alice.wait_stored_or_error(mid, timeout=10)
            t.check(m["type"] != "error", "error for %s: %s", mid, xml_str(m))
            got.add(stored_sid(t, m, mid, bare("bob")))
        t.eq(len(got), 1, "distinct stanza-ids in the two <stored/> of %s (%s)" % (mid, sorted(got)))
        sids[mid] = got.pop()
    t.eq(len(set(sids.values())), 25, "distinct stanza-ids of 25 messages")
    bob = await t.client("bob", announce=False)
    s = await bob.summary()
    t.eq(int(s.get("count")), 25, "summary count")
    got, after = [], None
    for want_n, want_complete in ((10, "false"), (10, "false"), (5, "true")):
        b = await bob.fetch(10, after)
        fw = b.findall(q(NS_FORWARD, "forwarded"))
        t.eq(len(fw), want_n, "page size")
        t.eq(b.get("complete"), want_complete, "page complete")
        got += [(forwarded_message(f).get("id"), forwarded_sid(f)) for f in fw]
        after = b.get("last")
    # two connections do not keep the send order (each instance calls Redis on its own), so the
    # arrival order (= stanza-id order = fetch order) may differ from the send order here
    t.eq(sorted(got), sorted((mid, sids[mid]) for mid in ids), "(id, stanza-id) pairs fetched")
    t.eq([g[1] for g in got], sorted(sids.values(), key=sid_seq), "fetch order = stanza-id order")
    await bob.ack([sids[mid] for mid in ids])
    t.eq(await bob.count(), 0, "bob's count after ack")
    await asyncio.sleep(0.5)
    t.eq(await alice.count(), 25, "alice's queue (25 receipts, each once)")
    rids = sorted(forwarded_message(f).find(q(NS_RECEIPTS, "received")).get("id")
                  for _, f in await alice.fetch_all())
    t.eq(rids, ids, "receipt ids in alice's queue")
    t.say("offline flow ok: 25 stored once each, fetched 10/10/5, acked, 25 receipts queued")

    # (2) live delivery with receipts relayed: pushes per stanza-id never above what one instance does
    await t.announce(alice)
    await t.announce(bob)
    bob.auto_receipts = True
    bob.clear_inbox()
    live = ["tw-live-%d" % i for i in range(12)]
    t_stored, t_receipt, live_sids = {}, {}, {}
    for mid in live:
        t_stored[mid] = time.monotonic()
        live_sids[mid] = await send_stored(t, alice, "bob", mid)
        await alice.wait_receipt(mid)
        t_receipt[mid] = time.monotonic()
    await asyncio.sleep(3 * retry)
    pushes = {}
    for m in bob.all_messages:
        if is_push(m):
            pushes.setdefault(push_sid(m), []).append(m)
    for mid in live:
        n = len(pushes.get(live_sids[mid], []))
        allowed = 1 + int((t_receipt[mid] - t_stored[mid]) / retry)
        t.check(n >= 1, "live message %s never pushed", mid)
        t.check(n <= allowed, "%s pushed %d times although its receipt came back after %.2f s (retry %s s: "
                "one instance would push it at most %d times)", mid, n, t_receipt[mid] - t_stored[mid],
                retry, allowed)
    extra = await alice.collect(lambda m: find(m, NS_RECEIPTS, "received") is not None, 0)
    t.check(not extra, "receipts relayed more than once: %s", [xml_str(m) for m in extra])
    t.eq(await bob.count(), 0, "bob's queue after live delivery")
    t.say("live flow ok: %d messages pushed once each, receipts relayed once",
          len(live))

    # (3) retransmit then offline: carol never acks
    carol = await t.client("carol")
    rt = ["tw-rt-%d" % i for i in range(4)]
    rt_sids = {mid: await send_stored(t, alice, "carol", mid) for mid in rt}
    await asyncio.sleep(window + 2 * retry + 0.5)
    counts = {}
    for m in carol.all_messages:
        if is_push(m):
            counts[push_sid(m)] = counts.get(push_sid(m), 0) + 1
    t.say("pushes per message to carol (retry %s s, window %s s; one instance: at most %d): %s",
          retry, window, one_instance_max, {mid: counts.get(rt_sids[mid], 0) for mid in rt})
    for mid in rt:
        n = counts.get(rt_sids[mid], 0)
        t.check(n >= 2, "%s not retransmitted (%d pushes)", mid, n)
        t.check(n <= one_instance_max, "%s pushed %d times; one instance pushes at most %d", mid, n,
                one_instance_max)
    carol.clear_inbox()
    await asyncio.sleep(1.0)
    no_messages(t, carol, is_push, "carol after the delivery window")
    items = await carol.fetch_all()
    t.eq(sorted(s for s, _ in items), sorted(rt_sids.values()), "carol's queue (each message once)")
    await carol.ack(list(rt_sids.values()))
    for mid in rt:
        await alice.wait_receipt(mid)
    await asyncio.sleep(0.5)
    extra = await alice.collect(lambda m: find(m, NS_RECEIPTS, "received") is not None, 0)
    t.check(not extra, "receipts relayed more than once: %s", [xml_str(m) for m in extra])
    t.eq(await carol.count(), 0, "carol's queue after ack")

    # (4) one instance restarts while the other stays: everybody is unverified (new link epoch) and
    # pinged by the restarted one; bob's ping result reaches either instance at random and makes him
    # online again for both (nothing of the ping lives in memory)
    for round_ in range(3):
        pings = len(bob.pings)
        rd2 = t.stack.receiptds[1]
        await t.sync(t.stack.stop_receiptd_checked, rd2)
        await t.sync(rd2.start)
        loop = asyncio.get_event_loop()
        deadline = loop.time() + 5
        while len(bob.pings) <= pings and loop.time() < deadline:
            await asyncio.sleep(0.1)
        t.check(len(bob.pings) > pings, "bob not pinged after %s restarted (pings %s)", rd2.name, bob.pings)
        await asyncio.sleep(0.5)
        mid = "tw-after-restart-%d" % round_
        await send_stored(t, alice, "bob", mid)
        await bob.wait_push(mid, timeout=5)
        await alice.wait_receipt(mid)
    t.say("after 3 restarts of one instance bob was pinged and online again each time")

    # (5) unavailable reaches one instance: the pending push moves to the queue, neither pushes again
    bob.auto_receipts = False
    sid = await send_stored(t, alice, "bob", "tw-unavail")
    await bob.wait_push("tw-unavail")
    bob.announce("unavailable")
    t0 = time.monotonic()
    while time.monotonic() - t0 < window - retry and await bob.count() != 1:
        await asyncio.sleep(0.1)
    t.say("queued %.2f s after bob's unavailable (window %s s)", time.monotonic() - t0, window)
    t.eq(await bob.count(), 1, "bob's queue right after his unavailable (before the window ends)")
    bob.clear_inbox()
    await asyncio.sleep(2 * retry + 0.2)
    no_messages(t, bob, is_push, "push after bob's unavailable")
    t.eq([s_ for s_, _ in await bob.fetch_all()], [sid], "bob's queue")

    # both instances did part of the work (ejabberd really split the stanzas)
    stats = []
    for rd in t.stack.receiptds:
        await t.sync(t.stack.stop_receiptd_checked, rd)
        st = parse_stats(rd.log_text())
        t.check(st is not None, "%s logged no stats line at exit", rd.name)
        stats.append(st)
        t.say("%s: %s", rd.name, st)
    t.check(all(st["stored"] + st["duplicates"] > 0 for st in stats),
            "one instance handled no message at all (did ejabberd split the stanzas?): %s", stats)
    t.eq(sum(st["duplicates"] for st in stats), 25, "duplicates counted by both instances (25 sent twice)")


def redis_diag(redis):
    out = []
    for cmd in (("INFO", "errorstats"), ("INFO", "commandstats"), ("CLIENT", "LIST"), ("DBSIZE",)):
        try:
            out.append("> %s\n%s" % (" ".join(cmd), redis.command(*cmd).strip()))
        except Exception as e:
            out.append("> %s: %s" % (" ".join(cmd), e))
    return "\n".join(out)


@scenario("redis-at-start", timeout=90, extra={"redis": {"timeout": "3"}})
async def redis_at_start(t):
    """receiptd started while Redis is down does not attach until Redis is up (the server answers
    for it meanwhile, no wait errors); still down after [redis] timeout, it attaches anyway and
    senders get wait errors until Redis is back."""
    alice = await t.client("alice")
    rd = t.stack.receiptd
    await t.sync(t.stack.stop_receiptd_checked)
    await t.sync(t.stack.redis.stop)
    # 1. Redis comes up within the timeout: the link waits for it.
    await t.sync(rd._spawn)
    await asyncio.sleep(1.0)
    t.eq(rd.count_in_log("link: authenticated"), 0, "link attached while Redis was down (1 s in)")
    m = await send_while_down(t, alice, "bob", "ras-1")
    t.eq(error_condition(m)[1], SERVER_DOWN_CONDITION[t.server],
         "condition of the server's error while receiptd waits for Redis")
    await t.sync(t.stack.redis.start)
    await t.sync(rd.wait_ready)
    log = open(rd.log).read()
    t.check(log.find("store: connected") < log.find("link: authenticated"),
            "the link attached before the store connected")
    t.eq(rd.count_in_log("attaching to the server anyway"), 0, "gave up waiting for Redis")
    s1 = await send_stored(t, alice, "bob", "ras-1")
    t.say("Redis up 1 s after the start: attached after it, stored %s", s1)
    # 2. Redis stays down past [redis] timeout (3 s): the link attaches anyway.
    await t.sync(t.stack.stop_receiptd_checked)
    await t.sync(t.stack.redis.stop)
    await t.sync(rd._spawn)
    await t.sync(rd.wait_log, "attaching to the server anyway", 1, 10)
    await t.sync(rd.wait_log, "link: authenticated", 1, 10)
    alice.send_msg(bare("bob"), mid="ras-2", request=True)
    m = await alice.wait_stored_or_error("ras-2", timeout=15)
    et, ec, _ = error_condition(m) if m["type"] == "error" else (None, None, None)
    t.eq((et, ec), ("wait", "internal-server-error"), "answer while attached without Redis")
    await t.sync(t.stack.redis.start)
    await t.sync(rd.wait_log, "store: connected", 1, 15)
    s2 = await send_stored(t, alice, "bob", "ras-2")
    t.check(sid_seq(s2) > sid_seq(s1), "stanza-id after the restart does not sort after %s: %s",
            s1, s2)


@scenario("redis-restart", timeout=90)
async def redis_restart(t):
    """Redis down: sender gets wait errors; receiptd reconnects by itself; nothing acknowledged is missing."""
    alice = await t.client("alice")
    acked = {}
    for i in range(3):
        mid = "rr-%d" % i
        acked[mid] = await send_stored(t, alice, "bob", mid)
    connects = t.stack.receiptd.count_in_log("store: connected")
    await t.sync(t.stack.redis.stop)
    t.say("redis stopped")
    alice.send_msg(bare("bob"), mid="rr-down")
    m = await alice.wait_stored_or_error("rr-down", timeout=15)
    t.check(m["type"] == "error", "got <stored/> while Redis was down: %s", xml_str(m))
    et, ec, text = error_condition(m)
    t.say("while down: type=%s condition=%s text=%r", et, ec, text)
    t.eq(et, "wait", "error type while Redis is down")
    t.eq(ec, "internal-server-error", "error condition while Redis is down")
    await t.sync(t.stack.redis.start)
    t.say("redis started again")
    try:
        await t.sync(t.stack.receiptd.wait_log, "store: connected", connects + 1, 15)
    except HarnessError as e:
        raise AssertionError("receiptd did not reconnect to Redis within 15 s of its restart "
                             "(no new 'store: connected' line): %s" % str(e)[:300])
    t.say("receiptd reconnected to redis")
    # receiptd reconnects by itself; the client retries the same id until stored
    loop = asyncio.get_event_loop()
    deadline = loop.time() + 20
    while True:
        alice.send_msg(bare("bob"), mid="rr-down")
        m = await alice.wait_stored_or_error("rr-down", timeout=10)
        if m["type"] != "error":
            acked["rr-down"] = stored_sid(t, m, "rr-down", bare("bob"))
            break
        if loop.time() >= deadline:
            diag = await t.sync(redis_diag, t.stack.redis)
            raise AssertionError("still errors 20 s after Redis came back: %s\nRedis diagnostics:\n%s"
                                 % (xml_str(m), diag))
        await asyncio.sleep(0.5)
    t.say("stored again after reconnect: %s", acked["rr-down"])
    t.check(t.stack.receiptd.alive(), "receiptd died")
    for i in range(3, 5):
        mid = "rr-%d" % i
        acked[mid] = await send_stored(t, alice, "bob", mid)
    # SIGKILL Redis while a burst is in flight: with appendfsync always, every <stored/> survives
    ids = ["rr-burst-%03d" % i for i in range(150)]
    for mid in ids:
        alice.send_msg(bare("bob"), mid=mid)
    await alice.wait_stored(ids[0], timeout=10)
    connects = t.stack.receiptd.count_in_log("store: connected")
    t.stack.redis.kill9()
    t.say("redis killed (-9) during a burst")
    await asyncio.sleep(1.0)
    await t.sync(t.stack.redis.start)
    try:
        await t.sync(t.stack.receiptd.wait_log, "store: connected", connects + 1, 15)
    except HarnessError as e:
        raise AssertionError("receiptd did not reconnect to Redis within 15 s of its restart "
                             "(no new 'store: connected' line): %s" % str(e)[:300])
    await asyncio.sleep(0.3)
    for m in alice.all_messages:
        st = find(m, NS_RD, "stored")
        if st is not None and st.get("id", "").startswith("rr-burst"):
            acked[st.get("id")] = st.get("stanza-id")
    n_err = sum(1 for m in alice.all_messages if m["type"] == "error" and m["id"].startswith("rr-burst"))
    t.say("burst: %d stored, %d wait errors", len([k for k in acked if k.startswith("rr-burst")]), n_err)
    t.check(t.stack.receiptd.alive(), "receiptd died")
    # everything without <stored/> is retried (in rounds) until stored
    deadline = loop.time() + 30
    while True:
        todo = [mid for mid in ids if mid not in acked]
        if not todo:
            break
        if loop.time() > deadline:
            diag = await t.sync(redis_diag, t.stack.redis)
            raise AssertionError("%d burst messages still not stored 30 s after the Redis restart, e.g. %s"
                                 "\nRedis diagnostics:\n%s" % (len(todo), todo[:3], diag))
        for mid in todo:
            alice.send_msg(bare("bob"), mid=mid)
        for mid in todo:
            m = await alice.wait_stored_or_error(mid, timeout=10)
            if m["type"] != "error":
                acked[mid] = stored_sid(t, m, mid, bare("bob"))
        await asyncio.sleep(0.5)
    bob = await t.client("bob", announce=False)
    items = await bob.fetch_all()
    have = {forwarded_message(f).get("id"): s for s, f in items}
    missing = {k: v for k, v in acked.items() if have.get(k) != v}
    t.check(not missing, "acknowledged messages missing after the Redis restarts: %s (queue has %s)",
            missing, have)
    t.eq(len(items), len(acked), "bob's queue size (each message exactly once)")


@scenario("server-restart", delivery={"retry_interval": 0.5, "delivery_window": 2}, timeout=90)
async def server_restart(t):
    """XMPP server restart: receiptd reconnects; clients reconnect and re-announce; nothing acknowledged is lost."""
    alice = await t.client("alice")
    bob = await t.client("bob", auto_receipts=True)
    acked = {}
    acked["pr-0"] = await send_stored(t, alice, "bob", "pr-0")
    await bob.wait_push("pr-0")
    await alice.wait_receipt("pr-0")
    # a message that bob will not ack before the restart
    bob.auto_receipts = False
    acked["pr-1"] = await send_stored(t, alice, "bob", "pr-1")
    await bob.wait_push("pr-1")
    before_restart = len(bob.all_messages)
    links = t.stack.receiptd.count_in_log("link: authenticated")
    await t.sync(t.stack.server.restart)
    t.say("%s restarted", t.server)
    await t.sync(t.stack.receiptd.wait_log, "link: authenticated", links + 1, 20)
    t.say("receiptd re-authenticated")
    await alice.reconnect_until()
    await t.announce(alice)
    acked["pr-2"] = await send_stored(t, alice, "bob", "pr-2")   # bob not back yet
    bob.auto_receipts = True
    await bob.reconnect_until()
    await t.announce(bob)
    acked["pr-3"] = await send_stored(t, alice, "bob", "pr-3")
    m = await bob.wait_push("pr-3", timeout=5)
    await alice.wait_receipt("pr-3")
    await asyncio.sleep(2.5)    # let windows expire for anything pushed to the old sessions
    pushed = {m["id"] for m in bob.all_messages if is_push(m)}
    items = await bob.fetch_all()
    queued = {forwarded_message(f).get("id") for _, f in items}
    t.say("pushed to bob: %s; queued for bob: %s", sorted(pushed), sorted(queued))
    missing = [mid for mid in acked if mid not in pushed and mid not in queued]
    t.check(not missing, "acknowledged messages neither pushed nor queued: %s", missing)
    repushed = {m["id"] for m in bob.all_messages[before_restart:] if is_push(m)}
    t.check("pr-1" in queued or "pr-1" in repushed,
            "pr-1 (pushed before the restart, never acked) neither queued nor pushed again")


# ---- the SQLite archive (tiny archive_after, so messages age within the test) ----------------------

ARCHIVE_FAST = {"sqlite": {"archive_after": "1"}}


def archive_path(t):
    return os.path.join(t.stack.receiptd.workdir, "receiptd.sqlite3")


def archived_sids(t, user):
    with sqlite3.connect(archive_path(t), timeout=10) as db:
        return [r[0] for r in db.execute("SELECT sid FROM messages WHERE user = ? ORDER BY seq",
                                         (bare(user),))]


def redis_sids(t, user):
    """The user's stanza-ids in Redis (a flat RESP array of bulk strings)."""
    if getattr(t.stack, "redis_mode", "single") == "cluster":
        key = "rd:{%s}:q" % bare(user)
        return t.stack.redis.key_command(key, "ZRANGE", key, "0", "-1")
    raw = t.stack.redis.command("ZRANGE", "rd:{%s}:q" % bare(user), "0", "-1")
    lines = raw.split("\r\n")
    if not lines[0].startswith("*"):
        raise AssertionError("unexpected Redis reply %r" % raw)
    return lines[2:2 + 2 * int(lines[0][1:]):2]


async def wait_archived(t, user, n, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        a = await t.sync(archived_sids, t, user)
        r = await t.sync(redis_sids, t, user)
        if len(a) == n and not r:
            return a
        await asyncio.sleep(0.2)
    raise AssertionError("after %ss: %d archived, %d still in Redis (want %d archived, 0 in Redis)"
                         % (timeout, len(a), len(r), n))


@scenario("archive", extra=ARCHIVE_FAST)
async def archive(t):
    """Messages older than archive_after move to SQLite; summary, fetch and ack span both tiers."""
    alice = await t.client("alice")
    old = ["arc-%02d" % i for i in range(20)]
    sids = [await send_stored(t, alice, "bob", mid) for mid in old]
    archived = await wait_archived(t, "bob", 20)
    t.eq(archived, sids, "archived stanza-ids, in arrival order")
    t.say("20 messages archived to SQLite, none left in Redis")
    new = ["arc-new-%d" % i for i in range(5)]
    sids += [await send_stored(t, alice, "bob", mid) for mid in new]
    bob = await t.client("bob", announce=False)
    s = await bob.summary(ids=True)
    t.eq(int(s.get("count")), 25, "summary count across SQLite and Redis")
    t.eq([i.get("id") for i in s.findall(q(NS_RD, "item"))], sids, "summary ids across both tiers")
    t.check(parse_stamp(s.get("oldest"), "oldest") <= parse_stamp(s.get("newest"), "newest"),
            "oldest after newest: %s", xml_str(s))
    items = await bob.fetch_all(page=7)
    t.eq([sid for sid, _ in items], sids, "fetch across both tiers, oldest first, pages of 7")
    t.eq([forwarded_message(f).get("id") for _, f in items], old + new, "message ids of the fetch")
    # ack some archived and some hot ones: receipts come from both tiers, once each
    acked = sids[:10] + sids[20:23]
    await bob.ack(acked)
    for mid in old[:10] + new[:3]:
        await alice.wait_receipt(mid)
    t.eq(await bob.count(), 12, "bob's count after acking 13 of 25")
    await bob.ack(acked)
    dup = await alice.collect(lambda m: find(m, NS_RECEIPTS, "received") is not None, 0.7)
    t.check(not dup, "receipts relayed twice: %s", [xml_str(m) for m in dup])
    left = await bob.fetch_all()
    t.eq([sid for sid, _ in left], sids[10:20] + sids[23:], "what is left after the acks")
    # the hot ones age too; the archive keeps the order
    await wait_archived(t, "bob", 12)
    t.eq([sid for sid, _ in await bob.fetch_all(page=5)], sids[10:20] + sids[23:],
         "fetch after everything was archived")
    # receiptd --stats reports both tiers
    out = await t.sync(lambda: subprocess.run(t.stack.receiptd.argv() + ["--stats"],
                                              capture_output=True, text=True, timeout=20))
    t.say("--stats:\n%s", out.stdout.rstrip())
    t.eq(out.returncode, 0, "--stats exit status (stderr %r)" % out.stderr)
    rows = {l.split()[0]: l.split()[1:] for l in out.stdout.splitlines()[1:]}
    t.eq(rows.get("sqlite", [None, None])[1], "12", "--stats: messages in SQLite")
    t.check("redis" in rows, "--stats without a redis line: %s", out.stdout)


@scenario("archive-kill9", extra=ARCHIVE_FAST, timeout=90)
async def archive_kill9(t):
    """kill -9 between archive insert and Redis delete, and before the insert: nothing lost or doubled."""
    alice = await t.client("alice")
    mids = ["ak-%03d" % i for i in range(60)]
    sids = [await send_stored(t, alice, "bob", mid) for mid in mids[:30]]
    # 1) hold SQLite's write lock: the archiver takes from Redis, then waits for the lock
    db = sqlite3.connect(archive_path(t), timeout=10, isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    await asyncio.sleep(2.0)
    # 2) pause Redis writes, release the lock: the insert commits, the delete from Redis waits
    #    in Redis, and is discarded when its client dies
    await t.sync(t.stack.redis.command, "CLIENT", "PAUSE", "20000", "WRITE")
    try:
        db.execute("COMMIT")
        db.close()
        await asyncio.sleep(1.0)
        both = await t.sync(archived_sids, t, "bob")
        t.check(both and both == sids[:len(both)],
                "the archiver's first batch (the oldest messages) is not in SQLite: %s", both)
        await t.sync(t.stack.receiptd.kill9)
        await asyncio.sleep(0.3)
    finally:
        await t.sync(t.stack.redis.command, "CLIENT", "UNPAUSE")
    t.eq(await t.sync(redis_sids, t, "bob"), sids, "all still in Redis after the kill")
    t.say("kill -9 with %d messages in both tiers", len(both))
    # 3) a kill before the insert: messages taken but the archive locked
    await t.sync(t.stack.receiptd.start)
    await t.announce(alice)
    sids += [await send_stored(t, alice, "bob", mid) for mid in mids[30:]]
    db = sqlite3.connect(archive_path(t), timeout=10, isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    await asyncio.sleep(2.0)
    await t.sync(t.stack.receiptd.kill9)
    db.execute("COMMIT")
    db.close()
    t.say("kill -9 while the archiver waited for SQLite")
    # a bob that reads now sees each message once, although some are in both tiers
    await t.sync(t.stack.receiptd.start)
    bob = await t.client("bob", announce=False)
    items = await bob.fetch_all(page=16)
    t.eq([sid for sid, _ in items], sids, "fetch while messages are in both tiers or moving")
    archived = await wait_archived(t, "bob", 60)
    t.eq(archived, sids, "archive after restart: every message once, in order")
    t.eq(await bob.count(), 60, "bob's count")
    items = await bob.fetch_all(page=16)
    t.eq([forwarded_message(f).get("id") for _, f in items], mids, "message ids, once each")


def redis_keys(t, pattern):
    if getattr(t.stack, "redis_mode", "single") == "cluster":
        return t.stack.redis.keys(pattern)      # SCAN on every master
    raw = t.stack.redis.command("KEYS", pattern)
    lines = raw.split("\r\n")
    return lines[2:2 + 2 * int(lines[0][1:]):2]


# The origins of a dedupe window (storage/SCHEMA.md): an evicted user's keys that stay, with a TTL.
DEDUPE_KEY = re.compile(r":o:-?\d+$")


def evicted_users(t):
    with sqlite3.connect(archive_path(t), timeout=10) as db:
        return [r[0] for r in db.execute("SELECT user FROM evicted")]


@scenario("evict", extra={"sqlite": {"archive_after": "1000", "evict_after": "2"}}, timeout=90)
async def evict(t):
    """An inactive user's Redis state moves to SQLite; messages meanwhile go there; login brings it back."""
    alice = await t.client("alice")
    bob = await t.client("bob", resource="phone", auto_receipts=True)
    await send_stored(t, alice, "bob", "ev-0")
    await alice.wait_receipt("ev-0")
    await bob.stop()
    sids = [await send_stored(t, alice, "bob", "ev-%d" % i) for i in (1, 2, 3)]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        left = [k for k in await t.sync(redis_keys, t, "rd:{%s}:*" % bare("bob"))
                if not DEDUPE_KEY.search(k)]
        if not left and bare("bob") in await t.sync(evicted_users, t):
            break
        await asyncio.sleep(0.3)
    t.check(not left, "bob's state still in Redis: %s", left)
    t.eq(await t.sync(archived_sids, t, "bob"), sids, "bob's messages in the archive")
    t.say("bob evicted: no Redis keys left but the origins of dedupe windows, 3 messages in SQLite")
    if getattr(t.stack, "redis_mode", "single") != "cluster":
        for k in await t.sync(redis_keys, t, "rd:{%s}:*" % bare("bob")):
            ttl = int((await t.sync(t.stack.redis.command, "PTTL", k)).strip(":\r\n"))
            t.check(ttl > 0, "%s kept without a TTL after the eviction (PTTL %d)", k, ttl)
    # a message while evicted goes straight to the archive: acknowledged, and Redis stays empty
    sids.append(await send_stored(t, alice, "bob", "ev-4"))
    left = [k for k in await t.sync(redis_keys, t, "rd:{%s}:*" % bare("bob"))
            if not DEDUPE_KEY.search(k)]
    t.check(not left, "a message for an evicted user recreated Redis state: %s", left)
    t.eq(await t.sync(archived_sids, t, "bob"), sids, "archive after a message to the evicted bob")
    # the same message again (a client retry): one copy
    alice.send_msg(bare("bob"), mid="ev-4", request=True)
    dup = await alice.wait_stored("ev-4")
    t.eq(find(dup, NS_RD, "stored").get("stanza-id"), sids[-1], "stanza-id of the retried message")
    t.eq(len(await t.sync(archived_sids, t, "bob")), 4, "archived messages after the retry")
    # bob is back: his first IQ restores his state; numbering continues after the archived ones
    bob2 = await t.client("bob", resource="phone", announce=False)
    t.eq(await bob2.count(), 4, "bob's count after coming back")
    t.check(bare("bob") not in await t.sync(evicted_users, t), "bob still listed as evicted")
    sids.append(await send_stored(t, alice, "bob", "ev-5"))
    t.check(sid_seq(sids[-1]) > sid_seq(sids[-2]), "new stanza-id %s does not follow %s",
            sids[-1], sids[-2])
    items = await bob2.fetch_all(page=2)
    t.eq([s for s, _ in items], sids, "bob's fetch across the archive and Redis")
    await bob2.ack(sids)
    for i in range(1, 6):
        await alice.wait_receipt("ev-%d" % i)
    t.eq(await bob2.count(), 0, "bob's count after acking all")


# Scenarios that also run against a Redis Cluster (3 masters + 3 replicas; run.py --redis cluster,
# meson: e2e-cluster-prosody-NAME, Prosody only): the ones whose outcome depends on the store, i.e.
# relay and receipts, per-device delivery, retransmission, the offline queue, summary / fetch /
# ack, dedupe, quotas, presence and its re-verification after a restart, kill -9, and the archive
# and eviction sweeps over the sharded indexes. Left out: the ones that never reach Redis (cli,
# addressing, errors, ping-disco), restarts of the single Redis process (redis-restart; the cluster
# has its own fault tests in tests/faults: cluster-reshard, cluster-failover), CLIENT PAUSE on that
# one process (archive-kill9), ejabberd-only (twin), and a few that repeat a covered store path
# (quota-bytes, down-retry, server-restart) to keep the suite short.
CLUSTER_SCENARIOS = (
    "stored", "dedupe", "live", "devices", "retransmit", "unavailable-requeue", "offline-login",
    "norequest", "paging", "readahead", "summary-ids", "foreign-ack", "ack-relay", "quota", "subscription",
    "restart-ping", "kill9", "archive", "evict",
)
assert all(n in SCENARIOS for n in CLUSTER_SCENARIOS), "unknown name in CLUSTER_SCENARIOS"
