#!/usr/bin/env python3
"""Release scenarios against the box (testbed/fleet/box.py) with the real ctl binary, under the
stack's deployer policy, while load.py sends a steady rate through the load balancer. The box's
stack trusts a key made at `box.py up` (TrustedKeys) and every image the box pushes is signed
with it (ctl sign --key-file): each release below is a signed one, checked by ctl and by every
agent before it creates a container.

    scenarios.py [--rate 20] [--keep]     # brings the box up when it is not; --keep leaves it up

  1  release:   ctl release --tag <new>: every instance replaced, parameter and history name
                the tag, the load balancer serves only it afterwards, 0 failed requests; wall
                time next to the model (template settings + boot delay)
  5  AWS away:  the emulator rejected from every instance for 30 s in steady state: nothing
                replaced, every target stays in, 0 failed requests
  2  unhealthy: a release whose image never passes /health: the launches are abandoned by the
                agents, ctl exits 1 (documented: failed, previous release back), the parameter
                and the fleet stay on the previous release, 0 failed requests
  7  rollback:  ctl rollback after the good release: back to the release before it, every
                instance replaced, 0 failed requests

  4  agent killed: ctl release while one new instance's agent is SIGKILLed as soon as it runs
                (systemd's restart modelled): released, 0 failed requests
  6  engine killed: one instance's Docker engine and everything it runs SIGKILLed (not
                restarted): the load balancer takes it out, the group (HealthCheckType ELB,
                after the grace period) marks it Unhealthy and replaces it; failed requests
                counted and bounded by the detection window
  3  scale-out: ctl release while the group's desired capacity goes n -> n+1 mid-refresh: the
                new instance boots on the release the parameter names, the release completes,
                0 failed requests; then back to n. Then an unsigned image (issue 20): ctl release
                exits 2, parameter unchanged; the parameter written to its digest with the
                deployer's keys (past ctl) and a scale-out: the new instance's agent refuses it
                (metric, skiff:failed), never in the load balancer; the n keep their release,
                0 failed; the instance terminated, the parameter written back

In place (issue 13; ctl release --strategy in-place; a watch follows every instance's skiff:*
tags, its agent's /status, the load balancer and Auto Scaling every 0.5 s; Auto Scaling acting
on any instance during a rollout fails the scenario):

  8  in-place release on n instances: 0 failed, every instance kept and on the new release,
                parameter on it; ctl's wall time next to the floor (the slowest pull, then per
                batch the slowest start-to-healthy, HealthyThresholdCount x interval, the drain
                and the bake)
  10 never healthy, in place: only the first batch told, its instance back in the load balancer
                on the previous release within 15 s of ctl's failure line, parameter on it, ctl
                exit 1, the bad release served nothing, 0 failed
  11 in-place rollback: ctl rollback --strategy in-place after 8: back, per batch time, 0 failed
  12 ctl SIGKILLed once the first batch switched: ctl status shows "1 of n"; ctl unlock --force;
                the same release again converges without switching the first instance again
  13 the parameter written without ctl while every agent runs update = "follow" with a 2 s
                poll: within 3 polls nothing swaps nor reads the parameter (boot only), each agent
                warned at start; then the template's config back. Then an unsigned image (issue
                20): ctl release --strategy in-place exits 2, no parameter or instance tag
                written; the parameter and every skiff:target written to its digest with the
                deployer's keys: each agent refuses it (skiff:failed, metric), keeps serving its
                release in the load balancer, 0 failed; then both written back
  9  in-place release after scaling the group to 2n (6 with the default 3): as 8
  14 refresh release on the 2n instances (bench only): the side by side at 2n

Handover (issue 17; on a box of their own: SwapMode handover, the graceful app; 200 requests/s
keep-alive, --handover-rate; each checks every target UP in HAProxy throughout, one container per
host and the redirect on it, Auto Scaling quiet, 0 failed requests):

  15 handover release on n instances: exit 0; ctl's wall time next to the floor (the slowest
                pull, per batch the slowest start-to-healthy and the bake, the last batch's hold)
  16 never passes its gate: only the canary told, ctl exit 1, the bad release served nothing
  17 fails 2 s after its gate: the canary's agent flips back by itself, ctl exit 1
  18 handover rollback after 15
  19 agents SIGKILLed mid-swap, one before the flip and one during the hold: exit 0
  20 ctl SIGTERMed once the canary runs the release: back on the previous one, exit 1
  21 handover release after scaling to 2n (bench only)

    scenarios.py --bench        # all of them, then tables: wall time per scenario, release time
                                # vs model, and both strategies side by side (wall, floor, ratio)
    scenarios.py --only 1,7     # a subset (in this order: 1 5 2 7 4 6 3 8 10 11 12 13 9 14, then
                                # on the handover box 15 16 17 18 19 20 21); default without
                                # --bench: all but 9, 14 and 21

Prints one line per scenario with its figures, then 'N passed, N failed'; exits 1 on a failure.
Tags are new per run (r<run>a, r<run>bad), so a leftover image or record cannot pass a check.

This file is the command line, the phases and the tables; the scenarios live by strategy in
refresh_scenarios.py (1-8), inplace_scenarios.py (10-14) and handover_scenarios.py (15-21), on the
shared machinery of scenario.py (Scenario, Watch, ctl runs, the load, the box's views).
"""

import argparse
import math
import os
import subprocess
import sys
import time
import box as fleet  # noqa: E402
import controller  # noqa: E402
import loadbalancer  # noqa: E402
import settings  # noqa: E402

from handover_scenarios import handover_agent_killed, HANDOVER_BENCH, handover_ctl_stopped, handover_failing, HANDOVER_LOAD, handover_release
from inplace_scenarios import INPLACE_BENCH, inplace_killed, inplace_release, inplace_rollback, inplace_unhealthy, uncoordinated
from refresh_scenarios import agent_killed, aws_away, engine_killed, release, rollback, scale_out, unhealthy
from scenario import BENCH, Dependencies, evidence, group, imds_delay, IMDS_DELAY, parameter, REFRESH_BENCH, results, RUN, scale_to, Scenario, settle
ALL = "1,5,2,7,4,6,3,8,10,11,12,13,9,14,15,16,17,18,19,20,21"
CI = "1,5,2,7,4,6,3,8,10,11,12,13,15,16,17,18,19,20"  # the default without --bench: not the 6-instance ones
HANDOVER = {"15", "16", "17", "18", "19", "20", "21"}  # on a box of their own (SwapMode handover)


def bench_table(box, warmup):
    s = box["settings"]
    print(f"\nbench: {box['params']['MinSize']} instances, boot delay {box['boot_delay']} s, warm-up {warmup} s, "
          f"drain {box['params']['DrainSeconds']} s, health check {s['interval']} s x {s['healthy']}/{s['unhealthy']},"
          f" grace {s['grace']} s")
    print(f"{'scenario':58} {'wall s':>7} {'refresh s':>10} {'model s':>8} {'over':>6}")
    for name, wall, rel, m in BENCH:
        over = f"{rel - m:+.1f}" if rel is not None and m is not None and not math.isnan(rel) else ""
        print(f"{name[:58]:58} {wall:7.1f} {'' if rel is None else f'{rel:.1f}':>10} "
              f"{'' if m is None else f'{m:.0f}':>8} {over:>6}")
    print("model = boot delay + warm-up + drain (one launch-before-terminate batch); 'over' = engine "
          "start, pull, app start, hook and poll latencies")


def scale_then(box, n, fn, number=9):
    """The group scaled to n (new instances boot on the parameter's release), settled, then fn."""
    sc_ok = scale_to(box, n)
    if not sc_ok:
        sc = Scenario(number, f"scale to {n}")
        sc.check(False, f"the group did not settle at {n}: {group(box)}, LB {loadbalancer.lb_up()}")
        sc.done()
        return None
    return fn()


def strategies_table(box, warmup):
    """Both strategies side by side in this box run: wall time (ctl's), floor, ratio, failed."""
    s = box["settings"]
    rows = [(f"refresh {name.split(' on ')[0]}", n, wall, model, failed) for name, n, wall, model, failed in REFRESH_BENCH]
    rows += [(what, n, wall, floor, failed) for what, n, wall, floor, failed, _ in INPLACE_BENCH]
    rows += [(what, n, wall, floor, failed) for what, n, wall, floor, failed, _ in HANDOVER_BENCH]
    if not rows:
        return
    print(f"\nstrategies: group HealthCheckType {box.get('asg_health_check', 'ELB (template)')}, "
          f"boot delay {box['boot_delay']} s, drain {box['params']['DrainSeconds']} s, health check "
          f"{s['interval']} s x {s['healthy']}/{s['unhealthy']}, refresh warm-up {warmup} s; "
          + (IMDS_DELAY[0] if IMDS_DELAY else "IMDS delay not measured"))
    print(f"{'strategy and release':44} {'inst':>4} {'wall s':>7} {'floor s':>8} {'ratio':>6} {'failed':>6}")
    for what, n, wall, floor, failed in rows:
        print(f"{what[:44]:44} {n:4d} {wall:7.1f} {'' if floor is None else f'{floor:.1f}':>8} "
              f"{'' if not floor else f'{wall / floor:.2f}':>6} {failed:6d}")
    print("wall = ctl's run; refresh floor = the model (boot delay + warm-up + drain, one launch-before-terminate"
          " batch); in-place floor = slowest pull + per batch (slowest start-to-healthy + HealthyThresholdCount x"
          " interval + drain + bake)")
    print("handover floor = slowest pull + per batch (slowest start-to-healthy + bake) + the last batch's hold beyond"
          f" the bake (ctl watches it): the target never changes state; handover load: "
          f"{HANDOVER_LOAD[0] if HANDOVER_LOAD else 'none'}")
    for what, n, _wall, _floor, _failed, terms in INPLACE_BENCH + HANDOVER_BENCH:
        print(f"  {what} ({n}): {terms}")
    wide = [r for r in rows if r[1] >= 6]
    if wide:
        print(f"\nside by side on {wide[0][1]} instances:")
        print(f"{'strategy':22} {'wall s':>7} {'floor s':>8} {'ratio':>6} {'failed':>6}")
        for what, _n, wall, floor, failed in wide:
            kind = "refresh" if what.startswith("refresh") else "handover" if what.startswith("handover") else "in place (drain)"
            print(f"{kind:22} {wall:7.1f} {'' if floor is None else f'{floor:.1f}':>8} "
                  f"{'' if not floor else f'{wall / floor:.2f}':>6} {failed:6d}")


def phase_box(phase):
    """The box for a phase: `drain` (scenarios 1-14: SwapMode drain, the busybox app) or
    `handover` (15-21: SwapMode handover, the graceful app). A box up with the same settings
    is kept; another is taken down first. Returns the box or None (and why)."""
    env = dict(os.environ, FLEET_SWAP_MODE=phase, FLEET_APP="busybox" if phase == "drain" else "graceful")
    box = settings.load_box()
    if box and controller.controller_alive():
        if box.get("app", "busybox") == env["FLEET_APP"] and box.get("swap_mode") in (phase, None):
            return box, None
        subprocess.run([sys.executable, fleet.__file__, "down"])
    rc = subprocess.run([sys.executable, fleet.__file__, "up"], env=env).returncode
    if rc != 0:
        return None, f"the box ({phase}) did not come up"
    box = settings.load_box()
    if phase == "handover" and box.get("swap_mode") != "handover":
        return None, (f"the stack's swap mode is {box.get('swap_mode')!r}: the template "
                      f"({settings.TEMPLATE}) has no SwapMode parameter yet, or another default")
    return box, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=20, help="requests per second through the LB")
    ap.add_argument("--handover-rate", type=float, default=200,
                    help="keep-alive requests per second through the LB in the handover scenarios")
    ap.add_argument("--warmup", type=int, default=None,
                    help="ctl --warmup seconds (default: the target group's HealthyThresholdCount x "
                         "interval + 2, the time a new target needs before it serves)")
    ap.add_argument("--keep", action="store_true", help="leave the box up afterwards")
    ap.add_argument("--bench", action="store_true", help="print wall and release times vs the model")
    ap.add_argument("--only", default=None, help=f"scenarios to run (run in the order {ALL.replace(',', ' ')}; "
                    f"default {CI}, with --bench all)")
    a = ap.parse_args()
    a.only = a.only or (ALL if a.bench else CI)
    only = set(a.only.replace(" ", "").split(","))
    if not only <= set(ALL.split(",")) or not only:
        ap.error(f"--only takes scenario numbers 1..21 separated by commas, not {a.only!r}")
    if "14" in only and "9" not in only:
        ap.error("scenario 14 releases on the 6 instances of scenario 9: add 9 to --only")
    if only & {"2", "7"} and "1" not in only:
        ap.error("scenarios 2 and 7 follow scenario 1's release: add 1 to --only")
    if "11" in only and "8" not in only:
        ap.error("scenario 11 rolls back scenario 8's release: add 8 to --only")
    if "18" in only and "15" not in only:
        ap.error("scenario 18 rolls back scenario 15's release: add 15 to --only")
    started = time.monotonic()
    watch = Dependencies().start()
    box = None
    try:
        for phase, numbers in (("drain", only - HANDOVER), ("handover", only & HANDOVER)):
            if not numbers:
                continue
            box, why = phase_box(phase)
            if not box:
                print(f"scenarios: {why}: scenarios {' '.join(sorted(numbers, key=int))} not run", file=sys.stderr)
                results.extend([False] * len(numbers))
                continue
            run_phase(box, phase, numbers, a)
    except Exception as e:
        import traceback

        traceback.print_exc()
        results.append(False)
        print(f"scenarios: stopped by {type(e).__name__}: {e}")
    finally:
        outages = watch.stop()
        if outages:
            print("scenarios: the box's dependencies were down during the run: " + "; ".join(outages))
        if not all(results):
            evidence()
        if not a.keep:
            subprocess.run([sys.executable, fleet.__file__, "down"])
    ok = sum(results)
    if a.bench and BENCH:
        bench_table(box or {}, a.warmup)
    if a.bench and box:
        strategies_table(box, a.warmup)
    print(f"{ok} passed, {len(results) - ok} failed ({time.monotonic() - started:.0f} s in all)")
    return 0 if results and all(results) else 1


def run_phase(box, phase, only, a):
    n = int(box["params"]["MinSize"])
    if a.warmup is None:
        # Launch before terminate: the old instances start draining once the new ones are warm.
        # A warm-up shorter than the new targets' first HealthyThresholdCount checks leaves the
        # load balancer with nothing to send to (measured: failed requests); ctl's default, 30 s,
        # covers the template's 2 x 5 s.
        a.warmup = box["settings"]["healthy"] * box["settings"]["interval"] + 2
    if not settle(box, n, 60):
        raise RuntimeError(f"the box ({phase}) is not settled ({group(box)}); `box.py down` and retry")
    previous = parameter(box)[0]
    good, bad = f"r{RUN}a", f"r{RUN}bad"
    hr = a.handover_rate
    plan = [("1", lambda: release(box, a.rate, good, n, a.warmup)),
            ("5", lambda: aws_away(box, a.rate, n)),
            ("2", lambda: unhealthy(box, a.rate, good, bad, n, a.warmup)),
            ("7", lambda: rollback(box, a.rate, previous, n, a.warmup)),
            ("4", lambda: agent_killed(box, a.rate, f"r{RUN}k", n, a.warmup)),
            ("6", lambda: engine_killed(box, a.rate, n)),
            ("3", lambda: scale_out(box, a.rate, f"r{RUN}s", n, a.warmup)),
            ("8", lambda: inplace.update(before=inplace_release(box, a.rate, f"r{RUN}i", n, 8))),
            ("10", lambda: inplace_unhealthy(box, a.rate, f"r{RUN}ibad", n)),
            ("11", lambda: inplace_rollback(box, a.rate, inplace["before"], n)),
            ("12", lambda: inplace_killed(box, a.rate, f"r{RUN}ik", n)),
            ("13", lambda: uncoordinated(box, a.rate, f"r{RUN}iu", n)),
            ("9", lambda: scale_then(box, 2 * n, lambda: inplace_release(box, a.rate, f"r{RUN}i6", 2 * n, 9))),
            ("14", lambda: release(box, a.rate, f"r{RUN}r6", 2 * n, a.warmup, number=14)),
            ("15", lambda: inplace.update(hbefore=handover_release(box, hr, f"r{RUN}h", n, 15))),
            ("16", lambda: handover_failing(box, hr, f"r{RUN}hbad", n, 16)),
            ("17", lambda: handover_failing(box, hr, f"r{RUN}hlate", n, 17, fail_after=2)),
            ("18", lambda: handover_release(box, hr, None, n, 18, rollback_to=inplace["hbefore"])),
            ("19", lambda: handover_agent_killed(box, hr, f"r{RUN}hk", n)),
            ("20", lambda: handover_ctl_stopped(box, hr, f"r{RUN}ht", n)),
            ("21", lambda: scale_then(box, 2 * n, lambda: handover_release(box, hr, f"r{RUN}h6", 2 * n, 21), 21))]
    inplace = {}
    if only & {"8", "9", "10", "11", "12", "13"}:
        IMDS_DELAY[:] = [imds_delay(box)]
        print(IMDS_DELAY[0], flush=True)
    for number, run_scenario in plan:
        if number not in only:
            continue
        # What the box depends on and does not run itself (the registries of setup.sh):
        # restarted through setup.sh when down, and said so, never silently.
        restarted = fleet.ensure_dependencies()
        if restarted:
            print(f"scenarios: before scenario {number}: restarted by .ci/setup.sh: {'; '.join(restarted)}",
                  flush=True)
        run_scenario()


if __name__ == "__main__":
    sys.exit(main())
