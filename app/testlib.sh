# shellcheck shell=bash
# Sourced by test.sh and image-test.sh: a throwaway MariaDB server and a test CA.
# Needs mariadb-server (mariadb-install-db, mariadbd, mariadb, mariadb-admin) and openssl.
#
#   make_test_cas DIR                 DIR/ca.pem signs DIR/server.{pem,key} (SAN DNS:localhost
#                                     only, so 127.0.0.1 is a wrong host name); DIR/other-ca.pem
#                                     is a second CA that signed nothing here
#   mariadb_init DIR                  a fresh datadir in DIR/data (DIR not on tmpfs: InnoDB's
#                                     O_DIRECT fails there)
#   mariadb_start DIR PORT [TLS_DIR]  starts mariadbd on 127.0.0.1:PORT with its own socket
#                                     DIR/mysqld.sock (TLS required over TCP, with TLS_DIR's
#                                     server certificate),
#                                     and waits until it answers through that socket, <= 30 s
#   mariadb_stop DIR                  stops the mariadbd that mariadb_start DIR started, <= 30 s
#   mariadb_sql DIR [ARGS...]         the mariadb client as root through DIR's socket
#   free_port                         a loopback TCP port nobody listens on now

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

make_test_cas() {
  local dir=$1
  mkdir -p "$dir"
  (
    cd "$dir"
    for ca in ca other-ca; do
      openssl req -x509 -newkey rsa:2048 -nodes -keyout "$ca.key" -out "$ca.pem" -days 2 \
        -subj "/CN=skiff test $ca $$ $RANDOM" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    done
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost"
    printf '%s\n' "subjectAltName=DNS:localhost" "basicConstraints=critical,CA:FALSE" \
      "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" \
      "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid,issuer" >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
      -extfile server.ext -out server.pem
  ) >"$dir/openssl.log" 2>&1 || { cat "$dir/openssl.log" >&2; echo "testlib: making the test CAs failed" >&2; return 1; }
}

mariadb_init() {
  local dir=$1
  mkdir -p "$dir"
  mariadb-install-db --no-defaults --user=root --datadir="$dir/data" --skip-test-db \
    --auth-root-authentication-method=socket >"$dir/install.log" 2>&1 ||
    { cat "$dir/install.log" >&2; echo "testlib: mariadb-install-db failed" >&2; return 1; }
}

mariadb_start() {
  local dir=$1 port=$2 tls=${3:-} pid
  local args=(--no-defaults --user=root --datadir="$dir/data" --socket="$dir/mysqld.sock"
    --port="$port" --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$dir/mysqld.pid"
    --log-error="$dir/mysqld.err" --innodb-buffer-pool-size=64M --innodb-flush-log-at-trx-commit=0)
  # With TLS, TCP clients must use it (the socket stays open to root for setup).
  [ -z "$tls" ] || args+=(--ssl-ca="$tls/ca.pem" --ssl-cert="$tls/server.pem" --ssl-key="$tls/server.key"
    --require-secure-transport=ON)
  mariadbd "${args[@]}" >>"$dir/mysqld.out" 2>&1 &
  pid=$!
  echo "$pid" >"$dir/started.pid"
  # Ask the server we started, through its own socket: nothing left on the port can answer for it.
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || { cat "$dir/mysqld.out" "$dir/mysqld.err" >&2; echo "testlib: mariadbd exited" >&2; return 1; }
    mariadb-admin --no-defaults --socket="$dir/mysqld.sock" -uroot ping >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  tail -n 20 "$dir/mysqld.err" >&2
  echo "testlib: mariadbd did not answer within 30s" >&2
  return 1
}

mariadb_stop() {
  local dir=$1 pid
  pid=$(cat "$dir/started.pid" 2>/dev/null) || return 0
  rm -f "$dir/started.pid"
  kill -0 "$pid" 2>/dev/null || return 0
  kill "$pid"
  kill -CONT "$pid" 2>/dev/null || true  # a test may have frozen it
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  echo "testlib: mariadbd $pid ignored SIGTERM for 30s; killing it" >&2
  kill -9 "$pid" 2>/dev/null || true
}

mariadb_sql() { # DIR [mariadb options...]
  mariadb --no-defaults --socket="$1/mysqld.sock" -uroot "${@:2}"
}
