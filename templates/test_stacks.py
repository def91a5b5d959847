#!/usr/bin/env python3
"""Over 600 lines: one test of two templates whose resources refer to each other (stack
outputs, roles, rules); the checks read one created stack.

Create, update and delete the skiff stacks (app.yaml, database.yaml) in moto, and check them.

Run by templates/test.sh with the venv that has moto's client side (boto3, PyYAML). Talks to the
moto server at $MOTO_ENDPOINT (default http://127.0.0.1:5055) with dummy credentials in
us-east-1. Every name carries a fresh run id, so runs never see each other's leftovers, and
everything the run creates is deleted at the end, also after a failure.

The generated agent configs are validated with the real agent: $AGENT_BIN (templates/test.sh
builds the workspace's debug agent and sets it). Without one, those checks FAIL; nothing is
skipped.

Three kinds of checks:
  * template checks read the YAML itself, for what moto does not model (lifecycle hooks, the
    instance maintenance policy, target group attributes, deletion policies, IAM resources and
    conditions, Rules);
  * the policy-resource check: every Resource of every IAM policy in both templates names this
    stack's own ARNs, and every other one (a wildcard) is justified by a `# wildcard:` comment
    inside its statement. moto's IAM enforcement checks actions only, so this is the guard for
    resources;
  * stack checks deploy to moto and read back what it built, including the user data's agent
    config at the parameters' boundaries, run through `agent check-config`.

What moto (5.2) does not do, and how each is handled here:
  * AWS::EC2::SecurityGroupEgress is not implemented: moto skips the resource with a warning
    (database.yaml's ClientEgressToDatabase, app.yaml's InstanceEgressTo*); the test asserts
    exactly which are missing.
  * Fn::GetAtt Database.MasterUserSecret.SecretArn is not implemented and fails the stack.
    database.yaml: the copy sent to moto lacks that one output. app.yaml (own database): the
    copy sent to moto has each such GetAtt (counted) replaced by a stand-in ARN naming the
    database, `...:secret:rds!<db id>`; the template check proves what the real one reads.
    ManageMasterUserPassword itself is ignored by moto's CloudFormation (no secret is made).
  * Outputs and values use the long form Fn::GetAtt: [Database, Endpoint.Address]; moto's YAML
    loader splits the short form at every dot and mangles `!GetAtt [a, b]`.
  * TargetGroup and RDS DBInstance have no update handler: an update touching them drops them
    from moto's stack. The update steps therefore change only parameters of resources moto can
    update (launch template, group), and switching a stack between its own and an existing
    database is not tried in moto.
  * Rules are ignored: the test evaluates the template's Rules itself (Fn::Equals/Not/And/Or
    over the parameters, as CloudFormation does) for the parameter sets it deploys and for the
    ones the Rules must refuse.
  * AWS::EC2::SecurityGroupIngress has no delete (app stacks no longer make one in another
    stack's group: they join the shared database's clients group).
  * Fn::And over a !Condition is evaluated wrongly (always false); app.yaml avoids the form.
  * AWS::ElasticLoadBalancingV2::ListenerRule is not deleted with its stack: a QA stack's rule on
    the shared listener stays in moto (the test removes it), so its removal is not checked.
  * Parameter MinValue/MaxValue are not enforced; the boundary stacks use exactly those values.
  * IAM resources and conditions are not evaluated (see the policy-resource check).
  * LifecycleHookSpecificationList, InstanceMaintenancePolicy, DefaultInstanceWarmup,
    TargetGroupAttributes, a role's ManagedPolicyArns, VPCSecurityGroups, DeletionProtection
    and MonitoringRoleArn on the DB, and DeletionPolicy: Snapshot are ignored; all are template
    checks.
Prints one line per check and closes with 'N passed, N failed'; exits 1 on any failure.
"""

import ast
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import tomllib
import urllib.parse
import uuid

import boto3
import botocore.exceptions
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ENDPOINT = os.environ.get("MOTO_ENDPOINT", "http://127.0.0.1:5055")
REGION = "us-east-1"
RUN = uuid.uuid4().hex[:8]
# app/<name>/<id> out of SharedListenerArn (...:listener/app/<name>/<id>/<listener id>).
SHARED_LB_FULL_NAME = {"Fn::Join": ["/", [{"Fn::Select": [i, {"Fn::Split": ["/", {"Ref": "SharedListenerArn"}]}]}
                                          for i in (1, 2, 3)]]}

sys.path.insert(0, os.path.join(os.path.dirname(HERE), "testbed"))
from kit import userdata  # noqa: E402
from kit.checks import check, summary  # noqa: E402


def equal(name, got, want):
    return check(name, got == want, f"got {got!r}, want {want!r}")


# --- reading templates ----------------------------------------------------------------------


class CfnLoader(yaml.SafeLoader):
    """PyYAML with CloudFormation's short-form tags turned into their long form."""


def _intrinsic(loader, suffix, node):
    key = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {key: value}


CfnLoader.add_multi_constructor("!", _intrinsic)


def load_template(name):
    with open(os.path.join(HERE, name)) as f:
        text = f.read()
    return text, yaml.load(text, Loader=CfnLoader)


# --- AWS clients ----------------------------------------------------------------------------

SESSION = boto3.session.Session(
    aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
)


def client(service):
    return SESSION.client(service, endpoint_url=ENDPOINT)


cfn, ec2, acm, ssm, elb, asg, iam, rds, sm, sts = (
    client(s)
    for s in (
        "cloudformation", "ec2", "acm", "ssm", "elbv2", "autoscaling", "iam", "rds",
        "secretsmanager", "sts",
    )
)


def params(d):
    return [{"ParameterKey": k, "ParameterValue": str(v)} for k, v in d.items()]


def wait_stack(name, done, timeout=60):
    """Poll until the stack leaves its *_IN_PROGRESS state; moto is synchronous, real AWS not."""
    deadline = time.monotonic() + timeout
    while True:
        stack = cfn.describe_stacks(StackName=name)["Stacks"][0]
        if not stack["StackStatus"].endswith("_IN_PROGRESS") or time.monotonic() > deadline:
            return stack
        time.sleep(0.5)


def outputs(stack):
    return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}


def physical_ids(stack_name):
    """Logical id -> physical id of what moto built (skipped resources have no logical id)."""
    found = {}
    for r in cfn.describe_stack_resources(StackName=stack_name)["StackResources"]:
        if "LogicalResourceId" in r:
            found[r["LogicalResourceId"]] = r.get("PhysicalResourceId")
    return found


def latest_user_data(launch_template_id):
    versions = ec2.describe_launch_template_versions(LaunchTemplateId=launch_template_id)
    latest = max(versions["LaunchTemplateVersions"], key=lambda v: v["VersionNumber"])
    return latest["LaunchTemplateData"]["UserData"]


def role_statements(role_name):
    statements = []
    for policy_name in iam.list_role_policies(RoleName=role_name)["PolicyNames"]:
        doc = iam.get_role_policy(RoleName=role_name, PolicyName=policy_name)["PolicyDocument"]
        if isinstance(doc, str):
            # moto keeps a role's inline policies from CloudFormation as a Python repr, not JSON
            text = urllib.parse.unquote(doc)
            try:
                doc = json.loads(text)
            except json.JSONDecodeError:
                doc = ast.literal_eval(text)
        # moto leaves an Fn::If that chose AWS::NoValue as null in the list; CloudFormation drops it
        statements.extend(s for s in doc["Statement"] if s is not None)
    return statements


def actions_of(statements):
    found = set()
    for s in statements:
        acts = s["Action"]
        found.update([acts] if isinstance(acts, str) else acts)
    return found




# --- the agent ------------------------------------------------------------------------------


def agent_binary():
    """The agent that validates generated configs: $AGENT_BIN (templates/test.sh sets it to a
    fresh debug build), else a build in $CARGO_TARGET_DIR. None when there is none: the checks
    that need it then fail, they are not skipped."""
    if os.environ.get("AGENT_BIN"):
        path = os.environ["AGENT_BIN"]
        return path if os.access(path, os.X_OK) else None
    target = os.environ.get("CARGO_TARGET_DIR", "/root/.cache/skiff-target")
    for profile in ("debug", "release"):
        path = os.path.join(target, profile, "agent")
        if os.access(path, os.X_OK):
            return path
    return None


def agent_check_config(toml_text):
    """Run `agent check-config` on a config; returns (exit code, output). Exit 127 without an
    agent binary."""
    agent = agent_binary()
    if agent is None:
        return 127, "no agent binary: set AGENT_BIN or build it (cargo build -p skiff-agent)"
    with tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="skiff-agent-") as f:
        f.write(toml_text)
        f.flush()
        proc = subprocess.run([agent, "check-config", "--config", f.name],
                              capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def run_user_data(user_data_b64):
    """Run the launch template's user data with /etc/skiff and systemctl redirected; return the
    agent.toml text, its parsed form, the systemctl calls it made and the file's mode."""
    with tempfile.TemporaryDirectory(prefix="skiff-userdata-") as tmp:
        toml_path = userdata.run_user_data(user_data_b64, tmp)
        with open(toml_path) as f:
            text = f.read()
        mode = os.stat(toml_path).st_mode & 0o777
        return text, tomllib.loads(text), userdata.systemctl_calls(tmp), mode


def check_agent_accepts(name, toml_text):
    rc, out = agent_check_config(toml_text)
    return check(f"{name}: agent check-config accepts the generated config", rc == 0,
                 f"exit {rc}: {out}\n{toml_text}")


# --- CloudFormation Rules, evaluated as CloudFormation does (moto ignores them) ---------------


def rule_value(v, values):
    if isinstance(v, dict):
        ((fn, arg),) = v.items()
        if fn == "Ref":
            return str(values[arg])
        if fn == "Fn::Equals":
            return rule_value(arg[0], values) == rule_value(arg[1], values)
        if fn == "Fn::Not":
            return not rule_value(arg[0], values)
        if fn == "Fn::And":
            return all(rule_value(a, values) for a in arg)
        if fn == "Fn::Or":
            return any(rule_value(a, values) for a in arg)
        raise ValueError(f"rule function {fn} not handled by this test")
    return str(v)


def rules_refuse(t, given):
    """The AssertDescriptions of the template's Rules that the parameter values break."""
    values = {k: p.get("Default", "") for k, p in t["Parameters"].items()}
    values.update(given)
    broken = []
    for rule in t.get("Rules", {}).values():
        if "RuleCondition" in rule and not rule_value(rule["RuleCondition"], values):
            continue
        broken += [a["AssertDescription"] for a in rule["Assertions"]
                   if not rule_value(a["Assert"], values)]
    return broken


# --- IAM policies: resources -------------------------------------------------------------------

# What "this stack's own" resource looks like, per service; ${Environment}, ${AWS::StackName}
# and ${ImageRepositoryName} are the stack's, the partition/region/account placeholders fixed.
_ARN = r"^arn:\$\{AWS::Partition\}:%s:\$\{AWS::Region\}:\$\{AWS::AccountId\}:"
OWN_ARNS = [
    re.compile(_ARN % "ssm" + r"parameter/skiff/\$\{Environment\}/[a-z-]+(/\*)?$"),
    re.compile(_ARN % "autoscaling"
               + r"autoScalingGroup:\*:autoScalingGroupName/skiff-\$\{Environment\}$"),
    re.compile(_ARN % "ecr" + r"repository/\$\{ImageRepositoryName\}$"),
    re.compile(_ARN % "cloudformation" + r"stack/\$\{AWS::StackName\}/\*$"),
    re.compile(_ARN % "logs" + r"log-group:/skiff/\$\{Environment\}/app$"),
    # The release alarms, named skiff-<Environment>-... (AlarmName of ReleaseErrorRateAlarm and
    # ReleaseUnhealthyHostsAlarm).
    re.compile(_ARN % "cloudwatch" + r"alarm:skiff-\$\{Environment\}-[a-z0-9-]+$"),
]
OWN_REFS = [{"Ref": "DatabaseSecretArn"},
            {"Fn::GetAtt": ["Database", "MasterUserSecret.SecretArn"]}]
SSM_PARAMETER_OWN = OWN_ARNS[0]
# AWS managed policies a role may carry, and why (the instance role may carry none).
MANAGED_POLICY_ALLOWED = {
    "AmazonRDSEnhancedMonitoringRole":
        "RDS's own enhanced-monitoring service role, assumable only by monitoring.rds.amazonaws.com",
}


def resource_values(value):
    """Every value a statement's Resource can take: each list item, both branches of an Fn::If."""
    if isinstance(value, list):
        for v in value:
            yield from resource_values(v)
    elif isinstance(value, dict) and "Fn::If" in value:
        yield from resource_values(value["Fn::If"][1])
        yield from resource_values(value["Fn::If"][2])
    else:
        yield value


def is_own(resource):
    if resource in OWN_REFS:
        return True
    sub = resource.get("Fn::Sub") if isinstance(resource, dict) else None
    return isinstance(sub, str) and any(p.match(sub) for p in OWN_ARNS)


def statement_texts(text, logical_id):
    """Sid -> the template text of that statement of resource `logical_id` (comments included)."""
    lines = text.splitlines()
    start = lines.index(f"  {logical_id}:")
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"^  \S", lines[i])), len(lines))
    found, sid, indent, buf = {}, None, None, []
    for line in lines[start + 1:end]:
        m = re.match(r"^(\s*)- Sid: (\S+)", line)
        if m:
            if sid:
                found[sid] = "\n".join(buf)
            sid, indent, buf = m.group(2), len(m.group(1)), [line]
        elif sid is not None:
            stripped = len(line) - len(line.lstrip())
            if line.strip() and stripped <= indent and not line.lstrip().startswith("#"):
                found[sid] = "\n".join(buf)
                sid = None
            else:
                buf.append(line)
    if sid:
        found[sid] = "\n".join(buf)
    return found


def wildcard_reason(statement_text):
    """The text of the `# wildcard:` comment in a statement (with its continuation lines)."""
    lines = statement_text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("# wildcard:"):
            reason = [line.strip()[len("# wildcard:"):]]
            for more in lines[i + 1:]:
                if not more.strip().startswith("#") or more.strip().startswith("# http"):
                    break
                reason.append(more.strip().lstrip("#"))
            return " ".join(r.strip() for r in reason).strip()
    return ""


def policy_problems(text, t):
    """Every IAM statement whose Resource is not this stack's own and not justified in place; every
    SSM read outside /skiff/<Environment>/; every managed policy not allowed."""
    problems = []
    for logical_id, res in t["Resources"].items():
        props = res.get("Properties", {})
        if res["Type"] == "AWS::IAM::Role":
            for arn in props.get("ManagedPolicyArns", []):
                name = str(arn).rsplit("/", 1)[-1].rstrip("'}\"")
                if name not in MANAGED_POLICY_ALLOWED:
                    problems.append(f"{logical_id}: managed policy {arn} (not allowed)")
            if props.get("Policies"):
                problems.append(f"{logical_id}: inline Policies; use an AWS::IAM::Policy resource")
            continue
        if res["Type"] not in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            continue
        texts = statement_texts(text, logical_id)
        for st in props["PolicyDocument"]["Statement"]:
            sid = st.get("Sid")
            where = f"{logical_id}.{sid}"
            if not sid or sid not in texts:
                problems.append(f"{logical_id}: a statement without a Sid ({st})")
                continue
            if st.get("Effect") != "Allow" or "NotResource" in st or "NotAction" in st:
                problems.append(f"{where}: only Allow with Action and Resource is checked here")
                continue
            actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
            values = list(resource_values(st["Resource"]))
            foreign = [v for v in values if not is_own(v)]
            if foreign and len(wildcard_reason(texts[sid])) < 30:
                problems.append(f"{where}: resource {foreign} is not this stack's own and has no "
                                f"'# wildcard:' reason in its statement")
            reads_ssm = [a for a in actions if a == "*" or a.startswith("ssm:")
                         and re.match(r"ssm:(\*|Get.*)", a)]
            if reads_ssm:
                outside = [v for v in values
                           if not (isinstance(v, dict)
                                   and SSM_PARAMETER_OWN.match(str(v.get("Fn::Sub", ""))))]
                if outside:
                    problems.append(f"{where}: {reads_ssm} on {outside}, outside /skiff/<Environment>/")
    return problems


def policy_checks(name, text, t):
    problems = policy_problems(text, t)
    check(f"{name}: every IAM resource is this stack's own or a justified wildcard; SSM reads only "
          f"under /skiff/<Environment>/", not problems, "\n  ".join([""] + problems))


def policy_check_self_test(app_text, app_t):
    """The policy check itself fails on what it is there to catch."""
    t = copy.deepcopy(app_t)
    stmts = t["Resources"]["AgentPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    by_sid = {s["Sid"]: s for s in stmts}
    # 1. a parameter path of every environment (the AmazonSSMManagedInstanceCore mistake)
    by_sid["ReadOwnRelease"]["Resource"] = {
        "Fn::Sub": "arn:${AWS::Partition}:ssm:${AWS::Region}:${AWS::AccountId}:parameter/skiff/*"}
    # 2. "*" on a pull, with no reason
    by_sid["PullOwnImage"]["Resource"] = "*"
    # 3. another group's hook
    by_sid["AnswerOwnLifecycleHooks"]["Resource"] = {"Fn::Sub": (
        "arn:${AWS::Partition}:autoscaling:${AWS::Region}:${AWS::AccountId}:"
        "autoScalingGroup:*:autoScalingGroupName/skiff-*")}
    # 4. the managed policy back on the instance role
    t["Resources"]["InstanceRole"]["Properties"]["ManagedPolicyArns"] = [
        {"Fn::Sub": "arn:${AWS::Partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"}]
    problems = policy_problems(app_text, t)
    caught = {w for w in ("ReadOwnRelease", "PullOwnImage", "AnswerOwnLifecycleHooks",
                          "AmazonSSMManagedInstanceCore") if any(w in p for p in problems)}
    equal("policy check: catches an all-environments parameter, an unjustified '*', another "
          "group's hook and AmazonSSMManagedInstanceCore", caught,
          {"ReadOwnRelease", "PullOwnImage", "AnswerOwnLifecycleHooks",
           "AmazonSSMManagedInstanceCore"})
    # 5. a ssm read on "*" is refused even with a wildcard reason
    t = copy.deepcopy(app_t)
    sm = t["Resources"]["SessionManagerPolicy"]["Properties"]["PolicyDocument"]["Statement"][0]
    sm["Action"] = sm["Action"] + ["ssm:GetParameter"]
    check("policy check: an SSM read on '*' is refused even with a '# wildcard:' reason",
          any("outside /skiff/<Environment>/" in p for p in policy_problems(app_text, t)))


# --- template checks ------------------------------------------------------------------------

# Parameters that end up in the agent's config, with the config key they become.
CONFIG_NUMBERS = {"AppPort": ("app", "port"), "AgentPort": ("health", "listen"),
                  "StartTimeoutSeconds": ("app", "start_timeout"),
                  "StopTimeoutSeconds": ("app", "stop_timeout"),
                  "DrainSeconds": ("release", "drain"),
                  "SlotPortA": ("app", "slots"), "SlotPortB": ("app", "slots")}
PORTS = ("AppPort", "AgentPort", "SlotPortA", "SlotPortB")
HOOK_MARGIN = 60


def app_template_checks(text, t):
    p, r = t["Parameters"], t["Resources"]
    tg = r["TargetGroup"]["Properties"]
    equal("app: health check goes to the agent port", tg["HealthCheckPort"], {"Ref": "AgentPort"})
    equal("app: agent port defaults to 8081", p["AgentPort"]["Default"], 8081)
    equal("app: traffic goes to the app port", tg["Port"], {"Ref": "AppPort"})
    equal(
        "app: health check path, interval, timeout, thresholds",
        [tg[k] for k in ("HealthCheckPath", "HealthCheckIntervalSeconds",
                         "HealthCheckTimeoutSeconds", "HealthyThresholdCount",
                         "UnhealthyThresholdCount")],
        ["/healthz", 5, 2, 2, 2],
    )
    attrs = {a["Key"]: a["Value"] for a in tg["TargetGroupAttributes"]}
    equal("app: deregistration delay is the agent's drain",
          attrs.get("deregistration_delay.timeout_seconds"), {"Ref": "DrainSeconds"})
    check("app: drain default is short (15-30 s)", 15 <= p["DrainSeconds"]["Default"] <= 30)

    g = r["AutoScalingGroup"]["Properties"]
    equal("app: group uses ELB health checks", g["HealthCheckType"], "ELB")
    equal("app: instance maintenance policy 100/200", g["InstanceMaintenancePolicy"],
          {"MinHealthyPercentage": 100, "MaxHealthyPercentage": 200})
    hooks = g["LifecycleHookSpecificationList"]
    equal("app: launch hook skiff-launch (default ABANDON), terminate hook skiff-terminate (default CONTINUE)",
          [(h["LifecycleHookName"], h["LifecycleTransition"], h["DefaultResult"]) for h in hooks],
          [("skiff-launch", "autoscaling:EC2_INSTANCE_LAUNCHING", "ABANDON"),
           ("skiff-terminate", "autoscaling:EC2_INSTANCE_TERMINATING", "CONTINUE")])
    check("app: launch hook heartbeat covers the start timeout (defaults)",
          p["LaunchHookTimeoutSeconds"]["Default"] > p["StartTimeoutSeconds"]["Default"])



def app_alarm_checks(text, t):
    """The alarms a release watches (issue 8): target 5xx rate and unhealthy hosts of this
    stack's target group, named by the output ReleaseAlarmNames."""
    r, o = t["Resources"], t["Outputs"]
    alarms = {k: v["Properties"] for k, v in r.items() if v["Type"] == "AWS::CloudWatch::Alarm"}
    equal("app: two release alarms", sorted(alarms), ["ReleaseErrorRateAlarm", "ReleaseUnhealthyHostsAlarm"])
    names = [alarms[k]["AlarmName"]["Fn::Sub"] for k in ("ReleaseErrorRateAlarm", "ReleaseUnhealthyHostsAlarm")]
    equal("app: ReleaseAlarmNames output lists exactly the alarms' names, comma-separated",
          o["ReleaseAlarmNames"]["Value"], {"Fn::Sub": ",".join(names)})
    dims = [{"Name": "LoadBalancer", "Value": {"Fn::If": ["OwnLoadBalancer", {"Fn::GetAtt": ["LoadBalancer", "LoadBalancerFullName"]}, SHARED_LB_FULL_NAME]}},
            {"Name": "TargetGroup", "Value": {"Fn::GetAtt": ["TargetGroup", "TargetGroupFullName"]}}]
    rate = alarms["ReleaseErrorRateAlarm"]
    stats = {m["Id"]: m["MetricStat"] for m in rate["Metrics"] if "MetricStat" in m}
    equal("app: 5xx alarm: target 5xx and requests of this target group, summed per minute",
          {k: (v["Metric"]["Namespace"], v["Metric"]["MetricName"], v["Metric"]["Dimensions"], v["Stat"], v["Period"])
           for k, v in stats.items()},
          {"errors": ("AWS/ApplicationELB", "HTTPCode_Target_5XX_Count", dims, "Sum", 60),
           "requests": ("AWS/ApplicationELB", "RequestCount", dims, "Sum", 60)})
    returned = [m for m in rate["Metrics"] if m.get("ReturnData")]
    check("app: 5xx alarm returns one expression, a percentage of the requests with a minimum volume",
          len(returned) == 1 and "100 * FILL(errors, 0) / requests" in returned[0]["Expression"]
          and "requests >= 20" in returned[0]["Expression"], str(returned))
    equal("app: 5xx alarm: > 5 % for 2 of 2 minutes, missing data not breaching",
          [rate[k] for k in ("ComparisonOperator", "Threshold", "EvaluationPeriods", "DatapointsToAlarm",
                             "TreatMissingData")],
          ["GreaterThanThreshold", 5, 2, 2, "notBreaching"])
    u = alarms["ReleaseUnhealthyHostsAlarm"]
    equal("app: unhealthy-hosts alarm: minimum UnHealthyHostCount of this target group > 0 for 2 of 2 minutes",
          [u[k] for k in ("Namespace", "MetricName", "Dimensions", "Statistic", "Period", "EvaluationPeriods",
                          "DatapointsToAlarm", "ComparisonOperator", "Threshold", "TreatMissingData")],
          ["AWS/ApplicationELB", "UnHealthyHostCount", dims, "Minimum", 60, 2, 2, "GreaterThanThreshold", 0,
           "notBreaching"])
    check("app: both alarms cite the instance refresh alarm docs",
          "instance-refresh-rollback.html" in text and "API_AlarmSpecification.html" in text)


def app_bounds_checks(text, t):
    """Finding 6: every value the parameters allow is one the agent accepts."""
    p, r = t["Parameters"], t["Resources"]
    g = r["AutoScalingGroup"]["Properties"]
    # --- finding 6: every value the parameters allow is one the agent accepts
    missing_bounds = [k for k in CONFIG_NUMBERS
                      if "MinValue" not in p[k] or "MaxValue" not in p[k]]
    check("app: every number in the agent config has MinValue and MaxValue", not missing_bounds,
          str(missing_bounds))
    check("app: DrainSeconds MinValue >= 1 (the agent refuses a zero drain)",
          p["DrainSeconds"].get("MinValue", 0) >= 1, str(p["DrainSeconds"]))
    check("app: durations' MinValue >= 1 (the agent refuses zero durations)",
          all(p[k].get("MinValue", 0) >= 1 for k in CONFIG_NUMBERS if k.endswith("Seconds")))
    check("app: ports within 1-65535",
          all(1 <= p[k]["MinValue"] and p[k]["MaxValue"] <= 65535 for k in PORTS))
    terminate = {h["LifecycleHookName"]: h
                 for h in g["LifecycleHookSpecificationList"]}["skiff-terminate"]["HeartbeatTimeout"]
    need = p["DrainSeconds"]["MaxValue"] + p["StopTimeoutSeconds"]["MaxValue"] + HOOK_MARGIN
    check(f"app: terminate heartbeat {terminate} s >= max drain + max stop timeout + "
          f"{HOOK_MARGIN} s = {need} s", isinstance(terminate, int) and terminate >= need)
    unit = os.path.join(HERE, "..", "packer", "files", "skiff-agent.service")
    with open(unit) as f:
        stop = [int(line.split("=", 1)[1]) for line in f if line.startswith("TimeoutStopSec=")]
    check(f"app: the AMI's unit waits for the agent's longest drain and stop (TimeoutStopSec "
          f"{stop} >= {need - HOOK_MARGIN} s)", len(stop) == 1 and stop[0] >= need - HOOK_MARGIN)
    check("app: Rules refuse AppPort == AgentPort",
          any("AppPort" in d for d in rules_refuse(t, {"AppPort": 9000, "AgentPort": 9000})))
    equal("app: Rules accept the defaults (and a certificate for the own load balancer)",
          rules_refuse(t, {"CertificateArn": "arn:aws:acm:us-east-1:123456789012:certificate/t"}), [])
    for clash in ({"SlotPortA": 9000, "SlotPortB": 9000}, {"SlotPortA": 8080}, {"SlotPortB": 8080},
                  {"SlotPortA": 8081}, {"SlotPortB": 8081}):
        check(f"app: Rules refuse slot ports that collide: {clash}", bool(rules_refuse(t, clash)))
    equal("app: Rules let a drain stack keep any slots (its config has none)",
          rules_refuse(t, {"SwapMode": "drain", "SlotPortA": 8080, "SlotPortB": 8080,
                           "CertificateArn": "arn:aws:acm:us-east-1:123456789012:certificate/t"}), [])
    equal("app: slot ports default to 8090 and 8091, SwapMode to handover (or drain)",
          (p["SlotPortA"].get("Default"), p["SlotPortB"].get("Default"),
           p["SwapMode"].get("Default"), p["SwapMode"].get("AllowedValues")),
          (8090, 8091, "handover", ["handover", "drain"]))
    check("app: Rules refuse DatabaseHost without DatabaseSecretArn",
          bool(rules_refuse(t, {"DatabaseHost": "db.example.com"})))
    check("app: Rules refuse DatabaseSecretArn or DatabaseClientsSecurityGroupId without DatabaseHost",
          bool(rules_refuse(t, {"DatabaseSecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:x"}))
          and bool(rules_refuse(t, {"DatabaseClientsSecurityGroupId": "sg-0123456789abcdef0"}))
          and bool(rules_refuse(t, {"DatabaseSecurityGroupId": "sg-0123456789abcdef0"})))
    equal("app: no rule into another stack's security group but the deprecated DatabaseSecurityGroupId's",
          [(k, v.get("Condition")) for k, v in t["Resources"].items()
           if v["Type"] == "AWS::EC2::SecurityGroupIngress" and "Database" in json.dumps(v["Properties"].get("GroupId"))],
          [("SharedDatabaseIngress", "OpenSharedDatabase")])



def app_instance_checks(text, t):
    """The launch template and the network."""
    r = t["Resources"]
    lt = r["LaunchTemplate"]["Properties"]["LaunchTemplateData"]
    lt = r["LaunchTemplate"]["Properties"]["LaunchTemplateData"]
    md = lt["MetadataOptions"]
    check("app: IMDSv2 required with a hop limit, instance tags in the metadata",
          md["HttpTokens"] == "required" and 1 <= md["HttpPutResponseHopLimit"] <= 2
          and md.get("InstanceMetadataTags") == "enabled", str(md))
    check("app: no SSH key, no public address",
          "KeyName" not in lt and "NetworkInterfaces" not in lt)
    check("app: root volume encrypted",
          all(b["Ebs"]["Encrypted"] is True for b in lt["BlockDeviceMappings"]))



def app_secret_scope_checks(text, t):
    """Finding 3 (secret scope), the hooks (finding 2) and the deployer policy."""
    r, o = t["Resources"], t["Outputs"]
    # --- finding 3: secret scope
    role = r["InstanceRole"]["Properties"]
    check("app: the instance role carries no managed policy (AmazonSSMManagedInstanceCore reads "
          "every parameter)", not role.get("ManagedPolicyArns"), str(role.get("ManagedPolicyArns")))
    sm = r["SessionManagerPolicy"]["Properties"]
    equal("app: Session Manager through the documented minimal statement, on the instance role",
          (sm["Roles"], sorted(actions_of(sm["PolicyDocument"]["Statement"]))),
          ([{"Ref": "InstanceRole"}],
           sorted(["ssm:UpdateInstanceInformation", "ssmmessages:CreateControlChannel",
                   "ssmmessages:CreateDataChannel", "ssmmessages:OpenControlChannel",
                   "ssmmessages:OpenDataChannel"])))
    agent_policy = r["AgentPolicy"]["Properties"]
    equal("app: agent policy is the instance role's", agent_policy["Roles"], [{"Ref": "InstanceRole"}])
    check("app: no instance boots before the agent's and the secret's policies exist",
          {"AgentPolicy", "DatabaseSecretPolicy"} <= set(r["AutoScalingGroup"].get("DependsOn", [])))
    by_sid = {s["Sid"]: s for s in agent_policy["PolicyDocument"]["Statement"]}
    check("app: kms:Decrypt only through SSM",
          "kms:ViaService" in str(by_sid["DecryptSecureStringsThroughSsm"].get("Condition")))
    tag_cond = by_sid["TagOwnInstanceWithRelease"].get("Condition", {})
    check("app: CreateTags limited to its group and the agent's keys (skiff:release, pulled, failed)",
          "aws:ResourceTag/aws:autoscaling:groupName" in tag_cond.get("StringEquals", {})
          and sorted(tag_cond.get("ForAllValues:StringEquals", {}).get("aws:TagKeys", []))
          == ["skiff:failed", "skiff:pulled", "skiff:release"],
          str(tag_cond))
    hook = by_sid["AnswerOwnLifecycleHooks"]
    # Which actions the agent needs is proven by running it under this policy
    # (testbed/permissions/permissions_test.py); here only where they apply.
    check("app: hook calls on its own group only",
          str(hook["Resource"]).endswith("autoScalingGroupName/skiff-${Environment}'}"),
          str(hook))
    secret = r["DatabaseSecretPolicy"]["Properties"]
    equal("app: database secret policy on the own database's managed secret, or the one given",
          (secret["Roles"], secret["PolicyDocument"]["Statement"][0]["Resource"]),
          ([{"Ref": "InstanceRole"}],
           {"Fn::If": ["CreateDatabase",
                       {"Fn::GetAtt": ["Database", "MasterUserSecret.SecretArn"]},
                       {"Ref": "DatabaseSecretArn"}]}))

    # --- the deployer policy
    deployer = r["DeployerPolicy"]
    equal("app: deployer policy is a managed policy, output DeployerPolicyArn",
          (deployer["Type"], o.get("DeployerPolicyArn", {}).get("Value")),
          ("AWS::IAM::ManagedPolicy", {"Ref": "DeployerPolicy"}))
    check("app: the deployer policy is attached to nobody by the stack",
          not any(k in deployer["Properties"] for k in ("Roles", "Users", "Groups")))
    d_by_sid = {s["Sid"]: s for s in deployer["Properties"]["PolicyDocument"]["Statement"]}
    check("app: deployer may write the release and the release lock, of this environment only",
          "ssm:PutParameter" in d_by_sid["WriteOwnRelease"]["Action"]
          and str(d_by_sid["WriteOwnRelease"]["Resource"]).endswith("/skiff/${Environment}/release'}")
          and "ssm:DeleteParameter" in d_by_sid["HoldOwnReleaseLock"]["Action"]
          and str(d_by_sid["HoldOwnReleaseLock"]["Resource"]).endswith("/skiff/${Environment}/release-lock'}"))
    steer = d_by_sid["SteerOwnInstances"]
    steer_cond = steer.get("Condition", {})
    check("app: deployer tags (in place) only its group's instances, only skiff:target and skiff:pull",
          steer["Action"] == "ec2:CreateTags"
          and steer_cond.get("StringEquals", {}).get("aws:ResourceTag/aws:autoscaling:groupName")
          == {"Fn::Sub": "skiff-${Environment}"}
          and sorted(steer_cond.get("ForAllValues:StringEquals", {}).get("aws:TagKeys", []))
          == ["skiff:pull", "skiff:target"],
          str(steer))

    policy_checks("app", text, t)



def _render(value, names):
    """A policy value with Fn::Sub resolved from names (no other intrinsic is expected here);
    `${!x}` is Fn::Sub's escape for the literal `${x}` (an IAM policy variable)."""
    if isinstance(value, list):
        return [_render(v, names) for v in value]
    if isinstance(value, dict) and set(value) == {"Fn::Sub"} and isinstance(value["Fn::Sub"], str):
        return re.sub(r"\$\{(!?)([^}]+)\}",
                      lambda m: "${" + m.group(2) + "}" if m.group(1) else names[m.group(2)], value["Fn::Sub"])
    if isinstance(value, dict):
        return {k: _render(v, names) for k, v in value.items()}
    return value


def app_narrow_grants_checks(text, t):
    """Issue 18, finding 8: the grants narrowed, each shown by evaluating the rendered policy with
    the emulator's IAM evaluation (testbed/emulator/policy.py) on the requests AWS would authorize,
    with the condition keys AWS documents for them (which the emulator's request contexts do
    not all carry yet: aws:TagKeys of Auto Scaling tagging, the SSM encryption context)."""
    sys.path.insert(0, os.path.join(HERE, "..", "testbed", "emulator"))
    import policy  # noqa: E402 (the emulator's evaluation, pure)

    r = t["Resources"]
    env, account, region = "feature-x", "123456789012", REGION
    names = {"AWS::Partition": "aws", "AWS::Region": region, "AWS::AccountId": account,
             "AWS::StackName": f"app-{env}", "Environment": env, "ImageRepositoryName": "skiff-app"}

    def stmts(logical_id):
        return _render(r[logical_id]["Properties"]["PolicyDocument"]["Statement"], names)

    def allowed(statements, action, resource, context=None):
        return policy.evaluate(statements, [policy.Check(action, resource, context or {})]).allowed

    # The deployer's tags on its group: only the key ctl writes (skiff:held-processes).
    # https://docs.aws.amazon.com/autoscaling/ec2/userguide/ec2-auto-scaling-tagging.html
    #   (aws:TagKeys with ForAllValues on CreateOrUpdateTags and DeleteTags)
    deployer = stmts("DeployerPolicy")
    group = (f"arn:aws:autoscaling:{region}:{account}:autoScalingGroup:"
             f"0f0e0d0c-0000-4000-8000-000000000000:autoScalingGroupName/skiff-{env}")
    for action in ("autoscaling:CreateOrUpdateTags", "autoscaling:DeleteTags"):
        check(f"app: the deployer may {action} skiff:held-processes on its group",
              allowed(deployer, action, group, {"aws:TagKeys": ["skiff:held-processes"]}))
        for keys in (["Name"], ["skiff:held-processes", "a b"], ["skiff/x"], ["skiff:target"]):
            check(f"app: the deployer may not {action} {keys} on its group",
                  not allowed(deployer, action, group, {"aws:TagKeys": keys}))
    check("app: the deployer still suspends and resumes its group's processes",
          allowed(deployer, "autoscaling:SuspendProcesses", group)
          and allowed(deployer, "autoscaling:ResumeProcesses", group))

    # kms:Decrypt only through SSM and only for this environment's parameters: SSM decrypts a
    # SecureString with the encryption context PARAMETER_ARN = the parameter's ARN.
    # https://docs.aws.amazon.com/kms/latest/developerguide/services-parameter-store.html
    agent = stmts("AgentPolicy")
    key = f"arn:aws:kms:{region}:{account}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    via = {"kms:ViaService": [f"ssm.{region}.amazonaws.com"]}

    def param(e, rest):
        return {"kms:EncryptionContext:PARAMETER_ARN": [f"arn:aws:ssm:{region}:{account}:parameter/skiff/{e}/{rest}"]}

    check("app: kms:Decrypt through SSM of its own /skiff/<env>/env/ SecureString",
          allowed(agent, "kms:Decrypt", key, {**via, **param(env, "env/TOKEN")}))
    check("app: no kms:Decrypt through SSM of another environment's parameter",
          not allowed(agent, "kms:Decrypt", key, {**via, **param("other", "env/TOKEN")}))
    check("app: no kms:Decrypt through SSM of another /skiff/<env>x/ parameter (prefix)",
          not allowed(agent, "kms:Decrypt", key, {**via, **param(env + "x", "env/TOKEN")}))
    check("app: no kms:Decrypt outside SSM, even with its own parameter's context",
          not allowed(agent, "kms:Decrypt", key, param(env, "env/TOKEN")))

    # The instance role pulls, never pushes (Amazon ECR's pull policy: BatchGetImage and
    # GetDownloadUrlForLayer; BatchCheckLayerAvailability is one of the push actions).
    # https://docs.aws.amazon.com/AmazonECR/latest/userguide/image-push-iam.html
    repo = f"arn:aws:ecr:{region}:{account}:repository/skiff-app"
    check("app: the instance role pulls its image (BatchGetImage, GetDownloadUrlForLayer)",
          allowed(agent, "ecr:BatchGetImage", repo) and allowed(agent, "ecr:GetDownloadUrlForLayer", repo))
    role = agent + stmts("SessionManagerPolicy")
    pushes = [a for a in ("ecr:BatchCheckLayerAvailability", "ecr:InitiateLayerUpload",
                          "ecr:UploadLayerPart", "ecr:CompleteLayerUpload", "ecr:PutImage")
              if allowed(role, a, repo)]
    equal("app: the instance role has no ECR push action", pushes, [])
    check("app: the deployer reads manifests and signature blobs (BatchGetImage, GetDownloadUrlForLayer)",
          allowed(deployer, "ecr:BatchGetImage", repo) and allowed(deployer, "ecr:GetDownloadUrlForLayer", repo))
    equal("app: the deployer has no ECR push action",
          [a for a in ("ecr:BatchCheckLayerAvailability", "ecr:InitiateLayerUpload", "ecr:UploadLayerPart",
                       "ecr:CompleteLayerUpload", "ecr:PutImage") if allowed(deployer, a, repo)], [])

    # Finding 6: an instance tags only itself. A request signed with the credentials EC2 gives
    # an instance carries ec2:SourceInstanceARN; the instance tagged has ec2:InstanceID.
    # https://docs.aws.amazon.com/service-authorization/latest/reference/list_amazonec2.html
    def tagging(target, source, keys=("skiff:release",), group=f"skiff-{env}"):
        ctx = {"ec2:InstanceID": [target], "aws:ResourceTag/aws:autoscaling:groupName": [group],
               "aws:TagKeys": list(keys)}
        if source:
            ctx["ec2:SourceInstanceARN"] = [f"arn:aws:ec2:{region}:{account}:instance/{source}"]
        return ctx

    me, peer = "i-0aaaaaaaaaaaaaaa1", "i-0aaaaaaaaaaaaaaa2"
    instance = f"arn:aws:ec2:{region}:{account}:instance/"
    for keys in (["skiff:release"], ["skiff:pulled"], ["skiff:failed"]):
        check(f"app: an instance tags itself {keys}",
              allowed(role, "ec2:CreateTags", instance + me, tagging(me, me, keys)))
    for what, target, ctx in [
        ("a peer of its group", peer, tagging(peer, me)),
        ("a peer, with a prefix of its own id", me + "0", tagging(me + "0", me)),
        ("itself without instance credentials (no ec2:SourceInstanceARN)", me, tagging(me, None)),
        ("itself outside its group", me, tagging(me, me, group="skiff-other")),
        ("itself with ctl's instruction skiff:target", me, tagging(me, me, ("skiff:target",))),
    ]:
        check(f"app: an instance may not tag {what}",
              not allowed(role, "ec2:CreateTags", instance + target, ctx))

    # Issue 20: the trusted keys. The deployer reads them and nothing else; the instance role
    # reads them.
    keys = f"arn:aws:ssm:{region}:{account}:parameter/skiff/{env}/trusted-keys"
    stack = f"arn:aws:cloudformation:{region}:{account}:stack/app-{env}/0f0e0d0c-0000-4000-8000-000000000000"
    alarm = f"arn:aws:cloudwatch:{region}:{account}:alarm:skiff-{env}-"
    check("app: the deployer reads its two release alarms (an in-place release watches them)",
          allowed(deployer, "cloudwatch:DescribeAlarms", alarm + "target-5xx-rate")
          and allowed(deployer, "cloudwatch:DescribeAlarms", alarm + "unhealthy-hosts"))
    check("app: the deployer reads no other alarm",
          not allowed(deployer, "cloudwatch:DescribeAlarms", alarm.replace(env, "other") + "target-5xx-rate")
          and not allowed(deployer, "cloudwatch:DescribeAlarms", f"arn:aws:cloudwatch:{region}:{account}:alarm:*"))
    check("app: the deployer reads the trusted keys (ssm:GetParameter)", allowed(deployer, "ssm:GetParameter", keys))
    for action, resource in [("ssm:PutParameter", keys), ("ssm:DeleteParameter", keys),
                             ("ssm:DeleteParameters", keys), ("ssm:LabelParameterVersion", keys),
                             ("ssm:AddTagsToResource", keys), ("cloudformation:UpdateStack", stack),
                             ("cloudformation:CreateChangeSet", stack), ("cloudformation:ExecuteChangeSet", stack)]:
        check(f"app: the deployer may not {action} (the keys the hosts trust)",
              not allowed(deployer, action, resource))
    check("app: the instance role reads the trusted keys", allowed(role, "ssm:GetParameter", keys))
    check("app: the instance role may not write them",
          not allowed(role, "ssm:PutParameter", keys) and not allowed(role, "ssm:DeleteParameter", keys))
    check("app: no other environment's trusted keys",
          not allowed(role, "ssm:GetParameter", keys.replace(f"/{env}/", "/other/"))
          and not allowed(deployer, "ssm:GetParameter", keys.replace(f"/{env}/", "/other/")))


def public_key_pem():
    """A fresh ECDSA P-256 public key, PEM (what TrustedKeys takes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def trusted_keys_pattern_checks(t):
    """TrustedKeys' AllowedPattern (Java's regex; the same here for these classes) on a table."""
    p = t["Parameters"]["TrustedKeys"]
    rx = re.compile(p["AllowedPattern"])
    one, two = public_key_pem(), public_key_pem()
    private = one.replace("PUBLIC KEY", "PRIVATE KEY")
    cert = one.replace("PUBLIC KEY", "CERTIFICATE")
    for what, value, want in [("empty (off)", "", True), ("one key", one, True), ("two keys (rotation)", one + two, True),
                              ("one key without its last newline", one.rstrip(), True),
                              ("a private key", private, False), ("a certificate", cert, False),
                              ("a key and garbage", one + "x", False), ("garbage", "not a key", False),
                              ("a header only", "-----BEGIN PUBLIC KEY-----\n", False)]:
        check(f"app: TrustedKeys {'accepts' if want else 'refuses'} {what}",
              (rx.fullmatch(value) is not None) == want and (len(value) <= p["MaxLength"] or not want))


def finding_12_checks(app_t, db_t):
    """Issue 18, finding 12: MySQL 8.4 with its lifecycle support stated; no Graviton type for
    the x86_64 AMI."""
    for name, t, key in (("db", db_t, "EngineVersion"), ("app", app_t, "DatabaseEngineVersion")):
        version = str(t["Parameters"][key]["Default"])
        check(f"{name}: MySQL 8.4 by default, an exact minor version ({version})",
              re.fullmatch(r"8\.4\.[0-9]+", version) is not None)
        props = t["Resources"]["Database"]["Properties"]
        equal(f"{name}: RDS Extended Support stated (disabled: no silent paid support)",
              props.get("EngineLifecycleSupport"), "open-source-rds-extended-support-disabled")
    pattern = app_t["Parameters"]["InstanceType"]["AllowedPattern"]
    x86 = ["t3.small", "t3a.medium", "t2.micro", "m7i.large", "m7i-flex.large", "c7a.xlarge",
           "g4dn.xlarge", "g6.xlarge", "r6idn.large", "m5zn.large", "u-6tb1.metal",
           "u7i-12tb.224xlarge", "x2iedn.xlarge", "z1d.large", "i4i.large", "p5.48xlarge",
           "inf2.xlarge", "trn1.2xlarge", "c5n.large", "m6in.large", "hpc7a.96xlarge", "d3en.xlarge"]
    arm = ["t4g.small", "m7g.large", "m6gd.large", "c6gn.large", "c7gn.large", "r8g.large",
           "x2gd.large", "im4gn.large", "is4gen.large", "a1.large", "g5g.xlarge", "hpc7g.4xlarge",
           "i8g.large", "c8gd.large", "m8g.medium", "r7gd.large", "x8g.large",
           "mac1.metal", "mac2.metal", "mac2-m2pro.metal"]
    equal("app: InstanceType accepts x86_64 types",
          [i for i in x86 if not re.fullmatch(pattern, i)], [])
    equal("app: InstanceType refuses Graviton (arm64), a1 and mac types",
          [i for i in arm if re.fullmatch(pattern, i)], [])


def app_network_checks(text, t):
    """Who reaches the instances."""
    r = t["Resources"]
    inst_sg = r["InstanceSecurityGroup"]["Properties"]
    check("app: instances have no inline ingress", "SecurityGroupIngress" not in inst_sg)
    ingress = [(k, v["Properties"]) for k, v in r.items()
               if v["Type"] == "AWS::EC2::SecurityGroupIngress"]
    lb_group = {"Fn::If": ["OwnLoadBalancer", {"Fn::GetAtt": ["LoadBalancerSecurityGroup", "GroupId"]},
                           {"Ref": "SharedLoadBalancerSecurityGroupId"}]}
    equal("app: instance ingress only from the load balancer (own or shared), on app and agent ports",
          sorted((str(i["FromPort"]), str(i["SourceSecurityGroupId"])) for _, i in ingress
                 if i["GroupId"] == {"Fn::GetAtt": ["InstanceSecurityGroup", "GroupId"]}),
          sorted([(str({"Ref": "AgentPort"}), str(lb_group)), (str({"Ref": "AppPort"}), str(lb_group))]))
    equal("app: the own load balancer and its listeners exist only without a shared listener",
          {k for k in OWN_LB if r[k].get("Condition") == "OwnLoadBalancer"}, OWN_LB)
    rule = r["SiteListenerRule"]
    equal("app: the shared listener's rule: this stack's host name -> its target group",
          (rule.get("Condition"), rule["Properties"]["Conditions"], rule["Properties"]["Actions"]),
          ("SharedLoadBalancer",
           [{"Field": "host-header", "HostHeaderConfig": {"Values": [{"Ref": "SiteHostName"}]}}],
           [{"Type": "forward", "TargetGroupArn": {"Ref": "TargetGroup"}}]))
    alb_in = r["LoadBalancerSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    equal("app: load balancer open on 80 and 443 only", sorted(i["FromPort"] for i in alb_in), [80, 443])
    http = r["HttpListener"]["Properties"]["DefaultActions"][0]
    check("app: HTTP redirects to HTTPS",
          http["Type"] == "redirect" and http["RedirectConfig"]["Protocol"] == "HTTPS")



def app_release_checks(text, t):
    """Finding 5: the stack does not own the release value."""
    p, r, o = t["Parameters"], t["Resources"], t["Outputs"]
    # --- finding 5: the stack does not own the release value
    ssm_params = {k: v["Properties"]["Name"] for k, v in r.items() if v["Type"] == "AWS::SSM::Parameter"}
    equal("app: no AWS::SSM::Parameter resource but the trusted keys (the release value is ctl's, not the stack's)",
          ssm_params, {"TrustedKeysParameter": {"Fn::Sub": "/skiff/${Environment}/trusted-keys"}})
    check("app: no InitialTag parameter", "InitialTag" not in p)
    equal("app: ReleaseParameter output is the name /skiff/<Environment>/release",
          o["ReleaseParameter"]["Value"], {"Fn::Sub": "/skiff/${Environment}/release"})
    missing = {"ReleaseParameter", "AutoScalingGroup", "ImageRepository", "LoadBalancerDNS",
               "LifecycleHook", "DeployerPolicyArn", "LogGroup", "TargetGroup",
               "ReleaseAlarmNames", "ReleaseStrategy", "SwapMode"} - set(o)
    check("app: outputs ctl and Jenkins read are declared", not missing, f"missing {missing}")
    equal("app: ReleaseStrategy: refresh by default, or in-place; ctl reads the output",
          (p["ReleaseStrategy"].get("Default"), p["ReleaseStrategy"].get("AllowedValues"),
           o["ReleaseStrategy"]["Value"]),
          ("refresh", ["refresh", "in-place"], {"Ref": "ReleaseStrategy"}))
    equal("app: SwapMode output is the parameter (ctl reads how the hosts swap)",
          o["SwapMode"]["Value"], {"Ref": "SwapMode"})



def app_database_checks(text, t):
    """Finding 7: a database by default."""
    p, r = t["Parameters"], t["Resources"]
    lt = r["LaunchTemplate"]["Properties"]["LaunchTemplateData"]
    # --- finding 7: a database by default
    db = r["Database"]
    equal("app: own database unless an existing one is named",
          (db.get("Condition"), t["Conditions"]["CreateDatabase"]),
          ("CreateDatabase", {"Fn::Equals": [{"Ref": "DatabaseSecretArn"}, ""]}))
    check("app: no 'no database' mode (DatabaseHost empty means the stack's own)",
          p["DatabaseHost"]["Default"] == "" and p["DatabaseSecretArn"]["Default"] == "")
    env_line = [line for line in text.splitlines() if line.strip().startswith("env = ")]
    equal("app: the agent env always carries the database",
          [line.strip() for line in env_line],
          ['env = { DATABASE_HOST = "${DatabaseHost}", DATABASE_PORT = "${DatabasePort}", '
           'DATABASE_NAME = "${DatabaseName}", DATABASE_SECRET_ARN = "${DatabaseSecretArn}" }'])
    sub_vars = lt["UserData"]["Fn::Base64"]["Fn::Sub"][1]
    equal("app: the user data's database values: the own database's, or the parameters",
          {k: sub_vars[k] for k in ("DatabaseHost", "DatabasePort", "DatabaseSecretArn")},
          {"DatabaseHost": {"Fn::If": ["CreateDatabase",
                                       {"Fn::GetAtt": ["Database", "Endpoint.Address"]},
                                       {"Ref": "DatabaseHost"}]},
           "DatabasePort": {"Fn::If": ["CreateDatabase",
                                       {"Fn::GetAtt": ["Database", "Endpoint.Port"]},
                                       {"Ref": "DatabasePort"}]},
           "DatabaseSecretArn": {"Fn::If": ["CreateDatabase",
                                            {"Fn::GetAtt": ["Database", "MasterUserSecret.SecretArn"]},
                                            {"Ref": "DatabaseSecretArn"}]}})
    db_sg_in = r["DatabaseSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    equal("app: own database reachable only from the instances on 3306",
          [(i["FromPort"], i.get("SourceSecurityGroupId"), i.get("CidrIp")) for i in db_sg_in],
          [(3306, {"Fn::GetAtt": ["InstanceSecurityGroup", "GroupId"]}, None)])
    equal("app: own database's VPC security group is that group",
          db["Properties"]["VPCSecurityGroups"], [{"Fn::GetAtt": ["DatabaseSecurityGroup", "GroupId"]}])


def database_settings_checks(name, t, logical_id):
    """database.yaml's Database and app.yaml's own Database share these settings."""
    db = t["Resources"][logical_id]
    props = db["Properties"]
    equal(f"{name}: DeletionPolicy and UpdateReplacePolicy are Snapshot",
          (db.get("DeletionPolicy"), db.get("UpdateReplacePolicy")), ("Snapshot", "Snapshot"))
    check(f"{name}: mysql, storage encrypted", props.get("Engine") == "mysql"
          and props.get("StorageEncrypted") is True)
    check(f"{name}: password managed by RDS, none in the template",
          props.get("ManageMasterUserPassword") is True and "MasterUserPassword" not in props
          and not any(v.get("NoEcho") for v in t["Parameters"].values()))
    backups = props.get("BackupRetentionPeriod", {}).get("Ref")
    check(f"{name}: backups kept at least 7 days by default",
          backups in t["Parameters"] and t["Parameters"][backups]["Default"] >= 7
          and t["Parameters"][backups]["MinValue"] >= 1)
    check(f"{name}: not publicly accessible", props.get("PubliclyAccessible") is False)
    return props


def db_template_checks(text, t):
    r = t["Resources"]
    database_settings_checks("db", t, "Database")
    ingress = r["DatabaseSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    equal("db: reachable on 3306 only from its clients group",
          [(i["FromPort"], i.get("SourceSecurityGroupId"), i.get("CidrIp")) for i in ingress],
          [(3306, {"Fn::GetAtt": ["ClientsSecurityGroup", "GroupId"]}, None)])
    equal("db: no other ingress but the deprecated ClientSecurityGroupId's (a rule per client would be the quota again)",
          [(k, v.get("Condition")) for k, v in r.items() if v["Type"] == "AWS::EC2::SecurityGroupIngress"],
          [("IngressFromClient", "OneClient")])
    equal("db: SecretArn output reads the managed secret",
          t["Outputs"]["SecretArn"]["Value"], {"Fn::GetAtt": ["Database", "MasterUserSecret.SecretArn"]})
    policy_checks("db", text, t)


def same_database_settings(app_t, db_t):
    """app.yaml's own database is database.yaml's: same properties, fixed values equal."""
    a = app_t["Resources"]["Database"]["Properties"]
    d = db_t["Resources"]["Database"]["Properties"]
    differ = [k for k in sorted(set(a) | set(d))
              if k not in a or k not in d
              or (not isinstance(d[k], (dict, list)) and a[k] != d[k])]
    equal("app: own database has database.yaml's properties and fixed values", differ, [])
    equal("app: own database keeps a snapshot on delete and replace, like database.yaml",
          tuple(app_t["Resources"]["Database"].get(k) for k in ("DeletionPolicy", "UpdateReplacePolicy")),
          ("Snapshot", "Snapshot"))


# --- stack checks ---------------------------------------------------------------------------

SECRET_GETATT = '{ "Fn::GetAtt": [Database, MasterUserSecret.SecretArn] }'
SECRET_STAND_IN = ('{ "Fn::Sub": "arn:${AWS::Partition}:secretsmanager:${AWS::Region}:'
                   '${AWS::AccountId}:secret:rds!${Database}" }')


def moto_app_body(app_text):
    """app.yaml as moto can take it (see the module doc): each managed-secret GetAtt replaced by a
    stand-in ARN naming the database. Returns (body, how many were replaced)."""
    return app_text.replace(SECRET_GETATT, SECRET_STAND_IN), app_text.count(SECRET_GETATT)


def expected_agent_config(env, account, database, trust=None, **over):
    v = {"AppPort": 8080, "AgentPort": 8081, "StartTimeoutSeconds": 60,
         "StopTimeoutSeconds": 30, "DrainSeconds": 15, "SwapMode": "handover",
         "SlotPortA": 8090, "SlotPortB": 8091}
    v.update(over)
    return {
        "app": {
            "name": "app",
            "image": f"{account}.dkr.ecr.{REGION}.amazonaws.com/skiff-app",
            "port": v["AppPort"],
            "health_path": "/health",
            "detail_path": "/ready",
            "start_timeout": f"{v['StartTimeoutSeconds']}s",
            "stop_timeout": f"{v['StopTimeoutSeconds']}s",
            "swap": v["SwapMode"],
            # Only with handover: the agent refuses slots with swap = "drain".
            **({"slots": [v["SlotPortA"], v["SlotPortB"]]} if v["SwapMode"] == "handover" else {}),
            "env": database,
            "env_path": f"/skiff/{env}/env/",
        },
        "release": {
            "source": "ssm",
            "parameter": f"/skiff/{env}/release",
            "poll_interval": "60s",
            "update": "boot",
            "drain": f"{v['DrainSeconds']}s",
        },
        "health": {"listen": f"0.0.0.0:{v['AgentPort']}", "interval": "2s"},
        "aws": {"lifecycle_hook": "skiff-launch", "terminate_hook": "skiff-terminate"},
        # The instance id from IMDSv2 on EC2; here, without instance metadata, the host name.
        "logs": {"driver": "awslogs", "group": f"/skiff/{env}/app", "region": REGION,
                 "instance": subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()},
        # Only when the stack names keys (TrustedKeys).
        **({"trust": {"keys_parameter": trust}} if trust else {}),
    }


# moto's CloudFormation builds no AWS::CloudWatch::Alarm: these never appear in a stack there.
RELEASE_ALARMS = {"ReleaseErrorRateAlarm", "ReleaseUnhealthyHostsAlarm"}
# The stack's own load balancer and listeners, not built with SharedListenerArn; the shared
# listener's rule, built only then.
OWN_LB = {"LoadBalancer", "LoadBalancerSecurityGroup", "HttpsListener", "HttpListener"}
SHARED_LB = {"SiteListenerRule"}
# The trusted keys' parameter, built only when the stack names keys (TrustedKeys).
NO_KEYS = {"TrustedKeysParameter"}


def shared_lb_tests(app_t, body, app_params, shared, public, vpc, cert, cleanup):
    """A stack with SharedListenerArn: no load balancer of its own, a rule on the shared HTTPS
    listener for its host name forwarding to its target group, its instances open to the shared
    load balancer's group; deleted, the rule goes and the shared load balancer stays."""
    lb_sg = ec2.create_security_group(GroupName=f"skiff-test-shared-lb-{RUN}", Description="shared lb",
                                      VpcId=vpc)["GroupId"]
    cleanup.append(lambda: ec2.delete_security_group(GroupId=lb_sg))
    lb = elb.create_load_balancer(Name=f"skiff-qa-{RUN}", Subnets=public, SecurityGroups=[lb_sg],
                                  Scheme="internet-facing", Type="application")["LoadBalancers"][0]
    cleanup.append(lambda: elb.delete_load_balancer(LoadBalancerArn=lb["LoadBalancerArn"]))
    listener = elb.create_listener(
        LoadBalancerArn=lb["LoadBalancerArn"], Protocol="HTTPS", Port=443, Certificates=[{"CertificateArn": cert}],
        DefaultActions=[{"Type": "fixed-response", "FixedResponseConfig": {"StatusCode": "404"}}])["Listeners"][0]
    cleanup.append(lambda: elb.delete_listener(ListenerArn=listener["ListenerArn"]))
    # moto's CloudFormation leaves the rule when the stack is deleted (CloudFormation deletes it).
    cleanup.append(lambda: [elb.delete_rule(RuleArn=r["RuleArn"]) for r in elb.describe_rules(
        ListenerArn=listener["ListenerArn"])["Rules"] if not r.get("IsDefault")])
    env_c, stack_c, host = f"t{RUN}-c", f"skiff-test-app-{RUN}-c", f"t{RUN}-c.qa.skiff.example.com"
    c_params = dict(app_params, Environment=env_c, CertificateArn="", SharedListenerArn=listener["ListenerArn"],
                    SharedLoadBalancerSecurityGroupId=lb_sg, SiteHostName=host, ListenerRulePriority=7, **shared)
    equal("shared lb: the Rules accept a shared listener without a certificate", rules_refuse(app_t, c_params), [])
    for what, given in [
            ("a shared listener without a host name", dict(c_params, SiteHostName="")),
            ("a shared listener without the load balancer's group", dict(c_params, SharedLoadBalancerSecurityGroupId="")),
            ("a host name without a shared listener", dict(c_params, SharedListenerArn="", CertificateArn=cert,
                                                           SharedLoadBalancerSecurityGroupId="")),
            ("an own load balancer without a certificate", dict(app_params, CertificateArn=""))]:
        check(f"shared lb: the Rules refuse {what}", rules_refuse(app_t, given) != [], str(given))
    stack = create(stack_c, body, c_params, cleanup)
    if not equal("shared lb create: status", stack["StackStatus"], "CREATE_COMPLETE"):
        print(stack.get("StackStatusReason"))
        return
    out = outputs(stack)
    equal("shared lb create: no load balancer, listeners or load balancer group of its own; the rule",
          not_built(stack_c, app_t),
          {"DatabaseSubnetGroup", "DatabaseSecurityGroup", "InstanceEgressToDatabase", "DatabaseMonitoringRole",
           "Database", "SharedDatabaseIngress", "InstanceEgressToSharedDatabase"} | RELEASE_ALARMS | OWN_LB | NO_KEYS)
    equal("shared lb create: LoadBalancerDNS output is the site's host name", out.get("LoadBalancerDNS"), host)
    ids = physical_ids(stack_c)
    rules = [r for r in elb.describe_rules(ListenerArn=listener["ListenerArn"])["Rules"] if not r.get("IsDefault")]
    equal("shared lb create: one rule on the shared listener: priority, host header -> the stack's target group",
          [(r["Priority"], [c.get("HostHeaderConfig", {}).get("Values") for c in r["Conditions"]],
            [(a["Type"], a.get("TargetGroupArn")) for a in r["Actions"]]) for r in rules],
          [("7", [[host]], [("forward", ids["TargetGroup"])])])
    inst_sg = ec2.describe_security_groups(GroupIds=[out["InstanceSecurityGroup"]])["SecurityGroups"][0]
    equal("shared lb create: the instances admit the shared load balancer's group on app and agent ports",
          sorted((p["FromPort"], [g["GroupId"] for g in p["UserIdGroupPairs"]]) for p in inst_sg["IpPermissions"]),
          [(8080, [lb_sg]), (8081, [lb_sg])])
    cfn.delete_stack(StackName=stack_c)
    stack = wait_stack(stack["StackId"], "DELETE_COMPLETE")
    equal("shared lb delete: status", stack["StackStatus"], "DELETE_COMPLETE")
    # Not checked: that its rule is gone from the listener. moto's CloudFormation does not delete an
    # AWS::ElasticLoadBalancingV2::ListenerRule with its stack; CloudFormation does.
    equal("shared lb delete: the shared load balancer stays",
          [x["LoadBalancerArn"] for x in elb.describe_load_balancers(LoadBalancerArns=[lb["LoadBalancerArn"]])["LoadBalancers"]],
          [lb["LoadBalancerArn"]])


def not_built(stack_name, template):
    """Template resources the stack did not build (by condition, or skipped by moto)."""
    return set(template["Resources"]) - set(physical_ids(stack_name))


def create(name, body, values, cleanup):
    cfn.create_stack(StackName=name, TemplateBody=body, Parameters=params(values),
                     Capabilities=["CAPABILITY_IAM"])
    cleanup.append(lambda: cfn.delete_stack(StackName=name))
    return wait_stack(name, "CREATE_COMPLETE")


def release_value(name):
    return ssm.get_parameter(Name=name)["Parameter"]["Value"]


def put_release_once(name, value):
    """What `make create-stack` does before creating the stack: create the release parameter
    without overwriting; an existing value is kept. Returns the value now there."""
    try:
        ssm.put_parameter(Name=name, Value=value, Type="String", Overwrite=False)
    except ssm.exceptions.ParameterAlreadyExists:
        pass
    return release_value(name)


def network(cleanup):
    vpc = ec2.create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
    cleanup.append(lambda: ec2.delete_vpc(VpcId=vpc))
    subnets = []
    for i, zone in enumerate(["a", "b", "a", "b"]):
        sid = ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.77.{i}.0/24",
                                AvailabilityZone=REGION + zone)["Subnet"]["SubnetId"]
        subnets.append(sid)
        cleanup.append(lambda sid=sid: ec2.delete_subnet(SubnetId=sid))
    cert = acm.request_certificate(DomainName=f"t{RUN}.skiff.example.com")["CertificateArn"]
    cleanup.append(lambda: acm.delete_certificate(CertificateArn=cert))
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    return vpc, subnets[:2], subnets[2:], cert, ami


def stack_tests(app_text, app_t, db_text, db_t, cleanup):
    account = sts.get_caller_identity()["Account"]
    env = f"t{RUN}"
    app_stack, db_stack = f"skiff-test-app-{RUN}", f"skiff-test-db-{RUN}"
    vpc, public, private, cert, ami = network(cleanup)
    body, replaced = moto_app_body(app_text)
    equal("moto copy: the managed-secret GetAtt replaced where app.yaml uses it (policy, user data)",
          replaced, 2)

    # --- the release parameter, as `make create-stack` makes it before the stack
    release = f"/skiff/{env}/release"
    cleanup.append(lambda: ssm.delete_parameter(Name=release))
    equal("release: created once, before the stack", put_release_once(release, f"init{RUN}"), f"init{RUN}")
    equal("release: a second create-stack keeps the value", put_release_once(release, f"other{RUN}"),
          f"init{RUN}")

    # --- app stack with its own database: create
    app_params = {
        "Environment": env, "VpcId": vpc,
        "PublicSubnetIds": ",".join(public), "PrivateSubnetIds": ",".join(private),
        "CertificateArn": cert, "AmiId": ami, "DatabaseName": f"notes_{RUN}",
        "DatabaseMultiAZ": "false", "DatabaseDeletionProtection": "false",
    }
    equal("app create: the Rules accept the parameters", rules_refuse(app_t, app_params), [])
    stack = create(app_stack, body, app_params, cleanup)
    if not equal("app create: status", stack["StackStatus"], "CREATE_COMPLETE"):
        print(stack.get("StackStatusReason"))
        return
    out = outputs(stack)
    app_stack_id = stack["StackId"]
    equal("app create: ReleaseParameter output", out.get("ReleaseParameter"), release)
    equal("app create: AutoScalingGroup output", out.get("AutoScalingGroup"), f"skiff-{env}")
    equal("app create: ImageRepository output", out.get("ImageRepository"),
          f"{account}.dkr.ecr.{REGION}.amazonaws.com/skiff-app")
    equal("app create: LifecycleHook output", out.get("LifecycleHook"), "skiff-launch")
    equal("app create: ReleaseStrategy output is refresh by default", out.get("ReleaseStrategy"),
          "refresh")
    equal("app create: SwapMode output is handover by default", out.get("SwapMode"), "handover")
    # moto's CloudFormation has no AWS::CloudWatch::Alarm: the release alarms are checked statically
    # (app_alarm_checks) and created by the ctl tests through PutMetricAlarm.
    equal("app create: not built: the egress rule moto lacks, the shared-database rules (condition), "
          "the release alarms (no CloudWatch alarms in moto's CloudFormation)",
          not_built(app_stack, app_t),
          {"InstanceEgressToDatabase", "SharedDatabaseIngress", "InstanceEgressToSharedDatabase"}
          | RELEASE_ALARMS | SHARED_LB | NO_KEYS)
    equal("app create: ReleaseAlarmNames output names both alarms of this environment",
          out.get("ReleaseAlarmNames"),
          f"skiff-{env}-target-5xx-rate,skiff-{env}-unhealthy-hosts")
    equal("app create: the stack did not touch the release value", release_value(release), f"init{RUN}")
    check("app create: no TrustedKeys, no TrustedKeysParameter output (signature checks off)",
          "TrustedKeysParameter" not in out, str(sorted(out)))
    missing = None
    try:
        ssm.get_parameter(Name=f"/skiff/{env}/trusted-keys")
    except ssm.exceptions.ParameterNotFound:
        missing = True
    check("app create: no TrustedKeys, no /skiff/<env>/trusted-keys parameter", missing)
    ids = physical_ids(app_stack)

    lb = elb.describe_load_balancers(LoadBalancerArns=[ids["LoadBalancer"]])["LoadBalancers"][0]
    equal("app create: LoadBalancerDNS output is the load balancer's", out.get("LoadBalancerDNS"),
          lb["DNSName"])
    tg = elb.describe_target_groups(TargetGroupArns=[ids["TargetGroup"]])["TargetGroups"][0]
    equal("app create: target group health check as built",
          (tg["Port"], tg["HealthCheckPort"], tg["HealthCheckPath"], tg["HealthCheckIntervalSeconds"],
           tg["HealthCheckTimeoutSeconds"], tg["HealthyThresholdCount"], tg["UnhealthyThresholdCount"]),
          (8080, "8081", "/healthz", 5, 2, 2, 2))
    listeners = {x["Port"]: x for x in elb.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]}
    https, http = listeners.get(443, {}), listeners.get(80, {})
    check("app create: HTTPS listener with the certificate forwards to the target group",
          https.get("Protocol") == "HTTPS"
          and https["Certificates"][0]["CertificateArn"] == cert
          and https["DefaultActions"][0].get("TargetGroupArn") == tg["TargetGroupArn"], str(https))
    check("app create: HTTP listener redirects to HTTPS (301)",
          http.get("DefaultActions", [{}])[0].get("RedirectConfig", {}).get("StatusCode") == "HTTP_301",
          str(http))

    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[out["AutoScalingGroup"]])["AutoScalingGroups"][0]
    equal("app create: group health check type, target group, size",
          (group["HealthCheckType"], group["TargetGroupARNs"], group["MinSize"], group["MaxSize"]),
          ("ELB", [tg["TargetGroupArn"]], 2, 4))
    equal("app create: group launches from the stack's template",
          group["LaunchTemplate"]["LaunchTemplateId"], ids["LaunchTemplate"])

    # --- its database
    inst = rds.describe_db_instances(DBInstanceIdentifier=ids["Database"])["DBInstances"][0]
    equal("app create: own database: mysql, encrypted, 7-day backups, private, its name",
          (inst["Engine"], inst["StorageEncrypted"], inst["BackupRetentionPeriod"],
           inst["PubliclyAccessible"], inst.get("DBName")),
          ("mysql", True, 7, False, f"notes_{RUN}"))
    equal("app create: DatabaseEndpoint output is the database's", out.get("DatabaseEndpoint"),
          inst["Endpoint"]["Address"])
    inst_sg = out["InstanceSecurityGroup"]
    dsg = ec2.describe_security_groups(GroupIds=[ids["DatabaseSecurityGroup"]])["SecurityGroups"][0]
    equal("app create: own database ingress only from the instances on 3306",
          [(p["FromPort"], [g["GroupId"] for g in p["UserIdGroupPairs"]], p["IpRanges"])
           for p in dsg["IpPermissions"]],
          [(3306, [inst_sg], [])])
    stand_in = f"arn:aws:secretsmanager:{REGION}:{account}:secret:rds!{ids['Database']}"

    lt_data = ec2.describe_launch_template_versions(LaunchTemplateId=ids["LaunchTemplate"])[
        "LaunchTemplateVersions"][0]["LaunchTemplateData"]
    equal("app create: launch template metadata options",
          {k: lt_data["MetadataOptions"].get(k) for k in ("HttpTokens", "HttpPutResponseHopLimit")},
          {"HttpTokens": "required", "HttpPutResponseHopLimit": 1})
    equal("app create: launch template uses the AMI parameter", lt_data["ImageId"], ami)
    toml_text, config, calls, mode = run_user_data(lt_data["UserData"])
    own_db_env = {"DATABASE_HOST": inst["Endpoint"]["Address"],
                  "DATABASE_PORT": str(inst["Endpoint"]["Port"]),
                  "DATABASE_NAME": f"notes_{RUN}", "DATABASE_SECRET_ARN": stand_in}
    equal("app create: user data writes the agent config, with the own database",
          config, expected_agent_config(env, account, own_db_env))
    check_agent_accepts("app create (defaults)", toml_text)
    equal("app create: agent config is world-readable, not writable", oct(mode), oct(0o644))
    equal("app create: user data enables docker and the agent and restarts the agent", calls,
          ["enable docker.service skiff-agent.service", "restart skiff-agent.service"])

    stmts = role_statements(ids["InstanceRole"])
    check("app create: role reads its release parameter",
          any("ssm:GetParameter" in actions_of([s])
              and s["Resource"].endswith(f":parameter/skiff/{env}/release") for s in stmts))
    check("app create: role may read exactly the own database's secret",
          any(s.get("Action") == "secretsmanager:GetSecretValue" and s.get("Resource") == stand_in
              for s in stmts), str(stmts))
    check("app create: role has Session Manager's channels",
          "ssmmessages:OpenDataChannel" in actions_of(stmts))
    equal("app create: role has no managed policy",
          iam.list_attached_role_policies(RoleName=ids["InstanceRole"])["AttachedPolicies"], [])
    log_group = f"/skiff/{env}/app"
    groups = client("logs").describe_log_groups(
        logGroupNamePrefix=log_group)["logGroups"]
    equal("app create: log group /skiff/<env>/app with the default retention (30 days), output LogGroup",
          ([(g["logGroupName"], g.get("retentionInDays")) for g in groups], out.get("LogGroup")),
          ([(log_group, 30)], log_group))
    ship = [s for s in stmts if "logs:PutLogEvents" in actions_of([s])]
    equal("app create: role ships logs: exactly CreateLogStream + PutLogEvents, on its own group only",
          [(sorted(actions_of([s])),
            sorted(r.split(":", 5)[5] if r.startswith(f"arn:aws:logs:{REGION}:") else r
                   for r in (s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]])))
           for s in ship],
          [(["logs:CreateLogStream", "logs:PutLogEvents"],
            # The stream ARN only: AWS authorizes both actions against the stream.
            sorted([f"log-group:{log_group}:log-stream:*"]))])
    deployer_arn = out.get("DeployerPolicyArn", "")
    doc = {}
    try:
        pol = iam.get_policy(PolicyArn=deployer_arn)["Policy"]
        doc = iam.get_policy_version(PolicyArn=deployer_arn,
                                     VersionId=pol["DefaultVersionId"])["PolicyVersion"]["Document"]
        if isinstance(doc, str):
            doc = json.loads(urllib.parse.unquote(doc))
    except botocore.exceptions.ClientError as e:
        check("app create: DeployerPolicyArn names a policy", False, str(e))
    resources = {str(s["Resource"]) for s in doc.get("Statement", [])}
    equal("app create: deployer may read target health and target groups (resource * only) and nothing else of ELB",
          sorted(a for st in doc.get("Statement", []) for a in actions_of([st])
                 if a.startswith("elasticloadbalancing:")),
          ["elasticloadbalancing:DescribeTargetGroups", "elasticloadbalancing:DescribeTargetHealth"])
    check("app create: deployer policy names this stack, its release, its lock and its group",
          any(r.endswith(f":stack/{app_stack}/*") for r in resources)
          and any(r.endswith(f":parameter/skiff/{env}/release") for r in resources)
          and any(r.endswith(f":parameter/skiff/{env}/release-lock") for r in resources)
          and any(r.endswith(f":autoScalingGroupName/skiff-{env}") for r in resources), str(resources))

    sgs = ec2.describe_security_groups(GroupIds=[inst_sg])["SecurityGroups"][0]
    alb_sg = lb["SecurityGroups"][0]
    equal("app create: instance ingress only from the load balancer on 8080 and 8081",
          sorted((p["FromPort"], tuple(g["GroupId"] for g in p["UserIdGroupPairs"]),
                  tuple(x["CidrIp"] for x in p["IpRanges"])) for p in sgs["IpPermissions"]),
          [(8080, (alb_sg,), ()), (8081, (alb_sg,), ())])

    # --- finding 5: what `ctl release` writes survives a stack update
    ssm.put_parameter(Name=release, Value=f"rel{RUN}", Type="String", Overwrite=True)
    app_params.update(StopTimeoutSeconds=45, MaxSize=6)
    # SwapMode for this update only: the stacks below start from app_params with the default.
    cfn.update_stack(StackName=app_stack, TemplateBody=body, Parameters=params({**app_params, "SwapMode": "drain"}),
                     Capabilities=["CAPABILITY_IAM"])
    stack = wait_stack(app_stack, "UPDATE_COMPLETE")
    equal("app update: status", stack["StackStatus"], "UPDATE_COMPLETE")
    equal("app update: the release ctl wrote survives the update", release_value(release), f"rel{RUN}")
    out2 = outputs(stack)
    equal("app update: outputs unchanged but SwapMode", {k: v for k, v in out2.items() if k != "SwapMode"},
          {k: v for k, v in out.items() if k != "SwapMode"})
    equal("app update: SwapMode output follows the parameter", out2.get("SwapMode"), "drain")
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[out["AutoScalingGroup"]])["AutoScalingGroups"][0]
    equal("app update: group max size", group["MaxSize"], 6)
    equal("app update: the same resources (the database kept)", not_built(app_stack, app_t),
          {"InstanceEgressToDatabase", "SharedDatabaseIngress", "InstanceEgressToSharedDatabase"}
          | RELEASE_ALARMS | SHARED_LB | NO_KEYS)
    ids2 = physical_ids(app_stack)
    equal("app update: same database", ids2.get("Database"), ids["Database"])
    toml_text, config, _, _ = run_user_data(latest_user_data(ids2["LaunchTemplate"]))
    equal("app update: agent config has the new stop timeout and swap mode",
          config, expected_agent_config(env, account, own_db_env, StopTimeoutSeconds=45, SwapMode="drain"))
    check_agent_accepts("app update (swap = drain)", toml_text)

    # --- database stack: create (a database to share)
    db_body = strip_output(db_text, "SecretArn")
    db_params = {"Environment": f"{env}-shared", "VpcId": vpc, "SubnetIds": ",".join(private),
                 "MultiAZ": "false", "DeletionProtection": "false", "DatabaseName": f"shared_{RUN}"}
    dstack = create(db_stack, db_body, db_params, cleanup)
    if not equal("db create: status", dstack["StackStatus"], "CREATE_COMPLETE"):
        return
    dout = outputs(dstack)
    equal("db create: moto skipped only the egress rules it does not implement",
          not_built(db_stack, db_t), {"ClientsEgressToDatabase", "IngressFromClient", "ClientEgressToDatabase"})
    dids = physical_ids(db_stack)
    dinst = rds.describe_db_instances(DBInstanceIdentifier=dids["Database"])["DBInstances"][0]
    equal("db create: Endpoint and Port outputs", (dout.get("Endpoint"), dout.get("Port")),
          (dinst["Endpoint"]["Address"], str(dinst["Endpoint"]["Port"])))
    equal("db create: DatabaseName output is the instance's database",
          (dout.get("DatabaseName"), dinst.get("DBName")), (f"shared_{RUN}", f"shared_{RUN}"))
    equal("db create: mysql, encrypted, 7-day backups, private",
          (dinst["Engine"], dinst["StorageEncrypted"], dinst["BackupRetentionPeriod"], dinst["PubliclyAccessible"]),
          ("mysql", True, 7, False))
    db_sg = {"id": dout["SecurityGroup"]}
    clients_sg = dout.get("ClientsSecurityGroup")

    def db_ingress():
        sg = ec2.describe_security_groups(GroupIds=[db_sg["id"]])["SecurityGroups"][0]
        return sorted(g["GroupId"] for p in sg["IpPermissions"] for g in p["UserIdGroupPairs"])

    check("db create: a clients group of its own (output ClientsSecurityGroup)",
          bool(clients_sg) and clients_sg not in (inst_sg, db_sg["id"]), str(dout))
    equal("db create: database ingress only from its clients group", db_ingress(), [clients_sg])

    # --- a second branch's stack sharing that database
    secret = sm.create_secret(Name=f"rds!skiff-test-{RUN}", SecretString='{"username":"skiff"}')["ARN"]
    cleanup.append(lambda: sm.delete_secret(SecretId=secret, ForceDeleteWithoutRecovery=True))
    env_b, stack_b = f"{env}-b", f"skiff-test-app-{RUN}-b"
    shared = {"DatabaseHost": dout["Endpoint"], "DatabasePort": dout["Port"],
              "DatabaseName": dout["DatabaseName"], "DatabaseSecretArn": secret,
              "DatabaseClientsSecurityGroupId": clients_sg}
    # This one names two keys (issue 20): its hosts check signatures.
    trusted = public_key_pem() + public_key_pem()
    b_params = dict(app_params, Environment=env_b, MaxSize=4, StopTimeoutSeconds=30, TrustedKeys=trusted, **shared)
    equal("shared create: the Rules accept an existing database", rules_refuse(app_t, b_params), [])
    stack = create(stack_b, body, b_params, cleanup)
    if equal("shared create: status", stack["StackStatus"], "CREATE_COMPLETE"):
        bout = outputs(stack)
        equal("shared create: no database of its own; rules into the shared one (egress: moto lacks it)",
              not_built(stack_b, app_t),
              {"DatabaseSubnetGroup", "DatabaseSecurityGroup", "InstanceEgressToDatabase",
               "DatabaseMonitoringRole", "Database", "SharedDatabaseIngress", "InstanceEgressToSharedDatabase"} | RELEASE_ALARMS | SHARED_LB)
        keys_name = f"/skiff/{env_b}/trusted-keys"
        equal("shared create (TrustedKeys): output TrustedKeysParameter names /skiff/<env>/trusted-keys",
              bout.get("TrustedKeysParameter"), keys_name)
        kept = ssm.get_parameter(Name=keys_name)["Parameter"]
        equal("shared create (TrustedKeys): the parameter holds both keys, a String",
              (kept["Value"].strip(), kept["Type"]), (trusted.strip(), "String"))
        equal("shared create: DatabaseEndpoint output is the shared database",
              bout.get("DatabaseEndpoint"), dout["Endpoint"])
        equal("shared create: no rule added to the shared database's group (its instances join its clients)",
              db_ingress(), [clients_sg])
        bids = physical_ids(stack_b)
        lt = ec2.describe_launch_template_versions(LaunchTemplateId=bids["LaunchTemplate"], Versions=["$Latest"])
        equal("shared create: the instances are in their own group and the database's clients group",
              sorted(lt["LaunchTemplateVersions"][0]["LaunchTemplateData"].get("SecurityGroupIds", [])),
              sorted([bout["InstanceSecurityGroup"], clients_sg]))
        toml_text, config, _, _ = run_user_data(latest_user_data(bids["LaunchTemplate"]))
        equal("shared create: agent config has the shared database",
              config, expected_agent_config(env_b, account, {
                  "DATABASE_HOST": dout["Endpoint"], "DATABASE_PORT": dout["Port"],
                  "DATABASE_NAME": f"shared_{RUN}", "DATABASE_SECRET_ARN": secret}, trust=keys_name))
        check_agent_accepts("shared create (with [trust])", toml_text)
        stmts = role_statements(bids["InstanceRole"])
        check("shared create: role may read exactly the shared database's secret",
              [s.get("Resource") for s in stmts if s.get("Action") == "secretsmanager:GetSecretValue"]
              == [secret], str(stmts))
        # The move from the deprecated DatabaseSecurityGroupId: with both, the per-stack rule is
        # there too (the instances launched before the clients group keep their way).
        cfn.update_stack(StackName=stack_b, TemplateBody=body, Capabilities=["CAPABILITY_IAM"],
                         Parameters=params(dict(b_params, DatabaseSecurityGroupId=db_sg["id"])))
        equal("shared update (deprecated DatabaseSecurityGroupId too): status",
              wait_stack(stack_b, "UPDATE_COMPLETE")["StackStatus"], "UPDATE_COMPLETE")
        equal("shared update (deprecated DatabaseSecurityGroupId too): its per-stack rule beside the clients group",
              db_ingress(), sorted([clients_sg, bout["InstanceSecurityGroup"]]))
        cfn.delete_stack(StackName=stack_b)
        stack = wait_stack(stack["StackId"], "DELETE_COMPLETE")
        equal("shared delete: status", stack["StackStatus"], "DELETE_COMPLETE")
        # Not checked: that the shared database's ingress for it is gone. moto has no delete for
        # AWS::EC2::SecurityGroupIngress (see the module doc); CloudFormation revokes the rule.

    # --- issue 11: a QA stack on a shared load balancer (one listener rule per branch by host)
    shared_lb_tests(app_t, body, app_params, shared, public, vpc, cert, cleanup)

    # --- finding 6: the parameters' boundaries give configs the agent accepts
    boundary_tests(app_t, body, app_params, shared, account, cleanup)

    # --- delete
    cfn.delete_stack(StackName=db_stack)
    dstack = wait_stack(dstack["StackId"], "DELETE_COMPLETE")
    equal("db delete: status", dstack["StackStatus"], "DELETE_COMPLETE")
    gone = [d for d in rds.describe_db_instances()["DBInstances"]
            if d["DBInstanceIdentifier"] == dids["Database"]]
    equal("db delete: instance gone", gone, [])

    cfn.delete_stack(StackName=app_stack)
    stack = wait_stack(app_stack_id, "DELETE_COMPLETE")
    equal("app delete: status", stack["StackStatus"], "DELETE_COMPLETE")
    equal("app delete: the release parameter is kept (it is not the stack's)",
          release_value(release), f"rel{RUN}")
    equal("app delete: group gone",
          asg.describe_auto_scaling_groups(AutoScalingGroupNames=[out["AutoScalingGroup"]])["AutoScalingGroups"], [])


def boundary_tests(app_t, body, base_params, shared, account, cleanup):
    """One stack per corner: every number of the agent config at its MinValue, at its MaxValue,
    and the ports crossed; each generated config goes through `agent check-config`."""
    p = app_t["Parameters"]
    lo = {k: p[k]["MinValue"] for k in CONFIG_NUMBERS}
    hi = {k: p[k]["MaxValue"] for k in CONFIG_NUMBERS}
    # No two ports may be equal (Rules): at the minimum the agent's is one above the app's and the
    # slots two and three above, at the maximum as many below, and the crossed corner puts the app
    # and agent ports at each other's extreme, with the slots next to them.
    for i, k in enumerate(PORTS):
        lo[k] += i
        hi[k] -= i
    crossed = {"AppPort": p["AppPort"]["MaxValue"], "AgentPort": p["AgentPort"]["MinValue"],
               "SlotPortA": p["SlotPortA"]["MinValue"] + 1, "SlotPortB": p["SlotPortB"]["MaxValue"] - 1}
    for label, values in (("min", lo), ("max", hi), ("ports crossed", crossed)):
        env = f"t{RUN}-{label.split()[0]}"
        name = f"skiff-test-app-{RUN}-{label.split()[0]}"
        given = dict(base_params, Environment=env, MaxSize=4, **shared, **values)
        given.pop("StopTimeoutSeconds", None) if "StopTimeoutSeconds" not in values else None
        if not equal(f"boundary {label}: the Rules accept {values}", rules_refuse(app_t, given), []):
            continue
        stack = create(name, body, given, cleanup)
        if not equal(f"boundary {label}: status", stack["StackStatus"], "CREATE_COMPLETE"):
            continue
        ids = physical_ids(name)
        toml_text, config, _, _ = run_user_data(latest_user_data(ids["LaunchTemplate"]))
        equal(f"boundary {label}: config carries the values", config,
              expected_agent_config(env, account, {
                  "DATABASE_HOST": shared["DatabaseHost"], "DATABASE_PORT": shared["DatabasePort"],
                  "DATABASE_NAME": shared["DatabaseName"],
                  "DATABASE_SECRET_ARN": shared["DatabaseSecretArn"]}, **values))
        check_agent_accepts(f"boundary {label}", toml_text)
        if label == "min":
            # Why MinValue 1: the drain below it is what the agent refuses (exit 64), and so is
            # the port pair the Rules refuse.
            rc, _ = agent_check_config(toml_text.replace(f'drain = "{values["DrainSeconds"]}s"', 'drain = "0s"'))
            equal("boundary: below DrainSeconds MinValue (0 s) the agent refuses the config", rc, 64)
            same = toml_text.replace(f':{values["AgentPort"]}"', f':{values["AppPort"]}"')
            rc, _ = agent_check_config(same)
            equal("boundary: AppPort == AgentPort, which the Rules refuse, the agent refuses too", rc, 64)
            slots = f'slots = [{values["SlotPortA"]}, {values["SlotPortB"]}]'
            for what, clash in (("the two slots equal", f'slots = [{values["SlotPortA"]}, {values["SlotPortA"]}]'),
                                ("a slot == AppPort", f'slots = [{values["AppPort"]}, {values["SlotPortB"]}]'),
                                ("a slot == AgentPort", f'slots = [{values["SlotPortA"]}, {values["AgentPort"]}]')):
                rc, _ = agent_check_config(toml_text.replace(slots, clash))
                equal(f"boundary: {what}, which the Rules refuse, the agent refuses too", rc, 64)
        cfn.delete_stack(StackName=name)
        wait_stack(stack["StackId"], "DELETE_COMPLETE")


def strip_output(text, name):
    """The template with one output removed (moto cannot evaluate it; see the module doc)."""
    lines = text.splitlines(keepends=True)
    start = lines.index(f"  {name}:\n")
    end = start + 1
    while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
        end += 1
    return "".join(lines[:start] + lines[end:])


def suppressions_justified(name, t):
    """Every checkov skip and cfn-lint ignore in the template says why, in place."""
    bare = []
    for logical_id, resource in t["Resources"].items():
        meta = resource.get("Metadata", {})
        for skip in meta.get("checkov", {}).get("skip", []):
            if len(str(skip.get("comment", "")).strip()) < 20:
                bare.append(f"{logical_id}: checkov {skip.get('id')}")
        ignored = meta.get("cfn-lint", {}).get("config", {}).get("ignore_checks", [])
        if ignored and not meta.get("cfn-lint", {}).get("comment"):
            bare.append(f"{logical_id}: cfn-lint {ignored}")
    check(f"{name}: every checkov skip and cfn-lint ignore is justified", not bare, str(bare))


def main():
    app_text, app_t = load_template("app.yaml")
    db_text, db_t = load_template("database.yaml")
    agent = agent_binary()
    check(f"agent binary to validate configs with: {agent}", agent is not None,
          "set AGENT_BIN or build it (cargo build -p skiff-agent); templates/test.sh does")
    for name, t in (("app", app_t), ("db", db_t)):
        try:
            suppressions_justified(name, t)
        except Exception:
            check(f"{name}: suppression check ran", False, traceback.format_exc())
    for step in (lambda: app_template_checks(app_text, app_t),
                 lambda: app_bounds_checks(app_text, app_t),
                 lambda: app_instance_checks(app_text, app_t),
                 lambda: app_secret_scope_checks(app_text, app_t),
                 lambda: app_narrow_grants_checks(app_text, app_t),
                 lambda: trusted_keys_pattern_checks(app_t),
                 lambda: app_network_checks(app_text, app_t),
                 lambda: app_release_checks(app_text, app_t),
                 lambda: app_alarm_checks(app_text, app_t),
                 lambda: app_database_checks(app_text, app_t),
                 lambda: database_settings_checks("app", app_t, "Database"),
                 lambda: same_database_settings(app_t, db_t),
                 lambda: finding_12_checks(app_t, db_t),
                 lambda: db_template_checks(db_text, db_t),
                 lambda: policy_check_self_test(app_text, app_t)):
        try:
            step()
        except Exception:  # a template that lost a key the checks read
            check("template checks ran to the end", False, traceback.format_exc())

    cleanup = []
    try:
        stack_tests(app_text, app_t, db_text, db_t, cleanup)
    except Exception:
        check("stack checks ran to the end", False, traceback.format_exc())
    finally:
        for undo in reversed(cleanup):
            try:
                undo()
            except botocore.exceptions.ClientError:
                pass  # already gone, e.g. a stack the test deleted itself

    return summary()


if __name__ == "__main__":
    sys.exit(main())
