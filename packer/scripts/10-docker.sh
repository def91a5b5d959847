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

# `enable` works without a running systemd (it only makes the symlinks), as during a build.
systemctl enable docker.service
docker --version
say "docker installed and enabled"
