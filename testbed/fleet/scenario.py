"""What every scenario of scenarios.py uses: a Scenario's checks and figures, ctl runs (whole or
streamed), the load through the load balancer, a Watch of the hosts' agents, tags and LB state,
and the box's views (parameter, group, served releases, model times). The run's tables
(results, BENCH, ...) are lists the scenarios append to."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import box as fleet  # noqa: E402
import controller  # noqa: E402
import loadbalancer  # noqa: E402
import settings  # noqa: E402
from load import Load  # noqa: E402


from kit.waits import wait_until  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

RUN = uuid.uuid4().hex[:6]
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


# --- in place (issue 13): ctl steers the running instances through their EC2 tags -------------

SKIFF_TAGS = ("skiff:target", "skiff:pull", "skiff:pulled", "skiff:failed", "skiff:release")


def tag_part(value):
    """The tag of a tag value `tag[@digest]` (instance_tags::encode), or None."""
    return value.split("@")[0] if value else None


def agent_log(iid):
    """The lines of the instance's agent log: in its host folder while it runs, in logs/ once
    the instance is gone (network.py copies it there before removing the folder)."""
    for folder in (os.path.join(settings.STATE, "hosts", iid), os.path.join(settings.STATE, "logs", iid)):
        try:
            with open(os.path.join(folder, "agent.log")) as f:
                return f.readlines()
        except OSError:
            continue
    return []


def agent_answers(iid, key):
    """The values the instance's agent says it wrote to tag `key` ("answered on the instance
    tags" in its JSON log), in order. The watch samples tags every 0.5 s and can miss an answer
    the agent withdraws within a second (a failure forgotten once ctl reverted the target); the
    agent's own log cannot."""
    said = []
    for line in agent_log(iid):
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("message") == "answered on the instance tags" and e.get("key") == key:
            said.append(e.get("value", ""))
    return said


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


def agent_metric(box, iid, series):
    """The value of one series of the instance's agent's /metrics (`series` as printed, with
    its labels), or None when the agent does not answer or has no such series."""
    try:
        with urllib.request.urlopen(f"http://{host_ip(iid)}:{box['settings']['health_port']}/metrics",
                                    timeout=2) as r:
            text = r.read().decode()
    except (OSError, TypeError):
        return None
    m = re.search(r"(?m)^" + re.escape(series) + r" (\S+)$", text)
    return float(m.group(1)) if m else None


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


def auto_scaling_quiet(sc, watch, t0):
    """The rollout must not have made Auto Scaling act: with the group's HealthCheckType ELB an
    instance whose target the load balancer reports unhealthy is replaced
    (https://docs.aws.amazon.com/autoscaling/ec2/userguide/as-add-elb-healthcheck.html)."""
    acted = watch.auto_scaling(t0)
    sc.check(not acted, "Auto Scaling acted during the rollout (HealthCheckType ELB): " + "; ".join(acted[:8]))


def stack_instances(box):
    return sorted(i for i, st in group(box).items() if st == "InService")


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
