#!/usr/bin/env bash
# Proves the Makefile's targets with the real tools, in a temporary clone of this repository (the
# work tree is never touched; the Makefile under test is the work tree's, committed in the clone):
#   1. `make` and `make help` list every target;
#   2. `make build` tags the app image <hash> and <branch>, a second commit moves the branch tag
#      and keeps the first hash tag, `make push` puts both tags in the local registry (:5000);
#   3. a modified app/ makes `make build` refuse without tagging anything; ALLOW_DIRTY=1 builds;
#   4. without AWS credentials (empty HOME, no AWS_*) create-stack and update-stack fail fast
#      saying what to set; update-stack without TAG says TAG is required;
#   5. `TAG=<hash> make update-stack CTL_FLAGS=--dry-run` against moto runs the real ctl (debug
#      build), which resolves the pushed tag in the local registry; a missing tag fails;
#   6. `make create-stack` against moto (on a VPC, subnets, a certificate and a database secret
#      made first; an existing database, since moto cannot build the own one's secret reference):
#      the release parameter created first and not by the stack, the stack and what it built;
#      deleted, the parameter stays; a value written like ctl does survives a second
#      create-stack, which says it kept it. Not the stack's outputs: see below.
#      With TRUSTED_KEYS (two keys) the stack keeps them in /skiff/<env>/trusted-keys; a file
#      that is no set of PEM public keys (text, a private key, a cut key, none) is refused by
#      create-stack and update-stack before any AWS call (section 4), where `make sign` with a
#      key file also signs the pushed image in the local registry.
#   7. a stack from before (its template owned the release parameter) updated by create-stack:
#      the update deletes the parameter, create-stack puts the live value back.
#   8. delete-stack: without FORCE=1 and no terminal it refuses and deletes nothing; master is
#      refused even with FORCE=1 (before any AWS call); stack-status before and after; with
#      FORCE=1 nothing of the branch is left (stack, every parameter under /skiff/<env>/: release,
#      lock, env/..., its log group) while a neighbour's /skiff/<env>x/ stays; a rerun is a no-op.
#      `make integration` without URL checks the stack's LoadBalancerDNS output (the checks
#      themselves: app/integration-test.sh).
#   0. environments (issue 18, finding 5; no AWS): no two branches share one (feature/login,
#      feature-login, Feature-Login; two long names alike in their first 40 characters), every
#      one fits the template's Environment pattern, a branch folding onto a protected one
#      (Master, MASTER, master_, master., -master, Production, prod_) is refused by env-name,
#      build, update-stack (before any AWS call; `make -n` does not name app-master either) and
#      delete-stack (even with CONFIRM_PROTECTED=master), and a protected environment other than
#      master (the branch production) is deployed only with CONFIRM_PROTECTED.
# Every name carries a fresh run id; images, registry tags and moto resources it made are removed
# on exit, also after a failure. Needs .ci/setup.sh's services (Docker, registry :5000, moto
# :5055, the awscli venv); builds ctl (debug) when missing.
# Prints ok/FAIL per check, ends with "make: N passed, N failed"; exits 1 on any failure.
#
# Conditions are given to check() in single quotes when they are to be evaluated there.
# shellcheck disable=SC2016
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/root/.cache/skiff-target}
ci_home=${SKIFF_CI_HOME:-/var/lib/skiff-ci}
aws_cli=$ci_home/venv-awscli/bin/aws
ctl=$CARGO_TARGET_DIR/debug/ctl
registry=127.0.0.1:5000
moto=http://127.0.0.1:5055
base=skiff-ci/python:3.11-bookworm
# An outer make (make test) must not leak its flags or variables into the makes run here.
unset MAKEFLAGS MFLAGS MAKELEVEL

run=$(date +%s)$RANDOM
repo_name=skiff-make-check-$run
image=$registry/$repo_name
branch=make-check/$run
# Not the branch's own name ('/' replaced): sanitized, '--', 6 hex of the branch's sha256.
env_name=make-check-$run--$(printf '%s' "$branch" | sha256sum | cut -c1-6)
stack=app-$env_name
work=$(mktemp -d)
clone=$work/repo
home=$work/home # empty: no ~/.aws, no ~/.docker
mkdir -p "$home"

passed=0 failed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }
check() { # name, condition command...; shows the last output on failure
  local name=$1; shift
  if "$@"; then ok "$name"; else fail "$name"; sed 's/^/     | /' "$work/out" | tail -n 15; fi
}
has() { grep -qF -- "$1" "$work/out"; }

# make in the clone with nothing from this environment but PATH (and DOCKER_HOST): "$@" are
# NAME=value settings for the environment, then `--`, then make's arguments.
mk() {
  local envs=()
  while (($#)) && [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  env -i PATH="$PATH" HOME="$home" ${DOCKER_HOST:+DOCKER_HOST="$DOCKER_HOST"} "${envs[@]}" \
    make -C "$clone" REGISTRY="$registry" REPOSITORY="$repo_name" BASE="$base" "$@" >"$work/out" 2>&1 </dev/null
}
moto_env=(AWS_ENDPOINT_URL="$moto" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
  AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1)
maws() { env -i PATH="$PATH" HOME="$home" "${moto_env[@]}" "$aws_cli" --output text "$@"; }
image_id() { docker image inspect -f '{{.Id}}' "$1" 2>/dev/null; }
registry_tags() { curl -fsS -m 5 "http://$registry/v2/$repo_name/tags/list" 2>/dev/null; }
registry_digest() {
  curl -fsSI -m 5 -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    "http://$registry/v2/$repo_name/manifests/$1" 2>/dev/null |
    tr -d '\r' | sed -n 's/^docker-content-digest: *//Ip'
}

cleanup_moto=()
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
  local i tag digest
  for ((i = ${#cleanup_moto[@]} - 1; i >= 0; i--)); do eval "${cleanup_moto[i]}" >/dev/null 2>&1 || true; done
  for tag in "${hash1:-}" "${hash2:-}" "$env_name"; do
    [ -n "$tag" ] || continue
    digest=$(registry_digest "$tag")
    [ -z "$digest" ] || curl -fsS -m 5 -X DELETE "http://$registry/v2/$repo_name/manifests/$digest" >/dev/null 2>&1 || true
  done
  # The registry keeps a repository without tags in its catalog; this run's name is its own.
  [ -n "$repo_name" ] && rm -rf "$ci_home/registry-5000/data/docker/registry/v2/repositories/$repo_name"
  docker images -aq --filter "label=skiff.branch=$branch" | sort -u | xargs -r docker rmi -f >/dev/null 2>&1 || true
  docker images --format '{{.Repository}}:{{.Tag}}' "$image" | xargs -r docker rmi -f >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

started=$SECONDS
[ -x "$aws_cli" ] || { echo "make-check: no AWS CLI at $aws_cli; run .ci/setup.sh" >&2; exit 1; }
if [ ! -x "$ctl" ]; then
  echo "building ctl (debug)"
  (cd "$root" && cargo build -q --locked -p skiff-ctl) || { echo "make-check: cargo build -p skiff-ctl failed" >&2; exit 1; }
fi

# The clone, on a branch of its own, with the work tree's Makefile committed in it.
git clone -q "$root" "$clone" || { echo "make-check: git clone failed" >&2; exit 1; }
git -C "$clone" config user.email make-check@skiff.invalid
git -C "$clone" config user.name make-check
git -C "$clone" checkout -q -b "$branch"
cp "$root/Makefile" "$clone/Makefile"
git -C "$clone" commit -q --allow-empty -am "make-check: the Makefile under test"
hash1=$(git -C "$clone" rev-parse --short HEAD)

# --- 0. environments --------------------------------------------------------------------------
env_of() { mk -- -s env-name BRANCH="$1" && cat "$work/out"; }
declare -A seen_env=()
long=release/$(printf 'x%.0s' {1..40})
for b in master feature-login feature/login Feature-Login feature_login "$long-a" "$long-b" \
  "$(printf 'y%.0s' {1..40})" "$(printf 'y%.0s' {1..41})" master-hotfix master/hotfix; do
  e=$(env_of "$b") || e="(refused: $(tail -n 2 "$work/out" | head -n 1))"
  check "env-name: $b -> $e fits the template's Environment pattern" \
    bash -c '[[ $1 =~ ^[a-z0-9][a-z0-9-]{0,39}$ ]]' _ "$e"
  check "env-name: $b -> $e is no other branch's (${seen_env[$e]:-})" [ -z "${seen_env[$e]:-}" ]
  seen_env[$e]=$b
done
check "env-name: a branch already in the sanitized form is its own environment" \
  eval '[ "${seen_env[master]:-}" = master ] && [ "${seen_env[feature-login]:-}" = feature-login ]'
check "env-name: feature/login -> feature-login--<6 hex of its sha256>" \
  [ "${seen_env[feature-login--$(printf '%s' feature/login | sha256sum | cut -c1-6)]:-}" = feature/login ]
for b in Master MASTER master_ master. -master Production PRODUCTION prod_ Main; do
  mk -- -s env-name BRANCH="$b"; rc=$?
  check "env-name refuses $b, which folds onto a protected environment (exit $rc)" \
    eval '[ "$rc" != 0 ] && has "would reach the protected environment" && has "only the branch named exactly"'
done
mk -- -s env-name BRANCH=master ENV=master; rc=$?
check "env-name accepts master itself (exit $rc)" eval '[ "$rc" = 0 ] && grep -qx master "$work/out"'
mk -- -s env-name BRANCH=feature/x ENV=master; rc=$?
check "an ENV=master given to another branch is refused (exit $rc)" [ "$rc" != 0 ]
mk -- -n update-stack BRANCH=Master TAG=abc1234 CTL=/bin/true
check "make -n update-stack BRANCH=Master does not name app-master" bash -c '! grep -qE "app-master( |$)" "$1"' _ "$work/out"
mk "${moto_env[@]}" -- update-stack BRANCH=Master TAG=abc1234 AWS="$aws_cli" CTL="$ctl"; rc=$?
check "update-stack BRANCH=Master is refused (exit $rc) before any AWS call" \
  eval '[ "$rc" != 0 ] && has "protected environment master" && ! has "AWS identity" && ! has "release --tag"'
mk -- build BRANCH=MASTER; rc=$?
check "build BRANCH=MASTER is refused (it would move the :master tag) (exit $rc)" \
  eval '[ "$rc" != 0 ] && has "protected environment master" && ! has "docker build"'
mk "${moto_env[@]}" -- delete-stack BRANCH=master_ FORCE=1 CONFIRM_PROTECTED=master AWS="$aws_cli"; rc=$?
check "delete-stack BRANCH=master_ is refused even with CONFIRM_PROTECTED=master (exit $rc)" \
  eval '[ "$rc" != 0 ] && has "protected environment master" && ! has "AWS identity"'
mk "${moto_env[@]}" -- update-stack BRANCH=production TAG=abc1234 AWS="$aws_cli" CTL="$ctl"; rc=$?
check "update-stack of the branch production is refused without CONFIRM_PROTECTED (exit $rc)" \
  eval '[ "$rc" != 0 ] && has "CONFIRM_PROTECTED=production" && ! has "AWS identity"'
mk -- update-stack BRANCH=production TAG=abc1234 CONFIRM_PROTECTED=production AWS=/nonexistent/aws CTL="$ctl"; rc=$?
check "... and goes on with CONFIRM_PROTECTED=production (to the credentials check here)" \
  eval '! has "CONFIRM_PROTECTED=production" && has "no AWS credentials"'

# --- 1. help ---------------------------------------------------------------------------------
targets=$(sed -n 's/^\.PHONY: *//p' "$clone/Makefile" | tr ' ' '\n' | sed '/^$/d')
mk -- help; cp "$work/out" "$work/help"
missing=$(for t in $targets; do grep -qE "^  ${t}[[:space:]]" "$work/help" || echo "$t"; done)
check "make help lists every target ($(echo "$targets" | paste -sd,))" [ -z "$missing" ]
mk -- ; check "make alone prints the same help" cmp -s "$work/out" "$work/help"
check "make help shows the branch's ENV and STACK" has "ENV=$env_name STACK=$stack"

# --- 2. build, second build, push -------------------------------------------------------------
mk -- build; rc=$?
check "make build ($hash1) succeeds" [ "$rc" = 0 ]
id1=$(image_id "$image:$hash1")
check "make build tags $image:$hash1" [ -n "$id1" ]
check "make build tags $image:$env_name the same image" eval '[ -n "$id1" ] && [ "$(image_id "$image:$env_name")" = "$id1" ]'
check "make build prints the docker commands" has "docker tag $image:$hash1 $image:$env_name"

echo "make-check $run" >>"$clone/app/README.md"
git -C "$clone" commit -q -am "make-check: a second commit"
hash2=$(git -C "$clone" rev-parse --short HEAD)
mk -- build; rc=$?
id2=$(image_id "$image:$hash2")
check "second make build ($hash2) succeeds with a new image" eval '[ "$rc" = 0 ] && [ -n "$id2" ] && [ "$id2" != "$id1" ]'
check "the branch tag moved to the new image" [ "$(image_id "$image:$env_name")" = "$id2" ]
check "the first hash tag stayed on the first image" [ "$(image_id "$image:$hash1")" = "$id1" ]
check "the image is labelled with its commit and branch" \
  [ "$(docker image inspect -f '{{index .Config.Labels "skiff.commit"}} {{index .Config.Labels "skiff.branch"}}' "$image:$hash2")" = "$hash2 $branch" ]

mk -- push; rc=$?
tags=$(registry_tags)
check "make push succeeds" [ "$rc" = 0 ]
check "the registry lists $hash2 and $env_name ($tags)" \
  bash -c '[[ $1 == *"\"$2\""* && $1 == *"\"$3\""* ]]' _ "$tags" "$hash2" "$env_name"
local_digest=$(docker image inspect -f '{{join .RepoDigests " "}}' "$image:$hash2")
pushed_digest=$(registry_digest "$env_name")
check "the registry's $env_name is the pushed $hash2 image ($pushed_digest)" \
  bash -c '[ -n "$2" ] && [[ " $1 " == *"@$2 "* ]]' _ "$local_digest" "$pushed_digest"
check "the registry's $hash2 and $env_name are one manifest" [ "$(registry_digest "$hash2")" = "$pushed_digest" ]

# --- 3. dirty tree ----------------------------------------------------------------------------
echo "# make-check: uncommitted" >>"$clone/app/web.py"
mk -- build; rc=$?
check "make build refuses a modified app/ (exit $rc)" [ "$rc" != 0 ]
check "the refusal says why and how to override" eval 'has "uncommitted changes" && has "ALLOW_DIRTY=1" && has "app/web.py"'
check "the refused build tagged nothing" \
  eval '[ "$(image_id "$image:$hash2")" = "$id2" ] && [ "$(image_id "$image:$env_name")" = "$id2" ]'
check "the refused build did not run docker" bash -c '! grep -q "^docker build" "$1"' _ "$work/out"
mk -- build ALLOW_DIRTY=1; rc=$?
# shellcheck disable=SC2034  # read by the eval below
id3=$(image_id "$image:$env_name")
check "ALLOW_DIRTY=1 make build builds the modified app/" eval '[ "$rc" = 0 ] && [ -n "$id3" ] && [ "$id3" != "$id2" ]'
git -C "$clone" checkout -q -- app/web.py

# --- 4. no AWS credentials -----------------------------------------------------------------------
fast() { # name, seconds it took, exit status, text the output must have
  check "$1 fails (exit $3)" [ "$3" != 0 ]
  check "$1 fails fast ($2 s)" [ "$2" -le 20 ]
  check "$1 names what to set" has "$4"
}
for cli in "$aws_cli" /nonexistent/aws; do
  what=$([ "$cli" = "$aws_cli" ] && echo "with the AWS CLI" || echo "without an AWS CLI")
  t=$SECONDS; mk -- create-stack AWS="$cli"; rc=$?
  fast "create-stack without credentials, $what" $((SECONDS - t)) "$rc" "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
  t=$SECONDS; mk TAG=abc1234 -- update-stack AWS="$cli" CTL="$ctl"; rc=$?
  fast "TAG=abc1234 update-stack without credentials, $what" $((SECONDS - t)) "$rc" "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
  check "update-stack without credentials, $what, never ran ctl" bash -c '! grep -q "release --tag" "$1"' _ "$work/out"
done
mk -- update-stack AWS="$aws_cli" CTL="$ctl"; rc=$?
check "update-stack without TAG fails (exit $rc)" [ "$rc" != 0 ]
check "update-stack without TAG says TAG is required" has "pass TAG=<image tag>"
# TRUSTED_KEYS (issue 20): a file that is not a set of PEM public keys is refused before any AWS
# call, saying what it holds.
openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl pkey -out "$work/signing.pem" 2>/dev/null
openssl pkey -in "$work/signing.pem" -pubout -out "$work/trusted.pem" 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl pkey -pubout 2>/dev/null >>"$work/trusted2.pem"
cat "$work/trusted.pem" "$work/trusted2.pem" >"$work/trusted-both.pem"
echo "not a key" >"$work/not-a-key.pem"
head -n 2 "$work/trusted.pem" >"$work/cut.pem"
for bad in "not-a-key.pem:not part of a PEM public key" "signing.pem:holds a private key" \
           "cut.pem:a key without its END line" "missing.pem:no such readable file"; do
  file=${bad%%:*} want=${bad#*:}
  for target in create-stack "update-stack TAG=abc1234"; do
    # shellcheck disable=SC2086 # the target and its variable
    mk -- $target AWS="$aws_cli" CTL="$ctl" TRUSTED_KEYS="$work/$file"; rc=$?
    check "${target%% *} TRUSTED_KEYS=$file is refused (exit $rc), saying: $want" eval '[ "$rc" != 0 ] && has "$want"'
    check "... before any AWS call" bash -c '! grep -q "AWS identity\|no usable AWS credentials" "$1"' _ "$work/out"
  done
done
# make sign (issue 20): the pushed image (named as push names it: no stack needed), signed with
# the key file in cosign's format beside it in the registry.
mk -- sign CTL="$ctl"; rc=$?
check "make sign without a key is refused (exit $rc), saying what to pass" \
  eval '[ "$rc" != 0 ] && has "pass SIGNING_KEY=" && has "SIGNING_KMS_KEY="'
mk -- sign CTL="$ctl" SIGNING_KEY="$work/signing.pem"; rc=$?
check "make sign SIGNING_KEY=<key file> signs $hash2 (exit $rc)" eval '[ "$rc" = 0 ] && has "signed "'
check "... the pushed image, not a stack's output" has "--image $registry/$repo_name sign --tag $hash2 --key-file"
check "... and the registry holds the signature (sha256-<digest>.sig)" \
  bash -c 'grep -q "sha256-${1#sha256:}.sig" <<<"$2"' _ "$pushed_digest" "$(registry_tags)"

# --- 5. update-stack through the real ctl, against moto and the local registry ----------------------
release_env=("${moto_env[@]}" SKIFF_PARAMETER="/skiff/$env_name/release" SKIFF_ASG="skiff-$env_name"
  SKIFF_IMAGE="$image")
mk "${release_env[@]}" TAG="$hash2" -- update-stack AWS="$aws_cli" CTL="$ctl" CTL_FLAGS=--dry-run; rc=$?
check "TAG=$hash2 update-stack CTL_FLAGS=--dry-run succeeds (exit $rc)" [ "$rc" = 0 ]
check "update-stack shows the ctl command" has "[make] $ctl  release --tag $hash2 --dry-run"
check "ctl resolved $hash2 to the pushed digest" has "$pushed_digest"
env -i PATH="$PATH" HOME="$home" "${release_env[@]}" "$ctl" release --tag nosuchtag --dry-run >/dev/null 2>&1
ctl_rc=$?
mk "${release_env[@]}" TAG=nosuchtag -- update-stack AWS="$aws_cli" CTL="$ctl" CTL_FLAGS=--dry-run; rc=$?
check "a tag not in the registry: ctl fails (exit $ctl_rc), so does make (exit $rc)" eval '[ "$ctl_rc" != 0 ] && [ "$rc" != 0 ]'
check "a tag not in the registry: make shows ctl's error" has "nosuchtag"
mk "${release_env[@]}" TAG=nosuchtag -- update-stack AWS="$aws_cli" CTL="$ctl" CTL_FLAGS=--dry-run CTL_EXIT_FILE="$work/ctl-exit"
check "CTL_EXIT_FILE holds ctl's own exit code ($(cat "$work/ctl-exit" 2>&1), ctl $ctl_rc) for Jenkins" \
  [ "$(cat "$work/ctl-exit" 2>&1)" = "$ctl_rc" ]

# --- 6. create-stack against moto ----------------------------------------------------------------
vpc=$(maws ec2 create-vpc --cidr-block 10.78.0.0/16 --query Vpc.VpcId)
cleanup_moto+=("maws ec2 delete-vpc --vpc-id $vpc")
subnets=()
for i in 0 1 2 3; do
  zone=us-east-1$([ $((i % 2)) = 0 ] && echo a || echo b)
  sid=$(maws ec2 create-subnet --vpc-id "$vpc" --cidr-block "10.78.$i.0/24" --availability-zone "$zone" --query Subnet.SubnetId)
  subnets+=("$sid"); cleanup_moto+=("maws ec2 delete-subnet --subnet-id $sid")
done
cert=$(maws acm request-certificate --domain-name "$env_name.skiff.example.com" --query CertificateArn)
cleanup_moto+=("maws acm delete-certificate --certificate-arn $cert")
db_secret=$(maws secretsmanager create-secret --name "skiff-make-check-$run-db" --secret-string '{"username":"skiff"}' --query ARN)
cleanup_moto+=("maws secretsmanager delete-secret --secret-id $db_secret --force-delete-without-recovery")
ami=$(maws ec2 describe-images --owners amazon --query 'Images[0].ImageId')
# templates/app.yaml is over the 51,200 bytes CloudFormation takes inline: deploy goes through S3.
template_bucket=skiff-make-check-$run-templates
maws s3 mb "s3://$template_bucket" >/dev/null
cleanup_moto+=("maws s3 rb s3://$template_bucket --force")
parameter=/skiff/$env_name/release
cleanup_moto+=("maws ssm delete-parameter --name $parameter")
cleanup_moto+=("maws cloudformation delete-stack --stack-name $stack")
create_stack() { # more variables...
  mk "${moto_env[@]}" -- create-stack AWS="$aws_cli" VPC_ID="$vpc" PUBLIC_SUBNETS="${subnets[0]},${subnets[1]}" \
    PRIVATE_SUBNETS="${subnets[2]},${subnets[3]}" CERTIFICATE_ARN="$cert" AMI_ID="$ami" \
    DATABASE_HOST=db.make-check.internal DATABASE_SECRET_ARN="$db_secret" TEMPLATE_BUCKET="$template_bucket" "$@"
}
release_value() { maws ssm get-parameter --name "$parameter" --query Parameter.Value 2>&1; }
stack_status() { maws cloudformation describe-stacks --stack-name "$stack" --query 'Stacks[0].StackStatus' 2>&1; }
delete_stack() {
  maws cloudformation delete-stack --stack-name "$stack" >"$work/out" 2>&1
  gone=$(stack_status | tr -s '\n' ' ' | sed 's/^ *//; s/ *$//')
  check "the stack is deleted ($gone)" bash -c '[[ $1 == DELETE_COMPLETE || $1 == *"does not exist"* ]]' _ "$gone"
}
create_stack; rc=$?
check "make create-stack creates $stack in moto (exit $rc)" [ "$rc" = 0 ]
check "create-stack creates the release parameter first, with this commit" has "created the release parameter $parameter = $hash2"
check "create-stack passes the existing database to the stack" has "DatabaseHost=db.make-check.internal"
status=$(stack_status)
check "the stack is complete ($status)" [ "$status" = CREATE_COMPLETE ]
# moto 5 computes no outputs for a stack made from a change set (`aws cloudformation deploy`);
# the emulator does (testbed/emulator/cloudformation.py), and ctl reading them through make is proven in
# the fleet box (testbed/fleet/branch.sh). An update-stack afterwards fails in moto (it cannot find
# the group the change set made); here, what the stack built is read from its resources.
maws cloudformation describe-stack-resources --stack-name "$stack" \
  --query 'StackResources[].[LogicalResourceId,ResourceType,PhysicalResourceId]' >"$work/resources" 2>&1
resource() { awk -v k="$1" '$1 == k { print $3 }' "$work/resources"; }
check "the release parameter is not a resource of the stack" bash -c '! grep -q "AWS::SSM::Parameter" "$1"' _ "$work/resources"
check "the stack's Auto Scaling Group is skiff-$env_name" [ "$(resource AutoScalingGroup)" = "skiff-$env_name" ]
check "the stack has its load balancer, target group, launch template and deployer policy" \
  eval '[ -n "$(resource LoadBalancer)" ] && [ -n "$(resource TargetGroup)" ] && [ -n "$(resource LaunchTemplate)" ] && [ -n "$(resource DeployerPolicy)" ]'
release=$(release_value)
check "the first release is $hash2 ($release)" [ "$release" = "$hash2" ]
delete_stack
release=$(release_value)
check "deleting the stack leaves the release parameter ($release)" [ "$release" = "$hash2" ]

# What ctl release does: write the parameter. A later create-stack must keep it, and say so.
maws ssm put-parameter --name "$parameter" --type String --overwrite --value "rel$run" >/dev/null 2>&1
create_stack; rc=$?
check "make create-stack over an existing release parameter succeeds (exit $rc)" [ "$rc" = 0 ]
check "create-stack says it kept the release value" has "exists: kept its value rel$run"
release=$(release_value)
check "the release ctl wrote survives create-stack ($release)" [ "$release" = "rel$run" ]
delete_stack

# TRUSTED_KEYS (issue 20): the stack keeps both keys in /skiff/<env>/trusted-keys.
create_stack TRUSTED_KEYS="$work/trusted-both.pem"; rc=$?
check "make create-stack TRUSTED_KEYS=<two keys> (exit $rc)" [ "$rc" = 0 ]
check "... says the hosts will run only signed images, and shows no key in the command" \
  eval 'has "run only images signed by a key of" && has "TrustedKeys=<2 key(s) of" && ! has "BEGIN PUBLIC KEY-----"'
keys=$(maws ssm get-parameter --name "/skiff/$env_name/trusted-keys" --query Parameter.Value 2>&1)
check "the stack's /skiff/$env_name/trusted-keys holds both keys" \
  bash -c '[ "$(grep -c "BEGIN PUBLIC KEY" <<<"$1")" = 2 ] && grep -qF -- "$2" <<<"$1"' _ "$keys" "$(sed -n 2p "$work/trusted2.pem")"
delete_stack
gone=$(maws ssm get-parameter --name "/skiff/$env_name/trusted-keys" 2>&1)
check "deleting the stack deletes its trusted keys ($gone)" bash -c '[[ $1 == *ParameterNotFound* ]]' _ "$gone"

# --- 7. a stack from before, which owned the release parameter ------------------------------------
# Its update to today's template deletes the ReleaseParameter resource and with it the parameter
# (CloudFormation deletes what leaves a template; moto too): create-stack must put the value back.
maws ssm delete-parameter --name "$parameter" >/dev/null 2>&1
cat >"$work/old-app.yaml" <<'EOF'
Parameters:
  Environment: { Type: String }
  InitialTag: { Type: String }
Resources:
  ReleaseParameter:
    Type: AWS::SSM::Parameter
    Properties:
      Name: !Sub /skiff/${Environment}/release
      Type: String
      Value: !Ref InitialTag
EOF
maws cloudformation create-stack --stack-name "$stack" --template-body "file://$work/old-app.yaml" \
  --parameters ParameterKey=Environment,ParameterValue="$env_name" ParameterKey=InitialTag,ParameterValue="old$run" >/dev/null 2>&1
maws ssm put-parameter --name "$parameter" --type String --overwrite --value "live$run" >/dev/null 2>&1
release=$(release_value)
check "a stack from before owns the release parameter (now live$run: $release)" [ "$release" = "live$run" ]
create_stack; rc=$?
check "make create-stack updates it to today's template (exit $rc)" [ "$rc" = 0 ]
check "create-stack says it puts the owned value back" has "its value live$run is put back afterwards"
check "create-stack put it back" has "put the release parameter $parameter back: live$run"
release=$(release_value)
check "the live release survives the migration ($release)" [ "$release" = "live$run" ]
maws cloudformation describe-stack-resources --stack-name "$stack" \
  --query 'StackResources[].[LogicalResourceId,ResourceType,PhysicalResourceId]' >"$work/resources" 2>&1
check "the stack no longer owns it" bash -c '! grep -q "AWS::SSM::Parameter" "$1"' _ "$work/resources"
check "the stack now has today's resources" eval '[ -n "$(resource AutoScalingGroup)" ] && [ -n "$(resource DeployerPolicy)" ]'
delete_stack

# --- 8. delete-stack ---------------------------------------------------------------------------------
mk "${moto_env[@]}" -- stack-status AWS="$aws_cli"; rc=$?
check "make stack-status of a deleted stack prints NONE (exit $rc)" eval '[ "$rc" = 0 ] && grep -qx NONE "$work/out"'
create_stack; rc=$?
check "make create-stack for the delete-stack checks (exit $rc)" [ "$rc" = 0 ]
mk "${moto_env[@]}" -- stack-status AWS="$aws_cli"; rc=$?
check "make stack-status prints CREATE_COMPLETE (exit $rc)" eval '[ "$rc" = 0 ] && grep -qx CREATE_COMPLETE "$work/out"'
mk "${moto_env[@]}" -- integration AWS="$aws_cli" WAIT=1; rc=$?
check "make integration without URL checks the stack's LoadBalancerDNS (no such host in moto: exit $rc)" \
  eval '[ "$rc" != 0 ] && has "checking $stack at https://"'
for p in release-lock env/DB_FLAG env/nested/KEY; do
  maws ssm put-parameter --name "/skiff/$env_name/$p" --type String --value "x$run" >/dev/null 2>&1
done
# One the stack does not own (made by hand, or kept by an older template): the stack's delete
# leaves it, make delete-stack must not.
maws logs create-log-group --log-group-name "/skiff/$env_name/leftover" >/dev/null 2>&1
cleanup_moto+=("maws logs delete-log-group --log-group-name /skiff/$env_name/leftover")
neighbour=/skiff/${env_name}x/release
maws ssm put-parameter --name "$neighbour" --type String --value "keep$run" >/dev/null 2>&1
cleanup_moto+=("maws ssm delete-parameter --name $neighbour")
params() { maws ssm get-parameters-by-path --path "/skiff/$env_name/" --recursive --query 'Parameters[].Name' 2>&1 | tr -s '\t' '\n' | sed '/^$/d' | sort; }
log_groups() { maws logs describe-log-groups --log-group-name-prefix "/skiff/$env_name/" --query 'logGroups[].logGroupName' 2>&1 | tr -s '\t' '\n' | sed '/^$/d'; }
check "before: four parameters of $env_name ($(params | paste -sd' '))" [ "$(params | wc -l)" = 4 ]
check "before: the stack's log group and the leftover ($(log_groups | paste -sd' '))" \
  [ "$(log_groups | sort | paste -sd' ')" = "/skiff/$env_name/app /skiff/$env_name/leftover" ]

mk "${moto_env[@]}" -- delete-stack AWS="$aws_cli"; rc=$?
check "delete-stack without FORCE=1 and without a terminal refuses (exit $rc)" [ "$rc" != 0 ]
check "... saying to pass FORCE=1" has "pass FORCE=1"
check "... and deletes nothing (stack $(stack_status), $(params | wc -l) parameters)" \
  eval '[ "$(stack_status)" = CREATE_COMPLETE ] && [ "$(params | wc -l)" = 4 ] && [ -n "$(log_groups)" ]'
mk "${moto_env[@]}" -- delete-stack AWS="$aws_cli" BRANCH=master FORCE=1; rc=$?
check "delete-stack of master refuses even with FORCE=1 (exit $rc)" eval '[ "$rc" != 0 ] && has "CONFIRM_PROTECTED=master"'
check "... before any AWS call" bash -c '! grep -q "AWS identity" "$1"' _ "$work/out"
mk "${moto_env[@]}" -- delete-stack AWS="$aws_cli" FORCE=1 DELETE_TIMEOUT=abc; rc=$?
check "delete-stack with a bad DELETE_TIMEOUT refuses (exit $rc)" eval '[ "$rc" != 0 ] && has "DELETE_TIMEOUT=abc: expected whole seconds"'

t=$SECONDS; mk "${moto_env[@]}" -- delete-stack AWS="$aws_cli" FORCE=1; rc=$?
check "FORCE=1 make delete-stack succeeds (exit $rc, $((SECONDS - t)) s)" [ "$rc" = 0 ]
check "... and says what it deleted" eval 'has "stack $stack deleted" && has "deleted 4 parameter(s)" && has "deleted log group /skiff/$env_name/leftover" && has "nothing of $env_name is left"'
gone=$(stack_status | tr -s '\n' ' ' | sed 's/^ *//; s/ *$//')
check "the stack is gone ($gone)" bash -c '[[ $1 == DELETE_COMPLETE || $1 == *"does not exist"* ]]' _ "$gone"
check "no parameter under /skiff/$env_name/ is left ($(params | paste -sd' '))" [ -z "$(params)" ]
check "no log group under /skiff/$env_name/ is left ($(log_groups))" [ -z "$(log_groups)" ]
check "the neighbour's $neighbour stays" [ "$(maws ssm get-parameter --name "$neighbour" --query Parameter.Value 2>&1)" = "keep$run" ]
mk "${moto_env[@]}" -- delete-stack AWS="$aws_cli" FORCE=1; rc=$?
check "a second FORCE=1 delete-stack is a no-op (exit $rc)" eval '[ "$rc" = 0 ] && has "does not exist" && has "deleted 0 parameter(s)"'

echo "make: $passed passed, $failed failed ($((SECONDS - started)) s)"
((failed == 0))
