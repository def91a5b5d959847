#!/usr/bin/env bash
# Installs and starts, idempotently, everything skiff's tests need on a fresh Debian 12 machine:
# Debian packages, the Python tools (in venvs under $SKIFF_CI_HOME), a Docker engine, a local
# registry on 127.0.0.1:5000 (one with basic auth on :5001, one with token auth on :5002, an
# ECR-shaped one with TLS on 123456789012.dkr.ecr.us-east-1.amazonaws.com:443), the
# moto AWS emulator (with skiff's extensions, testbed/emulator) on 127.0.0.1:5055 and with IAM enforced
# on :5056, and the offline base images the tests build on.
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
# The agent links libnftnl/libmnl (the handover's kernel redirect, through the nftnl crate);
# nftables' own `nft` reads the redirect back in the tests, as a reader that is not ours.
pkgs=(docker.io busybox-static docker-registry debootstrap apache2-utils curl procps
  pkg-config libnftnl-dev libmnl-dev nftables)
[ "$mode" = dev ] || pkgs+=(openssl haproxy wrk mariadb-server jq packer python3-venv iproute2 systemd)
# The lint step's shell linter (testbed/checks/lint.sh; ruff comes from PyPI, below).
[ "$mode" = dev ] || pkgs+=(shellcheck)
# The signature crate's interop test builds sigstore-rs with its OpenSSL backend (openssl-sys).
[ "$mode" = dev ] || pkgs+=(libssl-dev)
# The agent metrics test starts a Prometheus of its own (never the package's service).
[ "$mode" = dev ] || pkgs+=(prometheus)
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
  venv ruff 'ruff==0.17.5' # the Python linter (testbed/checks/lint.sh); pinned: a new release adds rules
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

# --- An ECR-shaped registry ----------------------------------------------------------------
# Reached as $host over TLS on port 443 like ECR itself, with a test CA that dockerd trusts
# through /etc/docker/certs.d and ctl through --registry-ca. The name resolves (/etc/hosts) to
# 198.18.0.1, an address of the loopback interface from the benchmarking range (RFC 2544), not
# to 127.0.0.1: dockerd treats 127.0.0.0/8 as an insecure registry, falls back to plain http
# there and then reports the http error instead of the registry's refusal. It accepts only the credentials moto's ECR hands out (GetAuthorizationToken: user AWS, password
# "<account>-auth-token", default account 123456789012) and serves :5000's storage, so an image
# pushed to :5000 anonymously is pulled from here with a token.
ecr_registry() {
  local host=123456789012.dkr.ecr.us-east-1.amazonaws.com dir="$SKIFF_CI_HOME/registry-ecr"
  local data="$SKIFF_CI_HOME/registry-5000/data" addr=198.18.0.1 code hosts
  if ! ip -4 addr show dev lo | grep -q "inet $addr/"; then
    need_root
    say "adding $addr to the loopback interface"
    ip addr add "$addr/32" dev lo
  fi
  if ! grep -Eq "^${addr//./\\.}[[:space:]]+$host\$" /etc/hosts; then
    need_root
    say "resolving $host to $addr (/etc/hosts)"
    # Rewritten in place: /etc/hosts may be a bind mount, which cannot be replaced.
    hosts=$(grep -v "[[:space:]]$host\$" /etc/hosts || true)
    printf '%s\n%s %s\n' "$hosts" "$addr" "$host" >/etc/hosts
  fi
  mkdir -p "$dir"
  if [ ! -s "$dir/ca.crt" ] || [ ! -s "$dir/server.crt" ] || [ ! -s "$dir/server.key" ]; then
    say "creating a test CA and the certificate of $host"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=skiff-test-ecr-ca \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
      -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$host" \
      -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
    printf 'subjectAltName=DNS:%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
      "$host" >"$dir/server.ext"
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
      -days 3650 -extfile "$dir/server.ext" -out "$dir/server.crt" 2>/dev/null
  fi
  if ! cmp -s "$dir/ca.crt" "/etc/docker/certs.d/$host/ca.crt"; then
    need_root
    install -D -m 0644 "$dir/ca.crt" "/etc/docker/certs.d/$host/ca.crt"
  fi
  code=$(curl -s -m 2 --cacert "$dir/ca.crt" -o /dev/null -w '%{http_code}' "https://$host/v2/" || true)
  [ "$code" = 401 ] && return
  htpasswd -Bbn AWS 123456789012-auth-token >"$dir/htpasswd"
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
  addr: $addr:443
  tls:
    certificate: $dir/server.crt
    key: $dir/server.key
auth:
  htpasswd:
    realm: https://$host/
    path: $dir/htpasswd
YML
  say "starting the ECR-shaped registry https://$host ($addr:443; moto's ECR token only)"
  nohup docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
  for _ in $(seq 1 40); do
    code=$(curl -s -m 1 --cacert "$dir/ca.crt" -o /dev/null -w '%{http_code}' "https://$host/v2/" || true)
    [ "$code" = 401 ] && return
    sleep 0.25
  done
  echo "setup: the ECR-shaped registry did not start; see $dir/log" >&2; exit 1
}
[ "$mode" = dev ] || ecr_registry

# --- moto (AWS API emulator), through skiff's launcher (testbed/emulator: extensions on) ---------------
# :5055 permissive (dummy credentials work), :5056 with IAM enforced from the first request (its
# administrator's keys: $SKIFF_CI_HOME/emulator-iam-admin.json). A server whose stamp (a hash of
# the launcher's code) differs, or a plain moto_server, is stopped and started again.
start_emulator() { # port, extra args...
  local port=$1; shift
  local stamp got pidfile="$SKIFF_CI_HOME/emulator-$port.pid" pid
  stamp=$(cat "$here"/../testbed/emulator/*.py | sha1sum | cut -c1-12)
  got=$(curl -fs -m 2 "http://127.0.0.1:$port/skiff-emulator/version" 2>/dev/null | sed -n 's/.*"stamp": "\([0-9a-f]*\)".*/\1/p' || true)
  [ "$got" = "$stamp" ] && return
  if curl -s -o /dev/null -m 2 "http://127.0.0.1:$port/moto-api/"; then
    # The process listening there (setup started it); the pid file if ss cannot tell.
    pid=$(ss -Hltnp "sport = :$port" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2 || true)
    [ -n "$pid" ] || pid=$(cat "$pidfile" 2>/dev/null || true)
    say "restarting the emulator on :$port (stamp ${got:-none}, want $stamp; pid ${pid:-?})"
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
    for _ in $(seq 1 40); do curl -s -o /dev/null -m 1 "http://127.0.0.1:$port/moto-api/" || break; sleep 0.25; done
  else
    say "starting the emulator on 127.0.0.1:$port $*"
  fi
  nohup "$SKIFF_CI_HOME/venv-moto/bin/python" "$here/../testbed/emulator/server.py" -H 127.0.0.1 -p "$port" \
    --stamp "$stamp" "$@" >"$SKIFF_CI_HOME/emulator-$port.log" 2>&1 &
  echo $! >"$pidfile"
  for _ in $(seq 1 120); do curl -fs -o /dev/null -m 1 "http://127.0.0.1:$port/skiff-emulator/version" && return; sleep 0.5; done
  echo "setup: the emulator on :$port did not start; see $SKIFF_CI_HOME/emulator-$port.log" >&2; exit 1
}
if [ "$mode" != dev ]; then
  start_emulator 5055
  start_emulator 5056 --iam --admin-file "$SKIFF_CI_HOME/emulator-iam-admin.json"
fi

# --- Offline base images ---------------------------------------------------------------------
for script in "$here"/../testbed/images/*.sh; do
  [ -e "$script" ] && bash "$script"
done
say "ready ($mode): docker $(docker version -f '{{.Server.Version}}'), registry :5000$([ "$mode" = dev ] || echo ', :5001, :5002, moto :5055, moto+IAM :5056')"
