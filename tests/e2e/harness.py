#!/usr/bin/python3
"""Process harness for receiptd end-to-end tests and the demo stack.

Starts Redis, an XMPP server (Prosody, or ejabberd with server='ejabberd' / E2E_SERVER=ejabberd)
and receiptd on free loopback ports inside a temporary directory, and offers restart / SIGKILL /
SIGTERM helpers for each of them. With redis='cluster' (E2E_REDIS=cluster) the single Redis is
replaced by a Redis Cluster of 3 masters + 3 replicas (tests/cluster/cluster.py) and receiptd's
component.ini gets `[redis] cluster = <the masters>` instead of host/port.

    /usr/bin/python3 tests/e2e/harness.py demo --receiptd build/component/receiptd [--server ejabberd]
        [--redis cluster]

Everything here is synchronous (subprocess based); the asyncio scenarios call
the slow helpers through asyncio.to_thread().
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import ports  # tests/e2e/ports.py: port reservations shared by every suite

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

COMPONENT = "receipts.localhost"
SECRET = "s3cret"
USER_DOMAIN = "localhost"
OTHER_DOMAIN = "other.localhost"   # a domain served by the XMPP server but NOT a user_domain of receiptd

# user -> (domain, password)
USERS = {
    "alice": (USER_DOMAIN, "alice-pw"),
    "bob": (USER_DOMAIN, "bob-pw"),
    "carol": (USER_DOMAIN, "carol-pw"),
    "eve": (OTHER_DOMAIN, "eve-pw"),
}

DEFAULT_DELIVERY = {
    "retry_interval": "5",
    "delivery_window": "30",
    "dedupe_window": "86400",
    "fetch_max": "100",
    "fetch_max_bytes": "65536",
    "max_offline_messages": "10000",
    "max_offline_bytes": "67108864",
    "max_stanza_bytes": "65536",
}


class HarnessError(Exception):
    pass


def free_port():
    """A free TCP port on 127.0.0.1, reserved for this process (see ports.py)."""
    return ports.reserve()


def port_open(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_until(pred, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return
        if time.monotonic() > deadline:
            raise HarnessError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def note(fmt, *args):
    """Timestamped harness action (wall clock, to correlate with the process logs)."""
    ts = time.strftime("%H:%M:%S", time.gmtime()) + ".%03dZ" % (int(time.time() * 1000) % 1000)
    sys.stdout.write("[harness %s] %s\n" % (ts, fmt % args if args else fmt))
    sys.stdout.flush()


def tail(path, nbytes=6000):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - nbytes))
            data = f.read().decode("utf-8", "replace")
        return ("[...]\n" if size > nbytes else "") + data
    except OSError as e:
        return "<cannot read %s: %s>" % (path, e)


class Proc:
    """A child process with its output sent to a log file."""

    name = "proc"

    def __init__(self, workdir):
        self.workdir = workdir
        self.popen = None
        self.runs = 0
        self.logs = []          # one log file per run
        self.exit_codes = []    # (how, returncode) of finished runs

    @property
    def log(self):
        return self.logs[-1] if self.logs else None

    def argv(self):
        raise NotImplementedError

    def _spawn(self, env=None):
        self.runs += 1
        log = os.path.join(self.workdir, "%s.%d.log" % (self.name, self.runs))
        self.logs.append(log)
        fh = open(log, "wb")
        try:
            self.popen = subprocess.Popen(self.argv(), stdout=fh, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, cwd=self.workdir, env=env,
                                          start_new_session=True)
        finally:
            fh.close()
        note("started %s pid %d (run %d)", self.name, self.popen.pid, self.runs)

    def alive(self):
        return self.popen is not None and self.popen.poll() is None

    def check_alive(self, what):
        if self.popen is not None and self.popen.poll() is not None:
            raise HarnessError("%s exited with code %s while waiting for %s; log %s:\n%s" % (
                self.name, self.popen.returncode, what, self.log, tail(self.log)))

    def kill9(self):
        if self.popen is None:
            return
        if self.popen.poll() is None:
            note("SIGKILL %s pid %d", self.name, self.popen.pid)
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()
        self.exit_codes.append(("SIGKILL", self.popen.returncode))
        self.popen = None

    def term(self, timeout=10, strict=True):
        """SIGTERM and wait; returns the exit code. If it hangs: SIGKILL, and raise when strict."""
        if self.popen is None:
            return None
        p = self.popen
        if p.poll() is None:
            note("SIGTERM %s pid %d", self.name, p.pid)
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                note("%s pid %d ignored SIGTERM for %ss: SIGKILL", self.name, p.pid, timeout)
                p.kill()
                p.wait()
                self.exit_codes.append(("SIGTERM-timeout", p.returncode))
                self.popen = None
                if strict:
                    raise HarnessError("%s did not exit within %ss of SIGTERM" % (self.name, timeout))
                return p.returncode
            self.exit_codes.append(("SIGTERM", p.returncode))
            note("%s pid %d exited with %s", self.name, p.pid, p.returncode)
        else:
            self.exit_codes.append(("exited-before-SIGTERM", p.returncode))
        self.popen = None
        return p.returncode

    def cleanup(self):
        """Best effort, used on teardown after failures."""
        if self.popen is not None and self.popen.poll() is None:
            try:
                note("cleanup: SIGTERM %s pid %d", self.name, self.popen.pid)
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(5)
            except Exception:
                try:
                    self.popen.kill()
                    self.popen.wait(5)
                except Exception:
                    pass
        self.popen = None

    def log_text(self):
        out = []
        for path in self.logs:
            out.append(open(path, "rb").read().decode("utf-8", "replace") if os.path.exists(path) else "")
        return "".join(out)

    def count_in_log(self, needle, run=None):
        path = self.logs[run - 1] if run else self.log
        try:
            with open(path, "rb") as f:
                return f.read().decode("utf-8", "replace").count(needle)
        except (OSError, TypeError):
            return 0


class Redis(Proc):
    name = "redis"

    def __init__(self, workdir):
        super().__init__(workdir)
        self.port = free_port()
        self.dir = os.path.join(workdir, "redis")
        os.makedirs(self.dir, exist_ok=True)

    def argv(self):
        return ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self.dir, "--appendonly", "yes", "--appendfsync", "always",
                "--save", "", "--daemonize", "no"]

    def start(self, timeout=10):
        self._spawn()
        wait_until(lambda: (self.check_alive("redis port") or True) and self.ping(), timeout,
                   "redis on port %d" % self.port)

    def ping(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args):
        """Minimal RESP client, enough for debugging (e.g. KEYS *)."""
        payload = b"*%d\r\n" % len(args)
        for a in args:
            a = a.encode() if isinstance(a, str) else a
            payload += b"$%d\r\n%s\r\n" % (len(a), a)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(payload)
            time.sleep(0.1)
            return s.recv(1 << 20).decode("utf-8", "replace")

    def stop(self):
        return self.term()

    def restart(self):
        self.stop()
        self.start()


REDIS_MODES = ("single", "cluster")


def redis_mode(explicit=None):
    """'single' (one redis-server, the default) or 'cluster': explicit, else $E2E_REDIS."""
    name = explicit or os.environ.get("E2E_REDIS") or "single"
    if name not in REDIS_MODES:
        raise HarnessError("unknown redis mode %r (known: %s)" % (name, ", ".join(REDIS_MODES)))
    return name


def load_cluster_module():
    """tests/cluster/cluster.py (it imports this module back; imported lazily to avoid the cycle)."""
    d = os.path.join(os.path.dirname(HERE), "cluster")
    if d not in sys.path:
        sys.path.insert(0, d)
    import cluster
    return cluster


class ClusterRedis:
    """A Redis Cluster (3 masters + 3 replicas by default) standing in for Redis in a stack.

    The nodes live in WORKDIR/cluster/nodeN/ (removed with the stack's temp dir). `cluster` is the
    tests/cluster/cluster.py RedisCluster (slot-aware client, reshard, kill_master, ...);
    `seeds()` is what receiptd's `[redis] cluster =` gets. Only the parts of Redis' interface a
    stack needs are here: start(), cleanup(), logs, alive(); helpers that talk to one Redis
    directly (command(), stop(), kill9(), CLIENT PAUSE...) do not apply and raise."""

    name = "redis-cluster"
    port = None

    def __init__(self, workdir, **cluster_kw):
        self.workdir = workdir
        self.cluster = load_cluster_module().RedisCluster(os.path.join(workdir, "cluster"),
                                                         **cluster_kw)

    def start(self, timeout=60):
        if not self.cluster.started:
            self.cluster.start(timeout=timeout)

    def seeds(self):
        return self.cluster.seeds()

    @property
    def logs(self):
        return [path for p in self.cluster.procs for path in p.logs]

    @property
    def log(self):
        return None

    def alive(self):
        return any(p.alive() for p in self.cluster.procs)

    def cleanup(self):
        self.cluster.stop()

    def command(self, *args):
        raise HarnessError("redis.command%r: not available on a Redis Cluster stack "
                           "(use stack.redis.cluster.command_key / scan_keys)" % (args,))

    def keys(self, match="*"):
        """Every key matching `match` on every master (SCAN each)."""
        out = []
        for port in self.cluster.masters():
            out.extend(self.cluster.scan_keys(port, match))
        return out

    def key_command(self, key, *args):
        """One command on the master serving `key` (follows MOVED/ASK, retries TRYAGAIN); parsed reply."""
        return self.cluster.command_key(key, *args)


def make_redis(workdir, mode="single", cluster_kw=None):
    return ClusterRedis(workdir, **(cluster_kw or {})) if mode == "cluster" else Redis(workdir)


PROSODY_CFG = """-- generated by tests/e2e/harness.py
run_as_root = true
daemonize = false
pidfile = "{dir}/prosody.pid"
data_path = "{data}"
log = {{ {loglevel} = "{dir}/prosody.out" }}
plugin_paths = {{ }}
modules_enabled = {{
    "roster"; "saslauth"; "disco"; "ping"; "offline"; "posix";
}}
modules_disabled = {{ "s2s"; "tls"; }}
authentication = "internal_plain"
storage = "internal"
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
c2s_ports = {{ {c2s} }}
c2s_interfaces = {{ "127.0.0.1" }}
s2s_ports = {{ }}
component_ports = {{ {comp} }}
component_interfaces = {{ "127.0.0.1" }}
http_ports = {{ }}
https_ports = {{ }}

VirtualHost "{user_domain}"
VirtualHost "{other_domain}"

Component "{component}"
    component_secret = "{secret}"
"""


class Prosody(Proc):
    name = "prosody"

    def __init__(self, workdir, users=USERS, loglevel="info"):
        super().__init__(workdir)
        self.c2s_port = free_port()
        self.component_port = free_port()
        self.dir = os.path.join(workdir, "prosody")
        self.data = os.path.join(self.dir, "data")
        os.makedirs(self.data, exist_ok=True)
        self.cfg = os.path.join(self.dir, "prosody.cfg.lua")
        with open(self.cfg, "w") as f:
            f.write(PROSODY_CFG.format(dir=self.dir, data=self.data, c2s=self.c2s_port,
                                       comp=self.component_port, user_domain=USER_DOMAIN,
                                       other_domain=OTHER_DOMAIN, component=COMPONENT,
                                       secret=SECRET, loglevel=loglevel))
        self.users = users
        self._registered = False

    def register_users(self):
        # prosodyctl writes as user 'prosody'
        subprocess.run(["chown", "-R", "prosody:prosody", self.dir], check=True)
        for user, (domain, pw) in self.users.items():
            r = subprocess.run(["prosodyctl", "--config", self.cfg, "register", user, domain, pw],
                               capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                raise HarnessError("prosodyctl register %s@%s failed: %s%s" % (
                    user, domain, r.stdout, r.stderr))
        self._registered = True

    def argv(self):
        return ["prosody", "--config", self.cfg, "-F"]

    def start(self, timeout=15):
        if not self._registered:
            self.register_users()
        self._spawn()
        wait_until(lambda: (self.check_alive("ports") or True)
                   and port_open(self.c2s_port) and port_open(self.component_port),
                   timeout, "prosody ports %d/%d" % (self.c2s_port, self.component_port))

    def stop(self):
        return self.term()

    def restart(self):
        self.stop()
        self.start()

    def log_text(self):
        p = os.path.join(self.dir, "prosody.out")
        return open(p).read() if os.path.exists(p) else ""

    def extra_logs(self):
        p = os.path.join(self.dir, "prosody.out")
        return [p] if os.path.exists(p) else []


EJABBERD_CFG = """# generated by tests/e2e/harness.py
hosts:
  - "{user_domain}"
  - "{other_domain}"
loglevel: {loglevel}
log_rotate_count: 0
auth_method: internal
auth_password_format: plain
s2s_access: none
listen:
  -
    port: {c2s}
    ip: "127.0.0.1"
    module: ejabberd_c2s
    starttls: false
    backlog: 1024
    max_stanza_size: 262144
  -
    port: {comp}
    ip: "127.0.0.1"
    module: ejabberd_service
    backlog: 64
    hosts:
      "{component}":
        password: "{secret}"
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  c2s:
    allow: all
api_permissions:
  "console commands":
    from:
      - ejabberd_ctl
    who: all
    what: "*"
modules:
  mod_disco: {{}}
  mod_ping: {{}}
  mod_roster: {{}}
  mod_offline: {{}}
"""


def ejabberd_erl_libs():
    """The directory holding ejabberd-VERSION/ and its deps (Debian: /usr/lib/<triplet>)."""
    import glob
    for d in sorted(glob.glob("/usr/lib/*/ejabberd-*/ebin")):
        return os.path.dirname(os.path.dirname(d))
    raise HarnessError("ejabberd is not installed (no /usr/lib/*/ejabberd-*/ebin; apt-get install ejabberd)")


class Ejabberd(Proc):
    """A throwaway ejabberd VM (no ejabberdctl wrapper, no epmd), same interface as Prosody.

    The Erlang VM runs with its own node name and cookie and listens for distribution on a free
    loopback port (-erl_epmd_port, -start_epmd false), so it never touches the shared epmd; users are
    registered (and ctl() commands run) from a short-lived hidden node connecting to that port, once,
    before the first start returns; restarts (SIGTERM or SIGKILL) keep ports, spool and users.
    Stopping: SIGTERM (about 1 s), SIGKILL if it hangs; teardown SIGKILLs right away."""

    name = "ejabberd"

    def __init__(self, workdir, users=USERS, loglevel="info"):
        super().__init__(workdir)
        self.c2s_port = free_port()
        self.component_port = free_port()
        self.dist_port = free_port()
        self.dir = os.path.join(workdir, "ejabberd")
        self.spool = os.path.join(self.dir, "spool")
        os.makedirs(self.spool, exist_ok=True)
        tag = "%d%s" % (os.getpid(), os.urandom(3).hex())
        self.node = "rdej%s@localhost" % tag
        self.cookie = "rdcookie" + os.urandom(8).hex()
        self.cfg = os.path.join(self.dir, "ejabberd.yml")
        self.ejlog = os.path.join(self.dir, "ejabberd.log")
        with open(self.cfg, "w") as f:
            f.write(EJABBERD_CFG.format(c2s=self.c2s_port, comp=self.component_port,
                                        user_domain=USER_DOMAIN, other_domain=OTHER_DOMAIN,
                                        component=COMPONENT, secret=SECRET, loglevel=loglevel))
        self.users = users
        self._registered = False
        self.erl_libs = ejabberd_erl_libs()

    def _env(self, logname="ejabberd.log"):
        env = dict(os.environ)
        env.update(HOME=self.dir, ERL_LIBS=self.erl_libs, EJABBERD_CONFIG_PATH=self.cfg,
                   EJABBERD_LOG_PATH=os.path.join(self.dir, logname))
        return env

    def _erl(self, node):
        # no scheduler busy-waiting: tests run several VMs and servers side by side on 2 cores
        return ["erl", "-sname", node, "-noinput", "-setcookie", self.cookie,
                "-erl_epmd_port", str(self.dist_port), "-start_epmd", "false",
                "+sbwt", "none", "+sbwtdcpu", "none", "+sbwtdio", "none"]

    def argv(self):
        return self._erl(self.node) + ["-kernel", "inet_dist_use_interface", "{127,0,0,1}",
                                       "-mnesia", "dir", '"%s"' % self.spool, "-s", "ejabberd"]

    def ctl(self, *args, timeout=30):
        """Run an ejabberd_ctl command on the running node (hidden node, no listener, no epmd)."""
        node = "rdctl%s@localhost" % os.urandom(4).hex()
        return subprocess.run(self._erl(node) + ["-hidden", "-dist_listen", "false",
                                                 "-s", "ejabberd_ctl", "-extra", self.node] + list(args),
                              capture_output=True, text=True, timeout=timeout, cwd=self.dir,
                              env=self._env("ctl.log"), stdin=subprocess.DEVNULL)

    def register_users(self):
        """Register every user through ONE hidden node (rpc to ejabberd_auth:try_register/3), like
        `ejabberd_ctl register` but ~0.4 s in all instead of ~0.5 s per user. ejabberd opens its
        listeners before it has created the auth table (CI saw `no_exists` for `passwd` right
        after the ports opened), so a call that fails with badrpc is tried again, every 100 ms
        for up to 20 s; a repeat is harmless ({error, exists} counts as done)."""
        def b(v):
            return '<<"%s">>' % v
        calls = ",".join("{%s,%s,%s}" % (b(u), b(d), b(pw)) for u, (d, pw) in self.users.items())
        expr = ("Reg = fun Reg(U, H, P, N) -> "
                "case rpc:call('%s', ejabberd_auth, try_register, [U, H, P]) of "
                "{badrpc, _} when N > 0 -> timer:sleep(100), Reg(U, H, P, N - 1); R -> R end end, "
                "Rs = [{U, H, Reg(U, H, P, 200)} || {U, H, P} <- [%s]], "
                "Bad = [X || {_, _, R} = X <- Rs, R =/= ok, R =/= {error, exists}], "
                "io:format(\"~p~n\", [Rs]), halt(case Bad of [] -> 0; _ -> 1 end)." % (self.node, calls))
        node = "rdctl%s@localhost" % os.urandom(4).hex()
        argv = self._erl(node) + ["-hidden", "-dist_listen", "false", "-eval", expr]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=self.dir,
                               env=self._env("ctl.log"), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise HarnessError("ejabberd user registration timed out")
        if r.returncode != 0:
            raise HarnessError("ejabberd user registration failed (exit %s): %s%s" % (
                r.returncode, r.stdout, r.stderr))
        self._registered = True

    def start(self, timeout=30):
        self._spawn(env=self._env())
        wait_until(lambda: (self.check_alive("ports") or True)
                   and port_open(self.c2s_port) and port_open(self.component_port),
                   timeout, "ejabberd ports %d/%d" % (self.c2s_port, self.component_port),
                   interval=0.05)
        if not self._registered:
            self.register_users()

    def stop(self, timeout=10):
        """SIGTERM the VM (it stops in about 1 s); SIGKILL if it does not exit within timeout."""
        return self.term(timeout, strict=False)

    def restart(self):
        self.stop()
        self.start()

    def cleanup(self):
        """Teardown: SIGKILL right away (the VM takes ~1 s to stop on SIGTERM; its data is thrown away)."""
        if self.popen is not None and self.popen.poll() is None:
            note("cleanup: SIGKILL %s pid %d", self.name, self.popen.pid)
            try:
                self.popen.kill()
                self.popen.wait(5)
            except Exception:
                pass
        self.popen = None

    def log_text(self):
        return open(self.ejlog).read() if os.path.exists(self.ejlog) else ""

    def extra_logs(self):
        return [os.path.join(self.dir, n) for n in ("ejabberd.log", "error.log", "crash.log")
                if os.path.exists(os.path.join(self.dir, n))]


SERVERS = {"prosody": Prosody, "ejabberd": Ejabberd}


def server_name(explicit=None):
    name = explicit or os.environ.get("E2E_SERVER") or "prosody"
    if name not in SERVERS:
        raise HarnessError("unknown server %r (known: %s)" % (name, ", ".join(SERVERS)))
    return name


class Receiptd(Proc):
    name = "receiptd"

    def __init__(self, workdir, binary, prosody, redis, delivery=None, extra=None, name=None, ini=None):
        """`prosody` is the XMPP server object (Prosody or Ejabberd; only its component_port is used).
        `name` names the log files (default 'receiptd'); `ini` given = share that existing config file
        (a second instance with the same component.ini) instead of writing receiptd.ini."""
        super().__init__(workdir)
        if name:
            self.name = name
        self.binary = binary
        self.prosody = prosody
        self.server = prosody
        self.redis = redis
        self.delivery = dict(DEFAULT_DELIVERY)
        self.delivery.update({k: str(v) for k, v in (delivery or {}).items()})
        self.extra = extra or {}
        if ini:
            self.ini = ini
        else:
            self.ini = os.path.join(workdir, "receiptd.ini")
            self.write_ini()

    def write_ini(self):
        sections = {
            "component": {
                "jid": COMPONENT,
                "secret": SECRET,
                "server_host": "127.0.0.1",
                "server_port": str(self.prosody.component_port),
                "user_domains": USER_DOMAIN,
            },
            "redis": ({"cluster": self.redis.seeds()} if isinstance(self.redis, ClusterRedis)
                      else {"host": "127.0.0.1", "port": str(self.redis.port)}),
            "sqlite": {"path": os.path.join(self.workdir, "receiptd.sqlite3")},
            "delivery": self.delivery,
        }
        for sec, kv in self.extra.items():
            sections.setdefault(sec, {}).update(kv)
        with open(self.ini, "w") as f:
            for sec, kv in sections.items():
                f.write("[%s]\n" % sec)
                for k, v in kv.items():
                    f.write("%s = %s\n" % (k, v))
                f.write("\n")

    def argv(self):
        return [self.binary, "-c", self.ini]

    def start(self, timeout=15, wait_store=True):
        if not os.access(self.binary, os.X_OK):
            raise HarnessError("receiptd binary %r not found/executable" % self.binary)
        env = dict(os.environ)
        self._spawn(env=env)
        self.wait_ready(timeout, wait_store=wait_store)

    def wait_ready(self, timeout=15, link_count=1, store_count=1, wait_store=True):
        def ready():
            self.check_alive("'link: authenticated' / 'store: connected'")
            ok = self.count_in_log("link: authenticated") >= link_count
            if wait_store:
                ok = ok and self.count_in_log("store: connected") >= store_count
            return ok
        try:
            wait_until(ready, timeout, "receiptd log lines")
        except HarnessError as e:
            raise HarnessError("%s; receiptd log %s:\n%s" % (e, self.log, tail(self.log)))

    def wait_log(self, needle, count=1, timeout=15):
        try:
            wait_until(lambda: (self.check_alive(needle) or True)
                       and self.count_in_log(needle) >= count, timeout, "receiptd log %r x%d" % (needle, count))
        except HarnessError as e:
            raise HarnessError("%s; receiptd log %s:\n%s" % (e, self.log, tail(self.log)))

    def restart(self, timeout=15):
        code = self.term()
        if code != 0:
            raise HarnessError("receiptd exited with %s on SIGTERM (expected 0)" % code)
        self.start(timeout)


def find_receiptd(explicit=None):
    cands = [explicit, os.environ.get("RECEIPTD"),
             os.path.join(REPO, "build", "component", "receiptd")]
    for c in cands:
        if c:
            return os.path.abspath(c)
    return None


class Stack:
    """Redis + an XMPP server (Prosody by default, or ejabberd) + receiptd in one temp dir.

    Use as a context manager. `server` is 'prosody' or 'ejabberd' (default: $E2E_SERVER, else
    prosody). `receiptd_count` > 1 starts that many receiptd processes with the same ini file on the
    same server and Redis (only ejabberd accepts more than one connection for a component domain).
    `redis` is 'single' (default: $E2E_REDIS, else single) or 'cluster': a Redis Cluster
    (ClusterRedis; `cluster_kw` goes to RedisCluster) instead of one Redis.
    Attributes: server (the XMPP server process object), server_name, redis, redis_mode, receiptd
    (the first instance), receiptds (all). `prosody` is kept as an alias of `server` for older callers."""

    def __init__(self, receiptd=None, delivery=None, extra=None, start_receiptd=True, keep=None,
                 prosody_loglevel="info", server=None, receiptd_count=1, redis=None, cluster_kw=None):
        self.binary = find_receiptd(receiptd)
        self.delivery = delivery
        self.extra = extra
        self.start_receiptd_flag = start_receiptd
        self.keep = keep if keep is not None else bool(os.environ.get("E2E_KEEP"))
        self.prosody_loglevel = os.environ.get("E2E_PROSODY_LOG", prosody_loglevel)
        self.server_name = server_name(server)
        self.receiptd_count = receiptd_count
        self.redis_mode = redis_mode(redis)
        self.cluster_kw = cluster_kw
        self.tmp = None
        self.redis = self.server = self.receiptd = None
        self.receiptds = []
        self.failed = False

    @property
    def prosody(self):
        return self.server

    @prosody.setter
    def prosody(self, value):
        self.server = value

    def __enter__(self):
        self.tmp = tempfile.mkdtemp(prefix="receiptd-e2e-%s-" % self.server_name)
        os.chmod(self.tmp, 0o755)
        try:
            self.redis = make_redis(self.tmp, self.redis_mode, self.cluster_kw)
            if self.redis_mode == "cluster":
                self.redis.start()      # its ports (receiptd's seeds) are known once it runs
            if self.server_name == "ejabberd":
                self.server = Ejabberd(self.tmp)
            else:
                self.server = Prosody(self.tmp, loglevel=self.prosody_loglevel)
            self.receiptd = Receiptd(self.tmp, self.binary, self.server, self.redis,
                                     self.delivery, self.extra)
            self.receiptds = [self.receiptd]
            for i in range(2, self.receiptd_count + 1):
                self.receiptds.append(Receiptd(self.tmp, self.binary, self.server, self.redis,
                                               self.delivery, self.extra, name="receiptd%d" % i,
                                               ini=self.receiptd.ini))
            if self.redis_mode != "cluster":
                self.redis.start()
            self.server.start()
            if self.start_receiptd_flag:
                for rd in self.receiptds:
                    rd.start()
        except BaseException:
            self.failed = True
            self.close()
            raise
        return self

    def __exit__(self, et, ev, tb):
        if et is not None:
            self.failed = True
        self.close()
        return False

    @property
    def c2s_port(self):
        return self.server.c2s_port

    def stop_receiptd_checked(self, rd=None):
        """SIGTERM receiptd (the first instance unless rd given); raises if the exit code is not 0."""
        rd = rd or self.receiptd
        code = rd.term()
        if code not in (None, 0):
            raise HarnessError("%s exited with code %s on SIGTERM (expected 0); log:\n%s"
                               % (rd.name, code, tail(rd.log)))

    def dump_logs(self, out=sys.stderr):
        for p in self.receiptds + [self.server, self.redis]:
            if p is None:
                continue
            for path in p.logs:
                out.write("\n===== %s =====\n%s\n" % (path, tail(path, 20000)))
        if self.server is not None:
            for path in self.server.extra_logs():
                out.write("\n===== %s =====\n%s\n" % (path, tail(path, 8000)))

    def close(self):
        for p in self.receiptds + [self.server, self.redis]:
            if p is not None:
                p.cleanup()
        if self.failed:
            self.dump_logs()
        if self.tmp and not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif self.tmp:
            sys.stderr.write("kept temp dir %s\n" % self.tmp)


# ---------------------------------------------------------------- demo mode

def demo(args):
    binary = find_receiptd(args.receiptd)
    delivery = {}
    if args.retry_interval:
        delivery["retry_interval"] = args.retry_interval
    if args.delivery_window:
        delivery["delivery_window"] = args.delivery_window
    rmode = redis = None
    try:
        sname = server_name(args.server)
        tmp = tempfile.mkdtemp(prefix="receiptd-demo-")
        os.chmod(tmp, 0o755)
        rmode = redis_mode(args.redis)
        redis = make_redis(tmp, rmode)
        prosody = Ejabberd(tmp) if sname == "ejabberd" else Prosody(tmp)
        if rmode == "cluster":
            redis.start()    # receiptd's seeds are the cluster's ports
    except Exception as e:   # HarnessError, or the cluster module's (its own import of this file)
        print("demo: %s" % e, file=sys.stderr)
        if redis is not None and rmode == "cluster":
            redis.cleanup()
        return 1
    label = "ejabberd" if sname == "ejabberd" else "Prosody"
    rd = Receiptd(tmp, binary, prosody, redis, delivery)
    stopping = {"flag": False}

    def on_signal(signum, frame):
        stopping["flag"] = True
        if rd.popen is not None and rd.popen.poll() is None:
            rd.popen.send_signal(signal.SIGTERM)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    code = 0
    try:
        if not os.access(binary, os.X_OK):
            raise HarnessError("receiptd binary %r not found (build it: meson setup build && ninja -C build)" % binary)
        if rmode != "cluster":
            redis.start()
        prosody.start()
        users = "\n".join("    %-22s password: %s" % ("%s@%s" % (u, d), pw)
                          for u, (d, pw) in USERS.items())
        print("""
receiptd demo stack (temp dir %(tmp)s)
  %(redis)s
  %(label)-8s c2s     127.0.0.1:%(c2s)d  (no TLS, PLAIN auth allowed)
  %(label)-8s component port 127.0.0.1:%(comp)d  <- receiptd connects here as %(comp_jid)s
  receiptd config  %(ini)s

Demo accounts (users of %(dom)s are served by receiptd; %(other)s is not):
%(users)s

Connect an XMPP client to host 127.0.0.1 port %(c2s)d, without TLS, e.g. as alice@%(dom)s.
  1. Announce yourself to the component:  <presence to='%(comp_jid)s'/>
     (or subscribe to %(comp_jid)s; receiptd approves and subscribes back)
  2. To message bob@%(dom)s through receiptd, address the XEP-0106 escaped JID
         bob\\40%(dom)s@%(comp_jid)s
     and add <request xmlns='urn:xmpp:receipts'/> (with a message id) to get a
     <stored xmlns='urn:receiptd:0'/> ack and bob's <received/> receipt back.
  3. Offline messages: <iq type='get' to='%(comp_jid)s'><summary xmlns='urn:receiptd:0'/></iq>
     and <fetch xmlns='urn:receiptd:0' max='10'/>; ack with <ack xmlns='urn:receiptd:0'><item id='S'/></ack>.
  See proto/PROTOCOL.md. Ctrl-C stops everything.

receiptd log follows:
""" % dict(label=label, tmp=tmp,
           redis=("Redis Cluster    %s (masters; 3 + 3 replicas, AOF, appendfsync always)"
                  % redis.seeds() if rmode == "cluster" else
                  "Redis            127.0.0.1:%d  (AOF, appendfsync always)" % redis.port),
           c2s=prosody.c2s_port, comp=prosody.component_port, comp_jid=COMPONENT, ini=rd.ini, dom=USER_DOMAIN, other=OTHER_DOMAIN, users=users))
        sys.stdout.flush()
        # receiptd in the foreground: its stderr goes straight to the terminal
        rd.popen = subprocess.Popen(rd.argv(), stdin=subprocess.DEVNULL)
        while not stopping["flag"]:
            if rd.popen.poll() is not None:
                print("receiptd exited with code %s" % rd.popen.returncode, file=sys.stderr)
                code = rd.popen.returncode or 1
                break
            if not prosody.alive() or not redis.alive():
                print("%s or redis died; stopping (see %s)" % (label, tmp), file=sys.stderr)
                code = 1
                break
            time.sleep(0.2)
        if rd.popen is not None and rd.popen.poll() is None:
            rd.popen.send_signal(signal.SIGTERM)
        if rd.popen is not None:
            try:
                rd.popen.wait(10)
            except subprocess.TimeoutExpired:
                rd.popen.kill()
                rd.popen.wait()
            if stopping["flag"]:
                print("receiptd exited with code %s" % rd.popen.returncode)
    except HarnessError as e:
        print("demo: %s" % e, file=sys.stderr)
        code = 1
    finally:
        rd.cleanup()
        prosody.cleanup()
        redis.cleanup()
        if args.keep:
            print("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return code


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run Redis + Prosody (or ejabberd) + receiptd on loopback with demo users")
    d.add_argument("--server", choices=sorted(SERVERS),
                   help="XMPP server to attach to (default: $E2E_SERVER, else prosody)")
    d.add_argument("--receiptd", help="path of the receiptd binary (default: $RECEIPTD or build/component/receiptd)")
    d.add_argument("--redis", choices=REDIS_MODES,
                   help="one Redis, or a 3+3 Redis Cluster (default: $E2E_REDIS, else single)")
    d.add_argument("--retry-interval", help="override [delivery] retry_interval")
    d.add_argument("--delivery-window", help="override [delivery] delivery_window")
    d.add_argument("--keep", action="store_true", help="keep the temp dir at exit")
    args = ap.parse_args(argv)
    if args.cmd == "demo":
        return demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
