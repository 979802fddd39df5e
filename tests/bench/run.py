#!/usr/bin/python3
"""receiptd benchmarks (issue #3), all measured in one run; prints a table and writes
tests/bench/RESULTS.md. Every number in both comes from this run.

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
4. ceiling: redis-benchmark runs receiptd's own put script (EVALSHA, same arguments) pipelined on
   a fresh Redis of the same configuration: receiptd's store rate as a fraction of that.

Each figure is the median of --runs runs (--queue-runs for the big retrieval). When the retrieval
target is missed and perf is installed, one more retrieval runs under perf (not counted in the
figures) and the top of its profile goes into RESULTS.md.

usage: run.py [--quick] [-n N] [--runs K] [--queue Q] [--queue-runs K] [--sbs-n N]
              [--parts store,retrieval,sbs,ceiling] [--no-perf] [--out FILE]
"""
import argparse
import os
import platform
import re
import shutil
import signal
import socket
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
C2SGEN = os.path.join(BUILD, "tests", "bench", "c2sgen")
CLK = os.sysconf("SC_CLK_TCK")

sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
import harness  # noqa: E402  (Redis + Prosody + receiptd processes for the side by side)

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


class BenchError(Exception):
    pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class Redis:
    def __init__(self, fsync):
        self.dir = tempfile.mkdtemp(prefix="receiptd-bench-redis-")
        self.port = free_port()
        self.log = os.path.join(self.dir, "redis.log")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--appendonly", "yes", "--appendfsync", fsync, "--save", "", "--logfile", self.log],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if self.cli("ping").strip() == "PONG":
                break
            time.sleep(0.05)

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

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        try:
            with open(self.log) as f:
                REDIS_SLOW_FSYNC.extend(ln.strip() for ln in f if "fsync is taking too long" in ln)
        except OSError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def write_ini(path, port, redis_port):
    with open(path, "w") as f:
        f.write("[component]\njid = receipts.localhost\nsecret = bench\nserver_host = 127.0.0.1\n"
                "server_port = %d\nuser_domains = localhost\nlog_level = warn\n[redis]\nport = %d\n"
                "max_inflight = 100000\n[delivery]\nmax_offline_messages = 100000000\n"
                "max_offline_bytes = 100000000000\nfetch_max_bytes = %d\n"
                % (port, redis_port, FETCH_MAX_BYTES))


# ---- 1. store --------------------------------------------------------------------------------

def store_run(n, rate, window, fsync):
    """One loadgen run against a fresh Redis; returns a dict of figures."""
    redis = Redis(fsync)
    tmp = tempfile.mkdtemp(prefix="receiptd-bench-")
    port = free_port()
    ini = os.path.join(tmp, "receiptd.ini")
    write_ini(ini, port, redis.port)
    mem0 = int(redis.info("memory")["used_memory"])
    lg = subprocess.Popen([LOADGEN, "--port", str(port), "--secret", "bench", "-n", str(n),
                           "--window", str(window), "--rate", str(rate)],
                          stdout=subprocess.PIPE, text=True)
    log = os.path.join(tmp, "log")
    lg.stdout.readline()  # "ready"
    rd = subprocess.Popen([RECEIPTD, "-c", ini], stderr=open(log, "w"))
    time.sleep(0.2)
    rss_before = rss_kb(rd.pid)
    out = lg.stdout.read()
    rd_log = harness.tail(log)
    rc = lg.wait()
    rss_after = rss_kb(rd.pid)
    cpu = proc_cpu(rd.pid)
    rd.terminate()
    rd.wait()
    fig = kv(out)
    mem1 = int(redis.info("memory")["used_memory"])
    evals, inner = redis_calls(redis)
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
        "rd_cpu": 100.0 * cpu / max(secs, 1e-9),
        "rss_before_mb": rss_before / 1024, "rss_after_mb": rss_after / 1024,
        "redis_bytes_per_msg": (mem1 - mem0) / n, "calls_per_msg": evals / n,
        "inner_per_msg": inner / n,
    }


# ---- 2. retrieval ----------------------------------------------------------------------------

def retrieval_run(q, fsync, senders_online=False, perf_data=None):
    """loadgen queues q messages for r0@localhost, then retrieves them as r0; see the top."""
    redis = Redis(fsync)
    tmp = tempfile.mkdtemp(prefix="receiptd-bench-")
    port = free_port()
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
        rd = subprocess.Popen([RECEIPTD, "-c", ini], stderr=open(os.path.join(tmp, "log"), "w"))
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
        for k in order:
            if k == "a":
                res["a_store"] = c2s(port, "alice", "--send", n, "--to",
                                     "bob@%s" % harness.USER_DOMAIN)
            else:
                res["b_store"] = c2s(port, "alice", "--send", n, "--to", relay, "--count-stored")
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

def ceiling(n, fsync):
    """redis-benchmark running the put script itself, pipelined, 50 clients."""
    redis = Redis(fsync)
    src = subprocess.run([os.path.join(BUILD, "tests", "bench", "dump_script"), "put"],
                         capture_output=True, text=True).stdout
    sha = redis.cli("script", "load", src).strip()
    blob = ("1 1764052406123 1 18 4 8\nalice@localhost/r" + "chat" + "g0000001" + "<body>"
            + "x" * 250 + "</body><request xmlns='urn:xmpp:receipts'/>")
    # The put script answers "cold" for a recipient with no state in Redis: create the state of
    # the recipients redis-benchmark will pick (-r 1000: r000000000000 .. r000000000999) first.
    redis.cli("eval", "for i = 0, 999 do redis.call('SET', 'rd:{r' .. string.format('%012d', i)"
              " .. '@localhost}:seq', 0) end return 1", "0")
    # Every script takes receiptd's link epoch as its first argument (storage/scripts.c).
    args = ["redis-benchmark", "-p", str(redis.port), "-n", str(n), "-c", "50", "-P", "32", "-q",
            "-r", "1000", "EVALSHA", sha, "1", "rd:{r__rand_int__@localhost}", "7",
            "r__rand_int__@localhost", "alice@localhost", "", "0a0b0c0d", blob, "1",
            "1764052406123", "5000", "30000", "86400", "100000000", "100000000000"]
    out = subprocess.run(args, capture_output=True, text=True).stdout
    redis.stop()
    m = re.search(r"([\d.]+) requests per second", out)
    return float(m.group(1)) if m else 0.0


# ---- report ----------------------------------------------------------------------------------

def med(runs, key=None):
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


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=200000, help="messages per store run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", type=int, default=20000, help="offered msg/s of the latency run")
    ap.add_argument("--fsync", default="everysec", help="Redis appendfsync everywhere")
    ap.add_argument("--queue", type=int, default=1000000, help="Q, messages queued for retrieval")
    ap.add_argument("--queue-runs", type=int, help="runs of the Q retrieval (default --runs)")
    ap.add_argument("--online-queue", type=int, default=200000,
                    help="Q of the senders-online retrieval variant")
    ap.add_argument("--sbs-n", type=int, default=10000, help="N of the side by side")
    ap.add_argument("--parts", default="store,retrieval,sbs,ceiling")
    ap.add_argument("--no-perf", action="store_true", help="no profile when a target is missed")
    ap.add_argument("--quick", action="store_true",
                    help="small sizes, one run each (a smoke test; not for RESULTS.md)")
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    a = ap.parse_args()
    if a.quick:
        a.n, a.runs, a.queue, a.online_queue, a.sbs_n = 20000, 1, 50000, 20000, 2000
        if a.out == os.path.join(HERE, "RESULTS.md"):
            a.out = os.path.join(tempfile.gettempdir(), "receiptd-bench-quick.md")
    qruns = a.queue_runs or a.runs
    parts = set(a.parts.split(","))
    t_start, cpu_start, load = time.monotonic(), machine_cpu(), os.getloadavg()
    rows, notes = [], []

    def row(figure, value, target="", ok=None):
        rows.append((figure, value, target, "" if ok is None else verdict(ok)))

    def say(msg):
        sys.stdout.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
        sys.stdout.flush()

    s_rate = None
    if "store" in parts:
        say("store: %d runs of %d messages at saturation, %d at %d msg/s" % (
            a.runs, a.n, min(a.n, a.rate * 5), a.rate))
        sat = [store_run(a.n, 0, 2000, a.fsync) for _ in range(a.runs)]
        fixed = [store_run(min(a.n, a.rate * 5), a.rate, 100000, a.fsync) for _ in range(a.runs)]
        s_rate = med(sat, "rate")
        # Latency means something only below capacity: also offer half the saturation rate.
        half = max(1000, int(s_rate / 2000) * 1000)
        say("store: %d runs at %d msg/s (half the saturation rate)" % (a.runs, half))
        halfr = [store_run(min(a.n, half * 5), half, 100000, a.fsync) for _ in range(a.runs)]
        row("store: stored+acked msg/s at saturation (N=%d, window 2000)" % a.n,
            show(sat, "rate"), ">= %d" % T_STORE, s_rate >= T_STORE)
        row("store: store->ack p50 / p99 / p99.9 at saturation (ms)", "%.1f / %.1f / %.1f" % (
            med(sat, "p50"), med(sat, "p99"), med(sat, "p999")))
        p99 = med(fixed, "p99")
        row("store: store->ack p50 / p99 / p99.9 at %d msg/s offered (ms)" % a.rate,
            "%.1f / %.1f / %.1f" % (med(fixed, "p50"), p99, med(fixed, "p999")),
            "p99 <= %d" % T_P99_MS, p99 <= T_P99_MS)
        row("store: rate reached at %d msg/s offered" % a.rate, show(fixed, "rate"))
        p99h = med(halfr, "p99")
        row("store: store->ack p50 / p99 / p99.9 at %d msg/s offered, half the saturation rate "
            "(ms)" % half, "%.1f / %.1f / %.1f" % (med(halfr, "p50"), p99h, med(halfr, "p999")),
            "p99 <= %d" % T_P99_MS, p99h <= T_P99_MS)
        row("store: error answers instead of <stored/> (saturation / %d offered / half rate; "
            "a client would retry each)" % a.rate,
            "%s / %s / %s" % (show(sat, "errors"), show(fixed, "errors"), show(halfr, "errors")),
            "0", not any(r["errors"] for r in sat + fixed + halfr))
        row("store: receiptd RSS before / after (MB)", "%.1f / %.1f" % (
            med(sat, "rss_before_mb"), med(sat, "rss_after_mb")))
        row("store: CPU of receiptd / of the generator at saturation", "%.0f%% / %.0f%%" % (
            med(sat, "rd_cpu"), med(sat, "gen_cpu")))
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
            row("%s: client CPU: store (a) / (b), retrieval (a) / (b)" % label,
                "%.0f%% / %.0f%%, %.0f%% / %.0f%%" % tuple(
                    med([pct(r[k]["gen_cpu"]) for r in runs])
                    for k in ("a_store", "b_store", "a_get", "b_get")))

    c_rate = None
    if "ceiling" in parts:
        say("ceiling: %d runs of redis-benchmark, %d calls" % (a.runs, a.n))
        ceil = [ceiling(a.n, a.fsync) for _ in range(a.runs)]
        c_rate = med(ceil)
        row("ceiling: redis-benchmark EVALSHA put, pipelined (calls/s)", show(ceil))
        if s_rate:
            row("store: receiptd / ceiling", "%.2f" % (s_rate / c_rate if c_rate else 0))

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
        "Written by `tests/bench/run.py` (`scripts/bench`); every figure below comes from one",
        "invocation (%s, %.0f s); a value is the median of the runs, with each run's value in" % (
            time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), wall),
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
                  "fixed rate for 5 s with up to 100000 unacknowledged (`[redis] max_inflight = "
                  "100000` in the bench config): offered above the saturation rate, the backlog "
                  "only grows, so the %d msg/s row measures queueing (and, past the in-flight "
                  "bound or a Redis silence of `[redis] timeout`, wait errors) rather than "
                  "latency; the half-rate row is the latency below capacity." % (a.n, a.rate)]
    if "retrieval" in parts:
        lines += [
            "- **retrieval**: `loadgen --fetch` queues Q messages (its store phase, all for one "
            "recipient that never announced presence, so receiptd keeps them in the offline "
            "queue), then plays that recipient: summary, `fetch max='100'` pages with "
            "`after='{last}'` until `complete='true'`, and an ack of each page sent in the same "
            "write as the next fetch (one fetch and at most 4 acks in flight: a client cannot ask "
            "for page k+2 before it knows page k+1's last id). The rate is messages fetched and "
            "acked per second, from the summary to the last ack's answer; a closing summary must "
            "say 0 left. receiptd RSS is read before queueing, after queueing, and as the peak "
            "(VmHWM reset with clear_refs when queueing ended) while retrieving. Every ack "
            "relays a receipt to each message's sender; with the senders offline that is one "
            "more Redis write per message, with them online (`--senders-online`: directed "
            "presence from the 100 senders first) the receipts are pushed to loadgen instead.",
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
                  "`dump_script put`) with the same arguments, 50 clients, pipeline 32."]
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
    text = "\n".join(lines) + "\n"
    print(text)
    with open(a.out, "w") as f:
        f.write(text)
    say("wrote %s" % a.out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print("bench: %s" % e, file=sys.stderr)
        sys.exit(1)
