#!/usr/bin/python3
"""receiptd benchmarks (issues #3 and #8), all measured in one run; prints a table and writes
tests/bench/RESULTS.md. Every number in both comes from this run (with --parts, the sections of
the parts not run are kept from the file; each section says when it was measured).

1. store: loadgen plays the XMPP server and offers N receipt-requested messages to offline
   recipients; stored+acked msg/s at saturation, store->ack latency at a fixed offered rate;
   receiptd RSS; Redis memory and commands per stored message.
2. retrieval: loadgen queues Q messages for one offline user (its store phase with one
   recipient), then plays that user: summary, fetch pages of 100 until complete='true', ack each
   page (the ack and the next fetch leave together). Retrieved msg/s; receiptd RSS before
   queueing, after queueing and at its peak while retrieving; CPU of receiptd, Redis and the
   generator while retrieving. Acking relays one receipt per message to its (offline) sender,
   which is a Redis write; a second, smaller variant has the senders online (receipts pushed).
3. side by side through Prosody: c2sgen, the same client sending the same stanzas, stores N
   messages for offline bob (a) with Prosody itself (mod_offline) and (b) through receiptd
   (counting <stored/>), then bob retrieves them (a) from Prosody's login flood and (b) by
   summary / fetch / ack. Ratios (b)/(a) are taken pair by pair within a run. Once with Prosody
   as the e2e harness configures it, once with network_settings nagle = false.
4. ceiling: redis-benchmark runs receiptd's own put script (EVALSHA, the same keys and arguments
   as receiptd's call on a single Redis, index shard and dedupe included) pipelined on a fresh
   Redis of the same configuration: receiptd's store rate as a fraction of that. The floors:
   the same for far cheaper stores (an empty script, one HSET, an ordered queue, a plain HSET),
   what Redis alone can do per message here whatever the data model; with the store part's CPU
   per message of receiptd and the generator, what the 100000 msg/s target would take.
5. cluster (issue #8): the store run at saturation (same loadgen, --cluster-n messages) against
   the single Redis of part 1 and Redis Clusters of 1, 2 and 3 masters ([redis] cluster = ...),
   plus 3 masters + 3 replicas with [redis] wait_replicas = 1; stored+acked msg/s, the ratio to
   1 master, CPU of receiptd, loadgen and every redis-server, run-queue waits (2 cores shared by
   all of them), Redis commands per message; where the ceiling is. Its own section of
   RESULTS.md ("Redis Cluster scaling"): `--parts cluster` rewrites only that section, and the
   other parts alone leave it as it was.
6. compare (only with --baseline REV): receiptd built at git revision REV against this tree's,
   the store and retrieval runs side by side, round by round (compare.py); its own section of
   RESULTS.md ("Before / after").

Each figure is the median of --runs runs (--queue-runs for the big retrieval, --cluster-runs
rounds of the cluster part, where a run disturbed by other processes, more than
--cluster-max-noise % of a core, is done again, at most --cluster-redo times in all). When the
retrieval target is missed and perf is installed, one more retrieval runs under perf (not
counted in the figures) and the top of its profile goes into RESULTS.md.

usage: run.py [--quick] [-n N] [--runs K] [--queue Q] [--queue-runs K] [--sbs-n N]
              [--cluster-n N] [--cluster-runs K] [--cluster-masters 1,2,3] [--no-cluster-wait]
              [--cluster-max-noise PCT] [--cluster-redo K]
              [--parts store,retrieval,sbs,ceiling,cluster,compare] [--baseline REV]
              [--compare-runs K] [--compare-n N] [--compare-q Q] [--compare-rate R] [--no-perf]
              [--out FILE]
"""
import argparse
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD = os.environ.get("BUILD", os.path.join(ROOT, "build"))
RECEIPTD = os.environ.get("RECEIPTD", os.path.join(BUILD, "component", "receiptd"))
LOADGEN = os.path.join(BUILD, "tests", "bench", "loadgen")
PUTLAT = os.path.join(BUILD, "tests", "bench", "putlat")
C2SGEN = os.path.join(BUILD, "tests", "bench", "c2sgen")
CLK = os.sysconf("SC_CLK_TCK")

sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
import harness  # noqa: E402  (Redis + Prosody + receiptd processes for the side by side)
import compare  # noqa: E402  (the before / after part)

# Targets of issue #3.
T_STORE = 100000
T_P99_MS = 5
T_RETRIEVE = 50000
T_RSS_MB = 64
T_STORE_RATIO = 3
# A fetch page is cut at fetch_max_bytes, counting each stored blob plus receiptd's fixed
# allowance for the <forwarded/> wrapper (query.c: 320 bytes). The bench messages' blobs are
# ~355 bytes, so the default 65536 would cut pages at 97; 131072 lets every page be the 100 the
# client asks for (the real page is ~60 kB, far under Prosody's 512 kB component stanza limit).
FETCH_MAX_BYTES = 131072
# The parts of the main table, and the heading of the cluster part's own section.
MAIN_PARTS = {"store", "retrieval", "sbs", "ceiling"}
CLUSTER_HEAD = "## Redis Cluster scaling"
# The parts with a section of their own in RESULTS.md, in file order.
SECTIONS = [compare.HEAD, CLUSTER_HEAD]


class BenchError(Exception):
    pass


def status_kb(pid, key):
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1))


def rss_kb(pid):
    return status_kb(pid, "VmRSS")


def reset_peak(pid):
    """Resets the process' VmHWM (peak RSS), so that it then reads the peak of what follows."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def proc_cpu(pid, children=False):
    """user+sys seconds of a running process; with children, also of its children, reaped or
    running (Redis' AOF rewrites run in forked children)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    total = sum(int(x) for x in fields[11:15 if children else 13]) / CLK
    if children:
        for task in os.listdir("/proc/%d/task" % pid):
            try:
                with open("/proc/%d/task/%s/children" % (pid, task)) as f:
                    total += sum(proc_cpu(int(c), True) for c in f.read().split())
            except OSError:
                pass  # exited meanwhile: then it is in the parent's reaped-children time
    return total


def sched(pid):
    """(on a core, runnable but waiting for a core) in seconds, of the process' main thread (its
    event loop; receiptd's libuv pool threads and Redis' background threads are not counted):
    /proc/PID/schedstat, readable until the process is reaped."""
    try:
        with open("/proc/%d/schedstat" % pid) as f:
            v = f.read().split()
        return int(v[0]) / 1e9, int(v[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0


def machine_cpu():
    """CPU seconds of all cores from /proc/stat: (in processes: user+nice+system, in interrupts:
    irq+softirq, stolen by the hypervisor). Loopback TCP is mostly softirq work, which is not
    charged to the processes that send and receive."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return ((v[0] + v[1] + v[2]) / CLK, (v[5] + v[6]) / CLK, v[7] / CLK)


def redis_calls(redis):
    """(EVALSHA calls, commands run inside scripts and otherwise) from INFO commandstats."""
    evals = inner = 0
    for k, v in redis.info("commandstats").items():
        calls = int(re.search(r"calls=(\d+)", v).group(1))
        if k == "cmdstat_evalsha":
            evals += calls
        elif k.startswith("cmdstat_") and not any(x in k for x in ("script", "info", "config")):
            inner += calls
    return evals, inner


def kv(line):
    """key=value tokens of a generator's output line (other words ignored)."""
    return dict(t.split("=", 1) for t in line.split() if "=" in t)


def pct(s):
    return float(s.rstrip("%"))


class Sampler(threading.Thread):
    """Polls a process' RSS, a backstop for VmHWM where clear_refs is not allowed."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stopping = pid, 0, threading.Event()

    def run(self):
        while not self.stopping.wait(0.01):
            try:
                self.peak = max(self.peak, rss_kb(self.pid))
            except (OSError, AttributeError):
                return

    def stop(self):
        self.stopping.set()
        self.join()
        return self.peak


# Redis' own complaints, over all the Redis instances of the run: a slow disk shows here.
REDIS_SLOW_FSYNC = []


class RedisCli:
    """redis-cli on one port."""

    def __init__(self, port):
        self.port = port

    def cli(self, *args):
        return subprocess.run(["redis-cli", "-p", str(self.port)] + list(args),
                              capture_output=True, text=True).stdout

    def info(self, section):
        out = {}
        for line in self.cli("info", section).splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                out[k] = v.strip()
        return out


# The persistence of every Redis of the benchmark (appendfsync from --fsync).
def redis_persistence(fsync):
    return ["--appendonly", "yes", "--appendfsync", fsync, "--save", ""]


class Redis(RedisCli):
    def __init__(self, fsync):
        super().__init__(harness.free_port())
        self.dir = tempfile.mkdtemp(prefix="receiptd-bench-redis-")
        self.log = os.path.join(self.dir, "redis.log")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir]
            + redis_persistence(fsync) + ["--logfile", self.log],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if self.cli("ping").strip() == "PONG":
                break
            time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        try:
            with open(self.log) as f:
                REDIS_SLOW_FSYNC.extend(ln.strip() for ln in f if "fsync is taking too long" in ln)
        except OSError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def write_ini(path, port, redis_port, redis_extra=None):
    """redis_port None: no [redis] port (redis_extra then names a cluster). The SQLite archive
    goes next to the config, in the run's own temp dir (the default path is relative to the
    current directory, which every run would share)."""
    redis = "" if redis_port is None else "port = %d\n" % redis_port
    redis += "".join("%s = %s\n" % kv_ for kv_ in (redis_extra or {}).items())
    with open(path, "w") as f:
        f.write("[component]\njid = receipts.localhost\nsecret = bench\nserver_host = 127.0.0.1\n"
                "server_port = %d\nuser_domains = localhost\nlog_level = warn\n[redis]\n%s"
                "max_inflight = 100000\n[delivery]\nmax_offline_messages = 100000000\n"
                "max_offline_bytes = 100000000000\nfetch_max_bytes = %d\n[sqlite]\npath = %s\n"
                % (port, redis, FETCH_MAX_BYTES,
                   os.path.join(os.path.dirname(os.path.abspath(path)), "archive.sqlite3")))


# ---- 1. store --------------------------------------------------------------------------------

class RewriteWatch:
    """Watches Redis' children (its AOF rewrites) every 5 ms from a thread, on the monotonic
    clock loadgen's --dump uses: when each ran, the CPU it took, and how busy the machine was
    meanwhile. Reading /proc costs far less than asking Redis."""

    def __init__(self, pid):
        self.pid, self.kids, self.busy = pid, {}, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            now = time.monotonic_ns() // 1000
            with open("/proc/stat") as f:
                cpu = [int(x) for x in f.readline().split()[1:]]
            # (now, busy ticks, all ticks) of the whole machine: idle and iowait are not busy.
            self.busy.append((now, sum(cpu) - cpu[3] - cpu[4], sum(cpu)))
            for task in os.listdir("/proc/%d/task" % self.pid):
                try:
                    with open("/proc/%d/task/%s/children" % (self.pid, task)) as f:
                        kids = [int(c) for c in f.read().split()]
                    for c in kids:
                        with open("/proc/%d/stat" % c) as f:
                            fl = f.read().rsplit(")", 1)[1].split()
                        first = self.kids.get(c, (now,))[0]
                        self.kids[c] = (first, now, (int(fl[11]) + int(fl[12])) / CLK)
                except (OSError, ValueError):
                    pass  # gone meanwhile
            self.stop.wait(0.005)

    def done(self):
        self.stop.set()
        self.thread.join()
        # A child seen once ran for about a sampling interval.
        return [(a, b + 5000, cpu) for a, b, cpu in self.kids.values()]

    def machine_busy(self, spans):
        """The machine's busy share (100% = one core) over the spans, from the samples."""
        busy = total = 0
        for (t0, b0, a0), (t1, b1, a1) in zip(self.busy, self.busy[1:]):
            if any(a <= t0 and t1 <= b for a, b, _ in spans):
                busy, total = busy + b1 - b0, total + a1 - a0
        return 100.0 * os.cpu_count() * busy / total if total else None


def split_by_rewrite(dump, warmup, spans):
    """loadgen's --dump of a latency run: p99 (ms) of the measured messages sent while no AOF
    rewrite ran, and how many were sent while one did, with their p99."""
    calm, during = [], []
    with open(dump) as f:
        for line in f:
            i, sent, lat = (int(x) for x in line.split())
            if i >= warmup:
                (during if any(a <= sent <= b for a, b, _ in spans) else calm).append(lat)

    def p99(v):
        v.sort()
        return v[int(0.99 * (len(v) - 1))] / 1000 if v else 0.0
    return p99(calm), len(during), p99(during), len(calm) + len(during)


def store_run(n, rate, window, fsync, receiptd=None, warmup=0):
    """One loadgen run against a fresh Redis (receiptd: another binary than this build's, for
    the before/after part); returns a dict of figures. warmup: that many of the n messages
    first, at the same rate, left out of the rate and the percentiles (loadgen --warmup)."""
    redis = Redis(fsync)
    tmp = tempfile.mkdtemp(prefix="receiptd-bench-")
    port = harness.free_port()
    ini = os.path.join(tmp, "receiptd.ini")
    write_ini(ini, port, redis.port)
    mem0 = int(redis.info("memory")["used_memory"])
    # Redis records every event of its own (a command, a fork, an AOF write or fsync) that took
    # 3 ms or more: whether a latency spike came from Redis or from elsewhere.
    redis.cli("config", "set", "latency-monitor-threshold", "3")
    # A latency run also records when each message was sent and how long it waited, to tell
    # the messages sent while Redis rewrote its AOF from the others.
    dump = os.path.join(tmp, "latencies") if rate else None
    lg = subprocess.Popen([LOADGEN, "--port", str(port), "--secret", "bench", "-n", str(n),
                           "--window", str(window), "--rate", str(rate)]
                          + (["--warmup", str(warmup)] if warmup else [])
                          + (["--dump", dump] if dump else []),
                          stdout=subprocess.PIPE, text=True)
    watch = RewriteWatch(redis.proc.pid) if dump else None
    log = os.path.join(tmp, "log")
    lg.stdout.readline()  # "ready"
    redis_cpu0 = proc_cpu(redis.proc.pid, True)
    rd = subprocess.Popen([receiptd or RECEIPTD, "-c", ini], stderr=open(log, "w"))
    time.sleep(0.2)
    rss_before = rss_kb(rd.pid)
    out = lg.stdout.read()
    redis_cpu = proc_cpu(redis.proc.pid, True) - redis_cpu0
    rd_log = harness.tail(log)
    rc = lg.wait()
    rewrites = {}
    if watch:
        spans = watch.done()
        if rc == 0 and os.path.exists(dump):
            calm, n_rw, p99_rw, n_all = split_by_rewrite(dump, warmup, spans)
            rewrites = {"calm_p99": calm, "rw_msgs": n_rw, "rw_p99": p99_rw, "msgs": n_all,
                        "rw_ms": sum(b - a for a, b, _ in spans) / 1000,
                        "rw_cpu_ms": 1000 * sum(c for _, _, c in spans),
                        "rw_busy": watch.machine_busy(spans) if spans else None}
    rss_after = rss_kb(rd.pid)
    cpu = proc_cpu(rd.pid)
    rd.terminate()
    rd.wait()
    fig = kv(out)
    mem1 = int(redis.info("memory")["used_memory"])
    evals, inner = redis_calls(redis)
    stats = redis.info("stats")
    # LATENCY LATEST: per event kind, name / time / latest ms / max ms (redis-cli prints one
    # field a line).
    lat = redis.cli("latency", "latest").split()
    redis_stall = max([int(lat[i]) for i in range(3, len(lat), 4) if lat[i].isdigit()] or [0])
    redis.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    if rc != 0 or "rate" not in fig:
        raise BenchError("loadgen store run failed (exit %s): %s; receiptd log:\n%s"
                         % (rc, out, rd_log))
    secs = float(fig["seconds"])
    return {
        "rate": float(fig["rate"]), "errors": int(fig["errors"]),
        "p50": float(fig["p50_ms"]), "p99": float(fig["p99_ms"]),
        "p999": float(fig["p999_ms"]), "gen_cpu": pct(fig["gen_cpu"]),
        "warm_p99": float(fig.get("warm_p99_ms", 0)),
        "rd_cpu": 100.0 * cpu / max(secs, 1e-9),
        # CPU per stored message (the whole run's, startup included), to price a target rate.
        "rd_us": 1e6 * cpu / n, "redis_us": 1e6 * redis_cpu / n,
        "gen_us": 1e6 * pct(fig["gen_cpu"]) / 100 * secs / n,
        "rss_before_mb": rss_before / 1024, "rss_after_mb": rss_after / 1024,
        "redis_bytes_per_msg": (mem1 - mem0) / n, "calls_per_msg": evals / n,
        "inner_per_msg": inner / n,
        # AOF rewrites fork Redis, which stops it for the fork itself (the last one's length).
        "forks": int(stats["total_forks"]), "fork_ms": int(stats["latest_fork_usec"]) / 1000,
        "redis_stall_ms": redis_stall,
        **rewrites,
    }


def latency_run(a, rate):
    """A run at a fixed offered rate, measured in the steady state: 5 s (at most N messages)
    after a warm-up second at the same rate, which gives each of the 1000 recipients its state
    in Redis. A new recipient's first message costs a trip to the archive and one to create the
    state (storage/SCHEMA.md): a one-time cost, reported apart as the warm-up's own p99."""
    return store_run(min(a.n, rate * 5) + rate, rate, 100000, a.fsync, warmup=rate)


# ---- 2. retrieval ----------------------------------------------------------------------------

def retrieval_run(q, fsync, senders_online=False, perf_data=None, receiptd=None):
    """loadgen queues q messages for r0@localhost, then retrieves them as r0; see the top."""
    redis = Redis(fsync)
    tmp = tempfile.mkdtemp(prefix="receiptd-bench-")
    port = harness.free_port()
    ini = os.path.join(tmp, "receiptd.ini")
    write_ini(ini, port, redis.port)
    args = [LOADGEN, "--port", str(port), "--secret", "bench", "-n", str(q), "--recipients", "1",
            "--window", "2000", "--fetch", "--pause"]
    if senders_online:
        args.append("--senders-online")
    lg = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rd = perf = None
    try:
        lg.stdout.readline()  # "ready"
        rd = subprocess.Popen([receiptd or RECEIPTD, "-c", ini],
                              stderr=open(os.path.join(tmp, "log"), "w"))
        time.sleep(0.2)
        rss0 = rss_kb(rd.pid)
        line = lg.stdout.readline()
        if not line.startswith("queued"):
            raise BenchError("loadgen did not queue: %r" % line)
        queued = kv(line)
        rss1 = rss_kb(rd.pid)
        redis_mb = int(redis.info("memory")["used_memory"]) / 2**20
        exact_peak = reset_peak(rd.pid)
        sampler = Sampler(rd.pid)
        sampler.start()
        if perf_data:
            perf = subprocess.Popen(["perf", "record", "-F", "499", "-o", perf_data, "-p",
                                     "%d,%d" % (rd.pid, redis.proc.pid)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        forks0, calls0 = int(redis.info("stats")["total_forks"]), redis_calls(redis)
        cpu0 = (proc_cpu(rd.pid), proc_cpu(redis.proc.pid, True)) + machine_cpu()
        lg.stdin.write("go\n")
        lg.stdin.flush()
        line = lg.stdout.readline()
        cpu1 = (proc_cpu(rd.pid), proc_cpu(redis.proc.pid, True)) + machine_cpu()
        forks, calls1 = int(redis.info("stats")["total_forks"]) - forks0, redis_calls(redis)
        rc = lg.wait()
        sampled = sampler.stop()
        if perf:
            perf.send_signal(signal.SIGINT)
            perf.wait()
        peak = max(status_kb(rd.pid, "VmHWM") if exact_peak else 0, sampled)
        rss2 = rss_kb(rd.pid)
        fig = kv(line)
        if rc != 0 or not line.startswith("retrieved"):
            raise BenchError("loadgen retrieval failed (exit %s): %r; receiptd log:\n%s"
                             % (rc, line, harness.tail(os.path.join(tmp, "log"))))
    finally:
        if perf and perf.poll() is None:
            perf.kill()
            perf.wait()
        if lg.poll() is None:
            lg.kill()
            lg.wait()
        if rd:
            rd.terminate()
            rd.wait()
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    secs = float(fig["seconds"])
    rd_cpu, redis_cpu = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    gen_cpu = pct(fig["gen_cpu"])
    d = [b - a_ for a_, b in zip(cpu0, cpu1)]
    items = max(int(fig["items"]), 1)
    return {
        "store_rate": float(queued["rate"]), "store_errors": int(queued["errors"]),
        "rate": float(fig["rate"]), "secs": secs,
        "batches": int(fig["batches"]), "items": int(fig["items"]),
        "receipts": int(fig["receipts"]),
        "rss_before_mb": rss0 / 1024, "rss_queued_mb": rss1 / 1024, "rss_peak_mb": peak / 1024,
        "rss_after_mb": rss2 / 1024, "peak_exact": exact_peak, "redis_mb": redis_mb,
        "forks": forks, "evals_per_msg": (calls1[0] - calls0[0]) / items,
        "inner_per_msg": (calls1[1] - calls0[1]) / items,
        "rd_cpu": 100 * rd_cpu / secs, "redis_cpu": 100 * redis_cpu / secs, "gen_cpu": gen_cpu,
        "other_cpu": max(0.0, 100 * (d[2] - rd_cpu - redis_cpu) / secs - gen_cpu),
        "irq_cpu": 100 * d[3] / secs, "steal_cpu": 100 * d[4] / secs,
    }


def profile(perf_data):
    """Top of a perf profile: share per process, then the hottest symbols."""
    def report(*sort):
        r = subprocess.run(["perf", "report", "-i", perf_data, "--stdio", "--no-children",
                            "-g", "none", "--percent-limit", "1.5", "--sort", ",".join(sort)],
                           capture_output=True, text=True)
        return [ln.rstrip() for ln in r.stdout.splitlines()
                if ln.strip() and not ln.startswith("#")]
    return report("comm")[:4], report("comm", "sym")[:18]


# ---- 3. side by side through Prosody ---------------------------------------------------------

class SbsRedis(harness.Redis):
    """The harness' Redis with the fsync policy of the rest of the benchmark (the harness uses
    'always'; Prosody's file storage does not fsync either way)."""

    def __init__(self, workdir, fsync):
        super().__init__(workdir)
        self.fsync = fsync

    def argv(self):
        a = super().argv()
        a[a.index("--appendfsync") + 1] = self.fsync
        return a


def c2s(port, user, *args):
    pw = harness.USERS[user][1]
    r = subprocess.run([C2SGEN, "--port", str(port), "--user", user, "--password", pw,
                        "--timeout", "300"] + [str(a) for a in args],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError("c2sgen as %s %s failed (exit %d): %s%s"
                         % (user, " ".join(map(str, args)), r.returncode, r.stdout, r.stderr))
    return kv(r.stdout)


def sbs_run(n, fsync, nagle, flip):
    """One side-by-side pair on a fresh Redis + Prosody + receiptd. flip: (b) before (a)."""
    tmp = tempfile.mkdtemp(prefix="receiptd-bench-sbs-")
    os.chmod(tmp, 0o755)  # prosodyctl runs as user prosody
    redis = SbsRedis(tmp, fsync)
    prosody = harness.Prosody(tmp, loglevel="warn")
    if not nagle:
        with open(prosody.cfg) as f:
            cfg = f.read()
        with open(prosody.cfg, "w") as f:
            f.write(cfg.replace("daemonize = false\n",
                                "daemonize = false\nnetwork_settings = { nagle = false }\n", 1))
    rd = harness.Receiptd(tmp, RECEIPTD, prosody, redis,
                          delivery={"max_offline_messages": "100000000",
                                    "max_offline_bytes": "100000000000",
                                    "fetch_max_bytes": str(FETCH_MAX_BYTES)},
                          extra={"redis": {"max_inflight": "100000"}})
    relay = "bob\\40%s@%s" % (harness.USER_DOMAIN, harness.COMPONENT)
    order = ["b", "a"] if flip else ["a", "b"]
    res = {}
    try:
        redis.start()
        prosody.start()
        rd.start()
        port = prosody.c2s_port
        procs = (prosody, rd, redis)
        for k in order:
            # Who works while storing, to say what bounds each side: CPU over the whole c2sgen
            # run (its login included), per process, 100% = one core.
            cpu0, t0 = [proc_cpu(p.popen.pid, True) for p in procs], time.monotonic()
            if k == "a":
                res["a_store"] = c2s(port, "alice", "--send", n, "--to",
                                     "bob@%s" % harness.USER_DOMAIN)
            else:
                res["b_store"] = c2s(port, "alice", "--send", n, "--to", relay, "--count-stored")
            secs = time.monotonic() - t0
            res[k + "_store"]["cpu"] = [100 * (proc_cpu(p.popen.pid, True) - c) / secs
                                        for p, c in zip(procs, cpu0)]
        for k in order:
            pid = prosody.popen.pid if k == "a" else rd.popen.pid
            before = rss_kb(pid)
            exact = reset_peak(pid)
            sampler = Sampler(pid)
            sampler.start()
            if k == "a":
                r = c2s(port, "bob", "--flood", n)
            else:
                r = c2s(port, "bob", "--fetch", harness.COMPONENT)
            peak = max(status_kb(pid, "VmHWM") if exact else 0, sampler.stop())
            r["rss_before_mb"], r["rss_peak_mb"] = before / 1024, peak / 1024
            res[k + "_get"] = r
    except BaseException:
        for p in (rd, prosody, redis):
            for path in p.logs + (p.extra_logs() if hasattr(p, "extra_logs") else []):
                sys.stderr.write("==== %s\n%s\n" % (path, harness.tail(path)))
        raise
    finally:
        for p in (rd, prosody, redis):
            p.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    if int(res["b_get"]["items"]) != n:
        raise BenchError("fetched %s of %d" % (res["b_get"]["items"], n))
    return res


# ---- 4. ceiling ------------------------------------------------------------------------------

# The arguments of the put script as receiptd calls it on a single Redis: the user's prefix and
# one index shard's four keys, then the link epoch and the dedupe window (every script's first
# two arguments, storage/scripts.c), and a receipt-requested message with an original id, so that
# dedupe is checked and written as well. redis-benchmark draws each __rand_int__ on its own: two of them make the id
# unique enough that dedupe seldom answers "dup" (which would skip the store).
BENCH_BLOB = ("1 1764052406123 1 18 4 8\nalice@localhost/r" + "chat" + "g0000001" + "<body>"
              + "x" * 250 + "</body><request xmlns='urn:xmpp:receipts'/>")
PUT_KEYS = ["5", "rd:{r__rand_int__@localhost}", "rd:{#0}:due", "rd:{#0}:online",
            "rd:{#0}:arch", "rd:{#0}:act"]
PUT_ARGV = ["1", "86400000", "r__rand_int__@localhost", "alice@localhost",
            "m__rand_int____rand_int__", "0a0b0c0d", BENCH_BLOB, "1", "1764052406123", "5000",
            "30000", "100000000", "100000000000"]

# The floors: what Redis alone does per message on this machine for stores far cheaper than
# receiptd's, each driven by redis-benchmark like the ceiling, with the same arguments (ARGV[1]
# the epoch, ARGV[6] the id suffix, ARGV[7] the blob). (key, label, Lua source or None for a
# plain HSET without a script).
FLOORS = [
    ("call", "a script call carrying the message, no command", "return 1"),
    ("hset", "a script storing the blob: one HSET",
     "redis.call('HSET', KEYS[1] .. ':m', ARGV[5] .. ARGV[6], ARGV[7]) return 1"),
    ("queue", "a script keeping an ordered queue: INCR seq, HSET blob, ZADD",
     "local seq = redis.call('INCR', KEYS[1] .. ':seq') local sid = seq .. '-' .. ARGV[6] "
     "redis.call('HSET', KEYS[1] .. ':m', sid, ARGV[7]) "
     "redis.call('ZADD', KEYS[1] .. ':q', seq, sid) return sid"),
    ("plain", "no script: one pipelined HSET of the blob", None),
]
# The ordered queue again, with the messages of PUTS_PER_CALL puts in one call (put_many's
# layout: five keys a put, then the epoch and dedupe window, then eleven arguments a put), as
# receiptd batches its puts: what batching could ever save a script-ordered store.
QUEUE_MANY = ("for i = 0, #KEYS / 5 - 1 do local P, b = KEYS[5 * i + 1], 2 + 11 * i "
              "local seq = redis.call('INCR', P .. ':seq') local sid = seq .. '-' .. ARGV[b + 4] "
              "redis.call('HSET', P .. ':m', sid, ARGV[b + 5]) "
              "redis.call('ZADD', P .. ':q', seq, sid) end return 1")


def command_usec(redis):
    """{command: microseconds Redis spent in it} (INFO commandstats)."""
    out = {}
    for line in redis.cli("info", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, rest = line[len("cmdstat_"):].split(":", 1)
            out[name] = int(re.search(r"usec=(\d+)", rest).group(1))
    return out


def redis_bench(n, fsync, script, per_call=1, split=None):
    """redis-benchmark, 50 clients, pipeline 32, on a fresh Redis with the benchmark's
    persistence: `script` (Lua source) called like receiptd's put, with the keys and arguments
    of per_call puts (put_many), or None for a plain HSET of the blob. Returns (calls/s, Redis
    CPU microseconds per call, AOF rewrite children included). split (a dict) gets where a
    call's time went, per call: in the commands the script ran ("commands") and in the script
    itself around them ("script": the Lua code and passing values between Lua and Redis)."""
    redis = Redis(fsync)
    # The put script answers "cold" for a recipient with no state in Redis: create the state of
    # the recipients redis-benchmark will pick (-r 1000: r000000000000 .. r000000000999) first.
    redis.cli("eval", "for i = 0, 999 do redis.call('SET', 'rd:{r' .. string.format('%012d', i)"
              " .. '@localhost}:seq', 0) end return 1", "0")
    if script is None:
        cmd = ["HSET", "rd:{r__rand_int__@localhost}:m", "m__rand_int____rand_int__", BENCH_BLOB]
    else:
        cmd = (["EVALSHA", redis.cli("script", "load", script).strip(), str(5 * per_call)]
               + PUT_KEYS[1:] * per_call + PUT_ARGV[:2] + PUT_ARGV[2:] * per_call)
    cpu0, usec0 = proc_cpu(redis.proc.pid, True), command_usec(redis)
    out = subprocess.run(["redis-benchmark", "-p", str(redis.port), "-n", str(n), "-c", "50",
                          "-P", "32", "-q", "-r", "1000"] + cmd,
                         capture_output=True, text=True).stdout
    cpu = proc_cpu(redis.proc.pid, True) - cpu0
    if split is not None:
        usec = {k: v - usec0.get(k, 0) for k, v in command_usec(redis).items()}
        inner = sum(v for k, v in usec.items() if k not in ("evalsha", "info", "config|get", "ping"))
        split.update(commands=inner / n, script=(usec.get("evalsha", 0) - inner) / n)
    redis.stop()
    m = re.search(r"([\d.]+) requests per second", out)
    return (float(m.group(1)) if m else 0.0), 1e6 * cpu / n


def redis_bench_batched(n, fsync, script, per_call, split=None):
    """redis_bench for n messages, per_call of them in each script call: (msg/s, Redis CPU
    microseconds per message); split as in redis_bench, per message."""
    calls, us = redis_bench(max(n // per_call, 1), fsync, script, per_call, split)
    if split:
        for k in split:
            split[k] /= per_call
    return calls * per_call, us / per_call


# The most puts receiptd sends in one put_many call (storage/store.c, PUT_BATCH_MAX): at
# saturation every loop turn gathers that many.
PUTS_PER_CALL = 32


def script_source(name):
    """The Lua source of one of receiptd's scripts, as storage/scripts.c has it."""
    return subprocess.run([os.path.join(BUILD, "tests", "bench", "dump_script"), name],
                          capture_output=True, text=True).stdout


def ceiling(n, fsync):
    """redis-benchmark running receiptd's put scripts themselves: (msg/s, Redis us per put) for
    one put per call (put) and for PUTS_PER_CALL per call (put_many, what receiptd sends on a
    single Redis when puts arrive faster than its loop turns)."""
    split = {}
    return (redis_bench(n, fsync, script_source("put"))
            + redis_bench_batched(n, fsync, script_source("put_many"), PUTS_PER_CALL, split)
            + (split["commands"], split["script"]))


def latency_ceiling(rate, fsync, script, every_ms=1):
    """putlat: Redis alone (a fresh one, the benchmark's persistence, the state of the 1000
    recipients created first) offered `script` (Lua source) at `rate` puts/s for 5 s after a
    warm-up second, one call of rate/1000 puts (put_many's layout) every millisecond over one
    connection, open loop, as receiptd sends the puts loadgen offers at that rate (every_ms > 1:
    a call every every_ms ms with that many ms of puts, each put's wait counted from its own
    millisecond, as if receiptd held puts to send fewer calls). Returns the
    put->answer percentiles (ms), those of the puts sent while no AOF rewrite ran, the share
    sent while one did, Redis CPU per put (us, its rewrite children included) and putlat's own
    CPU."""
    redis = Redis(fsync)
    redis.cli("eval", "for i = 0, 999 do redis.call('SET', 'rd:{r' .. string.format('%012d', i)"
              " .. '@localhost}:seq', 0) end return 1", "0")
    per = rate * every_ms // 1000
    cmd = (["EVALSHA", redis.cli("script", "load", script).strip(), str(5 * per)]
           + PUT_KEYS[1:] * per + PUT_ARGV[:2] + PUT_ARGV[2:] * per)
    tmp = tempfile.mkdtemp(prefix="receiptd-bench-")
    dump = os.path.join(tmp, "latencies")
    watch = RewriteWatch(redis.proc.pid)
    cpu0 = proc_cpu(redis.proc.pid, True)
    out = subprocess.run([PUTLAT, "--port", str(redis.port), "--rate", str(rate), "--seconds",
                          "5", "--warmup-seconds", "1", "--every-ms", str(every_ms),
                          "--dump", dump, "--"] + cmd,
                         capture_output=True, text=True)
    cpu = proc_cpu(redis.proc.pid, True) - cpu0
    spans = watch.done()
    redis.stop()
    fig = kv(out.stdout)
    if out.returncode != 0 or "p99_ms" not in fig:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BenchError("putlat failed (exit %s): %s %s" % (out.returncode, out.stdout,
                                                              out.stderr))
    calm, n_rw, _, n_all = split_by_rewrite(dump, rate, spans)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"rate": float(fig["rate"]), "p50": float(fig["p50_ms"]), "p99": float(fig["p99_ms"]),
            "p999": float(fig["p999_ms"]), "calm_p99": calm,
            "rw_share": 100.0 * n_rw / max(n_all, 1), "redis_us": 1e6 * cpu / (6 * rate),
            "gen_cpu": pct(fig["cpu"]), "late_p99": float(fig["late_p99_ms"])}


# ---- 5. Redis Cluster scaling ----------------------------------------------------------------

class BenchCluster:
    """A Redis Cluster of `masters` masters and `replicas` replicas each, every node a
    redis-server --cluster-enabled yes on free loopback ports (client and bus port), with the
    persistence of every other Redis of the benchmark. Built by hand rather than with
    tests/cluster/cluster.py (redis-cli --cluster create there needs at least 3 masters): the
    16384 slots split into equal ranges (CLUSTER ADDSLOTSRANGE), the nodes joined with CLUSTER
    MEET, the replicas attached with CLUSTER REPLICATE; ready when every node says
    cluster_state:ok and knows every node, and every replica's link to its master is up."""

    def __init__(self, masters, replicas, fsync, timeout=30):
        self.dir = tempfile.mkdtemp(prefix="receiptd-bench-cluster-")
        self.nodes, self.procs, self.logs = [], [], []
        self.n_masters = masters
        try:
            used = set()
            for i in range(masters * (1 + replicas)):
                port, bus = self._ports(used)
                d = os.path.join(self.dir, "n%d" % i)
                os.mkdir(d)
                log = os.path.join(d, "redis.log")
                self.procs.append(subprocess.Popen(
                    ["redis-server", "--port", str(port), "--cluster-port", str(bus),
                     "--bind", "127.0.0.1", "--dir", d, "--cluster-enabled", "yes",
                     "--cluster-config-file", os.path.join(d, "nodes.conf"),
                     "--cluster-node-timeout", "5000", "--repl-diskless-sync-delay", "0"]
                    + redis_persistence(fsync) + ["--logfile", log],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                self.nodes.append(RedisCli(port))
                self.nodes[-1].bus = bus
                self.logs.append(log)
            self._form(masters, replicas, time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _ports(used):
        while True:
            a, b = harness.free_port(), harness.free_port()
            if a != b and not {a, b} & used:
                used.update((a, b))
                return a, b

    def _wait(self, deadline, what, pred):
        while not pred():
            for i, p in enumerate(self.procs):
                if p.poll() is not None:
                    raise BenchError("cluster node %d (port %d) exited with %s; log:\n%s" % (
                        i, self.nodes[i].port, p.returncode, harness.tail(self.logs[i])))
            if time.monotonic() > deadline:
                raise BenchError("cluster of %d nodes: timed out waiting for %s; logs:\n%s" % (
                    len(self.nodes), what, "\n".join(harness.tail(x, 1500) for x in self.logs)))
            time.sleep(0.05)

    def _form(self, masters, replicas, deadline):
        nodes = self.nodes
        self._wait(deadline, "PONG", lambda: all(n.cli("ping").strip() == "PONG" for n in nodes))
        for i in range(masters):
            lo, hi = i * 16384 // masters, (i + 1) * 16384 // masters - 1
            r = nodes[i].cli("cluster", "addslotsrange", str(lo), str(hi)).strip()
            if r != "OK":
                raise BenchError("CLUSTER ADDSLOTSRANGE %d %d on port %d: %s" % (
                    lo, hi, nodes[i].port, r))
        for n in nodes[1:]:
            nodes[0].cli("cluster", "meet", "127.0.0.1", str(n.port), str(n.bus))
        ids = [n.cli("cluster", "myid").strip() for n in nodes]

        def known(n):  # every node, past the handshake
            lines = n.cli("cluster", "nodes").splitlines()
            return len(lines) == len(nodes) and not any("handshake" in ln for ln in lines)
        self._wait(deadline, "every node to know every node", lambda: all(map(known, nodes)))
        for j, n in enumerate(nodes[masters:]):
            master = ids[j % masters]
            self._wait(deadline, "CLUSTER REPLICATE on port %d" % n.port,
                       lambda: n.cli("cluster", "replicate", master).strip() == "OK")

        def ready(i, n):
            if "cluster_state:ok" not in n.cli("cluster", "info"):
                return False
            if i < masters:
                return int(n.info("replication").get("connected_slaves", -1)) == replicas
            return n.info("replication").get("master_link_status") == "up"
        self._wait(deadline, "cluster_state:ok and the replicas in sync",
                   lambda: all(ready(i, n) for i, n in enumerate(nodes)))

    def seeds(self):
        return ",".join("127.0.0.1:%d" % n.port for n in self.nodes[:self.n_masters])

    def pids(self):
        return [p.pid for p in self.procs]

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self.logs:
            try:
                with open(log) as f:
                    REDIS_SLOW_FSYNC.extend(ln.strip() for ln in f
                                            if "fsync is taking too long" in ln)
            except OSError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


# Commands that are not the work of a message: receiptd's and the benchmark's housekeeping.
_HOUSEKEEPING = ("script", "info", "config", "cluster", "ping", "command", "client", "hello",
                 "auth", "select", "readonly", "readwrite")


def node_calls(node):
    """{'evalsha': n, 'wait': n, 'inner': n}: EVALSHA calls, WAIT calls, and every other command
    (those run inside scripts included) but housekeeping, from INFO commandstats."""
    out = {"evalsha": 0, "wait": 0, "inner": 0}
    for k, v in node.info("commandstats").items():
        if not k.startswith("cmdstat_"):
            continue
        name = k[len("cmdstat_"):].split("|")[0]
        calls = int(re.search(r"calls=(\d+)", v).group(1))
        if name in ("evalsha", "wait"):
            out[name] += calls
        elif name not in _HOUSEKEEPING:
            out["inner"] += calls
    return out


def warn_lines(path):
    """receiptd's log lines (log_level = warn: everything it logged is a warning or worse)."""
    try:
        with open(path, errors="replace") as f:
            return [ln.rstrip("\n") for ln in f if ln.strip()]
    except OSError:
        return []


def cluster_run(masters, replicas, wait, n, fsync):
    """One store run at saturation (loadgen as for the store part: window 2000, 100 senders, 1000
    offline recipients) against masters x (1 + replicas) cluster nodes, or, with masters=0, the
    single non-cluster Redis of the store part. wait: [redis] wait_replicas (0: not set)."""
    db = Redis(fsync) if masters == 0 else BenchCluster(masters, replicas, fsync)
    nodes = [db] if masters == 0 else db.nodes
    pids = [db.proc.pid] if masters == 0 else db.pids()
    n_masters = max(masters, 1)
    tmp = tempfile.mkdtemp(prefix="receiptd-bench-cl-")
    port = harness.free_port()
    ini = os.path.join(tmp, "receiptd.ini")
    if masters == 0:
        write_ini(ini, port, db.port)
    else:
        extra = {"cluster": db.seeds()}
        if wait:
            extra["wait_replicas"] = str(wait)
        write_ini(ini, port, None, extra)
    log = os.path.join(tmp, "log")
    lg = rd = None
    try:
        lg = subprocess.Popen([LOADGEN, "--port", str(port), "--secret", "bench", "-n", str(n),
                               "--window", "2000", "--rate", "0"],
                              stdout=subprocess.PIPE, text=True)
        lg.stdout.readline()  # "ready"
        calls0 = [node_calls(x) for x in nodes]
        forks0 = sum(int(x.info("stats")["total_forks"]) for x in nodes)
        cpu0 = [proc_cpu(p, True) for p in pids]
        q0 = [sched(p)[1] for p in pids + [lg.pid]]
        m0, w0 = machine_cpu(), time.monotonic()
        rd = subprocess.Popen([RECEIPTD, "-c", ini], stderr=open(log, "w"))
        out = lg.stdout.read()
        q1 = [sched(p)[1] for p in pids + [lg.pid]]  # loadgen: read before it is reaped
        rc = lg.wait()
        m1, w1 = machine_cpu(), time.monotonic()
        cpu1 = [proc_cpu(p, True) for p in pids]
        rd_cpu, (rd_run, rd_wait) = proc_cpu(rd.pid), sched(rd.pid)
        rd_alive = rd.poll() is None
        calls1 = [node_calls(x) for x in nodes]
        forks = sum(int(x.info("stats")["total_forks"]) for x in nodes) - forks0
        fig = kv(out)
        if rc != 0 or "rate" not in fig or not rd_alive:
            raise BenchError("cluster store run (%d masters x %d replicas, wait %d) failed "
                             "(loadgen exit %s, receiptd %s): %s; receiptd log:\n%s" % (
                                 masters, replicas, wait, rc,
                                 "running" if rd_alive else "exited %s" % rd.returncode,
                                 out, harness.tail(log)))
    finally:
        if lg and lg.poll() is None:
            lg.kill()
            lg.wait()
        if rd:
            if rd.poll() is None:
                rd.terminate()
            rd.wait()
        warns = warn_lines(log)
        # loadgen's exit closes the link: what receiptd logs from then on is not about the run.
        end = ["lost connection to 127.0.0.1:%d" % port in ln for ln in warns]
        warns = warns[:end.index(True)] if True in end else warns
        db.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    # Every CPU figure over the same wall time, from receiptd's start to loadgen's exit (loadgen
    # reports its own CPU over its measured time, the handshake to the last ack: a few ms less).
    wall = w1 - w0
    gen_secs = pct(fig["gen_cpu"]) / 100 * float(fig["seconds"])
    redis_cpu = [100 * (b - a_) / wall for a_, b in zip(cpu0, cpu1)]
    # The masters' commands only: a replica's commandstats count what it replays.
    d = {k: sum(c1[k] - c0[k] for c0, c1 in zip(calls0[:n_masters], calls1))
         for k in calls0[0]}
    per_master = [sum(c1.values()) - sum(c0.values()) for c0, c1 in zip(calls0, calls1)][:n_masters]
    rd_pct, gen_pct = 100 * rd_cpu / wall, 100 * gen_secs / wall
    procs_pct = 100 * (m1[0] - m0[0]) / wall
    return {
        "rate": float(fig["rate"]), "errors": int(fig["errors"]), "wall": wall,
        "p50": float(fig["p50_ms"]), "p99": float(fig["p99_ms"]),
        "rd_cpu": rd_pct, "gen_cpu": gen_pct, "rd_wait": 100 * rd_wait / wall,
        "rd_loop": 100 * (rd_run + rd_wait) / wall, "rd_us": 1e6 * rd_run / n, "forks": forks,
        "others_wait": 100 * sum(b - a_ for a_, b in zip(q0, q1)) / wall,
        "redis_sum": sum(redis_cpu), "redis_max": max(redis_cpu[:n_masters]),
        "replica_sum": sum(redis_cpu[n_masters:]),
        "irq": 100 * (m1[1] - m0[1]) / wall, "steal": 100 * (m1[2] - m0[2]) / wall,
        "others": max(0.0, procs_pct - rd_pct - gen_pct - sum(redis_cpu)),
        "machine": 100 * sum(b - a_ for a_, b in zip(m0, m1)) / wall,
        "evals_per_msg": d["evalsha"] / n, "inner_per_msg": d["inner"] / n,
        "wait_per_msg": d["wait"] / n,
        "top_share": max(per_master) / max(sum(per_master), 1),
        "warnings": warns,
    }


# (label, masters, replicas per master, wait_replicas); masters 0 = the single non-cluster Redis
def cluster_setups(masters_list, with_wait):
    out = [("single Redis, no cluster", 0, 0, 0)]
    out += [("cluster: %d master%s" % (m, "" if m == 1 else "s"), m, 0, 0) for m in masters_list]
    if with_wait:
        out.append(("cluster: 3 masters + 3 replicas, `wait_replicas = 1`", 3, 1, 1))
    return out


def cluster_part(a, say, same_as_main):
    """Runs every setup a.cluster_runs times, round-robin (each round runs every setup once, so
    slow drift of the machine's other load hits all setups alike); returns the markdown section."""
    setups = cluster_setups([int(x) for x in a.cluster_masters.split(",")], not a.no_cluster_wait)
    t0, m0, load = time.monotonic(), machine_cpu(), os.getloadavg()
    tt0, slow0 = os.times(), len(REDIS_SLOW_FSYNC)
    res = {s[0]: [] for s in setups}
    redone = []  # (label, rate, others) of the runs done again
    for r in range(a.cluster_runs):
        for label, m, rep, w in setups:
            while True:
                x = cluster_run(m, rep, w, a.cluster_n, a.fsync)
                say("  cluster round %d, %s: %.0f msg/s; CPU receiptd %.0f%% (+%.0f%% waiting), "
                    "redis sum %.0f%% max %.0f%%, loadgen %.0f%%, irq %.0f%%, others %.0f%%, "
                    "machine %.0f%%; %d log lines" % (
                        r + 1, label, x["rate"], x["rd_cpu"], x["rd_wait"], x["redis_sum"],
                        x["redis_max"], x["gen_cpu"], x["irq"], x["others"], x["machine"],
                        len(x["warnings"])))
                if x["others"] <= a.cluster_max_noise or len(redone) >= a.cluster_redo:
                    break
                redone.append((label, x["rate"], x["others"]))
                say("  (other processes used %.0f%% of a core: this run again)" % x["others"])
            res[label].append(x)
    wall = time.monotonic() - t0
    tt1, m1 = os.times(), machine_cpu()
    ours = sum(tt1[i] - tt0[i] for i in range(4))
    others = max(0.0, m1[0] - m0[0] - ours)

    one = next((s[0] for s in setups if s[1] == 1 and s[2] == 0), None)
    ncpu = os.cpu_count()
    lines = [
        CLUSTER_HEAD,
        "",
        "Written by `tests/bench/run.py` part `cluster` (%s, %.0f s for this part, %s); %d "
        "rounds, each running every setup once, left to right; a value is the "
        "median over the rounds, each round's value in parentheses. Machine: %s. Load average "
        "at the start of the part %.2f / %.2f / %.2f; during it, processes other than the "
        "benchmark's used %.0f CPU-seconds (%.1f%% of the machine: noise in these figures). "
        "Redis logged a slow AOF fsync (disk busy) %d times.%s"
        % ((time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), wall,
            "the same invocation as the table above" if same_as_main
            else "a separate invocation, `--parts cluster`", a.cluster_runs, machine()) + load
           + (others, 100 * others / (wall * ncpu), len(REDIS_SLOW_FSYNC) - slow0,
              redo_note(redone, a))),
        "",
        "| figure | " + " | ".join(s[0] for s in setups) + " |",
        "|---|" + "---|" * len(setups),
    ]

    def pc(k):
        return lambda runs, s: "%.0f%%" % med(runs, k)

    def ratio(runs, s):
        return show([x["rate"] / y["rate"] for x, y in zip(runs, res[one])], fmt="%.2f")

    def redis_cpu(runs, s):
        v = "%.0f%% / %.0f%%" % (med(runs, "redis_sum"), med(runs, "redis_max"))
        return v + (" (replicas %.0f%%)" % med(runs, "replica_sum") if s[2] else "")

    figures = [
        ("stored+acked msg/s", lambda runs, s: show(runs, "rate")),
        ("vs 1 master, round by round", ratio if one else None),
        ("store->ack p50 / p99 (ms)",
         lambda runs, s: "%.1f / %.1f" % (med(runs, "p50"), med(runs, "p99"))),
        ("error answers instead of `<stored/>`", lambda runs, s: show(runs, "errors")),
        ("CPU: receiptd", lambda runs, s: show(runs, "rd_cpu", fmt="%.0f%%")),
        ("receiptd's event loop: on a core / waiting for one", lambda runs, s: "%.0f%% / %.0f%%"
         % (med(runs, "rd_loop") - med(runs, "rd_wait"), med(runs, "rd_wait"))),
        ("receiptd's event loop: CPU per message (µs) / msg/s it could do on a core of its own",
         lambda runs, s: "%.0f / %.0f" % (med(runs, "rd_us"), 1e6 / med(runs, "rd_us"))),
        ("CPU: loadgen", pc("gen_cpu")),
        ("CPU: redis-servers, sum / busiest master", redis_cpu),
        ("waiting for a core: loadgen and redis-servers (sum)", pc("others_wait")),
        ("CPU: interrupts (loopback TCP) / other processes", lambda runs, s: "%.0f%% / %.0f%%"
         % (med(runs, "irq"), med(runs, "others"))),
        ("machine busy (of %d%%)" % (100 * ncpu), lambda runs, s: show(runs, "machine",
                                                                       fmt="%.0f%%")),
        ("Redis commands per message: EVALSHA / inside scripts / WAIT",
         lambda runs, s: "%.2f / %.1f / %.2f" % (med(runs, "evals_per_msg"),
                                                 med(runs, "inner_per_msg"),
                                                 med(runs, "wait_per_msg"))),
        ("busiest master's share of the commands",
         lambda runs, s: "%.0f%%" % (100 * med(runs, "top_share")) if s[1] > 1 else ""),
        ("AOF rewrites (all nodes)", lambda runs, s: show(runs, "forks")),
        ("at 85% of its limit or more",
         lambda runs, s: ", ".join(cluster_limits(runs, s)) or "nothing"),
        ("receiptd log lines (warn level)",
         lambda runs, s: "%d" % sum(len(x["warnings"]) for x in runs)),
    ]
    for name, fn in figures:
        if fn:
            lines.append("| %s | %s |" % (name, " | ".join(fn(res[s[0]], s) for s in setups)))
    lines += [""] + cluster_verdict(setups, res, one) + [""] + [
        "- **How**: each run starts a fresh Redis (or cluster) and receiptd; `loadgen` plays the "
        "XMPP server exactly as in the store part (%d receipt-requested messages of ~250-byte "
        "bodies from 100 senders to 1000 offline recipients, at most 2000 unacknowledged, at "
        "saturation); the rate counts `<stored/>` acks. receiptd is configured with `[redis] "
        "cluster = ` the masters (its seeds), plus `wait_replicas` where the column says so; "
        "nothing else changes. Every node has AOF on, `appendfsync %s`, as every other Redis of "
        "the benchmark; the cluster is built by `run.py` itself (`BenchCluster`: equal slot "
        "ranges with CLUSTER ADDSLOTSRANGE, MEET, REPLICATE), no replicas unless the column "
        "says so." % (a.cluster_n, a.fsync),
        "- **CPU**: 100%% is one core and this machine has %d, so 'machine busy' (user, system, "
        "interrupt and stolen time of all cores) tops out at %d%%; receiptd is one event loop, "
        "so it tops out at 100%%. Every CPU figure is over the same time, from receiptd's start "
        "to loadgen's exit; per process from /proc (Redis with its AOF rewrite children), "
        "loadgen's from its own report. Interrupts are mostly the loopback TCP between the "
        "processes (softirq, charged to no process); 'other processes' is what the machine ran "
        "besides receiptd, loadgen and the redis-servers (this script, and anything else "
        "running on the machine). 'Waiting for a core' is the time a process was ready to run "
        "but every core was taken (its run-queue delay, /proc/PID/schedstat): receiptd's own, "
        "and the sum over loadgen and the redis-servers (their main threads). receiptd's event "
        "loop is its main thread (every stanza and every Redis reply goes through it): on a "
        "core plus waiting for one near 100%% means it never sleeps waiting for Redis or "
        "loadgen, so it is the serial bottleneck and would use a whole core if it had one; "
        "'CPU: receiptd' also counts its libuv pool threads (the SQLite archive, asked once for "
        "each recipient's first message, which Redis answers 'cold')." % (ncpu, 100 * ncpu),
        "- **Commands per message**: summed over the masters from `INFO commandstats` "
        "(commands run inside scripts count; `CLUSTER`, `SCRIPT`, `INFO`, `PING` and the like "
        "do not; a replica's replayed commands do not), divided by the messages stored. Above 1 "
        "EVALSHA per message are the puts Redis answered 'cold' (a recipient's first messages, "
        "put again once its state exists), the state creation, receiptd's periodic sweeps and, "
        "in a cluster, the index writes: the index shard of a user is in its own slot, often "
        "on another master, so a cluster cannot update it inside the put script as a single "
        "Redis does; receiptd gathers the index writes of one loop turn into one script call "
        "per shard. With `wait_replicas` one WAIT covers every put answered before it on that "
        "master's put connection (group commit). "
        "The busiest master's share is of all the commands the masters ran (1/N if the load "
        "were even): the 1000 recipients and 16 index shards do not hash evenly over N equal "
        "slot ranges.",
        "- **The XMPP server**: here `loadgen` plays it and costs little; behind a real server "
        "its own routing of the component's stanzas is a further ceiling (the side by side "
        "part measures receiptd through Prosody).",
    ]
    warns = [(label, w) for label, _m, _r, _w in setups for x in res[label]
             for w in x["warnings"]]
    if warns:
        lines += ["", "receiptd's log (level warn) during the measured runs, first lines:", "",
                  "```"]
        lines += ["[%s] %s" % (label, w[:300]) for label, w in warns[:20]]
        lines += ["```"]
    return "\n".join(lines) + "\n"


def redo_note(redone, a):
    """The runs done again because the machine was busy with something else."""
    if not redone:
        return (" No run had to be done again (other processes under %.0f%% of a core during "
                "each)." % a.cluster_max_noise)
    return (" %d run(s) were done again because other processes used more than %.0f%% of a "
            "core during them (at most %d in all; their results, not in the figures: %s)." % (
                len(redone), a.cluster_max_noise, a.cluster_redo,
                "; ".join("%s %.0f msg/s with %.0f%% other processes" % r for r in redone)))


def cluster_limits(runs, s):
    """What was at 85% of its limit or more in one setup (medians): the machine (all its cores),
    receiptd's event loop (on a core or waiting for one), the busiest Redis master."""
    ncpu = os.cpu_count()
    out = []
    if med(runs, "machine") >= 85 * ncpu:
        out.append("the machine (%.0f%% of %d%%)" % (med(runs, "machine"), 100 * ncpu))
    if med(runs, "rd_loop") >= 85:
        out.append("receiptd's event loop (%.0f%% on a core or waiting for one)"
                   % med(runs, "rd_loop"))
    if med(runs, "redis_max") >= 85:
        out.append("the busiest Redis (%.0f%%)" % med(runs, "redis_max"))
    return out


def cluster_verdict(setups, res, one):
    """Where the ceiling is, read off the medians: how the rate scaled, and what is at (or near)
    its limit at the largest cluster without replicas."""
    plain = [s for s in setups if s[1] > 0 and s[2] == 0]
    if not plain:
        return []
    ncpu = os.cpu_count()
    top = max(plain, key=lambda s: s[1])
    runs = res[top[0]]
    f = {k: med(runs, k) for k in ("rate", "rd_cpu", "rd_wait", "rd_loop", "machine",
                                   "redis_max", "redis_sum", "gen_cpu", "irq", "others")}
    out = []
    if one and len(plain) > 1:
        r1 = med(res[one], "rate")
        out.append("**Scaling** from 1 master (%.0f msg/s): %s." % (r1, ", ".join(
            "%d masters %.0f msg/s, %.0f%% of linear" % (
                s[1], med(res[s[0]], "rate"), 100 * med(res[s[0]], "rate") / (r1 * s[1]))
            for s in plain if s[1] > 1)))
    out.append("**Where the ceiling is** (medians of the '%s' column): %.0f msg/s with "
               "receiptd's event loop %.0f%% of the time on a core and %.0f%% waiting for one "
               "(receiptd %.0f%% CPU in all), the busiest master at %.0f%%, all redis-servers "
               "together %.0f%%, loadgen %.0f%%, interrupts %.0f%%, other processes %.0f%%: the "
               "machine %.0f%% busy of %d%%." % (
                   top[0], f["rate"], f["rd_loop"] - f["rd_wait"], f["rd_wait"], f["rd_cpu"],
                   f["redis_max"], f["redis_sum"], f["gen_cpu"], f["irq"], f["others"],
                   f["machine"], 100 * ncpu))
    limits = cluster_limits(runs, top)
    if limits:
        out.append("At 85% of its limit or more: " + ", ".join(limits) + ".")
    else:
        out.append("Nothing is at 85% of its limit by these figures: with more busy processes "
                   "than cores, the rate is then bounded by how the scheduler shares the cores "
                   "between them, not by one of them.")
    if f["rd_loop"] >= 85:
        out.append("receiptd is one event loop that every stanza and every Redis reply goes "
                   "through; at %.0f%% it almost never sleeps waiting for Redis or loadgen, so "
                   "it is the serial bottleneck, and on %d cores shared with loadgen and %d "
                   "redis-servers it gets %.0f%% of a core. More masters add processes, not "
                   "cores: they cannot raise the rate here." % (
                       f["rd_loop"], ncpu, top[1], f["rd_loop"] - f["rd_wait"]))
    out.append("receiptd's event loop spends %s per message, so with a core of its own it "
               "would top out near %s msg/s respectively (messages over its loop's "
               "CPU-seconds, an estimate): past that, one receiptd cannot go faster whatever "
               "the number of masters." % (
                   ", ".join("%.0f µs (%s)" % (med(res[s[0]], "rd_us"), s[0]) for s in setups),
                   " / ".join("%.0f" % (1e6 / med(res[s[0]], "rd_us")) for s in setups)))
    return out


# ---- report ----------------------------------------------------------------------------------

def fork_note(rate, sat_rate, fork_ms, forks):
    """What an AOF rewrite does to the latency at the offered rate, in this run's numbers."""
    if not forks:
        text = "Latency at %d msg/s offered: no AOF rewrite (fork of Redis) in that run." % rate
    else:
        text = ("Latency at %d msg/s offered: Redis rewrites its AOF when it has doubled (from "
                "64 MB), %.0f time(s) in that run, and each rewrite forks Redis, which stopped it "
                "for %.1f ms here; %.0f messages arrive meanwhile."
                % (rate, forks, fork_ms, rate * fork_ms / 1e3))
    if sat_rate <= rate:
        return text + (" Offered at or above the saturation rate (%.0f msg/s), the backlog never "
                       "drains: the p99 is queueing, not latency." % sat_rate)
    if not forks:
        return text
    late = rate * fork_ms / 1e3 * sat_rate / (sat_rate - rate)
    return text + (" Drained at the %.0f msg/s of headroom left below saturation, they and those "
                   "arriving while they drain, about %.0f messages per fork, wait longer than "
                   "usual; for a p99 of 5 ms they must stay under 1%% of the run." % (
                       sat_rate - rate, late))


def rewrite_note(rate, fixed, rw):
    """Why the messages sent during an AOF rewrite wait, in this run's numbers."""
    return ("At %d msg/s offered, the messages sent while no AOF rewrite ran had a p99 of %.1f "
            "ms (median of the runs); those sent while one ran, %s of each run, a p99 of %s ms. "
            "The rewrite is a forked child serializing the whole dataset: it took %.0f ms of CPU "
            "over its %.0f ms (medians), close to a whole core, and the machine was %.0f%% busy "
            "of %d%% meanwhile. The load itself (Redis, receiptd, the generator and the loopback "
            "TCP between them) needs about one core at this rate (the CPU rows above), so while "
            "the child runs the two cores are full and every message queues. A p99 of %d ms "
            "needs fewer than 1%% of the messages to wait like that. %s"
            % (rate, med(fixed, "calm_p99"),
               " / ".join("%.1f%%" % (100 * r["rw_msgs"] / max(r["msgs"], 1)) for r in rw),
               " / ".join("%.1f" % r["rw_p99"] for r in rw),
               med(rw, "rw_cpu_ms"), med(rw, "rw_ms"), med(rw, "rw_busy"),
               100 * os.cpu_count(), T_P99_MS,
               ("Between rewrites the target holds; over a run that contains one it does not, "
                "here. Meeting it through rewrites would take a load that leaves a core free "
                "(Redis' put script costs most of it)." if med(fixed, "calm_p99") <= T_P99_MS
                else "Even between rewrites the p99 is above the target here.")))


def latency_ceiling_note(rate, lat, fixed):
    """What Redis alone gives at the latency target's rate, beside what receiptd gives."""
    put, queue = lat["put"], lat["queue"]
    p99, calm, us = med(put, "p99"), med(put, "calm_p99"), med(put, "redis_us")
    text = ("Redis alone, offered receiptd's put at %d puts/s the way receiptd sends it (a call "
            "of %d puts every millisecond, never waiting for the answers before), with no "
            "receiptd, no XMPP and no generator of stanzas running, answers with a p99 of %.1f "
            "ms (%.1f ms for the puts sent while no AOF rewrite ran); it spends %.1f us of CPU a "
            "put, %.0f%% of a core at this rate."
            % (rate, rate // 1000, p99, calm, us, us * rate / 1e4))
    if fixed:
        text += (" receiptd's whole path (loadgen, XMPP, receiptd and the same Redis) had a p99 "
                 "of %.1f ms at that rate%s, with Redis spending %.1f us a message: putlat's puts "
                 "(the ceiling's arguments: one sender, a fixed clock) cost Redis %s what "
                 "receiptd's own did, so this row bounds the target from the Redis side rather "
                 "than reproducing receiptd's runs."
                 % (med(fixed, "p99"), " (%.1f ms between rewrites)" % med(fixed, "calm_p99")
                    if all("calm_p99" in r for r in fixed) else "", med(fixed, "redis_us"),
                    "%.2f times" % (us / med(fixed, "redis_us"))))
    if p99 > T_P99_MS and calm > T_P99_MS:
        text += (" So the %d ms target is missed inside Redis, before receiptd adds anything, "
                 "even between AOF rewrites: at this rate the put script keeps Redis' one "
                 "thread busy enough that the calls queue behind each other." % T_P99_MS)
    elif p99 > T_P99_MS:
        text += (" So Redis alone holds the %d ms target between AOF rewrites and misses it "
                 "only through them: the puts sent while the rewrite's child takes a core wait."
                 % T_P99_MS)
    else:
        text += (" Redis alone meets the %d ms target at this rate: what receiptd's path adds "
                 "(its own work, and the two cores it shares with Redis and the generator) is "
                 "what misses it." % T_P99_MS if fixed and med(fixed, "p99") > T_P99_MS else "")
    put2 = lat["put2"]
    ratios = [{"r": b["redis_us"] / x["redis_us"]} for x, b in zip(put, put2)]
    text += (" Sent as a call every 2 ms (puts held one millisecond, the hold counted in their "
             "wait), the same puts cost Redis %.1f us each (%s of the call-a-millisecond figure, "
             "round by round) and waited p99 %.1f ms%s."
             % (med(put2, "redis_us"), show(ratios, "r", "%.2f"), med(put2, "p99"),
                "" if med(ratios, "r") < 0.9 else
                ": holding puts saved Redis no CPU worth the millisecond in this run"))
    text += (" The ordered-queue floor (INCR, HSET, ZADD: no dedupe, no quota, no per-device "
             "state, no index) offered the same way: p99 %.1f ms at %.1f us a put (%.0f%% of a "
             "core)%s." % (med(queue, "p99"), med(queue, "redis_us"),
                           med(queue, "redis_us") * rate / 1e4,
                           ": a store that cheap leaves Redis the headroom the target needs, "
                           "so the target is not out of reach on this machine for every data "
                           "model, only for one that costs Redis what receiptd's put does"
                           if med(queue, "p99") <= T_P99_MS < p99 else ""))
    return text


def floor_note(floor, sat):
    """What the floors prove about the store target, in this run's numbers."""
    queue, plain = med(floor["queue"], 0), med(floor["plain"], 0)
    many = med(floor["queue_many"], 0)
    text = ("The floors are stores far simpler than receiptd's, run like the ceiling. Keeping "
            "each message in an ordered per-user queue with one script call (INCR, HSET, ZADD; "
            "no dedupe, no quota, no per-device state, no index) reaches %.0f msg/s on one Redis "
            "here, %.0f%% of the %d msg/s target, and %.0f msg/s with %d messages per call; a "
            "plain pipelined HSET of the blob, with no order and no script, %.0f msg/s."
            % (queue, 100 * queue / T_STORE, T_STORE, many, PUTS_PER_CALL, plain))
    if max(queue, many) < T_STORE:
        text += (" So no store that orders each message with Redis script calls can take %d "
                 "msg/s on this machine, whatever receiptd does, batched or not." % T_STORE)
    if sat:
        rd, gen = med(sat, "rd_us"), med(sat, "gen_us")
        redis_min = min(med(floor["queue_many"], 1), med(floor["queue"], 1))
        cores = (rd + gen + redis_min) * T_STORE / 1e6
        text += (" Nor is the rest of the path free: at %d msg/s the generator alone, at its "
                 "measured %.1f us per message, would take %.1f cores, receiptd at its %.1f "
                 "us (libstrophe's parse and serialization included) %.1f cores, and Redis, "
                 "even for the cheapest ordered queue above (%.1f us per message, far less than "
                 "receiptd's put), %.1f: %.1f cores in all, of the machine's %d%s."
                 % (T_STORE, gen, gen * T_STORE / 1e6, rd, rd * T_STORE / 1e6, redis_min,
                    redis_min * T_STORE / 1e6, cores, os.cpu_count(),
                    ", so the target is out of reach here whatever the store"
                    if cores > (os.cpu_count() or 1) else ""))
    return text


def med(runs, key=None):
    """The median of the runs' values, or of their field `key` (a dict key or tuple index)."""
    vals = [r if key is None else r[key] for r in runs]
    return statistics.median(vals)


def show(runs, key=None, fmt="%.0f"):
    """The median, and each run's value when there are several."""
    vals = [r if key is None else r[key] for r in runs]
    m = fmt % statistics.median(vals)
    if len(vals) > 1:
        m += " (" + ", ".join(fmt % v for v in vals) + ")"
    return m


def verdict(ok):
    return "**met**" if ok else "**missed**"


def machine():
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "?")
    mem = status_like("/proc/meminfo", "MemTotal") / 2**20
    return "%d cores, %s, %.0f GB RAM; %s" % (os.cpu_count(), cpu, mem, platform.platform())


def status_like(path, key):
    with open(path) as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1))


def merge_results(path, main_text, sections):
    """The results file: the main table (store, retrieval, sbs, ceiling), then the sections of
    the parts with their own (SECTIONS order), given as {heading: text}. A part this invocation
    did not run (text None) keeps its text from the existing file (each section says when it
    was measured), so `--parts cluster` rewrites only the cluster section."""
    try:
        with open(path) as f:
            old = f.read()
    except OSError:
        old = ""
    cuts = sorted((old.find("\n" + h + "\n"), h) for h in SECTIONS)
    cuts = [(i, h) for i, h in cuts if i >= 0]
    old_main = old if not cuts else old[:cuts[0][0] + 1]
    kept = {h: old[i + 1:(cuts[k + 1][0] + 1 if k + 1 < len(cuts) else len(old))]
            for k, (i, h) in enumerate(cuts)}
    text = main_text if main_text is not None else (old_main or "# receiptd benchmark results\n")
    for h in SECTIONS:
        part = sections.get(h)
        part = part if part is not None else kept.get(h, "")
        if part:
            text = text.rstrip("\n") + "\n\n" + part.rstrip("\n") + "\n"
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=200000, help="messages per store run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", type=int, default=20000, help="offered msg/s of the latency run")
    ap.add_argument("--fsync", default="everysec", help="Redis appendfsync everywhere")
    ap.add_argument("--queue", type=int, default=1000000, help="Q, messages queued for retrieval")
    ap.add_argument("--queue-runs", type=int, help="runs of the Q retrieval (default --runs)")
    ap.add_argument("--online-queue", type=int, default=1000000,
                    help="Q of the senders-online retrieval variant")
    ap.add_argument("--sbs-n", type=int, default=10000, help="N of the side by side")
    ap.add_argument("--parts", default="store,retrieval,sbs,ceiling,cluster")
    ap.add_argument("--cluster-n", type=int, default=100000,
                    help="messages per run of the cluster part")
    ap.add_argument("--cluster-runs", type=int, help="rounds of the cluster part (default --runs)")
    ap.add_argument("--cluster-masters", default="1,2,3", help="cluster sizes without replicas")
    ap.add_argument("--cluster-max-noise", type=float, default=15,
                    help="a cluster run during which other processes used more than this %% of "
                         "a core is done again (at most --cluster-redo times in all)")
    ap.add_argument("--cluster-redo", type=int, default=6)
    ap.add_argument("--no-cluster-wait", action="store_true",
                    help="no 3 masters + 3 replicas row with wait_replicas = 1")
    ap.add_argument("--no-perf", action="store_true", help="no profile when a target is missed")
    ap.add_argument("--baseline", metavar="REV",
                    help="also run part compare: receiptd built at git revision REV against this "
                    "tree's, side by side")
    ap.add_argument("--compare-runs", type=int, default=3, help="rounds of the compare part")
    ap.add_argument("--compare-n", type=int, default=100000, help="N of its store runs")
    ap.add_argument("--compare-q", type=int, default=100000, help="Q of its retrievals")
    ap.add_argument("--compare-rate", type=int, default=9000,
                    help="offered msg/s of its latency run")
    ap.add_argument("--quick", action="store_true",
                    help="small sizes, one run each (a smoke test; not for RESULTS.md)")
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    a = ap.parse_args()
    if a.quick:
        a.n, a.runs, a.queue, a.online_queue, a.sbs_n = 20000, 1, 50000, 20000, 2000
        a.cluster_n, a.cluster_runs = 20000, 1
        a.compare_runs, a.compare_n, a.compare_q, a.compare_rate = 1, 20000, 20000, 5000
        if a.out == os.path.join(HERE, "RESULTS.md"):
            a.out = os.path.join(tempfile.gettempdir(), "receiptd-bench-quick.md")
    qruns = a.queue_runs or a.runs
    a.cluster_runs = a.cluster_runs or a.runs
    parts = set(a.parts.split(","))
    if a.baseline:
        parts.add("compare")
    unknown = parts - MAIN_PARTS - {"cluster", "compare"}
    if unknown:
        ap.error("unknown part(s): %s" % ", ".join(sorted(unknown)))
    if "compare" in parts and not a.baseline:
        ap.error("part compare needs --baseline REV")
    t_start, cpu_start, load = time.monotonic(), machine_cpu(), os.getloadavg()
    rows, notes = [], []

    def row(figure, value, target="", ok=None):
        rows.append((figure, value, target, "" if ok is None else verdict(ok)))

    def say(msg):
        sys.stdout.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
        sys.stdout.flush()

    s_rate = None
    if "store" in parts:
        say("store: %d runs of %d messages at saturation, %d (after %d of warm-up) at %d msg/s"
            % (a.runs, a.n, min(a.n, a.rate * 5), a.rate, a.rate))
        sat = [store_run(a.n, 0, 2000, a.fsync) for _ in range(a.runs)]
        fixed = [latency_run(a, a.rate) for _ in range(a.runs)]
        s_rate = med(sat, "rate")
        # Latency means something only below capacity: also offer half the saturation rate.
        half = max(1000, int(s_rate / 2000) * 1000)
        say("store: %d runs at %d msg/s (half the saturation rate)" % (a.runs, half))
        halfr = [latency_run(a, half) for _ in range(a.runs)]
        # Where the latency target stops holding: the p99 from half the saturation rate up.
        curve = [(half, halfr)]
        for frac in (0.6, 0.7, 0.8):
            rate = max(1000, int(s_rate * frac / 1000) * 1000)
            if rate > curve[-1][0] and rate != a.rate:
                say("store: %d runs at %d msg/s (%.0f%% of saturation)" % (a.runs, rate,
                                                                           100 * frac))
                curve.append((rate, [latency_run(a, rate) for _ in range(a.runs)]))
        curve.append((a.rate, fixed))
        curve.sort(key=lambda c: c[0])
        row("store: stored+acked msg/s at saturation (N=%d, window 2000)" % a.n,
            show(sat, "rate"), ">= %d" % T_STORE, s_rate >= T_STORE)
        row("store: store->ack p50 / p99 / p99.9 at saturation (ms)", "%.1f / %.1f / %.1f" % (
            med(sat, "p50"), med(sat, "p99"), med(sat, "p999")))
        p99 = med(fixed, "p99")
        # A latency counts only when the run kept up: a run whose messages all got errors (rate
        # 0) has no latencies at all, which must not read as "met".
        kept_up = all(r["rate"] >= 0.9 * a.rate and not r["errors"] for r in fixed)
        row("store: store->ack p50 / p99 / p99.9 at %d msg/s offered (ms)" % a.rate,
            "%.1f / %.1f / %.1f" % (med(fixed, "p50"), p99, med(fixed, "p999")),
            "p99 <= %d" % T_P99_MS, p99 <= T_P99_MS and kept_up)
        row("store: rate reached at %d msg/s offered" % a.rate, show(fixed, "rate"))
        row("store: store->ack p99 during the warm-up second before each latency run, when every "
            "recipient is new (ms; by offered rate)",
            ", ".join("%d: %.1f" % (rate, med(rs, "warm_p99")) for rate, rs in curve))
        if not any(r.get("rw_msgs") for r in fixed):
            notes.append(fork_note(a.rate, s_rate, med(fixed, "fork_ms"), med(fixed, "forks")))
        row("store: Redis AOF rewrites during the %d msg/s run / the fork's pause of Redis (ms)"
            % a.rate, "%s / %s" % (show(fixed, "forks"), show(fixed, "fork_ms", "%.1f")))
        if all("calm_p99" in r for r in fixed):
            row("store: store->ack p99 at %d msg/s offered, messages sent while no AOF rewrite "
                "ran / while one ran (ms), and the share sent while one ran" % a.rate,
                "%s / %s; %s" % (show(fixed, "calm_p99", "%.1f"),
                                 " ".join("%.1f" % r["rw_p99"] if r["rw_msgs"] else "-"
                                          for r in fixed),
                                 " ".join("%.1f%%" % (100 * r["rw_msgs"] / max(r["msgs"], 1))
                                          for r in fixed)))
            rw = [r for r in fixed if r["rw_msgs"] and r["rw_busy"] is not None]
            if rw:
                row("store: each AOF rewrite in the %d msg/s runs: the child's life / its CPU "
                    "(ms) / the machine busy meanwhile (of %d%%)" % (a.rate, 100 * os.cpu_count()),
                    ", ".join("%.0f / %.0f / %.0f%%" % (r["rw_ms"], r["rw_cpu_ms"], r["rw_busy"])
                              for r in rw))
                notes.append(rewrite_note(a.rate, fixed, rw))
        p99h = med(halfr, "p99")
        row("store: store->ack p50 / p99 / p99.9 at %d msg/s offered, half the saturation rate "
            "(ms)" % half, "%.1f / %.1f / %.1f" % (med(halfr, "p50"), p99h, med(halfr, "p999")),
            "p99 <= %d" % T_P99_MS,
            p99h <= T_P99_MS and all(r["rate"] >= 0.9 * half and not r["errors"] for r in halfr))
        row("store: store->ack p99 (ms) by offered rate (msg/s), with the longest stall Redis "
            "itself recorded in those runs (its LATENCY monitor, events of 3 ms or more)",
            ", ".join("%d: %.1f (Redis %d ms)" % (rate, med(rs, "p99"),
                                                   max(r["redis_stall_ms"] for r in rs))
                      for rate, rs in curve))
        ok = [rate for rate, rs in curve if med(rs, "p99") <= T_P99_MS and
              all(r["rate"] >= 0.9 * rate and not r["errors"] for r in rs)]
        row("store: highest of those rates with p99 <= %d ms" % T_P99_MS,
            "%d (%.0f%% of saturation)" % (max(ok), 100 * max(ok) / s_rate) if ok else "none")
        row("store: error answers instead of <stored/> (saturation / %d offered / half rate; "
            "a client would retry each)" % a.rate,
            "%s / %s / %s" % (show(sat, "errors"), show(fixed, "errors"), show(halfr, "errors")),
            "0", not any(r["errors"] for r in sat + fixed + halfr))
        row("store: receiptd RSS before / after (MB)", "%.1f / %.1f" % (
            med(sat, "rss_before_mb"), med(sat, "rss_after_mb")))
        row("store: CPU of receiptd / of the generator at saturation", "%.0f%% / %.0f%%" % (
            med(sat, "rd_cpu"), med(sat, "gen_cpu")))
        row("store: CPU per stored message at saturation: receiptd / Redis (with its AOF "
            "rewrites) / generator (us; loopback TCP interrupts not included)",
            " / ".join("%.1f" % med(sat, k) for k in ("rd_us", "redis_us", "gen_us")))
        row("store: cores that %d msg/s would take at those costs (the machine has %d)"
            % (T_STORE, os.cpu_count()), "%.1f" % (
                sum(med(sat, k) for k in ("rd_us", "redis_us", "gen_us")) * T_STORE / 1e6))
        bpm = med(sat, "redis_bytes_per_msg")
        row("store: Redis memory per stored message (bytes)", "%.0f" % bpm,
            "<= 2x stanza (~%d)" % (2 * 420), bpm <= 2 * 420)
        row("store: Redis calls per message (EVALSHA / commands inside the script)",
            "%.2f / %.1f" % (med(sat, "calls_per_msg"), med(sat, "inner_per_msg")))

    r_rate = None
    if "retrieval" in parts:
        say("retrieval: %d runs of Q=%d (senders offline), %d of Q=%d (senders online)" % (
            qruns, a.queue, a.runs, a.online_queue))
        big = []
        for i in range(qruns):
            big.append(retrieval_run(a.queue, a.fsync))
            say("  Q=%d run %d: %.0f msg/s retrieved" % (a.queue, i + 1, big[-1]["rate"]))
        online = [retrieval_run(a.online_queue, a.fsync, senders_online=True)
                  for _ in range(a.runs)]
        r_rate = med(big, "rate")
        row("retrieval: msg/s fetched+acked, Q=%d queued for one user, senders offline" % a.queue,
            show(big, "rate"), ">= %d" % T_RETRIEVE, r_rate >= T_RETRIEVE)
        row("retrieval: the same, Q=%d, senders online (receipts pushed, not queued)"
            % a.online_queue, show(online, "rate"), ">= %d" % T_RETRIEVE,
            med(online, "rate") >= T_RETRIEVE)
        row("retrieval: pages / messages per page (Q=%d)" % a.queue, "%d / %.1f" % (
            med(big, "batches"), med(big, "items") / max(med(big, "batches"), 1)))
        rss_max = max(med(big, "rss_queued_mb"), med(big, "rss_peak_mb"))
        row("retrieval: receiptd RSS before queueing / with Q=%d queued / peak while retrieving "
            "(MB)" % a.queue, "%.1f / %.1f / %.1f" % (
                med(big, "rss_before_mb"), med(big, "rss_queued_mb"), med(big, "rss_peak_mb")),
            "< %d with 1000000 queued" % T_RSS_MB, rss_max < T_RSS_MB)
        row("retrieval: Redis used memory with Q=%d queued (MB; the queue lives there)" % a.queue,
            show(big, "redis_mb"))
        row("retrieval: queueing rate of those Q (msg/s, one recipient) / error answers",
            "%s / %s" % (show(big, "store_rate"), show(big, "store_errors")))
        row("retrieval: Redis AOF rewrites (forks) while retrieving Q=%d" % a.queue,
            show(big, "forks"))
        row("retrieval: Redis calls per retrieved message (EVALSHA / commands inside scripts)",
            "%.2f / %.1f" % (med(big, "evals_per_msg"), med(big, "inner_per_msg")))
        row("retrieval: CPU while retrieving: receiptd / Redis (with its AOF rewrite children) / "
            "generator / other processes / interrupts (loopback TCP) / stolen",
            " / ".join("%.0f%%" % med(big, k) for k in (
                "rd_cpu", "redis_cpu", "gen_cpu", "other_cpu", "irq_cpu", "steal_cpu")),
            "(100% = one core)")
        if not all(r["peak_exact"] for r in big):
            notes.append("The peak RSS is sampled every 10 ms (clear_refs was not allowed), not "
                         "read from VmHWM.")

    if "sbs" in parts:
        say("side by side: %d runs x 2 Prosody configurations, N=%d" % (a.runs, a.sbs_n))
        for nagle in (True, False):
            runs = [sbs_run(a.sbs_n, a.fsync, nagle, flip=i % 2 == 1) for i in range(a.runs)]
            label = "Prosody as in the e2e harness" if nagle else "Prosody with nagle = false"
            vals = {}
            for key, sub, field in (("as", "a_store", "rate"), ("bs", "b_store", "rate"),
                                    ("ag", "a_get", "rate"), ("bg", "b_get", "rate")):
                vals[key] = [float(r[sub][field]) for r in runs]
            sratio = [b / a_ for a_, b in zip(vals["as"], vals["bs"])]
            gratio = [b / a_ for a_, b in zip(vals["ag"], vals["bg"])]
            row("%s: store msg/s (a) Prosody offline / (b) through receiptd, acked" % label,
                "%s / %s" % (show(vals["as"]), show(vals["bs"])))
            row("%s: store ratio (b)/(a), pair by pair" % label, show(sratio, fmt="%.2f"),
                ">= %d" % T_STORE_RATIO, med(sratio) >= T_STORE_RATIO)
            row("%s: retrieval msg/s (a) login flood / (b) summary+fetch+ack" % label,
                "%s / %s" % (show(vals["ag"]), show(vals["bg"])))
            row("%s: retrieval ratio (b)/(a), pair by pair" % label, show(gratio, fmt="%.2f"))
            row("%s: peak RSS while retrieving: Prosody in (a) / receiptd in (b) (MB)" % label,
                "%.1f (from %.1f) / %.1f (from %.1f)" % (
                    med([float(r["a_get"]["rss_peak_mb"]) for r in runs]),
                    med([float(r["a_get"]["rss_before_mb"]) for r in runs]),
                    med([float(r["b_get"]["rss_peak_mb"]) for r in runs]),
                    med([float(r["b_get"]["rss_before_mb"]) for r in runs])))
            cpu = {k: [med([r[k + "_store"]["cpu"][i] for r in runs]) for i in range(3)]
                   for k in ("a", "b")}
            row("%s: CPU while storing (a) / (b): Prosody, receiptd, Redis" % label,
                "%.0f%%, %.0f%%, %.0f%% / %.0f%%, %.0f%%, %.0f%%" % tuple(cpu["a"] + cpu["b"]),
                "(100% = one core)")
            if cpu["b"][0] >= 85 and cpu["b"][1] < 50:
                notes.append(
                    "%s: while storing through receiptd, Prosody used %.0f%% of a core and "
                    "receiptd %.0f%%: side (b) is bound by Prosody routing each message to the "
                    "component and each `<stored/>` back to the client, two stanzas per message, "
                    "not by receiptd. Side (a) is Prosody's own offline storage, which took "
                    "%.0f%% of a core. The store ratio compares Prosody's cost of routing two "
                    "stanzas with its cost of storing one message."
                    % (label, cpu["b"][0], cpu["b"][1], cpu["a"][0]))
            row("%s: client CPU: store (a) / (b), retrieval (a) / (b)" % label,
                "%.0f%% / %.0f%%, %.0f%% / %.0f%%" % tuple(
                    med([pct(r[k]["gen_cpu"]) for r in runs])
                    for k in ("a_store", "b_store", "a_get", "b_get")))

    c_rate = None
    if "ceiling" in parts:
        say("ceiling: %d runs of redis-benchmark, %d calls" % (a.runs, a.n))
        ceil = [ceiling(a.n, a.fsync) for _ in range(a.runs)]
        c_rate = med(ceil, 2)
        row("ceiling: redis-benchmark EVALSHA put, one put per call, pipelined (puts/s; Redis "
            "CPU us per put, AOF rewrites included)", "%s; %s" % (show(ceil, 0),
                                                                 show(ceil, 1, "%.1f")))
        row("ceiling: the same with put_many, %d puts per call as receiptd sends them on a "
            "single Redis at saturation (puts/s; Redis CPU us per put)" % PUTS_PER_CALL,
            "%s; %s" % (show(ceil, 2), show(ceil, 3, "%.1f")))
        row("ceiling: where a put's time in Redis went, put_many (us per put, Redis' own "
            "commandstats): in the commands the script ran / in the script around them (the "
            "Lua code, and passing values between Lua and Redis)",
            "%s / %s" % (show(ceil, 4, "%.1f"), show(ceil, 5, "%.1f")))
        if s_rate:
            row("store: receiptd / ceiling", "%.2f" % (s_rate / c_rate if c_rate else 0))
        say("floor: %d runs of redis-benchmark for each of %d cheaper stores" % (
            a.runs, len(FLOORS)))
        floor = {}
        for key, label, src in FLOORS:
            floor[key] = [redis_bench(a.n, a.fsync, src) for _ in range(a.runs)]
            row("floor: %s (calls/s; Redis CPU us per call)" % label, "%s; %s" % (
                show(floor[key], 0), show(floor[key], 1, "%.1f")))
        floor["queue_many"] = [redis_bench_batched(a.n, a.fsync, QUEUE_MANY, PUTS_PER_CALL)
                               for _ in range(a.runs)]
        row("floor: the ordered queue, %d messages per script call (msg/s; Redis CPU us per "
            "message)" % PUTS_PER_CALL, "%s; %s" % (show(floor["queue_many"], 0),
                                        show(floor["queue_many"], 1, "%.1f")))
        say("latency ceiling: %d rounds of putlat at %d puts/s, receiptd's put_many and the "
            "ordered queue" % (a.runs, a.rate))
        lat = {"put": [], "put2": [], "queue": []}
        runs = (("put", "put_many", 1), ("put2", "put_many", 2), ("queue", None, 1))
        for i in range(a.runs):
            for key, name, every in (runs if i % 2 == 0 else runs[::-1]):
                src = script_source(name) if name else QUEUE_MANY
                lat[key].append(latency_ceiling(a.rate, a.fsync, src, every))
        for key, label in (("put", "latency ceiling: Redis alone offered receiptd's put at %d "
                            "puts/s (put_many, %d puts a call, a call every ms, open loop; no "
                            "receiptd, no XMPP)" % (a.rate, a.rate // 1000)),
                           ("put2", "latency ceiling, puts held a millisecond: the same with a "
                            "call every 2 ms carrying %d puts, each put's wait counted from its "
                            "own millisecond" % (a.rate // 500)),
                           ("queue", "latency floor: the same as the first for the ordered "
                            "queue (INCR, HSET, ZADD), %d msg/s in calls of %d"
                            % (a.rate, a.rate // 1000))):
            rs = lat[key]
            row(label + ": put->answer p50 / p99 / p99.9 (ms); p99 "
                "of the puts sent while no AOF rewrite ran, and the share sent while one ran; "
                "Redis CPU per put (us) / the share of a core that is at this rate",
                "%.1f / %.1f / %.1f; %s, %s; %s / %.0f%%" % (
                    med(rs, "p50"), med(rs, "p99"), med(rs, "p999"),
                    show(rs, "calm_p99", "%.1f"),
                    " ".join("%.1f%%" % r["rw_share"] for r in rs),
                    show(rs, "redis_us", "%.1f"), med(rs, "redis_us") * a.rate / 1e4))
        row("latency ceiling: putlat's own CPU / how late its calls left, p99 (ms; the three rows "
            "above)", " / ".join("%.0f%%, %.2f" % (med(lat[k], "gen_cpu"), med(lat[k], "late_p99"))
                                 for k in ("put", "put2", "queue")))
        notes.append(latency_ceiling_note(a.rate, lat, fixed if "store" in parts else None))
        # What the ceiling and the floors prove, in this run's own numbers.
        if c_rate:
            notes.append(
                "The ceiling is Redis alone running the put script, %d puts per call as receiptd "
                "sends them, as fast as redis-benchmark "
                "can drive it (pipelined, no receiptd, no XMPP): %.0f msg/s; receiptd reaches %s "
                "of it (its one deeply pipelined connection costs Redis a little less than 50 "
                "clients do, so it can come out above 100%%). The store is bound by what the put "
                "script costs Redis, one core's worth: the %d msg/s target is %.1f times that "
                "ceiling, out of reach on this machine with this data model (%s Redis "
                "commands per message: dedupe, quota, queue, per-device state, indexes)."
                % (PUTS_PER_CALL, c_rate, "%.0f%%" % (100 * s_rate / c_rate) if s_rate else "?",
                   T_STORE,
                   T_STORE / c_rate,
                   "%.1f" % med(sat, "inner_per_msg") if s_rate else "about a dozen"))
            notes.append(floor_note(floor, sat if s_rate else None))
            if r_rate is not None:
                notes.append(
                    "Retrieval with the senders offline relays one receipt per message into the "
                    "sender's queue, and a relayed receipt is itself a stored message (the put "
                    "script without the dedupe writes): that retrieval is bounded by about the "
                    "same ceiling, %.0f msg/s, below the %d msg/s target before any fetch or ack "
                    "work. With the senders online the receipts are pushed, not stored, and no "
                    "floor above rules the target out." % (c_rate, T_RETRIEVE))

    cluster_text = None
    if "cluster" in parts:
        setups = cluster_setups([int(x) for x in a.cluster_masters.split(",")],
                                not a.no_cluster_wait)
        say("cluster: %d rounds of %d setups, %d messages each" % (
            a.cluster_runs, len(setups), a.cluster_n))
        cluster_text = cluster_part(a, say, same_as_main=bool(parts & MAIN_PARTS))

    compare_text = None
    if "compare" in parts:
        say("compare: %d rounds, receiptd at %s and this tree's" % (a.compare_runs, a.baseline))
        compare_text = compare.compare_part(sys.modules[__name__], a, say)

    prof = None
    if "retrieval" in parts and r_rate < T_RETRIEVE and not a.no_perf and shutil.which("perf"):
        pq = min(a.queue, 200000)
        say("profile: retrieval target missed; one more retrieval (Q=%d) under perf" % pq)
        data = os.path.join(tempfile.mkdtemp(prefix="receiptd-bench-perf-"), "perf.data")
        pr = retrieval_run(pq, a.fsync, perf_data=data)
        prof = (pq, pr["rate"]) + profile(data)
        shutil.rmtree(os.path.dirname(data), ignore_errors=True)

    wall = time.monotonic() - t_start
    t = os.times()
    ours = t.children_user + t.children_system + t.user + t.system
    cpu_end = machine_cpu()
    others = max(0.0, cpu_end[0] - cpu_start[0] - ours)
    irq, steal = cpu_end[1] - cpu_start[1], cpu_end[2] - cpu_start[2]
    lines = [
        "# receiptd benchmark results",
        "",
        "Written by `tests/bench/run.py` (`scripts/bench`); every figure of this table comes from",
        "one invocation (%s, %.0f s); a value is the median of the runs, with each run's value in"
        % (time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), wall),
        "parentheses. Machine: %s." % machine(),
        "Load average at the start %.2f / %.2f / %.2f. During the run, processes other than this"
        % load,
        "benchmark's used %.0f CPU-seconds (%.1f%% of the machine: noise in these figures);" % (
            others, 100 * others / (wall * os.cpu_count())),
        "interrupts (mostly the loopback TCP of the benchmark itself) %.0f s, the hypervisor" % irq,
        "stole %.0f s. Redis logged a slow AOF fsync (disk busy) %d times." % (
            steal, len(REDIS_SLOW_FSYNC)),
        "Redis AOF on, `appendfsync %s`, everywhere." % a.fsync,
        "",
        "| figure | value | target | |",
        "|---|---|---|---|",
    ] + ["| %s | %s | %s | %s |" % r for r in rows] + [""]
    lines += ["## How these were measured", ""]
    if "store" in parts:
        lines += ["- **store**: `loadgen` plays the XMPP server; %d receipt-requested messages "
                  "(~250-byte bodies) from 100 senders to 1000 offline recipients, at most 2000 "
                  "unacknowledged; the rate counts `<stored/>` acks. The latency runs offer a "
                  "fixed rate for 5 s (at most N messages), after a warm-up second at the same rate that "
                  "is not counted, with up to 100000 unacknowledged (`[redis] max_inflight = "
                  "100000` in the bench config): offered above the saturation rate, the backlog "
                  "only grows, so the %d msg/s row measures queueing (and, past the in-flight "
                  "bound or a Redis silence of `[redis] timeout`, wait errors) rather than "
                  "latency; the half-rate row is the latency below capacity. The warm-up gives "
                  "each of the 1000 recipients its state in Redis, so the latency rows describe "
                  "the steady state; a new recipient's first message also waits for the archive "
                  "(is the user evicted?) and for its state to be created, and the warm-up's own "
                  "p99 is that cost." % (a.n, a.rate)]
    if "retrieval" in parts:
        lines += [
            "- **retrieval**: `loadgen --fetch` queues Q messages (its store phase, all for one "
            "recipient that never announced presence, so receiptd keeps them in the offline "
            "queue), then plays that recipient: summary, `fetch max='100'` pages with "
            "`after='{last}'` until `complete='true'`, the next fetch sent as soon as a page's "
            "`<batch/>` start tag gives its `last` (receiptd prepares page k+1 while the client "
            "reads page k; a client cannot ask for page k+2 before page k+1 starts), and an ack "
            "of each page sent once all of it was read (a fetch leaves only while fewer than 4 "
            "acks are unanswered). The rate is messages fetched and acked per second, from the "
            "summary to the last ack's answer; a closing summary must "
            "say 0 left. receiptd RSS is read before queueing, after queueing, and as the peak "
            "(VmHWM reset with clear_refs when queueing ended) while retrieving. Every ack "
            "relays a receipt to each message's sender; with the senders offline that is one "
            "more Redis write per message, with them online (`--senders-online`: directed "
            "presence from the 100 senders first) the receipts are pushed to loadgen instead, "
            "after one plain read of who is online per sender and acked page "
            "(`component/relay.c`). "
            "receiptd reads the next pages while the client reads one "
            "(`component/readahead.h`), so a fetch is mostly answered without waiting for "
            "Redis; the log's 'fetches answered by read-ahead' counts them.",
            "- `fetch_max_bytes = %d` in the bench config: receiptd budgets each stored blob "
            "plus 320 bytes per message, so the default 65536 would cut these pages at 97 "
            "messages; the pages really are ~60 kB." % FETCH_MAX_BYTES]
        if qruns != a.runs:
            lines += ["- The Q=%d retrieval ran %d times (each queues Q first), the other figures "
                      "%d times." % (a.queue, qruns, a.runs)]
    if "sbs" in parts:
        lines += [
            "- **side by side**: Redis, Prosody 0.12 and receiptd started by the e2e harness "
            "(`tests/e2e/harness.py`, imported; its Prosody config: internal file storage, "
            "mod_offline, plaintext SASL PLAIN on loopback), Redis with the fsync policy above "
            "(Prosody's file storage does not fsync). `c2sgen` logs in as alice and sends N=%d "
            "identical receipt-requested messages (a) to `bob@localhost`, done when a ping sent "
            "after them is answered (Prosody handles a session's stanzas in order, and its "
            "internal storage writes synchronously), and (b) to `bob\\40localhost@%s`, done at "
            "the N-th `<stored/>`. Then bob logs in: (a) sends initial presence and counts the "
            "messages of Prosody's login flood until N, (b) sends no presence and runs summary / "
            "fetch / ack as above. Each run uses a fresh stack; odd runs do (b) before (a)."
            % (a.sbs_n, harness.COMPONENT),
            "- Why N=%d: Prosody 0.12's offline store (`mod_offline` on `mod_storage_internal`) "
            "keeps at most `storage_archive_item_limit` = 10000 messages per user by default; "
            "past that `append` returns `quota-limit` and `mod_message` bounces the message with "
            "`service-unavailable`. With N above 10000 (a) would time bounces, not storage; the "
            "harness' Prosody runs with that default." % a.sbs_n,
            "- Prosody's net server keeps Nagle's algorithm on unless `network_settings = { "
            "nagle = false }`. Fetch and ack are request/response exchanges through two Prosody "
            "connections (c2s, component), so they are delayed where a bulk flood is not; the "
            "second configuration shows how much.",
            "- The flood has no acknowledgement: Prosody deletes the whole offline store as soon "
            "as it has queued the flood for writing, and loads all of it into memory first "
            "(the Prosody RSS row). receiptd deletes only what the client acked."]
    if "ceiling" in parts:
        lines += ["- **ceiling**: `redis-benchmark` runs receiptd's own put script (printed by "
                  "`dump_script put`) with the keys and arguments receiptd gives it on a single "
                  "Redis (the user's prefix and an index shard's four keys; a receipt-requested "
                  "message with a fresh original id, so dedupe is written too; 1000 recipients), "
                  "50 clients, pipeline 32; then `put_many` (`dump_script put_many`) with %d "
                  "such puts per call, which is how receiptd sends the puts of one loop turn on a "
                  "single Redis." % PUTS_PER_CALL + " The **floors** run the same way, with the same "
                  "arguments, for much cheaper stores (no command at all, one HSET, an ordered "
                  "queue of three commands, a plain HSET with no script). Redis CPU per call is "
                  "its user+sys time over the run divided by the calls, AOF rewrite children "
                  "included; redis-benchmark itself runs on the other core. The **latency "
                  "ceiling** and **floor**: `putlat` (tests/bench/putlat.c) offers a fresh Redis "
                  "the put_many script (or the ordered queue) at the latency target's rate, one "
                  "call of rate/1000 puts every millisecond over one connection without waiting "
                  "for earlier answers, 5 s after a warm-up second (the same amounts as the "
                  "latency runs, so the AOF grows, and is rewritten, as it is there), and times "
                  "each call from when it left to its answer, as loadgen times a message (how "
                  "late after its due time a call left is its own row); the held variant sends a "
                  "call every 2 ms with 2 ms of puts and counts each put's wait from its own "
                  "millisecond; alternating rounds."]
    lines += ["- **CPU**: 100% is one core. The generators report their own user+sys CPU over "
              "the measured wall time; a generator near 100% would be the bottleneck."]
    if notes:
        lines += [""] + ["- " + n for n in notes]
    if prof:
        lines += ["", "## Profile of the retrieval (target missed)", "",
                  "One more retrieval of Q=%d (not among the figures; %.0f msg/s under perf), "
                  "`perf record -F 499` on receiptd and Redis (with its AOF rewrite children), "
                  "`perf report --no-children`: share per process, then the hottest symbols."
                  % prof[:2], "",
                  "```"] + prof[2] + [""] + prof[3] + ["```"]
    text = merge_results(a.out, "\n".join(lines) + "\n" if parts & MAIN_PARTS else None,
                         {CLUSTER_HEAD: cluster_text, compare.HEAD: compare_text})
    print(text)
    with open(a.out, "w") as f:
        f.write(text)
    say("wrote %s" % a.out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BenchError, compare.CompareError) as e:
        print("bench: %s" % e, file=sys.stderr)
        sys.exit(1)
