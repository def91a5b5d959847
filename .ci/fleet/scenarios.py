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
  6  engine killed: one instance's Docker engine and everything it runs SIGKILLed (not
                restarted): the load balancer takes it out, the group (HealthCheckType ELB,
                after the grace period) marks it Unhealthy and replaces it; failed requests
                counted and bounded by the detection window
  3  scale-out: ctl release while the group's desired capacity goes n -> n+1 mid-refresh: the
                new instance boots on the release the parameter names, the release completes,
                0 failed requests; then back to n

    scenarios.py --bench        # also a table: wall time per scenario, release time vs model
    scenarios.py --only 1,7     # a subset (in this order: 1 5 2 7 4 6 3)

Prints one line per scenario with its figures, then 'N passed, N failed'; exits 1 on a failure.
Tags are new per run (r<run>a, r<run>bad), so a leftover image or record cannot pass a check.
"""

import argparse
import json
import math
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
BENCH = []  # (scenario, wall s, release s or None, model s or None)
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
        self.started = time.monotonic()
        self.release = self.model = None  # refresh seconds and the model's, for --bench

    def check(self, ok, what):
        if not ok:
            self.problems.append(what)
        return ok

    def done(self):
        ok = not self.problems
        results.append(ok)
        wall = time.monotonic() - self.started
        BENCH.append((f"{self.number} {self.name}", wall, self.release, self.model))
        print(f"scenario {self.number} {self.name}: {'PASS' if ok else 'FAIL'}  wall {wall:.0f} s; "
              + "; ".join(self.figures)
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
    sc.release, sc.model = refresh_seconds(box), m
    sc.figures += [f"ctl {took:.1f} s, refresh {sc.release:.1f} s (model {m:.0f} s + engine/pull/start;"
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
    sc.release, sc.model = refresh_seconds(box), model(box, warmup)
    sc.figures += [f"ctl {took:.1f} s, refresh {sc.release:.1f} s", counts.line(),
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
    sc.release, sc.model = refresh_seconds(box), model(box, warmup)
    sc.figures += [f"ctl {took:.1f} s, refresh {sc.release:.1f} s", counts.line(), f"replaced {len(before - after)}/{len(before)}"]
    sc.done()


class Dependencies:
    """Checks every 5 s what the box depends on (fleet.dependencies) and records the outages:
    a failed scenario then says whether the machine's registry had gone, not the box."""

    def __init__(self):
        self.outages, self.stopping = [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def run(self):
        while not self.stopping.wait(5):
            problems = fleet.dependencies()
            if problems:
                self.outages.append(f"{time.strftime('%H:%M:%S')} {', '.join(problems)}")

    def stop(self):
        self.stopping.set()
        self.thread.join(10)
        return self.outages


def namespace_of(pid):
    """The box's network namespace (skf-N) a process runs in."""
    for ln in fleet.run("ip", "netns", "list").stdout.splitlines():
        ns = ln.split()[0]
        if ns.startswith("skf-") and str(pid) in fleet.run("ip", "netns", "pids", ns, check=False).stdout.split():
            return ns
    return None


def agent_interval(iid):
    """[health] interval of the agent's rendered config (the agent's own probe period)."""
    try:
        with open(os.path.join(fleet.STATE, "hosts", iid, "etc-skiff", "agent.toml")) as f:
            text = f.read()
        m = re.search(r'(?ms)^\[health\].*?^interval\s*=\s*"(\d+)s"', text)
        return float(m.group(1)) if m else 2.0
    except OSError:
        return 2.0


def engine_killed(box, rate, n):
    """Scenario 6: one instance's engine (dockerd, containerd, the shims and the app: every
    process in its namespace but the agent) SIGKILLed and not restarted, as an engine that
    crashed for good. The agent's /healthz fails with the app, HAProxy takes the target out
    after UnhealthyThresholdCount checks, the controller reports it unhealthy and the emulator
    (HealthCheckType ELB, after the grace period) replaces the instance through its hooks."""
    s = box["settings"]
    sc = Scenario(6, "one instance's Docker engine killed")
    asg = fleet.admin_clients(box)("autoscaling")
    name = box["outputs"]["AutoScalingGroup"]
    before = group(box)
    victim = sorted(before)[0]
    with open(os.path.join(fleet.RUN_DIR, "hosts", victim, "agent.pid")) as f:
        agent_pid = int(f.read())
    ns = namespace_of(agent_pid)
    ip = fleet.run("ip", "-n", ns, "-4", "-o", "addr", "show", "eth0").stdout.split()[3].split("/")[0] if ns else None
    # The window in which the dead target still gets requests: the agent's next probe, then
    # UnhealthyThresholdCount failed checks (each within the interval, at most the timeout).
    window = agent_interval(victim) + s["unhealthy"] * s["interval"] + s["timeout"]
    bound = math.ceil(rate / n * window) + math.ceil(rate)  # + 1 s of the generator's slack
    marks = {}
    load = Load(URL, rate).start()
    try:
        time.sleep(2)
        t0 = time.monotonic()
        pids = [int(p) for p in fleet.run("ip", "netns", "pids", ns).stdout.split() if int(p) != agent_pid] if ns else []
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

        def watch():
            now = time.monotonic() - t0
            up = fleet.lb_up()
            if "out of the LB" not in marks and ip not in up:
                marks["out of the LB"] = now
            g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
            mine = [i for i in g["Instances"] if i["InstanceId"] == victim]
            if "Unhealthy" not in marks and mine and mine[0]["HealthStatus"] == "Unhealthy":
                marks["Unhealthy"] = now
            fresh = [i for i in g["Instances"] if i["InstanceId"] not in before and i["LifecycleState"] == "InService"]
            if "replacement InService" not in marks and fresh:
                marks["replacement InService"] = now
            if "n serving" not in marks and fresh and len(up) == n and ip not in up:
                marks["n serving"] = now
            return "n serving" in marks

        fleet.wait_until(watch, 240, 0.25)
    finally:
        time.sleep(1)
        counts = load.stop()
    sc.check(ns and pids, f"no namespace or engine found for {victim} (agent pid {agent_pid})")
    sc.check("Unhealthy" in marks, f"{victim} never marked Unhealthy: {group(box)}")
    sc.check("n serving" in marks, f"no replacement serving behind the LB within 240 s: {group(box)}, LB {fleet.lb_up()}")
    sc.check(settle(box, n, 120), f"group not back to {n} InService behind the LB: {group(box)}")
    sc.check(victim not in group(box), f"{victim} still in the group")
    sc.check(set(served()) == {parameter(box)[0]}, f"the load balancer serves {served()}")
    sc.check(counts.failed <= bound, f"failed requests {counts.failed} > {bound} (rate {rate}/s over {n} targets"
             f" in a {window:.0f} s detection window, + 1 s)")
    sc.figures += [", ".join(f"{k} after {v:.1f} s" for k, v in marks.items()),
                   f"failed {counts.failed} (bound {bound}: {window:.0f} s window)", counts.line()]
    sc.done()


def scale_out(box, rate, tag, n, warmup):
    """Scenario 3: the group scales out n -> n+1 while the release's refresh runs (its batch
    launched): the scale-out instance boots on the parameter's (new) release; the refresh
    replaces the instances it started with and completes; 0 failed requests. Back to n after."""
    sc = Scenario(3, f"scale-out to {n + 1} during release {parameter(box)[0]} -> {tag}")
    fleet.push_image(tag)
    c = fleet.admin_clients(box)
    asg, ec2 = c("autoscaling"), c("ec2")
    name = box["outputs"]["AutoScalingGroup"]
    before = set(group(box))
    scaled = []
    started = time.time() - 1

    def scaler():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not scaled:
            try:
                rs = asg.describe_instance_refreshes(AutoScalingGroupName=name)["InstanceRefreshes"]
                states = group(box)
                if (rs and rs[0]["Status"] == "InProgress" and rs[0]["StartTime"].timestamp() >= started
                        and len(states) > n):
                    asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=n + 1, HonorCooldown=False)
                    added = set(group(box)) - set(states)
                    scaled.append((time.monotonic(), added, len(states)))
                    return
            except Exception as e:  # keep trying until the deadline; reported below if never
                print(f"scaler: {e}", flush=True)
            time.sleep(0.3)

    t = threading.Thread(target=scaler, daemon=True)
    t.start()
    (rc, out, took), counts = with_load(box, rate, lambda: ctl(box, "release", "--tag", tag, "--warmup", f"{warmup}s",
                                                               "--timeout", "10m"))
    t.join(5)
    added = scaled[0][1] if scaled else set()
    sc.check(len(added) == 1, f"the scale-out mid-refresh launched {sorted(added)} ({scaled})")
    sc.check(rc == 0, f"ctl exit {rc}: {out.strip()[-400:]}")
    sc.check(parameter(box)[0] == tag, f"parameter holds {parameter(box)[1]}")
    sc.check(settle(box, n + 1, 180), f"group not at {n + 1} InService behind the LB: {group(box)}")
    after = set(group(box))
    sc.check(not before & after, f"instances kept: {sorted(before & after)}")
    sc.check(added <= after, f"the scale-out instance {sorted(added)} is not in service: {sorted(after)}")
    # The agent tags its instance skiff:release=<tag> once that release is healthy there.
    tags = {t["ResourceId"]: t["Value"] for t in ec2.describe_tags(Filters=[
        {"Name": "key", "Values": ["skiff:release"]}, {"Name": "resource-id", "Values": sorted(after)}])["Tags"]}
    sc.check(all(tags.get(i) == tag for i in added), f"the scale-out instance runs {[tags.get(i) for i in added]}, not {tag}")
    now = served()
    sc.check(set(now) == {tag}, f"the load balancer serves {now}")
    sc.check(counts.failed == 0, f"failed requests: {counts.failed} (first {counts.first_failure})")
    sc.release, sc.model = refresh_seconds(box), model(box, warmup)
    sc.figures += [f"ctl {took:.1f} s, refresh {sc.release:.1f} s", counts.line(),
                   f"scaled out with {scaled[0][2] if scaled else '?'} instances in the group; "
                   f"{sorted(added)} on {[tags.get(i) for i in added]}"]
    asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=n, HonorCooldown=False)
    sc.check(settle(box, n, 120), f"group not back to {n} after scaling in: {group(box)}")
    sc.done()


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=20, help="requests per second through the LB")
    ap.add_argument("--warmup", type=int, default=None,
                    help="ctl --warmup seconds (default: the target group's HealthyThresholdCount x "
                         "interval + 2, the time a new target needs before it serves)")
    ap.add_argument("--keep", action="store_true", help="leave the box up afterwards")
    ap.add_argument("--bench", action="store_true", help="print wall and release times vs the model")
    ap.add_argument("--only", default="1,5,2,7,4,6,3", help="scenarios to run (run in the order 1 5 2 7 4 6 3)")
    a = ap.parse_args()
    only = set(a.only.replace(" ", "").split(","))
    if not only <= set("1234567") or not only:
        ap.error(f"--only takes scenario numbers 1..7 separated by commas, not {a.only!r}")
    if only & {"2", "7"} and "1" not in only:
        ap.error("scenarios 2 and 7 follow scenario 1's release: add 1 to --only")
    started = time.monotonic()
    if not (fleet.load_box() and fleet.controller_alive()):
        rc = subprocess.run([sys.executable, fleet.__file__, "up"]).returncode
        if rc != 0:
            print("scenarios: the box did not come up", file=sys.stderr)
            return 1
    box = fleet.load_box()
    n = int(box["params"]["MinSize"])
    if a.warmup is None:
        # Launch before terminate: the old instances start draining once the new ones are warm.
        # A warm-up shorter than the new targets' first HealthyThresholdCount checks leaves the
        # load balancer with nothing to send to (measured: failed requests); ctl's default, 30 s,
        # covers the template's 2 x 5 s.
        a.warmup = box["settings"]["healthy"] * box["settings"]["interval"] + 2
    if not settle(box, n, 60):
        print(f"scenarios: the box is not settled ({group(box)}); `box.py down` and retry", file=sys.stderr)
        return 1
    previous = parameter(box)[0]
    good, bad = f"r{RUN}a", f"r{RUN}bad"
    plan = [("1", lambda: release(box, a.rate, good, n, a.warmup)),
            ("5", lambda: aws_away(box, a.rate, n)),
            ("2", lambda: unhealthy(box, a.rate, good, bad, n, a.warmup)),
            ("7", lambda: rollback(box, a.rate, previous, n, a.warmup)),
            ("4", lambda: agent_killed(box, a.rate, f"r{RUN}k", n, a.warmup)),
            ("6", lambda: engine_killed(box, a.rate, n)),
            ("3", lambda: scale_out(box, a.rate, f"r{RUN}s", n, a.warmup))]
    watch = Dependencies().start()
    try:
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
        bench_table(box, a.warmup)
    print(f"{ok} passed, {len(results) - ok} failed ({time.monotonic() - started:.0f} s in all)")
    return 0 if results and all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
