#!/usr/bin/env bash
# The whole test suite: `make test` runs this, `.ci/run` runs `make test`.
# Installs and starts what the tests need (.ci/setup.sh, idempotent), then:
#   lint: shellcheck on every shell script, ruff on every Python file (testbed/checks/lint.sh);
#   Rust: fmt check, clippy -D warnings, unit + integration tests (real Docker engine,
#         real local registry, moto for AWS, HAProxy for the drain protocol);
#   app/: unit tests on sqlite and a throwaway MariaDB, and the image built and run; the
#         integration checks (make integration) against two app processes behind HAProxy;
#   templates/: cfn-lint, checkov, create/update/delete in moto;
#   permissions: the agent and ctl under the stack's own roles and policies, IAM enforced (:5056);
#   simulation: 250 simulated hosts and the real ctl against AWS's request limits (testbed/sim);
#   packer/: validate, and the provisioning run with the docker builder;
#   Jenkinsfiles: parsed by Groovy, their paths run against a model of Jenkins;
#   Makefile: its targets against moto (create-stack, delete-stack, ...);
#   the fleet box (testbed/fleet): the release scenarios with the real agent and ctl (a box that
#         swaps by drain, then one that swaps by handover), up and down;
#         the branch flow through the Makefile with the real app (create-stack .. delete-stack).
# Ends with one line "tests: N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/root/.cache/skiff-target}
export CARGO_TERM_COLOR=never
# No incremental caches: every fresh clone is a new path whose caches the shared target dir
# keeps (33 GB of them filled this machine's disk once); a clean build gains nothing from them.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

bash .ci/setup.sh || { echo "tests: 0 passed, 1 failed (setup)"; exit 1; }

# Leftovers of interrupted earlier runs: test containers are named and labelled skiff-it-*.
mapfile -t leftovers < <(docker ps -aq --filter name=skiff-it- 2>/dev/null || true)
if ((${#leftovers[@]})); then docker rm -f "${leftovers[@]}" >/dev/null 2>&1 || true; fi

passed=0; failed=0; failures=()
step() { # name, command...
  local name=$1; shift
  local start=$SECONDS
  printf '\n=== %s\n' "$name"
  if "$@"; then
    passed=$((passed + 1)); printf '=== %s: ok (%ss)\n' "$name" $((SECONDS - start))
  else
    failed=$((failed + 1)); failures+=("$name"); printf '=== %s: FAILED (%ss)\n' "$name" $((SECONDS - start))
  fi
}

step "lint (shellcheck, ruff)" bash testbed/checks/lint.sh
step "cargo fmt --check" cargo fmt --all --check
step "cargo clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
step "cargo test" cargo test --workspace --locked --no-fail-fast
step "agent release build" cargo build --release --locked -p skiff-agent
step "app unit tests (sqlite + MariaDB)" bash app/test.sh
step "app image" bash app/image-test.sh
step "app integration checks (make integration)" bash app/integration-test.sh
step "templates" bash templates/test.sh
step "permissions under enforced IAM" bash testbed/permissions/permissions-test.sh
step "simulation: 250 hosts and ctl under AWS's request limits (testbed/sim)" \
  "${SKIFF_CI_HOME:-/var/lib/skiff-ci}/venv-moto/bin/python" testbed/sim/sim.py --instances 250 --check \
  --ctl "$CARGO_TARGET_DIR/debug/ctl"
step "packer" env AGENT_BIN="$CARGO_TARGET_DIR/release/agent" bash packer/test.sh
step "Jenkinsfile" bash testbed/checks/jenkinsfile-check.sh
step "Makefile" bash testbed/checks/make-check.sh
step "fleet scenarios (refresh, in place by drain and by handover)" env SKIP_SETUP=1 bash testbed/fleet/fleet.sh scenarios
step "fleet branch flow (make create-stack, integration, releases, delete-stack)" env SKIP_SETUP=1 bash testbed/fleet/branch.sh

if [ -n "$(git status --porcelain 2>/dev/null)" ]; then
  echo "the tree is not clean after the tests:"; git status --short
  failed=$((failed + 1)); failures+=("clean tree")
else
  passed=$((passed + 1))
fi

((failed)) && printf 'failed: %s\n' "${failures[*]}"
echo "tests: $passed passed, $failed failed"
((failed == 0))
