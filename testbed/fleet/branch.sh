#!/usr/bin/env bash
# Issue 11's branch flow through the Makefile, in the fleet box, with the real app:
#   1. the box without a stack (box.py base: bridge, its emulator with IAM enforced, a VPC);
#      a MariaDB of the box's own on 10.201.0.1 (TLS, a test CA) standing in for the shared
#      database, its login in the emulator's Secrets Manager, and the app's settings under the
#      branch's env path /skiff/<env>/env/ (the CA path, the emulator and the box's IMDS);
#   2. the real app image (app/Dockerfile on skiff-ci/python:3.11-bookworm) with the test CA
#      added, pushed under three tags: two good releases and a broken one (no CA file: the app
#      refuses its database settings and never passes /health);
#   3. make create-stack (as the stack config credential: the emulator's administrator), then
#      box.py adopt: the controller boots the hosts the branch's group launches;
#   4. make integration URL=http://<the box's HAProxy>: the first release serves;
#   5. make update-stack TAG=<good 2> (the real ctl, as the stack's deployer) and integration;
#   6. make update-stack TAG=<broken>: exit non-zero, CTL_EXIT_FILE holds ctl's 1, the parameter
#      is back on good 2; integration expecting the broken tag fails, expecting good 2 passes;
#   7. make delete-stack FORCE=1, then checked: no stack, no parameter under /skiff/<env>/, no log
#      group /skiff/<env>/, no group, no running instance of it, no uploaded template, no host
#      left in the box.
# Plain HTTP on the box's load balancer (integration skips the HTTPS redirect check for http
# URLs). MIN_HOSTS=1: every host of the box shares the machine's UTS namespace, so the app's
# X-Served-By (the host name) is the same on all of them.
# Env: SKIP_SETUP=1 (skip .ci/setup.sh), BRANCH_TIMEOUT (seconds, 900), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/root/.cache/skiff-target}
ci=${SKIFF_CI_HOME:-/var/lib/skiff-ci}
py=$ci/venv-moto/bin/python
aws_cli=$ci/venv-awscli/bin/aws
gw=10.201.0.1 db_port=3307 lb=http://127.0.0.1:8880
repo=skiff-fleet/app # box.py down deletes this repository's tags from the registry
# An outer make (make test) must not leak its flags or variables into the makes run here.
unset MAKEFLAGS MFLAGS MAKELEVEL
say() { printf '[branch] %s\n' "$*"; }
fail() { say "FAIL: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "run as root (network namespaces, dockerd)"

if [ -z "${BRANCH_INNER:-}" ]; then
  [ "${SKIP_SETUP:-}" = 1 ] || bash .ci/setup.sh
  cargo build -q --locked -p skiff-agent -p skiff-ctl
  rc=0
  BRANCH_INNER=1 timeout -k 30 "${BRANCH_TIMEOUT:-900}" bash "$0" || rc=$?
  [ "$rc" = 124 ] && say "the flow outlived BRANCH_TIMEOUT=${BRANCH_TIMEOUT:-900} s" >&2
  "$py" testbed/fleet/box.py down >/dev/null || { "$py" testbed/fleet/box.py down; rc=1; }
  exit "$rc"
fi

start=$SECONDS
run_id=$$
branch=fleet-branch-$run_id
env_name=$branch # already what the Makefile's ENV makes of it
stack=app-$env_name
bucket=skiff-branch-templates-$run_id
ctl=$CARGO_TARGET_DIR/debug/ctl
work=$(mktemp -d /var/tmp/skiff-branch.XXXXXX) # not tmpfs: InnoDB's O_DIRECT
images=()
cleanup() {
  if [ -f "$work/db/mysqld.pid" ]; then
    pid=$(cat "$work/db/mysqld.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  "$py" testbed/fleet/box.py down >/dev/null 2>&1 || true
  for i in "${images[@]}"; do docker rmi -f "$i" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT
mk() { make -C "$root" BRANCH="$branch" AWS="$aws_cli" "$@"; }

# --- 1. the box without a stack, the database, the branch's env path ---------------------------
say "box.py base: bridge, emulator (IAM enforced), network"
"$py" testbed/fleet/box.py base >"$work/base.out" || { cat "$work/base.out" >&2; fail "box.py base failed"; }
grep '^export ' "$work/base.out" >"$work/admin.env"
# shellcheck disable=SC1091
. "$work/admin.env" # the emulator's administrator: the stack config credential (Jenkins')

say "MariaDB of the box on $gw:$db_port (TLS required, test CA)"
mkdir -p "$work/tls" "$work/db"
(
  cd "$work/tls"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 \
    -subj "/CN=skiff branch test CA $run_id" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
  openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=$gw"
  printf '%s\n' "subjectAltName=IP:$gw" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" >server.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
    -extfile server.ext -out server.pem
) >"$work/tls/openssl.log" 2>&1 || { cat "$work/tls/openssl.log" >&2; fail "making the test CA failed"; }
mariadb-install-db --no-defaults --user=root --datadir="$work/db/data" --skip-test-db \
  --auth-root-authentication-method=socket >"$work/db/install.log" 2>&1 ||
  { cat "$work/db/install.log" >&2; fail "mariadb-install-db failed"; }
mariadbd --no-defaults --user=root --datadir="$work/db/data" --socket="$work/db/mysqld.sock" \
  --port=$db_port --bind-address=$gw --skip-name-resolve --pid-file="$work/db/mysqld.pid" \
  --log-error="$work/db/mysqld.err" --innodb-buffer-pool-size=64M \
  --ssl-ca="$work/tls/ca.pem" --ssl-cert="$work/tls/server.pem" --ssl-key="$work/tls/server.key" \
  --require-secure-transport=ON >>"$work/db/mysqld.out" 2>&1 &
for _ in $(seq 1 60); do
  mariadb-admin --no-defaults --socket="$work/db/mysqld.sock" -uroot ping >/dev/null 2>&1 && break
  sleep 0.5
done
mariadb-admin --no-defaults --socket="$work/db/mysqld.sock" -uroot ping >/dev/null 2>&1 ||
  { tail -n 20 "$work/db/mysqld.err" >&2; fail "mariadbd did not answer within 30 s"; }
password=$(openssl rand -hex 16)
mariadb --no-defaults --socket="$work/db/mysqld.sock" -uroot -e \
  "CREATE DATABASE app; CREATE USER 'skiff'@'%' IDENTIFIED BY '$password' REQUIRE SSL;
   GRANT ALL ON app.* TO 'skiff'@'%';"
secret=$("$aws_cli" secretsmanager create-secret --name "skiff-$env_name-shared-db" \
  --secret-string "{\"username\":\"skiff\",\"password\":\"$password\"}" --query ARN --output text)
ca_in_image=/etc/ssl/certs/skiff-box-test-ca.pem
put_env() { # JSON input: CLI v1 would fetch a --value that starts with http://
  "$aws_cli" ssm put-parameter --cli-input-json \
    "{\"Name\": \"/skiff/$env_name/env/$1\", \"Type\": \"String\", \"Value\": \"$2\"}" >/dev/null
}
put_env DATABASE_SSL_CA "$ca_in_image"
put_env AWS_ENDPOINT_URL "http://$gw:5060"                    # the app reads its secret there
put_env AWS_EC2_METADATA_SERVICE_ENDPOINT "http://$gw:8169" # with the instance role, from the box's IMDS

# --- 2. the real app image, three tags -----------------------------------------------------------
t=$(printf '%05d' $((run_id % 100000)))
good1=b${t}a good2=b${t}b bad=b${t}x
say "building the app image (app/Dockerfile on skiff-ci/python:3.11-bookworm)"
base_image=skiff-it-branch-$run_id-app
images+=("$base_image")
docker build -q --build-arg BASE=skiff-ci/python:3.11-bookworm -t "$base_image" app >/dev/null
mkdir "$work/image"
cp "$work/tls/ca.pem" "$work/image/ca.pem"
for tag in $good1 $good2 $bad; do
  if [ "$tag" = "$bad" ]; then copy=""; else copy="COPY ca.pem $ca_in_image"; fi
  printf 'FROM %s\nLABEL skiff.branch-test=%s\n%s\n' "$base_image" "$tag" "$copy" >"$work/image/Dockerfile"
  ref=127.0.0.1:5000/$repo:$tag
  images+=("$ref")
  DOCKER_BUILDKIT=0 docker build -q --network none -t "$ref" "$work/image" >/dev/null 2>&1 ||
    fail "building $ref failed"
  docker push -q "$ref" >/dev/null
  say "pushed $repo:$tag$([ "$tag" = "$bad" ] && echo ' (broken: no CA file where DATABASE_SSL_CA points)')"
done

# --- 3. make create-stack, the box follows the branch's group ----------------------------------
"$aws_cli" s3 mb "s3://$bucket" >/dev/null
common=(TEMPLATE_BUCKET="$bucket")
say "make create-stack (stack $stack, first release $good1)"
mk create-stack HASH="$good1" VPC_ID="$VPC_ID" PUBLIC_SUBNETS="$PUBLIC_SUBNETS" \
  PRIVATE_SUBNETS="$PRIVATE_SUBNETS" CERTIFICATE_ARN="$CERTIFICATE_ARN" AMI_ID="$AMI_ID" \
  REPOSITORY=$repo MIN_SIZE=2 MAX_SIZE=4 DATABASE_HOST=$gw DATABASE_PORT=$db_port \
  DATABASE_SECRET_ARN="$secret" "${common[@]}" | tee "$work/create.out"
grep -q '^AutoScalingGroup' "$work/create.out" || fail "create-stack printed no AutoScalingGroup output"
group=$(awk '$1 == "AutoScalingGroup" {print $2}' "$work/create.out")
say "box.py adopt $stack (group $group): hosts boot as the group launches them"
"$py" testbed/fleet/box.py adopt "$stack" --instances 2 --timeout 300 >"$work/adopt.out" ||
  { cat "$work/adopt.out" >&2; fail "the box did not get 2 instances of $stack serving"; }
deployer() { # the stack's DeployerPolicy (Jenkins' role), not the administrator
  local vars
  mapfile -t vars < <(sed -n 's/^export //p' /var/lib/skiff-fleet/ctl.env)
  env "${vars[@]}" "$@"
}

# --- 4-6. integration, release, broken release --------------------------------------------------
integration() { # EXPECT_TAG [more make variables]
  mk integration URL=$lb EXPECT_TAG="$1" MIN_HOSTS=1 "${@:2}"
}
say "make integration: the first release $good1"
integration "$good1" || fail "make integration against $good1 (first release) failed"

say "make update-stack TAG=$good2 (ctl release as the stack's deployer)"
deployer make -C "$root" BRANCH="$branch" AWS="$aws_cli" update-stack TAG="$good2" CTL="$ctl" \
  CTL_FLAGS="--warmup 12s" CTL_EXIT_FILE="$work/ctl-exit" || fail "make update-stack TAG=$good2 failed"
integration "$good2" || fail "make integration against $good2 failed"

say "make update-stack TAG=$bad (a broken release: must fail and leave $good2)"
rc=0
deployer make -C "$root" BRANCH="$branch" AWS="$aws_cli" update-stack TAG="$bad" CTL="$ctl" \
  CTL_FLAGS="--warmup 12s" CTL_EXIT_FILE="$work/ctl-exit" || rc=$?
[ "$rc" != 0 ] || fail "make update-stack TAG=$bad succeeded"
[ "$(cat "$work/ctl-exit")" = 1 ] || fail "CTL_EXIT_FILE holds $(cat "$work/ctl-exit"), expected ctl's 1"
now=$("$aws_cli" ssm get-parameter --name "/skiff/$env_name/release" --query Parameter.Value --output text)
# ctl writes the release as JSON (release/: tag, digest, kind); a compensation names the tag before.
tag_now=$(python3 -c 'import json, sys; v = sys.argv[1]; print(json.loads(v)["tag"] if v.startswith("{") else v)' "$now")
[ "$tag_now" = "$good2" ] || fail "after the broken release the parameter is $now, expected $good2"
grep -q '"kind":"compensation"' <<<"$now" || fail "after the broken release the parameter is not ctl's compensation: $now"
rc=0
integration "$bad" WAIT=15 >"$work/integration-bad.out" 2>&1 || rc=$?
cat "$work/integration-bad.out"
[ "$rc" != 0 ] || fail "make integration EXPECT_TAG=$bad passed"
integration "$good2" || fail "after the broken release, $good2 no longer passes make integration"

# --- 7. delete-stack: nothing of the branch left ------------------------------------------------
say "make delete-stack FORCE=1"
mk delete-stack FORCE=1 DELETE_TIMEOUT=300 "${common[@]}"
left=()
out=$("$aws_cli" cloudformation describe-stacks --stack-name "$stack" 2>&1) && left+=("stack $stack")
grep -q 'does not exist' <<<"$out" || [ "${#left[@]}" -gt 0 ] || left+=("stack $stack unreadable: $out")
x=$("$aws_cli" ssm get-parameters-by-path --path "/skiff/$env_name/" --recursive --query 'Parameters[].Name' --output text)
[ -z "${x//[[:space:]]/}" ] || left+=("parameters $x")
x=$("$aws_cli" logs describe-log-groups --log-group-name-prefix "/skiff/$env_name/" --query 'logGroups[].logGroupName' --output text)
[ -z "${x//[[:space:]]/}" ] || left+=("log groups $x")
x=$("$aws_cli" autoscaling describe-auto-scaling-groups --auto-scaling-group-names "$group" --query 'AutoScalingGroups[].AutoScalingGroupName' --output text)
[ -z "${x//[[:space:]]/}" ] || left+=("group $x")
x=$("$aws_cli" ec2 describe-instances --filters "Name=tag:aws:autoscaling:groupName,Values=$group" \
  "Name=instance-state-name,Values=pending,running,stopping,stopped" --query 'Reservations[].Instances[].InstanceId' --output text)
[ -z "${x//[[:space:]]/}" ] || left+=("instances $x")
x=$("$aws_cli" s3api list-objects-v2 --bucket "$bucket" --prefix "skiff-templates/$env_name/" --query 'Contents[].Key' --output text)
[ -z "${x//[[:space:]]/}" ] || [ "$x" = None ] || left+=("templates $x")
# The box's hosts follow the group: gone within the deregistration delay and the teardown.
for _ in $(seq 1 90); do
  [ -z "$(ip netns list | grep '^skf-' || true)" ] && break
  sleep 1
done
x=$(ip netns list | grep '^skf-' | cut -d' ' -f1 | tr '\n' ' ' || true)
[ -z "${x// /}" ] || left+=("hosts (netns) $x")
((${#left[@]} == 0)) || fail "left behind by make delete-stack: ${left[*]}"
say "delete-stack left nothing of $env_name (stack, parameters, log groups, group, instances, templates, hosts)"
say "PASS: create-stack, integration, release, broken release, delete-stack in $((SECONDS - start)) s"
