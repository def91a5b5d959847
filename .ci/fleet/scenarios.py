#!/usr/bin/env python3
"""Release scenarios against the box (.ci/fleet/box.py) with the real ctl binary, under the
stack's deployer policy, while load.py sends a steady rate through the load balancer.

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

Prints one line per scenario with its figures, then 'N passed, N failed'; exits 1 on a failure.
Tags are new per run (r<run>a, r<run>bad), so a leftover image or record cannot pass a check.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import box as fleet  # noqa: E402
from load import Load  # noqa: E402

RUN = uuid.uuid4().hex[:6]
URL = f"http://127.0.0.1:{fleet.LB_PORT}/"
results = []
LAST_CTL = []


def evidence():
    """What to read when a scenario fails: the last ctl run, the controller's and emulator's
    last lines (the box goes down afterwards; its logs stay in /var/lib/skiff-fleet/logs)."""
    print("--- " + (LAST_CTL[0] if LAST_CTL else "no ctl run") + "\n" + (LAST_CTL[1][-3000:] if LAST_CTL else ""))
    for name in ("controller.log", "emulator.log"):
        try:
            with open(os.path.join(fleet.STATE, name)) as f:
                print(f"--- {name} (last 40 lines)\n" + "".join(f.readlines()[-40:]))
        except OSError:
            pass


class Scenario:
    def __init__(self, number, name):
        self.number, self.name, self.problems, self.figures = number, name, [], []

    def check(self, ok, what):
        if not ok:
            self.problems.append(what)
        return ok

    def done(self):
        ok = not self.problems
        results.append(ok)
        print(f"scenario {self.number} {self.name}: {'PASS' if ok else 'FAIL'}  " + "; ".join(self.figures)
              + ("" if ok else "  -- " + "; ".join(self.problems)), flush=True)


def ctl(box, *args, timeout=900):
    env = dict(os.environ, **fleet.ctl_env(box), BUILD_USER="fleet-scenarios")
    t0 = time.monotonic()
    p = subprocess.run([box["ctl"], *args], env=env, capture_output=True, text=True, timeout=timeout)
    LAST_CTL[:] = [f"ctl {' '.join(args)} (exit {p.returncode}, {time.monotonic() - t0:.1f} s)", p.stdout + p.stderr]
    return p.returncode, p.stdout + p.stderr, time.monotonic() - t0


def parameter(box):
    c = fleet.admin_clients(box)
    value = c("ssm").get_parameter(Name=box["outputs"]["ReleaseParameter"])["Parameter"]["Value"]
    try:
        return json.loads(value).get("tag"), value
    except ValueError:
        return value.strip(), value


def group(box):
    return fleet.Controller(box).states()


def settle(box, n, timeout=120):
    """Wait until the group has n instances, all InService, and the load balancer serves n."""
    return fleet.wait_until(lambda: (lambda s: len(s) == n and set(s.values()) == {"InService"}
                                     and len(fleet.lb_up()) == n)(group(box)), timeout, 1)


def served(n=12):
    """Releases the load balancer serves now, over n sequential requests."""
    load = Load(URL, 50).start()
    time.sleep(n / 50)
    return dict(load.stop().releases)


def model(box, warmup):
    """Launch-before-terminate (MaxHealthyPercentage 200) replaces the whole group in one batch:
    boot delay, then the warm-up after the launch hook, then the old instances' drain before
    their terminate hook; engine start, pull and app start come on top (measured: the rest)."""
    s = box["settings"]
    drain = int(box["params"]["DrainSeconds"])
    batches = 1 if s["max_healthy"] >= 200 else None
    return batches * (box["boot_delay"] + warmup + drain) if batches else None


def refresh_seconds(box):
    """StartTime to EndTime of the group's latest instance refresh."""
    c = fleet.admin_clients(box)
    r = c("autoscaling").describe_instance_refreshes(
        AutoScalingGroupName=box["outputs"]["AutoScalingGroup"])["InstanceRefreshes"][0]
    return (r["EndTime"] - r["StartTime"]).total_seconds() if r.get("EndTime") else float("nan")


def with_load(box, rate, fn):
    load = Load(URL, rate).start()
    try:
        out = fn()
    finally:
        time.sleep(1)
        counts = load.stop()
    return out, counts


def release(box, rate, tag, n, warmup):
    sc = Scenario(1, f"release {parameter(box)[0]} -> {tag}")
    fleet.push_image(tag)
    before = set(group(box))
    (rc, out, took), counts = with_load(box, rate, lambda: ctl(box, "release", "--tag", tag, "--warmup", f"{warmup}s",
                                                               "--timeout", "10m"))
    sc.check(rc == 0, f"ctl exit {rc}: {out.strip()[-400:]}")
    sc.check(parameter(box)[0] == tag, f"parameter holds {parameter(box)[1]}")
    hrc, hist, _ = ctl(box, "history")
    sc.check(hrc == 0 and tag in hist, f"history (exit {hrc}) lacks {tag}: {hist.strip()[-300:]}")
    sc.check(settle(box, n), f"group not back to {n} InService behind the LB: {group(box)}")
    after = set(group(box))
    sc.check(not before & after, f"instances kept: {sorted(before & after)}")
    now = served()
    sc.check(set(now) == {tag}, f"the load balancer serves {now}")
    sc.check(counts.failed == 0, f"failed requests: {counts.failed} (first {counts.first_failure})")
    m = model(box, warmup)
    sc.figures += [f"ctl {took:.1f} s, refresh {refresh_seconds(box):.1f} s (model {m:.0f} s + engine/pull/start;"
                   f" ctl checks every 15 s)", counts.line(),
                   f"replaced {len(before - after)}/{len(before)}"]
    sc.done()
    return before


def agent_killed(box, rate, tag, n, warmup):
    """Scenario 4: during a release, the agent of one new instance is SIGKILLed as soon as it
    runs; systemd (modelled by the controller) restarts it, it adopts its container and answers
    the launch hook: the release goes through."""
    sc = Scenario(4, f"agent SIGKILLed mid-release {parameter(box)[0]} -> {tag}")
    fleet.push_image(tag)
    before = set(group(box))
    killed = []

    def killer():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            for iid in set(group(box)) - before:
                pidfile = os.path.join(fleet.RUN_DIR, "hosts", iid, "agent.pid")
                try:
                    with open(pidfile) as f:
                        pid = int(f.read())
                    time.sleep(1)  # running: reading the release, pulling, starting
                    os.kill(pid, 9)
                    killed.append((iid, time.monotonic()))
                    return
                except (OSError, ValueError):
                    continue
            time.sleep(0.3)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    (rc, out, took), counts = with_load(box, rate, lambda: ctl(box, "release", "--tag", tag, "--warmup", f"{warmup}s",
                                                               "--timeout", "10m"))
    t.join(5)
    sc.check(killed, "no new instance's agent was found to kill")
    sc.check(rc == 0, f"ctl exit {rc}: {out.strip()[-400:]}")
    sc.check(parameter(box)[0] == tag, f"parameter holds {parameter(box)[1]}")
    sc.check(settle(box, n), f"group not back to {n} InService behind the LB: {group(box)}")
    after = set(group(box))
    sc.check(not before & after, f"instances kept: {sorted(before & after)}")
    if killed:
        sc.check(killed[0][0] in after, f"the instance whose agent was killed ({killed[0][0]}) is not in service")
    sc.check(set(served()) == {tag}, f"the load balancer serves {served()}")
    sc.check(counts.failed == 0, f"failed requests: {counts.failed} (first {counts.first_failure})")
    sc.figures += [f"ctl {took:.1f} s, refresh {refresh_seconds(box):.1f} s", counts.line(),
                   f"killed the agent of {killed[0][0] if killed else 'none'}"]
    sc.done()


def aws_away(box, rate, n, seconds=30):
    """Scenario 5: every host's way to the AWS endpoint (the emulator) rejected for `seconds`."""
    sc = Scenario(5, f"AWS unreachable from every instance for {seconds} s")
    rule = ["OUTPUT", "-p", "tcp", "-d", fleet.GATEWAY, "--dport", str(fleet.EMULATOR_PORT), "-j", "REJECT"]
    namespaces = [ln.split()[0] for ln in fleet.run("ip", "netns", "list").stdout.splitlines()
                  if ln.startswith("skf-")]
    before = set(group(box))
    load = Load(URL, rate).start()
    blocked = []
    try:
        for ns in namespaces:
            fleet.run("nsenter", f"--net=/var/run/netns/{ns}", "iptables", "-I", *rule)
            blocked.append(ns)
        time.sleep(seconds)
    finally:
        for ns in blocked:
            fleet.run("nsenter", f"--net=/var/run/netns/{ns}", "iptables", "-D", *rule, check=False)
        time.sleep(1)
        counts = load.stop()
    sc.check(len(blocked) == n, f"blocked {len(blocked)} of {n} hosts ({namespaces})")
    sc.check(set(group(box)) == before, f"instances changed: {sorted(before)} -> {sorted(group(box))}")
    sc.check(len(fleet.lb_up()) == n, f"the load balancer serves {fleet.lb_up()}")
    sc.check(counts.failed == 0, f"failed requests: {counts.failed} (first {counts.first_failure})")
    sc.figures += [counts.line()]
    sc.done()


def unhealthy(box, rate, good, bad, n, warmup):
    sc = Scenario(2, f"unhealthy release {bad}")
    fleet.push_image(bad, healthy=False)
    (rc, out, took), counts = with_load(box, rate, lambda: ctl(box, "release", "--tag", bad, "--warmup", f"{warmup}s",
                                                               "--timeout", "10m"))
    sc.check(rc == 1, f"ctl exit {rc}, documented 1: {out.strip()[-400:]}")
    sc.check(parameter(box)[0] == good, f"parameter holds {parameter(box)[1]}, not {good}")
    sc.check(settle(box, n), f"group not back to {n} InService behind the LB: {group(box)}")
    sc.check(bad not in counts.releases, f"{bad} served {counts.releases[bad]} responses")
    now = served()
    sc.check(set(now) == {good}, f"the load balancer serves {now}")
    sc.check(counts.failed == 0, f"failed requests: {counts.failed} (first {counts.first_failure})")
    c = fleet.admin_clients(box)
    refreshes = c("autoscaling").describe_instance_refreshes(
        AutoScalingGroupName=box["outputs"]["AutoScalingGroup"])["InstanceRefreshes"]
    failed = [r for r in refreshes if r["Status"] == "Failed"]
    sc.check(failed and "abandoned" in failed[0].get("StatusReason", ""),
             f"no refresh failed by abandoned launches: {[(r['Status'], r.get('StatusReason')) for r in refreshes[:3]]}")
    sc.figures += [f"wall {took:.1f} s to fail and compensate", counts.line()]
    sc.done()


def rollback(box, rate, to, n, warmup):
    sc = Scenario(7, f"rollback {parameter(box)[0]} -> {to}")
    before = set(group(box))
    (rc, out, took), counts = with_load(box, rate, lambda: ctl(box, "rollback", "--warmup", f"{warmup}s",
                                                               "--timeout", "10m"))
    sc.check(rc == 0, f"ctl exit {rc}: {out.strip()[-400:]}")
    sc.check(parameter(box)[0] == to, f"parameter holds {parameter(box)[1]}, want {to}")
    sc.check(settle(box, n), f"group not back to {n} InService behind the LB: {group(box)}")
    after = set(group(box))
    sc.check(not before & after, f"instances kept: {sorted(before & after)}")
    now = served()
    sc.check(set(now) == {to}, f"the load balancer serves {now}")
    sc.check(counts.failed == 0, f"failed requests: {counts.failed} (first {counts.first_failure})")
    sc.figures += [f"ctl {took:.1f} s, refresh {refresh_seconds(box):.1f} s", counts.line(), f"replaced {len(before - after)}/{len(before)}"]
    sc.done()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=20, help="requests per second through the LB")
    ap.add_argument("--warmup", type=int, default=5, help="ctl --warmup seconds")
    ap.add_argument("--keep", action="store_true", help="leave the box up afterwards")
    a = ap.parse_args()
    started = time.monotonic()
    if not (fleet.load_box() and fleet.controller_alive()):
        rc = subprocess.run([sys.executable, fleet.__file__, "up"]).returncode
        if rc != 0:
            print("scenarios: the box did not come up", file=sys.stderr)
            return 1
    box = fleet.load_box()
    n = int(box["params"]["MinSize"])
    if not settle(box, n, 60):
        print(f"scenarios: the box is not settled ({group(box)}); `box.py down` and retry", file=sys.stderr)
        return 1
    previous = parameter(box)[0]
    good, bad = f"r{RUN}a", f"r{RUN}bad"
    try:
        release(box, a.rate, good, n, a.warmup)
        aws_away(box, a.rate, n)
        unhealthy(box, a.rate, good, bad, n, a.warmup)
        rollback(box, a.rate, previous, n, a.warmup)
        agent_killed(box, a.rate, f"r{RUN}k", n, a.warmup)
    except Exception as e:
        import traceback

        traceback.print_exc()
        results.append(False)
        print(f"scenarios: stopped by {type(e).__name__}: {e}")
    finally:
        if not all(results):
            evidence()
        if not a.keep:
            subprocess.run([sys.executable, fleet.__file__, "down"])
    ok = sum(results)
    print(f"{ok} passed, {len(results) - ok} failed ({time.monotonic() - started:.0f} s in all)")
    return 0 if results and all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
