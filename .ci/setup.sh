#!/usr/bin/env bash
# Installs and starts, idempotently, everything skiff's tests need on a fresh Debian 12 machine:
# Debian packages, the Python tools (in venvs under $SKIFF_CI_HOME), a Docker engine, a local
# registry on 127.0.0.1:5000 (one with basic auth on :5001, one with token auth on :5002), the
# moto AWS emulator on 127.0.0.1:5055, and the offline base images the tests build on.
# Safe to run again: each step checks before it acts. Prints what it does.
# SKIFF_SETUP=dev installs only what `make dev` needs (Docker, the registry, the base images).
set -euo pipefail
mode=${SKIFF_SETUP:-all}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export SKIFF_CI_HOME=${SKIFF_CI_HOME:-/var/lib/skiff-ci}
mkdir -p "$SKIFF_CI_HOME"
say() { printf '[setup] %s\n' "$*"; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "setup: installing packages and starting dockerd needs root; run as root or with sudo" >&2
    exit 1
  fi
}

# --- Debian packages -------------------------------------------------------------------------
pkgs=(docker.io busybox-static docker-registry debootstrap apache2-utils curl procps)
[ "$mode" = dev ] || pkgs+=(openssl haproxy wrk mariadb-server jq packer python3-venv iproute2 systemd)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  need_root
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- Python tools, each in its own venv (moto and checkov pin different botocore) -------------
venv() { # name, packages...
  local dir="$SKIFF_CI_HOME/venv-$1" stamp; shift
  stamp="$dir/.skiff-$(echo "$*" | sha1sum | cut -c1-12)"
  if [ ! -e "$stamp" ]; then
    say "creating venv $dir with: $*"
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check "$@"
    touch "$stamp"
  fi
}
if [ "$mode" != dev ]; then
  venv moto 'moto[server]==5.*' 'boto3'
  venv lint 'cfn-lint==1.*' 'checkov==3.*'
  venv app 'flask==3.*' 'gunicorn==23.*' 'pymysql==1.*' 'boto3==1.*'
  venv awscli 'awscli==1.*'
fi

# --- Docker engine --------------------------------------------------------------------------
if ! docker version >/dev/null 2>&1; then
  need_root
  say "starting dockerd (log: $SKIFF_CI_HOME/dockerd.log)"
  nohup dockerd >"$SKIFF_CI_HOME/dockerd.log" 2>&1 &
  for _ in $(seq 1 60); do docker version >/dev/null 2>&1 && break; sleep 0.5; done
  docker version >/dev/null 2>&1 || { echo "setup: dockerd did not start; see $SKIFF_CI_HOME/dockerd.log" >&2; exit 1; }
fi

# --- Local registries ----------------------------------------------------------------------
start_registry() { # port, auth(no/yes/token), port whose storage to serve (default: its own)
  local port=$1 auth=$2 dir="$SKIFF_CI_HOME/registry-$1" data="$SKIFF_CI_HOME/registry-${3:-$1}/data"
  if curl -fs -o /dev/null -m 2 "http://127.0.0.1:$port/v2/" || curl -s -m 2 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v2/" | grep -q 401; then
    return
  fi
  mkdir -p "$dir" "$data"
  local authcfg=""
  if [ "$auth" = yes ]; then
    htpasswd -Bbn skiff skiff-secret >"$dir/htpasswd"
    authcfg="auth:
  htpasswd:
    realm: skiff-test
    path: $dir/htpasswd"
  fi
  if [ "$auth" = token ]; then
    # No token service runs here: ctl's registry test serves the realm on :5003 while it runs
    # and signs its tokens with this key, whose certificate the registry trusts.
    if [ ! -s "$dir/token.crt" ] || [ ! -s "$dir/token.key" ]; then
      openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=skiff-test-token \
        -keyout "$dir/token.key" -out "$dir/token.crt" 2>/dev/null
    fi
    authcfg="auth:
  token:
    realm: http://127.0.0.1:5003/token
    service: skiff-registry
    issuer: skiff-test-token
    rootcertbundle: $dir/token.crt"
  fi
  cat >"$dir/config.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
$authcfg
YML
  say "starting registry on 127.0.0.1:$port (auth: $auth)"
  nohup docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
  for _ in $(seq 1 40); do
    code=$(curl -s -m 1 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v2/" || true)
    [ "$code" = 200 ] || [ "$code" = 401 ] && return
    sleep 0.25
  done
  echo "setup: registry on :$port did not start; see $dir/log" >&2; exit 1
}
start_registry 5000 no
[ "$mode" = dev ] || start_registry 5001 yes
# Token auth in front of :5000's storage: images pushed there anonymously are served here.
[ "$mode" = dev ] || start_registry 5002 token 5000

# --- moto (AWS API emulator) ---------------------------------------------------------------
if [ "$mode" != dev ] && ! curl -fs -o /dev/null -m 2 http://127.0.0.1:5055/moto-api/; then
  say "starting moto server on 127.0.0.1:5055"
  nohup "$SKIFF_CI_HOME/venv-moto/bin/moto_server" -H 127.0.0.1 -p 5055 >"$SKIFF_CI_HOME/moto.log" 2>&1 &
  for _ in $(seq 1 60); do curl -fs -o /dev/null -m 1 http://127.0.0.1:5055/moto-api/ && break; sleep 0.5; done
  curl -fs -o /dev/null -m 2 http://127.0.0.1:5055/moto-api/ || { echo "setup: moto did not start; see $SKIFF_CI_HOME/moto.log" >&2; exit 1; }
fi

# --- Offline base images ---------------------------------------------------------------------
for script in "$here"/images/*.sh; do
  [ -e "$script" ] && bash "$script"
done
say "ready ($mode): docker $(docker version -f '{{.Server.Version}}'), registry :5000$([ "$mode" = dev ] || echo ', :5001, :5002, moto :5055')"
