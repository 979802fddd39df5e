"""Loopback ports for test servers that no other test, and no outgoing connection, can take.

Binding port 0 and releasing it is racy: the suites run in parallel, and the kernel hands the
same ephemeral range to every outgoing connect(), so between the release and the server's own
bind another test (or a client socket) may take the port -- CI once saw ejabberd fail with
eaddrinuse that way. So a port is drawn from below the kernel's ephemeral range, where connect()
never lands, and reserved across processes by creating /tmp/receiptd-test-ports/<port> with
O_EXCL. The file names its owner (pid and start time, so a reused pid is not mistaken for it);
a reservation whose owner is gone is taken over. Python owners drop theirs at exit.

As a script (for the shell wrappers): `ports.py reserve OWNER_PID N` prints N ports reserved for
OWNER_PID, `ports.py release OWNER_PID` drops them."""

import atexit
import errno
import os
import random
import socket
import sys
import time

DIR = "/tmp/receiptd-test-ports"
_mine = set()


def _start_time(pid):
    """The process' start time in clock ticks (field 22 of /proc/pid/stat), or None if gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def _owner_tag(pid):
    return "%d %s\n" % (pid, _start_time(pid))


def _owner_alive(tag, path):
    try:
        pid, start = tag.split()
        return _start_time(int(pid)) == start
    except ValueError:
        # Not written yet: its owner is between create and write, or died there. Only the
        # second is stale, and only the file's age tells them apart.
        try:
            return time.time() - os.path.getmtime(path) < 10
        except OSError:
            return False


def _candidate_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    if lo - 20000 >= 2000:
        return 20000, lo - 1
    return hi + 1, 65535


def _bindable(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _try_reserve(port, tag):
    path = os.path.join(DIR, str(port))
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    held = f.read()
            except OSError:
                continue
            if _owner_alive(held, path):
                return False
            try:
                os.unlink(path)  # stale; if another process races us here, O_EXCL decides
            except OSError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(tag)
        return True
    return False


def reserve(owner=None):
    """A free loopback port reserved for `owner` (default: this process)."""
    os.makedirs(DIR, exist_ok=True)
    pid = owner or os.getpid()
    tag = _owner_tag(pid)
    lo, hi = _candidate_range()
    for _ in range(2000):
        port = random.randint(lo, hi)
        if not _try_reserve(port, tag):
            continue
        if _bindable(port):
            if pid == os.getpid():
                _mine.add(port)
            return port
        os.unlink(os.path.join(DIR, str(port)))  # something outside the tests listens there
    raise OSError(errno.EADDRINUSE, "no free loopback port in %d-%d" % (lo, hi))


def release(owner):
    tag = _owner_tag(owner)
    try:
        names = os.listdir(DIR)
    except OSError:
        return
    for name in names:
        path = os.path.join(DIR, name)
        try:
            with open(path) as f:
                if f.read() == tag:
                    os.unlink(path)
        except OSError:
            pass


@atexit.register
def _release_mine():
    for port in _mine:
        try:
            os.unlink(os.path.join(DIR, str(port)))
        except OSError:
            pass


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "reserve":
        print(" ".join(str(reserve(int(sys.argv[2]))) for _ in range(int(sys.argv[3]))))
    elif len(sys.argv) == 3 and sys.argv[1] == "release":
        release(int(sys.argv[2]))
    else:
        sys.exit("usage: ports.py reserve OWNER_PID N | release OWNER_PID")
