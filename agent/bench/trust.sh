#!/usr/bin/env bash
# Signature checks (`[trust]`) benchmark: prints numbers, asserts nothing. Run after
# `bash .ci/setup.sh`:   bash agent/bench/trust.sh        (SWAPS=10 by default)
# Measures with the release-built agent, its container running:
#   1. idle RSS, file source: without [trust], with keys_file; after SWAPS signed swaps (the
#      registry client is built per check and dropped: what stays);
#   2. idle RSS, SSM source (moto): without [trust], with keys_parameter;
#   3. per swap: the verification's wall time (the agent's own `verify_ms`) and the registry
#      requests it makes (counted by a forwarding proxy in front of :5000, by the agent's
#      User-Agent `skiff/...`; the engine's pull requests are not counted), and the whole swap
#      (release written -> /healthz names the new tag) with and without [trust].
# Each swap is to a new digest signed by `ctl sign`, so every verification asks the registry.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/root/.cache/skiff-target}
swaps=${SWAPS:-10}
cargo build -q --release -p skiff-agent
cargo build -q -p skiff-ctl
agent="$CARGO_TARGET_DIR/release/agent"
ctl="$CARGO_TARGET_DIR/debug/ctl"
id="skiff-bench-trust-$$"
work=$(mktemp -d)
proxy_port=$((25000 + RANDOM % 3000))
# Pushed and signed through :5000; the agent reads the same storage through the proxy.
push_repo="127.0.0.1:5000/$id/app"
repo="127.0.0.1:$proxy_port/$id/app"
app_port=$((20000 + RANDOM % 5000)); health_port=$((app_port + 1))
agent_pid=""; proxy_pid=""
cleanup() {
  if [ -n "$agent_pid" ]; then kill "$agent_pid" 2>/dev/null || true; fi
  if [ -n "$proxy_pid" ]; then kill "$proxy_pid" 2>/dev/null || true; fi
  local ids
  mapfile -t ids < <(docker ps -aq --filter "label=skiff.app=$id")
  docker rm -f "${ids[@]}" >/dev/null 2>&1 || true
  mapfile -t ids < <({ docker images -q "$repo"; docker images -q "$push_repo"; } | sort -u)
  docker rmi -f "${ids[@]}" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

now_ms() { date +%s%3N; }
wait_until() { # what command... -> polls every 10 ms, at most 60 s
  local what=$1; shift
  local deadline=$(( $(now_ms) + 60000 ))
  until "$@" >/dev/null 2>&1; do
    (( $(now_ms) < deadline )) || { echo "bench: $what never happened; see $work/agent.log" >&2; exit 1; }
    sleep 0.01
  done
}
healthy_on() { curl -fs -m 1 "http://127.0.0.1:$health_port/healthz" | grep -q "\"tag\":\"$1\""; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$agent_pid/status"; }

# A forwarding proxy in front of :5000 that counts our client's requests.
python3 - "$proxy_port" "$work/requests" <<'PY' &
import http.client, http.server, sys, threading
port, log = int(sys.argv[1]), sys.argv[2]
lock = threading.Lock()
class P(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def handle_one(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("User-Agent", "").startswith("skiff/"):
            with lock, open(log, "a") as f:
                f.write(f"{self.command} {self.path}\n")
        c = http.client.HTTPConnection("127.0.0.1", 5000, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        headers["Host"] = self.headers.get("Host", "")
        c.request(self.command, self.path, body=body or None, headers=headers)
        r = c.getresponse()
        data = r.read()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = handle_one
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), P).serve_forever()
PY
proxy_pid=$!
wait_until "the counting proxy" curl -fs -m 1 "http://127.0.0.1:$proxy_port/v2/"
touch "$work/requests"

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/signing.pem" 2>/dev/null
openssl pkey -in "$work/signing.pem" -pubout -out "$work/trusted.pem"

# Images v0..v$((swaps * 2)): each its own digest, each signed.
mkdir -p "$work/ctx"
declare -A digest
for i in $(seq 0 $((swaps * 2))); do
  cat >"$work/ctx/Dockerfile" <<DOCKERFILE
FROM skiff-ci/busybox:1
RUN mkdir -p /www && echo ok-$i > /www/health
CMD ["/bin/sh", "-c", "exec httpd -f -p \$PORT -h /www"]
DOCKERFILE
  DOCKER_BUILDKIT=0 docker build -q -t "$push_repo:v$i" "$work/ctx" >/dev/null
  digest[$i]=$(docker push "$push_repo:v$i" | grep -o 'sha256:[0-9a-f]\{64\}' | head -1)
  "$ctl" sign --image "$push_repo" --digest "${digest[$i]}" --key-file "$work/signing.pem" >/dev/null
done
: >"$work/requests"
release() { echo "{\"tag\":\"v$1\",\"digest\":\"${digest[$1]}\"}"; }

write_config() { # trust-section
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
poll_interval = "200ms"
update = "follow"
drain = "1ms"
[health]
listen = "127.0.0.1:$health_port"
interval = "2s"
$1
TOML
}
start_agent() {
  STATE_DIRECTORY="$work/state" RUST_LOG=info "$agent" run --config "$work/agent.toml" 2>>"$work/agent.log" &
  agent_pid=$!
}
stop_agent() {
  kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true; agent_pid=""
  local ids
  mapfile -t ids < <(docker ps -aq --filter "label=skiff.app=$id")
  docker rm -f "${ids[@]}" >/dev/null 2>&1 || true
}
# Swap through releases $1..$2; prints each swap's wall time (ms) to the file $3.
swap_through() {
  for i in $(seq "$1" "$2"); do
    local t0; t0=$(now_ms)
    release "$i" >"$work/release"
    wait_until "healthy on v$i" healthy_on "v$i"
    echo $(( $(now_ms) - t0 )) >>"$3"
  done
}


# 1. File source: no trust, then keys_file; idle RSS and the swaps.
release 0 >"$work/release"
write_config ""
start_agent; wait_until "healthy on v0" healthy_on v0; sleep 5
rss_off=$(rss)
swap_through 1 "$swaps" "$work/swap-off"
sleep 3; rss_off_after=$(rss)
stop_agent

release 0 >"$work/release"
write_config "[trust]
keys_file = \"$work/trusted.pem\""
: >"$work/agent.log"
start_agent; wait_until "healthy on v0" healthy_on v0; sleep 5
rss_on=$(rss)
: >"$work/requests"
swap_through $((swaps + 1)) $((swaps * 2)) "$work/swap-on"
sleep 3; rss_on_after=$(rss)
requests=$(wc -l <"$work/requests")
stop_agent
grep -o '"verify_ms":[0-9]*' "$work/agent.log" | cut -d: -f2 >"$work/verify_ms"
verified=$(wc -l <"$work/verify_ms")

echo "idle RSS, file source, no [trust]: $rss_off kB; after $swaps swaps: $rss_off_after kB"
echo "idle RSS, file source, [trust] keys_file: $rss_on kB; after $swaps signed swaps: $rss_on_after kB (goal <= 8192 kB)"
echo "verification per swap ($verified verifications that asked the registry: the first release and $swaps swaps): verify_ms $(tr '\n' ' ' <"$work/verify_ms")(median $(median <"$work/verify_ms") ms)"
echo "registry requests by the verifier during the $swaps swaps: $requests ($(awk -v r="$requests" -v v="$swaps" 'BEGIN {printf "%.1f", r / v}') per swap): $(cut -d' ' -f1 "$work/requests" | sort | uniq -c | tr -s ' ' | tr '\n' ';')"
echo "whole swap, release written -> /healthz on the new tag (ms): no trust $(tr '\n' ' ' <"$work/swap-off")(median $(median <"$work/swap-off")); trust $(tr '\n' ' ' <"$work/swap-on")(median $(median <"$work/swap-on"))"

# 2. SSM source (moto): no trust, then keys_parameter.
if curl -fs -o /dev/null -m 2 http://127.0.0.1:5055/moto-api/; then
  put() { # name value
    python3 - "$1" "$2" <<'PY'
import json, sys, urllib.request
name, value = sys.argv[1], sys.argv[2]
body = json.dumps({"Name": name, "Value": value, "Type": "String", "Overwrite": True}).encode()
req = urllib.request.Request("http://127.0.0.1:5055/", data=body, headers={
    "Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "AmazonSSM.PutParameter",
    "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/ssm/aws4_request, SignedHeaders=host, Signature=x"})
urllib.request.urlopen(req, timeout=5).read()
PY
  }
  put "/$id/release" "$(release 0)"
  put "/$id/trusted-keys" "$(cat "$work/trusted.pem")"
  export AWS_ENDPOINT_URL=http://127.0.0.1:5055 AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
  for label in "no [trust]" "[trust] keys_parameter"; do
    trust=""
    [ "$label" = "no [trust]" ] || trust="[trust]
keys_parameter = \"/$id/trusted-keys\""
    write_config "$trust"
    sed -i "s|^source = \"file\"|source = \"ssm\"\nparameter = \"/$id/release\"|; /^file = /d; s|^poll_interval = .*|poll_interval = \"60s\"|" "$work/agent.toml"
    rm -rf "$work/state"
    start_agent; wait_until "healthy on v0 (SSM)" healthy_on v0; sleep 5
    echo "idle RSS, SSM source (moto), $label: $(rss) kB"
    stop_agent
  done
fi
