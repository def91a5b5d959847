#!/usr/bin/env python3
"""The fleet box's well-behaved test app (image skiff-ci/graceful-app:1, testbed/images/graceful-app.sh):
what a handover swap expects of an app, and what the busybox test app does not do.

  * HTTP/1.1 with keep-alive (the load balancer pools its connections to the targets and reuses
    them; so does the box's HAProxy, `http-reuse always`);
  * listens on $PORT (the agent sets it: the app port, or the idle slot of a handover swap);
  * GET /health: 200 `ok` (the agent's gate and probe); GET / (and any other path): 200
    `release=$SKIFF_RELEASE_TAG host=<the host's address>`, like the busybox app;
    `?sleep=S` holds the response S seconds (at most 5): requests in flight at SIGTERM;
  * SIGTERM: the listener closes at once (no new connections), requests in flight finish, every
    kept-alive connection gets `Connection: close` on its next response and is closed after it;
    the app exits once no connection is left, or after $GRACE seconds (default 4, under the box's
    StopTimeoutSeconds of 5) closing the connections still idle then.

Test knobs (environment, baked into a tag's image by `box.py push`):
  FAIL_AFTER=S   /health answers 500 from S seconds after its first 200 on (a release that
                 fails a few seconds after it passed the agent's gate)
  UNHEALTHY=1    /health always 500 (a release that never becomes healthy)
  SLOW_START=S   /health 503 for the first S seconds after the start (a gate that takes a while)
"""

import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(os.environ.get("PORT", "8080"))
RELEASE = os.environ.get("SKIFF_RELEASE_TAG", "unknown")
GRACE = float(os.environ.get("GRACE", "4"))
FAIL_AFTER = float(os.environ["FAIL_AFTER"]) if os.environ.get("FAIL_AFTER") else None
UNHEALTHY = os.environ.get("UNHEALTHY") == "1"
SLOW_START = float(os.environ.get("SLOW_START") or 0)
STARTED = time.monotonic()


def host_address():
    """The host's address (host networking): the source address of the default route."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent for a UDP connect
            return s.getsockname()[0]
    except OSError:
        return "unknown"


PAGE = f"release={RELEASE} host={host_address()}\n".encode()
stopping = threading.Event()
state = {"first_healthy": None}
connections = {}  # handler -> "idle" | "busy"
lock = threading.Lock()


def log(msg):
    print(f"{time.strftime('%H:%M:%S')} graceful-app :{PORT} {RELEASE}: {msg}", file=sys.stderr, flush=True)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless a side says close
    server_version = "graceful-app"

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        with lock:
            connections[self] = "idle"

    def finish(self):
        with lock:
            connections.pop(self, None)
        super().finish()

    def handle_one_request(self):
        # Idle until the request line arrives: the only state in which the shutdown may close
        # the connection under the client (HAProxy's pool), and only after GRACE.
        self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline:
            self.close_connection = True
            return
        with lock:
            connections[self] = "busy"
        try:
            if not self.parse_request():
                return
            if self.command not in ("GET", "HEAD"):
                self.send_error(405)
                return
            self.do_GET()
            self.wfile.flush()
        finally:
            with lock:
                if self in connections:
                    connections[self] = "idle"

    def health(self):
        if UNHEALTHY:
            return 500
        if time.monotonic() - STARTED < SLOW_START:
            return 503
        if FAIL_AFTER is None:
            return 200
        now = time.monotonic()
        if state["first_healthy"] is None:
            state["first_healthy"] = now
            log(f"first /health 200; failing it from {FAIL_AFTER:g} s on")
        return 200 if now - state["first_healthy"] < FAIL_AFTER else 500

    def do_GET(self):
        path, _, query = self.path.partition("?")
        if path == "/health":
            code = self.health()
            body = b"ok\n" if code == 200 else b"failing\n"
        else:
            code, body = 200, PAGE
            for part in query.split("&"):
                if part.startswith("sleep="):
                    try:
                        time.sleep(min(max(float(part[6:]), 0.0), 5.0))
                    except ValueError:
                        pass
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if stopping.is_set():
            # Shutting down: this response is the connection's last, and says so, so that the
            # load balancer does not put it back in its pool.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def shutdown(server):
    t0 = time.monotonic()
    with lock:
        log(f"SIGTERM with {len(connections)} connection(s) open "
            f"({sum(st == 'busy' for st in connections.values())} busy)")
    server.shutdown()  # serve_forever returns: no new connection is accepted
    server.server_close()  # the listener is closed: a connect is refused, not queued
    deadline = t0 + GRACE
    while time.monotonic() < deadline:
        with lock:
            if not connections:
                break
        time.sleep(0.05)
    with lock:
        left = dict(connections)
    closed = 0
    for handler, st in left.items():
        if st == "idle":
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
                closed += 1
            except OSError:
                pass
    log(f"exiting after {time.monotonic() - t0:.1f} s; closed {closed} idle connection(s) at the deadline"
        if left else f"exiting after {time.monotonic() - t0:.1f} s; every connection closed after its response")
    os._exit(0)


def main():
    server = Server(("0.0.0.0", PORT), Handler)
    signal.signal(signal.SIGTERM, lambda *a: (stopping.set(), threading.Thread(target=shutdown, args=(server,)).start()))
    log(f"serving on 0.0.0.0:{PORT}" + (f", FAIL_AFTER={FAIL_AFTER:g}" if FAIL_AFTER is not None else "")
        + (", UNHEALTHY" if UNHEALTHY else ""))
    server.serve_forever(poll_interval=0.2)
    # serve_forever returned: the shutdown thread finishes the connections and exits.
    threading.Event().wait()


if __name__ == "__main__":
    main()
