"""slixmpp client wrapper for receiptd end-to-end tests.

Run with /usr/bin/python3 (the interpreter that has slixmpp 1.8.3).

Notes on slixmpp 1.8.3 that matter here:
  * JIDs with a XEP-0106 escape in the node (bob\\40localhost@receipts.localhost) are kept verbatim
    (nodeprep leaves the backslash alone), so they can be used as 'to' directly.
  * It does not know the RFC 6120 condition 'policy-violation' (reads it as feature-not-implemented),
    so error conditions are always read from the XML here (error_condition()).
  * No automatic receipts: the xep_0184 plugin is not loaded; Client(auto_receipts=True) makes the
    client answer every pushed <request/> itself.
"""

import asyncio
import logging
import re
import xml.etree.ElementTree as ET

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

NS_CLIENT = "jabber:client"
NS_RECEIPTS = "urn:xmpp:receipts"
NS_RD = "urn:receiptd:0"
NS_SID = "urn:xmpp:sid:0"
NS_FORWARD = "urn:xmpp:forward:0"
NS_DELAY = "urn:xmpp:delay"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_PING = "urn:xmpp:ping"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"

COMPONENT = "receipts.localhost"

log = logging.getLogger("xclient")


def q(ns, tag):
    return "{%s}%s" % (ns, tag)


def escape_node(bare):
    """XEP-0106 escaping of a bare JID to be used as a node (only what our tests need)."""
    out = []
    for ch in bare:
        if ch == "\\":
            out.append("\\5c")
        elif ch == "@":
            out.append("\\40")
        elif ch == " ":
            out.append("\\20")
        elif ch in "\"&'/:<>":
            out.append("\\%02x" % ord(ch))
        else:
            out.append(ch)
    return "".join(out)


def relay_jid(bare, component=COMPONENT):
    """bob@localhost -> bob\\40localhost@receipts.localhost"""
    return "%s@%s" % (escape_node(bare), component)


def xml_str(el):
    if el is None:
        return "<none>"
    if hasattr(el, "xml"):
        el = el.xml
    try:
        return ET.tostring(el, encoding="unicode")
    except Exception:
        return repr(el)


def raw(el):
    """ElementTree element of a slixmpp stanza (or the element itself)."""
    return el.xml if hasattr(el, "xml") else el


def error_condition(stanza):
    """(type, condition, text) of a stanza's <error/>, read from the XML; None if no error child."""
    el = raw(stanza)
    err = None
    for child in el:
        if child.tag.endswith("}error") or child.tag == "error":
            err = child
            break
    if err is None:
        return None
    cond, text = None, None
    for child in err:
        if child.tag == q(NS_STANZAS, "text"):
            text = child.text
        elif child.tag.startswith("{%s}" % NS_STANZAS):
            cond = child.tag.split("}", 1)[1]
    return (err.get("type"), cond, text)


def find(stanza, ns, tag):
    return raw(stanza).find(q(ns, tag))


class Timeout(AssertionError):
    pass


class Client(slixmpp.ClientXMPP):
    def __init__(self, jid, password, port, host="127.0.0.1", component=COMPONENT,
                 auto_receipts=False, name=None):
        super().__init__(jid, password)
        self.addr = (host, port)
        self.component = component
        self.auto_receipts = auto_receipts
        self.name = name or jid.split("@")[0]
        self.inbox = []              # every <message/> received, in order (slixmpp stanzas)
        self.all_messages = []       # never consumed; for "nothing arrived" checks
        self.presences = []
        self.pings = []              # 'from' of every ping IQ get received (answered by xep_0199)
        self._changed = asyncio.Event()
        self._session = asyncio.Event()
        self._disconnected = asyncio.Event()
        self.sessions = 0
        self.register_plugin("xep_0030")
        self.register_plugin("xep_0199", {"keepalive": False})
        self["feature_mechanisms"].unencrypted_plain = True
        self.register_handler(Callback("e2e-all-messages", MatchXPath("{%s}message" % NS_CLIENT),
                                       self._on_message))
        self.register_handler(Callback("e2e-all-presence", MatchXPath("{%s}presence" % NS_CLIENT),
                                       self._on_presence))
        self.register_handler(Callback("e2e-pings", MatchXPath("{%s}iq/{%s}ping" % (NS_CLIENT, NS_PING)),
                                       self._on_ping))
        self.add_event_handler("session_start", self._on_session_start)
        self.add_event_handler("disconnected", self._on_disconnected)
        self.send_initial_presence = True

    # ---- connection
    async def _on_session_start(self, event):
        self.sessions += 1
        if self.send_initial_presence:
            self.send_presence()
            # roster get is not needed by the tests
        self._disconnected.clear()
        self._session.set()

    def _on_disconnected(self, reason):
        self._session.clear()
        self._disconnected.set()

    async def start(self, timeout=10, initial_presence=True):
        self.send_initial_presence = initial_presence
        self._session.clear()
        self.connect(self.addr, use_ssl=False, force_starttls=False, disable_starttls=True)
        try:
            await asyncio.wait_for(self._session.wait(), timeout)
        except asyncio.TimeoutError:
            raise Timeout("%s: no session within %ss" % (self.boundjid, timeout))
        return self

    async def stop(self):
        if self.transport:
            try:
                await asyncio.wait_for(self.disconnect(wait=1), 3)
            except Exception:
                self.abort()
        self.remove_handler("e2e-all-messages")

    async def wait_disconnected(self, timeout=10):
        try:
            await asyncio.wait_for(self._disconnected.wait(), timeout)
        except asyncio.TimeoutError:
            raise Timeout("%s: still connected after %ss" % (self.boundjid, timeout))

    async def reconnect_until(self, timeout=20, initial_presence=True):
        """Reconnect (retrying) until a session is up again."""
        loop = asyncio.get_event_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                self._session.clear()
                self.send_initial_presence = initial_presence
                self.connect(self.addr, use_ssl=False, force_starttls=False, disable_starttls=True)
                await asyncio.wait_for(self._session.wait(), min(5, max(0.5, deadline - loop.time())))
                return
            except asyncio.TimeoutError:
                self.cancel_connection_attempt()
                if self.transport:
                    self.abort()
                if loop.time() > deadline:
                    raise Timeout("%s: could not reconnect within %ss" % (self.boundjid, timeout))
                await asyncio.sleep(0.3)

    def _on_ping(self, iq):
        if iq["type"] == "get":
            self.pings.append(str(iq["from"]))

    # ---- presence
    def announce(self, ptype=None):
        """Directed presence to the component (available unless ptype given)."""
        if ptype:
            self.send_presence(pto=self.component, ptype=ptype)
        else:
            self.send_presence(pto=self.component)

    def _on_presence(self, pres):
        self.presences.append(pres)
        self._changed.set()

    # ---- messages
    def _on_message(self, msg):
        self.inbox.append(msg)
        self.all_messages.append(msg)
        self._changed.set()
        if self.auto_receipts and msg["type"] != "error" and find(msg, NS_RECEIPTS, "request") is not None:
            self.send_receipt(msg)

    def send_receipt(self, msg, to=None):
        """Answer a pushed message with <received/> to the relay JID it came from."""
        m = self.make_message(mto=to or msg["from"], mtype=None)
        r = ET.Element(q(NS_RECEIPTS, "received"))
        r.set("id", msg["id"])
        m.append(r)
        m.send()

    def send_msg(self, to_bare, body="hello", mid=None, request=True, mtype="chat", extra=None,
                 raw_to=None):
        """Send a message to the relay JID of to_bare (or raw_to). Returns the id used."""
        to = raw_to or relay_jid(to_bare, self.component)
        m = self.make_message(mto=to, mbody=body, mtype=mtype)
        if mid is not None:
            m["id"] = mid
        else:
            mid = m["id"]
        if mid == "":
            del m["id"]
        if request:
            m.append(ET.Element(q(NS_RECEIPTS, "request")))
        for el in extra or []:
            m.append(ET.fromstring(el) if isinstance(el, str) else el)
        m.send()
        return mid

    def send_raw_xml(self, data):
        self.send_raw(data)

    def _take(self, pred):
        for i, m in enumerate(self.inbox):
            if pred(m):
                return self.inbox.pop(i)
        return None

    async def wait_msg(self, pred=lambda m: True, timeout=5, what="a message"):
        """Wait for (and consume) the first inbox message matching pred."""
        loop = asyncio.get_event_loop()
        deadline = loop.time() + timeout
        while True:
            m = self._take(pred)
            if m is not None:
                return m
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Timeout("%s: timed out after %ss waiting for %s; unconsumed inbox:\n  %s" % (
                    self.boundjid, timeout, what,
                    "\n  ".join(xml_str(x) for x in self.inbox) or "<empty>"))
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def collect(self, pred, duration):
        """Consume and return every inbox message matching pred that arrives within duration."""
        await asyncio.sleep(duration)
        got = [m for m in self.inbox if pred(m)]
        self.inbox = [m for m in self.inbox if not pred(m)]
        return got

    def clear_inbox(self):
        self.inbox = []

    # -- typed waits
    async def wait_stored(self, mid, timeout=5):
        def pred(m):
            el = find(m, NS_RD, "stored")
            return el is not None and el.get("id") == mid
        return await self.wait_msg(pred, timeout, "<stored id=%r/>" % mid)

    async def wait_error(self, mid, timeout=5):
        return await self.wait_msg(lambda m: m["type"] == "error" and m["id"] == mid, timeout,
                                   "message error for id %r" % mid)

    async def wait_stored_or_error(self, mid, timeout=5):
        def pred(m):
            if m["type"] == "error" and m["id"] == mid:
                return True
            el = find(m, NS_RD, "stored")
            return el is not None and el.get("id") == mid
        return await self.wait_msg(pred, timeout, "<stored/> or error for id %r" % mid)

    async def wait_push(self, mid=None, timeout=5, sender=None):
        """A pushed message (carries a stanza-id by the component)."""
        def pred(m):
            if m["type"] == "error":
                return False
            sid = find(m, NS_SID, "stanza-id")
            if sid is None:
                return False
            if mid is not None and m["id"] != mid:
                return False
            if sender is not None and str(m["from"]) != sender:
                return False
            return True
        return await self.wait_msg(pred, timeout, "pushed message id=%r" % mid)

    async def wait_receipt(self, mid, timeout=5):
        def pred(m):
            el = find(m, NS_RECEIPTS, "received")
            return el is not None and el.get("id") == mid
        return await self.wait_msg(pred, timeout, "<received id=%r/>" % mid)

    # ---- IQ
    async def iq(self, itype, payload, to=None, timeout=5):
        """Send an IQ with a raw XML payload (string or Element, or None).

        Returns ('result', iq) or ('error', iq); raises Timeout on no answer."""
        iq = self.make_iq(ito=to or self.component, itype=itype)
        if payload is not None:
            iq.append(ET.fromstring(payload) if isinstance(payload, str) else payload)
        try:
            res = await iq.send(timeout=timeout)
            return "result", res
        except IqError as e:
            return "error", e.iq
        except IqTimeout:
            raise Timeout("%s: no answer to IQ within %ss: %s" % (self.boundjid, timeout, xml_str(iq)))

    async def iq_ok(self, itype, payload, to=None, timeout=5):
        kind, res = await self.iq(itype, payload, to, timeout)
        if kind != "result":
            raise AssertionError("%s: expected IQ result for %s, got error %s: %s" % (
                self.boundjid, payload, error_condition(res), xml_str(res)))
        return res

    async def summary(self, ids=False):
        res = await self.iq_ok("get", "<summary xmlns='%s'%s/>" % (NS_RD, " ids='true'" if ids else ""))
        s = find(res, NS_RD, "summary")
        if s is None:
            raise AssertionError("summary result without <summary/>: %s" % xml_str(res))
        return s

    async def count(self):
        s = await self.summary()
        return int(s.get("count"))

    async def fetch(self, maxn=None, after=None):
        attrs = ""
        if maxn is not None:
            attrs += " max='%s'" % maxn
        if after is not None:
            attrs += " after='%s'" % after
        res = await self.iq_ok("get", "<fetch xmlns='%s'%s/>" % (NS_RD, attrs))
        b = find(res, NS_RD, "batch")
        if b is None:
            raise AssertionError("fetch result without <batch/>: %s" % xml_str(res))
        return b

    async def fetch_all(self, page=50):
        """All offline items: list of (stanza_id, forwarded element)."""
        items, after = [], None
        for _ in range(1000):
            b = await self.fetch(page, after)
            fw = b.findall(q(NS_FORWARD, "forwarded"))
            for f in fw:
                items.append((forwarded_sid(f), f))
            if b.get("complete") == "true":
                return items
            after = b.get("last")
            if after is None:
                raise AssertionError("incomplete page without 'last': %s" % xml_str(b))
        raise AssertionError("fetch_all did not complete")

    async def ack(self, sids):
        payload = "<ack xmlns='%s'>%s</ack>" % (NS_RD, "".join("<item id='%s'/>" % s for s in sids))
        return await self.iq_ok("set", payload)


def forwarded_message(fw):
    return fw.find(q(NS_CLIENT, "message"))


def forwarded_sid(fw):
    m = forwarded_message(fw)
    if m is None:
        return None
    sid = m.find(q(NS_SID, "stanza-id"))
    return sid.get("id") if sid is not None else None


SID_RE = re.compile(r"^(\d+)-([0-9a-fA-F]+)$")


def sid_seq(sid):
    m = SID_RE.match(sid or "")
    if not m:
        raise AssertionError("stanza-id %r does not look like <seq>-<hex>" % sid)
    return int(m.group(1))
