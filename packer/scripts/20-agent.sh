#!/usr/bin/env bash
# Installs the skiff agent: the binary as /usr/local/bin/agent, its systemd unit, its user (in
# the docker group) and the configuration directory /etc/skiff, and enables the unit. The agent
# starts once user data has written /etc/skiff/agent.toml (the unit's ConditionPathExists).
# Inputs, uploaded beforehand by packer's file provisioner:
#   SKIFF_AGENT_SRC  the agent binary (default /tmp/skiff-agent)
#   SKIFF_UNIT_SRC   packer/files/skiff-agent.service (default /tmp/skiff-agent.service)
# Safe to run twice.
set -euo pipefail
say() { printf '[skiff-ami] %s\n' "$*"; }
die() { printf '[skiff-ami] error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (the packer template runs the scripts with sudo)"
agent_src=${SKIFF_AGENT_SRC:-/tmp/skiff-agent}
unit_src=${SKIFF_UNIT_SRC:-/tmp/skiff-agent.service}
[ -f "$agent_src" ] || die "agent binary not found at $agent_src"
[ -f "$unit_src" ] || die "unit file not found at $unit_src"

say "installing the agent to /usr/local/bin/agent"
install -D -m 0755 -o root -g root "$agent_src" /usr/local/bin/agent
# Fails the build here, not at the first boot, when the binary cannot run on this system (for
# example one linked against a newer glibc than the AMI's).
/usr/local/bin/agent --version || die "the agent binary does not run on this system"

getent group docker >/dev/null || die "no docker group: run 10-docker.sh first"
if ! id skiff-agent >/dev/null 2>&1; then
  say "creating system user skiff-agent (group docker)"
  useradd --system --user-group --no-create-home --home-dir /var/lib/skiff \
    --shell /usr/sbin/nologin --groups docker skiff-agent
fi

install -d -m 0755 -o root -g root /etc/skiff
install -m 0644 -o root -g root "$unit_src" /etc/systemd/system/skiff-agent.service
systemctl enable skiff-agent.service
rm -f "$agent_src" "$unit_src"
say "agent installed; it starts when /etc/skiff/agent.toml exists"
