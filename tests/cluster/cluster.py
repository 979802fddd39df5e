#!/usr/bin/python3
"""A real Redis Cluster on loopback for receiptd's end-to-end and fault tests.

    from cluster import RedisCluster          # with tests/cluster on sys.path
    with RedisCluster(workdir) as c:          # 3 masters + 3 replicas, started on enter
        c.command_key("rd:{bob@localhost}:seq", "INCR", "rd:{bob@localhost}:seq")
        c.reshard(100, c.masters()[0], c.masters()[1])
        new_port = c.kill_master(c.masters()[0])

Every node is a redis-server child process (tests/e2e/harness.py's Proc: log file per run, SIGTERM /
SIGKILL by PID only) listening on a free 127.0.0.1 port, with its cluster bus on a second free port
(`cluster-port`, Redis >= 7.0), its config, nodes.conf and AOF in WORKDIR/nodeN/. The cluster is
built with `redis-cli --cluster create`; slot moves and failovers are driven directly with CLUSTER
commands. The module has its own small RESP client, with a cluster-aware `command_key()` that
computes the slot itself (CRC16/XMODEM with hash tags) and follows MOVED / ASK / TRYAGAIN /
CLUSTERDOWN the way a cluster client must; it counts what it saw in `stats` / `events`.

Everything is synchronous and thread-safe (one connection per thread and node); asyncio tests can
await `wait_ok_async()` or run the slow helpers through asyncio.to_thread().
"""

import asyncio
import collections
import dataclasses
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "e2e"))
import harness  # noqa: E402  (tests/e2e/harness.py: Proc, free_port, wait_until, note, tail)

from harness import HarnessError, note, tail  # noqa: E402

HOST = "127.0.0.1"
NSLOTS = 16384


class ClusterError(HarnessError):
    pass


# ---------------------------------------------------------------- slots

def _crc16_table():
    table = []
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def crc16(data):
    """CRC16/XMODEM (poly 0x1021, init 0), the checksum Redis Cluster uses for key slots."""
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ b) & 0xFF]
    return crc


def _b(x):
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode("utf-8", "surrogateescape")
    if isinstance(x, (int, float)):
        return str(x).encode()
    raise TypeError("cannot send %r to Redis" % (x,))


def hash_tag(key):
    """The part of the key that is hashed: the text between the first '{' and the next '}' when
    that is not empty, else the whole key (Redis Cluster specification, 'hash tags')."""
    key = _b(key)
    s = key.find(b"{")
    if s >= 0:
        e = key.find(b"}", s + 1)
        if e > s + 1:
            return key[s + 1:e]
    return key


def key_slot(key):
    return crc16(hash_tag(key)) % NSLOTS


def tags_for_slots(slots, prefix="t"):
    """{slot: tag} with key_slot("{" + tag + "}") == slot for each wanted slot (brute force over
    prefix + counter; ~0.3 s for 100 slots, ~1.5 s for all 16384)."""
    want = set(slots)
    found = {}
    n = 0
    while want:
        tag = "%s%d" % (prefix, n)
        s = crc16(tag.encode()) % NSLOTS
        if s in want:
            found[s] = tag
            want.discard(s)
        n += 1
    return found


def ranges(slots):
    """[(start, end)] inclusive ranges of a set of slots."""
    out = []
    for s in sorted(slots):
        if out and out[-1][1] == s - 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


# ---------------------------------------------------------------- RESP client

class ReplyError(Exception):
    """An error reply ('-ERR ...', '-MOVED 12182 127.0.0.1:7001', ...); .kind is its first word."""

    @property
    def kind(self):
        return str(self.args[0]).split(" ", 1)[0]


class UnknownOutcome(ConnectionError):
    """The command was (maybe partly) sent and the connection broke before its reply: it may or may
    not have been executed."""


_IDEMPOTENT = {
    "GET", "MGET", "EXISTS", "TYPE", "TTL", "PTTL", "STRLEN", "GETRANGE", "LLEN", "LRANGE", "LINDEX",
    "HGET", "HMGET", "HGETALL", "HLEN", "HKEYS", "HVALS", "HEXISTS", "SCARD", "SMEMBERS",
    "SISMEMBER", "ZCARD", "ZRANGE", "ZRANGEBYSCORE", "ZSCORE", "ZRANK", "ZCOUNT", "DBSIZE", "KEYS",
    "SCAN", "PING", "INFO", "CLUSTER", "CONFIG", "ECHO", "TIME", "ROLE", "DUMP", "OBJECT", "MEMORY",
    "READONLY", "READWRITE", "SCRIPT", "EVALSHA_RO", "EVAL_RO", "CLIENT",
}


class Conn:
    """One blocking RESP2 connection. Bulk strings come back as str (UTF-8, surrogateescape)."""

    def __init__(self, port, host=HOST, password=None, timeout=5.0, connect_timeout=1.0):
        self.port = port
        self.sock = socket.create_connection((host, port), timeout=connect_timeout)
        self.sock.settimeout(timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rf = self.sock.makefile("rb")
        self.used = False
        if password:
            self.call("AUTH", password)

    def close(self):
        for x in (self.rf, self.sock):
            try:
                x.close()
            except OSError:
                pass

    @staticmethod
    def encode(args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = _b(a)
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        return b"".join(out)

    def send(self, commands):
        self.used = True
        self.sock.sendall(b"".join(self.encode(c) for c in commands))

    def read(self):
        """One reply; error replies are returned as ReplyError instances, not raised."""
        line = self.rf.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection to port %d closed" % self.port)
        t, rest = line[:1], line[1:-2]
        if t == b"+":
            return rest.decode("utf-8", "surrogateescape")
        if t == b"-":
            return ReplyError(rest.decode("utf-8", "replace"))
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.rf.read(n + 2)
            if len(data) != n + 2:
                raise ConnectionError("connection to port %d closed" % self.port)
            return data[:-2].decode("utf-8", "surrogateescape")
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise ConnectionError("bad RESP from port %d: %r" % (self.port, line[:80]))

    def pipeline(self, commands):
        self.send(commands)
        return [self.read() for _ in commands]

    def call(self, *args):
        r = self.pipeline([args])[0]
        if isinstance(r, ReplyError):
            raise r
        return r


# ---------------------------------------------------------------- topology

@dataclasses.dataclass
class Node:
    """One line of CLUSTER NODES."""
    id: str
    host: str
    port: int
    bus_port: int
    flags: tuple
    master_id: str          # None for masters
    config_epoch: int
    link: str               # connected / disconnected
    slots: list             # [(start, end)] inclusive
    migrating: dict         # slot -> node id (only in the answering node's own line)
    importing: dict

    @property
    def addr(self):
        return "%s:%d" % (self.host, self.port)

    @property
    def role(self):
        return "master" if "master" in self.flags else "replica"

    @property
    def myself(self):
        return "myself" in self.flags

    @property
    def failing(self):
        return "fail" in self.flags or "fail?" in self.flags

    @property
    def nslots(self):
        return sum(e - s + 1 for s, e in self.slots)


def parse_cluster_nodes(text):
    nodes = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 8:
            continue
        addr = f[1].split(",", 1)[0]             # ip:port@cport[,hostname]
        hp, _, cport = addr.partition("@")
        host, _, port = hp.rpartition(":")
        slots, mig, imp = [], {}, {}
        for s in f[8:]:
            if s.startswith("["):
                body = s[1:-1]
                if "->-" in body:
                    a, b = body.split("->-")
                    mig[int(a)] = b
                elif "-<-" in body:
                    a, b = body.split("-<-")
                    imp[int(a)] = b
            elif "-" in s:
                a, b = s.split("-")
                slots.append((int(a), int(b)))
            else:
                slots.append((int(s), int(s)))
        nodes.append(Node(id=f[0], host=host or HOST, port=int(port or 0), bus_port=int(cport or 0),
                          flags=tuple(f[2].split(",")), master_id=None if f[3] == "-" else f[3],
                          config_epoch=int(f[6]), link=f[7], slots=slots, migrating=mig,
                          importing=imp))
    return nodes


def parse_info(text):
    out = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            out[k] = v.strip()
    return out


# ---------------------------------------------------------------- processes

class ClusterNode(harness.Proc):
    """One redis-server of the cluster (config, nodes.conf, AOF and logs in its own directory)."""

    def __init__(self, root, index, settings):
        self.name = "node%d" % index
        self.dir = os.path.join(root, self.name)
        os.makedirs(self.dir, exist_ok=True)
        super().__init__(self.dir)
        self.index = index
        self.settings = settings
        self.port = self.bus_port = None
        self.conf = os.path.join(self.dir, "redis.conf")

    def write_conf(self, port, bus_port):
        self.port, self.bus_port = port, bus_port
        lines = ["# generated by tests/cluster/cluster.py",
                 "port %d" % port, "cluster-port %d" % bus_port, "bind %s" % HOST,
                 "dir %s" % self.dir, "cluster-config-file %s" % os.path.join(self.dir, "nodes.conf")]
        lines += ["%s %s" % (k, v) for k, v in self.settings.items()]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def argv(self):
        return ["redis-server", self.conf]

    def bind_failed(self):
        return self.count_in_log("Address already in use") > 0 or self.count_in_log("Could not create server TCP") > 0


class RedisCluster:
    """masters × (1 + replicas_per_master) redis-server processes forming one Redis Cluster.

    workdir: where every node's directory and log goes (created if missing; None = a new temp dir,
    removed by stop() unless the run failed or keep=True). extra_config: more redis.conf lines
    ({"cluster-require-full-coverage": "no"}, ...). password: requirepass/masterauth on every node;
    the harness then AUTHs (and MIGRATE passes AUTH). Use as a context manager (start() on enter)."""

    def __init__(self, workdir=None, masters=3, replicas_per_master=1, appendfsync="always",
                 node_timeout_ms=1000, password=None, extra_config=None, keep=None, quiet=False):
        if masters < 3:
            raise ClusterError("redis-cli --cluster create needs at least 3 masters")
        self.own_tmp = workdir is None
        self.workdir = os.path.abspath(workdir or tempfile.mkdtemp(prefix="receiptd-cluster-"))
        os.makedirs(self.workdir, exist_ok=True)
        self.n_masters = masters
        self.replicas_per_master = replicas_per_master
        self.password = password
        self.keep = keep if keep is not None else bool(os.environ.get("E2E_KEEP"))
        self.quiet = quiet
        settings = collections.OrderedDict([
            ("daemonize", "no"), ("logfile", '""'), ("loglevel", "notice"),
            ("cluster-enabled", "yes"), ("cluster-node-timeout", str(node_timeout_ms)),
            ("appendonly", "yes"), ("appendfsync", appendfsync), ("save", '""'),
            ("shutdown-timeout", "2"), ("enable-debug-command", "local"),
            # the default 5 s makes every replica's first full sync wait 5 s for company
            ("repl-diskless-sync-delay", "0"),
        ])
        if password:
            settings["requirepass"] = password
            settings["masterauth"] = password
        settings.update(extra_config or {})
        n = masters * (1 + replicas_per_master)
        self.procs = [ClusterNode(self.workdir, i, settings) for i in range(n)]
        self.failed = False
        self.started = False
        self.timings = {}               # start / reshard / failover / restart durations (s)
        self.last_failover = None       # phases of the last kill_master()
        self.stats = collections.Counter()  # what command_key() met: MOVED, ASK, TRYAGAIN, ...
        self.events = collections.deque(maxlen=50000)   # (monotonic, kind, port, detail, thread)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._slots = [None] * NSLOTS   # slot -> port (the client-side slot map)

    # ---------------------------------------------------------------- life cycle

    def __enter__(self):
        if not self.started:
            try:
                self.start()
            except BaseException:
                self.failed = True
                self.stop()
                raise
        return self

    def __exit__(self, et, ev, tb):
        if et is not None:
            self.failed = True
        self.stop()
        return False

    def _note(self, fmt, *args):
        if not self.quiet:
            note(fmt, *args)

    def _alloc_ports(self, n):
        """n distinct (port, bus_port) pairs of currently free loopback ports."""
        seen = set()
        out = []
        while len(out) < n:
            a, b = harness.free_port(), harness.free_port()
            if a == b or a in seen or b in seen:
                continue
            seen.update((a, b))
            out.append((a, b))
        return out

    def _spawn_and_ping(self, procs, timeout):
        for p in procs:
            p._spawn()
        deadline = time.monotonic() + timeout
        bad = []
        for p in procs:
            while True:
                if self._is_up(p):
                    break
                if p.popen.poll() is not None:
                    bad.append(p)
                    break
                if time.monotonic() > deadline:
                    raise ClusterError("%s (port %d) did not answer PING within %ss; log:\n%s"
                                       % (p.name, p.port, timeout, tail(p.log)))
                time.sleep(0.02)
        return bad

    def start(self, timeout=60):
        """Start the nodes, create the cluster, wait for cluster_state:ok everywhere (every slot
        covered, same slot map on every node, every replica synced with its master)."""
        t0 = time.monotonic()
        todo = list(self.procs)
        for attempt in range(4):
            for p, (port, bus) in zip(todo, self._alloc_ports(len(todo))):
                p.write_conf(port, bus)
            bad = self._spawn_and_ping(todo, timeout=15)
            if not bad:
                break
            for p in bad:
                if not p.bind_failed():
                    raise ClusterError("%s exited with %s at start; log:\n%s"
                                       % (p.name, p.popen.returncode, tail(p.log)))
                p.popen = None
            self._note("port taken by someone else for %s: new ports", ", ".join(p.name for p in bad))
            todo = bad
        else:
            raise ClusterError("could not find free ports for the cluster nodes")
        addrs = ["%s:%d" % (HOST, p.port) for p in self.procs]
        out = os.path.join(self.workdir, "cluster-create.log")
        cmd = ["redis-cli", "--cluster", "create"] + addrs + [
            "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
        self._redis_cli(cmd, out, timeout)
        self.wait_ok(timeout=max(5.0, timeout - (time.monotonic() - t0)))
        self.started = True
        self.timings["start"] = time.monotonic() - t0
        self._note("cluster of %d masters x %d replicas up in %.2fs: %s", self.n_masters,
                   self.replicas_per_master, self.timings["start"], self.seeds())
        return self

    def _redis_cli(self, cmd, logpath, timeout):
        env = dict(os.environ)
        if self.password:
            env["REDISCLI_AUTH"] = self.password
        with open(logpath, "ab") as fh:
            fh.write(("$ %s\n" % " ".join(cmd)).encode())
            fh.flush()
            try:
                r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise ClusterError("%s timed out; output in %s:\n%s" % (cmd[:3], logpath, tail(logpath)))
        if r.returncode != 0:
            raise ClusterError("%s failed (exit %d):\n%s" % (" ".join(cmd[:3]), r.returncode, tail(logpath)))

    def stop(self, timeout=10):
        """SIGTERM every node and wait (SIGTERM again every 0.5 s: Redis 7.0 refuses to shut down
        while it writes its initial AOF, e.g. right after a replica's full sync, and does not retry
        by itself; SIGKILL after `timeout`), close connections; dump log tails if the run failed;
        remove the temp dir if the cluster made it and the run did not fail."""
        self._drop_conns()
        live = [p for p in self.procs if p.alive()]
        for p in live:
            self._note("SIGTERM %s pid %d", p.name, p.popen.pid)
            p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        t_resend = time.monotonic() + 0.5
        while any(p.popen.poll() is None for p in live) and time.monotonic() < deadline:
            time.sleep(0.02)
            if time.monotonic() > t_resend:
                t_resend = time.monotonic() + 0.5
                for p in live:
                    if p.popen.poll() is None:
                        p.popen.send_signal(signal.SIGTERM)
        for p in live:
            if p.popen.poll() is None:
                note("%s pid %d ignored SIGTERM for %ss: SIGKILL", p.name, p.popen.pid, timeout)
                p.popen.kill()
                p.popen.wait()
                p.exit_codes.append(("SIGTERM-timeout", p.popen.returncode))
                self.failed = True
            else:
                p.exit_codes.append(("SIGTERM", p.popen.returncode))
            p.popen = None
        for p in self.procs:
            p.cleanup()
        if self.failed:
            self.dump_logs()
        if self.own_tmp and not self.keep and not self.failed:
            shutil.rmtree(self.workdir, ignore_errors=True)
        elif self.own_tmp:
            sys.stderr.write("kept cluster dir %s\n" % self.workdir)

    def dump_logs(self, out=sys.stderr, nbytes=6000):
        for p in self.procs:
            for path in p.logs:
                out.write("\n===== %s =====\n%s\n" % (path, tail(path, nbytes)))
        for name in ("cluster-create.log", "reshard-cli.log"):
            path = os.path.join(self.workdir, name)
            if os.path.exists(path):
                out.write("\n===== %s =====\n%s\n" % (path, tail(path, nbytes)))
        out.flush()

    # ---------------------------------------------------------------- low level

    def proc(self, port):
        for p in self.procs:
            if p.port == port:
                return p
        raise ClusterError("no node on port %s" % port)

    def ports(self):
        return [p.port for p in self.procs]

    def live_ports(self):
        return [p.port for p in self.procs if p.alive()]

    def _conns(self):
        d = getattr(self._local, "conns", None)
        if d is None:
            d = self._local.conns = {}
            with self._lock:
                self._all_conn_dicts = getattr(self, "_all_conn_dicts", []) + [d]
        return d

    def _conn(self, port):
        d = self._conns()
        c = d.get(port)
        if c is None:
            c = d[port] = Conn(port, password=self.password)
        return c

    def _drop(self, port):
        c = self._conns().pop(port, None)
        if c is not None:
            c.close()

    def _drop_conns(self):
        for d in getattr(self, "_all_conn_dicts", []):
            for c in list(d.values()):
                c.close()
            d.clear()

    def _is_up(self, p):
        """The node answers on its port, and it is our process (not someone else's server that
        holds the port while ours failed to bind)."""
        try:
            c = Conn(p.port, password=self.password, timeout=0.5, connect_timeout=0.3)
        except (OSError, ReplyError):
            return False
        try:
            info = parse_info(c.call("INFO", "server"))
            return p.popen is not None and info.get("process_id") == str(p.popen.pid)
        except (OSError, ReplyError, ValueError):
            return False
        finally:
            c.close()

    def _exchange(self, port, commands, idempotent):
        """Pipeline commands to one node on this thread's connection. A broken cached connection
        is retried once on a fresh one if idempotent; otherwise UnknownOutcome."""
        for attempt in (0, 1):
            d = self._conns()
            cached = port in d
            c = self._conn(port)     # OSError here (refused): nothing was sent
            try:
                return c.pipeline(commands)
            except (OSError, ValueError) as e:
                self._drop(port)
                if idempotent and cached and attempt == 0:
                    continue
                if idempotent:
                    raise ConnectionError("port %d: %s" % (port, e))
                raise UnknownOutcome("port %d: %s while running %s" % (
                    port, e or type(e).__name__, [a[0] for a in commands]))

    def command(self, port, *args, idempotent=None):
        """Run one command on the node at `port` (no redirection); error replies raise ReplyError."""
        if idempotent is None:
            idempotent = str(args[0]).upper() in _IDEMPOTENT
        r = self._exchange(port, [args], idempotent)[0]
        if isinstance(r, ReplyError):
            raise r
        return r

    def pipeline(self, port, commands, idempotent=False):
        """Several commands on one node in one round trip; error replies are returned (not raised)."""
        return self._exchange(port, [tuple(c) for c in commands], idempotent)

    def info(self, port, section=None):
        return parse_info(self.command(port, *(["INFO", section] if section else ["INFO"])))

    def cluster_info(self, port):
        return parse_info(self.command(port, "CLUSTER", "INFO"))

    def myid(self, port):
        return self.command(port, "CLUSTER", "MYID")

    # ---------------------------------------------------------------- topology

    def nodes(self, port=None):
        """The topology (list of Node) as the node at `port` (default: the first live one) sees it."""
        for p in ([port] if port else self.live_ports()):
            try:
                return parse_cluster_nodes(self.command(p, "CLUSTER", "NODES"))
            except OSError:
                if port:
                    raise
        raise ClusterError("no live node to ask CLUSTER NODES")

    def node(self, port, view=None):
        for n in self.nodes(view):
            if n.port == port:
                return n
        raise ClusterError("port %d not in the cluster" % port)

    def slot_table(self, port=None):
        """CLUSTER SLOTS as [(start, end, master_port, [replica_ports])]."""
        out = []
        for p in ([port] if port else self.live_ports()):
            try:
                rows = self.command(p, "CLUSTER", "SLOTS")
                break
            except OSError:
                if port:
                    raise
        else:
            raise ClusterError("no live node to ask CLUSTER SLOTS")
        for row in rows:
            out.append((int(row[0]), int(row[1]), int(row[2][1]), [int(r[1]) for r in row[3:]]))
        return sorted(out)

    def masters(self):
        """Ports of the masters that serve slots (and are not flagged failing), by first slot."""
        ns = [n for n in self.nodes() if n.role == "master" and n.slots and not n.failing]
        return [n.port for n in sorted(ns, key=lambda n: n.slots[0])]

    def replicas_of(self, port):
        ns = self.nodes()
        mid = [n.id for n in ns if n.port == port][0]
        return [n.port for n in ns if n.master_id == mid and not n.failing]

    def slots_of(self, port):
        """Sorted list of the slots the master at `port` serves (its own view)."""
        me = self.node(port, view=port)
        return [s for a, b in me.slots for s in range(a, b + 1)]

    def seeds(self):
        """'host:port,host:port,...' of the masters: the [redis] cluster = value for receiptd."""
        return ",".join("%s:%d" % (HOST, p) for p in self.masters())

    def slot_map(self, port=None):
        """[port of the master serving slot s for s in 0..16383] from one CLUSTER SLOTS."""
        m = [None] * NSLOTS
        for a, b, owner, _ in self.slot_table(port):
            m[a:b + 1] = [owner] * (b - a + 1)
        return m

    def owner(self, key_or_slot):
        """Port of the master serving a key (str/bytes) or slot (int), per the cluster."""
        slot = key_or_slot if isinstance(key_or_slot, int) else key_slot(key_or_slot)
        for a, b, m, _ in self.slot_table():
            if a <= slot <= b:
                return m
        return None

    # ---------------------------------------------------------------- state checks

    def check_state(self, require_replicas_synced=True, allow_open_slots=False):
        """(ok, why): every live node says cluster_state:ok with 16384 slots ok, all live nodes
        agree on who serves every slot, the owners are live masters nobody flags failing, no slot
        is migrating/importing, and (require_replicas_synced) every live replica's link to its
        master is up and no node is rewriting its AOF (as replicas do after a full sync)."""
        views, epochs = {}, {}
        for p in self.live_ports():
            try:
                ci = self.cluster_info(p)
                epochs[p] = ci.get("cluster_current_epoch")
                if ci.get("cluster_state") != "ok":
                    return False, "port %d: cluster_state:%s" % (p, ci.get("cluster_state"))
                if ci.get("cluster_slots_ok") != str(NSLOTS):
                    return False, "port %d: cluster_slots_ok:%s" % (p, ci.get("cluster_slots_ok"))
                views[p] = self.nodes(p)
            except (OSError, ReplyError) as e:
                return False, "port %d: %s" % (p, e)
        # A settled cluster agrees on its current epoch. A reshard raises the importing master's
        # config epoch without a vote; a replica that has not heard of it yet would run its
        # failover election at that same epoch and win slots tied with its dead master's, which
        # no live node can break (seen once: the promoted replica stuck in cluster_state:fail
        # after the old master came back). Waiting for agreement makes every later election
        # epoch higher than any config epoch.
        if len(set(epochs.values())) > 1:
            return False, "nodes disagree on the current epoch: %s" % epochs
        live = set(self.live_ports())
        try:
            return self._check_views(views, live, require_replicas_synced, allow_open_slots)
        except (OSError, ReplyError) as e:
            return False, str(e)

    def _check_views(self, views, live, require_replicas_synced, allow_open_slots):
        ref = None
        for p, ns in views.items():
            masters = [n for n in ns if n.role == "master" and n.slots]
            if len({n.config_epoch for n in masters}) != len(masters):
                return False, "port %d: two masters share a config epoch" % p
            owners = sorted((a, b, n.id) for n in ns if n.role == "master" for a, b in n.slots)
            if ref is None:
                ref = (p, owners)
            elif owners != ref[1]:
                return False, "ports %d and %d disagree on the slot owners" % (ref[0], p)
            if sum(b - a + 1 for a, b, _ in owners) != NSLOTS:
                return False, "port %d: slots not all assigned" % p
            for n in ns:
                if n.role == "master" and n.slots and (n.failing or n.port not in live):
                    return False, "port %d: slot owner %s (%d) is %s" % (
                        p, n.id[:8], n.port, "flagged " + ",".join(n.flags) if n.failing else "dead")
                if n.myself and (n.migrating or n.importing) and not allow_open_slots:
                    return False, "port %d: open slots %s %s" % (p, n.migrating, n.importing)
                if n.myself and n.role == "replica" and require_replicas_synced:
                    ri = self.info(p, "replication")
                    if ri.get("master_link_status") != "up":
                        return False, "replica %d: master_link_status:%s" % (p, ri.get("master_link_status"))
            if require_replicas_synced:
                # a replica rewrites its AOF after a full sync (and cannot be shut down meanwhile)
                pi = self.info(p, "persistence")
                if pi.get("aof_rewrite_in_progress") != "0" or pi.get("aof_rewrite_scheduled") != "0":
                    return False, "port %d: AOF rewrite in progress" % p
        return True, "ok"

    def wait_ok(self, timeout=30, interval=0.05, **kw):
        """Block until check_state() is ok; raise ClusterError with the last reason on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            ok, why = self.check_state(**kw)
            if ok:
                return
            if time.monotonic() > deadline:
                raise ClusterError("cluster not ok after %.1fs: %s" % (timeout, why))
            time.sleep(interval)

    async def wait_ok_async(self, timeout=30, interval=0.05, **kw):
        """wait_ok() for asyncio code: each probe runs in a worker thread, the loop keeps running."""
        deadline = time.monotonic() + timeout
        while True:
            ok, why = await asyncio.to_thread(self.check_state, **kw)
            if ok:
                return
            if time.monotonic() > deadline:
                raise ClusterError("cluster not ok after %.1fs: %s" % (timeout, why))
            await asyncio.sleep(interval)

    def wait_replicas_caught_up(self, port, timeout=10, replicas=None):
        """Until the replicas of the master at `port` (at least `replicas` of them, default: as
        many as the topology gives it) have acknowledged its whole replication stream: a barrier
        before a kill, after which everything written earlier survives a failover. Returns how
        many replicas are caught up."""
        if replicas is None:
            replicas = len(self.replicas_of(port))
        deadline = time.monotonic() + timeout
        while True:
            ri = self.info(port, "replication")
            off = int(ri["master_repl_offset"])
            n = int(ri.get("connected_slaves", 0))
            done = [k for k in range(n)
                    if int(dict(x.split("=", 1) for x in ri["slave%d" % k].split(","))["offset"]) >= off]
            if len(done) >= replicas:
                return len(done)
            if time.monotonic() > deadline:
                raise ClusterError("replicas of %d not caught up: %s" % (port, ri))
            # replicas ack once a second on their own; WAIT makes them ack now
            self.command(port, "WAIT", replicas, 100)

    # ---------------------------------------------------------------- cluster client

    def _event(self, kind, port, detail=""):
        with self._lock:
            self.stats[kind] += 1
        self.events.append((time.monotonic(), kind, port, detail, threading.current_thread().name))

    def refresh_slots(self):
        """Reload the client-side slot map from the first live node that answers CLUSTER SLOTS."""
        ports = self.live_ports() or self.ports()
        random.shuffle(ports)
        for p in ports:
            try:
                self._slots = self.slot_map(p)
            except (OSError, ReplyError):
                continue
            return True
        return False

    def command_key(self, key, *args, wait=None, timeout=15.0, idempotent=None):
        """Run a command on the master serving `key`'s slot, the way a cluster client does:
        MOVED -> update the slot map and go there; ASK -> ASKING + the command on the named node
        (once, map unchanged); TRYAGAIN / CLUSTERDOWN / refused connection -> back off, reload the
        map, retry until `timeout`. A connection broken after sending raises UnknownOutcome unless
        the command is idempotent. wait=(numreplicas, timeout_ms) appends WAIT on the same
        connection and returns (reply, replicas_acked)."""
        if idempotent is None:
            idempotent = str(args[0]).upper() in _IDEMPOTENT
        slot = key_slot(key)
        deadline = time.monotonic() + timeout
        ask = None
        backoff = 0.01
        last = None
        redirects = 0
        while True:
            port = ask or self._slots[slot]
            if port is None:
                self.refresh_slots()
                port = self._slots[slot]
                if port is None:
                    last = "slot %d unassigned" % slot
            replies = None
            if port is not None:
                cmds = ([("ASKING",)] if ask else []) + [args] + ([("WAIT",) + tuple(wait)] if wait else [])
                try:
                    replies = self._exchange(port, cmds, idempotent)
                except UnknownOutcome:
                    self._event("UNKNOWN", port)
                    self.refresh_slots()
                    raise
                except OSError as e:
                    self._event("CONNERR", port, str(e))
                    last = "port %d: %s" % (port, e)
                    ask = None
                    self.refresh_slots()
            if replies is not None:
                r = replies[1 if ask else 0]
                if not isinstance(r, ReplyError):
                    return (r, replies[-1]) if wait else r
                kind = r.kind
                if kind in ("MOVED", "ASK"):
                    _, s, addr = str(r).split(" ")
                    newport = int(addr.rpartition(":")[2])
                    self._event(kind, port, "%s->%d" % (s, newport))
                    if kind == "MOVED":
                        self._slots[int(s)] = newport
                    ask = newport if kind == "ASK" else None
                    redirects += 1
                    if redirects % 8:
                        continue        # follow at once; every 8th redirection backs off
                    last = "port %d: %s (%d redirections)" % (port, r, redirects)
                elif kind in ("TRYAGAIN", "CLUSTERDOWN", "LOADING", "MASTERDOWN"):
                    self._event(kind, port, str(r))
                    last = "port %d: %s" % (port, r)
                    ask = None
                    if kind != "TRYAGAIN":
                        self.refresh_slots()
                else:
                    raise r
            if time.monotonic() > deadline:
                raise ClusterError("command_key(%r, %s) gave up after %.1fs: %s" % (key, args[0], timeout, last))
            time.sleep(backoff)
            backoff = min(backoff * 2, 0.1)

    def pipeline_keys(self, commands, batch=200):
        """Bulk writes: [(key, args)] grouped per owning master and pipelined; replies in order.
        Any redirected / failed reply is redone one by one with command_key()."""
        if any(p is None for p in self._slots):
            self.refresh_slots()
        by_port = collections.defaultdict(list)
        for i, (key, args) in enumerate(commands):
            by_port[self._slots[key_slot(key)]].append(i)
        out = [None] * len(commands)
        for port, idx in by_port.items():
            for k in range(0, len(idx), batch):
                chunk = idx[k:k + batch]
                try:
                    replies = self.pipeline(port, [commands[i][1] for i in chunk])
                except OSError:
                    replies = [None] * len(chunk)   # never sent or unknown: caller's risk, redo
                for i, r in zip(chunk, replies):
                    if r is None or (isinstance(r, ReplyError) and r.kind in (
                            "MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")):
                        r = self.command_key(commands[i][0], *commands[i][1])
                    elif isinstance(r, ReplyError):
                        raise r
                    out[i] = r
        return out

    def scan_keys(self, port, match="*"):
        """All keys of one node (SCAN)."""
        cur, keys = "0", []
        while True:
            cur, batch = self.command(port, "SCAN", cur, "MATCH", match, "COUNT", 1000)
            keys.extend(batch)
            if cur == "0":
                return keys

    # ---------------------------------------------------------------- resharding

    def migrate_slots(self, src_port, dst_port, slots, batch=100, migrate_timeout_ms=5000, pause=0.0,
                      on_slot=None):
        """Move slots (with their keys) from one master to another while clients keep working:
        IMPORTING on dst, MIGRATING on src, MIGRATE ... KEYS in batches until the slot is empty,
        then SETSLOT NODE on dst, src and every other master. Returns the number of keys moved.
        pause: seconds to sleep after each MIGRATE batch (keeps a slot with keys half-moved, the
        state in which clients get ASK / TRYAGAIN, for longer); on_slot(slot, keys, t_open, t_done)
        is called after each slot (monotonic times of IMPORTING and of the last SETSLOT NODE)."""
        src_id, dst_id = self.myid(src_port), self.myid(dst_port)
        others = [p for p in self.masters() if p not in (src_port, dst_port)]
        auth = ["AUTH", self.password] if self.password else []
        moved = 0
        for slot in slots:
            t_open = time.monotonic()
            in_slot = 0
            self.command(dst_port, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            self.command(src_port, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            while True:
                keys = self.command(src_port, "CLUSTER", "GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                self.command(src_port, "MIGRATE", HOST, dst_port, "", 0, migrate_timeout_ms,
                             *auth, "KEYS", *keys)
                moved += len(keys)
                in_slot += len(keys)
                if pause:
                    time.sleep(pause)
            self.command(dst_port, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
            self.command(src_port, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
            for p in others:
                try:
                    self.command(p, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
                except (OSError, ReplyError):
                    pass        # gossip tells it anyway (dst bumped its config epoch)
            if on_slot is not None:
                on_slot(slot, in_slot, t_open, time.monotonic())
        return moved

    def reshard(self, n_slots, src_port, dst_port, slots=None, wait=True, timeout=30, batch=100, pause=0.0,
                on_slot=None):
        """Move n_slots slots (the lowest-numbered ones src serves, or `slots`) from src to dst with
        migrate_slots(), then wait until every node agrees. Returns (slots, keys moved, seconds)."""
        t0 = time.monotonic()
        if slots is None:
            slots = self.slots_of(src_port)[:n_slots]
        if len(slots) < n_slots:
            raise ClusterError("master %d serves only %d slots" % (src_port, len(slots)))
        self._note("resharding %d slots %s from %d to %d", len(slots), ranges(slots)[:4], src_port, dst_port)
        keys = self.migrate_slots(src_port, dst_port, slots, batch=batch, pause=pause, on_slot=on_slot)
        if wait:
            self.wait_ok(timeout=timeout)
        dt = time.monotonic() - t0
        self.timings["reshard"] = dt
        self._note("resharded %d slots (%d keys) in %.2fs", len(slots), keys, dt)
        return slots, keys, dt

    def reshard_cli(self, n_slots, src_port, dst_port, timeout=120):
        """The same with `redis-cli --cluster reshard` (it picks the slots itself)."""
        t0 = time.monotonic()
        cmd = ["redis-cli", "--cluster", "reshard", "%s:%d" % (HOST, src_port),
               "--cluster-from", self.myid(src_port), "--cluster-to", self.myid(dst_port),
               "--cluster-slots", str(n_slots), "--cluster-yes", "--cluster-pipeline", "100"]
        self._redis_cli(cmd, os.path.join(self.workdir, "reshard-cli.log"), timeout)
        self.wait_ok(timeout=30)
        dt = time.monotonic() - t0
        self.timings["reshard"] = dt
        return dt

    # ---------------------------------------------------------------- failures

    def kill_master(self, port, timeout=30):
        """kill -9 the master at `port`, wait until one of its replicas is promoted and the cluster
        is ok again; return the new master's port. Phases (seconds after the kill) are left in
        last_failover: pfail/fail (first live node flagging it), promoted, ok."""
        ns = self.nodes(port)        # the victim's own view: it knows its replicas
        victim = [n for n in ns if n.port == port]
        if not victim or victim[0].role != "master" or not victim[0].slots:
            raise ClusterError("port %d is not a master with slots" % port)
        vid = victim[0].id
        reps = {n.id: n.port for n in ns if n.master_id == vid and not n.failing}
        if not reps:
            raise ClusterError("master %d has no replica to promote" % port)
        t0 = time.monotonic()
        self.proc(port).kill9()
        phases = {"killed_at": t0}
        new = None
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            for p in self.live_ports():
                try:
                    view = self.nodes(p)
                except (OSError, ReplyError):
                    continue
                for n in view:
                    if n.id == vid:
                        if "fail?" in n.flags:
                            phases.setdefault("pfail", time.monotonic() - t0)
                        if "fail" in n.flags:
                            phases.setdefault("pfail", time.monotonic() - t0)
                            phases.setdefault("fail", time.monotonic() - t0)
                    if n.myself and n.id in reps and n.role == "master":
                        new = n.port
                        phases.setdefault("promoted", time.monotonic() - t0)
            if new is not None:
                break
            time.sleep(0.02)
        if new is None:
            raise ClusterError("no replica of %d promoted within %ss" % (port, timeout))
        self.wait_ok(timeout=max(1.0, deadline - time.monotonic()), interval=0.02)
        phases["ok"] = time.monotonic() - t0
        phases["new_master"] = new
        self.last_failover = phases
        self.timings["failover"] = phases["ok"]
        self.refresh_slots()
        self._note("failover of %d: %d promoted after %.2fs, cluster ok after %.2fs (pfail %.2fs, fail %.2fs)",
                   port, new, phases["promoted"], phases["ok"], phases.get("pfail", -1), phases.get("fail", -1))
        return new

    def kill_node(self, port):
        """kill -9 any node, no waiting."""
        self.proc(port).kill9()

    def restart_node(self, port, timeout=30):
        """Start a killed (or stopped) node again with its config, nodes.conf and AOF; wait until it
        has rejoined (an old master comes back as a replica of whoever took its slots), its
        replication link is up and the cluster is ok. Returns the seconds it took."""
        p = self.proc(port)
        if p.alive():
            raise ClusterError("%s (port %d) is running" % (p.name, port))
        t0 = time.monotonic()
        bad = self._spawn_and_ping([p], timeout=15)
        if bad:
            raise ClusterError("%s did not restart; log:\n%s" % (p.name, tail(p.log)))
        self.wait_ok(timeout=timeout)
        dt = time.monotonic() - t0
        self.timings["restart"] = dt
        me = self.node(port, view=port)
        self._note("%s (port %d) back as %s in %.2fs", p.name, port, me.role, dt)
        return dt


# ---------------------------------------------------------------- CLI

def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="Run a throwaway Redis Cluster until Ctrl-C.")
    ap.add_argument("--masters", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--workdir")
    args = ap.parse_args(argv)
    with RedisCluster(args.workdir, masters=args.masters, replicas_per_master=args.replicas) as c:
        for n in sorted(c.nodes(), key=lambda n: n.port):
            print("%-9s %s %-7s %s %s" % (n.addr, n.id[:8], n.role, (n.master_id or "")[:8], ranges_text(n.slots)))
        print("seeds: %s\nCtrl-C stops it" % c.seeds())
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


def ranges_text(rs):
    return " ".join("%d-%d" % (a, b) if a != b else str(a) for a, b in rs)


if __name__ == "__main__":
    sys.exit(main())
