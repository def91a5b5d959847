"""The controller (`box.py controller`): follows the group's instances in the emulator and boots a
host for each (namespace, dockerd, the real agent with the launch template's user data), serves
them IMDSv2 (testbed/kit/imds.py) with their role's credentials and live tags, puts InService
hosts into HAProxy and reports HAProxy's view to the emulator as the target group's health."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

from loadbalancer import haproxy_cmd, lb_servers
from network import teardown_host
from settings import admin_clients, alive, BoxError, BRIDGE, ENDPOINT, GATEWAY, HAPROXY_SLOTS, IMDS_PORT, load_box, PREFIX, REGION, ROOT, run, RUN_DIR, STATE, TAGS_MAX_AGE
from kit import emulator as kit_emulator  # noqa: E402
from kit import imds as kit_imds  # noqa: E402
from kit import userdata  # noqa: E402
from kit.waits import wait_until  # noqa: E402


# --- the controller: instances -> hosts, IMDSv2, load balancer -----------------------------

class Host:
    """One instance: a network namespace, its dockerd and the agent."""

    def __init__(self, box, instance_id, index):
        self.box, self.id, self.index = box, instance_id, index
        self.ns, self.veth = f"skf-{index}", f"skfv{index}"
        self.ip = f"{PREFIX}.{10 + index}"
        self.dir = os.path.join(STATE, "hosts", instance_id)
        self.run = os.path.join(RUN_DIR, "hosts", instance_id)
        self.sock = os.path.join(self.run, "docker.sock")
        self.token = uuid.uuid4().hex
        self.creds = None
        self.ready = False  # namespace, engine and agent started
        self.stopping = False
        self.lock = threading.Lock()

    def boot(self):
        time.sleep(self.box["boot_delay"])  # EC2's boot before the user data runs
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(self.run, exist_ok=True)
        run("ip", "netns", "add", self.ns)
        run("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        run("ip", "link", "set", self.veth, "master", BRIDGE, "up")
        for cmd in (["addr", "add", f"{self.ip}/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                    ["link", "set", "lo", "up"], ["route", "add", "default", "via", GATEWAY]):
            run("ip", "-n", self.ns, *cmd)
        with open(os.path.join(self.run, "address"), "w") as f:
            f.write(self.ip)  # for the scenarios: the host's address (agent port, IMDS caller)
        with open(os.path.join(self.dir, "daemon.json"), "w") as f:
            f.write("{}\n")  # not the machine's /etc/docker/daemon.json
        # nsenter --net, not `ip netns exec`: that remounts /sys and hides the cgroup mounts.
        # On EC2 the engine's awslogs driver takes the instance role's credentials from IMDS at
        # 169.254.169.254, which the box does not serve: it gets them in its environment.
        self.creds = instance_credentials(self.box, self.id)
        engine_env = dict(os.environ, AWS_ACCESS_KEY_ID=self.creds["AccessKeyId"],
                          AWS_SECRET_ACCESS_KEY=self.creds["SecretAccessKey"],
                          AWS_SESSION_TOKEN=self.creds["Token"], AWS_REGION=REGION)
        self.spawn("dockerd", ["dockerd", "--config-file", os.path.join(self.dir, "daemon.json"),
                               "--bridge=none", "--iptables=false", "--ip6tables=false",
                               "--data-root", os.path.join(self.dir, "docker"),
                               "--exec-root", os.path.join(self.run, "exec"),
                               "-H", f"unix://{self.sock}", "--pidfile", os.path.join(self.run, "docker.pid")],
                   env=engine_env)
        if not wait_until(lambda: run("docker", "-H", f"unix://{self.sock}", "version", check=False).returncode == 0, 60, 0.3):
            raise BoxError(f"{self.id}: dockerd did not answer in 60 s; see {self.dir}/dockerd.log")
        self.creds = instance_credentials(self.box, self.id)
        config = render_config(self.box, self.dir, self.ns)
        env = {"PATH": os.environ["PATH"], "HOME": self.dir, "DOCKER_HOST": f"unix://{self.sock}",
               "AWS_ENDPOINT_URL": ENDPOINT, "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{GATEWAY}:{IMDS_PORT}",
               "AWS_CONFIG_FILE": os.path.join(self.dir, "none"),
               "AWS_SHARED_CREDENTIALS_FILE": os.path.join(self.dir, "none"), "RUST_LOG": "info"}
        self.agent_cmd, self.agent_env = [self.box["agent"], "run", "--config", config], env
        self.agent = self.spawn("agent", self.agent_cmd, env=env)
        self.ready = True
        threading.Thread(target=self.supervise, daemon=True).start()

    def supervise(self):
        """systemd's part (packer/files/skiff-agent.service): Restart=always after RestartSec,
        except for exit 64 (RestartPreventExitStatus: the config is invalid)."""
        restart_sec, prevent = unit_restart()
        while True:
            rc = self.agent.wait()
            if self.stopping:
                return
            if rc in prevent:
                print(f"{time.strftime('%H:%M:%S')} {self.id}: agent exited {rc}: not restarted", flush=True)
                return
            print(f"{time.strftime('%H:%M:%S')} {self.id}: agent exited {rc}, restart in {restart_sec} s", flush=True)
            time.sleep(restart_sec)
            if self.stopping:
                return
            self.agent = self.spawn("agent", self.agent_cmd, env=self.agent_env)

    def spawn(self, name, cmd, env=None):
        log = open(os.path.join(self.dir, f"{name}.log"), "a")
        p = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{self.ns}", *cmd], stdout=log, stderr=log,
                             env=env, start_new_session=True)
        with open(os.path.join(self.run, f"{name}.pid"), "w") as f:
            f.write(str(p.pid))
        return p

    def teardown(self):
        self.stopping = True
        teardown_host(self.ns, self.veth, self.run, self.dir)


def unit_restart():
    """RestartSec and RestartPreventExitStatus of the agent's systemd unit on the AMI."""
    restart_sec, prevent = 2.0, {64}
    try:
        with open(os.path.join(ROOT, "packer", "files", "skiff-agent.service")) as f:
            text = f.read()
        m = re.search(r"(?m)^RestartSec=(\d+)", text)
        restart_sec = float(m.group(1)) if m else restart_sec
        m = re.search(r"(?m)^RestartPreventExitStatus=([\d ]+)", text)
        prevent = {int(x) for x in m.group(1).split()} if m else prevent
    except OSError:
        pass
    return restart_sec, prevent


def instance_credentials(box, instance_id):
    return kit_emulator.instance_credentials(ENDPOINT, box["role_arn"], instance_id, REGION)


def render_config(box, host_dir, ns):
    """Run the launch template's user data in the host's namespace (its IMDSv2 answers there)
    with /etc/skiff redirected into the host's folder and a systemctl that only records (the
    controller starts the agent; testbed/kit/userdata.py). A [logs] section gets `endpoint` =
    the emulator: the engine's awslogs driver would otherwise go to the regional CloudWatch Logs
    endpoint."""
    c = admin_clients(box)
    versions = c("ec2").describe_launch_template_versions(LaunchTemplateId=box["launch_template"])
    user_data = max(versions["LaunchTemplateVersions"], key=lambda v: v["VersionNumber"])["LaunchTemplateData"]["UserData"]
    try:
        path = userdata.run_user_data(
            user_data, host_dir, env={"AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{GATEWAY}:{IMDS_PORT}"},
            prefix=("nsenter", f"--net=/var/run/netns/{ns}"))
    except (RuntimeError, ValueError) as e:
        raise BoxError(f"{ns}: {e}") from None
    with open(path) as f:
        text = f.read()
    if re.search(r"(?m)^\[logs\]", text) and not re.search(r"(?m)^endpoint\s*=", text):
        text = re.sub(r"(?m)^\[logs\]\n", f'[logs]\nendpoint = "{ENDPOINT}"\n', text, count=1)
        with open(path, "w") as f:
            f.write(text)
    return path


# Polls the box's IMDS from inside a host's namespace (the IMDS tells hosts apart by address):
# reads lines "<key> <value>" on stdin, answers each with the monotonic time (CLOCK_MONOTONIC is
# system-wide) at which tags/instance/<key> first read <value>, or "timeout".
IMDS_PROBE = r"""
import sys, time, urllib.request
base = sys.argv[1]
def call(path, method="GET", headers=None):
    req = urllib.request.Request(base + path, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
_, token = call("/latest/api/token", "PUT", {"X-aws-ec2-metadata-token-ttl-seconds": "300"})
print("ready", flush=True)
for line in sys.stdin:
    key, value = line.split()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        code, body = call("/latest/meta-data/tags/instance/" + key, headers={"X-aws-ec2-metadata-token": token})
        if code == 200 and body == value:
            print(time.monotonic(), flush=True)
            break
        time.sleep(0.01)
    else:
        print("timeout", flush=True)
"""


def imds_tag_delay(box, instance_id, samples=10, key="skiff-box:probe"):
    """CreateTags (as the emulator's administrator) -> the value visible in the box's IMDS, as
    the host of `instance_id` reads it: `samples` delays in seconds (None for one not seen
    within 10 s). The probe tag is deleted afterwards."""
    with open(os.path.join(RUN_DIR, "hosts", instance_id, "address")) as f:
        ip = f.read().strip()
    ns = next((n.split()[0] for n in run("ip", "netns", "list").stdout.splitlines()
               if n.startswith("skf-") and ip in run("ip", "-n", n.split()[0], "-4", "-o", "addr").stdout), None)
    if not ns:
        raise BoxError(f"{instance_id}: no namespace holds {ip}")
    ec2 = admin_clients(box)("ec2")
    p = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{ns}", sys.executable, "-c", IMDS_PROBE,
                          f"http://{GATEWAY}:{IMDS_PORT}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    delays = []
    try:
        if p.stdout.readline().strip() != "ready":
            raise BoxError(f"{instance_id}: the IMDS probe did not start")
        for _ in range(samples):
            value = uuid.uuid4().hex[:12]
            p.stdin.write(f"{key} {value}\n")
            p.stdin.flush()
            t0 = time.monotonic()
            ec2.create_tags(Resources=[instance_id], Tags=[{"Key": key, "Value": value}])
            seen = p.stdout.readline().strip()
            delays.append(None if seen == "timeout" else float(seen) - t0)
            time.sleep(0.3)  # not in step with the cache
    finally:
        p.stdin.close()
        p.wait(15)
        ec2.delete_tags(Resources=[instance_id], Tags=[{"Key": key}])
    return delays


class Controller:
    def __init__(self, box):
        self.box = box
        self.last_states = {}
        self.c = admin_clients(box)
        self.asg = self.c("autoscaling")
        self.ec2 = self.c("ec2")  # made here once: the IMDS threads share it (boto3 clients are thread safe)
        self.tags = {}  # instance id -> (read at, {key: value}): the IMDS tags cache
        self.tags_lock = threading.Lock()
        self.group = box["outputs"]["AutoScalingGroup"]
        self.hosts = {}  # instance id -> Host
        self.leaving = set()  # indices of hosts being torn down
        self.slots = {}  # instance id -> haproxy slot
        self.lb = {}  # instance id -> "ready" | ("drain", since) | "maint"
        self.registered = {}  # instance id -> (registered at, seen up since)
        self.reported = None  # the target states last reported to the emulator
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def host_by_ip(self, ip):
        with self.lock:
            return next((h for h in self.hosts.values() if h.ip == ip), None)

    def instance_tags(self, instance_id):
        """The instance's live EC2 tags, as the instance metadata's tags/instance category shows
        them: read from the emulator (DescribeTags on the instance), cached at most TAGS_MAX_AGE
        so that agents polling their tags every second cost one call per instance and second.
        AWS: "If you add or remove an instance tag, the instance metadata is updated while the
        instance is running" (no delay given):
        https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/work-with-tags-in-IMDS.html"""
        now = time.monotonic()
        with self.tags_lock:
            cached = self.tags.get(instance_id)
            if cached and now - cached[0] < TAGS_MAX_AGE:
                return cached[1]
        tags, token = {}, None
        while True:
            page = self.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [instance_id]}],
                                          **({"NextToken": token} if token else {}))
            tags.update({t["Key"]: t["Value"] for t in page["Tags"]})
            token = page.get("NextToken")
            if not token:
                break
        with self.tags_lock:
            self.tags[instance_id] = (now, tags)
        return tags

    def states(self):
        g = self.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[self.group])["AutoScalingGroups"]
        return {i["InstanceId"]: i["LifecycleState"] for i in (g[0]["Instances"] if g else [])}

    def imds_instance(self, ip):
        """The instance the box's IMDS answers for a caller's address (each host has its own)."""
        host = self.host_by_ip(ip)
        if host is None:
            return None
        return kit_imds.Instance(
            id=host.id, role=self.box["role_name"], creds=host.creds, region=REGION, ip=host.ip,
            token=host.token, tags=lambda: self.instance_tags(host.id),
            lifecycle_state=lambda: self.last_states.get(host.id))

    def boot(self, host):
        try:
            host.boot()
            print(f"{time.strftime('%H:%M:%S')} {host.id}: host {host.ns} {host.ip} booted", flush=True)
        except Exception as e:  # the instance stays silent: its launch hook times out, as on EC2
            print(f"{time.strftime('%H:%M:%S')} {host.id}: boot failed: {e}", flush=True)

    def free_index(self):
        # A host still being torn down keeps its namespace, link and address until it is gone.
        used = {h.index for h in self.hosts.values()} | self.leaving
        return next(i for i in range(1, 200) if i not in used)

    def teardown(self, host):
        try:
            host.teardown()
        finally:
            with self.lock:
                self.leaving.discard(host.index)

    def free_slot(self):
        used = set(self.slots.values())
        return next(i for i in range(1, HAPROXY_SLOTS + 1) if i not in used)

    def balance(self, states):
        """Targets follow the group: registered when InService, draining for the deregistration
        delay once the instance is terminating or gone, then removed.
        https://docs.aws.amazon.com/autoscaling/ec2/userguide/attach-load-balancer-asg.html
        https://docs.aws.amazon.com/elasticloadbalancing/latest/application/load-balancer-target-groups.html#deregistration-delay"""
        now = time.monotonic()
        delay = self.box["settings"]["deregistration_delay"]
        for iid, host in list(self.hosts.items()):
            state = states.get(iid)
            current = self.lb.get(iid)
            if state == "InService" and host.ready and current is None:
                slot = self.free_slot()
                self.slots[iid] = slot
                srv = f"app/h{slot}"
                # A new target starts unhealthy and serves once it passed HealthyThresholdCount
                # checks (`initial`, then `healthy`). In this order and in one command line:
                # `health down` before `state ready` is lost, and the target would serve at once.
                haproxy_cmd(f"set server {srv} addr {host.ip} port {self.box['settings']['app_port']}; "
                            f"set server {srv} state ready; set server {srv} health down")
                self.lb[iid] = "ready"
                self.registered[iid] = (now, False)
                print(f"{time.strftime('%H:%M:%S')} {iid}: registered as {srv} ({host.ip})", flush=True)
            elif current == "ready" and (state is None or state.startswith("Terminating")):
                haproxy_cmd(f"set server app/h{self.slots[iid]} state drain")
                self.lb[iid] = ("drain", now)
                print(f"{time.strftime('%H:%M:%S')} {iid}: deregistering (draining {delay} s)", flush=True)
            elif isinstance(current, tuple) and now - current[1] >= delay:
                haproxy_cmd(f"set server app/h{self.slots[iid]} state maint")
                self.lb[iid] = "maint"

    def target_states(self, servers, now):
        """The target group's view of each registered instance, from HAProxy's: `healthy` while
        HAProxy sends it traffic, `initial` until it passed its first checks (or failed
        UnhealthyThresholdCount of them), then `unhealthy` when HAProxy took it out, `draining`
        while it deregisters; a removed target is left out (`unused`).
        https://docs.aws.amazon.com/elasticloadbalancing/latest/application/target-group-health-checks.html"""
        s = self.box["settings"]
        first_checks = s["unhealthy"] * s["interval"] + s["timeout"]
        out = {}
        for iid, lb in self.lb.items():
            if isinstance(lb, tuple):
                out[iid] = "draining"
                continue
            if lb != "ready" or iid not in self.slots:
                continue
            _, op, _ = servers.get(f"h{self.slots[iid]}", (None, 0, 0))
            since, seen_up = self.registered.get(iid, (now, False))
            if op == 2:
                self.registered[iid] = (since, True)
                out[iid] = "healthy"
            elif seen_up or now - since >= first_checks:
                out[iid] = "unhealthy"
            else:
                out[iid] = "initial"
        return out

    def report_health(self):
        """Feed the load balancer's view back to the emulator: with the group's HealthCheckType
        ELB the emulator replaces an instance reported unhealthy after the grace period
        (testbed/emulator/health.py), as Auto Scaling does with the ALB's target health."""
        targets = self.target_states(lb_servers(), time.monotonic())
        if targets == self.reported:
            return
        req = urllib.request.Request(
            f"{ENDPOINT}/skiff-emulator/target-health", method="POST",
            data=json.dumps({"group": self.group, "region": REGION, "targets": targets}).encode())
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read()
        changed = {i: st for i, st in targets.items() if (self.reported or {}).get(i) != st}
        print(f"{time.strftime('%H:%M:%S')} target health: {changed}", flush=True)
        self.reported = targets

    def loop(self):
        while not self.stop.is_set():
            try:
                states = self.states()  # also advances the emulator's lazy hook and refresh clocks
            except Exception as e:
                print(f"describe failed: {e}", flush=True)
                self.stop.wait(1)
                continue
            self.last_states = states
            with self.lock:
                for iid, state in states.items():
                    if iid not in self.hosts and not state.startswith("Terminat"):
                        host = Host(self.box, iid, self.free_index())
                        self.hosts[iid] = host
                        print(f"{time.strftime('%H:%M:%S')} {iid}: {state}, booting {host.ns} ({host.ip})", flush=True)
                        threading.Thread(target=self.boot, args=(host,), daemon=True).start()
            try:
                self.balance(states)
                self.report_health()
            except OSError as e:
                print(f"haproxy or target health: {e}", flush=True)
            with self.lock:
                for iid in [i for i in self.hosts if i not in states]:
                    # Gone from the group (its terminate hook answered or timed out): torn down
                    # once the load balancer let it go.
                    if self.lb.get(iid) in (None, "maint"):
                        host = self.hosts.pop(iid)
                        self.lb.pop(iid, None)
                        self.slots.pop(iid, None)
                        self.registered.pop(iid, None)
                        print(f"{time.strftime('%H:%M:%S')} {iid}: terminated, tearing down {host.ns}", flush=True)
                        self.leaving.add(host.index)
                        threading.Thread(target=self.teardown, args=(host,), daemon=True).start()
            self.stop.wait(0.5)


def controller(args):
    box = load_box()
    if not box:
        raise BoxError("no box: box.py up")
    ctl = Controller(box)
    signal.signal(signal.SIGTERM, lambda *a: ctl.stop.set())
    # IMDSv2 for every host, told apart by the caller's address.
    kit_imds.Server((GATEWAY, IMDS_PORT), ctl.imds_instance)
    print(f"{time.strftime('%H:%M:%S')} controller following group {ctl.group}", flush=True)
    ctl.loop()
    return 0


def controller_alive():
    try:
        with open(os.path.join(RUN_DIR, "controller.pid")) as f:
            return alive(int(f.read()))
    except (OSError, ValueError):
        return False


def group_states(box):
    try:
        return Controller(box).states()
    except Exception as e:
        return f"unknown ({e})"
