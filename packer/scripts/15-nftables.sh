#!/usr/bin/env bash
# Installs what the agent's swap = "handover" needs at run time: the nftables libraries the agent
# links (libnftnl, libmnl; the agent flips the app port's nat redirect through netlink with them)
# and the nft command, for an operator's `nft list ruleset`. Before 20-agent.sh, whose
# `agent --version` fails the build when a library the binary needs is missing.
# Amazon Linux 2023 (the AMI) uses dnf; Debian 12 (packer/test.sh's stand-in image) uses apt.
# Safe to run twice. Packer uploads each script alone, so it carries its own helpers.
set -euo pipefail
say() { printf '[skiff-ami] %s\n' "$*"; }
die() { printf '[skiff-ami] error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (the packer template runs the scripts with sudo)"

[ -r /etc/os-release ] || die "no /etc/os-release: cannot tell the distribution"
# shellcheck disable=SC1091
. /etc/os-release
case "${ID:-}:${ID_LIKE:-}" in
  amzn:*)
    say "installing nftables, libnftnl and libmnl with dnf"
    dnf install -y -q nftables libnftnl libmnl
    ;;
  debian:* | ubuntu:* | *:*debian*)
    say "installing nftables, libnftnl11 and libmnl0 with apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends nftables libnftnl11 libmnl0 >/dev/null
    apt-get clean
    rm -rf /var/lib/apt/lists/*
    ;;
  *) die "unsupported distribution ${PRETTY_NAME:-${ID:-?}}: the AMI is Amazon Linux 2023, Debian is the test's" ;;
esac

# The agent keeps its redirect in a table of its own. nftables.service stays disabled (as both
# distributions ship it): it would load a static ruleset at start (Debian's /etc/nftables.conf
# begins with `flush ruleset`) and drop the agent's redirect and Docker's rules with it.
systemctl disable nftables.service >/dev/null 2>&1 || true
nft --version
say "nftables installed"
