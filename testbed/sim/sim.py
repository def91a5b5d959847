#!/usr/bin/env python3
"""A fleet of simulated hosts (no engines) against the emulator with AWS's request limits on,
driving the real ctl binary: `ctl status`, an in-place release whose first batch fails and its
revert, and an instance refresh. Prints what each phase asked of AWS against each bucket
(calls per second, peak and mean, refusals), its wall time and ctl's peak RSS.

    testbed/sim/sim.py [--instances 1000] [--ctl target/debug/ctl] [--check]

It starts an emulator of its own (testbed/emulator/server.py on a free port: its buckets are not
shared with other runs, and a flood here throttles nobody else) and stops it at the end.

The hosts answer the instance-tag protocol (release/src/instance_tags.rs) as the agent does
(agent/src/autoscaling.rs, agent/src/supervise): each loop turn a host reads its instructions
from its instance metadata (local, no API call: the emulator's /skiff-emulator/instance-metadata
answers for all hosts at once), pulls `skiff:pull` and answers `skiff:pulled`, switches to
`skiff:target` and answers `skiff:release` (the tag) or, for a release that fails on it,
`skiff:failed` (and keeps what it ran). A new instance boots: it reads the release parameter
(GetParameter) and answers `skiff:release`. Every answer is one CreateTags of the host's
instance, tried as the agent tries it (up to 3 attempts with doubling, jittered backoff from 1 s,
each an SDK call with 3 attempts); one not delivered is tried again on a later turn.

--check exits 1 unless: ctl status answered for every instance; the failing release was
reverted on every instance (each runs v1, answers match what each host did); no host answer
was lost (every host's tags say what it did); the refresh succeeded when its 2N targets fit the
1,000-target quota and failed when they did not. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "testbed"))
from kit.net import free_port  # noqa: E402
REGION = "us-east-1"
PULL, PULLED, TARGET, RELEASE, FAILED = (
    "skiff:pull", "skiff:pulled", "skiff:target", "skiff:release", "skiff:failed")
THROTTLING = {"RequestLimitExceeded", "Throttling", "ThrottlingException"}


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


class Emulator:
    """testbed/emulator/server.py on a free port, with the limits on."""

    def __init__(self, python: str, folder: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="skiff-sim-emulator-", suffix=".log", delete=False)
        env = dict(os.environ, SKIFF_EMULATOR_RATE_LIMITS="on")
        self.proc = subprocess.Popen(
            [python, os.path.join(folder, "server.py"), "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                get_json(f"{self.url}/skiff-emulator/version")
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the emulator did not start; see {self.log.name}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def client(self, service: str, key: str, attempts: int = 3):
        return boto3.client(
            service, region_name=REGION, endpoint_url=self.url, aws_access_key_id=key,
            aws_secret_access_key="testing",
            config=Config(retries={"mode": "standard", "max_attempts": attempts},
                          max_pool_connections=64))

    def rates(self) -> list[dict]:
        return get_json(f"{self.url}/skiff-emulator/rates")

    def calls(self, key: str) -> dict:
        return get_json(f"{self.url}/skiff-emulator/calls?key={key}")

    def metadata(self, group: str) -> dict:
        return get_json(f"{self.url}/skiff-emulator/instance-metadata?group={group}&region={REGION}")


class Host:
    """What one host runs and remembers (the agent's state), not what its tags say."""

    def __init__(self, iid: str):
        self.id = iid
        self.runs: str | None = None      # the tag it runs healthy
        self.pulled: str | None = None    # the release value it pulled
        self.failed: str | None = None    # the release value that failed here
        self.busy_until = 0.0             # a pull or switch in progress
        self.sending = False              # an answer in flight


class Fleet:
    """Every simulated host, one loop turn a second (all hosts read their metadata each turn)."""

    def __init__(self, emu: Emulator, group: str, param: str, fails: set[str], turn: float = 1.0):
        self.emu, self.group, self.param, self.fails, self.turn = emu, group, param, fails, turn
        self.hosts: dict[str, Host] = {}
        self.pool = futures.ThreadPoolExecutor(max_workers=48)
        self.local = threading.local()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.stats = {"answers": 0, "answer_attempts": 0, "sdk_throttled_answers": 0,
                      "answers_not_delivered": 0, "boots": 0}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _client(self, service: str):
        c = getattr(self.local, service, None)
        if c is None:
            c = self.emu.client(service, "simhosts")
            setattr(self.local, service, c)
        return c

    def start(self):
        self.thread.start()

    def close(self):
        self.stop.set()
        self.thread.join()
        self.pool.shutdown(wait=True)

    def _answer(self, host: Host, key: str, value: str) -> None:
        """The agent's put_tag: 3 attempts, backoff 1 s doubling with jitter, within 30 s."""
        ec2 = self._client("ec2")
        delivered = False
        for attempt in range(3):
            with self.lock:
                self.stats["answer_attempts"] += 1
            try:
                ec2.create_tags(Resources=[host.id], Tags=[{"Key": key, "Value": value}])
                delivered = True
                break
            except ClientError as e:
                if e.response["Error"]["Code"] not in THROTTLING:
                    raise
                with self.lock:
                    self.stats["sdk_throttled_answers"] += 1
                time.sleep(random.uniform(0, 2 ** attempt))
        with self.lock:
            self.stats["answers" if delivered else "answers_not_delivered"] += 1
            host.sending = False

    def _boot(self, host: Host) -> None:
        ssm = self._client("ssm")
        while not self.stop.is_set():
            try:
                value = json.loads(ssm.get_parameter(Name=self.param)["Parameter"]["Value"])
                break
            except ClientError as e:
                if e.response["Error"]["Code"] not in THROTTLING:
                    raise
                time.sleep(random.uniform(0, 5))
        else:
            return
        with self.lock:
            host.runs = value["tag"]
            self.stats["boots"] += 1
        self._answer(host, RELEASE, value["tag"])

    def _send(self, host: Host, fn, *args) -> None:
        host.sending = True
        self.pool.submit(fn, host, *args)

    def _run(self) -> None:
        while not self.stop.is_set():
            began = time.monotonic()
            try:
                view = self.emu.metadata(self.group)
            except OSError:
                time.sleep(self.turn)
                continue
            now = time.monotonic()
            for iid, m in view.items():
                if m["lifecycle"] != "InService":
                    continue
                with self.lock:
                    host = self.hosts.get(iid)
                    if host is None:
                        host = self.hosts[iid] = Host(iid)
                    if host.sending or now < host.busy_until:
                        continue
                tags = m["tags"]
                if host.runs is None:
                    self._send(host, self._boot)
                    continue
                self._turn(host, tags, now)
            time.sleep(max(0.0, self.turn - (time.monotonic() - began)))

    def _turn(self, host: Host, tags: dict, now: float) -> None:
        """One loop turn of the agent on `host`, given its tags (as its metadata shows them)."""
        # An answer the tags do not show yet is sent again (the agent retries undelivered ones).
        for key, value in ((RELEASE, host.runs), (PULLED, host.pulled), (FAILED, host.failed)):
            if value is not None and tags.get(key, "") != value:
                self._send(host, self._answer, key, value)
                return
        pull, target = tags.get(PULL, ""), tags.get(TARGET, "")
        if host.failed and target and target != host.failed:
            host.failed = ""  # the instruction moved on: the report is withdrawn (empty value)
            return
        if pull and pull != host.pulled:
            host.busy_until = now + random.uniform(1, 3)  # the pull
            host.pulled = pull
            return
        if target and target != host.failed:
            tag = target.split("@", 1)[0]
            if tag != host.runs:
                host.busy_until = now + random.uniform(1, 3)  # the switch and its health gate
                if tag in self.fails:
                    host.failed = target
                else:
                    host.runs = tag

    def lost_answers(self, view: dict) -> list[str]:
        """Hosts whose tags do not say what they did."""
        lost = []
        for iid, host in self.hosts.items():
            tags = view.get(iid, {}).get("tags", {})
            for key, value in ((RELEASE, host.runs), (PULLED, host.pulled), (FAILED, host.failed)):
                if value is not None and tags.get(key, "") != value:
                    lost.append(f"{iid} {key}={value} (tags say {tags.get(key)!r})")
        return lost


def run_ctl(ctl: str, emu: Emulator, key: str, args: list[str]) -> dict:
    """The real ctl under access key `key`: exit code, output, wall time, peak RSS.

    The peak RSS is ctl's own: its VmHWM (/proc/<pid>/status), read every 20 ms until it
    exits. Not the child's ru_maxrss from wait4: Linux carries the high-water mark of the
    memory the child started in across exec, and a child this process spawns (vfork) starts
    in the simulation's own memory, so ru_maxrss reports the simulation's RSS (170 MiB and
    more at 1,000 hosts) whenever it is larger than ctl's."""
    env = dict(os.environ, AWS_ENDPOINT_URL=emu.url, AWS_ACCESS_KEY_ID=key,
               AWS_SECRET_ACCESS_KEY="testing", AWS_REGION=REGION)
    for k in ("SKIFF_STACK", "SKIFF_PARAMETER", "SKIFF_ASG", "SKIFF_IMAGE", "SKIFF_TARGET_GROUP",
              "AWS_PROFILE", "BUILD_TAG"):
        env.pop(k, None)
    out = tempfile.TemporaryFile()
    began = time.monotonic()
    proc = subprocess.Popen([ctl, *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    peak_kib = 0
    while proc.poll() is None:
        peak_kib = max(peak_kib, vm_hwm_kib(proc.pid))
        time.sleep(0.02)
    wall = time.monotonic() - began
    out.seek(0)
    return {"code": proc.returncode, "output": out.read().decode(errors="replace"),
            "wall": wall, "rss_mib": peak_kib / 1024}


def vm_hwm_kib(pid: int) -> int:
    """The peak RSS of process `pid` so far (VmHWM, KiB); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tail(output: str, lines: int = 6, width: int = 300) -> str:
    """ctl's last lines, each cut to `width` (a refresh's failure names every instance)."""
    return "\n".join(f"  {line[:width]}" for line in output.strip().splitlines()[-lines:])


def bucket_report(before: list[dict], after: list[dict], seconds: float) -> list[str]:
    """Calls per bucket between two /rates snapshots: total, peak second, mean, refusals."""
    prior = {(b["family"]): b for b in before}
    lines = []
    for b in after:
        p = prior.get(b["family"])
        calls = b["calls_per_second"]
        if p:  # the seconds since the earlier snapshot
            skip = p["first_second"] + len(p["calls_per_second"]) - 1 - b["first_second"]
            base = p["calls_per_second"][-1] if p["calls_per_second"] else 0
            calls = calls[max(0, skip):]
            if calls and skip >= 0:
                calls = [calls[0] - base, *calls[1:]]
        total = sum(calls)
        throttled = b["throttled"] - (p["throttled"] if p else 0)
        if total == 0:
            continue
        lines.append(f"  {b['family']:<34} {total:>6} calls  peak {max(calls):>4}/s  "
                     f"mean {total / max(seconds, 1):6.1f}/s  throttled {throttled:>5}  "
                     f"(bucket {b['size']}, +{b['refill']:g}/s{', assumed' if b['assumed'] else ''})")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--ctl", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "debug", "ctl"))
    ap.add_argument("--emulator", default=os.path.join(ROOT, "testbed/emulator"),
                    help="the emulator's folder (server.py)")
    ap.add_argument("--check", action="store_true", help="exit 1 unless the run was correct")
    ap.add_argument("--skip-refresh", action="store_true")
    ap.add_argument("--batch-timeout", default="10m")
    a = ap.parse_args()
    if not os.access(a.ctl, os.X_OK):
        raise SystemExit(f"no ctl binary at {a.ctl}: build it (cargo build -p skiff-ctl) or pass --ctl")
    n = a.instances
    emu = Emulator(sys.executable, a.emulator)
    problems: list[str] = []
    try:
        name = f"skiff-sim-{os.getpid()}-{int(time.time())}"
        setup_key = "simsetup"
        ec2 = emu.client("ec2", setup_key, attempts=20)
        asg = emu.client("autoscaling", setup_key, attempts=20)
        elb = emu.client("elbv2", setup_key, attempts=20)
        ssm = emu.client("ssm", setup_key, attempts=20)
        ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        lt = ec2.create_launch_template(
            LaunchTemplateName=name,
            LaunchTemplateData={"ImageId": ami, "InstanceType": "t3.micro"},
        )["LaunchTemplate"]["LaunchTemplateId"]
        vpc = ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
        tg = elb.create_target_group(Name=f"sim{os.getpid()}", Protocol="HTTP", Port=8080,
                                     VpcId=vpc, TargetType="instance")["TargetGroups"][0]["TargetGroupArn"]
        param = f"/{name}/release"
        ssm.put_parameter(Name=param, Type="String", Value='{"tag":"v1"}')
        began = time.monotonic()
        asg.create_auto_scaling_group(
            AutoScalingGroupName=name, MinSize=0, MaxSize=2 * n, DesiredCapacity=n,
            AvailabilityZones=["us-east-1a"], TargetGroupARNs=[tg],
            LaunchTemplate={"LaunchTemplateId": lt})
        print(f"group {name}: {n} instances launched in {time.monotonic() - began:.1f} s", flush=True)

        base = ["--parameter", param, "--asg", name, "--image", "127.0.0.1:5000/skiff/app",
                "--target-group", tg]
        fleet = Fleet(emu, name, param, fails={"v2"})

        def phase(title: str, action, settle=None):
            before = emu.rates()
            t0 = time.monotonic()
            result = action()
            if settle:
                settle()
            secs = time.monotonic() - t0
            print(f"\n== {title}: {secs:.1f} s", flush=True)
            for line in bucket_report(before, emu.rates(), secs):
                print(line)
            return result

        def booted():
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline:
                view = emu.metadata(name)
                if sum(1 for m in view.values() if m["tags"].get(RELEASE) == "v1") >= n:
                    return
                time.sleep(1)
            problems.append("boot: not every host answered skiff:release=v1 within 30 min")

        fleet.start()
        phase(f"boot storm: {n} hosts read the parameter and answer skiff:release", lambda: None, booted)
        print(f"  hosts: {fleet.stats}")

        st = phase("ctl status", lambda: run_ctl(a.ctl, emu, "simstatus", [*base, "--json", "status"]))
        print(f"  ctl exit {st['code']}, wall {st['wall']:.1f} s, peak RSS {st['rss_mib']:.1f} MiB; "
              f"calls {emu.calls('simstatus')}")
        if st["code"] != 0:
            problems.append(f"ctl status exited {st['code']}: {st['output'][-2000:]}")
        else:
            doc = json.loads(st["output"][st["output"].index("{"):])
            if len(doc.get("instances", [])) != n:
                problems.append(f"ctl status listed {len(doc.get('instances', []))} of {n} instances")

        rel = phase(
            "ctl release v2 in place (the first batch fails: revert)",
            lambda: run_ctl(a.ctl, emu, "siminplace", [
                *base, "release", "--tag", "v2", "--skip-verify", "--strategy", "in-place",
                "--batch", "10", "--batch-timeout", a.batch_timeout]))
        print(f"  ctl exit {rel['code']}, wall {rel['wall']:.1f} s, peak RSS {rel['rss_mib']:.1f} MiB; "
              f"calls {emu.calls('siminplace')}")
        print(tail(rel["output"]))
        if rel["code"] == 0:
            problems.append("the failing release v2 succeeded")
        time.sleep(5)  # the hosts' last answers
        view = emu.metadata(name)
        not_v1 = sorted(i for i, m in view.items()
                        if m["lifecycle"] == "InService" and fleet.hosts.get(i)
                        and fleet.hosts[i].runs != "v1")
        if not_v1:
            problems.append(f"revert incomplete: {len(not_v1)} host(s) do not run v1: {not_v1[:5]}")
        lost = fleet.lost_answers(view)
        if lost:
            problems.append(f"{len(lost)} host answer(s) lost: {lost[:5]}")
        print(f"  hosts: {fleet.stats}")

        if not a.skip_refresh:
            ref = phase(
                "ctl release v3 by instance refresh (min 100 %, max 200 %)",
                lambda: run_ctl(a.ctl, emu, "simrefresh", [
                    *base, "release", "--tag", "v3", "--skip-verify", "--strategy", "refresh",
                    "--timeout", "15m"]))
            print(f"  ctl exit {ref['code']}, wall {ref['wall']:.1f} s, peak RSS {ref['rss_mib']:.1f} MiB; "
                  f"calls {emu.calls('simrefresh')}")
            print(tail(ref["output"]))
            # A 100/200 % refresh needs 2N targets in the group's target group (quota 1,000).
            fits = 2 * n <= 1000
            if (ref["code"] == 0) != fits:
                problems.append(f"the refresh of {n} instances (2N targets {'within' if fits else 'past'} "
                                f"the 1,000 quota) exited {ref['code']}")
            print(f"  hosts: {fleet.stats}")
        fleet.close()
    finally:
        emu.stop()
    for p in problems:
        print(f"PROBLEM: {p}")
    print(f"emulator log: {emu.log.name}")
    return 1 if (a.check and problems) else 0


if __name__ == "__main__":
    sys.exit(main())
