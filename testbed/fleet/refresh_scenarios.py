"""Scenarios 1-8 with the refresh strategy (the default): release, agent killed, AWS away,
unhealthy release, rollback, engine killed, scale-out during a release."""

import math
import os
import threading
import time
import images  # noqa: E402
import loadbalancer  # noqa: E402
import settings  # noqa: E402
from load import Load  # noqa: E402

from scenario import agent_interval, ctl, group, model, namespace_of, parameter, REFRESH_BENCH, refresh_seconds, RUN, Scenario, served, settle, URL, with_load
from kit.waits import wait_until  # noqa: E402
from unsigned import refresh_unsigned


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
    refresh_unsigned(box, sc, rate, f"r{RUN}un", n)
    sc.done()
