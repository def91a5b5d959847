#!/usr/bin/env python3
"""A bounded load generator at a steady rate: every request counted.

    load.py [--url http://127.0.0.1:8880/] [--rate 20] [--seconds 30] [--keepalive [--connections 32]]

Sends `rate` requests per second and prints ok / non-2xx / connection errors and how many
responses each release served (`release=<tag>` in the body). A request that finds no free worker
is counted as an error, never queued; every request has a 5 s timeout.

  * default: each request on a new connection, at most 64 in flight;
  * --keepalive: `connections` workers, each keeping one HTTP/1.1 connection to the load balancer
    and sending its requests on it (as browsers and API clients do); a connection the server side
    closed (`Connection: close`) is reopened for the next request. A request that fails is NOT
    retried, not even on a reused connection: every failure counts.

As a module: Load(url, rate).start() ... .stop() -> Counts (in this process), or
ProcessLoad(url, rate, keepalive=True) with the same methods: the generator in a process of its
own, so that the caller's threads (boto3, watches) do not share its interpreter lock at 200/s.
`--seconds 0` runs until stdin closes; `--json` prints the counts as one JSON document.
"""

import argparse
import http.client
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

MAX_IN_FLIGHT = 64


class Counts:
    def __init__(self):
        self.sent = self.ok = self.non_2xx = self.errors = 0
        self.releases = Counter()
        self.statuses = Counter()
        self.first_failure = None
        self.connects = 0  # connections opened (keep-alive: how often a connection was not reused)
        self.lock = threading.Lock()

    @property
    def failed(self):
        return self.non_2xx + self.errors

    def line(self):
        rel = ", ".join(f"{k}: {v}" for k, v in sorted(self.releases.items()))
        conns = f", {self.connects} connections opened" if self.connects else ""
        return (f"{self.sent} requests, {self.ok} ok, {self.non_2xx} non-2xx, {self.errors} errors"
                f" (releases seen: {rel or 'none'}{conns})")

    def to_json(self):
        return {"sent": self.sent, "ok": self.ok, "non_2xx": self.non_2xx, "errors": self.errors,
                "releases": dict(self.releases), "statuses": {str(k): v for k, v in self.statuses.items()},
                "first_failure": self.first_failure, "connects": self.connects}

    @classmethod
    def from_json(cls, d):
        c = cls()
        c.sent, c.ok, c.non_2xx, c.errors = d["sent"], d["ok"], d["non_2xx"], d["errors"]
        c.releases.update(d["releases"])
        c.statuses.update({int(k): v for k, v in d["statuses"].items()})
        c.first_failure, c.connects = d["first_failure"], d["connects"]
        return c


class Load:
    def __init__(self, url, rate, timeout=5.0):
        self.url, self.rate, self.timeout = url, rate, timeout
        self.counts = Counts()
        self.stopping = threading.Event()
        self.slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        self.pool = ThreadPoolExecutor(MAX_IN_FLIGHT)
        self.thread = threading.Thread(target=self._tick, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def _tick(self):
        start, n = time.monotonic(), 0
        while not self.stopping.is_set():
            n += 1
            delay = start + n / self.rate - time.monotonic()
            if delay > 0 and self.stopping.wait(delay):
                break
            with self.counts.lock:
                self.counts.sent += 1
            if self.slots.acquire(blocking=False):
                self.pool.submit(self._one)
            else:
                self._record(None, "no free worker (responses slower than the rate allows)")

    def _record(self, status, error=None, body=""):
        c = self.counts
        with c.lock:
            if error:
                c.errors += 1
            elif 200 <= status < 300:
                c.ok += 1
                m = re.search(r"release=(\S+)", body)
                c.releases[m.group(1) if m else "?"] += 1
            else:
                c.non_2xx += 1
            if status:
                c.statuses[status] += 1
            if (error or not 200 <= status < 300) and c.first_failure is None:
                c.first_failure = f"{time.strftime('%H:%M:%S')} {error or status}"

    def _one(self):
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout) as r:
                self._record(r.status, body=r.read(4096).decode(errors="replace"))
        except urllib.error.HTTPError as e:
            self._record(e.code)
        except Exception as e:  # connection refused/reset, timeout
            self._record(None, f"{type(e).__name__}: {e}")
        finally:
            self.slots.release()

    def stop(self):
        self.stopping.set()
        self.thread.join(5)
        self.pool.shutdown(wait=True)  # bounded: each request has its timeout
        return self.counts


class KeepAliveLoad(Load):
    """`connections` workers, each with one persistent HTTP/1.1 connection; the ticker hands a
    request to a free worker or counts it as an error (no free worker), as Load does."""

    def __init__(self, url, rate, timeout=5.0, connections=32):
        super().__init__(url, rate, timeout)
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        self.path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.slots = threading.BoundedSemaphore(connections)
        self.pool = None
        self.tickets = queue.Queue()
        self.workers = [threading.Thread(target=self._worker, daemon=True) for _ in range(connections)]

    def start(self):
        for w in self.workers:
            w.start()
        return super().start()

    def _tick(self):
        start, n = time.monotonic(), 0
        while not self.stopping.is_set():
            n += 1
            delay = start + n / self.rate - time.monotonic()
            if delay > 0 and self.stopping.wait(delay):
                break
            with self.counts.lock:
                self.counts.sent += 1
            if self.slots.acquire(blocking=False):
                self.tickets.put(1)
            else:
                self._record(None, "no free connection (responses slower than the rate allows)")

    def _worker(self):
        conn = None
        while True:
            if self.tickets.get() is None:
                break
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                    with self.counts.lock:
                        self.counts.connects += 1
                conn.request("GET", self.path)
                r = conn.getresponse()
                body = r.read().decode(errors="replace")
                if r.will_close:  # the server side said Connection: close
                    conn.close()
                    conn = None
                if 200 <= r.status < 300:
                    self._record(r.status, body=body)
                else:
                    self._record(r.status)
            except Exception as e:  # reset, closed under the request, timeout
                self._record(None, f"{type(e).__name__}: {e}")
                if conn is not None:
                    conn.close()
                conn = None
            finally:
                self.slots.release()
        if conn is not None:
            conn.close()

    def stop(self):
        self.stopping.set()
        self.thread.join(5)
        for _ in self.workers:
            self.tickets.put(None)
        for w in self.workers:
            w.join(self.timeout + 1)  # bounded: each request has its timeout
        return self.counts


class ProcessLoad:
    """Load or KeepAliveLoad in a child process (`load.py --seconds 0 --json`): start() ...
    stop() -> Counts, the same as in process."""

    def __init__(self, url, rate, keepalive=True, connections=32):
        self.cmd = [sys.executable, os.path.abspath(__file__), "--url", url, "--rate", str(rate),
                    "--seconds", "0", "--json"] + (["--keepalive", "--connections", str(connections)] if keepalive else [])
        self.p = None

    def start(self):
        self.p = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return self

    def stop(self):
        out, _ = self.p.communicate("", timeout=60)  # stdin closed: the child stops and reports
        try:
            return Counts.from_json(json.loads(out.strip().splitlines()[-1]))
        except (ValueError, IndexError, KeyError):
            c = Counts()
            c.errors, c.first_failure = 1, f"the load process exited {self.p.returncode} without counts: {out[-300:]!r}"
            return c


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8880/")
    ap.add_argument("--rate", type=float, default=20)
    ap.add_argument("--seconds", type=float, default=30, help="0: until stdin closes")
    ap.add_argument("--keepalive", action="store_true", help="persistent connections, one per worker")
    ap.add_argument("--connections", type=int, default=32, help="workers (connections) with --keepalive")
    ap.add_argument("--json", action="store_true", help="the counts as one JSON document")
    a = ap.parse_args()
    if a.rate <= 0 or a.seconds < 0 or a.connections < 1:
        ap.error("--rate and --connections must be positive, --seconds not negative")
    load = (KeepAliveLoad(a.url, a.rate, connections=a.connections) if a.keepalive else Load(a.url, a.rate)).start()
    if a.seconds:
        time.sleep(a.seconds)
    else:
        sys.stdin.read()
    c = load.stop()
    print(json.dumps(c.to_json()) if a.json else c.line(), flush=True)
    return 1 if c.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
