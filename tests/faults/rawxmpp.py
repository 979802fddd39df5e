"""A small raw-socket asyncio XMPP c2s client for the receiptd fault tests.

slixmpp is comfortable but slow under thousands of stanzas and hides the transport; the fault
tests need both speed and the ability to cut a TCP connection at an exact moment (mid-fetch).
This client speaks just enough: plain TCP (no TLS), SASL PLAIN, resource binding, presence,
messages, IQs (with futures), and it answers XEP-0199 pings. Incoming stanzas are parsed with
expat (xml.etree.XMLPullParser) and handed to on_stanza(elem) one top-level element at a time.
"""

import asyncio
import base64
import itertools
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape as xesc, quoteattr

NS_CLIENT = "jabber:client"
NS_STREAM = "http://etherx.jabber.org/streams"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_PING = "urn:xmpp:ping"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


def q(ns, tag):
    return "{%s}%s" % (ns, tag)


def attr(v):
    return quoteattr(str(v))


class Disconnected(Exception):
    pass


class RawClient:
    _ids = itertools.count(1)

    def __init__(self, user, domain, password, port, resource="r", host="127.0.0.1", name=None):
        self.user, self.domain, self.password = user, domain, password
        self.port, self.host, self.resource = port, host, resource
        self.bare = "%s@%s" % (user, domain)
        self.jid = None
        self.name = name or user
        self.reader = self.writer = None
        self.connected = False
        self.sessions = 0
        self._read_task = None
        self._iqs = {}
        self.on_stanza = None           # callback(elem) for every stanza except answered pings / IQ results
        self.on_disconnect = None       # callback()
        self.bytes_in = 0
        self.abort_on_next_read = False  # cut the TCP connection when the next chunk arrives (unread)
        self.pings_answered = 0

    # ---------------------------------------------------------------- connection
    async def connect(self, timeout=5, initial_presence=True):
        await asyncio.wait_for(self._connect(initial_presence), timeout)
        return self

    async def _connect(self, initial_presence):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self._new_parser()
            self._open_stream()
            feats = await self._next_top()
            if not any(c.tag == q(NS_SASL, "mechanisms") for c in feats):
                raise Disconnected("no SASL mechanisms offered")
            token = base64.b64encode(("\0%s\0%s" % (self.user, self.password)).encode()).decode()
            self._write("<auth xmlns='%s' mechanism='PLAIN'>%s</auth>" % (NS_SASL, token))
            res = await self._next_top()
            if res.tag != q(NS_SASL, "success"):
                raise Disconnected("SASL failed: %s" % ET.tostring(res, encoding="unicode"))
            self._new_parser()
            self._open_stream()
            await self._next_top()  # features (bind)
            self._write("<iq type='set' id='bind1'><bind xmlns='%s'><resource>%s</resource></bind></iq>"
                        % (NS_BIND, xesc(self.resource)))
            res = await self._next_top()
            j = res.find("%s/%s" % (q(NS_BIND, "bind"), q(NS_BIND, "jid")))
            if res.get("type") != "result" or j is None:
                raise Disconnected("bind failed: %s" % ET.tostring(res, encoding="unicode"))
            self.jid = j.text
        except BaseException:
            self.writer.transport.abort()
            raise
        self.connected = True
        self.sessions += 1
        if initial_presence:
            self._write("<presence/>")
        self._read_task = asyncio.get_running_loop().create_task(self._read_loop())

    def _new_parser(self):
        self._parser = ET.XMLPullParser(events=("start", "end"))
        self._depth = 0
        self._pending = []   # complete top-level elements not yet consumed

    def _open_stream(self):
        self._write("<?xml version='1.0'?><stream:stream to='%s' xmlns='jabber:client' "
                    "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>" % self.domain)

    def _feed(self, data):
        self._parser.feed(data)
        for ev, el in self._parser.read_events():
            if ev == "start":
                if self._depth == 0:
                    self._root = el
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 1:
                    self._pending.append(el)
                    self._root.remove(el)   # keep the stream tree from growing
                elif self._depth == 0:
                    raise Disconnected("stream closed by server")

    async def _next_top(self):
        while not self._pending:
            data = await self.reader.read(65536)
            if not data:
                raise Disconnected("connection closed during login")
            self._feed(data)
        el = self._pending.pop(0)
        if el.tag == q(NS_STREAM, "error"):
            raise Disconnected("stream error: %s" % ET.tostring(el, encoding="unicode"))
        return el

    async def _read_loop(self):
        why = "eof"
        try:
            for el in self._pending:
                self._dispatch(el)
            self._pending = []
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                if self.abort_on_next_read:
                    self.abort_on_next_read = False
                    why = "aborted on purpose with %d bytes unread" % len(data)
                    self.writer.transport.abort()
                    break
                self.bytes_in += len(data)
                self._feed(data)
                pend, self._pending = self._pending, []
                for el in pend:
                    self._dispatch(el)
        except Disconnected as e:
            why = str(e)
        except (ConnectionError, OSError) as e:
            why = "%s" % e
        except asyncio.CancelledError:
            why = "cancelled"
        finally:
            self._lost(why)

    def _lost(self, why):
        if not self.connected:
            return
        self.connected = False
        self.last_disconnect_reason = why
        try:
            self.writer.transport.abort()
        except Exception:
            pass
        for fut in self._iqs.values():
            if not fut.done():
                fut.set_exception(Disconnected(why))
        self._iqs.clear()
        if self.on_disconnect:
            self.on_disconnect()

    def _dispatch(self, el):
        tag = el.tag
        if tag == q(NS_CLIENT, "iq"):
            t = el.get("type")
            if t in ("result", "error"):
                fut = self._iqs.pop(el.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(el)
                return
            if t == "get" and el.find(q(NS_PING, "ping")) is not None:
                self._write("<iq type='result' id=%s to=%s/>" % (attr(el.get("id", "")), attr(el.get("from", ""))))
                self.pings_answered += 1
                return
            if t in ("get", "set"):
                self._write("<iq type='error' id=%s to=%s><error type='cancel'><service-unavailable "
                            "xmlns='%s'/></error></iq>" % (attr(el.get("id", "")), attr(el.get("from", "")),
                                                           NS_STANZAS))
                return
        if tag == q(NS_STREAM, "error"):
            raise Disconnected("stream error: %s" % ET.tostring(el, encoding="unicode"))
        if self.on_stanza:
            self.on_stanza(el)

    def _write(self, s):
        if self.writer is None or self.writer.transport.is_closing():
            raise Disconnected("not connected")
        self.writer.write(s.encode())

    def send(self, s):
        """Queue raw XML; raises Disconnected if the connection is gone."""
        if not self.connected:
            raise Disconnected("not connected")
        self._write(s)

    async def drain(self):
        if self.connected:
            try:
                await self.writer.drain()
            except (ConnectionError, OSError):
                pass

    def abort(self):
        """Cut the TCP connection at once (no </stream:stream>)."""
        if self.writer is not None:
            self.writer.transport.abort()
        self._lost("aborted")

    async def close(self):
        if self.connected:
            try:
                self._write("</stream:stream>")
                await asyncio.wait_for(self.writer.drain(), 1)
            except Exception:
                pass
        if self._read_task is not None:
            self._read_task.cancel()
            try:
                await self._read_task
            except BaseException:
                pass
        if self.writer is not None:
            self.writer.transport.abort()
        self.connected = False

    # ---------------------------------------------------------------- stanzas
    async def iq(self, itype, to, payload, timeout=5):
        """Returns the result/error element; raises Disconnected or asyncio.TimeoutError."""
        iid = "iq%d" % next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._iqs[iid] = fut
        self.send("<iq type='%s' to=%s id='%s'>%s</iq>" % (itype, attr(to), iid, payload))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._iqs.pop(iid, None)

    def send_iq_noreply(self, itype, to, payload):
        iid = "iq%d" % next(self._ids)
        self.send("<iq type='%s' to=%s id='%s'>%s</iq>" % (itype, attr(to), iid, payload))
        return iid
