#!/usr/bin/env python3
"""AWS's request rates and the target quota through the API (limits.py's rules, applied by
limits_gate.py and throttle.py): starts its own server (a free port, its own buckets, stopped at
the end) and drives it with boto3 without retries, so each refusal is seen as AWS answers it.
Prints one line per check and 'N passed, N failed'."""

import concurrent.futures as futures
import json
import os
import subprocess
import sys
import time
import urllib.request

import boto3
from botocore.config import Config

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from kit.checks import check as _check, summary  # noqa: E402
from kit.emulator import error_code  # noqa: E402
from kit.net import free_port  # noqa: E402


def check(name, got, want):
    _check(name, got == want, f"got {got!r}, want {want!r}")


def main():
    port = free_port()
    server = subprocess.Popen([sys.executable, os.path.join(HERE, "server.py"), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/skiff-emulator/version", timeout=1)
                break
            except OSError:
                time.sleep(0.25)
        session = boto3.session.Session(aws_access_key_id="limits", aws_secret_access_key="testing",
                                        region_name="us-east-1")
        once = Config(retries={"mode": "standard", "max_attempts": 1})
        ec2, ssm, elb, asg = (session.client(s, endpoint_url=url, config=once)
                              for s in ("ec2", "ssm", "elbv2", "autoscaling"))

        # Each bucket: calls pass until it is empty (its size plus what refilled meanwhile),
        # then the service's throttling error.
        # `rested`: a time before the bucket was last emptied (the previous burst's start): what
        # it holds at the start is at most what refilled since (at least `size`, more when the
        # machine was slow between the two). Returns this burst's start.
        def bucket(name, calls, size, refill, code, rested=None):
            total = 3 * size + 30
            t0 = time.monotonic()
            start = size if rested is None else 1 + refill * (t0 - rested)
            with futures.ThreadPoolExecutor(max_workers=24) as pool:
                got = list(pool.map(lambda n: error_code(calls[n % len(calls)]), range(total)))
            elapsed = time.monotonic() - t0
            passed = got.count(None)
            check(f"{name}: {size} at once (+{refill:g}/s for {elapsed:.1f} s), then {code}",
                  (size <= passed <= int(start + refill * elapsed) + 1,
                   {c for c in got if c is not None}), (True, {code}))
            return t0

        vpc = ec2.describe_vpcs(MaxResults=5)["Vpcs"][0]["VpcId"]
        tag = lambda: ec2.create_tags(Resources=[vpc], Tags=[{"Key": "k", "Value": "v"}])  # noqa: E731
        emptied = bucket("EC2 CreateTags", [tag], 100, 10, "RequestLimitExceeded")
        check("EC2 DescribeTags draws from its own bucket meanwhile",
              error_code(lambda: ec2.describe_tags(Filters=[{"Name": "key", "Values": ["k"]}])), None)
        time.sleep(2.0)
        bucket("EC2 CreateTags two seconds later", [tag], 20, 10, "RequestLimitExceeded",
               rested=emptied)

        ssm.put_parameter(Name="/limits/p", Type="String", Value="x")
        bucket("SSM GetParameter, GetParameters, GetParametersByPath (one family)", [
            lambda: ssm.get_parameter(Name="/limits/p"),
            lambda: ssm.get_parameters(Names=["/limits/p"]),
            lambda: ssm.get_parameters_by_path(Path="/limits")], 40, 40, "ThrottlingException")
        check("SSM PutParameter is not in the family", error_code(
            lambda: ssm.put_parameter(Name="/limits/q", Type="String", Value="y")), None)

        tg = elb.create_target_group(Name="limits", Protocol="HTTP", Port=80, VpcId=vpc,
                                     TargetType="instance")["TargetGroups"][0]["TargetGroupArn"]
        bucket("ELB Describe* (one family)", [
            lambda: elb.describe_target_health(TargetGroupArn=tg),
            lambda: elb.describe_target_groups(),
            lambda: elb.describe_load_balancers()], 40, 10, "ThrottlingException")
        bucket("Auto Scaling Describe* (assumed figures)",
               [lambda: asg.describe_auto_scaling_groups()], 40, 10, "Throttling")

        # The meter: calls per second per bucket, refusals counted.
        rates = {r["family"]: r for r in json.load(urllib.request.urlopen(url + "/skiff-emulator/rates"))}
        check("rates: CreateTags' calls and refusals",
              (sum(rates["ec2:CreateTags"]["calls_per_second"]) >= 112,
               rates["ec2:CreateTags"]["throttled"] >= 1), (True, True))
        check("rates: the figures and the page travel with the bucket",
              (rates["ssm:GetParameter*"]["size"], rates["ssm:GetParameter*"]["refill"],
               rates["ssm:GetParameter*"]["doc"].startswith("https://docs.aws.amazon.com/")),
              (40, 40.0, True))

        # Targets: 1,000 per target group; the 1,001st is refused, nothing of it registered.
        ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        time.sleep(11)  # RunInstances is mutating: let the bucket refill for the 1,001 below
        ids = []
        while len(ids) < 1001:
            n = min(500, 1001 - len(ids))
            ids += [i["InstanceId"] for i in ec2.run_instances(
                ImageId=ami, MinCount=n, MaxCount=n, InstanceType="t3.micro")["Instances"]]
        slow = session.client("elbv2", endpoint_url=url)
        slow.register_targets(TargetGroupArn=tg, Targets=[{"Id": i} for i in ids[:1000]])
        check("targets: 1,000 in one target group pass", len(slow.describe_target_health(
            TargetGroupArn=tg)["TargetHealthDescriptions"]), 1000)
        check("targets: the 1,001st is TooManyTargets", error_code(lambda: slow.register_targets(
            TargetGroupArn=tg, Targets=[{"Id": ids[1000]}])), "TooManyTargets")
        check("targets: registering one already there again passes", error_code(lambda: slow.register_targets(
            TargetGroupArn=tg, Targets=[{"Id": ids[0]}])), None)
        # A group's launch its full target group cannot take fails (terminated, abandoned).
        slow_asg = session.client("autoscaling", endpoint_url=url)
        lt = ec2.create_launch_template(LaunchTemplateName="limits", LaunchTemplateData={
            "ImageId": ami, "InstanceType": "t3.micro"})["LaunchTemplate"]["LaunchTemplateId"]
        slow_asg.create_auto_scaling_group(
            AutoScalingGroupName="limits", MinSize=0, MaxSize=2, DesiredCapacity=1,
            LaunchTemplate={"LaunchTemplateId": lt}, AvailabilityZones=["us-east-1a"],
            TargetGroupARNs=[tg])
        group = slow_asg.describe_auto_scaling_groups(AutoScalingGroupNames=["limits"])["AutoScalingGroups"][0]
        check("targets: a launch past the quota fails (no instance in the group)",
              (len(group["Instances"]), len(slow.describe_target_health(
                  TargetGroupArn=tg)["TargetHealthDescriptions"])), (0, 1000))
    finally:
        server.terminate()
        server.wait(10)
    return summary()


if __name__ == "__main__":
    sys.exit(main())
