#!/usr/bin/env python3
"""Create, update and delete the skiff stacks (app.yaml, database.yaml) in moto, and check them.

Run by templates/test.sh with the venv that has moto's client side (boto3, PyYAML). Talks to the
moto server at $MOTO_ENDPOINT (default http://127.0.0.1:5055) with dummy credentials in
us-east-1. Every name carries a fresh run id, so runs never see each other's leftovers, and
everything the run creates is deleted at the end, also after a failure.

Two kinds of checks:
  * template checks read the YAML itself, for what moto does not model (lifecycle hooks, the
    instance maintenance policy, target group attributes, deletion policies, IAM conditions);
  * stack checks deploy to moto and read back what it built.

What moto (5.2) does not do, and how each is handled here:
  * AWS::EC2::SecurityGroupEgress is not implemented: moto skips the resource with a warning.
    database.yaml's ClientEgressToDatabase is the only one; the test asserts exactly that set.
  * Fn::GetAtt Database.MasterUserSecret.SecretArn is not implemented and fails the stack, so
    the copy of database.yaml sent to moto lacks that one output (the template check proves it
    is there and what it reads). ManageMasterUserPassword itself is ignored by moto's
    CloudFormation, so the app stack update uses a secret the test creates.
  * Outputs use the long form Fn::GetAtt: [Database, Endpoint.Address]; moto's YAML loader
    splits the short form at every dot.
  * TargetGroup and RDS DBInstance have no update handler: an update touching them drops them
    from moto's stack. The update steps therefore change only parameters of resources moto can
    update (launch template, role, group, security groups).
  * LifecycleHookSpecificationList, InstanceMaintenancePolicy, DefaultInstanceWarmup,
    TargetGroupAttributes, a role's ManagedPolicyArns, VPCSecurityGroups on the DB and
    DeletionPolicy: Snapshot are ignored; all are template checks.
Prints one line per check and closes with 'N passed, N failed'; exits 1 on any failure.
"""

import ast
import base64
import json
import os
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

passed = 0
failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name}" + (f": {detail}" if detail else ""))
    return ok


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


def run_user_data(user_data_b64):
    """Run the launch template's user data with /etc/skiff and systemctl redirected; return the
    parsed agent.toml and the systemctl calls it made."""
    script = base64.b64decode(user_data_b64).decode()
    with tempfile.TemporaryDirectory(prefix="skiff-userdata-") as tmp:
        etc = os.path.join(tmp, "etc-skiff")
        bindir = os.path.join(tmp, "bin")
        os.mkdir(bindir)
        calls = os.path.join(tmp, "systemctl.calls")
        with open(os.path.join(bindir, "systemctl"), "w") as f:
            f.write(f'#!/bin/sh\necho "$*" >>{calls}\n')
        os.chmod(os.path.join(bindir, "systemctl"), 0o755)
        assert "/etc/skiff" in script
        script = script.replace("/etc/skiff", etc)
        env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
        proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"user data failed ({proc.returncode}): {proc.stderr}")
        toml_path = os.path.join(etc, "agent.toml")
        with open(toml_path, "rb") as f:
            config = tomllib.load(f)
        mode = os.stat(toml_path).st_mode & 0o777
        agent_check(toml_path)
        with open(calls) as f:
            return config, [line.strip() for line in f], mode


def agent_binary():
    """The agent to validate generated configs with: $AGENT_BIN, else the workspace's build."""
    if os.environ.get("AGENT_BIN"):
        return os.environ["AGENT_BIN"]
    target = os.environ.get("CARGO_TARGET_DIR", "/root/.cache/skiff-target")
    for profile in ("release", "debug"):
        path = os.path.join(target, profile, "agent")
        if os.access(path, os.X_OK):
            return path
    return None


def agent_check(toml_path):
    """`agent check-config` on a generated config, when an agent binary is there to ask."""
    agent = agent_binary()
    if agent is None:
        print("skip agent check-config: no agent binary (set AGENT_BIN or build the workspace)")
        return
    proc = subprocess.run([agent, "check-config", "--config", toml_path],
                          capture_output=True, text=True)
    check(f"agent check-config accepts the generated config ({agent})", proc.returncode == 0,
          f"exit {proc.returncode}: {proc.stdout}{proc.stderr}")


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


# --- template checks ------------------------------------------------------------------------


def app_template_checks(t):
    p, r, o = t["Parameters"], t["Resources"], t["Outputs"]
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
    check("app: hook heartbeat covers the start timeout",
          p["LaunchHookTimeoutSeconds"]["Default"] > p["StartTimeoutSeconds"]["Default"])

    lt = r["LaunchTemplate"]["Properties"]["LaunchTemplateData"]
    md = lt["MetadataOptions"]
    check("app: IMDSv2 required with a hop limit",
          md["HttpTokens"] == "required" and 1 <= md["HttpPutResponseHopLimit"] <= 2, str(md))
    check("app: no SSH key, no public address",
          "KeyName" not in lt and "NetworkInterfaces" not in lt)
    check("app: root volume encrypted",
          all(b["Ebs"]["Encrypted"] is True for b in lt["BlockDeviceMappings"]))

    role = r["InstanceRole"]["Properties"]
    check("app: Session Manager through AmazonSSMManagedInstanceCore",
          any("AmazonSSMManagedInstanceCore" in str(a) for a in role["ManagedPolicyArns"]))
    agent_policy = r["AgentPolicy"]["Properties"]
    equal("app: agent policy is the instance role's", agent_policy["Roles"], [{"Ref": "InstanceRole"}])
    check("app: no instance boots before the agent policy exists",
          "AgentPolicy" in str(r["AutoScalingGroup"].get("DependsOn")))
    stmts = agent_policy["PolicyDocument"]["Statement"]
    secret_policy = r["DatabaseSecretPolicy"]
    equal("app: database secret policy only with a secret, on that secret",
          (secret_policy["Condition"], secret_policy["Properties"]["PolicyDocument"]["Statement"][0]["Resource"]),
          ("HasDatabaseSecret", {"Ref": "DatabaseSecretArn"}))
    stmts = stmts + secret_policy["Properties"]["PolicyDocument"]["Statement"]
    equal("app: instance role actions are exactly the agent's", actions_of(stmts), {
        "ssm:GetParameter", "ssm:GetParameters", "ssm:GetParameterHistory",
        "ssm:GetParametersByPath", "kms:Decrypt", "ec2:CreateTags",
        "autoscaling:CompleteLifecycleAction", "ecr:GetAuthorizationToken",
        "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability",
        "secretsmanager:GetSecretValue",
    })
    wildcard = [s["Sid"] for s in stmts if s["Resource"] == "*"]
    equal("app: only the ECR login has Resource '*'", wildcard, ["EcrLogin"])
    by_sid = {s["Sid"]: s for s in stmts}
    check("app: kms:Decrypt only through SSM",
          "kms:ViaService" in str(by_sid["DecryptSecureStringsThroughSsm"].get("Condition")))
    tag_cond = by_sid["TagOwnInstanceWithRelease"].get("Condition", {})
    check("app: CreateTags limited to its group and the skiff:release key",
          "aws:ResourceTag/aws:autoscaling:groupName" in tag_cond.get("StringEquals", {})
          and tag_cond.get("ForAllValues:StringEquals", {}).get("aws:TagKeys") == ["skiff:release"],
          str(tag_cond))
    check("app: CompleteLifecycleAction on its own group only",
          "autoScalingGroupName/skiff-${Environment}"
          in str(by_sid["AnswerOwnLaunchHook"]["Resource"]))

    inst_sg = r["InstanceSecurityGroup"]["Properties"]
    check("app: instances have no inline ingress", "SecurityGroupIngress" not in inst_sg)
    ingress = [v["Properties"] for v in r.values() if v["Type"] == "AWS::EC2::SecurityGroupIngress"]
    equal("app: instance ingress only from the load balancer, on app and agent ports",
          sorted((str(i["FromPort"]), str(i["SourceSecurityGroupId"])) for i in ingress),
          sorted([(str({"Ref": "AgentPort"}),
                   str({"Fn::GetAtt": ["LoadBalancerSecurityGroup", "GroupId"]})),
                  (str({"Ref": "AppPort"}),
                   str({"Fn::GetAtt": ["LoadBalancerSecurityGroup", "GroupId"]}))]))
    alb_in = r["LoadBalancerSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    equal("app: load balancer open on 80 and 443 only", sorted(i["FromPort"] for i in alb_in), [80, 443])
    http = r["HttpListener"]["Properties"]["DefaultActions"][0]
    check("app: HTTP redirects to HTTPS",
          http["Type"] == "redirect" and http["RedirectConfig"]["Protocol"] == "HTTPS")
    check("app: release parameter path", r["ReleaseParameter"]["Properties"]["Name"]
          == {"Fn::Sub": "/skiff/${Environment}/release"})
    missing = {"ReleaseParameter", "AutoScalingGroup", "ImageRepository", "LoadBalancerDNS",
               "LifecycleHook"} - set(o)
    check("app: outputs ctl reads are declared", not missing, f"missing {missing}")


def db_template_checks(t):
    r = t["Resources"]
    db = r["Database"]
    props = db["Properties"]
    equal("db: DeletionPolicy and UpdateReplacePolicy are Snapshot",
          (db.get("DeletionPolicy"), db.get("UpdateReplacePolicy")), ("Snapshot", "Snapshot"))
    check("db: storage encrypted", props.get("StorageEncrypted") is True)
    check("db: password managed by RDS, none in the template",
          props.get("ManageMasterUserPassword") is True and "MasterUserPassword" not in props
          and not any(v.get("NoEcho") for v in t["Parameters"].values()))
    check("db: backups kept at least 7 days",
          props.get("BackupRetentionPeriod") == {"Ref": "BackupRetentionDays"}
          and t["Parameters"]["BackupRetentionDays"]["Default"] >= 7)
    check("db: not publicly accessible", props.get("PubliclyAccessible") is False)
    ingress = r["DatabaseSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    equal("db: reachable only from the client security group on 3306",
          [(i["FromPort"], i.get("SourceSecurityGroupId"), i.get("CidrIp")) for i in ingress],
          [(3306, {"Ref": "ClientSecurityGroupId"}, None)])
    equal("db: SecretArn output reads the managed secret",
          t["Outputs"]["SecretArn"]["Value"], {"Fn::GetAtt": ["Database", "MasterUserSecret.SecretArn"]})


# --- stack checks ---------------------------------------------------------------------------


def expected_agent_config(env, account, env_table, drain="15s"):
    return {
        "app": {
            "name": "app",
            "image": f"{account}.dkr.ecr.{REGION}.amazonaws.com/skiff-app",
            "port": 8080,
            "health_path": "/health",
            "start_timeout": "60s",
            "stop_timeout": "30s",
            "env": env_table,
            "env_path": f"/skiff/{env}/env/",
        },
        "release": {
            "source": "ssm",
            "parameter": f"/skiff/{env}/release",
            "poll_interval": "60s",
            "update": "boot",
            "drain": drain,
        },
        "health": {"listen": "0.0.0.0:8081", "interval": "2s"},
        "aws": {"lifecycle_hook": "skiff-launch", "terminate_hook": "skiff-terminate"},
    }


def skipped_by_moto(stack_name, template):
    built = set(physical_ids(stack_name))
    return set(template["Resources"]) - built


def stack_tests(app_text, app_t, db_text, db_t, cleanup):
    account = sts.get_caller_identity()["Account"]
    env = f"t{RUN}"
    app_stack, db_stack = f"skiff-test-app-{RUN}", f"skiff-test-db-{RUN}"

    # What the stacks presuppose: a VPC with public and private subnets in two zones, a cert.
    vpc = ec2.create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
    cleanup.append(lambda: ec2.delete_vpc(VpcId=vpc))
    subnets = []
    for i, zone in enumerate(["a", "b", "a", "b"]):
        sid = ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.77.{i}.0/24",
                                AvailabilityZone=REGION + zone)["Subnet"]["SubnetId"]
        subnets.append(sid)
        cleanup.append(lambda sid=sid: ec2.delete_subnet(SubnetId=sid))
    public, private = subnets[:2], subnets[2:]
    cert = acm.request_certificate(DomainName=f"{env}.skiff.example.com")["CertificateArn"]
    cleanup.append(lambda: acm.delete_certificate(CertificateArn=cert))
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]

    # --- app stack: create
    app_params = {
        "Environment": env, "InitialTag": f"init{RUN}", "VpcId": vpc,
        "PublicSubnetIds": ",".join(public), "PrivateSubnetIds": ",".join(private),
        "CertificateArn": cert, "AmiId": ami,
    }
    cfn.create_stack(StackName=app_stack, TemplateBody=app_text, Parameters=params(app_params),
                     Capabilities=["CAPABILITY_IAM"])
    cleanup.append(lambda: cfn.delete_stack(StackName=app_stack))
    stack = wait_stack(app_stack, "CREATE_COMPLETE")
    if not equal("app create: status", stack["StackStatus"], "CREATE_COMPLETE"):
        return
    out = outputs(stack)
    equal("app create: ReleaseParameter output", out.get("ReleaseParameter"), f"/skiff/{env}/release")
    equal("app create: AutoScalingGroup output", out.get("AutoScalingGroup"), f"skiff-{env}")
    equal("app create: ImageRepository output", out.get("ImageRepository"),
          f"{account}.dkr.ecr.{REGION}.amazonaws.com/skiff-app")
    equal("app create: LifecycleHook output", out.get("LifecycleHook"), "skiff-launch")
    equal("app create: every resource built but the secret policy (no database yet)",
          skipped_by_moto(app_stack, app_t), {"DatabaseSecretPolicy"})
    ids = physical_ids(app_stack)

    equal("app create: release parameter holds the initial tag",
          ssm.get_parameter(Name=out["ReleaseParameter"])["Parameter"]["Value"], f"init{RUN}")

    lb = elb.describe_load_balancers(LoadBalancerArns=[ids["LoadBalancer"]])["LoadBalancers"][0]
    equal("app create: LoadBalancerDNS output is the load balancer's", out.get("LoadBalancerDNS"),
          lb["DNSName"])
    tg = elb.describe_target_groups(TargetGroupArns=[ids["TargetGroup"]])["TargetGroups"][0]
    equal("app create: target group health check as built",
          (tg["Port"], tg["HealthCheckPort"], tg["HealthCheckPath"], tg["HealthCheckIntervalSeconds"],
           tg["HealthCheckTimeoutSeconds"], tg["HealthyThresholdCount"], tg["UnhealthyThresholdCount"]),
          (8080, "8081", "/healthz", 5, 2, 2, 2))
    listeners = {l["Port"]: l for l in elb.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]}
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

    lt_data = ec2.describe_launch_template_versions(LaunchTemplateId=ids["LaunchTemplate"])[
        "LaunchTemplateVersions"][0]["LaunchTemplateData"]
    equal("app create: launch template metadata options",
          {k: lt_data["MetadataOptions"].get(k) for k in ("HttpTokens", "HttpPutResponseHopLimit")},
          {"HttpTokens": "required", "HttpPutResponseHopLimit": 1})
    equal("app create: launch template uses the AMI parameter", lt_data["ImageId"], ami)
    config, calls, mode = run_user_data(lt_data["UserData"])
    equal("app create: user data writes the agent config", config,
          expected_agent_config(env, account, {}))
    equal("app create: agent config is world-readable, not writable", oct(mode), oct(0o644))
    equal("app create: user data enables docker and the agent and restarts the agent", calls,
          ["enable docker.service skiff-agent.service", "restart skiff-agent.service"])

    role = ids["InstanceRole"]
    stmts = role_statements(role)
    check("app create: role can read its release parameter and nothing wider",
          any("ssm:GetParameter" in actions_of([s])
              and s["Resource"].endswith(f":parameter/skiff/{env}/release") for s in stmts))
    check("app create: role has no database secret access yet",
          "secretsmanager:GetSecretValue" not in actions_of(stmts))

    sgs = ec2.describe_security_groups(GroupIds=[out["InstanceSecurityGroup"]])["SecurityGroups"][0]
    alb_sg = lb["SecurityGroups"][0]
    equal("app create: instance ingress only from the load balancer on 8080 and 8081",
          sorted((p["FromPort"], tuple(g["GroupId"] for g in p["UserIdGroupPairs"]),
                  tuple(x["CidrIp"] for x in p["IpRanges"])) for p in sgs["IpPermissions"]),
          [(8080, (alb_sg,), ()), (8081, (alb_sg,), ())])

    # --- what `ctl release` does: write the parameter. A later stack update must not undo it.
    ssm.put_parameter(Name=out["ReleaseParameter"], Value=f"rel{RUN}", Type="String", Overwrite=True)

    # --- database stack: create
    db_body = strip_output(db_text, "SecretArn")
    db_params = {"Environment": env, "VpcId": vpc, "SubnetIds": ",".join(private),
                 "ClientSecurityGroupId": out["InstanceSecurityGroup"],
                 "MultiAZ": "false", "DeletionProtection": "false", "DatabaseName": f"notes_{RUN}"}
    cfn.create_stack(StackName=db_stack, TemplateBody=db_body, Parameters=params(db_params),
                     Capabilities=["CAPABILITY_IAM"])
    cleanup.append(lambda: cfn.delete_stack(StackName=db_stack))
    dstack = wait_stack(db_stack, "CREATE_COMPLETE")
    if not equal("db create: status", dstack["StackStatus"], "CREATE_COMPLETE"):
        return
    dout = outputs(dstack)
    equal("db create: moto skipped only the egress rule it does not implement",
          skipped_by_moto(db_stack, db_t), {"ClientEgressToDatabase"})
    dids = physical_ids(db_stack)
    inst = rds.describe_db_instances(DBInstanceIdentifier=dids["Database"])["DBInstances"][0]
    equal("db create: Endpoint and Port outputs", (dout.get("Endpoint"), dout.get("Port")),
          (inst["Endpoint"]["Address"], str(inst["Endpoint"]["Port"])))
    equal("db create: DatabaseName output is the instance's database",
          (dout.get("DatabaseName"), inst.get("DBName")), (f"notes_{RUN}", f"notes_{RUN}"))
    equal("db create: mysql, encrypted, 7-day backups, private",
          (inst["Engine"], inst["StorageEncrypted"], inst["BackupRetentionPeriod"], inst["PubliclyAccessible"]),
          ("mysql", True, 7, False))
    dsg = ec2.describe_security_groups(GroupIds=[dout["SecurityGroup"]])["SecurityGroups"][0]
    equal("db create: database ingress only from the instances' group on 3306",
          [(p["FromPort"], [g["GroupId"] for g in p["UserIdGroupPairs"]], p["IpRanges"])
           for p in dsg["IpPermissions"]],
          [(3306, [out["InstanceSecurityGroup"]], [])])

    # --- database stack: update (a new client group, as after replacing the app's instances)
    other_sg = ec2.create_security_group(GroupName=f"skiff-test-client-{RUN}", Description="test client",
                                         VpcId=vpc)["GroupId"]
    cleanup.append(lambda: ec2.delete_security_group(GroupId=other_sg))
    db_params["ClientSecurityGroupId"] = other_sg
    cfn.update_stack(StackName=db_stack, TemplateBody=db_body, Parameters=params(db_params),
                     Capabilities=["CAPABILITY_IAM"])
    dstack = wait_stack(db_stack, "UPDATE_COMPLETE")
    equal("db update: status", dstack["StackStatus"], "UPDATE_COMPLETE")
    dout2 = outputs(dstack)
    dsg = ec2.describe_security_groups(GroupIds=[dout2["SecurityGroup"]])["SecurityGroups"][0]
    equal("db update: database ingress follows the new client group",
          [[g["GroupId"] for g in p["UserIdGroupPairs"]] for p in dsg["IpPermissions"]], [[other_sg]])
    equal("db update: same database endpoint", dout2.get("Endpoint"), dout["Endpoint"])

    # --- app stack: update with the database wired in and a larger group
    secret = sm.create_secret(Name=f"rds!skiff-test-{RUN}", SecretString='{"username":"skiff"}')["ARN"]
    cleanup.append(lambda: sm.delete_secret(SecretId=secret, ForceDeleteWithoutRecovery=True))
    app_params.update(DatabaseHost=dout["Endpoint"], DatabasePort=dout["Port"],
                      DatabaseName=dout["DatabaseName"], DatabaseSecretArn=secret, MaxSize=6)
    cfn.update_stack(StackName=app_stack, TemplateBody=app_text, Parameters=params(app_params),
                     Capabilities=["CAPABILITY_IAM"])
    stack = wait_stack(app_stack, "UPDATE_COMPLETE")
    equal("app update: status", stack["StackStatus"], "UPDATE_COMPLETE")
    out2 = outputs(stack)
    equal("app update: outputs unchanged",
          {k: out2.get(k) for k in ("ReleaseParameter", "AutoScalingGroup", "ImageRepository",
                                    "LoadBalancerDNS", "LifecycleHook")},
          {k: out.get(k) for k in ("ReleaseParameter", "AutoScalingGroup", "ImageRepository",
                                   "LoadBalancerDNS", "LifecycleHook")})
    equal("app update: the release ctl wrote survives the update",
          ssm.get_parameter(Name=out["ReleaseParameter"])["Parameter"]["Value"], f"rel{RUN}")
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[out["AutoScalingGroup"]])["AutoScalingGroups"][0]
    equal("app update: group max size", group["MaxSize"], 6)
    equal("app update: every resource built (none skipped by moto)",
          skipped_by_moto(app_stack, app_t), set())
    ids2 = physical_ids(app_stack)
    config, _, _ = run_user_data(latest_user_data(ids2["LaunchTemplate"]))
    equal("app update: agent config now has the database",
          config, expected_agent_config(env, account, {
              "DATABASE_HOST": dout["Endpoint"], "DATABASE_PORT": dout["Port"],
              "DATABASE_NAME": f"notes_{RUN}", "DATABASE_SECRET_ARN": secret}))
    stmts = role_statements(ids2["InstanceRole"])
    check("app update: role may read exactly that secret",
          any(s.get("Action") == "secretsmanager:GetSecretValue" and s.get("Resource") == secret
              for s in stmts), str(stmts))

    # --- delete both
    cfn.delete_stack(StackName=db_stack)
    dstack = wait_stack(dstack["StackId"], "DELETE_COMPLETE")
    equal("db delete: status", dstack["StackStatus"], "DELETE_COMPLETE")
    gone = [d for d in rds.describe_db_instances()["DBInstances"]
            if d["DBInstanceIdentifier"] == dids["Database"]]
    equal("db delete: instance gone", gone, [])

    cfn.delete_stack(StackName=app_stack)
    stack = wait_stack(stack["StackId"], "DELETE_COMPLETE")
    equal("app delete: status", stack["StackStatus"], "DELETE_COMPLETE")
    try:
        ssm.get_parameter(Name=out["ReleaseParameter"])
        check("app delete: release parameter gone", False, "still there")
    except ssm.exceptions.ParameterNotFound:
        check("app delete: release parameter gone", True)
    equal("app delete: group gone",
          asg.describe_auto_scaling_groups(AutoScalingGroupNames=[out["AutoScalingGroup"]])["AutoScalingGroups"], [])


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
    try:
        suppressions_justified("app", app_t)
        suppressions_justified("db", db_t)
        app_template_checks(app_t)
        db_template_checks(db_t)
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

    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
