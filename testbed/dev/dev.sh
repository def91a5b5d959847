#!/usr/bin/env bash
# `make dev`: the main job on a laptop, no AWS account needed. Starts Docker and a local
# registry (installing them if missing), builds the agent and the app image (tagged with the git
# hash and the branch, pushed to 127.0.0.1:5000), writes the release file, and runs the agent in
# the foreground with the file source on the local Docker engine. Ctrl-C stops the agent; the
# app keeps running, as on a host. The agent swaps by handover, as on the AMI (it runs as root, so
# it may set its nftables redirect): each container on a slot port, DEV_APP_PORT redirected to
# the serving one. `make dev-down` removes the containers and the redirect.
#
#   DEV_APP_PORT (8080)  DEV_HEALTH_PORT (8081)  DEV_UPDATE (follow)  DEV_DIR (.dev)
#   DEV_SLOT_A (DEV_APP_PORT + 10)  DEV_SLOT_B (DEV_APP_PORT + 11)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/root/.cache/skiff-target}
app_port=${DEV_APP_PORT:-8080}
health_port=${DEV_HEALTH_PORT:-8081}
slot_a=${DEV_SLOT_A:-$((app_port + 10))}
slot_b=${DEV_SLOT_B:-$((app_port + 11))}
update=${DEV_UPDATE:-follow}
dir=$(mkdir -p "${DEV_DIR:-.dev}" && cd "${DEV_DIR:-.dev}" && pwd)
say() { printf '[dev] %s\n' "$*"; }

for port in "$app_port" "$health_port" "$slot_a" "$slot_b"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && ! docker ps -q --filter label=skiff.app=skiff-dev 2>/dev/null | grep -q .; then
    echo "dev: port $port is taken by another program: set DEV_APP_PORT / DEV_HEALTH_PORT / DEV_SLOT_A / DEV_SLOT_B" >&2; exit 1
  fi
done

SKIFF_SETUP=dev bash .ci/setup.sh

say "building the agent"
cargo build -q -p skiff-agent
agent="$CARGO_TARGET_DIR/debug/agent"

repo=127.0.0.1:5000/skiff/app
hash=$(git rev-parse --short HEAD 2>/dev/null || echo dev)
branch=$(git rev-parse --abbrev-ref HEAD 2>/dev/null | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9_.-]+/-/g')
tag=$hash
[ -z "$(git status --porcelain -- app 2>/dev/null)" ] || tag="$hash-dirty"
say "building the app image $repo:$tag (and :${branch:-dev}) on the offline Debian base"
DOCKER_BUILDKIT=0 docker build -q --network host --build-arg BASE=skiff-ci/python:3.11-bookworm \
  -t "$repo:$tag" -t "$repo:${branch:-dev}" app >/dev/null
docker push -q "$repo:$tag" >/dev/null
docker push -q "$repo:${branch:-dev}" >/dev/null

cat >"$dir/agent.toml" <<TOML
# Written by testbed/dev/dev.sh: the agent's embedded local default.
[app]
name = "skiff-dev"
image = "$repo"
port = $app_port
health_path = "/health"
detail_path = "/ready"
start_timeout = "30s"
stop_timeout = "10s"
swap = "handover"
slots = [$slot_a, $slot_b]
env = { LOG_LEVEL = "info" }

[release]
source = "file"
file = "$dir/release"
poll_interval = "2s"
update = "$update"
drain = "2s"

[health]
listen = "127.0.0.1:$health_port"
interval = "2s"
TOML
"$agent" check-config --config "$dir/agent.toml"
echo "$tag" >"$dir/release"

cat <<MSG
[dev] release $tag written to $dir/release; starting the agent (Ctrl-C stops it, the app keeps running)
[dev]   app:     curl http://127.0.0.1:$app_port/
[dev]   health:  curl http://127.0.0.1:$health_port/healthz   detail: curl http://127.0.0.1:$health_port/status
[dev]   release another build in place:  echo <tag> > $dir/release
[dev]   clean up (containers and the port redirect):  make dev-down
MSG
exec "$agent" run --config "$dir/agent.toml"
