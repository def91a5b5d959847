"""The box's emulator (IAM enforced, on the bridge) and the app stack the box creates in it from
templates/app.yaml, with the template's settings the box follows (drain, swap mode)."""

import json
import os
import subprocess
import urllib.error
import urllib.request

from settings import BoxError, CI_HOME, EMULATOR_PORT, ENDPOINT, ENV_NAME, GATEWAY, REGION, REPO, ROOT, RUN_DIR, STACK, STATE, TEMPLATE
from kit.waits import wait_until  # noqa: E402


# --- the template's settings the box follows -----------------------------------------------

def template_settings(stack_params):
    """Target group health check, deregistration delay and hook settings from templates/app.yaml,
    with this box's parameter values substituted (one source for HAProxy, the model, the runner)."""
    from test_stacks import load_template

    _, t = load_template(TEMPLATE)
    tg = t["Resources"]["TargetGroup"]["Properties"]
    asg = t["Resources"]["AutoScalingGroup"]["Properties"]

    def value(v):
        if isinstance(v, dict) and "Ref" in v:
            name = v["Ref"]
            return stack_params.get(name, t["Parameters"][name].get("Default"))
        return v

    attrs = {a["Key"]: value(a["Value"]) for a in tg.get("TargetGroupAttributes", [])}
    return {
        "interval": int(tg["HealthCheckIntervalSeconds"]),
        "timeout": int(tg["HealthCheckTimeoutSeconds"]),
        "healthy": int(tg["HealthyThresholdCount"]),
        "unhealthy": int(tg["UnhealthyThresholdCount"]),
        "path": tg["HealthCheckPath"],
        "health_port": int(value(tg["HealthCheckPort"])),
        "app_port": int(value(tg["Port"])),
        "deregistration_delay": int(attrs.get("deregistration_delay.timeout_seconds", 300)),
        "grace": int(asg.get("HealthCheckGracePeriod", 0)),
        "max_healthy": int(asg["InstanceMaintenancePolicy"]["MaxHealthyPercentage"]),
        "min_healthy": int(asg["InstanceMaintenancePolicy"]["MinHealthyPercentage"]),
    }


def start_emulator():
    os.makedirs(RUN_DIR, exist_ok=True)
    admin_file = os.path.join(STATE, "emulator-admin.json")
    py = os.path.join(CI_HOME, "venv-moto", "bin", "python")
    log = open(os.path.join(STATE, "emulator.log"), "w")
    p = subprocess.Popen([py, os.path.join(ROOT, "testbed", "emulator", "server.py"), "-H", GATEWAY,
                          "--port", str(EMULATOR_PORT), "--iam", "--admin-file", admin_file],
                         stdout=log, stderr=log, start_new_session=True)
    with open(os.path.join(RUN_DIR, "emulator.pid"), "w") as f:
        f.write(str(p.pid))

    def ready():
        try:
            with urllib.request.urlopen(f"{ENDPOINT}/skiff-emulator/version", timeout=2) as r:
                return json.load(r)
        except OSError:
            if p.poll() is not None:
                raise BoxError(f"the emulator exited ({p.returncode}); see {STATE}/emulator.log") from None
            return None

    if not wait_until(ready, 60, 0.5):
        raise BoxError(f"the emulator did not answer on {ENDPOINT} in 60 s; see {STATE}/emulator.log")
    with open(admin_file) as f:
        return json.load(f)


def drain_seconds(t):
    """The box's DrainSeconds: FLEET_DRAIN, else the target group's detection window
    (UnhealthyThresholdCount x HealthCheckIntervalSeconds + HealthCheckTimeoutSeconds, 12 s with
    the template's settings). An in-place swap drains by failing the health check while the old
    container still serves; stopped any sooner, the load balancer may still send it requests.
    Measured with 5 s: the target never left the load balancer (2 checks of 5 s not yet failed),
    3-5 requests of ~430 failed (503) per in-place release on 3 instances."""
    if os.environ.get("FLEET_DRAIN"):
        return int(os.environ["FLEET_DRAIN"])
    tg = t["Resources"]["TargetGroup"]["Properties"]
    return (int(tg["UnhealthyThresholdCount"]) * int(tg["HealthCheckIntervalSeconds"])
            + int(tg["HealthCheckTimeoutSeconds"]))


def swap_mode(stack_params):
    """The stack's SwapMode (its parameter, else the template's default), or None when the
    template has no such parameter."""
    from test_stacks import load_template

    _, t = load_template(TEMPLATE)
    if "SwapMode" not in t["Parameters"]:
        return None
    return stack_params.get("SwapMode") or t["Parameters"]["SwapMode"].get("Default")


def create_stack(c, tag, instances, params_extra, digest=None):
    from test_stacks import load_template, outputs, params

    text, t = load_template(TEMPLATE)
    ec2, acm, ssm, sm, cfn, iam = (c(x) for x in ("ec2", "acm", "ssm", "secretsmanager",
                                                  "cloudformation", "iam"))
    vpc = ec2.create_vpc(CidrBlock="10.201.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.201.{i + 1}.0/24",
                                 AvailabilityZone=REGION + z)["Subnet"]["SubnetId"]
               for i, z in enumerate("abab")]
    cert = acm.request_certificate(DomainName="fleet.skiff.example.com")["CertificateArn"]
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    # No database server in the box: an existing database named by parameter (the test app does
    # not connect to it); its secret is real, so the instance role's secret scope still applies.
    secret = sm.create_secret(Name=f"skiff-{ENV_NAME}-db", SecretString='{"username":"skiff"}')["ARN"]
    p = {"Environment": ENV_NAME, "VpcId": vpc, "PublicSubnetIds": ",".join(subnets[:2]),
         "PrivateSubnetIds": ",".join(subnets[2:]), "CertificateArn": cert, "AmiId": ami,
         "InitialTag": tag, "MinSize": instances, "MaxSize": max(2 * instances, 2),
         "ImageRepositoryName": REPO, "DrainSeconds": drain_seconds(t), "StopTimeoutSeconds": 5,
         "StartTimeoutSeconds": 15, "LaunchHookTimeoutSeconds": 120,
         "DatabaseHost": "db.example.internal", "DatabaseSecretArn": secret}
    p.update(params_extra)
    p = {k: v for k, v in p.items() if k in t["Parameters"]}
    # Created once before the stack, as `make create-stack` does; only ctl writes it afterwards.
    # With a digest, pinned (the record ctl writes): `make create-stack` writes the bare tag, and
    # with trusted keys ctl refuses to roll back to a record that names no digest (exit 2,
    # "release a tag resolved to its digest"), which scenario 7's rollback to it would meet.
    value = json.dumps({"tag": tag, "digest": digest}) if digest else tag
    ssm.put_parameter(Name=f"/skiff/{ENV_NAME}/release", Value=value, Type="String",
                      Description="skiff release of fleet, written by ctl release")
    cfn.create_stack(StackName=STACK, TemplateBody=text, Parameters=params(p),
                     Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"])
    stack = wait_until(lambda: (lambda s: s if not s["StackStatus"].endswith("_IN_PROGRESS") else None)(
        cfn.describe_stacks(StackName=STACK)["Stacks"][0]), 120, 1)
    if not stack or stack["StackStatus"] != "CREATE_COMPLETE":
        raise BoxError(f"stack {STACK}: {stack and stack['StackStatus']}: {stack and stack.get('StackStatusReason')}")
    out = outputs(stack)
    resources = {r["LogicalResourceId"]: r.get("PhysicalResourceId") for r in
                 cfn.describe_stack_resources(StackName=STACK)["StackResources"] if "LogicalResourceId" in r}
    role_name = resources["InstanceRole"]
    user = "fleet-deployer"
    iam.create_user(UserName=user)
    iam.attach_user_policy(UserName=user, PolicyArn=out["DeployerPolicyArn"])
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return {"outputs": out, "params": p, "launch_template": resources["LaunchTemplate"],
            "role_name": role_name, "role_arn": iam.get_role(RoleName=role_name)["Role"]["Arn"],
            "deployer": {"access_key_id": key["AccessKeyId"], "secret_access_key": key["SecretAccessKey"]}}
