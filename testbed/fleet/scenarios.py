#!/usr/bin/env python3
"""Release scenarios against the box (testbed/fleet/box.py) with the real ctl binary, under the
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
                poll: within 3 polls nothing swaps (all stale on the old release), each agent
                warned at start; then the template's config back
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
"""

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import box as fleet  # noqa: E402
import controller  # noqa: E402
import images  # noqa: E402
import loadbalancer  # noqa: E402
import network  # noqa: E402
import settings  # noqa: E402
from kit.waits import wait_until  # noqa: E402
from load import Load, ProcessLoad  # noqa: E402

RUN = uuid.uuid4().hex[:6]
ALL = "1,5,2,7,4,6,3,8,10,11,12,13,9,14,15,16,17,18,19,20,21"
CI = "1,5,2,7,4,6,3,8,10,11,12,13,15,16,17,18,19,20"  # the default without --bench: not the 6-instance ones
HANDOVER = {"15", "16", "17", "18", "19", "20", "21"}  # on a box of their own (SwapMode handover)
REFRESH_BENCH = []  # (scenario name, instances, ctl wall s, model s, failed requests): refresh releases
IMDS_DELAY = []
URL = f"http://127.0.0.1:{settings.LB_PORT}/"
results = []
BENCH = []  # (scenario, wall s, release s or None, model s or None)
LAST_CTL = []


def evidence():
    """What to read when a scenario fails: the last ctl run, the controller's and emulator's
    last lines (the box goes down afterwards; its logs stay in /var/lib/skiff-fleet/logs)."""
    print("--- " + (LAST_CTL[0] if LAST_CTL else "no ctl run") + "\n" + (LAST_CTL[1][-3000:] if LAST_CTL else ""))
    for name in ("controller.log", "emulator.log"):
        try:
            with open(os.path.join(settings.STATE, name)) as f:
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
    c = settings.admin_clients(box)
    value = c("ssm").get_parameter(Name=box["outputs"]["ReleaseParameter"])["Parameter"]["Value"]
    try:
        return json.loads(value).get("tag"), value
    except ValueError:
        return value.strip(), value


def group(box):
    return controller.Controller(box).states()


def settle(box, n, timeout=120):
    """Wait until the group has n instances, all InService, and the load balancer serves n."""
    return wait_until(lambda: (lambda s: len(s) == n and set(s.values()) == {"InService"}
                                     and len(loadbalancer.lb_up()) == n)(group(box)), timeout, 1)


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
    c = settings.admin_clients(box)
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


def release(box, rate, tag, n, warmup, number=1):
    sc = Scenario(number, f"release {parameter(box)[0]} -> {tag}" + (f" on {n} instances" if number != 1 else ""))
    images.push_image(tag)
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
    REFRESH_BENCH.append((sc.name, n, took, m, counts.failed))
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
    images.push_image(tag)
    before = set(group(box))
    killed = []

    def killer():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            for iid in set(group(box)) - before:
                pidfile = os.path.join(settings.RUN_DIR, "hosts", iid, "agent.pid")
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
    rule = ["OUTPUT", "-p", "tcp", "-d", settings.GATEWAY, "--dport", str(settings.EMULATOR_PORT), "-j", "REJECT"]
    namespaces = [ln.split()[0] for ln in settings.run("ip", "netns", "list").stdout.splitlines()
                  if ln.startswith("skf-")]
    before = set(group(box))
    load = Load(URL, rate).start()
    blocked = []
    try:
        for ns in namespaces:
            settings.run("nsenter", f"--net=/var/run/netns/{ns}", "iptables", "-I", *rule)
            blocked.append(ns)
        time.sleep(seconds)
    finally:
        for ns in blocked:
            settings.run("nsenter", f"--net=/var/run/netns/{ns}", "iptables", "-D", *rule, check=False)
        time.sleep(1)
        counts = load.stop()
    sc.check(len(blocked) == n, f"blocked {len(blocked)} of {n} hosts ({namespaces})")
    sc.check(set(group(box)) == before, f"instances changed: {sorted(before)} -> {sorted(group(box))}")
    sc.check(len(loadbalancer.lb_up()) == n, f"the load balancer serves {loadbalancer.lb_up()}")
    sc.check(counts.failed == 0, f"failed requests: {counts.failed} (first {counts.first_failure})")
    sc.figures += [counts.line()]
    sc.done()


def unhealthy(box, rate, good, bad, n, warmup):
    sc = Scenario(2, f"unhealthy release {bad}")
    images.push_image(bad, healthy=False)
    (rc, out, took), counts = with_load(box, rate, lambda: ctl(box, "release", "--tag", bad, "--warmup", f"{warmup}s",
                                                               "--timeout", "10m"))
    sc.check(rc == 1, f"ctl exit {rc}, documented 1: {out.strip()[-400:]}")
    sc.check(parameter(box)[0] == good, f"parameter holds {parameter(box)[1]}, not {good}")
    sc.check(settle(box, n), f"group not back to {n} InService behind the LB: {group(box)}")
    sc.check(bad not in counts.releases, f"{bad} served {counts.releases[bad]} responses")
    now = served()
    sc.check(set(now) == {good}, f"the load balancer serves {now}")
    sc.check(counts.failed == 0, f"failed requests: {counts.failed} (first {counts.first_failure})")
    c = settings.admin_clients(box)
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
    REFRESH_BENCH.append((sc.name, n, took, sc.model, counts.failed))
    sc.figures += [f"ctl {took:.1f} s, refresh {sc.release:.1f} s", counts.line(), f"replaced {len(before - after)}/{len(before)}"]
    sc.done()


# --- in place (issue 13): ctl steers the running instances through their EC2 tags -------------

SKIFF_TAGS = ("skiff:target", "skiff:pull", "skiff:pulled", "skiff:failed", "skiff:release")
INPLACE_BENCH = []  # (what, instances, wall s, floor s or None, failed requests, terms)


def tag_part(value):
    """The tag of a tag value `tag[@digest]` (instance_tags::encode), or None."""
    return value.split("@")[0] if value else None


def host_ip(iid):
    try:
        with open(os.path.join(settings.RUN_DIR, "hosts", iid, "address")) as f:
            return f.read().strip()
    except OSError:
        return None


def agent_status(box, ip, timeout=1.0):
    """The agent's /status (JSON) through its address, or None."""
    try:
        with urllib.request.urlopen(f"http://{ip}:{box['settings']['health_port']}/status", timeout=timeout) as r:
            return json.load(r)
    except (OSError, ValueError):
        return None


def release_of(status, field="running"):
    """The tag of a /status release field (`running` holds {"release": {...}}, `pulled` a release)."""
    v = (status or {}).get(field)
    if isinstance(v, dict) and "release" in v:
        v = v["release"]
    if isinstance(v, dict):
        return v.get("tag")
    return tag_part(v) if isinstance(v, str) else None


def skiff_tags(box, ids):
    """{instance: {skiff:* key: value}} from the emulator (as the administrator)."""
    if not ids:
        return {}
    ec2 = settings.admin_clients(box)("ec2")
    out = {i: {} for i in ids}
    for t in ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": sorted(ids)},
                                        {"Name": "key", "Values": list(SKIFF_TAGS)}])["Tags"]:
        out.setdefault(t["ResourceId"], {})[t["Key"]] = t["Value"]
    return out


def drain_seconds():
    """[release] drain of the agents' rendered config (what the user data wrote from
    DrainSeconds), read from any host of the box."""
    hosts = os.path.join(settings.STATE, "hosts")
    for iid in sorted(os.listdir(hosts)) if os.path.isdir(hosts) else []:
        try:
            with open(os.path.join(hosts, iid, "etc-skiff", "agent.toml")) as f:
                m = re.search(r'(?m)^drain\s*=\s*"(\d+)s"', f.read())
            if m:
                return float(m.group(1))
        except OSError:
            continue
    return None


class Watch:
    """Follows the fleet every 0.5 s while a scenario runs: each instance's skiff:* tags, its
    agent's /status (the release running, whether its app passes, the timings the agent
    measured) and whether HAProxy sends it traffic; keeps when each value changed."""

    def __init__(self, box, ids):
        self.box, self.ids = box, list(ids)
        self.events = []  # (t monotonic, instance, what, value)
        self.last = {}
        self.pull_ms, self.start_ms = {}, {}  # (instance, tag) -> ms, as the agent measured
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.errors = []
        self.asg = settings.admin_clients(box)("autoscaling")

    def start(self):
        self.sample()
        self.thread.start()
        return self

    def stop(self):
        self.stopping.set()
        self.thread.join(10)
        return self

    def note(self, iid, what, value, now):
        if self.last.get((iid, what), "-") != value:
            self.last[(iid, what)] = value
            self.events.append((now, iid, what, value))

    def sample(self):
        now = time.monotonic()
        try:
            tags = skiff_tags(self.box, self.ids)
        except Exception as e:  # recorded; a gap in the watch is not a scenario failure
            self.errors.append(f"tags: {e}")
            tags = None
        up = set(loadbalancer.lb_up())
        try:
            g = self.asg.describe_auto_scaling_groups(
                AutoScalingGroupNames=[self.box["outputs"]["AutoScalingGroup"]])["AutoScalingGroups"][0]
            members = {i["InstanceId"]: f"{i['LifecycleState']}/{i['HealthStatus']}" for i in g["Instances"]}
            for iid in self.ids:
                self.note(iid, "asg", members.get(iid, "gone"), now)
            for iid in set(members) - set(self.ids):
                self.note(iid, "asg", members[iid], now)  # launched meanwhile
        except Exception as e:
            self.errors.append(f"group: {e}")
        for iid in self.ids:
            if tags is not None:
                for k in SKIFF_TAGS:
                    self.note(iid, k, tags.get(iid, {}).get(k), now)
            ip = host_ip(iid)
            self.note(iid, "lb", bool(ip and ip in up), now)
            st = agent_status(self.box, ip) if ip else None
            if st is None:
                continue
            running = release_of(st)
            serving = running if st.get("status") == "healthy" else None
            self.note(iid, "serving", serving, now)  # the agent's word: running healthy
            timings = st.get("timings") or {}
            pulled = release_of(st, "pulled")
            if pulled and timings.get("pull_ms") is not None:
                self.pull_ms.setdefault((iid, pulled), timings["pull_ms"])
            if serving and timings.get("start_to_healthy_ms") is not None:
                self.start_ms.setdefault((iid, serving), timings["start_to_healthy_ms"])

    def run(self):
        while not self.stopping.wait(0.5):
            self.sample()

    def first(self, iid, what, value, after=0.0):
        return next((t for t, i, w, v in self.events if i == iid and w == what and v == value and t >= after), None)

    def changes(self, iid, what, after=0.0):
        return [(t, v) for t, i, w, v in self.events if i == iid and w == what and t > after]

    def auto_scaling(self, after=0.0):
        """What Auto Scaling did to the fleet meanwhile: instances marked Unhealthy or gone, and
        instances launched, with when (s after `after`)."""
        out = []
        for t, i, w, v in self.events:
            if w == "asg" and t > after and (i in self.ids and v != "InService/Healthy" or i not in self.ids):
                out.append(f"{i} {v} at +{t - after:.1f} s")
        return out

    def batches(self, tag, after=0.0):
        """Instances told skiff:target=<tag> after `after`, grouped by when (ctl tags a batch at once)."""
        told = sorted((t, i) for t, i, w, v in self.events if w == "skiff:target" and tag_part(v) == tag and t > after)
        out = []
        for t, i in told:
            if out and t - out[-1][0] < 2.0 and i not in out[-1][1]:
                out[-1][1].append(i)
            elif not any(i in b for _, b in out):
                out.append((t, [i]))
        return out


def ctl_stream(box, *args, kill_when=None, sig=signal.SIGKILL, timeout=900):
    """The real ctl, its output lines timestamped as they come (progress goes to stderr);
    kill_when(lines) -> True sends it `sig` (SIGKILL; once). Returns (exit code, [(t, line)],
    seconds, killed)."""
    env = dict(os.environ, **fleet.ctl_env(box), BUILD_USER="fleet-scenarios")
    t0 = time.monotonic()
    p = subprocess.Popen([box["ctl"], *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, killed = [], []

    def read():
        for line in p.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = t0 + timeout
    while p.poll() is None and time.monotonic() < deadline:
        if kill_when and not killed and kill_when(lines):
            p.send_signal(sig)
            killed.append(time.monotonic())
        time.sleep(0.1)
    if p.poll() is None:
        p.kill()
    rc = p.wait()
    reader.join(5)
    took = time.monotonic() - t0
    LAST_CTL[:] = [f"ctl {' '.join(args)} (exit {rc}, {took:.1f} s)", "\n".join(x for _, x in lines)]
    with open(os.path.join(settings.STATE, "ctl.log"), "a") as f:  # every run in full, timed (logs/ after down)
        f.write(f"=== {time.strftime('%H:%M:%S')} {LAST_CTL[0]}\n"
                + "".join(f"+{t - t0:6.1f} {x}\n" for t, x in lines))
    return rc, lines, took, bool(killed)


def inplace_floor(box, watch, tag, bake, after):
    """The floor of an in-place release from what the box measured: the pull on every instance
    at once (the slowest, as its agent measured it), then per batch the slowest start-to-healthy
    (the agent's), the load balancer's detection of a healthy target (HealthyThresholdCount x
    interval, from the template) and the drain (the rendered config), and the bake."""
    s = box["settings"]
    batches = watch.batches(tag, after)
    pulls = [watch.pull_ms.get((i, tag)) for i in watch.ids]
    known = [p for p in pulls if p is not None]
    pull = max(known) / 1000 if known else None
    detect = s["healthy"] * s["interval"]
    drain = drain_seconds()
    per = []
    for _, ids in batches:
        starts = [watch.start_ms.get((i, tag)) for i in ids]
        start = max(x for x in starts if x is not None) / 1000 if any(x is not None for x in starts) else None
        per.append(start)
    if pull is None or any(x is None for x in per) or drain is None:
        return None, (f"floor unknown: pull {pulls}, start-to-healthy per batch {per}, drain {drain}")
    floor = pull + sum(x + detect + drain + bake for x in per)
    terms = (f"floor {floor:.1f} s = pull {pull:.1f} + {len(per)} batch(es) x (start-to-healthy "
             f"{'/'.join(f'{x:.1f}' for x in per)} + LB detection {detect} + drain {drain:.0f} + bake {bake:g})")
    return floor, terms


def lb_lag(watch, tag, after):
    """Per switched instance: the agent serving `tag` -> back in the load balancer, in seconds
    (the load balancer's detection as it happened; HAProxy's next check lands anywhere within
    the interval, so it is (HealthyThresholdCount - 1) to HealthyThresholdCount intervals)."""
    out = []
    for _, ids in watch.batches(tag, after):
        for i in ids:
            s = watch.first(i, "serving", tag, after)
            up = next((t for t, v in watch.changes(i, "lb", s) if v), None) if s else None
            if s and up:
                out.append(up - s)
    return out


def batch_times(watch, tag, after, serving_tag=None):
    """Per batch: told skiff:target -> the last of its instances in the load balancer again and
    serving the release (agent's word), in seconds."""
    out = []
    for t, ids in watch.batches(tag, after):
        ends = []
        for i in ids:
            s = watch.first(i, "serving", serving_tag or tag, t)
            lb_down = next((x for x, v in watch.changes(i, "lb", t) if not v), None)
            lb_up = next((x for x, v in watch.changes(i, "lb", lb_down or t) if v), None) if lb_down else None
            ends.append(max(x for x in (s, lb_up) if x is not None) if s or lb_up else None)
        out.append(None if None in ends else max(ends) - t)
    return out


def auto_scaling_quiet(sc, watch, t0):
    """The rollout must not have made Auto Scaling act: with the group's HealthCheckType ELB an
    instance whose target the load balancer reports unhealthy is replaced
    (https://docs.aws.amazon.com/autoscaling/ec2/userguide/as-add-elb-healthcheck.html)."""
    acted = watch.auto_scaling(t0)
    sc.check(not acted, "Auto Scaling acted during the rollout (HealthCheckType ELB): " + "; ".join(acted[:8]))


def stack_instances(box):
    return sorted(i for i, st in group(box).items() if st == "InService")


def inplace_release(box, rate, tag, n, number, bake=0, extra=()):
    """Scenarios 8 and 9: ctl release --strategy in-place on n instances under load."""
    previous = parameter(box)[0]
    sc = Scenario(number, f"in-place release {previous} -> {tag} on {n} instances")
    images.push_image(tag)
    ids = stack_instances(box)
    sc.check(len(ids) == n, f"{len(ids)} instances InService, not {n}")
    watch = Watch(box, ids).start()
    t0 = time.monotonic()
    (rc, lines, took, _), counts = with_load(
        box, rate, lambda: ctl_stream(box, "release", "--tag", tag, "--strategy", "in-place",
                                      "--bake", f"{bake}s", *extra))
    time.sleep(1)
    watch.stop()
    out = "\n".join(x for _, x in lines)
    auto_scaling_quiet(sc, watch, t0)
    sc.check(rc == 0, f"ctl exit {rc}: {out.strip()[-600:]}")
    sc.check(parameter(box)[0] == tag, f"parameter holds {parameter(box)[1]}")
    sc.check(set(stack_instances(box)) == set(ids), f"instances changed: {ids} -> {stack_instances(box)}")
    tags = skiff_tags(box, ids)
    sc.check(all(tags[i].get("skiff:release") == tag for i in ids),
             f"skiff:release: {[tags[i].get('skiff:release') for i in ids]}")
    sc.check(len(loadbalancer.lb_up()) == n, f"the load balancer serves {loadbalancer.lb_up()}")
    now = served()
    sc.check(set(now) == {tag}, f"the load balancer serves {now}")
    sc.check(counts.failed == 0, f"failed requests: {counts.failed} (first {counts.first_failure})")
    floor, terms = inplace_floor(box, watch, tag, bake, t0)
    per_batch = batch_times(watch, tag, t0)
    sizes = [len(b) for _, b in watch.batches(tag, t0)]
    ratio = f"{took / floor:.2f}x the floor" if floor else "ratio unknown"
    lags = lb_lag(watch, tag, t0)
    sc.figures += [f"ctl {took:.1f} s, {ratio}; {terms}",
                   "LB up after the agent's healthy: " + (", ".join(f"{x:.1f}" for x in lags) + " s" if lags else "?"),
                   f"batches {sizes}, told -> serving and in the LB: {', '.join(f'{x:.1f}' if x else '?' for x in per_batch)} s",
                   counts.line()]
    if watch.errors:
        sc.figures.append(f"watch gaps: {len(watch.errors)} ({watch.errors[0]})")
    INPLACE_BENCH.append((f"in-place {previous} -> {tag}", n, took, floor, counts.failed, terms))
    sc.done()
    return previous


def inplace_unhealthy(box, rate, bad, n):
    """Scenario 10: a release that never becomes healthy, in place: only the first batch is
    touched; its instance is back on the previous release (serving, in the load balancer) within
    15 s of the failure being known (ctl's progress line), the parameter holds it again, ctl
    exits 1 (ctl/README: failed, the previous release back), 0 failed requests."""
    good = parameter(box)[0]
    sc = Scenario(10, f"in-place release {bad} that never becomes healthy")
    images.push_image(bad, healthy=False)
    ids = stack_instances(box)
    watch = Watch(box, ids).start()
    t0 = time.monotonic()
    (rc, lines, took, _), counts = with_load(
        box, rate, lambda: ctl_stream(box, "release", "--tag", bad, "--strategy", "in-place"))
    # the reverted instance back in the load balancer (HealthyThresholdCount checks)
    batches = watch.batches(bad, t0)
    touched = [i for _, b in batches for i in b]
    wait_until(lambda: all(host_ip(i) in loadbalancer.lb_up() for i in touched), 30, 0.5)
    time.sleep(1)
    watch.stop()
    out = "\n".join(x for _, x in lines)
    auto_scaling_quiet(sc, watch, t0)
    sc.check(rc == 1, f"ctl exit {rc}, documented 1 (failed, previous release back): {out.strip()[-600:]}")
    sc.check(parameter(box)[0] == good, f"parameter holds {parameter(box)[1]}, not {good}")
    sc.check(len(batches) == 1 and len(touched) == 1,
             f"told {bad}: {[(round(t - t0, 1), b) for t, b in batches]} (expected the first batch, 1 instance)")
    for i in ids:
        if i not in touched:
            sc.check(not watch.changes(i, "serving", t0) and not [v for _, v in watch.changes(i, "lb", t0) if not v],
                     f"{i} (not in the first batch) changed: serving {watch.changes(i, 'serving', t0)}, "
                     f"LB {watch.changes(i, 'lb', t0)}")
    failure_line = next(((t, x) for t, x in lines if "in-place" in x and re.search(r"fail|revert", x, re.I)), None)
    failed_tag = min((watch.first(i, "skiff:failed", v, t0) or math.inf for i in touched
                      for v in {v for _, ii, w, v in watch.events if ii == i and w == "skiff:failed" and tag_part(v) == bad}),
                     default=math.inf)
    back = []
    for i in touched:
        known = failure_line[0] if failure_line else None
        serving = watch.first(i, "serving", good, (batches[0][0] if batches else t0))
        lb = next((t for t, v in watch.changes(i, "lb", batches[0][0]) if v and t >= (serving or 0)), None) if batches else None
        back.append((i, known, serving, lb))
    for i, known, _serving, lb in back:
        sc.check(known is not None, f"no ctl progress line about the failure: {out.strip()[-400:]}")
        sc.check(lb is not None, f"{i} not back in the load balancer on {good}")
        if known is not None and lb is not None:
            sc.check(lb - known <= 15, f"{i} back in the LB {lb - known:.1f} s after the failure was known (> 15 s)")
    tags = skiff_tags(box, ids)
    sc.check(all(tags[i].get("skiff:release") == good for i in ids), f"skiff:release: {tags}")
    sc.check(bad not in counts.releases, f"{bad} served {counts.releases[bad]} responses")
    now = served()
    sc.check(set(now) == {good}, f"the load balancer serves {now}")
    sc.check(counts.failed == 0, f"failed requests: {counts.failed} (first {counts.first_failure})")
    for i, known, serving, lb in back:
        def rel(x, known=known):
            return f"{x - known:+.1f} s" if x is not None and known is not None else "?"
        sc.figures.append(f"{i}: failure known (ctl line) at +{(known or t0) - t0:.1f} s (skiff:failed at "
                          f"+{failed_tag - t0:.1f} s); serving {good} again {rel(serving)}, in the LB {rel(lb)}")
    sc.figures += [f"ctl exit {rc} after {took:.1f} s", counts.line()]
    if failure_line:
        sc.figures.append(f"line: {failure_line[1].strip()[:120]}")
    sc.done()


def inplace_rollback(box, rate, to, n):
    """Scenario 11: ctl rollback --strategy in-place after a good in-place release."""
    sc = Scenario(11, f"in-place rollback {parameter(box)[0]} -> {to}")
    ids = stack_instances(box)
    watch = Watch(box, ids).start()
    t0 = time.monotonic()
    (rc, lines, took, _), counts = with_load(box, rate, lambda: ctl_stream(box, "rollback", "--strategy", "in-place"))
    time.sleep(1)
    watch.stop()
    out = "\n".join(x for _, x in lines)
    auto_scaling_quiet(sc, watch, t0)
    sc.check(rc == 0, f"ctl exit {rc}: {out.strip()[-600:]}")
    sc.check(parameter(box)[0] == to, f"parameter holds {parameter(box)[1]}, want {to}")
    sc.check(set(stack_instances(box)) == set(ids), f"instances changed: {ids} -> {stack_instances(box)}")
    tags = skiff_tags(box, ids)
    sc.check(all(tags[i].get("skiff:release") == to for i in ids), f"skiff:release: {tags}")
    now = served()
    sc.check(set(now) == {to}, f"the load balancer serves {now}")
    sc.check(counts.failed == 0, f"failed requests: {counts.failed} (first {counts.first_failure})")
    per_batch = batch_times(watch, to, t0)
    floor, terms = inplace_floor(box, watch, to, 0, t0)
    sc.figures += [f"ctl {took:.1f} s; per batch told -> serving and in the LB: "
                   f"{', '.join(f'{x:.1f}' if x else '?' for x in per_batch)} s (goal <= 15 s)", terms, counts.line()]
    INPLACE_BENCH.append((f"in-place rollback -> {to}", n, took, floor, counts.failed, terms))
    sc.done()


def inplace_killed(box, rate, tag, n):
    """Scenario 12: ctl SIGKILLed once the first batch switched; `ctl status` shows the
    half-switched rollout; `ctl unlock --force`; the same release again converges, skipping
    the instance already on it; 0 failed requests throughout."""
    sc = Scenario(12, f"ctl SIGKILLed mid in-place release -> {tag}, then run again")
    images.push_image(tag)
    ids = stack_instances(box)
    watch = Watch(box, ids).start()
    load = Load(URL, rate).start()
    t0 = time.monotonic()
    try:
        def switched(lines):
            return any(i for i in ids if watch.last.get((i, "skiff:release")) == tag)
        rc, lines, took, killed = ctl_stream(box, "release", "--tag", tag, "--strategy", "in-place", kill_when=switched)
        first = [i for i in ids if watch.last.get((i, "skiff:release")) == tag]
        src, status_out, _ = ctl(box, "status")
        urc, unlock_out, _ = ctl(box, "unlock", "--force")
        t_rerun = time.monotonic()
        rrc, rlines, rtook, _ = ctl_stream(box, "release", "--tag", tag, "--strategy", "in-place")
    finally:
        time.sleep(1)
        counts = load.stop()
        watch.stop()
    rout = "\n".join(x for _, x in rlines)
    auto_scaling_quiet(sc, watch, t0)
    sc.check(killed, f"ctl was not killed (exit {rc}): {chr(10).join(x for _, x in lines)[-400:]}")
    sc.check(len(first) >= 1, f"no instance on {tag} when ctl was killed")
    sc.check(src == 0, f"ctl status exit {src}")
    m = re.search(r"(?m)^rollout\s+(\d+) of (\d+) instances run (\S+)", status_out)
    sc.check(m and int(m.group(1)) == len(first) and int(m.group(2)) == n and tag_part(m.group(3)) == tag,
             f"ctl status does not show {len(first)} of {n} on {tag}: {status_out.strip()[-500:]}")
    sc.check(urc == 0, f"ctl unlock --force exit {urc}: {unlock_out.strip()[-300:]}")
    sc.check(rrc == 0, f"the re-run: ctl exit {rrc}: {rout.strip()[-600:]}")
    sc.check(parameter(box)[0] == tag, f"parameter holds {parameter(box)[1]}")
    tags = skiff_tags(box, ids)
    sc.check(all(tags[i].get("skiff:release") == tag for i in ids), f"skiff:release: {tags}")
    for i in first:
        sc.check(not [v for _, v in watch.changes(i, "lb", t_rerun) if not v] and not watch.changes(i, "serving", t_rerun),
                 f"{i} (on {tag} before the re-run) was switched again: LB {watch.changes(i, 'lb', t_rerun)}")
    sc.check(re.search(r"already on it: (?!none)", rout), f"the re-run's plan skips nothing: {rout.strip()[:300]}")
    now = served()
    sc.check(set(now) == {tag}, f"the load balancer serves {now}")
    sc.check(counts.failed == 0, f"failed requests: {counts.failed} (first {counts.first_failure})")
    rollout = m.group(0) if m else "no rollout line"
    sc.figures += [f"killed after {took:.1f} s with {first} on {tag}; status: '{rollout}'",
                   f"re-run {rtook:.1f} s", counts.line()]
    sc.done()


def set_agent_config(box, texts):
    """Write each host's agent.toml ({instance: text}) and restart its agent (SIGKILL; the
    box's supervisor restarts it as systemd would); wait until each answers healthy again."""
    for i, text in texts.items():
        with open(os.path.join(settings.STATE, "hosts", i, "etc-skiff", "agent.toml"), "w") as f:
            f.write(text)
        with open(os.path.join(settings.RUN_DIR, "hosts", i, "agent.pid")) as f:
            pid = int(f.read())
        os.kill(pid, 9)
    time.sleep(1)
    return wait_until(lambda: all((agent_status(box, host_ip(i)) or {}).get("status") == "healthy"
                                        for i in texts), 60, 0.5)


def uncoordinated(box, rate, tag, n, poll=2):
    """Scenario 13: the parameter written without ctl on the fleet stack (as the emulator's
    administrator), every agent configured `update = "follow"` with a `poll_interval` of
    `poll` s: within 3 poll intervals no instance swaps (all still on the old release, the agent
    reports it stale), and each agent said at start that uncoordinated swaps are disabled."""
    sc = Scenario(13, f"parameter -> {tag} without ctl, agents on update = follow")
    images.push_image(tag)
    ids = stack_instances(box)
    old, old_value = parameter(box)
    name = box["outputs"]["ReleaseParameter"]
    ssm = settings.admin_clients(box)("ssm")
    originals = {}
    for i in ids:
        with open(os.path.join(settings.STATE, "hosts", i, "etc-skiff", "agent.toml")) as f:
            originals[i] = f.read()
    uncoordinated_config = {i: re.sub(r'(?m)^poll_interval\s*=.*$', f'poll_interval = "{poll}s"',
                                      re.sub(r'(?m)^update\s*=.*$', 'update = "follow"', t))
                            for i, t in originals.items()}
    load = Load(URL, rate).start()
    try:
        ok = set_agent_config(box, uncoordinated_config)
        sc.check(ok, "agents not healthy again after the restart with update = follow")
        wait_until(lambda: len(loadbalancer.lb_up()) == n, 30, 0.5)
        watch = Watch(box, ids).start()
        t0 = time.monotonic()
        ssm.put_parameter(Name=name, Value=tag, Type="String", Overwrite=True)
        time.sleep(3 * poll + 2)
        statuses = {i: agent_status(box, host_ip(i)) or {} for i in ids}
        watch.stop()
    finally:
        ssm.put_parameter(Name=name, Value=old_value, Type="String", Overwrite=True)
        restored = set_agent_config(box, originals)
        wait_until(lambda: len(loadbalancer.lb_up()) == n, 30, 0.5)
        time.sleep(1)
        counts = load.stop()
    sc.check(restored, "agents not healthy again with the template's config")
    auto_scaling_quiet(sc, watch, t0)
    for i in ids:
        st = statuses.get(i, {})
        sc.check(release_of(st) == old and st.get("stale") is True,
                 f"{i}: runs {release_of(st)}, stale {st.get('stale')} (want {old}, stale)")
        sc.check(not watch.changes(i, "serving", t0) and not [v for _, v in watch.changes(i, "lb", t0) if not v],
                 f"{i} swapped or left the LB: serving {watch.changes(i, 'serving', t0)}, LB {watch.changes(i, 'lb', t0)}")
        try:
            with open(os.path.join(settings.STATE, "hosts", i, "agent.log")) as f:
                said = "uncoordinated in-place swaps are disabled" in f.read()
        except OSError:
            said = False  # the instance is gone (replaced): its log is in logs/ after down
        sc.check(said, f"{i}: the agent did not warn that update = follow is not honoured")
    tags = skiff_tags(box, ids)
    sc.check(all(tags[i].get("skiff:release") == old for i in ids), f"skiff:release: {tags}")
    sc.check(tag not in counts.releases, f"{tag} served {counts.releases[tag]} responses")
    sc.check(parameter(box)[0] == old, f"parameter not restored: {parameter(box)[1]}")
    sc.check(counts.failed == 0, f"failed requests: {counts.failed} (first {counts.first_failure})")
    sc.figures += [f"{3 * poll + 2} s after the write (poll {poll} s): all {n} on {old}, stale", counts.line()]
    sc.done()


def scale_to(box, n, timeout=240):
    name = box["outputs"]["AutoScalingGroup"]
    settings.admin_clients(box)("autoscaling").set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=n,
                                                                 HonorCooldown=False)
    return settle(box, n, timeout)


def imds_delay(box):
    """CreateTags -> visible in a host's IMDS (the box's 0.5 s tags cache plus the call)."""
    iid = stack_instances(box)[0]
    d = sorted(x for x in controller.imds_tag_delay(box, iid, 10) if x is not None)
    return (f"IMDS tag propagation in the box ({iid}, {len(d)}/10 seen): min {d[0]:.2f} s, median "
            f"{d[len(d) // 2]:.2f} s, max {d[-1]:.2f} s (cache {settings.TAGS_MAX_AGE} s)") if d else "IMDS tags never seen"


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
    for ln in settings.run("ip", "netns", "list").stdout.splitlines():
        ns = ln.split()[0]
        if ns.startswith("skf-") and str(pid) in settings.run("ip", "netns", "pids", ns, check=False).stdout.split():
            return ns
    return None


def agent_interval(iid):
    """[health] interval of the agent's rendered config (the agent's own probe period)."""
    try:
        with open(os.path.join(settings.STATE, "hosts", iid, "etc-skiff", "agent.toml")) as f:
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
    asg = settings.admin_clients(box)("autoscaling")
    name = box["outputs"]["AutoScalingGroup"]
    before = group(box)
    victim = sorted(before)[0]
    with open(os.path.join(settings.RUN_DIR, "hosts", victim, "agent.pid")) as f:
        agent_pid = int(f.read())
    ns = namespace_of(agent_pid)
    ip = settings.run("ip", "-n", ns, "-4", "-o", "addr", "show", "eth0").stdout.split()[3].split("/")[0] if ns else None
    # The window in which the dead target still gets requests: the agent's next probe, then
    # UnhealthyThresholdCount failed checks (each within the interval, at most the timeout).
    window = agent_interval(victim) + s["unhealthy"] * s["interval"] + s["timeout"]
    bound = math.ceil(rate / n * window) + math.ceil(rate)  # + 1 s of the generator's slack
    marks = {}
    load = Load(URL, rate).start()
    try:
        time.sleep(2)
        t0 = time.monotonic()
        pids = [int(p) for p in settings.run("ip", "netns", "pids", ns).stdout.split() if int(p) != agent_pid] if ns else []
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

        def watch():
            now = time.monotonic() - t0
            up = loadbalancer.lb_up()
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

        wait_until(watch, 240, 0.25)
    finally:
        time.sleep(1)
        counts = load.stop()
    sc.check(ns and pids, f"no namespace or engine found for {victim} (agent pid {agent_pid})")
    sc.check("Unhealthy" in marks, f"{victim} never marked Unhealthy: {group(box)}")
    sc.check("n serving" in marks, f"no replacement serving behind the LB within 240 s: {group(box)}, LB {loadbalancer.lb_up()}")
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
    images.push_image(tag)
    c = settings.admin_clients(box)
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


# --- handover (issue 17): the new container on the idle slot, the redirect flipped -----------

HANDOVER_BENCH = []  # (what, instances, wall s, floor s or None, failed requests, terms)
HANDOVER_LOAD = []  # how the handover scenarios' load was made, for the table
# Each request holds 20 ms in the graceful app: at 200/s some are always in flight when an old
# container gets its SIGTERM.
HANDOVER_PATH = "/?sleep=0.02"


def host_ns(iid):
    """The host's namespace: skf-N holds 10.201.0.(10+N) (box.py Host)."""
    ip = host_ip(iid)
    return f"skf-{int(ip.rsplit('.', 1)[1]) - 10}" if ip else None


def app_containers(iid):
    """The host's running containers: [(id, PORT from its environment)]."""
    sock = f"unix://{os.path.join(settings.RUN_DIR, 'hosts', iid, 'docker.sock')}"
    ids = settings.run("docker", "-H", sock, "ps", "-q", check=False).stdout.split()
    out = []
    for cid in ids:
        p = settings.run("docker", "-H", sock, "inspect", "-f", "{{json .Config.Env}}", cid, check=False)
        try:
            env = json.loads(p.stdout or "[]")
        except ValueError:
            env = []
        out.append((cid[:12], next((e[5:] for e in env if e.startswith("PORT=")), None)))
    return out


def handover_settled(box, ids, timeout=30):
    """Wait until every host runs one container (the old one got its SIGTERM `hold` after the
    flip and exits within its grace); returns (settled, seconds waited)."""
    t = time.monotonic()
    ok = wait_until(lambda: all(len(app_containers(i)) == 1 for i in ids), timeout, 0.5)
    return bool(ok), time.monotonic() - t


def check_redirects(sc, box, ids):
    """Each host: one app container running, and the agent's redirect sends the app port to the
    slot that container listens on (its PORT)."""
    port = box["settings"]["app_port"]
    slots = []
    for i in ids:
        running = app_containers(i)
        red = network.host_redirect(host_ns(i))
        ports = [p for _, p in running]
        sc.check(len(running) == 1 and str(red.get(port)) in ports,
                 f"{i}: running {running}, redirect {red} (want one container, :{port} -> its PORT)")
        slots.append(red.get(port))
    return slots


class TargetView:
    """HAProxy's own view of the instances' targets across a scenario: its counters (`show stat`)
    at the start and at the end (UP -> DOWN transitions, failed checks, 5xx, response and
    connection errors per server), beside the Watch's samples every 0.5 s."""

    def __init__(self, ids):
        self.ids = ids
        self.before = self.snapshot()

    def snapshot(self):
        stats, servers = loadbalancer.lb_stats(), loadbalancer.lb_servers()
        out = {}
        for i in self.ids:
            ip = host_ip(i)
            name = next((n for n, (addr, _, admin) in servers.items() if addr == ip and not admin & 0x3B), None)
            if name in stats:
                out[i] = stats[name]
        return out

    def check(self, sc, watch, t0):
        after = self.snapshot()
        notes = []
        for i in self.ids:
            b, a = self.before.get(i), after.get(i)
            if not (b and a):
                sc.check(False, f"{i}: no HAProxy server for it (start {bool(b)}, end {bool(a)})")
                continue
            d = {k: int(a.get(k) or 0) - int(b.get(k) or 0) for k in ("chkdown", "chkfail", "hrsp_5xx", "eresp", "econ")}
            sc.check(d["chkdown"] == 0 and a["status"].startswith("UP"),
                     f"{i}: HAProxy took the target out ({d['chkdown']} UP -> DOWN, status now {a['status']})")
            out = [round(t - t0, 1) for t, v in watch.changes(i, "lb", t0) if not v]
            sc.check(not out, f"{i}: HAProxy did not send it traffic at +{out} s")
            if any(d.values()):
                notes.append(f"{i}: " + ", ".join(f"{k} +{v}" for k, v in d.items() if v))
        return "every target UP in HAProxy throughout" + (f" ({'; '.join(notes)})" if notes else " (0 failed checks)")


def handover_load(rate):
    """Keep-alive clients at `rate` through the load balancer, in a process of their own."""
    HANDOVER_LOAD[:] = [f"{rate:g}/s keep-alive on 64 connections, GET {HANDOVER_PATH}"]
    return ProcessLoad(URL.rstrip("/") + HANDOVER_PATH, rate, keepalive=True, connections=64).start()


def agent_hold():
    """[app] hold of the agents' rendered config (5 s when absent, the agent's default)."""
    hosts = os.path.join(settings.STATE, "hosts")
    for iid in sorted(os.listdir(hosts)) if os.path.isdir(hosts) else []:
        try:
            with open(os.path.join(hosts, iid, "etc-skiff", "agent.toml")) as f:
                m = re.search(r'(?m)^hold\s*=\s*"(\d+)s"', f.read())
            return float(m.group(1)) if m else 5.0
        except OSError:
            continue
    return 5.0


def ctl_batches(lines, after_t=0.0):
    """The batches as ctl ran them, from its progress lines (`in-place: batch k/N: switch i-a
    i-b to T`): [(t, [instances])]. Handover batches follow each other within a second or two,
    too fast to tell apart by the tags' timing (Watch.batches)."""
    out = []
    for t, x in lines:
        m = re.search(r"in-place: batch \d+/\d+: switch (.+?) to \S+", x)
        if m and t >= after_t:
            out.append((t, m.group(1).split()))
    return out


def handover_floor(watch, tag, bake, after, lines=None):
    """The floor of a handover release: the slowest pull (all at once), then per batch the
    slowest start-to-healthy (the agent's gate on the slot) and the bake, and the agents' hold
    after the last batch beyond the bake (ctl watches the last batch that long for a flip back:
    ctl/src/inplace.rs HANDOVER_HOLD). No load-balancer term: the target never changes state."""
    batches = ctl_batches(lines) if lines else watch.batches(tag, after)
    known = [watch.pull_ms[(i, tag)] for i in watch.ids if (i, tag) in watch.pull_ms]
    per = []
    for _, ids in batches:
        starts = [watch.start_ms[(i, tag)] for i in ids if (i, tag) in watch.start_ms]
        per.append(max(starts) / 1000 if starts else None)
    if not known or not per or None in per:
        return None, f"floor unknown: pulls {known}, start-to-healthy per batch {per}"
    pull = max(known) / 1000
    hold = max(agent_hold() - bake, 0)
    floor = pull + sum(x + bake for x in per) + hold
    return floor, (f"floor {floor:.1f} s = pull {pull:.1f} + {len(per)} batch(es) x (start-to-healthy "
                   f"{'/'.join(f'{x:.1f}' for x in per)} + bake {bake:g}) + the last batch's hold {hold:g}")


def handover_run(box, rate, ids, ctl_args, on_watch=None, **kw):
    """ctl under the keep-alive load, the load kept on until every old container exited (its
    SIGTERM comes `hold` after the flip, possibly after ctl's end: the pooled connections close
    then) + 1 s. Returns (rc, lines, took, killed, counts, watch, view, t0, settle seconds)."""
    view = TargetView(ids)
    watch = Watch(box, ids).start()
    if on_watch:
        on_watch(watch)
    load = handover_load(rate)
    t0 = time.monotonic()
    try:
        rc, lines, took, killed = ctl_stream(box, *ctl_args, **kw)
        settled, waited = handover_settled(box, ids)
        time.sleep(1)
    finally:
        counts = load.stop()
        watch.stop()
    return rc, lines, took, killed, counts, watch, view, t0, (settled, waited)


def handover_common(sc, box, ids, watch, view, t0, counts, settled):
    auto_scaling_quiet(sc, watch, t0)
    sc.check(settled[0], f"old containers still running {settled[1]:.0f} s after ctl: "
                         f"{ {i: app_containers(i) for i in ids} }")
    slots = check_redirects(sc, box, ids)
    targets = view.check(sc, watch, t0)
    sc.check(counts.failed == 0, f"failed requests: {counts.failed} (first {counts.first_failure}; "
                                 f"statuses {dict(counts.statuses)})")
    return targets, slots


def handover_release(box, rate, tag, n, number, rollback_to=None, bake=0):
    """Scenarios 15, 18 and 21: a handover release (or `ctl rollback`) on n instances under the
    keep-alive load: exit 0, every instance kept and on the release, every target UP in HAProxy
    throughout, each host on one container the redirect points at, 0 failed requests."""
    previous = parameter(box)[0]
    target = rollback_to or tag
    sc = Scenario(number, f"handover {'rollback' if rollback_to else 'release'} {previous} -> {target} on {n} instances")
    if not rollback_to:
        images.push_image(tag)
    ids = stack_instances(box)
    sc.check(len(ids) == n, f"{len(ids)} instances InService, not {n}")
    args = (("rollback", "--strategy", "in-place") if rollback_to else
            ("release", "--tag", tag, "--strategy", "in-place", "--bake", f"{bake}s"))
    rc, lines, took, _, counts, watch, view, t0, settled = handover_run(box, rate, ids, args)
    out = "\n".join(x for _, x in lines)
    sc.check(rc == 0, f"ctl exit {rc}: {out.strip()[-600:]}")
    sc.check(parameter(box)[0] == target, f"parameter holds {parameter(box)[1]}")
    sc.check(set(stack_instances(box)) == set(ids), f"instances changed: {ids} -> {stack_instances(box)}")
    tags = skiff_tags(box, ids)
    sc.check(all(tags[i].get("skiff:release") == target for i in ids),
             f"skiff:release: {[tags[i].get('skiff:release') for i in ids]}")
    targets, slots = handover_common(sc, box, ids, watch, view, t0, counts, settled)
    now = served()
    sc.check(set(now) == {target}, f"the load balancer serves {now}")
    floor, terms = handover_floor(watch, target, bake, t0, lines)
    batches = ctl_batches(lines)
    # a switch line read after the agent already reported the release (the line is timed when
    # ctl's output is read) counts as 0
    per_batch = [max(max((watch.first(i, "serving", target, t - 2) or math.nan) - t, 0) for i in ids_)
                 for t, ids_ in batches]
    ratio = f"{took / floor:.2f}x the floor" if floor else "ratio unknown"
    sc.figures += [f"ctl {took:.1f} s, {ratio}; {terms}",
                   f"batches {[len(b) for _, b in batches]}, switch line -> serving (agent): "
                   f"{', '.join(f'{x:.1f}' for x in per_batch)} s",
                   f"old containers gone {settled[1]:.1f} s after ctl; slots now {slots}", targets, counts.line()]
    HANDOVER_BENCH.append((f"handover {'rollback ' if rollback_to else ''}{previous} -> {target}", n, took, floor,
                           counts.failed, terms))
    sc.done()
    return previous


def handover_failing(box, rate, bad, n, number, fail_after=None):
    """Scenarios 16 and 17: a release that never passes the gate on its slot (16: only the
    canary told, the bad release serves nothing), or passes it and fails `fail_after` s later,
    within the hold (17: the canary's agent flips back by itself and answers skiff:failed; ctl
    may have told later batches meanwhile, the canary being done once it reported the release
    healthy, and reverts them). Both: ctl exit 1 (ctl/README: failed, previous release back),
    parameter back, every instance on the previous release and one container, every target UP
    in HAProxy throughout, 0 failed requests."""
    good = parameter(box)[0]
    what = "never passes its gate" if fail_after is None else f"fails {fail_after:g} s after its gate"
    sc = Scenario(number, f"handover release {bad} that {what}")
    images.push_image(bad, healthy=fail_after is not None, fail_after=fail_after)
    ids = stack_instances(box)
    rc, lines, took, _, counts, watch, view, t0, settled = handover_run(
        box, rate, ids, ("release", "--tag", bad, "--strategy", "in-place"))
    out = "\n".join(x for _, x in lines)
    batches = watch.batches(bad, t0)
    touched = [i for _, b in batches for i in b]
    sc.check(rc == 1, f"ctl exit {rc}, documented 1 (failed, previous release back): {out.strip()[-600:]}")
    sc.check(parameter(box)[0] == good, f"parameter holds {parameter(box)[1]}, not {good}")
    told_at = sorted((t, i) for t, i, w, v in watch.events if w == "skiff:target" and tag_part(v) == bad and t > t0)
    canary = told_at[0][1] if told_at else None
    if fail_after is None:
        sc.check(len(touched) == 1, f"told {bad}: {[(round(t - t0, 1), b) for t, b in batches]} (expected the canary)")
    else:
        flipped_back = next((t for t, v in watch.changes(canary, "skiff:failed", t0) if tag_part(v) == bad), None)
        sc.check(flipped_back is not None, f"the canary {canary} never answered skiff:failed={bad} (its agent's flip back)")
    tags = skiff_tags(box, ids)
    sc.check(all(tags[i].get("skiff:release") == good for i in ids), f"skiff:release: {tags}")
    for i in ids:
        if i not in touched:
            sc.check(not watch.changes(i, "serving", t0), f"{i} (not in the first batch) changed: "
                                                         f"{watch.changes(i, 'serving', t0)}")
    if fail_after is None:
        sc.check(bad not in counts.releases, f"{bad} served {counts.releases[bad]} responses")
    targets, slots = handover_common(sc, box, ids, watch, view, t0, counts, settled)
    now = served()
    sc.check(set(now) == {good}, f"the load balancer serves {now}")
    for i in touched:
        told = next((t for t, v in watch.changes(i, "skiff:target", t0) if tag_part(v) == bad), None)
        failed = next((t for t, v in watch.changes(i, "skiff:failed", t0) if tag_part(v) == bad), None)
        on_bad = watch.first(i, "serving", bad, t0)
        back = watch.first(i, "serving", good, on_bad or told or t0)
        def rel(x):
            return f"+{x - t0:.1f} s" if x else "never"
        sc.figures.append(f"{i}: told {rel(told)}, serving {bad} (agent) {rel(on_bad)}, skiff:failed "
                          f"{rel(failed)}, serving {good} again {rel(back) if on_bad else 'throughout'}")
    line = next((x for _, x in lines if "in-place" in x and re.search(r"fail|revert", x, re.I)), None)
    sc.figures += [f"ctl exit {rc} after {took:.1f} s; told {len(told_at)} instance(s), canary {canary}",
                   f"{bad} served {counts.releases.get(bad, 0)} responses",
                   targets, counts.line()] + ([f"line: {line.strip()[:140]}"] if line else [])
    sc.done()


def handover_agent_killed(box, rate, tag, n):
    """Scenario 19: agents SIGKILLed mid-swap, restarted as systemd would: the canary's before
    the flip (the new container runs beside the old one and the redirect still names the old
    slot; the release is slow to pass /health, 3 s, so that the kill lands there), the next
    instance's after the flip, during the hold (both containers run, the redirect names the new
    slot). Each restarted agent finds its swap and finishes it (gate, flip) or undoes it; the
    release completes (exit 0), 0 failed requests, every target UP in HAProxy throughout (the
    redirect is kernel state: it serves while the agent is away)."""
    sc = Scenario(19, f"agents SIGKILLed mid-handover -> {tag}, before and after the flip")
    images.push_image(tag, slow_start=3)
    ids = stack_instances(box)
    killed, holder = [], []
    stop = threading.Event()
    port = box["settings"]["app_port"]

    def killer():
        # 1st kill: two containers and the redirect on the old one's PORT (before the flip);
        # 2nd, on another instance: two containers and the redirect on the new one's (the hold).
        deadline = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < deadline and len(killed) < 2:
            for i in ids:
                if not holder or tag_part(holder[0].last.get((i, "skiff:target"))) != tag or i in [k[0] for k in killed]:
                    continue
                running = app_containers(i)
                if len(running) < 2:
                    continue
                red = network.host_redirect(host_ns(i)).get(port)
                newest = running[0][1]  # docker ps lists the newest first
                if (str(red) != newest) == (not killed):
                    with open(os.path.join(settings.RUN_DIR, "hosts", i, "agent.pid")) as f:
                        os.kill(int(f.read()), signal.SIGKILL)
                    killed.append((i, time.monotonic(), running, red, "before the flip" if not killed else "during the hold"))
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        rc, lines, took, _, counts, watch, view, t0, settled = handover_run(
            box, rate, ids, ("release", "--tag", tag, "--strategy", "in-place"), on_watch=holder.append)
    finally:
        stop.set()
        t.join(5)
    out = "\n".join(x for _, x in lines)
    sc.check(len(killed) == 2, f"agents caught mid-swap and killed: {[(k[0], k[4]) for k in killed]} (want one "
                               "before the flip and one during the hold)")
    sc.check(rc == 0, f"ctl exit {rc}: {out.strip()[-600:]}")
    sc.check(parameter(box)[0] == tag, f"parameter holds {parameter(box)[1]}")
    tags = skiff_tags(box, ids)
    sc.check(all(tags[i].get("skiff:release") == tag for i in ids), f"skiff:release: {tags}")
    targets, slots = handover_common(sc, box, ids, watch, view, t0, counts, settled)
    now = served()
    sc.check(set(now) == {tag}, f"the load balancer serves {now}")
    for i, at, running, red, when in killed:
        sc.figures.append(f"killed the agent of {i} {when} at +{at - t0:.1f} s ({len(running)} containers on "
                          f"PORTs {[p for _, p in running]}, the redirect on :{red})")
    sc.figures += [f"ctl exit {rc} after {took:.1f} s", targets, counts.line()]
    sc.done()


def handover_ctl_stopped(box, rate, tag, n):
    """Scenario 20: ctl SIGTERMed (a Jenkins abort) once the first batch's instance reports the
    release: ctl tells the switched instances the previous release, waits until they report it,
    writes it back and exits 1 (ctl/README, Signals); 0 failed requests, every target UP in
    HAProxy throughout."""
    good = parameter(box)[0]
    sc = Scenario(20, f"ctl SIGTERMed mid handover release -> {tag}")
    images.push_image(tag)
    ids = stack_instances(box)
    holder = []

    def switched(lines):
        return bool(holder and any(holder[0].last.get((i, "skiff:release")) == tag for i in ids))

    rc, lines, took, stopped, counts, watch, view, t0, settled = handover_run(
        box, rate, ids, ("release", "--tag", tag, "--strategy", "in-place"), on_watch=holder.append,
        kill_when=switched, sig=signal.SIGTERM)
    out = "\n".join(x for _, x in lines)
    first = [i for i in ids if watch.first(i, "skiff:release", tag, t0)]
    sc.check(stopped, f"ctl was not stopped (exit {rc}): {out.strip()[-400:]}")
    sc.check(rc == 1, f"ctl exit {rc}, documented 1 after a signal (previous release back): {out.strip()[-600:]}")
    sc.check(parameter(box)[0] == good, f"parameter holds {parameter(box)[1]}, not {good}")
    tags = skiff_tags(box, ids)
    sc.check(all(tags[i].get("skiff:release") == good for i in ids), f"skiff:release: {tags}")
    targets, slots = handover_common(sc, box, ids, watch, view, t0, counts, settled)
    now = served()
    sc.check(set(now) == {good}, f"the load balancer serves {now}")
    sc.figures += [f"SIGTERM once {first} ran {tag}; ctl exit {rc} after {took:.1f} s", targets, counts.line()]
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
