#!/usr/bin/python3
"""Run one receiptd end-to-end scenario against fresh Redis + XMPP server + receiptd.

    /usr/bin/python3 tests/e2e/run.py --list [--server S]
    /usr/bin/python3 tests/e2e/run.py NAME [--server prosody|ejabberd] [--receiptd PATH] [-v] [--keep]
    /usr/bin/python3 tests/e2e/run.py --all [--server S]
    ... [--redis cluster]

The server is --server, else $E2E_SERVER, else prosody. --list prints the scenarios that run on
that server (a few are ejabberd-only). --redis cluster (or E2E_REDIS=cluster) runs the scenario
against a Redis Cluster of 3 masters + 3 replicas instead of one Redis (receiptd's component.ini
then has `[redis] cluster = <seeds>`); only the scenarios of scenarios.CLUSTER_SCENARIOS run
there (--list --redis cluster names them; the others exit 77).
Exit status 0 = pass, 1 = fail (the reason is printed, followed by the process logs), 77 = skipped
(scenario not meant for that server or Redis).
The receiptd binary comes from --receiptd, else $RECEIPTD, else build/component/receiptd.
"""

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


def run_one(name, binary=None, verbose=False, keep=False, server=None, redis=None):
    import scenarios
    server = harness.server_name(server)
    redis = harness.redis_mode(redis)
    sc = scenarios.SCENARIOS.get(name)
    if sc is None:
        print("unknown scenario %r; known: %s" % (name, ", ".join(scenarios.names())))
        return 2
    if server not in sc.servers:
        print("SKIP %s: runs on %s only, not on %s" % (name, ", ".join(sc.servers), server))
        return 77
    if redis == "cluster" and name not in scenarios.CLUSTER_SCENARIOS:
        print("SKIP %s: not one of the Redis Cluster scenarios (scenarios.CLUSTER_SCENARIOS)" % name)
        return 77
    on = server + (" with a Redis Cluster" if redis == "cluster" else "")
    print("=== e2e %s on %s: %s" % (name, on, sc.doc), flush=True)
    t_start = time.monotonic()
    reason = None
    stack = harness.Stack(receiptd=binary, delivery=sc.delivery, extra=sc.extra, keep=keep or None,
                          server=server, redis=redis,
                          receiptd_count=sc.receiptds)
    try:
        with stack:
            ctx = scenarios.Ctx(stack, verbose)

            async def main():
                try:
                    await asyncio.wait_for(sc.func(ctx), sc.timeout)
                finally:
                    await ctx.close_clients()

            try:
                asyncio.run(main())
            except asyncio.TimeoutError:
                reason = "scenario timed out after %ss" % sc.timeout
            except (AssertionError, harness.HarnessError) as e:
                reason = "%s: %s" % (type(e).__name__, e)
                if verbose:
                    traceback.print_exc()
                else:
                    tb = traceback.extract_tb(e.__traceback__)
                    frames = [f for f in tb if f.filename.endswith("scenarios.py")]
                    if frames:
                        f = frames[-1]
                        reason += "\n  (at scenarios.py:%d: %s)" % (f.lineno, f.line)
            except Exception as e:   # harness/client bug, still a failure
                reason = "unexpected %s: %s\n%s" % (type(e).__name__, e, traceback.format_exc())
            # every receiptd must stop cleanly on SIGTERM (exit code 0)
            for rd in stack.receiptds:
                if rd.popen is None:
                    continue
                if not rd.alive():
                    code = rd.popen.returncode
                    if reason is None:
                        reason = "%s exited by itself during the scenario (code %s)" % (rd.name, code)
                    rd.popen = None
                else:
                    code = rd.term()
                    if code != 0 and reason is None:
                        reason = "%s exited with code %s on SIGTERM (expected 0)" % (rd.name, code)
            if reason is not None:
                stack.failed = True
    except harness.HarnessError as e:
        reason = reason or "harness: %s" % e
    except Exception as e:
        reason = reason or "harness: unexpected %s: %s\n%s" % (type(e).__name__, e, traceback.format_exc())
    took = time.monotonic() - t_start
    if reason is None:
        print("PASS %s on %s (%.1fs)" % (name, on, took), flush=True)
        return 0
    print("FAIL %s on %s (%.1fs): %s" % (name, on, took, reason), flush=True)
    return 1


def _on_sigterm(signum, frame):
    # meson's timeout (or a user) stops us: unwind so that every child process is stopped
    raise SystemExit("e2e: killed by signal %d" % signum)


def main():
    signal.signal(signal.SIGTERM, _on_sigterm)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", help="scenario name")
    ap.add_argument("--list", action="store_true", help="print the scenario names, one per line")
    ap.add_argument("--all", action="store_true", help="run every scenario (each in its own process)")
    ap.add_argument("--receiptd", help="receiptd binary")
    ap.add_argument("--server", choices=sorted(harness.SERVERS),
                    help="XMPP server: prosody or ejabberd (default: $E2E_SERVER, else prosody)")
    ap.add_argument("--redis", choices=harness.REDIS_MODES,
                    help="one Redis (single) or a 3+3 Redis Cluster (default: $E2E_REDIS, else single)")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging of slixmpp")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    try:
        server = harness.server_name(args.server)
        redis = harness.redis_mode(args.redis)
    except harness.HarnessError as e:
        ap.error(str(e))
    if args.list:
        import scenarios
        print("\n".join(scenarios.names(server, redis)))
        return 0
    if args.all:
        import scenarios
        results = []
        for n in scenarios.names(server, redis):
            cmd = [sys.executable, os.path.abspath(__file__), n, "--server", server, "--redis", redis]
            if args.receiptd:
                cmd += ["--receiptd", args.receiptd]
            r = subprocess.run(cmd)
            results.append((n, r.returncode))
        print("\n".join("%s %s on %s" % ("PASS" if c == 0 else "FAIL", n, server) for n, c in results))
        return 0 if all(c == 0 for _, c in results) else 1
    if not args.name:
        ap.error("scenario name required (or --list / --all)")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_one(args.name, args.receiptd, args.verbose, args.keep, server, redis)


if __name__ == "__main__":
    sys.exit(main())
