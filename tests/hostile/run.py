#!/usr/bin/python3
"""Hostile input from a fake XMPP server.

Plays the XEP-0114 server on loopback (checks receiptd's handshake digest), then sends what a
real server would not: oversize and deeply nested stanzas, malformed addressing and payloads,
floods from foreign domains, invalid UTF-8, a DTD, a stream error, a socket closed mid-stanza,
and it stops reading while receiptd answers more than the socket buffers hold.
Each case checks receiptd's answer (the RFC 6120 condition) or that it dropped the stream and
attached again, and that it still answers a ping afterwards. At the end receiptd must exit 0 on
SIGTERM (under ASan that includes no leaks). Needs redis-server; no XMPP server.

Usage: run.py [--receiptd PATH] (default $RECEIPTD, then build/component/receiptd)
"""
import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "e2e"))
import ports  # noqa: E402  (tests/e2e/ports.py: port reservations shared by every suite)

C = "receipts.localhost"
SECRET = "hostile-secret"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_CA = "jabber:component:accept"
ALICE = "alice@localhost/phone"


def free_port():
    return ports.reserve()


class Link:
    """One accepted connection from receiptd, after a successful handshake."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.parser = ET.XMLPullParser(events=("start", "end"))
        self.depth = 0
        self.stanzas = asyncio.Queue()
        self.closed = asyncio.Event()
        self.reading = asyncio.Event()  # cleared: the server stops reading (a slow server)
        self.reading.set()
        self.stream_id = "hostile-%d" % time.monotonic_ns()

    async def pump(self):
        try:
            while True:
                await self.reading.wait()
                data = await self.reader.read(65536)
                if not data:
                    break
                self.parser.feed(data)
                for ev, el in self.parser.read_events():
                    if ev == "start":
                        self.depth += 1
                    else:
                        self.depth -= 1
                        if self.depth == 1:
                            self.stanzas.put_nowait(el)
        except (ConnectionError, ET.ParseError):
            pass
        self.closed.set()

    def send(self, data):
        self.writer.write(data if isinstance(data, bytes) else data.encode())

    async def expect(self, pred, what, timeout=5):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out waiting for " + what)
            try:
                el = await asyncio.wait_for(self.stanzas.get(), left)
            except asyncio.TimeoutError:
                raise AssertionError("timed out waiting for " + what)
            if pred(el):
                return el

    async def nothing_for(self, seconds, pred=lambda el: True):
        try:
            el = await self.expect(pred, "", seconds)
        except AssertionError:
            return
        raise AssertionError("unexpected stanza: " + ET.tostring(el).decode()[:300])


def condition(el):
    err = el.find("{%s}error" % NS_CA)
    if err is None:
        return None, None
    for child in err:
        if child.tag.startswith("{%s}" % NS_STANZAS) and not child.tag.endswith("}text"):
            return err.get("type"), child.tag.split("}")[1]
    return err.get("type"), None


class FakeServer:
    def __init__(self):
        self.port = free_port()
        self.links = asyncio.Queue()
        self.handshakes = 0
        self.after_handshake = b""  # sent in the same write as <handshake/> (once)

    async def start(self):
        self.server = await asyncio.start_server(self.accept, "127.0.0.1", self.port)

    async def accept(self, reader, writer):
        link = Link(reader, writer)
        # Stream header from receiptd, then ours with an id, then the handshake.
        head = b""
        while b">" not in head.split(b"?>")[-1]:
            chunk = await reader.read(4096)
            if not chunk:
                return
            head += chunk
        assert b"jabber:component:accept" in head and C.encode() in head, head
        writer.write(("<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' "
                      "xmlns:stream='http://etherx.jabber.org/streams' id='%s' from='%s'>"
                      % (link.stream_id, C)).encode())
        want = hashlib.sha1((link.stream_id + SECRET).encode()).hexdigest()
        buf = b""
        while b"</handshake>" not in buf:
            chunk = await reader.read(4096)
            if not chunk:
                return
            buf += chunk
        got = buf.split(b"<handshake>")[1].split(b"</handshake>")[0].decode()
        if got != want:
            writer.write(b"<stream:error><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
                         b"</stream:error></stream:stream>")
            writer.close()
            return
        self.handshakes += 1
        # Our parser must see a stream root before the stanzas.
        link.parser.feed(b"<stream:stream xmlns='jabber:component:accept' "
                         b"xmlns:stream='http://etherx.jabber.org/streams'>")
        list(link.parser.read_events())
        link.depth = 1
        writer.write(b"<handshake/>" + self.after_handshake)
        self.after_handshake = b""
        asyncio.ensure_future(link.pump())
        self.links.put_nowait(link)

    async def next_link(self, timeout=10):
        return await asyncio.wait_for(self.links.get(), timeout)


async def ping_ok(link, n=[0]):
    n[0] += 1
    pid = "ping%d" % n[0]
    link.send("<iq type='get' id='%s' from='%s' to='%s'><ping xmlns='urn:xmpp:ping'/></iq>"
              % (pid, ALICE, C))
    await link.expect(lambda el: el.get("id") == pid and el.get("type") == "result", "ping result")


async def expect_error(link, sid, want_cond, want_type=None):
    el = await link.expect(lambda el: el.get("id") == sid, "reply to " + sid)
    typ, cond = condition(el)
    assert el.get("type") == "error", "%s: expected an error, got %s" % (sid, ET.tostring(el)[:300])
    assert cond == want_cond, "%s: expected %s, got %s" % (sid, want_cond, cond)
    if want_type:
        assert typ == want_type, "%s: expected type %s, got %s" % (sid, want_type, typ)
    return el


def msg(sid, to, body="x", frm=ALICE, extra=""):
    return ("<message id='%s' from='%s' to='%s'><body>%s</body>%s</message>"
            % (sid, frm, to, body, extra))


def iq(sid, payload, typ="get", frm=ALICE, to=C):
    return "<iq type='%s' id='%s' from='%s' to='%s'>%s</iq>" % (typ, sid, frm, to, payload)


async def cases(server, proc):
    results = []

    async def case(name, fn):
        t0 = time.monotonic()
        try:
            await fn()
            results.append((name, None))
            print("PASS %s (%.1fs)" % (name, time.monotonic() - t0), flush=True)
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            results.append((name, e))
            print("FAIL %s: %s" % (name, e), flush=True)
        assert proc.poll() is None, "receiptd exited (code %s) during %s" % (proc.returncode, name)

    link = await server.next_link()
    # Redis too, or the first cases would meet wait errors.
    for _ in range(200):
        with open(proc.log_path) as f:
            if "store: connected" in f.read():
                break
        await asyncio.sleep(0.05)
    await ping_ok(link)
    state = {"link": link}

    async def oversize():
        l = state["link"]
        l.send(msg("big", "bob\\40localhost@" + C, "y" * 200000))
        await expect_error(l, "big", "policy-violation", "modify")
        await ping_ok(l)

    async def deep():
        l = state["link"]
        l.send("<message id='deep' from='%s' to='bob\\40localhost@%s'>" % (ALICE, C) + "<a>" * 500
               + "</a>" * 500 + "</message>")
        await expect_error(l, "deep", "policy-violation")
        await ping_ok(l)

    async def addressing():
        l = state["link"]
        for sid, to, cond in [
            ("space", "bob\\20x\\40localhost@" + C, "jid-malformed"),
            ("twoat", "bob\\40x\\40localhost@" + C, "jid-malformed"),
            ("nonode", "\\40localhost@" + C, "jid-malformed"),
            ("nodom", "bob\\40@" + C, "jid-malformed"),
            ("noat", "bob@" + C, "jid-malformed"),
            ("foreign-to", "bob\\40evil.example@" + C, "item-not-found"),
            ("to-c", C, "service-unavailable"),
        ]:
            l.send(msg(sid, to))
            await expect_error(l, sid, cond)
        # \5c unescapes to a backslash, which a localpart may hold: relayed, not rejected.
        l.send(msg("esc5c", "bob\\5c\\40localhost@" + C, extra="<request xmlns='urn:xmpp:receipts'/>"))
        el = await l.expect(lambda el: el.get("type") == "headline" or el.get("id") == "esc5c",
                            "<stored/> for a \\5c node")
        assert el.get("type") == "headline" and el.get("from") == "bob\\5c\\40localhost@" + C, \
            ET.tostring(el)
        l.send(msg("foreign-from", "bob\\40localhost@" + C, frm="mallory@evil.example/x"))
        await expect_error(l, "foreign-from", "forbidden", "auth")
        l.send(msg("noid-req", "bob\\40localhost@" + C, extra="<request xmlns='urn:xmpp:receipts'/>")
               .replace("id='noid-req' ", ""))
        # Without an id the error cannot be matched by id: match on the condition.
        el = await l.expect(lambda el: el.get("type") == "error", "bad-request for a request without id")
        assert condition(el)[1] == "bad-request", ET.tostring(el)

    async def payloads():
        l = state["link"]
        items = "".join("<item id='%d-ab'/>" % i for i in range(1, 5001))
        l.send(iq("ack5000", "<ack xmlns='urn:receiptd:0'>%s</ack>" % items, "set"))
        await expect_error(l, "ack5000", "policy-violation")
        l.send(iq("ackempty", "<ack xmlns='urn:receiptd:0'/>", "set"))
        await expect_error(l, "ackempty", "bad-request")
        l.send(iq("ackgarbage", "<ack xmlns='urn:receiptd:0'><x/></ack>", "set"))
        await expect_error(l, "ackgarbage", "bad-request")
        l.send(iq("maxneg", "<fetch xmlns='urn:receiptd:0' max='-1'/>"))
        await expect_error(l, "maxneg", "bad-request")
        l.send(iq("maxhuge", "<fetch xmlns='urn:receiptd:0' max='99999999'/>"))
        el = await l.expect(lambda el: el.get("id") == "maxhuge", "fetch result")
        assert el.get("type") == "result", ET.tostring(el)
        l.send(iq("afterbad", "<fetch xmlns='urn:receiptd:0' after='nope'/>"))
        await expect_error(l, "afterbad", "item-not-found")
        l.send(iq("unknown", "<frobnicate xmlns='urn:example'/>"))
        await expect_error(l, "unknown", "service-unavailable")
        l.send(iq("settype", "<summary xmlns='urn:receiptd:0'/>", "set"))
        await expect_error(l, "settype", "bad-request")
        l.send(iq("nopayload", ""))
        await expect_error(l, "nopayload", "bad-request")
        l.send(iq("foreign-q", "<summary xmlns='urn:receiptd:0'/>", frm="mallory@evil.example/x"))
        await expect_error(l, "foreign-q", "forbidden")
        # Results and errors addressed to us get no answer (RFC 6120 8.3.1).
        l.send(iq("res", "", "result"))
        l.send("<iq type='error' id='err' from='%s' to='%s'><error type='cancel'>"
               "<item-not-found xmlns='%s'/></error></iq>" % (ALICE, C, NS_STANZAS))
        l.send("<message type='error' id='merr' from='%s' to='bob\\40localhost@%s'/>" % (ALICE, C))
        await l.nothing_for(0.5, lambda el: el.get("id") in ("res", "err", "merr"))
        await ping_ok(l)

    async def floods():
        l = state["link"]
        for i in range(2000):
            l.send("<presence type='subscribe' from='spam%d@evil.example' to='%s'/>" % (i, C))
            l.send("<presence from='spam%d@evil.example/r' to='%s'/>" % (i, C))
        await l.nothing_for(1.0, lambda el: el.tag.endswith("presence"))
        await ping_ok(l)

    async def slow_reader():
        # The server stops reading while receiptd answers a burst of pings with long ids: ~11 MB,
        # more than the socket buffers hold, so receiptd's writes stop part way and queue. Once
        # the server reads again every answer must arrive, whole and in order.
        l = state["link"]
        l.reading.clear()
        ids = ["slow%05d-%s" % (i, "x" * 800) for i in range(12000)]
        l.send("".join(iq(i, "<ping xmlns='urn:xmpp:ping'/>") for i in ids))
        await asyncio.sleep(3.0)
        l.reading.set()
        for n, want in enumerate(ids):
            el = await l.expect(lambda el: True, "answer %d of %d" % (n + 1, len(ids)), 30)
            assert el.get("id") == want and el.get("type") == "result", (
                "answer %d: expected the result of %s, got %s" % (n + 1, want[:10],
                                                                   ET.tostring(el)[:200]))
        await ping_ok(l)

    async def entities():
        l = state["link"]
        # Internal entities are legal XML but not XMPP; an undefined one is an XML error.
        l.send("<message id='ent' from='%s' to='bob\\40localhost@%s'><body>&lol;</body></message>"
               % (ALICE, C))
        await asyncio.wait_for(l.closed.wait(), 5)
        state["link"] = await server.next_link()
        await ping_ok(state["link"])

    async def bad_utf8():
        l = state["link"]
        l.send(b"<message id='utf' from='" + ALICE.encode() + b"' to='" + C.encode()
               + b"'><body>\xff\xfe\xc3</body></message>")
        await asyncio.wait_for(l.closed.wait(), 5)
        state["link"] = await server.next_link()
        await ping_ok(state["link"])

    async def stream_error():
        l = state["link"]
        l.send("<stream:error><system-shutdown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
               "</stream:error></stream:stream>")
        await asyncio.wait_for(l.closed.wait(), 5)
        state["link"] = await server.next_link()
        await ping_ok(state["link"])

    async def early_presence():
        # Presence that reaches receiptd with the handshake's answer, before the link epoch is
        # known (component/presence.c, EARLY_MAX): it must still count once the epoch is there.
        dave = "dave@localhost/phone"
        server.after_handshake = ("<presence from='%s' to='%s'/>" % (dave, C)).encode()
        l = state["link"]
        l.send("<stream:error><system-shutdown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
               "</stream:error></stream:stream>")
        await asyncio.wait_for(l.closed.wait(), 5)
        state["link"] = l = await server.next_link()
        await ping_ok(l)
        # Messages stored before the epoch is known find nobody online; once it is, dave must be.
        for i in range(30):
            l.send(msg("early%d" % i, "dave\\40localhost@" + C,
                       extra="<request xmlns='urn:xmpp:receipts'/>"))
            try:
                await l.expect(lambda el: el.get("to") == dave, "", timeout=0.2)
                return
            except AssertionError:
                pass
        raise AssertionError("%s announced itself before the epoch and never got a push" % dave)

    async def cut_mid_stanza():
        l = state["link"]
        l.send("<message id='cut' from='%s' to='bob\\40localhost@%s'><bo" % (ALICE, C))
        await asyncio.sleep(0.1)
        l.writer.transport.abort()
        state["link"] = await server.next_link()
        await ping_ok(state["link"])

    for name, fn in [("oversize", oversize), ("deep-nesting", deep), ("addressing", addressing),
                     ("payloads", payloads), ("foreign-floods", floods),
                     ("slow-reader", slow_reader),
                     ("undefined-entity", entities), ("invalid-utf8", bad_utf8),
                     ("stream-error", stream_error), ("early-presence", early_presence),
                     ("cut-mid-stanza", cut_mid_stanza)]:
        await case(name, fn)
    return results


async def main():
    args = sys.argv[1:]
    binary = os.environ.get("RECEIPTD", "build/component/receiptd")
    if "--receiptd" in args:
        binary = args[args.index("--receiptd") + 1]
    tmp = tempfile.mkdtemp(prefix="receiptd-hostile-")
    rport = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1",
                              "--dir", tmp, "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = FakeServer()
    await server.start()
    ini = os.path.join(tmp, "receiptd.ini")
    with open(ini, "w") as f:
        f.write("[component]\njid = %s\nsecret = %s\nserver_host = 127.0.0.1\nserver_port = %d\n"
                "user_domains = localhost\n[redis]\nport = %d\n[delivery]\nmax_stanza_bytes = 65536\n"
                % (C, SECRET, server.port, rport))
    log = open(os.path.join(tmp, "receiptd.log"), "w+")
    proc = subprocess.Popen([binary, "-c", ini], stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log.name
    results = []
    try:
        results = await asyncio.wait_for(cases(server, proc), 120)
    except Exception as e:  # noqa: BLE001
        results.append(("harness", e))
        print("FAIL harness: %r" % e)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        redis.terminate()
        redis.wait()
    failed = [n for n, e in results if e]
    if proc.returncode != 0:
        failed.append("exit code %s on SIGTERM" % proc.returncode)
    log.seek(0)
    text = log.read()
    if SECRET in text:
        failed.append("the secret appears in the log")
    if failed:
        print("receiptd log (last 60 lines):")
        print("\n".join(text.splitlines()[-60:]))
        print("FAILED: " + ", ".join(failed))
    shutil.rmtree(tmp, ignore_errors=True)
    print("%d passed, %d failed" % (len(results) - len([1 for _, e in results if e]), len(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
