#!/usr/bin/env python3
"""The emulator's Auto Scaling extensions through the API: starts its own permissive server
(server.py, a free port, stopped at the end) and drives it with boto3. Lifecycle hooks
(Pending:Wait, CompleteLifecycleAction's validation, heartbeat timeout -> DefaultResult,
Terminating:Wait), instance refresh (one at a time, Successful, Cancel, a scale-out while it
runs), and ELB health checks (an unhealthy target replaced after the grace period, not before,
not with HealthCheckType EC2), and EC2's filter value limit (201 values refused with
FilterLimitExceeded, 200 answered). Prints one line per
check and 'N passed, N failed'."""

import os
import sys
import json
import time
import urllib.error
import urllib.request

import boto3
import botocore.exceptions

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from kit.checks import check, summary  # noqa: E402
from kit.emulator import own_server  # noqa: E402


def error_of(call):
    try:
        call()
        return None
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"], e.response["Error"]["Message"]


def main():
    with own_server() as url:
        session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                        region_name="us-east-1")
        ec2, asg = session.client("ec2", endpoint_url=url), session.client("autoscaling", endpoint_url=url)
        ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        lt = ec2.create_launch_template(LaunchTemplateName="t", LaunchTemplateData={
            "ImageId": ami, "InstanceType": "t3.micro"})["LaunchTemplate"]["LaunchTemplateId"]

        def group(name, hooks):
            asg.create_auto_scaling_group(
                AutoScalingGroupName=name, MinSize=0, MaxSize=4, DesiredCapacity=0,
                LaunchTemplate={"LaunchTemplateId": lt}, AvailabilityZones=["us-east-1a"])
            for hook, transition, timeout, default in hooks:
                asg.put_lifecycle_hook(AutoScalingGroupName=name, LifecycleHookName=hook,
                                       LifecycleTransition=transition, HeartbeatTimeout=timeout,
                                       DefaultResult=default)
            asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=1)

        def states(name):
            g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
            return {i["InstanceId"]: i["LifecycleState"] for i in g["Instances"]}

        # EC2 refuses a filter with more than 200 values (limits.py); moto alone answers it.
        ids = [f"i-{n:017x}" for n in range(201)]
        got = error_of(lambda: ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": ids}]))
        check("DescribeTags with 201 resource-id values: FilterLimitExceeded",
              got is not None and got[0] == "FilterLimitExceeded", str(got))
        got = error_of(lambda: ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": ids[:200]}]))
        check("DescribeTags with 200 resource-id values is answered", got is None, str(got))
        counter = boto3.session.Session(aws_access_key_id="counted", aws_secret_access_key="x",
                                        region_name="us-east-1").client("ec2", endpoint_url=url)
        counter.describe_tags()
        error_of(lambda: counter.describe_tags(Filters=[{"Name": "resource-id", "Values": ids}]))
        with urllib.request.urlopen(url + "/skiff-emulator/calls?key=counted", timeout=5) as r:
            counted = json.load(r)
        check("calls are counted per access key, refused ones too", counted == {"ec2:DescribeTags": 2},
              str(counted))

        launching, terminating = "autoscaling:EC2_INSTANCE_LAUNCHING", "autoscaling:EC2_INSTANCE_TERMINATING"
        group("g1", [("launch", launching, 60, "ABANDON"), ("term", terminating, 60, "CONTINUE")])
        (iid, state), = states("g1").items()
        check("a launch hook holds a new instance in Pending:Wait", state == "Pending:Wait", state)
        for name, kwargs, want in [
            ("unknown group", dict(AutoScalingGroupName="nope", LifecycleHookName="launch", InstanceId=iid), "not found"),
            ("unknown hook", dict(AutoScalingGroupName="g1", LifecycleHookName="nope", InstanceId=iid), "No Lifecycle Hook"),
            ("instance not waiting on that hook", dict(AutoScalingGroupName="g1", LifecycleHookName="term", InstanceId=iid),
             "No active Lifecycle Action"),
            ("wrong token", dict(AutoScalingGroupName="g1", LifecycleHookName="launch", LifecycleActionToken="00000000-0000-0000-0000-000000000000"),
             "No active Lifecycle Action"),
        ]:
            err = error_of(lambda kwargs=kwargs: asg.complete_lifecycle_action(LifecycleActionResult="CONTINUE", **kwargs))
            check(f"CompleteLifecycleAction refuses: {name}", err is not None and err[0] == "ValidationError"
                  and want in err[1], str(err))
        check("RecordLifecycleActionHeartbeat on the waiting instance",
              error_of(lambda: asg.record_lifecycle_action_heartbeat(
                  AutoScalingGroupName="g1", LifecycleHookName="launch", InstanceId=iid)) is None)
        asg.complete_lifecycle_action(AutoScalingGroupName="g1", LifecycleHookName="launch", InstanceId=iid,
                                      LifecycleActionResult="CONTINUE")
        check("CONTINUE puts it InService", states("g1") == {iid: "InService"}, str(states("g1")))
        err = error_of(lambda: asg.complete_lifecycle_action(
            AutoScalingGroupName="g1", LifecycleHookName="launch", InstanceId=iid, LifecycleActionResult="CONTINUE"))
        check("a second completion has no active action", err is not None and "No active Lifecycle Action" in err[1], str(err))

        asg.terminate_instance_in_auto_scaling_group(InstanceId=iid, ShouldDecrementDesiredCapacity=True)
        check("a terminate hook holds it in Terminating:Wait", states("g1") == {iid: "Terminating:Wait"}, str(states("g1")))
        asg.complete_lifecycle_action(AutoScalingGroupName="g1", LifecycleHookName="term", InstanceId=iid,
                                      LifecycleActionResult="CONTINUE")
        check("completing the terminate hook terminates it", states("g1") == {}, str(states("g1")))

        group("g2", [("launch", launching, 30, "ABANDON")])
        (first, _), = states("g2").items()
        err = error_of(lambda: asg.start_instance_refresh(AutoScalingGroupName="nope"))
        check("StartInstanceRefresh on an unknown group", err is not None and err[0] == "ValidationError", str(err))
        rid = asg.start_instance_refresh(AutoScalingGroupName="g2", Preferences={
            "MinHealthyPercentage": 100, "MaxHealthyPercentage": 200, "InstanceWarmup": 0})["InstanceRefreshId"]
        err = error_of(lambda: asg.start_instance_refresh(AutoScalingGroupName="g2"))
        check("a second refresh is InstanceRefreshInProgress",
              err is not None and err[0] == "InstanceRefreshInProgress", str(err))
        seen = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = asg.describe_instance_refreshes(AutoScalingGroupName="g2", InstanceRefreshIds=[rid])["InstanceRefreshes"][0]
            seen.add(r["Status"])
            if r["Status"] in ("Successful", "Failed", "Cancelled"):
                break
            for i, st in states("g2").items():
                if st == "Pending:Wait":  # the test plays the new instance's agent
                    asg.complete_lifecycle_action(AutoScalingGroupName="g2", LifecycleHookName="launch",
                                                  InstanceId=i, LifecycleActionResult="CONTINUE")
            time.sleep(0.2)
        # Pending lasts until the next Auto Scaling request (the second Start above).
        check("the refresh went InProgress -> Successful",
              "InProgress" in seen and r["Status"] == "Successful", f"{seen} {r}")
        check("it replaced the instance", first not in states("g2") and len(states("g2")) == 1, str(states("g2")))
        check("its preferences are echoed", r.get("Preferences", {}).get("MaxHealthyPercentage") == 200, str(r))
        err = error_of(lambda: asg.cancel_instance_refresh(AutoScalingGroupName="g2"))
        check("Cancel without an active refresh", err is not None and err[0] == "ActiveInstanceRefreshNotFound", str(err))
        asg.start_instance_refresh(AutoScalingGroupName="g2")
        asg.cancel_instance_refresh(AutoScalingGroupName="g2")
        latest = asg.describe_instance_refreshes(AutoScalingGroupName="g2")["InstanceRefreshes"][0]
        check("a cancelled refresh ends Cancelled", latest["Status"] in ("Cancelling", "Cancelled"), str(latest))

        # Alarms (issue 8): a refresh watching an alarm fails once CloudWatch has it in ALARM.
        cw = session.client("cloudwatch", endpoint_url=url)
        cw.put_metric_alarm(AlarmName="ga-5xx", Namespace="AWS/ApplicationELB",
                            MetricName="HTTPCode_Target_5XX_Count", Statistic="Sum", Period=60,
                            EvaluationPeriods=1, Threshold=1, ComparisonOperator="GreaterThanThreshold")
        group("ga", [("launch", launching, 60, "ABANDON")])
        for i in states("ga"):
            asg.complete_lifecycle_action(AutoScalingGroupName="ga", LifecycleHookName="launch",
                                          InstanceId=i, LifecycleActionResult="CONTINUE")
        rid = asg.start_instance_refresh(AutoScalingGroupName="ga", Preferences={
            "MinHealthyPercentage": 100, "MaxHealthyPercentage": 200, "InstanceWarmup": 0,
            "AlarmSpecification": {"Alarms": ["ga-5xx", "not-an-alarm"]}})["InstanceRefreshId"]

        def ga():
            return asg.describe_instance_refreshes(AutoScalingGroupName="ga", InstanceRefreshIds=[rid])["InstanceRefreshes"][0]
        r = ga()
        r = ga()  # Pending -> InProgress; the replacement waits in its launch hook
        check("a refresh watching an OK alarm (and an unknown name) runs",
              r["Status"] == "InProgress", str(r))
        check("its alarm specification is echoed",
              r.get("Preferences", {}).get("AlarmSpecification", {}).get("Alarms") == ["ga-5xx", "not-an-alarm"], str(r))
        cw.set_alarm_state(AlarmName="ga-5xx", StateValue="ALARM", StateReason="test")
        r = ga()
        check("the alarm in ALARM fails it, naming the alarm",
              r["Status"] == "Failed" and "ga-5xx" in r.get("StatusReason", ""), str(r))
        # BakeTime (issue 18, finding 10): after the last replacement the refresh bakes, still
        # watching its alarms; an alarm in ALARM then fails it, else it succeeds once baked.
        cw.set_alarm_state(AlarmName="ga-5xx", StateValue="OK", StateReason="test")
        err = error_of(lambda: asg.start_instance_refresh(AutoScalingGroupName="ga", Preferences={
            "BakeTime": 172801}))
        check("a BakeTime above 172800 s is a ValidationError",
              err is not None and err[0] == "ValidationError" and "BakeTime" in err[1], str(err))

        def baked(bake, alarm_during_bake):
            rid = asg.start_instance_refresh(AutoScalingGroupName="ga", Preferences={
                "MinHealthyPercentage": 100, "MaxHealthyPercentage": 200, "InstanceWarmup": 0,
                "BakeTime": bake, "AlarmSpecification": {"Alarms": ["ga-5xx"]}})["InstanceRefreshId"]
            seen, deadline, r = [], time.monotonic() + 30, {}
            while time.monotonic() < deadline:
                r = asg.describe_instance_refreshes(AutoScalingGroupName="ga", InstanceRefreshIds=[rid])["InstanceRefreshes"][0]
                if not seen or seen[-1] != r["Status"]:
                    seen.append(r["Status"])
                if r["Status"] in ("Successful", "Failed", "Cancelled"):
                    break
                if r["Status"] == "Baking" and alarm_during_bake:
                    cw.set_alarm_state(AlarmName="ga-5xx", StateValue="ALARM", StateReason="test")
                for i, st in states("ga").items():
                    if st == "Pending:Wait":
                        asg.complete_lifecycle_action(AutoScalingGroupName="ga", LifecycleHookName="launch",
                                                      InstanceId=i, LifecycleActionResult="CONTINUE")
                time.sleep(0.2)
            return seen, r

        t = time.monotonic()
        seen, r = baked(2, False)
        check("with BakeTime the refresh bakes after the last replacement, then succeeds",
              seen[-2:] == ["Baking", "Successful"], f"{seen} {r}")
        check("... not before the bake time has passed", time.monotonic() - t >= 2, f"{time.monotonic() - t:.1f} s")
        seen, r = baked(600, True)
        check("an alarm going to ALARM during the bake fails the refresh, naming it",
              seen[-2:] == ["Baking", "Failed"] and "ga-5xx" in r.get("StatusReason", ""), f"{seen} {r}")
        err = error_of(lambda: asg.start_instance_refresh(AutoScalingGroupName="ga", Preferences={
            "AutoRollback": True, "AlarmSpecification": {"Alarms": ["ga-5xx"]}}))
        check("AutoRollback without a DesiredConfiguration is a ValidationError",
              err is not None and err[0] == "ValidationError" and "DesiredConfiguration" in err[1], str(err))

        group("g3", [("launch", launching, 1, "ABANDON")])
        (doomed, _), = states("g3").items()
        time.sleep(1.5)
        after = states("g3")
        check("a launch wait past its heartbeat takes DefaultResult ABANDON (replaced)",
              doomed not in after and list(after.values()) == ["Pending:Wait"], str(after))

        def report(name, targets):
            req = urllib.request.Request(url + "/skiff-emulator/target-health", method="POST",
                                         data=json.dumps({"group": name, "targets": targets}).encode())
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        def health(name):
            g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
            return {i["InstanceId"]: (i["LifecycleState"], i["HealthStatus"]) for i in g["Instances"]}

        def serve(name, hook="launch"):  # the test plays the agents of new instances
            for i, st in states(name).items():
                if st == "Pending:Wait":
                    asg.complete_lifecycle_action(AutoScalingGroupName=name, LifecycleHookName=hook,
                                                  InstanceId=i, LifecycleActionResult="CONTINUE")

        # ELB health checks after the grace period (health.py).
        group("g4", [("launch", launching, 60, "ABANDON"), ("term", terminating, 60, "CONTINUE")])
        asg.update_auto_scaling_group(AutoScalingGroupName="g4", HealthCheckType="ELB", HealthCheckGracePeriod=2)
        serve("g4")
        (sick, _), = states("g4").items()
        code, body = report("g4", {sick: "sick"})
        check("target-health refuses an unknown target state", code == 400 and "unknown target state" in body, body)
        code, body = report("nope", {sick: "unhealthy"})
        check("target-health refuses an unknown group", code == 400 and "nope" in body, body)
        check("target-health takes the load balancer's view", report("g4", {sick: "unhealthy"})[0] == 200)
        check("an unhealthy target within the grace period is kept",
              health("g4") == {sick: ("InService", "Healthy")}, str(health("g4")))
        time.sleep(2.2)
        after = health("g4")
        check("after the grace period it is marked Unhealthy and terminated (hook)",
              after.get(sick) == ("Terminating:Wait", "Unhealthy"), str(after))
        check("and a replacement is launched", sorted(st for i, (st, _) in after.items() if i != sick)
              == ["Pending:Wait"], str(after))
        asg.complete_lifecycle_action(AutoScalingGroupName="g4", LifecycleHookName="term", InstanceId=sick,
                                      LifecycleActionResult="CONTINUE")
        serve("g4")
        replacement = [i for i in states("g4") if i != sick]
        report("g4", {i: "initial" for i in replacement})
        time.sleep(2.2)
        check("a target in its first checks (initial) is kept", health("g4") == {
            i: ("InService", "Healthy") for i in replacement}, str(health("g4")))
        # ctl's in-place rollout holds HealthCheck and ReplaceUnhealthy while instances swap.
        asg.suspend_processes(AutoScalingGroupName="g4", ScalingProcesses=["HealthCheck", "ReplaceUnhealthy"])
        report("g4", {i: "unhealthy" for i in replacement})
        time.sleep(2.2)
        check("with HealthCheck/ReplaceUnhealthy suspended an unhealthy target is kept", health("g4") == {
            i: ("InService", "Healthy") for i in replacement}, str(health("g4")))
        report("g4", {i: "healthy" for i in replacement})
        asg.resume_processes(AutoScalingGroupName="g4", ScalingProcesses=["HealthCheck", "ReplaceUnhealthy"])

        asg.create_auto_scaling_group(
            AutoScalingGroupName="g5", MinSize=0, MaxSize=2, DesiredCapacity=1, HealthCheckType="EC2",
            HealthCheckGracePeriod=0, LaunchTemplate={"LaunchTemplateId": lt}, AvailabilityZones=["us-east-1a"])
        (ec2_only, _), = states("g5").items()
        report("g5", {ec2_only: "unhealthy"})
        check("HealthCheckType EC2 ignores the load balancer", health("g5") == {ec2_only: ("InService", "Healthy")},
              str(health("g5")))
        # DescribeTargetHealth answers the reported view (ctl status reads it, issue 12).
        elb = session.client("elbv2", endpoint_url=url)
        vpc = ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
        tg = elb.create_target_group(Name="g5-tg", Protocol="HTTP", Port=8080, VpcId=vpc,
                                     TargetType="instance")["TargetGroups"][0]["TargetGroupArn"]
        elb.register_targets(TargetGroupArn=tg, Targets=[{"Id": ec2_only}])
        seen = elb.describe_target_health(TargetGroupArn=tg)["TargetHealthDescriptions"]
        check("DescribeTargetHealth answers the reported unhealthy, with its reason",
              [(d["Target"]["Id"], d["TargetHealth"]["State"], d["TargetHealth"].get("Reason")) for d in seen]
              == [(ec2_only, "unhealthy", "Target.FailedHealthChecks")], str(seen))
        report("g5", {ec2_only: "healthy"})
        seen = elb.describe_target_health(TargetGroupArn=tg)["TargetHealthDescriptions"]
        check("and healthy once reported healthy",
              [d["TargetHealth"]["State"] for d in seen] == ["healthy"], str(seen))
        # A refresh's new instances are registered with the group's target groups (ctl's in-place
        # strategy waits for their target health).
        asg.create_auto_scaling_group(
            AutoScalingGroupName="g7", MinSize=0, MaxSize=2, DesiredCapacity=1, TargetGroupARNs=[tg],
            LaunchTemplate={"LaunchTemplateId": lt}, AvailabilityZones=["us-east-1a"])
        (g7_old, _), = states("g7").items()
        asg.start_instance_refresh(AutoScalingGroupName="g7", Preferences={
            "MinHealthyPercentage": 100, "MaxHealthyPercentage": 200, "InstanceWarmup": 0})
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and g7_old in states("g7"):
            time.sleep(0.2)
        g7_new = set(states("g7"))
        registered = {d["Target"]["Id"] for d in elb.describe_target_health(TargetGroupArn=tg)["TargetHealthDescriptions"]}
        check("a refresh registers the instances it launches with the group's target group",
              g7_new and g7_old not in g7_new and g7_new <= registered, f"group {g7_new}, registered {registered}")

        # A scale-out while a launch-before-terminate refresh runs: one more instance, no old
        # instance terminated early, the refresh still completes.
        group("g6", [("launch", launching, 60, "ABANDON")])
        asg.set_desired_capacity(AutoScalingGroupName="g6", DesiredCapacity=2)
        serve("g6")
        old = set(states("g6"))
        asg.start_instance_refresh(AutoScalingGroupName="g6", Preferences={
            "MinHealthyPercentage": 100, "MaxHealthyPercentage": 200, "InstanceWarmup": 0})
        fleet_now = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(fleet_now) < 4:
            fleet_now = states("g6")
            time.sleep(0.2)
        asg.set_desired_capacity(AutoScalingGroupName="g6", DesiredCapacity=3)
        during = states("g6")
        check("a scale-out during the refresh launches one more, keeps the old ones",
              len(during) == 5 and all(during[i] == "InService" for i in old), str(during))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = asg.describe_instance_refreshes(AutoScalingGroupName="g6")["InstanceRefreshes"][0]
            if r["Status"] not in ("Pending", "InProgress"):
                break
            serve("g6")
            time.sleep(0.2)
        final = states("g6")
        check("the refresh completes with the new capacity, every old instance replaced",
              r["Status"] == "Successful" and len(final) == 3 and not old & set(final)
              and set(final.values()) == {"InService"}, f"{r['Status']} {final}")

        # Terminate first (the default MinHealthyPercentage 90) on a group of one: the instance
        # goes, its replacement is launched, and the refresh runs until the replacement serves.
        # It once ended Successful with the group empty, two requests after the start.
        group("g8", [])
        (g8_old, _), = states("g8").items()
        asg.put_lifecycle_hook(AutoScalingGroupName="g8", LifecycleHookName="launch",
                               LifecycleTransition=launching, HeartbeatTimeout=60, DefaultResult="ABANDON")
        rid = asg.start_instance_refresh(AutoScalingGroupName="g8")["InstanceRefreshId"]
        for _ in range(10):  # each request lets the refresh take a step
            r = asg.describe_instance_refreshes(AutoScalingGroupName="g8", InstanceRefreshIds=[rid])["InstanceRefreshes"][0]
        during = states("g8")
        check("a terminate-first refresh of one instance launches its replacement and waits for it",
              r["Status"] == "InProgress" and g8_old not in during
              and list(during.values()) == ["Pending:Wait"], f"{r['Status']} {during}")
        g8_new = next(iter(during), "none")
        asg.complete_lifecycle_action(AutoScalingGroupName="g8", LifecycleHookName="launch",
                                      InstanceId=g8_new, LifecycleActionResult="CONTINUE")
        for _ in range(5):
            r = asg.describe_instance_refreshes(AutoScalingGroupName="g8", InstanceRefreshIds=[rid])["InstanceRefreshes"][0]
        check("it succeeds once the replacement is InService", r["Status"] == "Successful"
              and states("g8") == {g8_new: "InService"}, f"{r['Status']} {states('g8')}")
    return summary()


if __name__ == "__main__":
    sys.exit(main())
