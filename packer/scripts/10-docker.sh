#!/usr/bin/env bash
# Installs Docker and systemd's tools and enables Docker at boot. Amazon Linux 2023 (the AMI) uses
# dnf; Debian (packer/test.sh's stand-in image) uses apt. Safe to run twice.
# Packer uploads each script alone, so it carries its own helpers.
set -euo pipefail
say() { printf '[skiff-ami] %s\n' "$*"; }
die() { printf '[skiff-ami] error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (the packer template runs the scripts with sudo)"

[ -r /etc/os-release ] || die "no /etc/os-release: cannot tell the distribution"
# shellcheck disable=SC1091
. /etc/os-release
case "${ID:-}:${ID_LIKE:-}" in
  amzn:*) distro=amzn ;;
  debian:* | ubuntu:* | *:*debian*) distro=debian ;;
  *) die "unsupported distribution ${PRETTY_NAME:-${ID:-?}}: the AMI is Amazon Linux 2023, Debian is the test's" ;;
esac

case "$distro" in
  amzn)
    say "installing docker with dnf"
    dnf install -y -q docker
    ;;
  debian)
    say "installing docker.io and systemd with apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # systemd: an image with no init yet (the test's) needs systemctl and systemd-analyze.
    apt-get install -y -q --no-install-recommends docker.io systemd >/dev/null
    apt-get clean
    rm -rf /var/lib/apt/lists/*
    ;;
esac

# Host hygiene for instances that live long (in-place updates): the app's stdout must not fill
# the disk, so every container logs through the `local` driver (compressed, rotated: at most
# max-file x max-size per container; `docker logs` still works). live-restore keeps the app's
# container running while dockerd itself restarts (a package update), as the agent keeps it
# running while the agent restarts. Merged into an existing daemon.json, never replacing other
# settings; these keys must not also be dockerd flags (AL2023's /etc/sysconfig/docker sets only
# ulimits).
# https://docs.docker.com/engine/logging/drivers/local/
# https://docs.docker.com/engine/daemon/live-restore/
say "configuring docker: log driver local (10m x 5 per container), live-restore"
install -d -m 0755 /etc/docker
python3 - /etc/docker/daemon.json <<'PY'
import json, os, sys
path = sys.argv[1]
config = {}
if os.path.exists(path) and os.path.getsize(path) > 0:
    with open(path) as f:
        config = json.load(f)
config.update({"log-driver": "local", "log-opts": {"max-size": "10m", "max-file": "5"},
               "live-restore": True})
with open(path + ".new", "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
os.chmod(path + ".new", 0o644)
os.replace(path + ".new", path)
PY

# `enable` works without a running systemd (it only makes the symlinks), as during a build.
systemctl enable docker.service
docker --version
say "docker installed and enabled"
