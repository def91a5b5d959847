#!/usr/bin/env bash
# Lints the repository's shell and Python: shellcheck on every shell script git tracks (*.sh,
# .ci/run, and any other file whose first line names bash or sh), ruff on every Python file
# with the rules of testbed/ruff.toml (pyflakes, pycodestyle's errors, bugbear).
# `make lint` and a step of .ci/test.sh run it. Needs shellcheck (Debian) and ruff in
# $SKIFF_CI_HOME/venv-ruff (both installed by .ci/setup.sh).
# Exit status: 0 clean, 1 with findings (each printed as file:line:column: message).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ruff=${SKIFF_CI_HOME:-/var/lib/skiff-ci}/venv-ruff/bin/ruff
say() { echo "[lint] $*"; }
command -v shellcheck >/dev/null || { say "shellcheck is missing: run .ci/setup.sh"; exit 1; }
[ -x "$ruff" ] || { say "ruff is missing ($ruff): run .ci/setup.sh"; exit 1; }

shell=() python=()
while IFS= read -r -d '' f; do
  [ -f "$f" ] || continue
  case $f in
    *.sh) shell+=("$f") ;;
    *.py) python+=("$f") ;;
    *) if head -n1 "$f" 2>/dev/null | grep -qE '^#!.*[/ ](bash|sh)([[:space:]]|$)'; then shell+=("$f"); fi ;;
  esac
done < <(git ls-files -z)

rc=0
say "shellcheck: ${#shell[@]} scripts"
shellcheck -x -f gcc "${shell[@]}" || rc=1
say "ruff: ${#python[@]} Python files"
"$ruff" check --no-cache --config testbed/ruff.toml --output-format concise "${python[@]}" || rc=1
((rc == 0)) && say "clean"
exit $rc
