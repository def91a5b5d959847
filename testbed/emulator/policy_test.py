#!/usr/bin/env python3
"""Table tests of the emulator's pure parts: policy evaluation (policy.py), the instance
refresh state machine (refresh.py), the ELB health check rule (health.py) and AWS's request
limits (limits.py). Prints one line per case and 'N passed, N failed'."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import health  # noqa: E402
import limits  # noqa: E402
import policy  # noqa: E402
import refresh  # noqa: E402
from policy import Check  # noqa: E402

passed = failed = 0


def case(name, got, want):
    global passed, failed
    if got == want:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name}: got {got!r}, want {want!r}")


P = "arn:aws:ssm:us-east-1:123456789012:parameter"
INSTANCE = "arn:aws:ec2:us-east-1:123456789012:instance/i-1"
READ_OWN = {"Effect": "Allow", "Action": ["ssm:GetParameter", "ssm:GetParameters"],
            "Resource": f"{P}/skiff/a/*"}
TAG_OWN = {"Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "arn:aws:ec2:*:*:instance/*",
           "Condition": {"StringEquals": {"aws:ResourceTag/aws:autoscaling:groupName": "skiff-a"},
                         "ForAllValues:StringEquals": {"aws:TagKeys": ["skiff:release"]}}}
KMS_VIA = {"Effect": "Allow", "Action": "kms:Decrypt", "Resource": "arn:aws:kms:us-east-1:123456789012:key/*",
           "Condition": {"StringEquals": {"kms:ViaService": "ssm.us-east-1.amazonaws.com"}}}
DENY_B = {"Effect": "Deny", "Action": "ssm:*", "Resource": f"{P}/skiff/b/*"}
STAR = {"Effect": "Allow", "Action": "*", "Resource": "*"}
own_group = {"aws:ResourceTag/aws:autoscaling:groupName": ["skiff-a"], "aws:TagKeys": ["skiff:release"]}

for name, stmts, checks, want in [
    ("own parameter allowed", [READ_OWN], [Check("ssm:GetParameter", f"{P}/skiff/a/release")], True),
    ("other environment's parameter denied", [READ_OWN], [Check("ssm:GetParameter", f"{P}/skiff/b/release")], False),
    ("action names are case-insensitive", [READ_OWN], [Check("SSM:getparameter", f"{P}/skiff/a/x")], True),
    ("ARNs are case-sensitive", [READ_OWN], [Check("ssm:GetParameter", f"{P}/SKIFF/a/x")], False),
    ("several resources: every one must be allowed", [READ_OWN],
     [Check("ssm:GetParameters", f"{P}/skiff/a/x"), Check("ssm:GetParameters", f"{P}/skiff/b/x")], False),
    ("an action without resources needs Resource *", [READ_OWN], [Check("ssm:GetParameter", "*")], False),
    ("Resource * allows an action without resources", [STAR], [Check("ecr:GetAuthorizationToken", "*")], True),
    ("explicit deny beats an allow", [STAR, DENY_B], [Check("ssm:GetParameter", f"{P}/skiff/b/x")], False),
    ("nothing applies: implicit deny", [], [Check("ssm:GetParameter", f"{P}/skiff/a/x")], False),
    ("condition met: tag own group's instance", [TAG_OWN], [Check("ec2:CreateTags", INSTANCE, own_group)], True),
    ("condition not met (other group): not applicable", [TAG_OWN],
     [Check("ec2:CreateTags", INSTANCE, dict(own_group, **{"aws:ResourceTag/aws:autoscaling:groupName": ["skiff-b"]}))], False),
    ("an Allow whose condition fails does not deny what another Allow allows (moto 5 denies)",
     [TAG_OWN, {"Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "*"}],
     [Check("ec2:CreateTags", INSTANCE, {"aws:TagKeys": ["other"]})], True),
    ("ForAllValues: a second tag key is refused", [TAG_OWN],
     [Check("ec2:CreateTags", INSTANCE, dict(own_group, **{"aws:TagKeys": ["skiff:release", "Name"]}))], False),
    ("ForAllValues: true without any key in the request", [TAG_OWN],
     [Check("ec2:CreateTags", INSTANCE, {"aws:ResourceTag/aws:autoscaling:groupName": ["skiff-a"]})], True),
    ("absent key: StringEquals false (a direct kms:Decrypt has no kms:ViaService)", [KMS_VIA],
     [Check("kms:Decrypt", "arn:aws:kms:us-east-1:123456789012:key/k")], False),
    ("kms:Decrypt through SSM allowed", [KMS_VIA],
     [Check("kms:Decrypt", "arn:aws:kms:us-east-1:123456789012:key/k", {"kms:viaservice": ["ssm.us-east-1.amazonaws.com"]})], True),
    ("absent key: StringNotEquals true", [{"Effect": "Allow", "Action": "s:A", "Resource": "*",
                                             "Condition": {"StringNotEquals": {"k": "v"}}}], [Check("s:A", "*")], True),
    ("IfExists: absent key true", [{"Effect": "Allow", "Action": "s:A", "Resource": "*",
                                     "Condition": {"StringEqualsIfExists": {"k": "v"}}}], [Check("s:A", "*")], True),
    ("Null true: key must be absent", [{"Effect": "Allow", "Action": "s:A", "Resource": "*",
                                         "Condition": {"Null": {"k": "true"}}}], [Check("s:A", "*", {"k": ["x"]})], False),
    ("NotResource", [{"Effect": "Allow", "Action": "ssm:GetParameter", "NotResource": f"{P}/skiff/b/*"}],
     [Check("ssm:GetParameter", f"{P}/skiff/a/x")], True),
    ("trust-policy statements (with Principal) are not identity policy", [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "*", "Resource": "*"}],
     [Check("ssm:GetParameter", f"{P}/skiff/a/x")], False),
]:
    case(name, policy.evaluate(stmts, checks).allowed, want)

# --- policy variables: an instance tags only itself (issue 18, finding 6) ----------------------
# AWS's own pattern (managed policy AWSEC2VssSnapshotPolicy): ArnLike ec2:SourceInstanceARN
# against the acted-on instance's ARN built from ${ec2:InstanceId}. Requests signed with instance
# profile credentials carry ec2:SourceInstanceARN; the resource carries ec2:InstanceID.
SELF = {"Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "arn:aws:ec2:us-east-1:123456789012:instance/*",
        "Condition": {"ArnLike": {"ec2:SourceInstanceARN": "arn:aws:ec2:us-east-1:123456789012:instance/${ec2:InstanceId}"}}}
SRC = "arn:aws:ec2:us-east-1:123456789012:instance/"


def on(iid, source=None):
    ctx = {"ec2:InstanceID": [iid]}
    if source:
        ctx["ec2:SourceInstanceARN"] = [SRC + source]
    return Check("ec2:CreateTags", SRC + iid, ctx)


for name, stmts, checks, want in [
    ("variables: an instance tags itself", [SELF], [on("i-1", "i-1")], True),
    ("variables: an instance may not tag a peer", [SELF], [on("i-2", "i-1")], False),
    ("variables: a caller that is no instance (no ec2:SourceInstanceARN) may not", [SELF], [on("i-1")], False),
    ("variables: itself and a peer in one request: denied (every resource must be allowed)", [SELF],
     [on("i-1", "i-1"), on("i-2", "i-1")], False),
    ("variables: a prefix is no match (i-1 is not i-12)", [SELF], [on("i-12", "i-1")], False),
    ("variables: in Resource, replaced from the request",
     [{"Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "${ec2:SourceInstanceARN}"}], [on("i-1", "i-1")], True),
    ("variables: in Resource, a key the request lacks matches nothing",
     [{"Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "${ec2:SourceInstanceARN}"}], [on("i-1")], False),
    ("variables: a value replaced is literal (a * in it is no wildcard)",
     [{"Effect": "Allow", "Action": "s:A", "Resource": "arn:x:${k}"}],
     [Check("s:A", "arn:x:abc", {"k": ["*"]})], False),
    ("variables: ${*} is a literal *, not a wildcard",
     [{"Effect": "Allow", "Action": "s:A", "Resource": "arn:x:a${*}"}], [Check("s:A", "arn:x:abc")], False),
    ("variables: the default when the key is absent",
     [{"Effect": "Allow", "Action": "s:A", "Resource": "*", "Condition": {"StringEquals": {"k": "${absent, 'v'}"}}}],
     [Check("s:A", "*", {"k": ["v"]})], True),
    ("variables: StringEquals against another key's value",
     [{"Effect": "Allow", "Action": "s:A", "Resource": "*", "Condition": {"StringEquals": {"k": "${j}"}}}],
     [Check("s:A", "*", {"k": ["v"], "j": ["w"]})], False),
]:
    case(name, policy.evaluate(stmts, checks).allowed, want)

case("documents: moto's Python-repr inline policy parses",
     policy.statements(["{'Version': '2012-10-17', 'Statement': [{'Effect': 'Allow', 'Action': 'a:b', 'Resource': '*'}, None]}"]),
     [{"Effect": "Allow", "Action": "a:b", "Resource": "*"}])

# --- refresh state machine: launch before terminate (100/200), one instance -----------------
r = refresh.Refresh(group="g", preferences={"MinHealthyPercentage": 100, "MaxHealthyPercentage": 200,
                                            "InstanceWarmup": 5}, strategy="Rolling", started=0,
                    to_replace=["i-old"], desired=1)
v = lambda **inst: refresh.View(instances=inst and {k.replace("_", "-"): s for k, s in inst.items()}, abandoned=set())  # noqa: E731
case("refresh: Pending first, then InProgress", (r.status, refresh.step(r, v(i_old=("InService", 0)), 1), r.status),
     ("Pending", [], "InProgress"))
case("refresh: 200 % max healthy launches the replacement first", refresh.step(r, v(i_old=("InService", 0)), 2),
     [("launch", 1)])
r.launched = ["i-new"]
case("refresh: waits while the new instance is in Pending:Wait",
     refresh.step(r, v(i_old=("InService", 0), i_new=("Pending:Wait", None)), 3), [])
case("refresh: waits for the warm-up", refresh.step(r, v(i_old=("InService", 0), i_new=("InService", 3)), 4), [])
case("refresh: then terminates the old one",
     refresh.step(r, v(i_old=("InService", 0), i_new=("InService", 3)), 9), [("terminate", ["i-old"])])
case("refresh: waits for the terminate hook",
     refresh.step(r, v(i_old=("Terminating:Wait", 0), i_new=("InService", 3)), 10), [])
case("refresh: Successful once the old one left", (refresh.step(r, v(i_new=("InService", 3)), 11), r.status,
                                                   r.percentage({"i-new"})), ([], "Successful", 100))
r2 = refresh.Refresh(group="g", preferences={"MinHealthyPercentage": 50, "MaxHealthyPercentage": 100},
                     strategy="Rolling", started=0, to_replace=["a", "b"], desired=2, status="InProgress")
case("refresh: 100 % max healthy terminates a batch first (min healthy 50 -> 1)",
     refresh.step(r2, v(a=("InService", 0), b=("InService", 0)), 1), [("terminate", ["a"])])
case("refresh: then launches up to the desired capacity",
     refresh.step(r2, v(b=("InService", 0)), 2), [("launch", 1)])
r3 = refresh.Refresh(group="g", preferences={}, strategy="Rolling", started=0, to_replace=["a"], desired=1,
                     status="InProgress", launched=["n"])
case("refresh: an abandoned replacement fails it",
     (refresh.step(r3, refresh.View({"a": ("InService", 0)}, {"n"}), 1), r3.status), ([], "Failed"))
r4 = refresh.Refresh(group="g", preferences={}, strategy="Rolling", started=0, to_replace=["a"], desired=1,
                     status="Cancelling")
case("refresh: Cancelling ends Cancelled", (refresh.step(r4, v(a=("InService", 0)), 1), r4.status, r4.active),
     ([], "Cancelled", False))

# --- ELB health checks: which InService instances are marked Unhealthy and replaced -----------
# grace 30 s; the instance went InService at t=100 (its launch hook completed).
for name, check_type, grace, inst, targets, now, want in [
    ("ELB: unhealthy after the grace period is replaced", "ELB", 30, ("InService", 100), "unhealthy", 131, ["i-1"]),
    ("ELB: at the end of the grace period exactly", "ELB", 30, ("InService", 100), "unhealthy", 130, ["i-1"]),
    ("ELB: unhealthy within the grace period is kept", "ELB", 30, ("InService", 100), "unhealthy", 129, []),
    ("ELB: grace 0 acts at once", "ELB", 0, ("InService", 100), "unhealthy", 100, ["i-1"]),
    ("ELB: healthy is kept", "ELB", 30, ("InService", 100), "healthy", 500, []),
    ("ELB: initial (first checks) is kept", "ELB", 30, ("InService", 100), "initial", 500, []),
    ("ELB: draining is kept", "ELB", 30, ("InService", 100), "draining", 500, []),
    ("ELB: no target reported is kept", "ELB", 30, ("InService", 100), None, 500, []),
    ("ELB: Pending:Wait is not checked", "ELB", 0, ("Pending:Wait", None), "unhealthy", 500, []),
    ("ELB: Terminating:Wait is not checked again", "ELB", 0, ("Terminating:Wait", 100), "unhealthy", 500, []),
    ("EC2 type ignores the load balancer", "EC2", 0, ("InService", 100), "unhealthy", 500, []),
    ("no type (EC2 by default) ignores it", None, 0, ("InService", 100), "unhealthy", 500, []),
]:
    case(f"health: {name}", health.to_replace(check_type, grace, {"i-1": inst},
                                              {"i-1": targets} if targets else {}, now), want)
case("health: only the unhealthy one of two", health.to_replace(
    "ELB", 0, {"a": ("InService", 0), "b": ("InService", 0)}, {"a": "healthy", "b": "unhealthy"}, 1), ["b"])

# --- CloudWatch Logs: the ARN AWS checks for reads of a group's streams and events ----------
# (auth._logs: `log-group:NAME:log-stream:`); a policy naming the bare group ARN does not
# cover it, the ARN "with the trailing :*" does.
LG = "arn:aws:logs:us-east-1:123456789012:log-group:/skiff/a/app"
for name, resource, check_arn, want in [
    ("logs: FilterLogEvents not allowed by the bare group ARN", LG, f"{LG}:log-stream:", False),
    ("logs: FilterLogEvents allowed by the group ARN with :*", f"{LG}:*", f"{LG}:log-stream:", True),
    ("logs: :* covers the group's streams (GetLogEvents)", f"{LG}:*", f"{LG}:log-stream:i-1", True),
    ("logs: another group's :* does not", "arn:aws:logs:us-east-1:123456789012:log-group:/skiff/b/app:*",
     f"{LG}:log-stream:", False),
]:
    case(name, policy.evaluate([{"Effect": "Allow", "Action": "logs:FilterLogEvents", "Resource": resource}],
                               [Check("logs:FilterLogEvents", check_arn)]).allowed, want)

# --- request limits: EC2 filter values ----------------------------------------------------------
def filters(*counts):
    q = {}
    for n, count in enumerate(counts, 1):
        q[f"Filter.{n}.Name"] = [f"f{n}"]
        q.update({f"Filter.{n}.Value.{m}": [f"v{m}"] for m in range(1, count + 1)})
    return q


for name, q, want in [
    ("limits: 200 values in one filter pass", filters(200, 5), None),
    ("limits: 201 values in one filter are refused", filters(5, 201),
     ("FilterLimitExceeded", "The maximum number of filter values specified on a single call is 200 (filter f2 has 201)")),
    ("limits: 150 + 150 in two filters pass (the limit is per filter)", filters(150, 150), None),
    ("limits: no filter passes", {"ResourceId.1": ["i-1"]}, None),
]:
    case(name, limits.ec2_filter_limit(q), want)

# --- request limits: which bucket a request draws from -----------------------------------------
def rule(service, action, params=None):
    r = limits.rate_rule(service, action, params or {})
    return None if r is None else (r.family, r.size, r.refill, r.error)


for name, got, want in [
    ("rates: EC2 CreateTags has its own bucket, 100 refilled 10/s",
     rule("ec2", "CreateTags", {"ResourceId.1": ["i-1"]}), ("ec2:CreateTags", 100, 10.0, "RequestLimitExceeded")),
    ("rates: EC2 DescribeTags with a filter is non-mutating, 100 refilled 20/s",
     rule("ec2", "DescribeTags", filters(3)), ("ec2:DescribeTags", 100, 20.0, "RequestLimitExceeded")),
    ("rates: EC2 DescribeInstances without filter or page is unfiltered, 50 refilled 10/s",
     rule("ec2", "DescribeInstances"), ("ec2:DescribeInstances", 50, 10.0, "RequestLimitExceeded")),
    ("rates: EC2 DescribeInstances with MaxResults is non-mutating",
     rule("ec2", "DescribeInstances", {"MaxResults": ["5"]}), ("ec2:DescribeInstances", 100, 20.0, "RequestLimitExceeded")),
    ("rates: EC2 DeleteTags is mutating, 50 refilled 5/s",
     rule("ec2", "DeleteTags"), ("ec2:DeleteTags", 50, 5.0, "RequestLimitExceeded")),
    ("rates: ELB Describe* share one bucket, 40 refilled 10/s",
     rule("elbv2", "DescribeTargetHealth"), ("elbv2:Describe*", 40, 10.0, "ThrottlingException")),
    ("rates: ELB RegisterTargets is not modelled", rule("elbv2", "RegisterTargets"), None),
    ("rates: SSM GetParameters shares GetParameter's 40 TPS",
     rule("ssm", "GetParameters"), ("ssm:GetParameter*", 40, 40.0, "ThrottlingException")),
    ("rates: SSM PutParameter is not modelled", rule("ssm", "PutParameter"), None),
    ("rates: Auto Scaling writes share an assumed bucket",
     rule("autoscaling", "CompleteLifecycleAction"), ("autoscaling:mutating", 20, 4.0, "Throttling")),
    ("rates: IAM is not modelled", rule("iam", "GetRole"), None),
]:
    case(name, got, want)

# A bucket of 100 refilled 10/s: 100 at once pass, the 101st is refused, 0.1 s later one passes;
# accounts and Regions have buckets of their own.
tags = limits.rate_rule("ec2", "CreateTags", {})
b = limits.Buckets()
case("buckets: a full bucket takes its size at once",
     [b.take("1", "us-east-1", tags, 0.0) for _ in range(100)].count(True), 100)
case("buckets: the next request is throttled", b.take("1", "us-east-1", tags, 0.0), False)
case("buckets: another Region has its own bucket", b.take("1", "eu-west-1", tags, 0.0), True)
case("buckets: another account has its own bucket", b.take("2", "us-east-1", tags, 0.0), True)
case("buckets: one token back after 0.1 s", b.take("1", "us-east-1", tags, 0.1), True)
case("buckets: and only one", b.take("1", "us-east-1", tags, 0.1), False)
case("buckets: refill stops at the size",
     [b.take("1", "us-east-1", tags, 1000.0) for _ in range(101)].count(True), 100)
case("buckets: refusals are counted", b.throttled[("1", "us-east-1", "ec2:CreateTags")], 3)

# --- quotas: targets per target group and per load balancer ------------------------------------
for name, got, want in [
    ("targets: 1,000 in a group pass", limits.targets_quota(999, 1, {"lb": 999}), None),
    ("targets: the 1,001st in a group is refused", limits.targets_quota(1000, 1, {"lb": 1000})[0], "TooManyTargets"),
    ("targets: a load balancer counts its other groups' targets",
     limits.targets_quota(400, 200, {"lb": 900})[0], "TooManyTargets"),
    ("targets: a group on no load balancer counts itself", limits.targets_quota(0, 1000, {}), None),
    ("targets: re-registering (nothing new) always passes", limits.targets_quota(1000, 0, {"lb": 1000}), None),
]:
    case(name, got, want)

print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
