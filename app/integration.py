#!/usr/bin/env python3
"""The app's end-to-end checks against a live deployment, through its load balancer.

    python3 app/integration.py URL [--expect-tag TAG] [--wait SECONDS] [--timeout SECONDS]
                               [--min-hosts N] [--insecure | --ca FILE] [--server-name NAME]
                               [--http-port PORT]
    make integration URL=https://qa-login.example.com EXPECT_TAG=3f2c1ab

Python standard library only: it runs on a bare Jenkins agent. One line per check, in order:

  health    GET /health answers 200 {"status": "ok"}
  release   every sampled /health names the expected tag (--expect-tag), and so does the page /
  ready     GET /ready answers 200: the app reaches its database, schema current
  notes     POST /notes creates a note; GET /notes/<id> reads it back, on every host it reaches
  https     for an https URL: http://<host>/ answers a redirect to the same path on https://<host>
            (the ALB's HTTP listener); skipped, and said so, for an http URL
  hosts     at least --min-hosts different hosts answered (response header X-Served-By)
When health fails for the whole window, the other checks are not run (reported as skipped).

Eventual consistency: a check that fails is tried again every 2 s until --wait seconds after the
start (a new load balancer's name, instances still registering, a release still rolling); each
check runs at least once, each request is bounded by --timeout. The longest run is therefore
about --wait plus one round of requests.

TLS: the system's CAs by default; --ca FILE for a private CA, --insecure to skip verification
(a throwaway QA certificate). --server-name NAME: URL names the load balancer itself (its DNS
name) while the certificate and the Host header are NAME.

Exit status: 0 every check passed (skips included), 1 a check failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import ssl
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

RETRY_PAUSE = 2.0
MAX_BODY = 1 << 20


class CheckFailed(Exception):
    """A check's verdict: what was wrong, and what to look at."""


class Skip(Exception):
    """The check does not apply here; the message says why."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    host: str  # X-Served-By, or "?" when the app did not say

    def json(self) -> dict:
        try:
            value = json.loads(self.body)
        except ValueError:
            raise CheckFailed(f"expected JSON, got {self.excerpt()!r}") from None
        if not isinstance(value, dict):
            raise CheckFailed(f"expected a JSON object, got {self.excerpt()!r}")
        return value

    def excerpt(self, n: int = 200) -> str:
        text = self.body.decode("utf-8", "replace").strip()
        return text if len(text) <= n else text[:n] + "..."


class _NamedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to `host` with TLS (SNI and certificate check) for `server_name`: the load
    balancer's address on the wire, the site's name in TLS."""

    def __init__(self, host: str, port: int, server_name: str, context: ssl.SSLContext, timeout: float):
        super().__init__(host, port, timeout=timeout, context=context)
        self._skiff_name = server_name
        self._skiff_context = context

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._skiff_context.wrap_socket(self.sock, server_hostname=self._skiff_name)


@dataclass
class Client:
    scheme: str
    host: str
    port: int
    base_path: str
    server_name: str
    timeout: float
    context: ssl.SSLContext | None
    hosts: set[str] = field(default_factory=set)

    def request(self, method: str, path: str, body: dict | None = None, *, scheme: str | None = None,
                port: int | None = None) -> Response:
        scheme = scheme or self.scheme
        port = port or self.port
        target = self.base_path.rstrip("/") + path
        headers = {"Host": self.server_name if port in (80, 443) else f"{self.server_name}:{port}",
                   "Accept": "application/json", "User-Agent": "skiff-integration",
                   "Connection": "close"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if scheme == "https":
            assert self.context is not None
            conn: http.client.HTTPConnection = _NamedHTTPSConnection(
                self.host, port, self.server_name, self.context, self.timeout)
        else:
            conn = http.client.HTTPConnection(self.host, port, timeout=self.timeout)
        where = f"{method} {scheme}://{self.host}:{port}{target}"
        try:
            conn.request(method, target, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read(MAX_BODY)
            got = Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, raw,
                           resp.getheader("X-Served-By") or "?")
        except ssl.SSLCertVerificationError as err:
            raise CheckFailed(
                f"{where}: the certificate is not trusted ({err.verify_message}); for a private CA pass"
                " --ca FILE (CA=...), for a throwaway QA certificate --insecure (INSECURE=1), or"
                " --server-name NAME when URL names the load balancer and the certificate the site"
            ) from None
        except socket.gaierror as err:
            raise CheckFailed(f"{where}: cannot resolve {self.host} ({err.strerror}); a new load"
                              " balancer's name can take a few minutes to resolve (raise --wait)") from None
        except (TimeoutError, socket.timeout):
            raise CheckFailed(f"{where}: no answer within {self.timeout:g} s (--timeout)") from None
        except ConnectionRefusedError:
            raise CheckFailed(f"{where}: connection refused: nothing listens there") from None
        except (OSError, http.client.HTTPException) as err:
            raise CheckFailed(f"{where}: {type(err).__name__}: {err}") from None
        finally:
            conn.close()
        if got.host != "?":
            self.hosts.add(got.host)
        return got


def release_tag(body: dict) -> str:
    """The tag in the app's {"release": {"tag": ...}}, or what is there instead."""
    release = body.get("release")
    return str(release.get("tag")) if isinstance(release, dict) else f"(no release in {body!r:.80})"


def expect_status(resp: Response, want: int, what: str) -> None:
    if resp.status != want:
        raise CheckFailed(f"{what}: HTTP {resp.status} (expected {want}) from host {resp.host}: {resp.excerpt()}")


# --- the checks ---------------------------------------------------------------------------------
# Each takes the client and the options and returns what it found (one line), or raises.

def check_health(c: Client, opts: argparse.Namespace) -> str:
    resp = c.request("GET", "/health")
    expect_status(resp, 200, "GET /health")
    body = resp.json()
    if body.get("status") != "ok":
        raise CheckFailed(f"GET /health: status {body.get('status')!r}, expected 'ok'")
    return f"200 from host {resp.host}, release {release_tag(body)}"


def check_release(c: Client, opts: argparse.Namespace) -> str:
    want = opts.expect_tag
    samples = max(4, 2 * opts.min_hosts)
    seen: dict[str, set[str]] = {}
    for _ in range(samples):
        resp = c.request("GET", "/health")
        expect_status(resp, 200, "GET /health")
        tag = release_tag(resp.json())
        seen.setdefault(tag, set()).add(resp.host)
    wrong = {t: h for t, h in seen.items() if t != want}
    if wrong:
        found = "; ".join(f"{t} on {', '.join(sorted(h))}" for t, h in sorted(wrong.items()))
        raise CheckFailed(f"expected release {want}, but /health says {found}: did the release"
                          " (ctl release / make update-stack) finish, or is EXPECT_TAG wrong?")
    page = c.request("GET", "/")
    expect_status(page, 200, "GET /")
    marker = f'id="release-tag">{want}<'
    if marker not in page.body.decode("utf-8", "replace"):
        raise CheckFailed(f"the page / of host {page.host} does not show release {want}")
    return f"{want} on {samples} of {samples} requests and on the page"


def check_ready(c: Client, opts: argparse.Namespace) -> str:
    resp = c.request("GET", "/ready")
    if resp.status == 503:
        why = resp.json().get("database", resp.excerpt()) if resp.body.startswith(b"{") else resp.excerpt()
        raise CheckFailed(f"GET /ready: 503 from host {resp.host}: the app cannot use its database: {why}")
    expect_status(resp, 200, "GET /ready")
    return f"database ok, schema {resp.json().get('schema_version')} (host {resp.host})"


def check_notes(c: Client, opts: argparse.Namespace) -> str:
    text = f"skiff integration check {uuid.uuid4()} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
    resp = c.request("POST", "/notes", {"body": text})
    expect_status(resp, 201, "POST /notes")
    note = resp.json()
    if note.get("body") != text or not isinstance(note.get("id"), int):
        raise CheckFailed(f"POST /notes answered 201 but not with the note sent: {resp.excerpt()}")
    writer = resp.host
    readers: set[str] = set()
    reads = max(3, 2 * opts.min_hosts)
    for _ in range(reads):
        got = c.request("GET", f"/notes/{note['id']}")
        if got.status == 404:
            raise CheckFailed(f"note {note['id']} written through host {writer} is missing on host"
                              f" {got.host}: do the instances share one database?")
        expect_status(got, 200, f"GET /notes/{note['id']}")
        if got.json().get("body") != text:
            raise CheckFailed(f"GET /notes/{note['id']} on host {got.host} returned another body:"
                              f" {got.excerpt()}")
        readers.add(got.host)
    return f"note {note['id']} written on {writer}, read back {reads} times on {', '.join(sorted(readers))}"


def check_https(c: Client, opts: argparse.Namespace) -> str:
    if c.scheme != "https":
        raise Skip("the URL is http: no TLS listener to redirect to")
    path = "/health?skiff-redirect-check=1"
    resp = c.request("GET", path, scheme="http", port=opts.http_port)
    if resp.status not in (301, 302, 307, 308):
        raise CheckFailed(f"GET http://{c.server_name}:{opts.http_port}{path}: HTTP {resp.status},"
                          " expected a redirect to https (the load balancer's HTTP listener)")
    location = resp.headers.get("location", "")
    loc = urlsplit(location)
    want_path = c.base_path.rstrip("/") + "/health"
    if (loc.scheme, loc.hostname, loc.path, loc.query) != ("https", c.server_name.lower(), want_path,
                                                           "skiff-redirect-check=1") \
            or loc.port not in (None, c.port):
        raise CheckFailed(f"http redirects to {location!r}, expected https://{c.server_name}{want_path}"
                          "?skiff-redirect-check=1 (same host, path and query)")
    return f"{resp.status} to {location}"


def check_hosts(c: Client, opts: argparse.Namespace) -> str:
    extra = 0
    while len(c.hosts) < opts.min_hosts and extra < 4 * opts.min_hosts + 4:
        c.request("GET", "/health")
        extra += 1
    if not c.hosts:
        raise CheckFailed("no response named its host (header X-Served-By): is this the skiff app?")
    names = ", ".join(sorted(c.hosts))
    if len(c.hosts) < opts.min_hosts:
        raise CheckFailed(f"only {len(c.hosts)} host(s) answered ({names}), expected at least"
                          f" {opts.min_hosts}: are the other instances out of the load balancer?")
    return f"{len(c.hosts)} host(s) answered: {names}"


CHECKS: list[tuple[str, Callable[[Client, argparse.Namespace], str]]] = [
    ("health", check_health),
    ("release", check_release),
    ("ready", check_ready),
    ("notes", check_notes),
    ("https", check_https),
    ("hosts", check_hosts),
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="integration.py", description="End-to-end checks of a deployed skiff app (see the module doc).")
    p.add_argument("url", metavar="URL", help="the deployment, e.g. https://qa-login.example.com")
    p.add_argument("--expect-tag", required=True, help="the release tag every host must run")
    p.add_argument("--wait", type=float, default=120.0, help="retry window in seconds (default 120)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    p.add_argument("--min-hosts", type=int, default=1, help="different hosts that must answer (default 1)")
    p.add_argument("--server-name", default="", help="TLS name and Host header (default: URL's host)")
    p.add_argument("--http-port", type=int, default=80, help="port of the HTTP->HTTPS redirect (default 80)")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="do not verify the certificate")
    tls.add_argument("--ca", default="", help="PEM file of the CA(s) to trust instead of the system's")
    opts = p.parse_args(argv)
    parts = urlsplit(opts.url)
    problems = []
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"URL {opts.url!r}: expected http(s)://host[:port][/path]")
    if parts.query or parts.fragment:
        problems.append(f"URL {opts.url!r}: no query or fragment, please")
    if not opts.expect_tag.strip():
        problems.append("--expect-tag is empty: pass the release tag (EXPECT_TAG=<git hash>)")
    if not 0 <= opts.wait <= 3600:
        problems.append(f"--wait {opts.wait:g}: expected 0 to 3600 seconds")
    if not 0 < opts.timeout <= 300:
        problems.append(f"--timeout {opts.timeout:g}: expected more than 0, at most 300 seconds")
    if not 1 <= opts.min_hosts <= 50:
        problems.append(f"--min-hosts {opts.min_hosts}: expected 1 to 50")
    if not 0 < opts.http_port < 65536:
        problems.append(f"--http-port {opts.http_port}: expected a TCP port")
    if problems:
        p.error("; ".join(problems))
    return opts


def make_client(opts: argparse.Namespace) -> Client:
    parts = urlsplit(opts.url)
    context = None
    if parts.scheme == "https":
        if opts.insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            try:
                context = ssl.create_default_context(cafile=opts.ca or None)
            except (OSError, ssl.SSLError) as err:
                print(f"integration: --ca {opts.ca}: cannot load it as PEM CA certificates: {err}",
                      file=sys.stderr)
                raise SystemExit(2) from None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        print(f"integration: URL {opts.url!r}: invalid port", file=sys.stderr)
        raise SystemExit(2) from None
    return Client(parts.scheme, parts.hostname or "", port, parts.path or "/",
                  opts.server_name or parts.hostname or "", opts.timeout, context)


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    client = make_client(opts)
    deadline = time.monotonic() + opts.wait
    print(f"integration checks of {opts.url} (expect release {opts.expect_tag}, at least"
          f" {opts.min_hosts} host(s), retrying for {opts.wait:g} s)", flush=True)
    passed = failed = skipped = 0
    for name, check in CHECKS:
        if name != "health" and failed and passed == 0:
            # Nothing answered /health in the whole window: the other checks would only repeat it.
            print(f"skip {name:8} not run: the health check failed", flush=True)
            skipped += 1
            continue
        started = time.monotonic()
        tries = 0
        while True:
            tries += 1
            try:
                found = check(client, opts)
            except Skip as why:
                print(f"skip {name:8} {why}", flush=True)
                skipped += 1
                break
            except Exception as err:  # CheckFailed, or anything unexpected: fails the check, readably
                if not isinstance(err, CheckFailed):
                    err = CheckFailed(f"unexpected {type(err).__name__}: {err}")
                if time.monotonic() + RETRY_PAUSE < deadline:
                    time.sleep(RETRY_PAUSE)
                    continue
                took = time.monotonic() - started
                print(f"FAIL {name:8} {err} ({tries} tries, {took:.1f} s)", flush=True)
                failed += 1
                break
            took = time.monotonic() - started
            print(f"ok   {name:8} {found} ({took:.1f} s{f', {tries} tries' if tries > 1 else ''})", flush=True)
            passed += 1
            break
    print(f"integration: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
