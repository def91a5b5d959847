#!/usr/bin/env bash
# Proves app/integration.py (`make integration`) against the real app: two gunicorn processes of
# app/ on one sqlite file, each in a UTS namespace of its own (so each has its own host name, as
# two instances would), behind HAProxy standing in for the ALB: HTTPS on a port with a
# certificate of a test CA (testlib.sh), HTTP on another that redirects to it like the template's
# HttpListener, round robin between the two. Then:
#   pass:  every check ok, both hosts seen (--min-hosts 2), through TLS verified with --ca;
#          an http URL straight to one app: the https check skipped, the rest ok;
#   fail (exit 1, with the message that says why): a wrong --expect-tag (retried for --wait,
#          then given up, bounded), an untrusted certificate, a dead URL (fast), more hosts
#          expected than answer, an HTTP port that does not redirect, and a broken note store
#          (the notes table dropped under the running app); bad arguments exit 2.
# Needs root (unshare --uts), haproxy and openssl, and the venv-app of .ci/setup.sh.
# Prints ok/FAIL per check, ends with "integration-test: N passed, N failed".
#
# Conditions are given to check() in single quotes when they are to be evaluated there.
# shellcheck disable=SC2016
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
home=${SKIFF_CI_HOME:-/var/lib/skiff-ci}
venv=$home/venv-app
for tool in "$venv/bin/gunicorn" "$venv/bin/python" haproxy openssl unshare; do
  command -v "$tool" >/dev/null || { echo "integration-test: $tool not found; run .ci/setup.sh first" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "integration-test: needs root (unshare --uts gives each app its host name)" >&2; exit 1; }
# shellcheck source=app/testlib.sh
. "$here/testlib.sh"

run=$$$RANDOM
tag=it-$run
tmp=$(mktemp -d)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  rm -rf "$tmp"
}
trap cleanup EXIT

passed=0 failed=0
check() { # name, condition command...; shows the last output on failure
  local name=$1; shift
  if "$@"; then passed=$((passed + 1)); echo "ok   $name"
  else failed=$((failed + 1)); echo "FAIL $name"; sed 's/^/     | /' "$tmp/out" | tail -n 12; fi
}
has() { grep -qF -- "$1" "$tmp/out"; }
integration() { # args...; sets rc and took
  local t=$SECONDS
  python3 "$here/integration.py" "$@" >"$tmp/out" 2>&1
  rc=$? took=$((SECONDS - t))
}

# --- the apps and the load balancer ---------------------------------------------------------------
make_test_cas "$tmp/ca" || exit 1
cat "$tmp/ca/server.pem" "$tmp/ca/server.key" >"$tmp/haproxy.pem"
port_a=$(free_port) port_b=$(free_port) https_port=$(free_port) http_port=$(free_port)
start_app() { # name port
  (cd "$here" && exec env HOST=127.0.0.1 PORT="$2" SQLITE_PATH="$tmp/app.db" SKIFF_RELEASE_TAG="$tag" \
    WEB_CONCURRENCY=1 WEB_THREADS=4 unshare --uts sh -c 'hostname "$0" && exec "$1" -c gunicorn.conf.py wsgi:app' \
    "skiff-it-$1-$run" "$venv/bin/gunicorn") >"$tmp/app-$1.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do
    curl -fsS -m 1 -o /dev/null "http://127.0.0.1:$2/health" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "integration-test: app $1 did not answer on :$2 within 20 s:" >&2; tail -n 20 "$tmp/app-$1.log" >&2
  exit 1
}
start_app a "$port_a"
start_app b "$port_b"
cat >"$tmp/haproxy.cfg" <<EOF
global
  maxconn 200
defaults
  mode http
  timeout connect 2s
  timeout client 10s
  timeout server 10s
frontend https
  bind 127.0.0.1:$https_port ssl crt $tmp/haproxy.pem
  default_backend apps
# Like the template's HttpListener: 301 to https, same host, path and query, the HTTPS port.
frontend http
  bind 127.0.0.1:$http_port
  http-request redirect location https://%[req.hdr(host),field(1,:)]:$https_port%[capture.req.uri] code 301
backend apps
  balance roundrobin
  server a 127.0.0.1:$port_a
  server b 127.0.0.1:$port_b
EOF
haproxy -f "$tmp/haproxy.cfg" -db >"$tmp/haproxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do
  curl -fsS -m 1 -o /dev/null --cacert "$tmp/ca/ca.pem" "https://localhost:$https_port/health" 2>/dev/null && break
  sleep 0.2
done
lb=https://127.0.0.1:$https_port
tls=(--server-name localhost --ca "$tmp/ca/ca.pem" --http-port "$http_port")

# --- passing ---------------------------------------------------------------------------------
integration "$lb" --expect-tag "$tag" --wait 10 --min-hosts 2 "${tls[@]}"
check "every check passes through the load balancer with TLS (exit $rc)" [ "$rc" = 0 ]
check "the report names all six checks ok" \
  eval '[ "$(grep -cE "^ok   (health|release|ready|notes|https|hosts) " "$tmp/out")" = 6 ] && has "integration: 6 passed, 0 failed, 0 skipped"'
check "both hosts answered, by their own names" eval 'has "skiff-it-a-$run" && has "skiff-it-b-$run"'
check "the https check followed the HTTP listener's redirect" has "301 to https://localhost:$https_port/health?skiff-redirect-check=1"
integration "https://localhost:$https_port" --expect-tag "$tag" --wait 5 --ca "$tmp/ca/ca.pem" --http-port "$http_port"
check "the site's own name as URL, no --server-name (exit $rc)" [ "$rc" = 0 ]
integration "http://127.0.0.1:$port_a" --expect-tag "$tag" --wait 5
check "an http URL straight to one app passes (exit $rc)" [ "$rc" = 0 ]
check "... and says the https check does not apply" has "skip https    the URL is http"

# --- failing ---------------------------------------------------------------------------------
integration "$lb" --expect-tag not-the-tag --wait 4 "${tls[@]}"
check "a wrong --expect-tag fails (exit $rc)" [ "$rc" = 1 ]
check "... saying which release runs where" has "expected release not-the-tag, but /health says $tag on"
# Retried every 2 s while a retry can still start within --wait.
check "... after retrying for --wait, and no longer (${took} s)" eval '[ "$took" -ge 2 ] && [ "$took" -le 20 ] && has "(2 tries"'
check "... while the other checks still pass" has "integration: 5 passed, 1 failed, 0 skipped"

integration "$lb" --expect-tag "$tag" --wait 0 --server-name localhost
check "a certificate of an unknown CA fails (exit $rc)" [ "$rc" = 1 ]
check "... saying what to pass" eval 'has "the certificate is not trusted" && has "--ca FILE" && has "--insecure"'
integration "$lb" --expect-tag "$tag" --wait 0 --insecure --http-port "$http_port"
check "--insecure accepts it (exit $rc)" [ "$rc" = 0 ]

dead=$(free_port)
integration "http://127.0.0.1:$dead" --expect-tag "$tag" --wait 2 --timeout 2
check "a dead URL fails (exit $rc)" [ "$rc" = 1 ]
check "... with connection refused, the rest not run" eval 'has "connection refused" && has "skip release  not run: the health check failed"'
check "... within its bounds (${took} s)" [ "$took" -le 10 ]

integration "$lb" --expect-tag "$tag" --wait 0 --min-hosts 3 "${tls[@]}"
check "three hosts expected, two answer: fails (exit $rc)" [ "$rc" = 1 ]
check "... naming the two" has "only 2 host(s) answered"

integration "$lb" --expect-tag "$tag" --wait 0 --server-name localhost --ca "$tmp/ca/ca.pem" --http-port "$port_a"
check "an HTTP port that serves instead of redirecting fails the https check (exit $rc)" \
  eval '[ "$rc" = 1 ] && has "HTTP 200, expected a redirect to https"'

integration "ftp://127.0.0.1/" --expect-tag ""
check "bad arguments exit 2 (exit $rc), each named" eval '[ "$rc" = 2 ] && has "expected http(s)://" && has "--expect-tag is empty"'

# The note store breaks under the running apps: their table is gone.
"$venv/bin/python" -c 'import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute("DROP TABLE notes"); c.commit()' "$tmp/app.db"
integration "$lb" --expect-tag "$tag" --wait 3 --min-hosts 2 "${tls[@]}"
check "a broken note store fails the notes check (exit $rc)" eval '[ "$rc" = 1 ] && has "FAIL notes    POST /notes: HTTP 5"'
# The page lists notes too, so the release check (which reads the page) fails with it.
check "... while health and ready pass (the database answers, its schema is current)" \
  eval 'has "ok   health" && has "ok   ready" && has "FAIL release  GET /: HTTP 503"'

echo "integration-test: $passed passed, $failed failed"
((failed == 0))
