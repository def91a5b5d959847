#!/usr/bin/env bash
# Proves the AMI definition without AWS:
#   * packer fmt / validate of skiff.pkr.hcl with this machine's Packer (Debian's 1.6.6, which
#     bundles the Amazon builder; plugins.pkr.hcl, for Packer >= 1.7, is only format-checked);
#   * test/docker.pkr.hcl runs the same uploads and scripts as skiff.pkr.hcl (compared here)
#     with the docker builder on the local Debian image, commits it, and the image is checked:
#     the agent runs, the unit passes `systemd-analyze verify`, Docker and the agent are enabled
#     at boot, the agent's user is in the docker group, the agent's libraries resolve and nft runs
#     (swap = "handover"), the unit grants CAP_NET_ADMIN and no other capability,
#     /etc/docker/daemon.json rotates container logs (`local` driver) and enables live-restore,
#     and the image's dockerd applies it;
#   * the unit's sandbox still reaches the Docker socket: a read-only /run and an unprivileged
#     uid in the docker group, as ProtectSystem=strict and User=/SupplementaryGroups= give it.
#
# The agent binary comes from AGENT_BIN (default $CARGO_TARGET_DIR/release/agent, with
# CARGO_TARGET_DIR defaulting to /root/.cache/skiff-target). Needs docker and the base image from
# .ci/setup.sh (run when missing) and Debian's package mirror for apt in the image.
# Closes with 'packer: N passed, N failed'; exits 1 on any failure. Removes what it creates.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
target=${CARGO_TARGET_DIR:-/root/.cache/skiff-target}
agent=${AGENT_BIN:-$target/release/agent}
base=${SKIFF_PACKER_BASE:-skiff-ci/python:3.11-bookworm}
run_id="$(date +%s)-$$"
repo=skiff-packer-test
image="$repo:$run_id"

say() { printf '[packer] %s\n' "$*"; }
if [ ! -f "$agent" ] || [ ! -x "$agent" ]; then
  say "no agent binary at $agent"
  say "build it first (cargo build --release -p skiff-agent) or point AGENT_BIN at one"
  echo "packer: 0 passed, 1 failed"
  exit 1
fi
case "$(head -c4 "$agent" | od -An -c | tr -d ' ')" in
  177ELF) ;;
  *) say "$agent is not an ELF binary"; echo "packer: 0 passed, 1 failed"; exit 1 ;;
esac

# Tools: packer and docker come with .ci/setup.sh.
if ! command -v packer >/dev/null || ! docker version >/dev/null 2>&1 ||
  ! docker image inspect "$base" >/dev/null 2>&1; then
  say "packer, docker or $base missing: running .ci/setup.sh"
  bash "$root/.ci/setup.sh" >&2 || { say "setup failed"; echo "packer: 0 passed, 1 failed"; exit 1; }
fi
# Its own needs: the shellcheck and objdump (binutils) commands.
for tool in shellcheck:shellcheck objdump:binutils; do
  command -v "${tool%%:*}" >/dev/null && continue
  say "installing ${tool#*:}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${tool#*:}" >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${tool#*:}" >/dev/null; }
done

work=$(mktemp -d)
second_dockerd=
stop_second_dockerd() { # bounded: SIGTERM, 10 s, then SIGKILL
  [ -n "$second_dockerd" ] || return 0
  kill "$second_dockerd" 2>/dev/null
  for _ in $(seq 100); do kill -0 "$second_dockerd" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$second_dockerd" 2>/dev/null
  wait "$second_dockerd" 2>/dev/null
  second_dockerd=
}
cleanup() {
  stop_second_dockerd
  docker container ls -aq --filter "label=skiff-test=$run_id" | xargs -r docker container rm -f >/dev/null 2>&1 || true
  docker image rm -f "$image" >/dev/null 2>&1 || true
  # A build that failed after committing leaves an untagged image carrying the run's label.
  docker image ls -q --filter "label=skiff-test=$run_id" | xargs -r docker image rm -f >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

passed=0
failed=0
step() { # name, command... (output kept in $work/step.log, shown on failure)
  local name=$1 start=$SECONDS
  shift
  if "$@" >"$work/step.log" 2>&1; then
    passed=$((passed + 1)); say "ok   $name ($((SECONDS - start)) s)"
  else
    failed=$((failed + 1)); say "FAIL $name ($((SECONDS - start)) s)"; sed 's/^/    /' "$work/step.log"
  fi
}
in_image() { docker run --rm --entrypoint "" "$image" "$@"; }

say "agent: $agent ($("$agent" --version 2>&1 | head -n1))"
say "packer $(packer version | head -n1), base image $base, run $run_id"

# Packer 1.6's fmt takes one folder at a time.
# The AMI is Amazon Linux 2023, whose glibc is 2.34: a binary built here (Debian 12, glibc 2.36)
# runs there only if it needs no newer symbol. (A static build needs none.)
glibc_fits_al2023() {
  local need
  need=$(objdump -T "$agent" 2>/dev/null | grep -oE 'GLIBC_[0-9]+\.[0-9]+' | sed 's/GLIBC_//' | sort -uV | tail -n1)
  echo "highest glibc symbol version the agent needs: ${need:-none}"
  [ -z "$need" ] || [ "$(printf '%s\n2.34\n' "$need" | sort -V | tail -n1)" = 2.34 ]
}
step "agent binary needs glibc <= 2.34 (Amazon Linux 2023)" glibc_fits_al2023
step "packer fmt: templates are canonical" packer fmt -check -diff "$here"
step "packer fmt: test template is canonical" packer fmt -check -diff "$here/test"
# Packer 1.6 reads one file when given one: skiff.pkr.hcl without plugins.pkr.hcl.
step "packer validate skiff.pkr.hcl" packer validate -var "agent_bin=$agent" "$here/skiff.pkr.hcl"
step "packer validate test/docker.pkr.hcl" packer validate -var "agent_bin=$agent" \
  -var "repository=$repo" -var "tag=$run_id" -var "packer_dir=$here" "$here/test/docker.pkr.hcl"

# The test double must run what the AMI runs: same uploads, same scripts, same order.
steps_of() { grep -oE '(destination *= *"[^"]+"|scripts/[0-9A-Za-z_.-]+\.sh)' "$1"; }
same_steps() {
  steps_of "$here/skiff.pkr.hcl" >"$work/ami.steps"
  steps_of "$here/test/docker.pkr.hcl" >"$work/test.steps"
  cat "$work/ami.steps"
  [ -s "$work/ami.steps" ] && diff "$work/ami.steps" "$work/test.steps"
}
step "docker test template runs the AMI's steps" same_steps
step "shellcheck scripts" shellcheck "$here"/scripts/*.sh "$here/test.sh"

build() {
  (cd "$work" && PACKER_NO_COLOR=1 packer build -color=false -var "agent_bin=$agent" \
    -var "base_image=$base" -var "repository=$repo" -var "tag=$run_id" -var "packer_dir=$here" \
    "$here/test/docker.pkr.hcl")
}
step "packer build (docker builder, $base, no pull)" build
if ! docker image inspect "$image" >/dev/null 2>&1; then
  say "no image $image: skipping the image checks"
  failed=$((failed + 1))
else
  agent_version() { in_image /usr/local/bin/agent --version; }
  step "image: agent --version runs" agent_version
  # shellcheck disable=SC2016 # expanded in the image, not here
  step "image: agent binary is root-owned 0755" \
    in_image sh -c '[ "$(stat -c %U:%a /usr/local/bin/agent)" = root:755 ]'
  # swap = "handover" (15-nftables.sh): the libraries the agent links resolve, the nft command
  # is there for operators, nftables.service is not enabled (its static ruleset would flush the
  # agent's redirect), and the unit grants CAP_NET_ADMIN and nothing else.
  # shellcheck disable=SC2016 # expanded in the image, not here
  step "image: every library the agent links resolves (ldd: none not found)" \
    in_image sh -c 'ldd /usr/local/bin/agent; ! ldd /usr/local/bin/agent | grep -q "not found"'
  step "image: nft --version runs (nftables installed)" in_image nft --version
  step "image: libnftnl11 and libmnl0 installed" in_image dpkg-query -W libnftnl11 libmnl0
  step "image: nftables.service not enabled at boot" \
    in_image sh -c '! systemctl is-enabled nftables.service'
  unit_caps() {
    in_image grep -E '^(CapabilityBoundingSet|AmbientCapabilities|RestrictAddressFamilies)=' \
      /etc/systemd/system/skiff-agent.service >"$work/caps.out" || return 1
    cat "$work/caps.out"
    grep -qx 'CapabilityBoundingSet=CAP_NET_ADMIN' "$work/caps.out" &&
      grep -qx 'AmbientCapabilities=CAP_NET_ADMIN' "$work/caps.out" &&
      [ "$(grep -c '^CapabilityBoundingSet=\|^AmbientCapabilities=' "$work/caps.out")" = 2 ] &&
      grep -q '^RestrictAddressFamilies=.*AF_NETLINK' "$work/caps.out"
  }
  step "image: the unit grants CAP_NET_ADMIN only (ambient and bounding), AF_NETLINK allowed" unit_caps
  verify_unit() {
    in_image systemd-analyze verify /etc/systemd/system/skiff-agent.service >"$work/verify.out" 2>&1
    local rc=$?
    cat "$work/verify.out"
    # verify exits 0 on some warnings; any output about the unit is a problem too.
    [ "$rc" = 0 ] && ! grep -q 'skiff-agent' "$work/verify.out"
  }
  step "image: systemd-analyze verify skiff-agent.service" verify_unit
  # ... and the same verify does catch a broken copy (a missing ExecStart binary).
  # shellcheck disable=SC2016 # expanded in the image, not here
  step "image: systemd-analyze verify rejects a broken copy" in_image sh -c '
    sed "s#^ExecStart=.*#ExecStart=/usr/local/bin/no-such-agent run#" \
      /etc/systemd/system/skiff-agent.service >/etc/systemd/system/broken-agent.service
    ! systemd-analyze verify /etc/systemd/system/broken-agent.service'
  step "image: docker enabled at boot (multi-user.target.wants)" \
    in_image test -L /etc/systemd/system/multi-user.target.wants/docker.service
  step "image: agent enabled at boot (multi-user.target.wants)" \
    in_image test -L /etc/systemd/system/multi-user.target.wants/skiff-agent.service
  step "image: systemctl is-enabled docker skiff-agent" \
    in_image systemctl is-enabled docker.service skiff-agent.service
  step "image: skiff-agent user is in the docker group" \
    in_image sh -c 'id -nG skiff-agent | tr " " "\n" | grep -qx docker'
  # shellcheck disable=SC2016 # expanded in the image, not here
  step "image: /etc/skiff exists, no config baked in" \
    in_image sh -c '[ "$(stat -c %a /etc/skiff)" = 755 ] && [ ! -e /etc/skiff/agent.toml ]'
  # Host hygiene (10-docker.sh): container logs rotated by the `local` driver, live-restore.
  daemon_json() {
    in_image python3 -c '
import json
with open("/etc/docker/daemon.json") as f:
    c = json.load(f)
print(c)
assert c.get("log-driver") == "local", "log-driver is not local"
assert c.get("log-opts") == {"max-size": "10m", "max-file": "5"}, "log-opts are not 10m x 5"
assert c.get("live-restore") is True, "live-restore is not on"'
  }
  step "image: /etc/docker/daemon.json: log driver local (10m x 5), live-restore" daemon_json
  # ... and dockerd takes that file and applies it. The image's own dockerd cannot run here (no
  # privileged containers), so a second dockerd of this host's (the same Debian package as the
  # image's) runs on the image's file with its own socket, data and exec roots and network
  # namespace: it must report the driver and live-restore, and a container created there (from an
  # empty image, nothing pulled, never started) must get the rotated log config.
  dockerd_applies() {
    local dir=$work/dockerd d i info logs probe="skiff-it-daemon-json-$run_id"
    mkdir -p "$dir"
    docker create --label "skiff-test=$run_id" --name "$probe" --entrypoint "" "$image" true >/dev/null &&
      docker cp "$probe:/etc/docker/daemon.json" "$dir/daemon.json" || return 1
    docker rm -f "$probe" >/dev/null
    # Its own network namespace: a second dockerd in the host's would remove the host dockerd's
    # docker0 bridge (seen here), breaking every other container on the machine.
    unshare --net dockerd --config-file "$dir/daemon.json" --iptables=false --ip-masq=false --bridge=none \
      --data-root "$dir/data" --exec-root "$dir/exec" -H "unix://$dir/d.sock" \
      --pidfile "$dir/d.pid" >"$dir/log" 2>&1 &
    second_dockerd=$!
    d=(docker -H "unix://$dir/d.sock")
    for i in $(seq 300); do "${d[@]}" version >/dev/null 2>&1 && break; sleep 0.1; done
    if [ "$i" = 300 ]; then echo "dockerd did not start in 30 s:"; tail -n 20 "$dir/log"; return 1; fi
    info=$("${d[@]}" info --format '{{.LoggingDriver}} {{.LiveRestoreEnabled}}')
    tar -cf "$dir/empty.tar" -T /dev/null
    "${d[@]}" import "$dir/empty.tar" skiff-empty:1 >/dev/null
    "${d[@]}" create --name probe skiff-empty:1 /probe >/dev/null
    logs=$("${d[@]}" inspect -f '{{json .HostConfig.LogConfig}}' probe)
    echo "daemon.json: $(tr -d ' \n' <"$dir/daemon.json")"
    echo "dockerd: log driver, live-restore: $info; a new container logs with $logs"
    stop_second_dockerd
    [ "$info" = "local true" ] && [ "$logs" = '{"Type":"local","Config":{"max-file":"5","max-size":"10m"}}' ]
  }
  step "image: its dockerd applies daemon.json (driver, live-restore, a container's log config)" dockerd_applies
  step "image: the unit's ExecStart is the agent's run command" \
    in_image grep -qx 'ExecStart=/usr/local/bin/agent run --config /etc/skiff/agent.toml' \
    /etc/systemd/system/skiff-agent.service
  exposure() {
    in_image systemd-analyze security --offline=true --threshold=30 \
      /etc/systemd/system/skiff-agent.service >"$work/security.out" 2>&1
    local rc=$?
    tail -n1 "$work/security.out"
    return "$rc"
  }
  # A number, not a lint: lower is tighter (0-10). 3.0 allows the docker group and the network.
  step "image: systemd-analyze security exposure <= 3.0" exposure
  grep -o 'Overall exposure level.*' "$work/security.out" | sed 's/^/[packer]      /'
fi

# ProtectSystem=strict makes /run read-only for the agent, and it runs as an unprivileged user in
# the docker group: check that connecting to the Docker socket still works like that (on this
# host's dockerd, as the unit would on the instance's).
sandbox_socket() {
  local sock
  sock=$(readlink -f /var/run/docker.sock)
  unshare --mount sh -ec "
    mount --bind /run /run && mount -o remount,bind,ro /run
    if touch /run/skiff-sandbox-probe 2>/dev/null; then echo '/run still writable'; exit 1; fi
    setpriv --reuid=65534 --regid=65534 --groups=\$(getent group docker | cut -d: -f3) \
      --inh-caps=-all --bounding-set=-all --no-new-privs \
      curl -fsS --unix-socket '$sock' http://docker/_ping
  "
}
if getent group docker >/dev/null && [ -S /var/run/docker.sock ]; then
  step "sandbox: read-only /run, uid nobody + docker group, no caps: docker socket answers" sandbox_socket
  no_group() {
    ! unshare --mount sh -ec "mount --bind /run /run && mount -o remount,bind,ro /run
      setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all \
        curl -fsS --unix-socket /var/run/docker.sock http://docker/_ping"
  }
  step "sandbox: the same without the docker group is refused" no_group
fi

echo "packer: $passed passed, $failed failed"
[ "$failed" = 0 ]
