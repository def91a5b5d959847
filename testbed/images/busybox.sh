#!/usr/bin/env bash
# skiff-ci/busybox:1 — FROM scratch plus Debian's static busybox: the base of the agent's test
# images (busybox httpd serves the app port). Built offline; skipped when present.
set -euo pipefail
img=skiff-ci/busybox:1
docker image inspect "$img" >/dev/null 2>&1 && exit 0
ctx=$(mktemp -d); trap 'rm -rf "$ctx"' EXIT
cp /bin/busybox "$ctx/busybox"
cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
ENV PATH=/bin
DOCKERFILE
echo "[setup] building $img"
DOCKER_BUILDKIT=0 docker build -q -t "$img" "$ctx" >/dev/null
