"""Fault-injection tests for receiptd: steady load through real Prosody + Redis + receiptd while a
process is killed, restarted or paused, then a check of the delivery invariant.

Load: NS senders each send N receipt-requested messages (unique ids) to the recipients round-robin,
at most WINDOW without <stored/> at a time, paced to RATE messages/s in total. A sender resends a
message with the SAME id when it got an error or no <stored/> within RETRY_S, and after each
reconnect of its own. Recipients announce themselves to the component (directed presence), answer
every push with <received/>, answer XEP-0199 pings, reconnect and re-announce by themselves; at the
end they fetch and ack their offline queue until every stored message was seen.

Invariant checked after each run:
  * every (sender, id) sent got a <stored/> in the end, and never two different stanza-ids;
  * every stored message was delivered (live push, the server's offline flood, or fetch) to its
    recipient, under the stanza-id of its <stored/> (lost = 0, duplicates after dedupe by
    stanza-id = 0; raw duplicate deliveries before dedupe are reported);
  * receiptd logged 'store: connected' / 'link: authenticated' again after every fault;
  * while Redis was unreachable or paused, receiptd's VmRSS stayed under RSS_LIMIT_KB and senders
    got wait errors (internal-server-error).
The `standby` test runs a second receiptd with the same component.ini (hot standby) and kills the
attached one: on Prosody the standby, refused with <conflict/> until then, must take over within
TAKEOVER_LIMIT_S; on both servers the survivor resends every delivery pending at the kill and
Redis ends empty (nothing pending, queued or scheduled is left behind).
"""

import asyncio
import collections
import os
import random
import re
import signal
import sys
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "e2e"))
sys.path.insert(0, HERE)

import harness  # noqa: E402  (tests/e2e/harness.py: process control)
from rawxmpp import RawClient, Disconnected, q, attr  # noqa: E402

NS_CLIENT = "jabber:client"
NS_RECEIPTS = "urn:xmpp:receipts"
NS_RD = "urn:receiptd:0"
NS_SID = "urn:xmpp:sid:0"
NS_FORWARD = "urn:xmpp:forward:0"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"

COMPONENT = harness.COMPONENT
DOMAIN = harness.USER_DOMAIN

SENDERS = ["s1", "s2", "s3", "s4"]
RECIPIENTS = ["r1", "r2"]
USERS = {u: (DOMAIN, u + "-pw") for u in SENDERS + RECIPIENTS}

RSS_LIMIT_KB = 64 * 1024

DELIVERY = {
    "retry_interval": "1",
    "delivery_window": "4",
    "dedupe_window": "86400",
    "fetch_max": "100",
    "max_offline_messages": "100000",
}


def now():
    return time.monotonic()


def escape_node(bare):
    return bare.replace("\\", "\\5c").replace("@", "\\40")


def unescape_node(node):
    return re.sub(r"\\([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), node)


def relay_jid(bare):
    return "%s@%s" % (escape_node(bare), COMPONENT)


def bare_of(jid):
    return (jid or "").split("/", 1)[0]


def sender_of_relay(jid):
    """alice\\40localhost@receipts.localhost -> alice@localhost"""
    b = bare_of(jid)
    node, _, dom = b.rpartition("@")
    return unescape_node(node) if dom == COMPONENT else None


def error_condition(el):
    e = el.find(q(NS_CLIENT, "error"))
    if e is None:
        return None, None
    for c in e:
        if c.tag.startswith("{%s}" % NS_STANZAS) and not c.tag.endswith("}text"):
            return e.get("type"), c.tag.split("}", 1)[1]
    return e.get("type"), None


def log(t0, fmt, *args):
    print("[%6.2fs] %s" % (now() - t0, fmt % args if args else fmt), flush=True)


class Msg:
    __slots__ = ("mid", "to", "sids", "sends", "next_at", "first_at", "stored_at", "errors", "tx", "answers")

    def __init__(self, mid, to):
        self.mid, self.to = mid, to
        self.sids = []          # stanza-id of every <stored/> received
        self.sends = 0
        self.next_at = 0.0      # when to (re)send if still without <stored/>
        self.first_at = None
        self.stored_at = None
        self.errors = []        # (time, type, condition)
        self.tx = []            # time of every transmission
        self.answers = []       # time of every <stored/> or error for it


class Stats:
    def __init__(self):
        self.errors = {}          # (type, condition) -> count
        self.error_times = []     # (time, type, condition)
        self.reconnects = 0


class Sender:
    def __init__(self, ctx, user, n, rate):
        self.ctx, self.user, self.n = ctx, user, n
        self.bare = "%s@%s" % (user, DOMAIN)
        self.interval = 1.0 / rate
        self.msgs = {}
        self.order = []
        for i in range(n):
            to = RECIPIENTS[i % len(RECIPIENTS)] + "@" + DOMAIN
            mid = "%s-%05d" % (user, i)
            self.msgs[mid] = Msg(mid, to)
            self.order.append(mid)
        self.next_new = 0
        self.outstanding = {}      # mid -> Msg (sent, no <stored/> yet)
        self.client = None
        self.stats = ctx.stats
        self.stray = []            # stanzas we did not expect

    def body(self, m):
        return "from %s id %s to %s" % (self.bare, m.mid, m.to) + " x" * 40

    def stanza(self, m):
        return ("<message to=%s id=%s type='chat'><body>%s</body><request xmlns='%s'/></message>"
                % (attr(relay_jid(m.to)), attr(m.mid), self.body(m), NS_RECEIPTS))

    def on_stanza(self, el):
        if el.tag != q(NS_CLIENT, "message"):
            return
        st = el.find(q(NS_RD, "stored"))
        if st is not None:
            m = self.msgs.get(st.get("id"))
            if m is None:
                self.stray.append(ET.tostring(el, encoding="unicode"))
                return
            m.sids.append(st.get("stanza-id"))
            m.answers.append(now())
            if m.stored_at is None:
                m.stored_at = now()
            self.outstanding.pop(m.mid, None)
            return
        if el.get("type") == "error":
            m = self.msgs.get(el.get("id"))
            typ, cond = error_condition(el)
            self.stats.errors[(typ, cond)] = self.stats.errors.get((typ, cond), 0) + 1
            self.stats.error_times.append((now(), typ, cond))
            if m is not None:
                m.errors.append((now(), typ, cond))
                m.answers.append(now())
                if m.mid in self.outstanding:
                    # retry soon (wait errors and the server's remote-server-timeout both mean: later)
                    m.next_at = now() + 0.3 + random.random() * 0.4

    async def connect(self):
        c = RawClient(self.user, DOMAIN, USERS[self.user][1], self.ctx.c2s_port, resource="load",
                      name=self.user)
        c.on_stanza = self.on_stanza
        await c.connect()
        self.client = c

    async def reconnect(self, deadline):
        while now() < deadline and not self.ctx.stopping:
            try:
                await self.connect()
                self.stats.reconnects += 1
                t = now()
                for m in self.outstanding.values():   # resend everything without <stored/>
                    m.next_at = t
                return True
            except (OSError, Disconnected, asyncio.TimeoutError):
                await asyncio.sleep(0.2)
        return False

    def done(self):
        return self.next_new >= self.n and not self.outstanding

    async def run(self, deadline):
        await self.connect()
        next_send = now()
        while not self.done() and now() < deadline and not self.ctx.stopping:
            if not self.client.connected:
                if not await self.reconnect(deadline):
                    break
                continue
            t = now()
            try:
                sent = 0
                # new messages, paced
                while (self.next_new < self.n and len(self.outstanding) < self.ctx.window
                       and t >= next_send and sent < 50):
                    m = self.msgs[self.order[self.next_new]]
                    self.next_new += 1
                    m.first_at = t
                    m.next_at = t + self.ctx.retry_s
                    m.sends += 1
                    m.tx.append(t)
                    self.outstanding[m.mid] = m
                    self.client.send(self.stanza(m))
                    next_send += self.interval
                    sent += 1
                if t >= next_send + 1:       # do not burst to catch up after a stall
                    next_send = t
                # retries with the same id
                for m in list(self.outstanding.values()):
                    if m.next_at <= t:
                        m.sends += 1
                        m.tx.append(t)
                        m.next_at = t + self.ctx.retry_s
                        self.client.send(self.stanza(m))
                await self.client.drain()
            except Disconnected:
                continue
            await asyncio.sleep(0.01)

    async def close(self):
        if self.client:
            await self.client.close()


class Recipient:
    def __init__(self, ctx, user, announce=True):
        self.ctx, self.user = ctx, user
        self.bare = "%s@%s" % (user, DOMAIN)
        self.announce = announce
        self.client = None
        self.deliveries = []      # (how, sid, sender bare, mid)
        self.auto_reconnect = True
        self._task = None
        self.stray = []
        self.announce_waits = 0   # pings to C answered with an error before an announce
        self.withhold = False     # while set: no <received/> (as if lost with a dying component)
        self.withheld = set()     # stanza-ids whose <received/> was withheld

    def record(self, how, sid, sender, mid):
        self.deliveries.append((how, sid, sender, mid, now()))

    def on_stanza(self, el):
        if el.tag != q(NS_CLIENT, "message") or el.get("type") == "error":
            return
        sidel = el.find(q(NS_SID, "stanza-id"))
        if sidel is None or sidel.get("by") != COMPONENT:
            return
        sender = sender_of_relay(el.get("from"))
        how = "flood" if el.find("{urn:xmpp:delay}delay") is not None else "live"
        self.record(how, sidel.get("id"), sender, el.get("id"))
        if el.find(q(NS_RECEIPTS, "request")) is not None:
            if self.withhold:
                self.withheld.add(sidel.get("id"))
                return
            try:
                self.client.send("<message to=%s><received xmlns='%s' id=%s/></message>"
                                 % (attr(el.get("from")), NS_RECEIPTS, attr(el.get("id"))))
            except Disconnected:
                pass

    def on_disconnect(self):
        if self.auto_reconnect and not self.ctx.stopping:
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._reconnect())

    async def connect(self, announce=None):
        c = RawClient(self.user, DOMAIN, USERS[self.user][1], self.ctx.c2s_port, resource="dev",
                      name=self.user)
        c.on_stanza = self.on_stanza
        c.on_disconnect = self.on_disconnect
        self.client = c
        await c.connect()
        if self.announce if announce is None else announce:
            try:
                await self.announce_verified(c)
            except BaseException:
                c.abort()
                raise
        return c

    async def announce_verified(self, c, timeout=20):
        """Directed presence to C once C is reachable.

        After a server restart the client is usually back before receiptd re-attached; the
        server then drops the directed presence (receiptd never sees it and, having got our
        'unavailable' at the shutdown, does not ping us either). So: ping C until it answers,
        then announce, then ping again so the presence has been processed."""
        end = now() + timeout
        while True:
            res = await c.iq("get", COMPONENT, "<ping xmlns='urn:xmpp:ping'/>")
            if res.get("type") == "result":
                break
            self.announce_waits += 1
            if now() > end:
                raise AssertionError("%s: component unreachable for %ss: %s" % (
                    self.user, timeout, ET.tostring(res, encoding="unicode")))
            await asyncio.sleep(0.2)
        c.send("<presence to='%s'/>" % COMPONENT)
        await c.iq("get", COMPONENT, "<ping xmlns='urn:xmpp:ping'/>")

    async def _reconnect(self):
        while not self.ctx.stopping:
            try:
                await self.connect()
                self.ctx.stats.reconnects += 1
                return
            except (OSError, Disconnected, asyncio.TimeoutError):
                await asyncio.sleep(0.2)

    async def wait_connected(self, timeout):
        end = now() + timeout
        while not (self.client and self.client.connected):
            if now() > end:
                raise AssertionError("%s did not reconnect within %ss" % (self.user, timeout))
            await asyncio.sleep(0.05)

    async def fetch_page(self, after=None, maxn=100, timeout=10):
        a = " after=%s" % attr(after) if after else ""
        res = await self.client.iq("get", COMPONENT, "<fetch xmlns='%s' max='%d'%s/>" % (NS_RD, maxn, a),
                                   timeout=timeout)
        if res.get("type") != "result":
            raise IqFailed("fetch", res)
        b = res.find(q(NS_RD, "batch"))
        items = []
        for fw in b.findall(q(NS_FORWARD, "forwarded")):
            m = fw.find(q(NS_CLIENT, "message"))
            sidel = m.find(q(NS_SID, "stanza-id")) if m is not None else None
            if sidel is None:
                continue
            items.append((sidel.get("id"), bare_of(m.get("from")), m.get("id")))
        return items, b.get("complete") == "true", b.get("last")

    async def ack(self, sids, timeout=10):
        for i in range(0, len(sids), 500):
            part = sids[i:i + 500]
            res = await self.client.iq("set", COMPONENT, "<ack xmlns='%s'>%s</ack>" % (
                NS_RD, "".join("<item id=%s/>" % attr(s) for s in part)), timeout=timeout)
            if res.get("type") != "result":
                raise IqFailed("ack", res)

    async def drain_queue(self):
        """Fetch every page of the offline queue, record, ack. Returns items seen."""
        after, total = None, 0
        while True:
            items, complete, last = await self.fetch_page(after)
            for sid, sender, mid in items:
                self.record("fetch", sid, sender, mid)
            if items:
                await self.ack([s for s, _, _ in items])
            total += len(items)
            if complete or not items:
                return total
            after = last

    async def summary_count(self):
        res = await self.client.iq("get", COMPONENT, "<summary xmlns='%s'/>" % NS_RD)
        if res.get("type") != "result":
            raise IqFailed("summary", res)
        return int(res.find(q(NS_RD, "summary")).get("count"))

    async def close(self):
        self.auto_reconnect = False
        if self._task:
            self._task.cancel()
        if self.client:
            await self.client.close()


class IqFailed(Exception):
    def __init__(self, what, el):
        super().__init__("%s IQ failed: %s" % (what, ET.tostring(el, encoding="unicode")))
        self.el = el


class FaultStack:
    """Redis + the XMPP server (with the fault users) + receiptd in one temp dir; always cleaned up.
    redis='cluster': a Redis Cluster (3 masters + 3 replicas, harness.ClusterRedis; `cluster_kw`
    goes to RedisCluster) instead of one Redis; `cluster` is then its RedisCluster."""

    def __init__(self, binary, extra=None, keep=False, redis="single", cluster_kw=None):
        self.binary = binary
        self.extra = extra
        self.keep = keep
        self.redis_mode = redis
        self.cluster_kw = cluster_kw
        self.tmp = None
        self.redis = self.prosody = self.receiptd = None
        self.others = []          # further receiptd instances a test started (standby); logs + cleanup
        self.redis_stopped = False

    def __enter__(self):
        import tempfile
        self.tmp = tempfile.mkdtemp(prefix="receiptd-faults-")
        os.chmod(self.tmp, 0o755)
        try:
            self.redis = harness.make_redis(self.tmp, self.redis_mode, self.cluster_kw)
            if self.cluster is not None:
                self.redis.start()      # receiptd's seeds are its ports
            # The XMPP server: Prosody, or ejabberd with E2E_SERVER=ejabberd (run.py --server).
            # Still called `prosody` here: the tests only start, stop and read its ports.
            self.prosody = harness.SERVERS[harness.server_name()](self.tmp, users=USERS)
            self.receiptd = harness.Receiptd(self.tmp, self.binary, self.prosody, self.redis,
                                             DELIVERY, self.extra)
            if self.cluster is None:
                self.redis.start()
            self.prosody.start()
            self.receiptd.start()
        except BaseException:
            self.close(failed=True)
            raise
        return self

    @property
    def cluster(self):
        return getattr(self.redis, "cluster", None)

    def key_command(self, key, *args):
        """One command on the Redis (the master serving `key` on a cluster)."""
        if self.cluster is not None:
            return self.cluster.command_key(key, *args)
        return redis_pipeline(self.redis.port, [args])[0]

    def __exit__(self, et, ev, tb):
        self.close(failed=et is not None)
        return False

    def sigstop_redis(self):
        os.kill(self.redis.popen.pid, signal.SIGSTOP)
        self.redis_stopped = True

    def sigcont_redis(self):
        if self.redis_stopped and self.redis.popen is not None:
            os.kill(self.redis.popen.pid, signal.SIGCONT)
        self.redis_stopped = False

    def add_receiptd(self, name):
        """A second receiptd with the same component.ini (not started); cleaned up with the stack."""
        rd = harness.Receiptd(self.tmp, self.binary, self.prosody, self.redis, DELIVERY, self.extra,
                              name=name, ini=self.receiptd.ini)
        self.others.append(rd)
        return rd

    def all_receiptds(self):
        out = [self.receiptd] + self.others
        return [p for i, p in enumerate(out) if p is not None and p not in out[:i]]

    def dump_logs(self, out=sys.stderr):
        for p in self.all_receiptds() + [self.prosody, self.redis]:
            if p is None:
                continue
            for path in p.logs:
                out.write("\n===== %s =====\n%s\n" % (path, harness.tail(path, 12000)))
        if self.prosody is not None:
            path = os.path.join(self.prosody.dir, "prosody.out")
            out.write("\n===== %s =====\n%s\n" % (path, harness.tail(path, 4000)))
        if self.cluster is not None:
            try:
                out.write("\n===== CLUSTER NODES =====\n%s\n" % self.cluster.command(
                    self.cluster.live_ports()[0], "CLUSTER", "NODES"))
            except Exception as e:
                out.write("\n===== CLUSTER NODES: %s =====\n" % e)

    def close(self, failed=False):
        try:
            self.sigcont_redis()
        except Exception:
            pass
        for p in self.all_receiptds() + [self.prosody, self.redis]:
            if p is not None:
                try:
                    p.cleanup()
                except Exception:
                    pass
        if failed:
            self.dump_logs()
        if self.tmp and not self.keep:
            import shutil
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif self.tmp:
            sys.stderr.write("kept temp dir %s\n" % self.tmp)


def vmrss_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class Ctx:
    def __init__(self, stack, n_per_sender, rate, window=40, retry_s=3.0, sabotage=False):
        self.stack = stack
        self.c2s_port = stack.prosody.c2s_port
        self.n = n_per_sender
        self.rate = rate
        self.window = window
        self.retry_s = retry_s
        self.sabotage = sabotage
        self.stopping = False
        self.stats = Stats()
        self.t0 = now()
        self.senders = []
        self.recipients = {}
        self.outages = []         # (start, end, what) of Redis outages
        self.rss = []             # (time, kB)
        self.rss_stop = False
        self.failures = []
        self.faults_done = 0
        self.last_fault_at = None   # when the last fault was over (process back)
        self.post_checks = []       # async fn(ctx) run after the final check, clients still connected
        self.extra_counts = {}      # name -> text, printed on a line of its own by run.py

    def say(self, fmt, *args):
        log(self.t0, fmt, *args)

    def check(self, cond, fmt, *args):
        if not cond:
            self.failures.append(fmt % args if args else fmt)

    async def sync(self, fn, *args):
        return await asyncio.to_thread(fn, *args)

    async def rss_monitor(self):
        while not self.rss_stop:
            p = self.stack.receiptd.popen
            if p is not None and p.poll() is None:
                kb = vmrss_kb(p.pid)
                if kb is not None:
                    self.rss.append((now(), kb))
            await asyncio.sleep(0.1)

    def load_progress(self):
        return sum(s.next_new for s in self.senders) / float(sum(s.n for s in self.senders))

    async def wait_progress(self, frac, timeout=60):
        end = now() + timeout
        while self.load_progress() < frac and now() < end:
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ sabotage (self-test)
    async def sabotage_once(self):
        """Break the invariant on purpose (the run must then fail): delete one stored, not yet
        delivered message from Redis; if every stored message is already delivered (fast live
        pushes), delete the dedupe key of a delivered one and make its sender resend it."""
        end = now() + 3
        while now() < end:
            delivered = {d[1] for r in self.recipients.values() for d in r.deliveries}
            for s in self.senders:
                for m in s.msgs.values():
                    if m.sids and m.sids[0] not in delivered:
                        sid = m.sids[0]
                        p = "rd:{%s}" % m.to
                        for cmd in (("HDEL", p + ":m", sid), ("ZREM", p + ":q", sid),
                                    ("ZREM", p + ":p", sid), ("HDEL", p + ":pw", sid)):
                            await self.sync(self.stack.key_command, cmd[1], *cmd)
                        self.say("SABOTAGE: deleted %s (%s %s) from Redis", sid, s.bare, m.mid)
                        return
            await asyncio.sleep(0.01)
        s = self.senders[0]
        m = next(m for m in s.msgs.values() if m.sids)
        # What dedupe knows of it: the origins of the window it arrived in, this one or the one
        # before (storage/SCHEMA.md; this run's dedupe_window is a day).
        origin = "%s %s" % (s.bare, m.mid)
        window = int(time.time() * 1000) // 86400000
        p = "rd:{%s}" % m.to
        for key in ("%s:o:%d" % (p, window), "%s:o:%d" % (p, window - 1)):
            await self.sync(self.stack.key_command, key, "HDEL", key, origin)
        s.outstanding[m.mid] = m
        m.next_at = now()
        self.say("SABOTAGE: deleted what dedupe knew of %r and resent %s", origin, m.mid)

    # ------------------------------------------------------------------ final check
    async def settle_and_check(self, deadline_s=30):
        # 1. every sender gets every message stored
        end = now() + deadline_s
        while not all(s.done() for s in self.senders) and now() < end:
            await asyncio.sleep(0.1)
        self.say("senders finished: %s", ", ".join("%s %d/%d out=%d" % (
            s.user, s.next_new, s.n, len(s.outstanding)) for s in self.senders))
        # 2. recipients: live pushes settle, then fetch + ack until everything stored was seen
        expected = {}
        for s in self.senders:
            for m in s.msgs.values():
                if m.sids:
                    expected[m.sids[0]] = (m.to, s.bare, m.mid)
        end = now() + deadline_s
        while True:
            for r in self.recipients.values():
                if not r.client.connected:
                    continue
                try:
                    await r.drain_queue()
                except (Disconnected, asyncio.TimeoutError, IqFailed) as e:
                    self.say("drain %s: %s", r.user, e)
            seen = {d[1] for r in self.recipients.values() for d in r.deliveries}
            missing = [s for s in expected if s not in seen]
            if not missing or now() > end:
                break
            await asyncio.sleep(1.0)
        # let late retransmissions arrive (they only add raw duplicates) and check queues empty
        await asyncio.sleep(0.5)
        for r in self.recipients.values():
            try:
                await r.drain_queue()
                cnt = await r.summary_count()
                self.check(cnt == 0, "%s: offline queue not empty after fetch+ack (count=%d)", r.user, cnt)
            except (Disconnected, asyncio.TimeoutError, IqFailed) as e:
                self.check(False, "%s: final fetch/summary failed: %s", r.user, e)
        return self.verdict()

    def verdict(self):
        sent = sum(1 for s in self.senders for m in s.msgs.values() if m.sends)
        transmissions = sum(m.sends for s in self.senders for m in s.msgs.values())
        stored = {}
        conflicting = []
        never_stored = []
        for s in self.senders:
            for m in s.msgs.values():
                if m.sends and not m.sids:
                    never_stored.append("%s/%s" % (s.bare, m.mid))
                if m.sids:
                    if len(set(m.sids)) > 1:
                        conflicting.append("%s/%s: %s" % (s.bare, m.mid, sorted(set(m.sids))))
                    stored[(s.bare, m.mid)] = (m.sids[0], m.to)
        # deliveries per recipient
        by_key = {}          # (sender, mid) -> set of sids delivered
        raw = 0
        seen_sids = {}
        wrong = []
        for r in self.recipients.values():
            for how, sid, sender, mid, _t in r.deliveries:
                if (r.bare, sid) in seen_sids:
                    raw += 1
                seen_sids[(r.bare, sid)] = (sender, mid)
                by_key.setdefault((sender, mid), set()).add(sid)
                exp = stored.get((sender, mid))
                if exp is not None and (exp[0] != sid or exp[1] != r.bare):
                    wrong.append("%s got %s as %s/%s, stored ack said %s for %s" % (
                        r.bare, sid, sender, mid, exp[0], exp[1]))
        lost = [k for k, (sid, to) in stored.items() if (to, sid) not in seen_sids]
        dups = [k for k, sids in by_key.items() if len(sids) > 1]
        unknown = [k for k in by_key if k not in stored]
        delivered = sum(1 for k in stored if (stored[k][1], stored[k][0]) in seen_sids)
        self.check(not never_stored, "%d messages never got <stored/> despite retries: %s",
                   len(never_stored), never_stored[:10])
        self.check(not conflicting, "(sender,id) acked with different stanza-ids: %s", conflicting[:10])
        self.check(not lost, "%d stored-acked messages lost: %s", len(lost), lost[:10])
        self.check(not dups, "%d messages delivered under several stanza-ids: %s", len(dups), dups[:10])
        self.check(not wrong, "%d deliveries disagree with the <stored/> ack: %s", len(wrong), wrong[:5])
        self.check(not unknown, "%d deliveries of messages nobody got <stored/> for: %s",
                   len(unknown), unknown[:10])
        hows = {}
        for r in self.recipients.values():
            for d in r.deliveries:
                hows[d[0]] = hows.get(d[0], 0) + 1
        return dict(sent=sent, stored=len(stored), delivered=delivered, lost=len(lost),
                    duplicates=len(dups), raw_dups=raw, transmissions=transmissions, hows=hows)

    def check_rss_during(self, start, end, what):
        samples = [kb for t, kb in self.rss if start <= t <= end]
        mx = max(samples) if samples else None
        self.check(bool(samples), "no RSS samples of receiptd during %s", what)
        if mx is not None:
            self.check(mx < RSS_LIMIT_KB, "receiptd VmRSS reached %d kB during %s (limit %d kB)",
                       mx, what, RSS_LIMIT_KB)
        return mx

    def wait_errors_during(self, start, end):
        return sum(1 for t, typ, cond in self.stats.error_times
                   if start <= t <= end and typ == "wait" and cond == "internal-server-error")

    def stored_during(self, start, end):
        """<stored/> acks whose message was first sent inside the window and acked inside it."""
        return sum(1 for s in self.senders for m in s.msgs.values()
                   if m.stored_at is not None and start <= m.stored_at <= end)


# ====================================================================== the tests

TESTS = {}


def fault_test(name, doc, n=900, rate=300, extra=None, cluster=False, cluster_kw=None):
    """cluster=True: the test runs against a Redis Cluster (FaultStack redis='cluster'), on
    Prosody only in meson (run.py --list --redis cluster names these)."""
    def deco(fn):
        TESTS[name] = dict(fn=fn, doc=doc, n=n, rate=rate, extra=extra, cluster=cluster,
                           cluster_kw=cluster_kw)
        return fn
    return deco


def names(redis="single"):
    return [n for n, spec in TESTS.items() if spec["cluster"] == (redis == "cluster")]


async def wait_log_count(ctx, needle, count, timeout=15):
    rd = ctx.stack.receiptd
    end = now() + timeout
    while rd.count_in_log(needle) < count:
        if now() > end:
            return False
        await asyncio.sleep(0.05)
    return True


@fault_test("kill9", "kill -9 of receiptd at 4 random moments of the load, restarted each time")
async def t_kill9(ctx):
    rd = ctx.stack.receiptd
    points = sorted(random.uniform(0.1, 0.8) for _ in range(4))
    for i, p in enumerate(points):
        await ctx.wait_progress(p)
        await asyncio.sleep(random.random() * 0.3)
        ctx.say("fault %d: kill -9 receiptd (load %.0f%%)", i + 1, 100 * ctx.load_progress())
        await ctx.sync(rd.kill9)
        await asyncio.sleep(random.random() * 0.8)
        await ctx.sync(rd.start)   # waits for 'link: authenticated' and 'store: connected' in the new log
        ctx.check(rd.count_in_log("store: connected") >= 1 and rd.count_in_log("link: authenticated") >= 1,
                  "receiptd run %d: no 'store: connected' / 'link: authenticated'", rd.runs)
        ctx.say("receiptd back (run %d)", rd.runs)
        ctx.faults_done += 1
        ctx.last_fault_at = now()
    ctx.check(rd.runs == 5, "expected 5 receiptd runs, got %d", rd.runs)


@fault_test("redis-restart", "Redis kill -9 mid-run (AOF, appendfsync always), down 3 s, restarted")
async def t_redis_restart(ctx):
    st = ctx.stack
    await ctx.wait_progress(0.35)
    ctx.say("fault: kill -9 Redis (load %.0f%%)", 100 * ctx.load_progress())
    t1 = now()
    await ctx.sync(st.redis.kill9)
    await asyncio.sleep(3.0)
    t2 = now()
    await ctx.sync(st.redis.start)
    ctx.say("Redis restarted")
    ok = await wait_log_count(ctx, "store: connected", 2, timeout=15)
    ctx.check(ok, "receiptd did not log 'store: connected' again within 15 s of the Redis restart")
    ctx.say("receiptd reconnected to Redis")
    t3 = now()
    ctx.outages.append((t1, t2, "Redis down"))
    mx = ctx.check_rss_during(t1, t3, "the Redis outage")
    werr = ctx.wait_errors_during(t1, t3 + 0.5)
    acked = ctx.stored_during(t1 + 0.5, t2)
    ctx.check(werr > 0, "no wait errors to senders while Redis was down")
    ctx.check(acked == 0, "%d <stored/> acks while Redis was down", acked)
    ctx.say("outage: max VmRSS %s kB, %d wait errors, %d <stored/> during it", mx, werr, acked)
    ctx.faults_done += 1
    ctx.last_fault_at = now()


@fault_test("redis-pause", "Redis SIGSTOP for 5 s mid-run, then SIGCONT ([redis] timeout = 2)",
            extra={"redis": {"timeout": "2"}})
async def t_redis_pause(ctx):
    st = ctx.stack
    await ctx.wait_progress(0.35)
    ctx.say("fault: SIGSTOP Redis (load %.0f%%)", 100 * ctx.load_progress())
    t1 = now()
    st.sigstop_redis()
    await asyncio.sleep(5.0)
    st.sigcont_redis()
    t2 = now()
    ctx.say("SIGCONT Redis")
    ok = await wait_log_count(ctx, "store: connected", 2, timeout=15)
    ctx.check(ok, "receiptd did not log 'store: connected' again within 15 s of SIGCONT")
    t3 = now()
    ctx.outages.append((t1, t2, "Redis paused"))
    mx = ctx.check_rss_during(t1, t3, "the Redis pause")
    werr = ctx.wait_errors_during(t1, t3 + 0.5)
    # the first 2 s (the [redis] timeout) are allowed to hold requests; after that nothing is acked
    acked = ctx.stored_during(t1 + 0.3, t2 - 0.1)
    ctx.check(werr > 0, "no wait errors to senders while Redis was paused")
    ctx.check(acked == 0, "%d <stored/> acks while Redis was paused", acked)
    ctx.check(st.receiptd.count_in_log("did not answer in time") >= 1,
              "receiptd did not log that Redis did not answer in time")
    ctx.say("pause: max VmRSS %s kB, %d wait errors, %d <stored/> during it", mx, werr, acked)
    ctx.faults_done += 1
    ctx.last_fault_at = now()


@fault_test("server-restart", "the XMPP server restarted twice mid-run; clients reconnect, re-announce, resend")
async def t_prosody_restart(ctx):
    st = ctx.stack
    for i, p in enumerate((0.3, 0.65)):
        await ctx.wait_progress(p)
        ctx.say("fault %d: restart Prosody (load %.0f%%)", i + 1, 100 * ctx.load_progress())
        await ctx.sync(st.prosody.restart)
        ctx.say("Prosody up again")
        ok = await wait_log_count(ctx, "link: authenticated", i + 2, timeout=15)
        ctx.check(ok, "receiptd did not log 'link: authenticated' again within 15 s of Prosody restart %d",
                  i + 1)
        for r in ctx.recipients.values():
            await r.wait_connected(15)
        ctx.faults_done += 1
        ctx.last_fault_at = now()
    ctx.check(st.receiptd.count_in_log("store: connected") >= 1, "no 'store: connected'")


@fault_test("fetch-drop", "r1 stays offline for receiptd and fetches/acks during the load; its TCP "
            "connection is cut mid-fetch and mid-ack 6 times; it reconnects, fetches and acks everything")
async def t_fetch_drop(ctx):
    r1 = ctx.recipients["r1"]
    r1.auto_reconnect = False
    modes = ["mid-fetch-response", "after-fetch-sent", "mid-fetch-response", "after-ack-sent",
             "mid-fetch-response", "after-fetch-before-ack"]
    fetched_ok = 0
    for i, mode in enumerate(modes):
        await ctx.wait_progress(0.1 + 0.13 * i)
        await asyncio.sleep(0.3)
        c = r1.client
        try:
            # a normal page or two first, acked, so the drops happen with a moving queue
            items, complete, last = await r1.fetch_page(maxn=50)
            for sid, sender, mid in items:
                r1.record("fetch", sid, sender, mid)
            if items:
                await r1.ack([s for s, _, _ in items])
                fetched_ok += len(items)
            if mode == "mid-fetch-response":
                c.abort_on_next_read = True
                c.send_iq_noreply("get", COMPONENT, "<fetch xmlns='%s' max='100'/>" % NS_RD)
                await c.drain()
                t_end = now() + 5
                while c.connected and now() < t_end:
                    await asyncio.sleep(0.01)
            elif mode == "after-fetch-sent":
                c.send_iq_noreply("get", COMPONENT, "<fetch xmlns='%s' max='100'/>" % NS_RD)
                await c.drain()
                c.abort()
            elif mode == "after-ack-sent":
                items, _, _ = await r1.fetch_page(maxn=100)
                for sid, sender, mid in items:
                    r1.record("fetch", sid, sender, mid)
                c.send_iq_noreply("set", COMPONENT, "<ack xmlns='%s'>%s</ack>" % (
                    NS_RD, "".join("<item id=%s/>" % attr(s) for s, _, _ in items) or "<item id='0-0'/>"))
                await c.drain()
                c.abort()
            elif mode == "after-fetch-before-ack":
                items, _, _ = await r1.fetch_page(maxn=100)
                for sid, sender, mid in items:
                    r1.record("fetch", sid, sender, mid)
                c.abort()
        except (Disconnected, asyncio.TimeoutError) as e:
            ctx.say("r1 lost its connection on its own during %s: %s", mode, e)
        ctx.check(not c.connected, "drop %d (%s): r1 still connected", i + 1, mode)
        ctx.say("drop %d: %s (load %.0f%%, %s)", i + 1, mode, 100 * ctx.load_progress(),
                getattr(c, "last_disconnect_reason", "?"))
        await asyncio.sleep(random.random() * 0.5)
        await r1.connect(announce=False)
        ctx.faults_done += 1
        ctx.last_fault_at = now()
    ctx.say("r1 fetched+acked %d items between drops", fetched_ok)


# ---------------------------------------------------------------- hot standby

TAKEOVER_LIMIT_S = 5.0
STANDBY_LINE = "another component holds the link"


def log_lines(rd, needle):
    """(wall-clock epoch seconds, line) of every line of rd's current log containing needle."""
    import calendar
    out = []
    try:
        text = open(rd.log, "rb").read().decode("utf-8", "replace")
    except (OSError, TypeError):
        return out
    for line in text.splitlines():
        if needle in line:
            m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z ", line)
            if m:
                t = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) + int(m.group(2)) / 1000.0
                out.append((t, line))
    return out


def attached(rd):
    """True if rd's log says its link is up: its last 'link: authenticated' came after its last
    'link: lost connection' (a standby that was only refused has no 'authenticated' at all)."""
    ups = log_lines(rd, "link: authenticated")
    downs = log_lines(rd, "link: lost connection")
    return rd.alive() and bool(ups) and (not downs or ups[-1][0] >= downs[-1][0])


def redis_pipeline(port, cmds):
    """Send several Redis commands on one connection; returns their parsed replies (lists for
    arrays, int, str, None). Errors raise HarnessError."""
    import socket
    payload = b""
    for args in cmds:
        payload += b"*%d\r\n" % len(args)
        for a in args:
            a = str(a).encode()
            payload += b"$%d\r\n%s\r\n" % (len(a), a)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        f = sock.makefile("rb")

        def reply():
            line = f.readline().rstrip(b"\r\n")
            kind, rest = line[:1], line[1:].decode()
            if kind == b"+":
                return rest
            if kind == b"-":
                raise harness.HarnessError("redis: %s" % rest)
            if kind == b":":
                return int(rest)
            if kind == b"$":
                n = int(rest)
                return None if n < 0 else f.read(n + 2)[:-2].decode("utf-8", "replace")
            if kind == b"*":
                n = int(rest)
                return None if n < 0 else [reply() for _ in range(n)]
            raise harness.HarnessError("redis: unexpected reply %r" % line)
        return [reply() for _ in cmds]


INDEX_SHARDS = 16       # storage/slots.h: the cross-user indexes are rd:{#0}: .. rd:{#15}:


def redis_state_sync(port):
    """The delivery state Redis holds for the recipients: pending sids, offline count, blobs, and
    the users left in the retransmission index (rd:{#N}:due, summed over the shards)."""
    cmds = []
    for r in RECIPIENTS:
        p = "rd:{%s@%s}" % (r, DOMAIN)
        cmds += [("ZRANGE", p + ":p", 0, -1), ("ZCARD", p + ":q"), ("HLEN", p + ":m")]
    cmds += [("ZCARD", "rd:{#%d}:due" % n) for n in range(INDEX_SHARDS)]
    res = redis_pipeline(port, cmds)
    st = {"pending": {}, "q": 0, "m": 0, "due": sum(res[3 * len(RECIPIENTS):])}
    for i, r in enumerate(RECIPIENTS):
        # members of P:p are "<stanza-id> <resource>" (one pending delivery per device)
        st["pending"][r] = [m.split(" ", 1)[0] for m in res[3 * i]]
        st["q"] += res[3 * i + 1]
        st["m"] += res[3 * i + 2]
    return st


def cluster_state_sync(cluster):
    """redis_state_sync() on a Redis Cluster: each key on the master serving it."""
    st = {"pending": {}, "q": 0, "m": 0, "pw": 0, "due": 0}
    for r in RECIPIENTS:
        p = "rd:{%s@%s}" % (r, DOMAIN)
        st["pending"][r] = [m.split(" ", 1)[0] for m in cluster.command_key(p, "ZRANGE", p + ":p", 0, -1)]
        st["q"] += cluster.command_key(p, "ZCARD", p + ":q")
        st["m"] += cluster.command_key(p, "HLEN", p + ":m")
        st["pw"] += cluster.command_key(p, "HLEN", p + ":pw")
    for n in range(INDEX_SHARDS):
        k = "rd:{#%d}:due" % n
        st["due"] += cluster.command_key(k, "ZCARD", k)
    return st


async def redis_state(ctx):
    if ctx.stack.cluster is not None:
        return await ctx.sync(cluster_state_sync, ctx.stack.cluster)
    return await ctx.sync(redis_state_sync, ctx.stack.redis.port)


@fault_test("standby", "hot standby: a second receiptd with the same component.ini; kill -9 of the "
            "attached one mid-run; on Prosody the standby (refused until then) must take over within "
            "%g s and resend what was pending; on ejabberd (both attached) the other carries on"
            % TAKEOVER_LIMIT_S)
async def t_standby(ctx):
    st = ctx.stack
    server = harness.server_name()
    a = st.receiptd
    b = st.add_receiptd("receiptd-standby")
    t_b = now()
    if server == "prosody":
        # Prosody refuses the second connection (stream error <conflict/>): b keeps retrying
        await ctx.sync(b._spawn)
        await ctx.sync(b.wait_log, STANDBY_LINE, 1, 15)
        await ctx.sync(b.wait_log, "store: connected", 1, 15)
        ctx.say("standby refused by the server and retrying: %s", log_lines(b, STANDBY_LINE)[0][1])
    else:
        # ejabberd accepts both and splits the traffic between them
        await ctx.sync(b.start)
        ctx.say("second receiptd attached too")
    both = [a, b]
    up = [rd for rd in both if attached(rd)]
    if server == "prosody":
        if len(up) != 1:
            raise AssertionError("expected exactly one attached receiptd on Prosody, logs say %s"
                                 % [rd.name for rd in up])
    else:
        if len(up) != 2:
            raise AssertionError("expected both receiptd attached on ejabberd, logs say %s"
                                 % [rd.name for rd in up])
        random.shuffle(up)
    victim = up[0]
    survivor = b if victim is a else a
    # let the standby settle into its steady retry rhythm (backoff at its cap) under load
    await ctx.wait_progress(0.4)
    while now() - t_b < 5.0:
        await asyncio.sleep(0.05)
    await asyncio.sleep(random.random() * 0.5)
    # r1 stops answering pushes for a moment before the kill, so that deliveries are surely pending
    # in Redis when the instance dies (the <received/> of the last ones would die with it anyway)
    r1 = ctx.recipients["r1"]
    r1.withhold = True
    await asyncio.sleep(0.6)
    ctx.say("fault: kill -9 the attached receiptd %s (pid %d, load %.0f%%)", victim.name,
            victim.popen.pid, 100 * ctx.load_progress())
    t_kill_wall, t_kill = time.time(), now()
    await ctx.sync(victim.kill9)
    r1.withhold = False
    # from here on the survivor is "the" receiptd of the stack (RSS, final SIGTERM, alive check)
    st.receiptd = survivor
    pending_at_kill = await redis_state(ctx)
    n_pending = sum(len(v) for v in pending_at_kill["pending"].values())
    ctx.say("Redis after the kill: %d pending deliveries, %d offline, %d users due", n_pending,
            pending_at_kill["q"], pending_at_kill["due"])
    info = {}
    if server == "prosody":
        end = now() + 15
        while not log_lines(survivor, "link: authenticated"):
            if not survivor.alive():
                raise AssertionError("the standby exited (code %s)" % survivor.popen.poll())
            if now() > end:
                raise AssertionError("the standby did not take over within 15 s of the kill")
            await asyncio.sleep(0.02)
        t_auth_wall = log_lines(survivor, "link: authenticated")[0][0]
        takeover = t_auth_wall - t_kill_wall
        t_auth = t_kill + takeover
        ctx.say("standby took over: 'link: authenticated' %.3f s after the kill", takeover)
        ctx.check(takeover <= TAKEOVER_LIMIT_S, "takeover took %.3f s (limit %g s)", takeover,
                  TAKEOVER_LIMIT_S)
        # a quiet standby: while refused, one line (then once a minute) and nothing else above INFO
        refused = log_lines(survivor, STANDBY_LINE)
        ctx.check(len(refused) == 1, "the standby logged %d '%s' lines in %.0f s (want 1: once a minute)",
                  len(refused), STANDBY_LINE, t_auth_wall - refused[0][0] if refused else 0)
        noisy = [ln for t, ln in log_lines(survivor, " WARN ") + log_lines(survivor, " ERROR ")
                 if t < t_auth_wall and STANDBY_LINE not in ln]
        ctx.check(not noisy, "the standby logged warnings/errors while standing by: %s", noisy[:5])
        info["takeover"] = takeover
        t_ref = t_auth
    else:
        ctx.check(len(log_lines(survivor, "link: authenticated")) == 1
                  and not log_lines(survivor, "link: lost connection"),
                  "the surviving receiptd on ejabberd lost or re-made its link")
    # the survivor carries the load: <stored/> acks flow again (on ejabberd, not counting the
    # dead one's last acks that were still on their way at the kill)
    def stored_between(t1, t2):
        return [m.stored_at for s in ctx.senders for m in s.msgs.values()
                if m.stored_at is not None and t1 < m.stored_at <= t2]
    if server == "prosody":
        end = now() + 10
        while not stored_between(t_ref, now()) and now() < end and not all(s.done() for s in ctx.senders):
            await asyncio.sleep(0.02)
        after = stored_between(t_ref, now())
        ctx.check(bool(after), "no <stored/> within 10 s of the takeover")
        if after:
            info["first_stored"] = min(after) - t_kill
            ctx.say("first <stored/> after the takeover: %.3f s after the kill", info["first_stored"])
    else:
        while now() < t_kill + 2.5:
            await asyncio.sleep(0.05)
        info["carried"] = len(stored_between(t_kill + 0.5, t_kill + 2.5))
        ctx.check(info["carried"] > 0 or all(s.done() for s in ctx.senders),
                  "no <stored/> from the survivor 0.5-2.5 s after the kill")
        ctx.say("%d <stored/> 0.5-2.5 s after the kill (the survivor carries on)", info["carried"])
    ctx.faults_done += 1
    ctx.last_fault_at = now()

    async def after_load(ctx):
        # everything that was pending when the active instance died was handled by the survivor
        pend = {(r, sid) for r, sids in pending_at_kill["pending"].items() for sid in sids}
        withheld = {("r1", sid) for sid in r1.withheld} & pend
        ctx.check(withheld, "no delivery whose <received/> r1 withheld was pending at the kill")
        if server == "prosody":
            # nothing can be acked between the kill and the takeover (no component attached), so
            # each delivery pending at the kill must reach its recipient again from the standby
            # (retransmitted live, or moved to the offline queue and fetched)
            # (a push of the dead one that the server delivered only after the kill counts too:
            # its <received/> bounced unless it reached the standby after the takeover)
            again = {(r.user, d[1]) for r in ctx.recipients.values() for d in r.deliveries
                     if d[4] >= t_kill}
            missing = sorted(pend - again)
            ctx.check(not missing, "%d deliveries pending at the kill were never resent by the standby: %s",
                      len(missing), missing[:10])
        else:
            # both were attached: the survivor may have had acks of its own pushes in flight at
            # the kill, so only the withheld ones must come again (nobody ever acked them)
            again = {(r.user, d[1]) for r in ctx.recipients.values() for d in r.deliveries
                     if d[4] >= t_kill}
            missing = sorted(withheld - again)
            ctx.check(not missing, "%d deliveries pending (unacked) at the kill were never resent by "
                      "the survivor: %s", len(missing), missing[:10])
        info["redelivered"] = len(pend & again)
        # and Redis ends clean: nothing pending, queued, stored or scheduled is left behind
        await wait_redis_clean(ctx)
        ctx.extra_counts["STANDBY"] = (
            "server=%s killed=%s survivor=%s takeover=%s first-stored-after-takeover=%s "
            "pending-at-kill=%d redelivered-by-survivor=%d" % (
                server, victim.name, survivor.name,
                "%.3fs" % info["takeover"] if "takeover" in info else "n/a(both-attached)",
                "%.3fs" % info["first_stored"] if "first_stored" in info else
                "n/a(%d-stored-0.5..2.5s-after-kill)" % info["carried"] if "carried" in info else "none",
                n_pending, info["redelivered"]))

    ctx.post_checks.append(after_load)


# ---------------------------------------------------------------- Redis Cluster

def hot_keys():
    """A key (hash tag) of every slot receiptd writes to in these tests: the users' state
    rd:{bare}:..., the 16 index shards rd:{#N}:..., the link epoch rd:epoch."""
    return (["rd:{%s@%s}" % (u, DOMAIN) for u in RECIPIENTS + SENDERS]
            + ["rd:{#%d}" % n for n in range(INDEX_SHARDS)] + ["rd:epoch"])


REDIRECT_ERRORS = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "LOADING", "NOSCRIPT", "READONLY")


def cluster_counters(c):
    """What the live nodes answered, summed: the redirection / error replies (INFO errorstats) and
    ASKING / EVALSHA / WAIT / CLUSTER calls (INFO commandstats). The harness sends no EVALSHA and
    no WAIT, and ASKING only when its own command_key() meets ASK (not during a migration here)."""
    out = collections.Counter()
    for port in c.live_ports():
        try:
            for k, v in c.info(port, "errorstats").items():
                kind = k[len("errorstat_"):]
                if kind in REDIRECT_ERRORS:
                    out[kind] += int(v.split("=", 1)[1])
            for k, v in c.info(port, "commandstats").items():
                cmd = k[len("cmdstat_"):]
                if cmd in ("asking", "evalsha", "wait", "cluster|slots", "cluster|shards", "cluster|nodes"):
                    out[cmd] += int(dict(x.split("=", 1) for x in v.split(","))["calls"])
        except (OSError, harness.HarnessError, Exception):
            continue
    return out


def counters_text(before, after):
    keys = sorted(set(before) | set(after))
    return " ".join("%s=%d" % (k, after[k] - before[k]) for k in keys if after[k] - before[k])


def misplaced_keys(c):
    """Keys stored on a master that does not serve their slot (left behind by a migration)."""
    clmod = harness.load_cluster_module()
    smap = c.slot_map()
    bad = []
    for port in c.masters():
        for k in c.scan_keys(port):
            if smap[clmod.key_slot(k)] != port:
                bad.append("%s on %d (slot %d served by %s)" % (k, port, clmod.key_slot(k),
                                                               smap[clmod.key_slot(k)]))
    return bad


async def wait_redis_clean(ctx, timeout=15):
    """Drain the recipients' queues until nothing is pending, queued, stored or due for them."""
    end = now() + timeout
    while True:
        for r in ctx.recipients.values():
            try:
                await r.drain_queue()
            except (Disconnected, asyncio.TimeoutError, IqFailed) as e:
                ctx.say("drain %s: %s", r.user, e)
        rs = await redis_state(ctx)
        clean = (not any(rs["pending"].values()) and rs["q"] == 0 and rs["m"] == 0
                 and rs.get("pw", 0) == 0 and rs["due"] == 0)
        if clean or now() > end:
            break
        await asyncio.sleep(0.5)
    ctx.check(clean, "delivery state left in Redis after the run: pending %s, offline %d, "
              "blobs %d, windows %d, due %d", {k: len(v) for k, v in rs["pending"].items()}, rs["q"],
              rs["m"], rs.get("pw", 0), rs["due"])
    return clean


RESHARD_PLAIN = 150          # slots without keys moved along per master and round
RESHARD_BATCH = 20           # keys per MIGRATE
RESHARD_PAUSE = 0.005        # s after each MIGRATE: a slot with keys stays half-moved for a while


@fault_test("cluster-reshard", "Redis Cluster (3 masters + 3 replicas): twice during the load every "
            "master hands its slots holding the test's keys (users, the 16 index shards, rd:epoch) and "
            "%d other slots to the next master, live (MIGRATE in batches of %d: clients meet MOVED, ASK "
            "and TRYAGAIN)" % (RESHARD_PLAIN, RESHARD_BATCH), n=1500, cluster=True)
async def t_cluster_reshard(ctx):
    c = ctx.stack.cluster
    clmod = harness.load_cluster_module()
    hot = {clmod.key_slot(k) for k in hot_keys()}
    before = await ctx.sync(cluster_counters, c)
    info = {"slots": 0, "keys": 0, "hot_moves": 0, "hot_keys": 0, "longest": (0.0, None, 0), "secs": [],
            "hot_secs": 0.0}
    for rnd, at in enumerate((0.1, 0.4)):
        await ctx.wait_progress(at)
        masters = await ctx.sync(c.masters)
        plan = []
        for i, src in enumerate(masters):
            dst = masters[(i + 1) % len(masters)]
            own = await ctx.sync(c.slots_of, src)
            mine = [x for x in own if x in hot]
            plain = [x for x in own if x not in hot][rnd::3][:RESHARD_PLAIN]   # scattered slots
            half = len(plain) // 2
            plan.append((src, dst, plain[:half] + mine + plain[half:], mine))
        ctx.say("reshard round %d (load %.0f%%): %s", rnd + 1, 100 * ctx.load_progress(),
                "; ".join("%d -> %d: %d slots, %d with our keys" % (a, b, len(sl), len(m))
                          for a, b, sl, m in plan))
        t0 = now()
        for src, dst, slots, mine in plan:
            def on_slot(slot, nkeys, t1, t2):
                if slot in hot:
                    info["hot_moves"] += 1
                    info["hot_keys"] += nkeys
                    info["hot_secs"] += t2 - t1
                    if t2 - t1 > info["longest"][0]:
                        info["longest"] = (t2 - t1, slot, nkeys)
            moved = await ctx.sync(lambda: c.migrate_slots(src, dst, slots, batch=RESHARD_BATCH,
                                                           pause=RESHARD_PAUSE, on_slot=on_slot))
            info["slots"] += len(slots)
            info["keys"] += moved
        await c.wait_ok_async(timeout=20)
        await ctx.sync(c.refresh_slots)
        info["secs"].append(now() - t0)
        ctx.say("reshard round %d done in %.2fs (load %.0f%%)", rnd + 1, now() - t0,
                100 * ctx.load_progress())
        ctx.faults_done += 1
        ctx.last_fault_at = now()
    ctx.check(info["hot_moves"] == 2 * len(hot), "moved %d slots with our keys, want %d (each of %d "
              "twice)", info["hot_moves"], 2 * len(hot), len(hot))
    ctx.check(info["hot_keys"] > 0, "the resharding moved no key of the test (nothing was live?)")

    async def after_load(ctx):
        await wait_redis_clean(ctx)
        bad = await ctx.sync(misplaced_keys, c)
        ctx.check(not bad, "%d keys on a master that does not serve their slot: %s", len(bad), bad[:5])
        ok, why = await ctx.sync(c.check_state)
        ctx.check(ok, "cluster not ok at the end: %s", why)
        after = await ctx.sync(cluster_counters, c)
        # the test's own client sends no keyed command while slots move: these are receiptd's
        ctx.check(after["ASK"] + after["MOVED"] > before["ASK"] + before["MOVED"],
                  "receiptd met no ASK or MOVED during the resharding (did it reach the moved slots?)")
        ctx.extra_counts["CLUSTER"] = (
            "reshard rounds=2 slots-moved=%d keys-moved=%d slots-with-test-keys=%d(x2) "
            "their-keys-moved=%d longest-slot-move=%.2fs(slot %s, %d keys) round-times=%s (%.1fs in "
            "slots with keys) | redis saw: %s"
            % (info["slots"], info["keys"], len(hot), info["hot_keys"], info["longest"][0],
               info["longest"][1], info["longest"][2], "/".join("%.1fs" % x for x in info["secs"]),
               info["hot_secs"],
               counters_text(before, after) or "nothing"))
    ctx.post_checks.append(after_load)


FAILOVER_HOLD_S = 4.0        # s the promoted master runs without a replica before the old one returns
FAILOVER_WAIT_TIMEOUT = 1.0  # [redis] wait_timeout of the test
ANSWER_SLACK_S = 1.0         # a put gets its answer within wait_timeout + this; a read within this


@fault_test("cluster-failover", "Redis Cluster (3+3, cluster-node-timeout 1 s), [redis] wait_replicas = 1, "
            "wait_timeout = %g: kill -9 of the master serving the recipients mid-run; its replica is "
            "promoted and runs %g s without a replica (puts get wait errors within wait_timeout, reads "
            "answer), then the killed node returns as its replica; every <stored/> message survives"
            % (FAILOVER_WAIT_TIMEOUT, FAILOVER_HOLD_S),
            extra={"redis": {"wait_replicas": "1", "wait_timeout": "%g" % FAILOVER_WAIT_TIMEOUT}},
            cluster=True)
async def t_cluster_failover(ctx):
    c = ctx.stack.cluster
    rd = ctx.stack.receiptd
    owners = {r: await ctx.sync(c.owner, "rd:{%s@%s}" % (r, DOMAIN)) for r in RECIPIENTS}
    victim = owners[RECIPIENTS[0]]
    on_victim = [k for k in hot_keys() if await ctx.sync(c.owner, k) == victim]
    mine = {"%s@%s" % (r, DOMAIN) for r, p in owners.items() if p == victim}
    ctx.say("the master on %d serves %s (recipients: %s)", victim, ", ".join(on_victim), sorted(mine))
    before = await ctx.sync(cluster_counters, c)
    log_before = len(rd.log_text())
    await ctx.wait_progress(0.3)
    ctx.say("fault: kill -9 the master on %d (load %.0f%%)", victim, 100 * ctx.load_progress())
    t_kill = now()
    new = await ctx.sync(c.kill_master, victim)
    ph = c.last_failover
    t_promoted = t_kill + ph["promoted"]
    ctx.say("replica on %d promoted %.2fs after the kill (fail flag %.2fs, cluster ok %.2fs)", new,
            ph["promoted"], ph.get("fail", -1), ph["ok"])

    # while the promoted master has no replica: r1 asks for its summary (a read in its slot, on that
    # master) every 0.5 s; the load goes on (every put there must end in a wait error)
    probes = []
    r1 = ctx.recipients[RECIPIENTS[0]]
    t_hold_end = t_promoted + FAILOVER_HOLD_S

    async def probe(t_q):
        try:
            res = await r1.client.iq("get", COMPONENT, "<summary xmlns='%s'/>" % NS_RD, timeout=6)
            probes.append((t_q, now() - t_q, res.get("type")))
        except (Disconnected, asyncio.TimeoutError):
            probes.append((t_q, now() - t_q, "no answer"))
    tasks = []
    blocked = None
    while now() < t_hold_end:
        if now() >= t_promoted + 0.5:
            tasks.append(asyncio.get_running_loop().create_task(probe(now())))
        if blocked is None and now() >= t_promoted + 1.5:
            # what the promoted master's clients are doing (diagnostics for the checks below)
            try:
                cl = await ctx.sync(c.command, new, "CLIENT", "LIST")
                blocked = [" ".join(f for f in ln.split() if f.split("=", 1)[0] in (
                    "id", "flags", "cmd", "qbuf", "multi", "age")) for ln in cl.splitlines()
                    if "cmd=wait" in ln or " flags=b" in ln]
            except Exception as e:
                blocked = ["CLIENT LIST failed: %s" % e]
        await asyncio.sleep(0.5)
    t_restart = now()
    if blocked:
        ctx.say("clients of the promoted master %d blocked %.1fs after the promotion: %s", new, 1.5,
                "; ".join(blocked))
    await ctx.sync(c.restart_node, victim)
    t_back = now()
    ctx.say("the killed node is back as a replica of %d (%.2fs)", new, t_back - t_restart)
    await asyncio.gather(*tasks)
    ctx.faults_done += 1
    ctx.last_fault_at = now()

    def stored_between(t1, t2):
        return sorted((m.stored_at, s.user, m.mid) for s in ctx.senders for m in s.msgs.values()
                      if m.to in mine and m.stored_at is not None and t1 < m.stored_at < t2)
    # wait errors while the master was down (before its replica took over) or alone
    werr = ctx.wait_errors_during(t_kill, t_back + 1.0)
    ctx.check(werr > 0, "no wait errors (internal-server-error) to senders while the master was down "
              "or without a replica")
    # wait_replicas = 1: nothing for its slots is acked while the promoted master has no replica
    lonely = stored_between(t_promoted + 0.2, t_restart)
    ctx.check(not lonely, "%d <stored/> for messages to %s while their master (%d) had no replica "
              "(wait_replicas = 1), first: %s", len(lonely), sorted(mine), new,
              ["%s/%s at +%.2fs after the promotion" % (u, mid, t - t_promoted) for t, u, mid in lonely[:5]])
    # ... and each such put is answered (wait error) within wait_timeout (+ slack), not queued
    put_limit = FAILOVER_WAIT_TIMEOUT + ANSWER_SLACK_S
    lat = []
    for s in ctx.senders:
        for m in s.msgs.values():
            if m.to not in mine:
                continue
            for ts in m.tx:
                if t_promoted + 0.5 <= ts <= t_restart - put_limit:
                    later = [a for a in m.answers if a >= ts]
                    lat.append((min(later) - ts if later else None, ts, s.user, m.mid))
    slow = [x for x in lat if x[0] is None or x[0] > put_limit]
    ctx.say("%d messages to %s sent %.1f-%.1fs after the promotion: %d answered within %.1fs, %d later "
            "or never; summary IQs of r1 then: %s", len(lat), sorted(mine), 0.5,
            t_restart - put_limit - t_promoted, len(lat) - len(slow), put_limit, len(slow),
            ", ".join("+%.1fs:%s/%s" % (t - t_promoted, "%.2fs" % d, k) for t, d, k in sorted(probes)))
    ctx.check(lat, "no message to %s was sent while the promoted master had no replica (test timing)",
              sorted(mine))
    ctx.check(not slow, "%d of %d puts to the promoted master without a replica got no answer within "
              "wait_timeout + %gs = %gs (first: %s; its blocked clients then: %s)", len(slow), len(lat),
              ANSWER_SLACK_S, put_limit,
              ["%s/%s sent +%.2fs after the promotion: %s" % (u, mid, ts - t_promoted,
                                                               "%.2fs" % d if d is not None else "no answer")
               for d, ts, u, mid in sorted(slow, key=lambda x: x[1])[:5]], blocked)
    slow_q = [(t, d, k) for t, d, k in probes if k != "result" or d > ANSWER_SLACK_S]
    ctx.check(probes and not slow_q, "%d of %d summary IQs of r1 (a read on the promoted master without "
              "a replica) not answered with a result within %gs: %s", len(slow_q), len(probes),
              ANSWER_SLACK_S, ["+%.1fs: %s after %.2fs" % (t - t_promoted, k, d) for t, d, k in slow_q[:6]])
    info = {"werr": werr, "lonely": len(lonely), "puts": len(lat), "slow": len(slow),
            "probes": len(probes), "slow_q": len(slow_q)}

    async def after_load(ctx):
        # acks flow again once the replica is back
        again = stored_between(t_back, now())
        ctx.check(again or all(s.done() for s in ctx.senders),
                  "no <stored/> for messages to %s after the killed node came back as a replica", sorted(mine))
        await wait_redis_clean(ctx)
        ok, why = await ctx.sync(c.check_state)
        ctx.check(ok, "cluster not ok at the end: %s", why)
        after = await ctx.sync(cluster_counters, c)
        lines = [ln for ln in rd.log_text()[log_before:].splitlines() if " store: " in ln]
        down = [ln for ln in lines if "unavailable" in ln]
        up = [ln for ln in lines if "store: connected" in ln]
        ctx.say("receiptd's store log since the kill:\n    %s", "\n    ".join(lines[:10]))
        ctx.check(down and up, "receiptd did not log the loss of the master and the reconnection "
                  "('store: ... unavailable' then 'store: connected'): %s", lines[:5])
        ctx.extra_counts["CLUSTER"] = (
            "failover killed=%d promoted=%d fail-flag=%.2fs promoted-after=%.2fs cluster-ok-after=%.2fs "
            "replica-back-after=%.2fs wait-errors=%d stored-without-replica=%d "
            "puts-without-replica=%d(%d-not-answered-in-%gs) summary-probes=%d(%d-slow) "
            "| redis saw: %s"
            % (victim, new, ph.get("fail", -1), ph["promoted"], ph["ok"], t_back - t_kill, info["werr"],
               info["lonely"], info["puts"], info["slow"], put_limit, info["probes"], info["slow_q"],
               counters_text(before, after) or "nothing"))
    ctx.post_checks.append(after_load)


async def run_test(name, stack, sabotage=False, seed=None):
    spec = TESTS[name]
    rnd_seed = seed if seed is not None else int(time.time() * 1000) % 100000
    random.seed(rnd_seed)
    spec = dict(spec)
    # soak / throughput experiments: FAULTS_N (messages per sender), FAULTS_RATE (msg/s in total)
    spec["n"] = int(os.environ.get("FAULTS_N", spec["n"]))
    spec["rate"] = float(os.environ.get("FAULTS_RATE", spec["rate"]))
    ctx = Ctx(stack, spec["n"], spec["rate"], sabotage=sabotage)
    ctx.say("seed %d; %d senders x %d messages at %d msg/s to %s", rnd_seed, len(SENDERS), spec["n"],
            spec["rate"], ", ".join(RECIPIENTS))
    mon = asyncio.get_running_loop().create_task(ctx.rss_monitor())
    try:
        for u in RECIPIENTS:
            r = Recipient(ctx, u, announce=not (name == "fetch-drop" and u == "r1"))
            await r.connect()
            ctx.recipients[u] = r
        # the announcements must be processed before the load starts
        await ctx.recipients[RECIPIENTS[-1]].client.iq("get", COMPONENT, "<ping xmlns='urn:xmpp:ping'/>")
        ctx.senders = [Sender(ctx, u, spec["n"], spec["rate"] / len(SENDERS)) for u in SENDERS]
        load_deadline = now() + 45
        load = [asyncio.get_running_loop().create_task(s.run(load_deadline)) for s in ctx.senders]

        async def sab():
            await ctx.wait_progress(0.5)
            await ctx.sabotage_once()

        tasks = [asyncio.get_running_loop().create_task(spec["fn"](ctx))]
        if sabotage:
            tasks.append(asyncio.get_running_loop().create_task(sab()))
        await asyncio.gather(*tasks)
        await asyncio.gather(*load)
        ctx.say("load done; settling")
        counts = await ctx.settle_and_check()
        for fn in ctx.post_checks:
            await fn(ctx)
    finally:
        ctx.stopping = True
        ctx.rss_stop = True
        mon.cancel()
        for s in ctx.senders:
            await s.close()
        for r in ctx.recipients.values():
            await r.close()
    # every fault must have been followed by a reconnect of receiptd (checked per test above),
    # and receiptd must still be the process we started last
    rd = stack.receiptd
    ctx.check(rd.alive(), "receiptd is not running at the end (exit code %s)",
              rd.popen.returncode if rd.popen else None)
    # announced recipients must be online for receiptd again after the last fault
    if ctx.last_fault_at is not None:
        for r in ctx.recipients.values():
            if r.announce:
                late = sum(1 for d in r.deliveries if d[0] == "live" and d[4] > ctx.last_fault_at)
                ctx.check(late > 0, "%s got no live push after the last fault (not online for receiptd "
                          "again?)", r.user)
    rss_all = max((kb for _, kb in ctx.rss), default=0)
    ctx.check(rss_all < RSS_LIMIT_KB, "receiptd VmRSS reached %d kB (limit %d)", rss_all, RSS_LIMIT_KB)
    errs = ", ".join("%s/%s=%d" % (k[0], k[1], v) for k, v in sorted(ctx.stats.errors.items(),
                                                                       key=lambda kv: str(kv[0])))
    counts["faults"] = ctx.faults_done
    counts["max_rss_kb"] = rss_all
    counts["errors"] = errs or "none"
    counts["reconnects"] = ctx.stats.reconnects
    counts["announce_waits"] = sum(r.announce_waits for r in ctx.recipients.values())
    return ctx, counts
