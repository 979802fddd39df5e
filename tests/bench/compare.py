"""Before / after: the same benchmark runs with an older receiptd and with this build's, side by
side in one invocation, so that RESULTS.md can show what a change did without anybody typing
the old figures in (run.py --baseline REV; part "compare").

The older revision is exported with `git archive` into a temp dir and built there the way
scripts/bench builds this tree; only its receiptd is used. The generator (loadgen), Redis and
everything else are this tree's, so the two columns differ by receiptd alone (its C code and
the Lua scripts it loads). Each round runs every measurement with both builds, alternating
which goes first, so the machine's slow drift hits both alike; ratios are taken pair by pair
within a round."""
import os
import shutil
import subprocess
import tempfile
import time

HEAD = "## Before / after"


class CompareError(Exception):
    pass


def build_revision(root, rev, say):
    """Exports rev and builds its receiptd; returns (binary path, temp dir, short hash)."""
    r = subprocess.run(["git", "-C", root, "rev-parse", "--short", "--verify", rev + "^{commit}"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise CompareError("%s is not a commit of this repository" % rev)
    short = r.stdout.strip()
    tmp = tempfile.mkdtemp(prefix="receiptd-bench-baseline-")
    src = os.path.join(tmp, "src")
    os.mkdir(src)
    say("compare: building receiptd at %s in %s" % (short, tmp))
    try:
        archive = subprocess.Popen(["git", "-C", root, "archive", rev], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", src], stdin=archive.stdout, check=True)
        if archive.wait() != 0:
            raise CompareError("git archive %s failed" % rev)
        build = os.path.join(src, "build")
        for cmd in (["meson", "setup", build, src], ["ninja", "-C", build, "component/receiptd"]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise CompareError("%s failed:\n%s%s" % (" ".join(cmd), r.stdout[-2000:],
                                                         r.stderr[-2000:]))
    except (CompareError, subprocess.CalledProcessError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CompareError("cannot build receiptd at %s: %s" % (rev, e)) from None
    return os.path.join(build, "component", "receiptd"), tmp, short


# (figure, format, which run of a round, field)
FIGURES = [
    ("store: stored+acked msg/s at saturation", "%.0f", "sat", "rate"),
    ("store: receiptd CPU per stored message (us)", "%.1f", "sat", "rd_us"),
    ("store: Redis CPU per stored message (us)", "%.1f", "sat", "redis_us"),
    ("store: Redis commands per stored message", "%.1f", "sat", "inner_per_msg"),
    ("store: store->ack p99 at {rate} msg/s offered (ms)", "%.1f", "fixed", "p99"),
    ("retrieval: msg/s, Q={q}, senders offline", "%.0f", "off", "rate"),
    ("retrieval: Redis commands per retrieved message, senders offline", "%.1f", "off",
     "inner_per_msg"),
    ("retrieval: msg/s, Q={q}, senders online", "%.0f", "on", "rate"),
    ("retrieval: Redis commands per retrieved message, senders online", "%.1f", "on",
     "inner_per_msg"),
]


def one_round(bench, a, binary):
    return {
        "sat": bench.store_run(a.compare_n, 0, 2000, a.fsync, receiptd=binary),
        "fixed": bench.store_run(a.compare_rate * 5, a.compare_rate, 100000, a.fsync,
                                 receiptd=binary),
        "off": bench.retrieval_run(a.compare_q, a.fsync, receiptd=binary),
        "on": bench.retrieval_run(a.compare_q, a.fsync, senders_online=True, receiptd=binary),
    }


def compare_part(bench, a, say):
    """Runs the rounds and returns the markdown section."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    binary, tmp, short = build_revision(root, a.baseline, say)
    head = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"],
                          capture_output=True, text=True).stdout.strip()
    t0, load = time.monotonic(), os.getloadavg()
    before, after = [], []
    try:
        for r in range(a.compare_runs):
            order = [("before", binary, before), ("after", None, after)]
            if r % 2:
                order.reverse()
            for name, b, out in order:
                out.append(one_round(bench, a, b))
                x = out[-1]
                say("  compare round %d, %s: store %.0f msg/s, retrieval %.0f / %.0f msg/s"
                    % (r + 1, name, x["sat"]["rate"], x["off"]["rate"], x["on"]["rate"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.monotonic() - t0
    lines = [
        HEAD,
        "",
        "Written by `tests/bench/run.py --baseline %s` (%s, %.0f s for this part); receiptd "
        "built at %s (before) and this tree, %s (after), every other program this tree's. %d "
        "rounds, each running every measurement with both builds, alternating which goes first; "
        "a value is the median over the rounds, each round's value in parentheses; the ratio "
        "after/before is taken round by round. Machine: %s. Load average at the start of the "
        "part %.2f / %.2f / %.2f. Store runs: N=%d at saturation (window 2000), %d msg/s "
        "offered for 5 s; retrievals: Q=%d queued for one user, fetched in pages of 100."
        % ((a.baseline, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), wall, short, head,
            a.compare_runs, bench.machine()) + load
           + (a.compare_n, a.compare_rate, a.compare_q)),
        "",
        "| figure | before (%s) | after | after / before |" % short,
        "|---|---|---|---|",
    ]
    for label, fmt, run, field in FIGURES:
        b = [x[run][field] for x in before]
        n = [x[run][field] for x in after]
        ratios = [y / x if x else 0.0 for x, y in zip(b, n)]
        lines.append("| %s | %s | %s | %s |" % (
            label.format(rate=a.compare_rate, q=a.compare_q), bench.show(b, fmt=fmt),
            bench.show(n, fmt=fmt), bench.show(ratios, fmt="%.2f")))
    return "\n".join(lines) + "\n"
