#!/usr/bin/python3
"""Run one receiptd end-to-end scenario against fresh Redis + Prosody + receiptd.

    /usr/bin/python3 tests/e2e/run.py --list
    /usr/bin/python3 tests/e2e/run.py NAME [--receiptd PATH] [-v] [--keep]
    /usr/bin/python3 tests/e2e/run.py --all

Exit status 0 = pass, 1 = fail (the reason is printed, followed by the process logs).
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


def run_one(name, binary=None, verbose=False, keep=False):
    import scenarios
    sc = scenarios.SCENARIOS.get(name)
    if sc is None:
        print("unknown scenario %r; known: %s" % (name, ", ".join(scenarios.names())))
        return 2
    print("=== e2e %s: %s" % (name, sc.doc), flush=True)
    t_start = time.monotonic()
    reason = None
    stack = harness.Stack(receiptd=binary, delivery=sc.delivery, keep=keep or None)
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
            # receiptd must stop cleanly on SIGTERM (exit code 0)
            if stack.receiptd.popen is not None:
                if not stack.receiptd.alive():
                    code = stack.receiptd.popen.returncode
                    if reason is None:
                        reason = "receiptd exited by itself during the scenario (code %s)" % code
                    stack.receiptd.popen = None
                else:
                    code = stack.receiptd.term()
                    if code != 0 and reason is None:
                        reason = "receiptd exited with code %s on SIGTERM (expected 0)" % code
            if reason is not None:
                stack.failed = True
    except harness.HarnessError as e:
        reason = reason or "harness: %s" % e
    except Exception as e:
        reason = reason or "harness: unexpected %s: %s\n%s" % (type(e).__name__, e, traceback.format_exc())
    took = time.monotonic() - t_start
    if reason is None:
        print("PASS %s (%.1fs)" % (name, took), flush=True)
        return 0
    print("FAIL %s (%.1fs): %s" % (name, took, reason), flush=True)
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
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging of slixmpp")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    if args.list:
        import scenarios
        print("\n".join(scenarios.names()))
        return 0
    if args.all:
        import scenarios
        results = []
        for n in scenarios.names():
            cmd = [sys.executable, os.path.abspath(__file__), n]
            if args.receiptd:
                cmd += ["--receiptd", args.receiptd]
            r = subprocess.run(cmd)
            results.append((n, r.returncode))
        print("\n".join("%s %s" % ("PASS" if c == 0 else "FAIL", n) for n, c in results))
        return 0 if all(c == 0 for _, c in results) else 1
    if not args.name:
        ap.error("scenario name required (or --list / --all)")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_one(args.name, args.receiptd, args.verbose, args.keep)


if __name__ == "__main__":
    sys.exit(main())
