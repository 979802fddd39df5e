#!/usr/bin/python3
"""Run one receiptd fault test against fresh Redis + Prosody + receiptd.

    /usr/bin/python3 tests/faults/run.py --list
    /usr/bin/python3 tests/faults/run.py NAME [--receiptd PATH] [--keep] [--seed N] [--sabotage]
    /usr/bin/python3 tests/faults/run.py --all
    /usr/bin/python3 tests/faults/run.py --list --redis cluster

--list names the tests on one Redis; --list --redis cluster the ones that run against a Redis
Cluster of 3 masters + 3 replicas (cluster-reshard, cluster-failover: live slot migration and a
master's kill -9 under load; they print a CLUSTER line with what happened to the cluster).

Each test drives a steady load of receipt-requested messages (4 senders, 2 recipients, raw-socket
clients) through real Prosody + Redis + receiptd, injects its fault, then checks that every message
acknowledged with <stored/> was delivered exactly once after dedupe by stanza-id (see faults.py).
It prints one line of counts:

    COUNTS NAME sent=.. stored-acked=.. delivered=.. lost=0 duplicates=0 raw-duplicate-deliveries=..

and the standby test a second one, with the measured takeover time:

    STANDBY standby server=prosody killed=.. survivor=.. takeover=0.9s first-stored-after-takeover=..

--sabotage deletes one stored, not yet delivered message from Redis mid-run: the test must FAIL
(a self-test of the checker). Exit status 0 = pass, 1 = fail (followed by the process logs).
The receiptd binary comes from --receiptd, else $RECEIPTD, else build/component/receiptd.
"""

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import faults  # noqa: E402
import harness  # noqa: E402  (put on sys.path by faults)

TEST_TIMEOUT = 100


def run_one(name, binary, keep=False, seed=None, sabotage=False, debug=False):
    spec = faults.TESTS.get(name)
    if spec is None:
        print("unknown test %r; known: %s" % (name, ", ".join(faults.TESTS)))
        return 2
    print("=== faults %s: %s" % (name, spec["doc"]), flush=True)
    t_start = time.monotonic()
    reason = None
    counts = None
    ctx = None
    extra = {k: dict(v) for k, v in (spec["extra"] or {}).items()}
    if debug:
        extra.setdefault("component", {})["log_level"] = "debug"
    stack = faults.FaultStack(harness.find_receiptd(binary), extra=extra, keep=keep,
                              redis="cluster" if spec["cluster"] else "single",
                              cluster_kw=spec["cluster_kw"])
    try:
        with stack:
            try:
                ctx, counts = asyncio.run(asyncio.wait_for(
                    faults.run_test(name, stack, sabotage=sabotage, seed=seed), TEST_TIMEOUT))
            except asyncio.TimeoutError:
                reason = "test timed out after %ss" % TEST_TIMEOUT
            except (AssertionError, harness.HarnessError) as e:
                reason = "%s: %s" % (type(e).__name__, e)
            except Exception as e:
                reason = "unexpected %s: %s\n%s" % (type(e).__name__, e, traceback.format_exc())
            if reason is None and ctx is not None and ctx.failures:
                reason = "\n  - " + "\n  - ".join(ctx.failures)
            # receiptd must still stop cleanly on SIGTERM
            rd = stack.receiptd
            if rd.popen is not None:
                code = rd.term()
                if code != 0 and reason is None:
                    reason = "receiptd exited with code %s on SIGTERM (expected 0)" % code
            if reason is not None:
                stack.dump_logs()
    except harness.HarnessError as e:
        reason = reason or "harness: %s" % e
    except Exception as e:
        reason = reason or "harness: unexpected %s: %s\n%s" % (type(e).__name__, e, traceback.format_exc())
    took = time.monotonic() - t_start
    if counts is not None:
        print("COUNTS %s sent=%d stored-acked=%d delivered=%d lost=%d duplicates=%d "
              "raw-duplicate-deliveries=%d | transmissions=%d deliveries=%s faults=%d errors=[%s] "
              "client-reconnects=%d announce-retries=%d max-rss=%dkB took=%.1fs" % (
                  name, counts["sent"], counts["stored"], counts["delivered"], counts["lost"],
                  counts["duplicates"], counts["raw_dups"], counts["transmissions"],
                  "/".join("%s:%d" % kv for kv in sorted(counts["hows"].items())), counts["faults"],
                  counts["errors"], counts["reconnects"], counts["announce_waits"], counts["max_rss_kb"], took), flush=True)
    for key, text in sorted(getattr(ctx, "extra_counts", {}).items()):
        print("%s %s %s" % (key, name, text), flush=True)
    if reason is None:
        print("PASS %s (%.1fs)" % (name, took), flush=True)
        return 0
    print("FAIL %s (%.1fs): %s" % (name, took, reason), flush=True)
    return 1


def _on_sigterm(signum, frame):
    # meson's timeout (or a user) stops us: unwind so that every child process is stopped
    raise SystemExit("faults: killed by signal %d" % signum)


def main():
    signal.signal(signal.SIGTERM, _on_sigterm)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", help="test name")
    ap.add_argument("--list", action="store_true", help="print the test names, one per line")
    ap.add_argument("--all", action="store_true", help="run every test (each in its own process)")
    ap.add_argument("--receiptd", help="receiptd binary")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--seed", type=int, help="random seed (fault moments)")
    ap.add_argument("--debug", action="store_true", help="receiptd log_level = debug")
    ap.add_argument("--server", choices=("prosody", "ejabberd"),
                    help="XMPP server (default: $E2E_SERVER, else prosody)")
    ap.add_argument("--redis", choices=("single", "cluster"), default="single",
                    help="with --list: the tests on one Redis (default) or on a Redis Cluster")
    ap.add_argument("--sabotage", action="store_true",
                    help="delete one stored message from Redis mid-run (the test must fail)")
    args = ap.parse_args()
    if args.server:
        os.environ["E2E_SERVER"] = args.server
    if args.list:
        print("\n".join(faults.names(args.redis)))
        return 0
    if args.all:
        results = []
        for n in faults.TESTS:
            cmd = [sys.executable, os.path.abspath(__file__), n]
            if args.receiptd:
                cmd += ["--receiptd", args.receiptd]
            results.append((n, subprocess.run(cmd).returncode))
        print("\n".join("%s %s" % ("PASS" if c == 0 else "FAIL", n) for n, c in results))
        return 0 if all(c == 0 for _, c in results) else 1
    if not args.name:
        ap.error("test name required (or --list / --all)")
    return run_one(args.name, args.receiptd, args.keep, args.seed, args.sabotage, args.debug)


if __name__ == "__main__":
    sys.exit(main())
