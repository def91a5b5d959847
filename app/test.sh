#!/usr/bin/env bash
# Runs app/test.py twice: against sqlite, then against a throwaway MariaDB server that this script
# starts on a free loopback port with its own fresh datadir and socket, and stops again on exit.
# The secret tests also use the moto server (TEST_AWS_ENDPOINT_URL, default http://127.0.0.1:5055).
# Needs .ci/setup.sh (mariadb-server, the venv-app with flask/gunicorn/pymysql/boto3, moto).
# Exits non-zero on any failure; the last line is "app: N passed, N failed, N skipped".
# Env: SKIFF_CI_HOME (/var/lib/skiff-ci), PYTHON ($SKIFF_CI_HOME/venv-app/bin/python);
# arguments go to test.py (e.g. -v, -k health).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
home=${SKIFF_CI_HOME:-/var/lib/skiff-ci}
python=${PYTHON:-$home/venv-app/bin/python}
for tool in "$python" mariadb-install-db mariadbd mariadb; do
  command -v "$tool" >/dev/null || { echo "test.sh: $tool not found; run .ci/setup.sh first" >&2; exit 1; }
done
export TEST_AWS_ENDPOINT_URL=${TEST_AWS_ENDPOINT_URL:-http://127.0.0.1:5055}
curl -fs -o /dev/null -m 2 "$TEST_AWS_ENDPOINT_URL/moto-api/" ||
  { echo "test.sh: no moto server at $TEST_AWS_ENDPOINT_URL; run .ci/setup.sh first" >&2; exit 1; }

mkdir -p "$home"
tmp=$(mktemp -d "$home/mariadb-test.XXXXXX")  # not /tmp: InnoDB's O_DIRECT fails on tmpfs
pid=""
stop_mariadb() {
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  echo "test.sh: mariadbd $pid ignored SIGTERM for 30s; killing it" >&2
  kill -9 "$pid" 2>/dev/null || true
}
trap 'stop_mariadb; rm -rf "$tmp"' EXIT

passed=0 failed=0 skipped=0 status=0
run_tests() { # label, env assignments...
  local label=$1 out="$tmp/$1.out" rc line; shift
  echo "== test.py against $label"
  set +e
  env -u TEST_DATABASE_URL "$@" "$python" "$here/test.py" "${test_args[@]}" 2>&1 | tee "$out"
  rc=${PIPESTATUS[0]}
  set -e
  line=$(grep -E '^[a-z]+: [0-9]+ passed, [0-9]+ failed, [0-9]+ skipped$' "$out" | tail -n 1 || true)
  if [[ $line =~ ([0-9]+)\ passed,\ ([0-9]+)\ failed,\ ([0-9]+)\ skipped ]]; then
    passed=$((passed + BASH_REMATCH[1])) failed=$((failed + BASH_REMATCH[2])) skipped=$((skipped + BASH_REMATCH[3]))
  else
    echo "test.sh: test.py against $label printed no summary (exit $rc)" >&2
    failed=$((failed + 1))
  fi
  [ "$rc" = 0 ] || status=1
}
test_args=("$@")

run_tests sqlite

echo "== starting a throwaway MariaDB in $tmp"
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
sock="$tmp/mysqld.sock"
mariadb-install-db --no-defaults --user=root --datadir="$tmp/data" --skip-test-db \
  --auth-root-authentication-method=socket >"$tmp/install.log" 2>&1 ||
  { cat "$tmp/install.log" >&2; echo "test.sh: mariadb-install-db failed" >&2; exit 1; }
mariadbd --no-defaults --user=root --datadir="$tmp/data" --socket="$sock" --port="$port" \
  --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$tmp/mysqld.pid" \
  --log-error="$tmp/mysqld.err" --innodb-buffer-pool-size=64M \
  --innodb-flush-log-at-trx-commit=0 >"$tmp/mysqld.out" 2>&1 &
pid=$!
# Ask the server we started, through its own socket: nothing left on the port can answer for it.
for _ in $(seq 1 60); do
  kill -0 "$pid" 2>/dev/null || { cat "$tmp/mysqld.out" "$tmp/mysqld.err" >&2; echo "test.sh: mariadbd exited" >&2; exit 1; }
  mariadb-admin --no-defaults --socket="$sock" -uroot ping >/dev/null 2>&1 && break
  sleep 0.5
done
mariadb-admin --no-defaults --socket="$sock" -uroot ping >/dev/null 2>&1 ||
  { cat "$tmp/mysqld.err" >&2; echo "test.sh: mariadbd did not answer within 30s" >&2; exit 1; }
password="pw-$RANDOM$RANDOM"
mariadb --no-defaults --socket="$sock" -uroot <<SQL
CREATE DATABASE skiff_test CHARACTER SET utf8mb4;
CREATE USER 'skiff'@'127.0.0.1' IDENTIFIED BY '$password';
GRANT ALL ON skiff_test.* TO 'skiff'@'127.0.0.1' WITH GRANT OPTION;
-- The secret tests make a user of their own for each test, and change its password.
GRANT CREATE USER ON *.* TO 'skiff'@'127.0.0.1';
SQL

run_tests mariadb "TEST_DATABASE_URL=mysql://skiff:$password@127.0.0.1:$port/skiff_test"

echo "app: $passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ] && [ "$status" = 0 ]
