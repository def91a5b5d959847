#!/usr/bin/env bash
# Runs app/test.py twice: against sqlite, then against a throwaway MariaDB server that this script
# starts on a free loopback port with its own fresh datadir and socket, and stops again on exit.
# For the TLS tests it starts a second one that serves TLS with a certificate of a test CA made
# here (testlib.sh): TEST_TLS_DATABASE_URL, TEST_TLS_CA, TEST_TLS_OTHER_CA.
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

# shellcheck source=app/testlib.sh
. "$here/testlib.sh"
mkdir -p "$home"
tmp=$(mktemp -d "$home/mariadb-test.XXXXXX")  # not /tmp: InnoDB's O_DIRECT fails on tmpfs
trap 'mariadb_stop "$tmp/plain"; mariadb_stop "$tmp/tls"; rm -rf "$tmp"' EXIT

passed=0 failed=0 skipped=0 status=0
run_tests() { # label, env assignments...
  local label=$1 out="$tmp/$1.out" rc line; shift
  echo "== test.py against $label"
  set +e
  env -u TEST_DATABASE_URL -u TEST_TLS_DATABASE_URL "$@" "$python" "$here/test.py" "${test_args[@]}" 2>&1 | tee "$out"
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

echo "== starting two throwaway MariaDB servers in $tmp (plain, and TLS with a test CA)"
make_test_cas "$tmp/ca"
port=$(free_port)
mariadb_init "$tmp/plain" && mariadb_start "$tmp/plain" "$port" || exit 1
tls_port=$(free_port)
mariadb_init "$tmp/tls" && mariadb_start "$tmp/tls" "$tls_port" "$tmp/ca" || exit 1
password="pw-$RANDOM$RANDOM"
for server in plain tls; do
  mariadb_sql "$tmp/$server" <<SQL
CREATE DATABASE skiff_test CHARACTER SET utf8mb4;
CREATE USER 'skiff'@'127.0.0.1' IDENTIFIED BY '$password';
GRANT ALL ON skiff_test.* TO 'skiff'@'127.0.0.1' WITH GRANT OPTION;
-- The secret tests make a user of their own for each test, and change its password.
GRANT CREATE USER ON *.* TO 'skiff'@'127.0.0.1';
SQL
done

run_tests mariadb "TEST_DATABASE_URL=mysql://skiff:$password@127.0.0.1:$port/skiff_test" \
  "TEST_TLS_DATABASE_URL=mysql://skiff:$password@localhost:$tls_port/skiff_test" \
  "TEST_TLS_CA=$tmp/ca/ca.pem" "TEST_TLS_OTHER_CA=$tmp/ca/other-ca.pem"

echo "app: $passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ] && [ "$status" = 0 ]
