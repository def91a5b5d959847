#!/usr/bin/env bash
# Builds app/Dockerfile offline (PyPI only) on skiff-ci/python:3.11-bookworm under a unique tag,
# runs it with host networking on a free port, and checks what the skiff agent relies on: /health
# answers 200, the page shows the release passed in the environment, notes are stored, the process
# is not root, and SIGTERM stops it cleanly.
# Then the production path, end to end with the real agent: a throwaway MariaDB that requires TLS
# (its certificate from a test CA, testlib.sh), the login in a Secrets Manager secret (moto), the
# image pushed to the local registry (127.0.0.1:5000) and run by the agent (file source) with
# DATABASE_HOST set. Checked: without DATABASE_SSL_CA the image verifies against its RDS bundle
# and refuses the test server; with the test CA it serves notes; with the database stopped the
# agent's /healthz stays 200 while the pages answer 503; with it back (and after it hung) all
# recover without a restart of the container.
# Removes the containers, images, registry tag, secret and server it made, whatever happens.
# Every name, port and release value is new per run, so leftovers cannot answer for it.
# Env: BASE (skiff-ci/python:3.11-bookworm; built by testbed/images/debian-python.sh when missing),
# AGENT_BIN ($CARGO_TARGET_DIR/release/agent: `cargo build --release -p skiff-agent`),
# APP_DIR (this folder: the app to build), TEST_AWS_ENDPOINT_URL (http://127.0.0.1:5055).
# Exits non-zero on any failure; the last line is "image-test: N passed, N failed".
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
app_dir=$(cd "${APP_DIR:-$here}" && pwd)
base=${BASE:-skiff-ci/python:3.11-bookworm}
home=${SKIFF_CI_HOME:-/var/lib/skiff-ci}
python=${PYTHON:-$home/venv-app/bin/python}
agent_bin=${AGENT_BIN:-${CARGO_TARGET_DIR:-/root/.cache/skiff-target}/release/agent}
aws_endpoint=${TEST_AWS_ENDPOINT_URL:-http://127.0.0.1:5055}
registry=127.0.0.1:5000
# shellcheck source=app/testlib.sh
. "$here/testlib.sh"
if ! docker image inspect "$base" >/dev/null 2>&1; then
  [ "$base" = skiff-ci/python:3.11-bookworm ] || { echo "image-test: no image $base" >&2; exit 1; }
  bash "$here/../testbed/images/debian-python.sh"
fi

run_id="$(date +%s)-$$-$RANDOM"
tag="skiff-app-test:$run_id"
name="skiff-app-test-$run_id"
release="image-test-$run_id"
digest="sha256:$(printf %s "$run_id" | sha256sum | cut -d' ' -f1)"
work=$(mktemp -d)
mkdir -p "$home"
db_dir=$(mktemp -d "$home/mariadb-image-test.XXXXXX")  # not /tmp: InnoDB's O_DIRECT fails on tmpfs
app_name="skiff-it-app-$run_id"
it_repo="$registry/skiff-it/app"
it_tag="it-$run_id"
secret_arn="" agent_pid=""
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
  if [ -n "$agent_pid" ]; then kill "$agent_pid" 2>/dev/null || true; wait "$agent_pid" 2>/dev/null || true; fi
  # Containers and images of this run only, intermediate ones of a failed build included.
  docker rm -f -v "$name" "$name-rds" >/dev/null 2>&1 || true
  docker ps -aq --filter "label=skiff.app=$app_name" | xargs -r docker rm -f -v >/dev/null 2>&1 || true
  docker ps -aq --filter "label=skiff.build-id=$run_id" | xargs -r docker rm -f -v >/dev/null 2>&1 || true
  docker rmi -f "$tag" "$it_repo:$it_tag" >/dev/null 2>&1 || true
  docker images -aq --filter "label=skiff.build-id=$run_id" | xargs -r docker rmi -f >/dev/null 2>&1 || true
  local digest
  digest=$(curl -sfI -m 5 -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    "http://$registry/v2/skiff-it/app/manifests/$it_tag" | tr -d '\r' | sed -n 's/^docker-content-digest: //Ip')
  [ -z "$digest" ] || curl -sf -m 5 -X DELETE "http://$registry/v2/skiff-it/app/manifests/$digest" >/dev/null || true
  [ -z "$secret_arn" ] || AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing "$python" -c '
import sys, boto3
boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1").delete_secret(
    SecretId=sys.argv[2], ForceDeleteWithoutRecovery=True)' "$aws_endpoint" "$secret_arn" || true
  mariadb_stop "$db_dir"
  rm -rf "$work" "$db_dir"
}
trap cleanup EXIT

passed=0 failed=0
pass() { passed=$((passed + 1)); echo "ok   $*"; }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }
finish() {
  if ((failed)); then
    local c
    for c in "$name" $(docker ps -aq --filter "label=skiff.app=$app_name"); do
      docker container inspect "$c" >/dev/null 2>&1 || continue
      echo "--- logs of container $c"
      docker logs "$c" 2>&1 | tail -n 40 || true
    done
    [ ! -s "$work/agent.log" ] || { echo "--- agent log"; tail -n 40 "$work/agent.log"; }
  fi
  echo "image-test: $passed passed, $failed failed"
  if ((failed)); then exit 1; fi
  exit 0
}

started=$SECONDS
if DOCKER_BUILDKIT=0 docker build --network host --force-rm --build-arg "BASE=$base" \
  --build-arg "BUILD_ID=$run_id" -t "$tag" "$app_dir" \
  >"$work/build.log" 2>&1; then
  pass "image builds on $base ($((SECONDS - started))s)"
else
  tail -n 30 "$work/build.log"
  fail "docker build"
  finish
fi

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
docker run -d --name "$name" --network host -e "PORT=$port" \
  -e "SKIFF_RELEASE_TAG=$release" -e "SKIFF_RELEASE_DIGEST=$digest" "$tag" >/dev/null
url="http://127.0.0.1:$port"

code=""
for _ in $(seq 1 60); do
  [ "$(docker inspect -f '{{.State.Running}}' "$name")" = true ] || break
  code=$(curl -s -m 2 -o "$work/health" -w '%{http_code}' "$url/health" || true)
  [ "$code" = 200 ] && break
  sleep 0.5
done
if [ "$code" = 200 ] && grep -q "\"tag\":\"$release\"" "$work/health"; then
  pass "/health answers 200 with this run's release"
else
  fail "/health: status '$code', body: $(cat "$work/health" 2>/dev/null)"
  finish
fi

page=$(curl -fsS -m 5 "$url/")
if grep -q "$release" <<<"$page" && grep -q "$digest" <<<"$page"; then
  pass "/ shows release $release and its digest"
else
  fail "/ does not show the release tag and digest"
fi

note="note from $run_id"
created=$(curl -sS -m 5 -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' \
  -d "{\"body\": \"$note\"}" "$url/notes")
if [ "$created" = 201 ] && curl -fsS -m 5 "$url/notes" | grep -q "$note"; then
  pass "POST /notes stores a note that GET /notes returns"
else
  fail "POST /notes answered $created, or the note is not listed"
fi

uid=$(docker exec "$name" id -u)
if [ -n "$uid" ] && [ "$uid" != 0 ]; then pass "runs as uid $uid, not root"; else fail "runs as uid '$uid'"; fi

started=$SECONDS
docker stop -t 25 "$name" >/dev/null
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$name")
if [ "$exit_code" = 0 ]; then
  pass "SIGTERM stops it cleanly ($((SECONDS - started))s, exit 0)"
else
  fail "after SIGTERM it exited with $exit_code"
fi

# --- The production path, end to end with the agent -------------------------------------------
for tool in "$python" mariadb-install-db mariadbd mariadb openssl; do
  command -v "$tool" >/dev/null || { fail "$tool not found; run .ci/setup.sh first"; finish; }
done
[ -x "$agent_bin" ] || { fail "no agent at $agent_bin; build it: cargo build --release -p skiff-agent"; finish; }
curl -fs -o /dev/null -m 2 "$aws_endpoint/moto-api/" || { fail "no moto server at $aws_endpoint; run .ci/setup.sh"; finish; }
curl -fs -o /dev/null -m 2 "http://$registry/v2/" || { fail "no registry at $registry; run .ci/setup.sh"; finish; }

make_test_cas "$work/ca" || { fail "making the test CA"; finish; }
db_port=$(free_port)
if ! { mariadb_init "$db_dir" && mariadb_start "$db_dir" "$db_port" "$work/ca"; }; then fail "starting MariaDB"; finish; fi
db_user="skiff_it_${run_id//[^0-9]/}"
db_user=${db_user:0:32}
db_password="pw-$RANDOM$RANDOM$RANDOM"
mariadb_sql "$db_dir" <<SQL
CREATE DATABASE skiff_it CHARACTER SET utf8mb4;
CREATE USER '$db_user'@'127.0.0.1' IDENTIFIED BY '$db_password';
GRANT ALL ON skiff_it.* TO '$db_user'@'127.0.0.1';
SQL
secret_arn=$(AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing "$python" -c '
import json, sys, boto3
sm = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
print(sm.create_secret(Name=sys.argv[2], SecretString=json.dumps(
    {"username": sys.argv[3], "password": sys.argv[4]}))["ARN"])' \
  "$aws_endpoint" "rds!$app_name" "$db_user" "$db_password")
# What templates/app.yaml passes (through the agent) in production, pointed at the test server.
stack_env=(DATABASE_HOST=localhost "DATABASE_PORT=$db_port" DATABASE_NAME=skiff_it
  "DATABASE_SECRET_ARN=$secret_arn" "AWS_ENDPOINT_URL=$aws_endpoint" AWS_ACCESS_KEY_ID=testing
  AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 DB_TIMEOUT=2 MIGRATE_TIMEOUT=20)

# The image as built: DATABASE_HOST without DATABASE_SSL_CA verifies against the RDS bundle,
# which did not sign the test server's certificate: the start must fail, and say why.
rds_port=$(free_port)
docker run -d --name "$name-rds" --network host -e "PORT=$rds_port" \
  "${stack_env[@]/#/--env=}" "$tag" >/dev/null
for _ in $(seq 1 60); do
  [ "$(docker inspect -f '{{.State.Running}}' "$name-rds")" = true ] || break
  sleep 0.5
done
rds_exit=$(docker inspect -f '{{.State.ExitCode}} {{.State.Running}}' "$name-rds")
rds_logs=$(docker logs "$name-rds" 2>&1)
if [ "$rds_exit" = "3 false" ] && grep -q "certificate verify failed" <<<"$rds_logs" &&
   grep -q "/etc/ssl/certs/rds-global-bundle.pem" <<<"$rds_logs"; then
  pass "with DATABASE_HOST the image verifies MySQL's certificate against its RDS bundle (test CA refused, exit 3)"
else
  fail "the image against a server whose CA is not RDS's: exit/running '$rds_exit', logs: $(tail -n 5 <<<"$rds_logs")"
fi

# The release the agent runs: this image plus the test CA, named by DATABASE_SSL_CA.
mkdir -p "$work/it-image"
cp "$work/ca/ca.pem" "$work/it-image/test-ca.pem"
# shellcheck disable=SC2016 # $BUILD_ID is the Dockerfile's ARG, for docker build to expand
printf 'FROM %s\nARG BUILD_ID=""\nLABEL skiff.build-id=$BUILD_ID\nCOPY test-ca.pem /etc/ssl/certs/skiff-test-ca.pem\n' "$tag" \
  >"$work/it-image/Dockerfile"
if ! { DOCKER_BUILDKIT=0 docker build -q --build-arg "BUILD_ID=$run_id" -t "$it_repo:$it_tag" \
          "$work/it-image" && docker push -q "$it_repo:$it_tag"; } >"$work/it-build.log" 2>&1; then
  tail -n 20 "$work/it-build.log"
  fail "building or pushing $it_repo:$it_tag"; finish
fi

app_port=$(free_port)
health_port=$(free_port)
detail=""
# One gunicorn worker (of 4 threads): the hung-database check below then puts every client and
# the agent's /ready on the threads that /health needs, as two workers do by chance.
env_toml="LOG_LEVEL = \"info\", DATABASE_SSL_CA = \"/etc/ssl/certs/skiff-test-ca.pem\", WEB_CONCURRENCY = \"1\""
for kv in "${stack_env[@]}"; do env_toml+=", ${kv%%=*} = \"${kv#*=}\""; done
write_config() { # extra [app] lines
  cat >"$work/agent.toml" <<TOML
[app]
name = "$app_name"
image = "$it_repo"
port = $app_port
health_path = "/health"
start_timeout = "60s"
stop_timeout = "10s"
env = { $env_toml }
$1

[release]
source = "file"
file = "$work/release"
poll_interval = "2s"
update = "boot"

[health]
listen = "127.0.0.1:$health_port"
interval = "1s"
TOML
}
# The agent shows the app's readiness in /status where it knows app.detail_path.
write_config 'detail_path = "/ready"'
if "$agent_bin" check-config --config "$work/agent.toml" >/dev/null 2>&1; then
  detail=yes
else
  write_config ""
  "$agent_bin" check-config --config "$work/agent.toml" >"$work/check.log" 2>&1 ||
    { cat "$work/check.log"; fail "agent check-config"; finish; }
fi
echo "$it_tag" >"$work/release"
"$agent_bin" run --config "$work/agent.toml" >"$work/agent.log" 2>&1 &
agent_pid=$!
app="http://127.0.0.1:$app_port"
agent="http://127.0.0.1:$health_port"

code=""
for _ in $(seq 1 180); do
  kill -0 "$agent_pid" 2>/dev/null || break
  code=$(curl -s -m 2 -o /dev/null -w '%{http_code}' "$agent/healthz" || true)
  [ "$code" = 200 ] && break
  sleep 0.5
done
if [ "$code" = 200 ]; then
  pass "the agent runs the release with DATABASE_HOST over TLS: /healthz 200"
else
  fail "the agent's /healthz answered '$code' (want 200)"; finish
fi

note="over TLS from $run_id"
created=$(curl -s -m 5 -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' \
  -d "{\"body\": \"$note\"}" "$app/notes")
if [ "$created" = 201 ] && curl -fsS -m 5 "$app/" | grep -q "$note" &&
   [ "$(mariadb_sql "$db_dir" -N -e "SELECT COUNT(*) FROM skiff_it.notes WHERE body = '$note'")" = 1 ]; then
  pass "notes are stored in MariaDB through the login in the secret"
else
  fail "POST /notes answered '$created', or the note is not in MariaDB"
fi

container=$(docker ps -q --filter "label=skiff.app=$app_name")
started_at() { docker inspect -f '{{.Id}} {{.State.StartedAt}} {{.RestartCount}}' "$container" 2>/dev/null; }
before=$(started_at)

# Polls /healthz every 0.2 s for $1 seconds; prints the answers that were not 200.
healthz_not_200() {
  local end=$((SECONDS + $1)) c
  while ((SECONDS < end)); do
    c=$(curl -s -m 3 -o /dev/null -w '%{http_code}' "$agent/healthz" || true)
    [ "$c" = 200 ] || printf '%s ' "$c"
    sleep 0.2
  done
}

mariadb_stop "$db_dir"
bad=$(healthz_not_200 6)  # six probe intervals
if [ -z "$bad" ]; then
  pass "database stopped: the agent's /healthz stays 200 (every answer for 6 s)"
else
  fail "database stopped: /healthz answered $bad"
fi
api=$(curl -s -m 5 -o "$work/api" -w '%{http_code} %{content_type}' "$app/notes")
page=$(curl -s -m 5 -o "$work/page" -w '%{http_code} %{content_type}' -H 'Accept: text/html' "$app/")
ready=$(curl -s -m 5 -o "$work/ready" -w '%{http_code}' "$app/ready")
if [[ $api == "503 application/json" ]] && grep -q '"database unavailable"' "$work/api" &&
   [[ $page == "503 text/html"* ]] && grep -q "Notes are unavailable for a moment" "$work/page" &&
   [ "$ready" = 503 ] && grep -q '"unavailable"' "$work/ready"; then
  pass "database stopped: /notes 503 JSON, / a 503 page, /ready 503 with the reason"
else
  fail "database stopped: /notes '$api', / '$page', /ready '$ready' $(cat "$work/ready")"
fi
if [ -n "$detail" ]; then
  if curl -fsS -m 5 "$agent/status" | "$python" -c '
import json, sys
d = json.load(sys.stdin)["app_detail"]
sys.exit(0 if d and d["path"] == "/ready" and d["status"] == 503 else 1)'; then
    pass "database stopped: the agent's /status shows /ready's 503"
  else
    fail "database stopped: the agent's /status does not show /ready's 503: $(curl -s -m 5 "$agent/status")"
  fi
fi

mariadb_start "$db_dir" "$db_port" "$work/ca" || { fail "restarting MariaDB"; finish; }
code="" 
for _ in $(seq 1 50); do
  code=$(curl -s -m 5 -o "$work/notes" -w '%{http_code}' "$app/notes" || true)
  [ "$code" = 200 ] && break
  sleep 0.2
done
if [ "$code" = 200 ] && grep -q "$note" "$work/notes" &&
   [ "$(curl -s -m 5 -o /dev/null -w '%{http_code}' "$app/ready")" = 200 ] &&
   curl -fsS -m 5 "$app/" | grep -q "$note" &&
   [ "$(curl -s -m 5 -o /dev/null -w '%{http_code}' -d 'body=after the outage' "$app/notes")" = 303 ]; then
  pass "database back: /notes, /, /ready and a form post answer again, the note kept"
else
  fail "database back: /notes answered '$code'"
fi

# A database that hangs (as during a failover, or a dropped route) rather than refusing: each
# request waits DB_TIMEOUT (2 s). Four clients keep asking for notes and the agent for /ready, on
# the one worker's 4 threads; /health must still answer (the app keeps a thread free of the
# database: web.py, DatabaseSlots).
kill -STOP "$(cat "$db_dir/started.pid")"
load_end=$((SECONDS + 9))
clients=()
for _ in 1 2 3 4; do
  ( while ((SECONDS < load_end)); do curl -s -m 10 -o /dev/null "$app/notes" || true; done ) &
  clients+=($!)
done
bad=$(healthz_not_200 8)
kill -CONT "$(cat "$db_dir/started.pid")"
for p in "${clients[@]}"; do wait "$p" 2>/dev/null || true; done
if [ -z "$bad" ]; then
  pass "database hung, 4 clients asking for notes on one worker: /healthz stays 200 (every answer for 8 s)"
else
  fail "database hung: /healthz answered $bad"
fi
code=""
for _ in $(seq 1 50); do
  code=$(curl -s -m 5 -o /dev/null -w '%{http_code}' "$app/ready" || true)
  [ "$code" = 200 ] && break
  sleep 0.2
done
after=$(started_at)
restarts=$(curl -fsS -m 5 "$agent/status" | "$python" -c 'import json, sys; print(json.load(sys.stdin)["restart_count"])' || true)
if [ "$code" = 200 ] && [ -n "$before" ] && [ "$before" = "$after" ] && [ "$restarts" = 0 ]; then
  pass "all recovered without a restart (same container, same start time, agent restart_count 0)"
else
  fail "after the outages: /ready '$code', container before '$before' after '$after', agent restarts '$restarts'"
fi
finish
