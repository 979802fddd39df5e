#!/usr/bin/python3
"""Self-test of tests/cluster/cluster.py against a real 3 masters + 3 replicas Redis Cluster.

    /usr/bin/python3 tests/cluster/selftest.py [--keep] [--seed N]

1. start the cluster; 2. slot computation vs CLUSTER KEYSLOT; 3. 1000 hash-tagged keys through
command_key(); 4. reshard 100 slots (with ~4000 keys) while two writer threads keep writing to
them (RPUSH / SET / INCR / GET, following MOVED and ASK) and check that no write was lost or
doubled; 5. kill -9 a master under load and check what survived: every write acknowledged by
WAIT 1 must, writes acknowledged by the master alone may not (a replica link cut on purpose
before the kill shows it); 6. bring the killed node back as a replica; 7. wait_ok_async() and a small `redis-cli --cluster
reshard`; 8. stop.
Exit 0 when every hard check passed; prints timings and what the clients saw.
"""

import argparse
import asyncio
import collections
import os
import random
import string
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import cluster  # noqa: E402
from cluster import RedisCluster, key_slot, ranges, tags_for_slots, Conn  # noqa: E402

failures = []


def check(cond, fmt, *args):
    msg = fmt % args if args else fmt
    if not cond:
        failures.append(msg)
        print("FAIL: " + msg)
    return cond


def say(fmt, *args):
    print("[selftest %6.2fs] %s" % (time.monotonic() - T0, fmt % args if args else fmt))
    sys.stdout.flush()


T0 = time.monotonic()
INCR_GET = "redis.call('INCR', KEYS[1]); return redis.call('GET', KEYS[2])"


# ---------------------------------------------------------------- phases

def slot_check(c, rnd):
    fixed = {"foo": 12182, "bar": 5061, "{user1000}.following": key_slot("user1000"),
             "{user1000}.followers": key_slot("user1000"), "foo{}{bar}": key_slot("foo{}{bar}"),
             "": 0}
    check(key_slot("foo") == 12182 and key_slot("bar") == 5061, "slot(foo)/slot(bar) constants")
    check(key_slot("{user1000}.following") == key_slot("user1000") == key_slot("{user1000}.followers"),
          "hash tag {user1000}")
    keys = list(fixed) + ["rd:{bob@localhost}:q", "rd:{#3}:due", "rd:{#15}:arch", "rd:epoch",
                          "{}", "{}foo", "foo{}{bar}", "foo{{bar}}zap", "foo{bar}{zap}", "{a}b}",
                          "}{", "{", "}", "rd:{alice@localhost}:dd:bob@localhost/x 17",
                          "h\u00e9llo{\u00fcml\u00e4ut}"]
    alphabet = string.ascii_letters + string.digits + "{}{}@:#.-_ "
    while len(keys) < 400:
        k = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 24)))
        if rnd.random() < 0.3:
            k = "rd:{%s@localhost}:%s" % (k, rnd.choice(["seq", "m", "q", "p", "dev"]))
        keys.append(k)
    port = c.masters()[0]
    got = c.pipeline(port, [("CLUSTER", "KEYSLOT", k) for k in keys], idempotent=True)
    bad = [(k, key_slot(k), g) for k, g in zip(keys, got) if key_slot(k) != g]
    check(not bad, "key_slot() disagrees with CLUSTER KEYSLOT on %d keys: %r", len(bad), bad[:5])
    say("slots: %d keys checked against CLUSTER KEYSLOT, rd:{bob@localhost}:q=%d rd:{#3}:due=%d",
        len(keys), key_slot("rd:{bob@localhost}:q"), key_slot("rd:{#3}:due"))


def write_users(c, expected):
    t = time.monotonic()
    for i in range(1000):
        k = "rd:{user%d@localhost}:seq" % i
        check(c.command_key(k, "SET", k, str(i)) == "OK", "SET %s", k)
        expected[k] = str(i)
    dt = time.monotonic() - t
    per = collections.Counter()
    owners = c.slot_map()
    for k, v in list(expected.items())[-1000:]:
        port = owners[key_slot(k)]
        per[port] += 1
        check(c.command(port, "GET", k) == v, "GET %s on its owner %d", k, port)
    slots = {key_slot(k) for k in expected}
    say("1000 keys over %d slots written one by one in %.2fs (%.2f ms each); per master %s",
        len(slots), dt, dt, dict(per))


class Writer(threading.Thread):
    """Keeps writing until stopped; logs what was acknowledged (and with how many replicas)."""

    def __init__(self, c, name, pick_tag, mode, wait=None, rnd_seed=0):
        super().__init__(name=name, daemon=True)
        self.c, self.pick_tag, self.mode, self.wait = c, pick_tag, mode, wait
        self.stop_flag = threading.Event()
        self.rnd = random.Random(rnd_seed)
        self.acked = []         # (key, op, value, replicas or None, t_done)
        self.unknown = []       # (key, op, value)
        self.errors = []
        self.latencies = []     # (t_start, seconds)
        self.ops = 0

    def run(self):
        i = 0
        while not self.stop_flag.is_set():
            i += 1
            tag = self.pick_tag(self.rnd)
            if self.mode == "mixed":
                op = ("RPUSH", "SET", "EVAL", "GET")[i % 4]
            else:
                op = "SET"
            if op == "RPUSH":
                key, args, val = "{%s}:log" % tag, None, "%s:%d" % (self.name, i)
                args = ("RPUSH", key, val)
            elif op == "SET":
                key = "{%s}:%s:%d" % (tag, self.name, i)
                val = "v%d" % i
                args = ("SET", key, val)
            elif op == "EVAL":       # two keys of one slot, like receiptd's scripts
                key, fkey = "{%s}:ctr" % tag, "{%s}:fill:%d" % (tag, i % 40)
                val = "f" + fkey     # what the script returns (GET of the filler key)
                args = ("EVAL", INCR_GET, 2, key, fkey)
            else:
                key, val = "{%s}:fill:%d" % (tag, i % 40), None
                args = ("GET", key)
            t = time.monotonic()
            try:
                r = self.c.command_key(key, *args, wait=self.wait)
                reps = None
                if self.wait:
                    r, reps = r
                if op == "GET" and r != "f" + key:
                    self.errors.append("GET %s returned %r" % (key, r))
                if op == "EVAL" and r != val:
                    self.errors.append("EVAL on %s returned %r" % (key, r))
                self.acked.append((key, op, val, reps, time.monotonic()))
            except cluster.UnknownOutcome:
                self.unknown.append((key, op, val))
            except Exception as e:     # noqa: BLE001 - reported by the caller
                self.errors.append("%s %s: %r" % (op, key, e))
            self.latencies.append((t, time.monotonic() - t))
            self.ops += 1

    def stop(self):
        self.stop_flag.set()
        self.join(30)


def events_since(c, t0, names=None):
    """{kind: (count, first, last)} seconds after t0, from command_key's event log."""
    out = {}
    for t, kind, port, detail, thread in list(c.events):
        if t < t0 or (names and thread not in names):
            continue
        n, a, b = out.get(kind, (0, None, None))
        out[kind] = (n + 1, t - t0 if a is None else a, t - t0)
    return out


def fmt_events(ev):
    return ", ".join("%s x%d (%.2f..%.2fs)" % (k, n, a, b) for k, (n, a, b) in sorted(ev.items())) or "none"


def reshard_under_load(c, expected, rnd):
    masters = c.masters()
    src, dst = masters[0], masters[1]
    moving = c.slots_of(src)[:100]
    tags = tags_for_slots(moving, prefix="mv")
    # ~40 keys in each slot that moves, so that the slots take a while to empty
    fill = []
    for s in moving:
        for j in range(40):
            k = "{%s}:fill:%d" % (tags[s], j)
            fill.append((k, ("SET", k, "f" + k)))
            expected[k] = "f" + k
    t = time.monotonic()
    c.pipeline_keys(fill)
    say("%d filler keys in the 100 slots to move, pipelined in %.2fs", len(fill), time.monotonic() - t)
    moving_tags = [tags[s] for s in moving]
    writers = [Writer(c, "w%d" % k, lambda r: r.choice(moving_tags), "mixed", rnd_seed=rnd.random())
               for k in range(2)]
    for w in writers:
        w.start()
    time.sleep(0.3)
    t_start = time.monotonic()
    # batches of 10 keys: a slot is half moved for a while (multi-key commands get TRYAGAIN)
    slots, nkeys, dt = c.reshard(100, src, dst, slots=moving, batch=10)
    time.sleep(0.3)
    for w in writers:
        w.stop()
    ev = events_since(c, t_start)
    ops = sum(w.ops for w in writers)
    say("resharded %s (%d keys) %d -> %d in %.2fs while %d writers did %d ops; clients saw: %s",
        ranges(slots), nkeys, src, dst, dt, len(writers), ops, fmt_events(ev))
    lat = sorted(l for w in writers for _, l in w.latencies)
    say("writer op latency during reshard: median %.2f ms, p99 %.2f ms, max %.2f ms",
        lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3, lat[-1] * 1e3)
    for w in writers:
        check(not w.errors, "writer %s errors during reshard: %s", w.name, w.errors[:5])
        check(not w.unknown, "writer %s unknown outcomes during reshard: %s", w.name, w.unknown[:5])
    check(ops > 200, "writers made only %d ops during the reshard", ops)
    check(ev.get("MOVED", (0,))[0] > 0, "no MOVED seen during reshard")

    # expected content: lists, counters, SET keys
    logs = collections.defaultdict(list)
    ctrs = collections.Counter()
    for w in writers:
        for key, op, val, _, _ in w.acked:
            if op == "RPUSH":
                logs[key].append(val)
            elif op == "EVAL":
                ctrs[key] += 1
            elif op == "SET":
                expected[key] = val
    lost = dup = 0
    for key, vals in logs.items():
        got = c.command_key(key, "LRANGE", key, 0, -1)
        if collections.Counter(got) != collections.Counter(vals):
            lost += len(set(vals) - set(got))
            dup += len(got) - len(set(got))
        for w in writers:      # each writer's own pushes keep their order
            mine = [v for v in got if v.startswith(w.name + ":")]
            check(mine == [v for v in vals if v.startswith(w.name + ":")], "order of %s in %s", w.name, key)
    for key, n in ctrs.items():
        got = int(c.command_key(key, "GET", key))
        check(got == n, "INCR %s: %d acknowledged, value %d", key, n, got)
    check(lost == 0 and dup == 0, "RPUSH lists: %d lost, %d duplicated", lost, dup)
    for key in list(logs) + list(ctrs):
        expected[key] = None        # present, value checked above
    # slots moved everywhere, none left open, nothing left behind on the source
    for p in c.live_ports():
        me = c.node(p, view=p)
        check(not me.migrating and not me.importing, "open slots on %d", p)
    owners = {s: c.owner(s) for s in moving}
    check(set(owners.values()) == {dst}, "moved slots owned by %s", set(owners.values()))
    left = sum(c.command(src, "CLUSTER", "COUNTKEYSINSLOT", s) for s in moving)
    check(left == 0, "%d keys left in the moved slots on the source", left)
    return src, dst, moving


def verify_all(c, expected, what):
    """Every expected key is where the cluster says and has its value; no key elsewhere."""
    t = time.monotonic()
    found = {}
    owners = c.slot_map()
    for p in c.masters():
        for k in c.scan_keys(p):
            check(owners[key_slot(k)] == p, "%s: key %s on %d, slot %d owned by %s",
                  what, k, p, key_slot(k), owners[key_slot(k)])
            found[k] = p
    missing = [k for k in expected if k not in found]
    check(not missing, "%s: %d expected keys missing: %s", what, len(missing), missing[:5])
    todo = [(k, v) for k, v in expected.items() if v is not None and k in found]
    vals = c.pipeline_keys([(k, ("GET", k)) for k, _ in todo])
    wrong = [(k, v, g) for (k, v), g in zip(todo, vals) if g != v]
    check(not wrong, "%s: %d keys with a wrong value: %s", what, len(wrong), wrong[:5])
    say("%s: %d keys on the masters, all %d expected present and right (%.2fs)", what, len(found),
        len(expected), time.monotonic() - t)
    return found


def failover_under_load(c, expected, rnd, victim):
    masters = c.masters()
    bystander = [p for p in masters if p != victim][0]
    replica = c.replicas_of(victim)[0]
    vslots = set(c.slots_of(victim))
    bslots = set(c.slots_of(bystander))
    for p in masters:
        c.wait_replicas_caught_up(p)     # everything written so far is on the replicas
    vtags = [t for t in ("fo%d" % i for i in range(20000)) if key_slot(t) in vslots][:2000]
    btags = [t for t in ("by%d" % i for i in range(20000)) if key_slot(t) in bslots][:500]

    # writes acknowledged by WAIT 1 before anything goes wrong
    t = time.monotonic()
    nrep = collections.Counter()
    for i in range(300):
        k = "{%s}:pre" % vtags[i]
        r, n = c.command_key(k, "SET", k, "p%d" % i, wait=(1, 100))
        nrep[n] += 1
        expected[k] = "p%d" % i
    say("300 writes to master %d with WAIT 1 100 in %.2fs: replicas acked %s", victim,
        time.monotonic() - t, dict(nrep))
    # WAIT may say 0 on a busy machine (the replica took > 100 ms): those writes are safe only
    # once the replica has caught up, which this barrier makes sure of
    c.wait_replicas_caught_up(victim)

    writers = [Writer(c, "wait", lambda r: r.choice(vtags), "set", wait=(1, 100), rnd_seed=rnd.random()),
               Writer(c, "nowait", lambda r: r.choice(vtags), "set", rnd_seed=rnd.random()),
               Writer(c, "bystander", lambda r: r.choice(btags), "set", rnd_seed=rnd.random())]
    for w in writers:
        w.start()
    time.sleep(0.3)

    # the failure window, made deterministic: the replica sleeps (so it cannot reconnect), the
    # master drops its replication link, the master acknowledges writes the replica never gets
    # (0.9 s: long enough for the window on a busy machine, shorter than cluster-node-timeout)
    freeze = Conn(replica)
    freeze.send([("DEBUG", "SLEEP", "0.9")])
    t_sleep = time.monotonic()
    time.sleep(0.02)
    c.command(victim, "CLIENT", "KILL", "TYPE", "replica")
    t_cut = time.monotonic()
    window_nowait, window_wait = [], []
    for i in range(20):
        k = "{%s}:win" % vtags[1000 + i]
        c.command_key(k, "SET", k, "w%d" % i)
        window_nowait.append(k)
    for i in range(3):
        k = "{%s}:winwait" % vtags[1100 + i]
        r, n = c.command_key(k, "SET", k, "x%d" % i, wait=(1, 50))
        window_wait.append((k, n))
    say("window: master %d acknowledged 20 writes with its replica %d cut off; WAIT 1 50 then said %s",
        victim, replica, [n for _, n in window_wait])
    t_kill = time.monotonic()
    asleep = t_kill - t_sleep < 0.9
    say("window: link cut to kill -9 %.0f ms (%s)", (t_kill - t_cut) * 1e3,
        "replica asleep for 900 ms: it could not reconnect" if asleep else
        "longer than the replica's sleep: it may have resynced")
    new = c.kill_master(victim)
    freeze.close()
    time.sleep(0.5)
    for w in writers:
        w.stop()
    ph = c.last_failover
    say("failover: kill -9 %d -> pfail %.2fs, fail %.2fs, replica %d promoted %.2fs, cluster ok %.2fs",
        victim, ph.get("pfail", -1), ph.get("fail", -1), new, ph["promoted"], ph["ok"])
    check(new == replica, "promoted %d, expected the replica %d", new, replica)
    for w in writers:
        ev = events_since(c, t_kill, {w.name})
        stall = max((l for t0, l in w.latencies if t0 + l >= t_kill), default=0)
        say("  writer %-9s %4d ops, longest op after the kill %.2fs; saw: %s", w.name, w.ops, stall, fmt_events(ev))
        check(not w.errors, "writer %s errors: %s", w.name, w.errors[:3])

    # what survived
    def present(k, v):
        try:
            return c.command_key(k, "GET", k) == v
        except Exception:   # noqa: BLE001
            return False
    lost_pre = [k for k in list(expected) if k.endswith(":pre") and not present(k, expected[k])]
    check(not lost_pre, "%d WAIT-acknowledged writes lost: %s", len(lost_pre), lost_pre[:5])
    summary = {}
    for w in writers:
        classes = collections.defaultdict(lambda: [0, 0])
        for key, op, val, reps, t_done in w.acked:
            cls = "acked" if reps is None else "WAIT=%d" % reps
            ok = present(key, val)
            classes[cls][0 if ok else 1] += 1
            if not ok and t_done < t_cut:
                classes["lost, acked before the link cut"][1] += 1
            if ok:
                expected[key] = val
            elif reps:
                check(False, "writer %s: %s acknowledged by WAIT=%d lost", w.name, key, reps)
        unk = [0, 0]
        for key, op, val in w.unknown:
            ok = present(key, val)
            unk[0 if ok else 1] += 1
            if ok:
                expected[key] = val
        if w.unknown:
            classes["unknown outcome"] = unk
        summary[w.name] = dict(classes)
        say("  writer %-9s survived/lost: %s", w.name,
            ", ".join("%s %d/%d" % (k, a, b) for k, (a, b) in sorted(classes.items())))
    wl = [k for k in window_nowait if present(k, "w%d" % window_nowait.index(k))]
    ww = [(k, n) for k, n in window_wait if present(k, "x%d" % [x for x, _ in window_wait].index(k))]
    say("  window writes acknowledged by the master alone: %d of 20 survived; WAIT=0 ones: %d of %d survived",
        len(wl), len(ww), len(window_wait))
    if asleep:
        check(all(n == 0 for _, n in window_wait), "WAIT in the window should say 0: %s", window_wait)
    for k in wl:
        expected[k] = "w%d" % window_nowait.index(k)
    return victim, new, summary, window_nowait


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", action="store_true", help="keep the cluster directory")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rnd = random.Random(seed)
    say("seed %d", seed)
    expected = {}
    timings = {}
    c = RedisCluster(None, masters=3, replicas_per_master=1, keep=args.keep, quiet=False)
    try:
        with c:
            timings["start"] = c.timings["start"]
            say("cluster up in %.2fs; seeds %s", c.timings["start"], c.seeds())
            for n in sorted(c.nodes(), key=lambda n: n.port):
                say("  %s %s %-7s of %s slots %s", n.addr, n.id[:8], n.role, (n.master_id or "-")[:8],
                    ranges(s for a, b in n.slots for s in range(a, b + 1))[:3])
            slot_check(c, rnd)
            write_users(c, expected)
            src, dst, moving = reshard_under_load(c, expected, rnd)
            timings["reshard 100 slots"] = c.timings["reshard"]
            verify_all(c, expected, "after reshard")
            victim, new, summary, window = failover_under_load(c, expected, rnd, dst)
            timings["failover (kill -9 to ok)"] = c.timings["failover"]
            timings["failover: promoted"] = c.last_failover["promoted"]
            verify_all(c, expected, "after failover")
            dt = c.restart_node(victim)
            timings["restart old master"] = dt
            me = c.node(victim, view=victim)
            check(me.role == "replica" and me.master_id == c.myid(new),
                  "old master %d back as %s of %s", victim, me.role, me.master_id)
            c.wait_replicas_caught_up(new)
            c.command(victim, "READONLY")      # this connection may read the replica's slots
            back = [c.command(victim, "EXISTS", k) for k in window]
            say("old master %d is a replica of %d again after %.2fs; the 20 window writes in its AOF: %d kept after resync",
                victim, new, dt, sum(back))
            check(c.command(victim, "DBSIZE") == c.command(new, "DBSIZE"), "replica DBSIZE != master DBSIZE")
            verify_all(c, expected, "after restart")
            t = time.monotonic()
            asyncio.run(c.wait_ok_async(10))
            a, b = c.masters()[:2]
            dt = c.reshard_cli(10, a, b)
            say("wait_ok_async, then redis-cli --cluster reshard of 10 slots %d -> %d in %.2fs", a, b, dt)
            verify_all(c, expected, "after redis-cli reshard")
            t = time.monotonic()
        timings["stop"] = time.monotonic() - t
    except Exception as e:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        failures.append("exception: %r" % e)
    print("\n=== timings ===")
    for k, v in timings.items():
        print("  %-28s %.2fs" % (k, v))
    print("  %-28s %.2fs" % ("total", time.monotonic() - T0))
    print("  client events (whole run): %s" % dict(c.stats))
    if failures:
        print("\nFAILED (%d): seed %d\n  %s" % (len(failures), seed, "\n  ".join(failures[:30])))
        return 1
    print("\nOK (seed %d)" % seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
