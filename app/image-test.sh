#!/usr/bin/env bash
# Builds app/Dockerfile offline (PyPI only) on skiff-ci/python:3.11-bookworm under a unique tag,
# runs it with host networking on a free port, and checks what the skiff agent relies on: /health
# answers 200, the page shows the release passed in the environment, notes are stored, the process
# is not root, and SIGTERM stops it cleanly. Removes the container and image it made, whatever
# happens. Every name, port and release value is new per run, so leftovers cannot answer for it.
# Env: BASE (skiff-ci/python:3.11-bookworm; built by .ci/images/debian-python.sh when missing).
# Exits non-zero on any failure; the last line is "image-test: N passed, N failed".
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
base=${BASE:-skiff-ci/python:3.11-bookworm}
if ! docker image inspect "$base" >/dev/null 2>&1; then
  [ "$base" = skiff-ci/python:3.11-bookworm ] || { echo "image-test: no image $base" >&2; exit 1; }
  bash "$here/../.ci/images/debian-python.sh"
fi

run_id="$(date +%s)-$$-$RANDOM"
tag="skiff-app-test:$run_id"
name="skiff-app-test-$run_id"
release="image-test-$run_id"
digest="sha256:$(printf %s "$run_id" | sha256sum | cut -d' ' -f1)"
work=$(mktemp -d)
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
  # Containers and images of this build only, intermediate ones of a failed build included.
  docker rm -f -v "$name" >/dev/null 2>&1 || true
  docker ps -aq --filter "label=skiff.build-id=$run_id" | xargs -r docker rm -f -v >/dev/null 2>&1 || true
  docker rmi -f "$tag" >/dev/null 2>&1 || true
  docker images -aq --filter "label=skiff.build-id=$run_id" | xargs -r docker rmi -f >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

passed=0 failed=0
pass() { passed=$((passed + 1)); echo "ok   $*"; }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }
finish() {
  if ((failed)) && docker container inspect "$name" >/dev/null 2>&1; then
    echo "--- container logs"
    docker logs "$name" 2>&1 | tail -n 40 || true
  fi
  echo "image-test: $passed passed, $failed failed"
  if ((failed)); then exit 1; fi
  exit 0
}

started=$SECONDS
if DOCKER_BUILDKIT=0 docker build --network host --force-rm --build-arg "BASE=$base" \
  --build-arg "BUILD_ID=$run_id" -t "$tag" "$here" \
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
finish
