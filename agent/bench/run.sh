#!/usr/bin/env bash
# Agent benchmark: prints numbers, asserts nothing. Run after `bash .ci/setup.sh`:
#   bash agent/bench/run.sh            (ROUNDS=15 by default)
# Measures, side by side in one run:
#   1. start-to-healthy with the image present: the agent (process start -> /healthz 200, release
#      pinned by digest so nothing is pulled) vs a bare `docker run -d --network host` followed
#      by polling the app's health path every 10 ms;
#   2. the agent's idle RSS with its container running (file source; SSM source on moto; and SSM
#      with the image pulled from the ECR-shaped registry with a token from moto's ECR);
#   3. /healthz under wrk on loopback: requests/s and p99, and the app probes made meanwhile;
#   4. the release binary's size (stripped);
#   5. metrics (always on): idle RSS while /metrics is scraped every second as Prometheus would,
#      /healthz under wrk with that scrape running, and /metrics itself under wrk; printed beside
#      the figures before /metrics existed.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/root/.cache/skiff-target}
rounds=${ROUNDS:-15}
# AGENT_BIN=<path> measures another build (e.g. an older commit's, for a before/after).
if [ -n "${AGENT_BIN:-}" ]; then
  agent=$AGENT_BIN
else
  cargo build -q --release -p skiff-agent
  agent="$CARGO_TARGET_DIR/release/agent"
fi
id="skiff-bench-$$"
repo="127.0.0.1:5000/$id/app"
# The same repository through the ECR-shaped registry of .ci/setup.sh (it serves :5000's storage).
ecr_repo="123456789012.dkr.ecr.us-east-1.amazonaws.com/$id/app"
work=$(mktemp -d)
app_port=$((20000 + RANDOM % 5000)); health_port=$((app_port + 1))
agent_pid=""
scraper_pid=""
cleanup() {
  if [ -n "$scraper_pid" ]; then kill "$scraper_pid" 2>/dev/null || true; fi
  if [ -n "$agent_pid" ]; then kill "$agent_pid" 2>/dev/null || true; fi
  local ids
  mapfile -t ids < <(docker ps -aq --filter "label=skiff.app=$id"; docker ps -aq --filter "name=$id")
  docker rm -f "${ids[@]}" >/dev/null 2>&1 || true
  mapfile -t ids < <(docker images -q "$repo"; docker images -q "$ecr_repo")
  docker rmi -f "${ids[@]}" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

now_ms() { date +%s%3N; }
wait_200() { # url -> waits, polling every 10 ms, at most 30 s
  local deadline=$(( $(now_ms) + 30000 ))
  until curl -fs -o /dev/null -m 1 "$1"; do
    (( $(now_ms) < deadline )) || { echo "bench: $1 never answered 200" >&2; return 1; }
    sleep 0.01
  done
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# A test image: busybox httpd serving /health on $PORT.
mkdir -p "$work/ctx"
cat >"$work/ctx/Dockerfile" <<'DOCKERFILE'
FROM skiff-ci/busybox:1
RUN mkdir -p /www && echo ok > /www/health
CMD ["/bin/sh", "-c", "exec httpd -f -p $PORT -h /www"]
DOCKERFILE
DOCKER_BUILDKIT=0 docker build -q -t "$repo:v1" "$work/ctx" >/dev/null
digest=$(docker push "$repo:v1" | grep -o 'sha256:[0-9a-f]\{64\}' | head -1)
echo "{\"tag\":\"v1\",\"digest\":\"$digest\"}" >"$work/release"

write_config() { # source-kind extra
  cat >"$work/agent.toml" <<TOML
[app]
name = "$id"
image = "$repo"
port = $app_port
start_timeout = "30s"
stop_timeout = "2s"
[release]
source = "file"
file = "$work/release"
poll_interval = "60s"
update = "boot"
[health]
listen = "127.0.0.1:$health_port"
interval = "2s"
TOML
}
write_config

bare=(); managed=()
for _ in $(seq 1 "$rounds"); do
  t0=$(now_ms)
  docker run -d --name "$id-bare" --network host -e PORT=$app_port "$repo:v1" >/dev/null
  wait_200 "http://127.0.0.1:$app_port/health"
  bare+=($(( $(now_ms) - t0 )))
  docker rm -f "$id-bare" >/dev/null

  t0=$(now_ms)
  RUST_LOG=warn "$agent" run --config "$work/agent.toml" 2>>"$work/agent.log" &
  agent_pid=$!
  wait_200 "http://127.0.0.1:$health_port/healthz"
  managed+=($(( $(now_ms) - t0 )))
  kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true; agent_pid=""
  mapfile -t ids < <(docker ps -aq --filter "label=skiff.app=$id")
  docker rm -f "${ids[@]}" >/dev/null
done
b=$(printf '%s\n' "${bare[@]}" | median); m=$(printf '%s\n' "${managed[@]}" | median)
echo "start-to-healthy, image present, $rounds rounds (ms): bare docker run + 10ms polling: ${bare[*]} (median $b)"
echo "start-to-healthy, image present, $rounds rounds (ms): agent start -> /healthz 200:       ${managed[*]} (median $m)"
awk -v b="$b" -v m="$m" 'BEGIN {printf "start-to-healthy ratio agent/bare (medians): %.2fx (goal <= 1.10x)\n", m/b}'

# Idle RSS with the container running.
RUST_LOG=warn "$agent" run --config "$work/agent.toml" 2>>"$work/agent.log" &
agent_pid=$!
wait_200 "http://127.0.0.1:$health_port/healthz"
sleep 5
echo "idle RSS, file source: $(awk '/VmRSS/ {print $2, $3}' /proc/$agent_pid/status) (goal <= 8 MiB = 8192 kB)"

# /healthz under load, and the probes the app saw meanwhile.
probes_before=$(curl -fs "http://127.0.0.1:$health_port/status" | jq .app.probes)
t0=$(now_ms)
wrk -t2 -c32 -d10s --latency "http://127.0.0.1:$health_port/healthz" >"$work/wrk.txt"
elapsed=$(( $(now_ms) - t0 ))
probes_after=$(curl -fs "http://127.0.0.1:$health_port/status" | jq .app.probes)
rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.txt")
p99=$(awk '$1 == "99%" {print $2}' "$work/wrk.txt")
requests=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
echo "/healthz under wrk (2 threads, 32 connections, 10 s): $rps requests/s, p99 $p99, $requests requests"
echo "app probes during the load: $((probes_after - probes_before)) in ${elapsed} ms (interval 2s -> expected ~$((elapsed / 2000)); not per request)"
echo "idle RSS after the load: $(awk '/VmRSS/ {print $2, $3}' /proc/$agent_pid/status)"

# Metrics: a fresh agent (the figures above come after wrk's load) idles for 30 s while /metrics
# is fetched every second, as Prometheus would (a build without /metrics answers 404 at the same
# rate, so AGENT_BIN=<older build> gives the before figure); then, when there is a /metrics,
# /healthz under the same wrk load with the scrape still running, and /metrics itself.
# Recorded before /metrics: idle RSS 6988 kB; /healthz 79.7k requests/s, p99 3.4 ms.
kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true; agent_pid=""
RUST_LOG=warn "$agent" run --config "$work/agent.toml" 2>>"$work/agent.log" &
agent_pid=$!
wait_200 "http://127.0.0.1:$health_port/healthz"
sleep 5
rss_before=$(awk '/VmRSS/ {print $2, $3}' /proc/$agent_pid/status)
( while :; do curl -s -o /dev/null -m 2 "http://127.0.0.1:$health_port/metrics" || true; sleep 1; done ) &
scraper_pid=$!
sleep 30
echo "idle RSS, fresh agent: $rss_before; after 30 s of /metrics fetched every 1 s: $(awk '/VmRSS/ {print $2, $3}' /proc/$agent_pid/status)"
if curl -fs -o /dev/null -m 2 "http://127.0.0.1:$health_port/metrics"; then
  metrics_bytes=$(curl -fs "http://127.0.0.1:$health_port/metrics" | wc -c)
  wrk -t2 -c32 -d10s --latency "http://127.0.0.1:$health_port/healthz" >"$work/wrk-m.txt"
  echo "/healthz under wrk with the 1 s scrape running: $(awk '/Requests\/sec/ {print $2}' "$work/wrk-m.txt") requests/s, p99 $(awk '$1 == "99%" {print $2}' "$work/wrk-m.txt")"
  wrk -t2 -c8 -d5s --latency "http://127.0.0.1:$health_port/metrics" >"$work/wrk-metrics.txt"
  echo "/metrics ($metrics_bytes bytes) under wrk (2 threads, 8 connections, 5 s): $(awk '/Requests\/sec/ {print $2}' "$work/wrk-metrics.txt") requests/s, p99 $(awk '$1 == "99%" {print $2}' "$work/wrk-metrics.txt")"
  echo "idle RSS after the /metrics load: $(awk '/VmRSS/ {print $2, $3}' /proc/$agent_pid/status)"
else
  echo "no /metrics in this build: the other metrics figures skipped"
fi
kill "$scraper_pid" 2>/dev/null || true; wait "$scraper_pid" 2>/dev/null || true; scraper_pid=""
kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true; agent_pid=""

# Idle RSS with the SSM source (moto on loopback), when moto runs.
if curl -fs -o /dev/null -m 2 http://127.0.0.1:5055/moto-api/; then
  param="/$id/release"
  AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing python3 - "$param" "$(cat "$work/release")" <<'PY' 2>/dev/null
import json, sys, urllib.request
name, value = sys.argv[1], sys.argv[2]
body = json.dumps({"Name": name, "Value": value, "Type": "String", "Overwrite": True}).encode()
req = urllib.request.Request("http://127.0.0.1:5055/", data=body, headers={
    "Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "AmazonSSM.PutParameter",
    "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/ssm/aws4_request, SignedHeaders=host, Signature=x"})
urllib.request.urlopen(req, timeout=5).read()
PY
  sed -i "s|^source = \"file\"|source = \"ssm\"\nparameter = \"$param\"|; /^file = /d" "$work/agent.toml"
  AWS_ENDPOINT_URL=http://127.0.0.1:5055 AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 \
    RUST_LOG=warn "$agent" run --config "$work/agent.toml" 2>>"$work/agent.log" &
  agent_pid=$!
  wait_200 "http://127.0.0.1:$health_port/healthz"
  sleep 5
  echo "idle RSS, SSM source (moto): $(awk '/VmRSS/ {print $2, $3}' /proc/$agent_pid/status)"
  kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true; agent_pid=""

  # The same with the image in ECR: pulled with a token from ecr:GetAuthorizationToken.
  if getent hosts "${ecr_repo%%/*}" >/dev/null; then
    mapfile -t ids < <(docker ps -aq --filter "label=skiff.app=$id")
    docker rm -f "${ids[@]}" >/dev/null
    sed -i "s|^image = .*|image = \"$ecr_repo\"|" "$work/agent.toml"
    AWS_ENDPOINT_URL=http://127.0.0.1:5055 AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 \
      RUST_LOG=warn "$agent" run --config "$work/agent.toml" 2>>"$work/agent.log" &
    agent_pid=$!
    wait_200 "http://127.0.0.1:$health_port/healthz"
    sleep 5
    echo "idle RSS, SSM source, image from ECR (moto token): $(awk '/VmRSS/ {print $2, $3}' /proc/$agent_pid/status)"
  fi
fi

echo "release binary (stripped): $(stat -c %s "$agent") bytes ($(( $(stat -c %s "$agent") / 1024 / 1024 )) MiB)"
