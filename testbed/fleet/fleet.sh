#!/usr/bin/env bash
# The fleet in a box (testbed/fleet/box.py) from a fresh clone: setup, build, then the box.
#   fleet.sh up          # make fleet: .ci/setup.sh (idempotent), agent and ctl built, 3 instances up
#   fleet.sh down        # make fleet-down: nothing of the box left; safe to rerun
#   fleet.sh scenarios   # make fleet-scenarios: the release scenarios, refresh and in place (box
#                        # up, run, down); a step of .ci/test.sh; the box goes down even when a
#                        # scenario fails or the run outlives FLEET_TIMEOUT (1200 s), and down
#                        # checks nothing is left
#   fleet.sh bench       # make fleet-bench: every scenario (also in place, handover and a
#                        # refresh on 6 instances), then tables: wall time per scenario, release
#                        # vs model, the strategies side by side (wall, floor, ratio, failed
#                        # requests); FLEET_TIMEOUT 2400 s
# Env: FLEET_INSTANCES (3, at most 6), FLEET_BOOT_DELAY (2 s; 25 models AL2023's launch),
# FLEET_TAG (v1: the first release), SKIP_SETUP=1 to skip .ci/setup.sh, CARGO_TARGET_DIR.
# Extra arguments go to scenarios.py (--only 1,7, --rate 20, --warmup 5).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/root/.cache/skiff-target}
py=${SKIFF_CI_HOME:-/var/lib/skiff-ci}/venv-moto/bin/python
cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  up | scenarios | bench)
    [ "$(id -u)" = 0 ] || { echo "fleet: run as root (network namespaces, dockerd)" >&2; exit 1; }
    [ "${SKIP_SETUP:-}" = 1 ] || bash .ci/setup.sh
    cargo build -q --locked -p skiff-agent -p skiff-ctl
    if [ "$cmd" = up ]; then exec "$py" testbed/fleet/box.py up; fi
    [ "$cmd" = bench ] && set -- --bench "$@"
    rc=0
    # The bench runs two boxes (drain, then handover) and the 6-instance releases: longer.
    limit=${FLEET_TIMEOUT:-$([ "$cmd" = bench ] && echo 2400 || echo 1200)}
    # scenarios.py takes the box down itself; this is for a run that was killed or timed out.
    timeout -k 30 "$limit" "$py" testbed/fleet/scenarios.py "$@" || rc=$?
    [ "$rc" = 124 ] && echo "fleet: the scenarios outlived FLEET_TIMEOUT=$limit s" >&2
    "$py" testbed/fleet/box.py down >/dev/null || { "$py" testbed/fleet/box.py down; rc=1; }
    exit "$rc" ;;
  down)
    if [ -x "$py" ]; then exec "$py" testbed/fleet/box.py down; fi
    exec python3 testbed/fleet/box.py down ;;
  *) echo "usage: $0 up|down|scenarios|bench [scenarios.py options]" >&2; exit 64 ;;
esac
