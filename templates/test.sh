#!/usr/bin/env bash
# Proves the CloudFormation templates: cfn-lint (no errors, no warnings), checkov (no failed
# check; each skip is justified next to it), then test_stacks.py, which creates, updates and
# deletes both stacks in the moto server and checks what they build, running the agent
# (AGENT_BIN, else built here with cargo) on every agent config the user data writes.
#
# Needs what .ci/setup.sh provides (venv-lint, venv-moto, moto on 127.0.0.1:5055); runs it when
# any of that is missing. Closes with 'N passed, N failed' over all checks; exits 1 on a failure.
# Environment: SKIFF_CI_HOME (default /var/lib/skiff-ci), MOTO_ENDPOINT (default
# http://127.0.0.1:5055).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
ci_home=${SKIFF_CI_HOME:-/var/lib/skiff-ci}
lint="$ci_home/venv-lint/bin"
moto="$ci_home/venv-moto/bin"
export MOTO_ENDPOINT=${MOTO_ENDPOINT:-http://127.0.0.1:5055}
templates=("$here/app.yaml" "$here/database.yaml")

if [ ! -x "$lint/cfn-lint" ] || [ ! -x "$lint/checkov" ] || [ ! -x "$moto/python" ] ||
  ! curl -fs -o /dev/null -m 2 "$MOTO_ENDPOINT/moto-api/"; then
  echo "[templates] tools or moto missing: running .ci/setup.sh"
  bash "$root/.ci/setup.sh" || { echo "[templates] setup failed"; echo "0 passed, 1 failed"; exit 1; }
fi

passed=0
failed=0
step() { # name, command...
  local name=$1 start=$SECONDS
  shift
  if "$@"; then
    passed=$((passed + 1)); echo "ok   $name ($((SECONDS - start)) s)"
  else
    failed=$((failed + 1)); echo "FAIL $name ($((SECONDS - start)) s)"
  fi
}

for t in "${templates[@]}"; do
  # Exit code 0 only when cfn-lint found neither errors nor warnings (informational is 8).
  step "cfn-lint $(basename "$t")" "$lint/cfn-lint" --format parseable -- "$t"
done

for t in "${templates[@]}"; do
  # --skip-download: no calls to the vendor's platform (this machine has no internet).
  step "checkov $(basename "$t")" "$lint/checkov" --quiet --compact --skip-download \
    --framework cloudformation -f "$t"
done

# test_stacks.py runs `agent check-config` on every agent config the user data generates: the
# agent is required, not optional. Built here (debug, incremental) unless AGENT_BIN names one;
# when the build fails, the checks that need it fail too.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/root/.cache/skiff-target}
build_agent() { (cd "$root" && cargo build -q --locked -p skiff-agent --bin agent); }
if [ -z "${AGENT_BIN:-}" ]; then
  before=$failed
  step "cargo build -p skiff-agent (the agent that checks the generated configs)" build_agent
  if [ "$failed" = "$before" ] && [ -x "$CARGO_TARGET_DIR/debug/agent" ]; then
    export AGENT_BIN=$CARGO_TARGET_DIR/debug/agent
  else
    export AGENT_BIN=/nonexistent/agent
  fi
fi

echo "[templates] stacks against moto at $MOTO_ENDPOINT (agent: $AGENT_BIN)"
start=$SECONDS
out=$(mktemp)
trap 'rm -f "$out"' EXIT
"$moto/python" "$here/test_stacks.py" 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$out" | tail -n1)
if [ -n "$summary" ]; then
  read -r p _ f _ <<<"$summary"
  passed=$((passed + p)); failed=$((failed + f))
fi
if [ "$rc" != 0 ] && { [ -z "$summary" ] || [ "${f:-0}" = 0 ]; }; then
  failed=$((failed + 1)); echo "FAIL test_stacks.py exited $rc"
fi
echo "[templates] stack tests took $((SECONDS - start)) s"

echo "templates: $passed passed, $failed failed"
[ "$failed" = 0 ]
