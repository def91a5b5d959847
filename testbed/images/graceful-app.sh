#!/usr/bin/env bash
# skiff-ci/graceful-app:1 — the fleet box's keep-alive app with a graceful SIGTERM
# (testbed/images/graceful-app.py) on skiff-ci/python:3.11-bookworm (debian-python.sh, built before
# this one: setup.sh runs these scripts in name order). `box.py push --app graceful` builds each
# release's tag on it. Built offline (no RUN step); skipped when present with the current app.py.
set -euo pipefail
img=skiff-ci/graceful-app:1
base=skiff-ci/python:3.11-bookworm
here=$(cd "$(dirname "$0")" && pwd)
sum=$( (sha1sum "$here/graceful-app.py"; docker image inspect -f '{{.Id}}' "$base") | sha1sum | cut -c1-12)
[ "$(docker image inspect -f '{{index .Config.Labels "skiff-ci.app"}}' "$img" 2>/dev/null)" = "$sum" ] && exit 0
ctx=$(mktemp -d); trap 'rm -rf "$ctx"' EXIT
cp "$here/graceful-app.py" "$ctx/app.py"
cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM $base
LABEL skiff-ci.app=$sum
COPY app.py /app/app.py
ENV PYTHONUNBUFFERED=1
# exec form: python is PID 1 and gets the engine's SIGTERM itself (its handler is the shutdown)
CMD ["python3", "/app/app.py"]
DOCKERFILE
echo "[setup] building $img"
DOCKER_BUILDKIT=0 docker build -q --network none -t "$img" "$ctx" >/dev/null
