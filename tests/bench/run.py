#!/usr/bin/python3
"""receiptd benchmarks (issue #3), measured side by side in one run; writes tests/bench/RESULTS.md.

1. store: tests/bench/loadgen plays the XMPP server and offers N receipt-requested messages to
   offline recipients; stored+acked msg/s at saturation, and store->ack latency at a fixed
   offered rate; receiptd RSS before/after; Redis memory and commands per stored message.
4. ceiling: redis-benchmark runs receiptd's own put script (EVALSHA, same arguments) pipelined
   on a fresh Redis of the same configuration: receiptd's rate as a fraction of that.
Each figure is the median of --runs runs. Usage: run.py [-n N] [--runs K] [--rate R]
"""
import argparse
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("BUILD", os.path.join(ROOT, "build"))
RECEIPTD = os.environ.get("RECEIPTD", os.path.join(BUILD, "component", "receiptd"))
LOADGEN = os.path.join(BUILD, "tests", "bench", "loadgen")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


class Redis:
    def __init__(self, fsync):
        self.dir = tempfile.mkdtemp(prefix="receiptd-bench-redis-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--appendonly", "yes", "--appendfsync", fsync, "--save", ""],
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
        shutil.rmtree(self.dir, ignore_errors=True)


def store_run(n, rate, window, fsync):
    """One loadgen run against a fresh Redis; returns a dict of figures."""
    redis = Redis(fsync)
    tmp = tempfile.mkdtemp(prefix="receiptd-bench-")
    port = free_port()
    ini = os.path.join(tmp, "receiptd.ini")
    with open(ini, "w") as f:
        f.write("[component]\njid = receipts.localhost\nsecret = bench\nserver_host = 127.0.0.1\n"
                "server_port = %d\nuser_domains = localhost\nlog_level = warn\n[redis]\nport = %d\n"
                "max_inflight = 100000\n[delivery]\nmax_offline_messages = 100000000\n"
                "max_offline_bytes = 100000000000\n" % (port, redis.port))
    mem0 = int(redis.info("memory")["used_memory"])
    lg = subprocess.Popen([LOADGEN, "--port", str(port), "--secret", "bench", "-n", str(n),
                           "--window", str(window), "--rate", str(rate)],
                          stdout=subprocess.PIPE, text=True)
    lg.stdout.readline()  # "ready"
    rd = subprocess.Popen([RECEIPTD, "-c", ini], stderr=open(os.path.join(tmp, "log"), "w"))
    time.sleep(0.2)
    rss_before = rss_kb(rd.pid)
    out = lg.stdout.read()
    lg.wait()
    rss_after = rss_kb(rd.pid)
    cpu = sum(int(x) for x in open("/proc/%d/stat" % rd.pid).read().split()[13:15])
    rd.terminate()
    rd.wait()
    fig = dict(kv.split("=") for kv in out.split())
    mem1 = int(redis.info("memory")["used_memory"])
    cmdstats = redis.info("commandstats")
    inner = sum(int(re.search(r"calls=(\d+)", v).group(1)) for k, v in cmdstats.items()
                if k.startswith("cmdstat_") and "evalsha" not in k and "script" not in k
                and "info" not in k and "config" not in k)
    evals = int(re.search(r"calls=(\d+)", cmdstats.get("cmdstat_evalsha", "calls=0")).group(1))
    redis.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    secs = float(fig["seconds"])
    return {
        "rate": float(fig["rate"]), "p50": float(fig["p50_ms"]), "p99": float(fig["p99_ms"]),
        "p999": float(fig["p999_ms"]), "gen_cpu": fig["gen_cpu"],
        "rd_cpu": "%.0f%%" % (100.0 * cpu / os.sysconf("SC_CLK_TCK") / max(secs, 1e-9)),
        "rss_before_mb": rss_before / 1024, "rss_after_mb": rss_after / 1024,
        "redis_bytes_per_msg": (mem1 - mem0) / n, "calls_per_msg": evals / n,
        "inner_per_msg": inner / n,
    }


def ceiling(n, fsync):
    """redis-benchmark running the put script itself, pipelined, 50 clients."""
    redis = Redis(fsync)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run([os.path.join(BUILD, "tests", "bench", "dump_script"), "put"],
                         capture_output=True, text=True).stdout
    sha = redis.cli("script", "load", src).strip()
    blob = "1 1764052406123 1 18 4 8\nalice@localhost/r" + "chat" + "g0000001" + "<body>" + "x" * 250 + "</body><request xmlns='urn:xmpp:receipts'/>"
    args = ["redis-benchmark", "-p", str(redis.port), "-n", str(n), "-c", "50", "-P", "32", "-q",
            "-r", "1000000", "EVALSHA", sha, "2", "rd:{r__rand_int__@localhost}", "rd:due",
            "r__rand_int__@localhost", "alice@localhost", "", "0a0b0c0d", blob, "1",
            "1764052406123", "5000", "30000", "86400", "100000000", "100000000000"]
    out = subprocess.run(args, capture_output=True, text=True).stdout
    redis.stop()
    m = re.search(r"([\d.]+) requests per second", out)
    return float(m.group(1)) if m else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=200000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", type=int, default=20000)
    ap.add_argument("--fsync", default="everysec")
    a = ap.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    rows = []

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    sat = [store_run(a.n, 0, 2000, a.fsync) for _ in range(a.runs)]
    fixed = [store_run(min(a.n, a.rate * 5), a.rate, 100000, a.fsync) for _ in range(a.runs)]
    ceil = [ceiling(a.n, a.fsync) for _ in range(a.runs)]
    s_rate, c_rate = med(sat, "rate"), statistics.median(ceil)
    lines = [
        "# receiptd benchmark results",
        "",
        "Written by `tests/bench/run.py` (`meson test -C build --suite bench`); every figure is the",
        "median of %d runs measured in this one invocation. Machine: %d cores, %s; %s." % (
            a.runs, os.cpu_count(), cpu, platform.platform()),
        "Redis AOF on, `appendfsync %s`. N = %d messages of ~250-byte bodies, 100 senders," % (a.fsync, a.n),
        "1000 offline recipients (the offline-queue store path).",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        "| stored+acked msg/s at saturation (window 2000) | %.0f | >= 100000 |" % s_rate,
        "| store->ack p50 / p99 / p99.9 at saturation (ms) | %.2f / %.2f / %.2f | |" % (
            med(sat, "p50"), med(sat, "p99"), med(sat, "p999")),
        "| store->ack p50 / p99 / p99.9 at %d msg/s offered (ms) | %.2f / %.2f / %.2f | p99 <= 5 |" % (
            a.rate, med(fixed, "p50"), med(fixed, "p99"), med(fixed, "p999")),
        "| rate reached at %d msg/s offered | %.0f | |" % (a.rate, med(fixed, "rate")),
        "| receiptd RSS before / after (MB) | %.1f / %.1f | |" % (med(sat, "rss_before_mb"), med(sat, "rss_after_mb")),
        "| receiptd CPU at saturation | %s | |" % sat[len(sat) // 2]["rd_cpu"],
        "| generator CPU at saturation | %s | (not the bottleneck while well under 100%%) |" % sat[len(sat) // 2]["gen_cpu"],
        "| Redis memory per stored message (bytes) | %.0f | <= 2x stanza (~%d) |" % (
            med(sat, "redis_bytes_per_msg"), 2 * 420),
        "| Redis calls per message (EVALSHA / commands inside the script) | %.2f / %.1f | |" % (
            med(sat, "calls_per_msg"), med(sat, "inner_per_msg")),
        "| ceiling: redis-benchmark EVALSHA put, pipelined (calls/s) | %.0f | |" % c_rate,
        "| receiptd / ceiling | %.2f | |" % (s_rate / c_rate if c_rate else 0),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(ROOT, "tests", "bench", "RESULTS.md"), "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
