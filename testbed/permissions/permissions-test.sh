#!/usr/bin/env bash
# Permissions proven by running (issue 7): the real agent and ctl under the roles and policies the
# app stack creates, against the IAM-enforcing emulator on 127.0.0.1:5056 (.ci/setup.sh starts it),
# plus the emulator's own tests (policy and refresh tables, the Auto Scaling extensions through
# the API). Details: testbed/permissions/permissions_test.py, testbed/emulator/README.md. Builds the debug agent and
# ctl first (a no-op when they are current).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/root/.cache/skiff-target}
py=${SKIFF_CI_HOME:-/var/lib/skiff-ci}/venv-moto/bin/python
cargo build -q --locked -p skiff-agent -p skiff-ctl
rc=0
"$py" testbed/emulator/policy_test.py || rc=1
"$py" testbed/emulator/emulator_test.py || rc=1
"$py" testbed/emulator/kms_test.py || rc=1
"$py" testbed/emulator/limits_test.py || rc=1
"$py" testbed/emulator/identity_test.py || rc=1
"$py" testbed/permissions/permissions_test.py || rc=1
exit $rc
