#!/usr/bin/env python3
"""A bounded load generator at a steady rate: every request counted.

    load.py [--url http://127.0.0.1:8880/] [--rate 20] [--seconds 30]

Sends `rate` requests per second (each on a new connection, 5 s timeout, at most 64 in flight:
a request that finds no free worker is counted as an error, never queued), and prints
ok / non-2xx / connection errors and how many responses each release served
(`release=<tag>` in the body). As a module: Load(url, rate).start() ... .stop() -> Counts.
"""

import argparse
import re
import threading
import time
import urllib.error
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
        self.lock = threading.Lock()

    @property
    def failed(self):
        return self.non_2xx + self.errors

    def line(self):
        rel = ", ".join(f"{k}: {v}" for k, v in sorted(self.releases.items()))
        return (f"{self.sent} requests, {self.ok} ok, {self.non_2xx} non-2xx, {self.errors} errors"
                f" (releases seen: {rel or 'none'})")


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8880/")
    ap.add_argument("--rate", type=float, default=20)
    ap.add_argument("--seconds", type=float, default=30)
    a = ap.parse_args()
    if a.rate <= 0 or a.seconds <= 0:
        ap.error("--rate and --seconds must be positive")
    load = Load(a.url, a.rate).start()
    time.sleep(a.seconds)
    c = load.stop()
    print(c.line())
    return 1 if c.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
